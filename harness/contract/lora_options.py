"""``--tuning lora[:options]``: LoRA adapters through the ``peft`` library.

Syntax (the tuning string, as on the command line or in a grid file)::

    lora                                   rank 8, alpha 16, dropout 0, the family's default targets
    lora:r=16,alpha=32,dropout=0.05
    lora:targets=c_attn+c_proj             module names joined by '+' (',' separates options)
    lora:targets=all-linear                every linear layer but the output head (peft's shorthand)

Options are checked here, before any cell runs; the adapters are put on the
model inside the cell (:mod:`ftbench.harness.cell.lora`).

Example::

    parse_lora("lora:r=4,targets=q_proj+v_proj")
    # {'r': 4, 'alpha': 16.0, 'dropout': 0.0, 'targets': ['q_proj', 'v_proj']}
"""

from __future__ import annotations

from ftbench.harness.contract.api import FtbenchError

LORA_DEFAULTS = {"r": 8, "alpha": 16.0, "dropout": 0.0, "targets": None}
_FIX = "write lora or lora:r=8,alpha=16,dropout=0,targets=NAME+NAME (see docs/fine-tuning.md)"


def is_lora(tuning: str) -> bool:
    return isinstance(tuning, str) and (tuning == "lora" or tuning.startswith("lora:"))


def parse_lora(tuning: str) -> dict:
    """The LoRA options of a tuning string, defaults filled in; FtbenchError on a bad one."""
    _, _, rest = tuning.partition(":")
    opts = dict(LORA_DEFAULTS)
    for item in filter(None, rest.split(",")):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or key not in LORA_DEFAULTS:
            raise FtbenchError(f"invalid tuning={tuning!r}: unknown LoRA option {item!r}; the options are "
                               f"{', '.join(LORA_DEFAULTS)}: {_FIX}")
        opts[key] = _value(tuning, key, value)
    return opts


def _value(tuning: str, key: str, text: str):
    if key == "targets":
        names = [t.strip() for t in text.split("+") if t.strip()]
        if not names:
            raise FtbenchError(f"invalid tuning={tuning!r}: targets is empty; {_FIX}")
        return names
    try:
        v = int(text) if key == "r" else float(text)
    except ValueError:
        v = None
    ok = v is not None and (v > 0 if key in ("r", "alpha") else 0 <= v < 1)
    if not ok:
        want = {"r": "an integer > 0", "alpha": "a number > 0", "dropout": "a number in [0, 1)"}[key]
        raise FtbenchError(f"invalid tuning={tuning!r}: LoRA {key} must be {want}, got {text!r}; {_FIX}")
    return v


def require_peft() -> None:
    """FtbenchError (exit 2, before any cell) when peft cannot be imported."""
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise FtbenchError(f"tuning=lora needs the peft library, which cannot be imported here ({e}); install "
                           "it with pip install 'ftbench[lora]' (or pick --tuning full)") from None
