"""A model directory never runs its own Python code unless the user asks.

A Hugging Face ``config.json`` (or ``tokenizer_config.json``) may carry an
``auto_map`` naming Python files of the directory; transformers imports them
when ``trust_remote_code`` is true, and *asks on the terminal* when it is left
unset.  ftbench always passes the flag explicitly (``False`` unless the cell
says ``trust_remote_code``, from ``--trust-remote-code``), so no load ever
prompts, and refuses such a directory before anything is loaded, naming the
file that would run (docs/reliability.md, *Model directories*).

Example::

    remote_code_files("models/custom")      # ['configuration_custom.py', 'modeling_custom.py']
    refuse_remote_code("models/custom", trusted=False)   # raises FtbenchError naming them
"""

from __future__ import annotations

import json
from pathlib import Path

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.format import shorten

#: Files whose ``auto_map`` names code that transformers would import.
CODE_MAPS = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
FLAG = "--trust-remote-code"
GRID_KEY = "settings.trust_remote_code: true"


def remote_code_files(path: str | Path) -> list[str]:
    """The Python files a local model directory's ``auto_map`` entries would import (sorted, unique)."""
    found: set[str] = set()
    for name in CODE_MAPS:
        f = Path(path) / name
        if not f.is_file():
            continue
        try:
            data = json.loads(f.read_text(encoding="utf-8", errors="replace"))
        except ValueError:
            continue  # an unreadable file is reported by the load that needs it
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if not isinstance(auto_map, dict):
            continue
        for ref in auto_map.values():
            for item in ref if isinstance(ref, list) else [ref]:
                if isinstance(item, str) and "." in item:
                    # "repo--module.Class" points into another repository; the module is what runs.
                    found.add(f"{name}: {item.split('--')[-1].rsplit('.', 1)[0]}.py")
    return sorted(found)


def refuse_remote_code(path: str | Path, trusted: bool) -> None:
    """Raise naming the files a local model directory would run, unless the cell trusts it."""
    if trusted or not Path(path).is_dir():
        return
    files = remote_code_files(path)
    if files:
        raise FtbenchError(
            f"model directory {shorten(str(path))} would run its own Python code ({'; '.join(files)} via "
            f"auto_map), and ftbench runs no model code unless asked. Read that code; if you trust it, pass "
            f"{FLAG} (grid file: {GRID_KEY}); else use a model whose type transformers knows")


def hf_kwargs(trusted: bool) -> dict:
    """The keyword every transformers ``from_pretrained`` gets: explicit, so it never prompts."""
    return {"trust_remote_code": bool(trusted)}


def as_user_error(name: str, error: Exception) -> FtbenchError | None:
    """transformers' refusal of a hub model's custom code as ftbench's own message (None if it is another error)."""
    if "trust_remote_code" not in str(error):
        return None
    return FtbenchError(f"model {shorten(name)} needs its own Python code to load, and ftbench runs no model code "
                        f"unless asked. Read that code; if you trust it, pass {FLAG} (grid file: {GRID_KEY})")
