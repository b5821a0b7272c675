"""Labels that name a cell by what varies among the cells beside it.

Two cells that differ only in tuning, precision or seed must not look like
duplicate rows, and a label must not repeat what every cell shares.  So a
label is the backend, then each setting whose value differs between the
cells (model, data, ranks, then the recipe), spelt short where the value
speaks for itself.  The run's progress lines, its summary table, ``ftbench
run --dry-run`` and the reports, plots and comparisons all label cells here.

Example::

    varying_labels({"a": cfg_eager_full_fp32, "b": cfg_eager_lora_bf16})
    # {"a": "eager · full · fp32", "b": "eager · lora · bf16"}
"""

from __future__ import annotations

import json

#: Cell settings (besides the backend) that may set cells apart, in label order; then the recipe's.
SLOT_SETTINGS = ("model", "data", "nproc", "eval_examples")

#: How a varying setting reads in a label; any other reads ``key=value``.
_SHORT = {
    "nproc": lambda v: f"×{v}",
    "model": str,
    "data": str,
    "tuning": str,
    "precision": str,
    "seed": lambda v: f"seed {v}",
    "packing": lambda v: "packed" if v else "unpacked",
    "grad_checkpointing": lambda v: "ckpt" if v else "no ckpt",
    "recipe_defaults": lambda v: f"{v} defaults",
}


def varying_labels(configs: dict[str, dict], without: tuple[str, ...] = ()) -> dict[str, str]:
    """A label per key of ``configs`` (cell configurations as ``CellSpec.to_dict()`` spells them:
    ``backend``, ``model``, ``data``, ``nproc`` and a ``recipe`` mapping) naming the backend and the
    settings that vary among them; ``without`` leaves settings out (e.g. the seed, to group a cell's
    seeds under one label).

    Example: ``varying_labels({"1": {"backend": "eager", "recipe": {"lr": 3e-3}},
    "2": {"backend": "eager", "recipe": {"lr": 1e-3}}}) == {"1": "eager · lr=0.003", "2": "eager · lr=0.001"}``.
    """
    def spelled(v) -> str:
        return json.dumps(v, default=str, sort_keys=True)

    varying = [k for k in SLOT_SETTINGS
               if k not in without and len({spelled(c.get(k)) for c in configs.values()}) > 1]
    recipes = {key: dict(c.get("recipe") or {}) for key, c in configs.items()}
    for k in _recipe_keys(recipes.values()):
        # numerics restates the optimizations, which the label names anyway
        if k not in without and k != "numerics" and len({spelled(r.get(k)) for r in recipes.values()}) > 1:
            varying.append(("recipe", k))
    labels = {}
    for key, c in configs.items():
        parts = [str(c.get("backend")) + (f" + {c['opt']}" if c.get("opt") else "")]
        for v in varying:
            if v == ("recipe", "grad_accum"):
                parts.append(_micro_part(c, recipes[key]))
            elif isinstance(v, tuple):
                parts.append(_part(v[1], recipes[key].get(v[1])))
            else:
                parts.append(_part(v, c.get(v)))
        labels[key] = " · ".join(parts)
    return labels


def _recipe_keys(recipes) -> list[str]:
    """Recipe keys, those with a short form first (in its order), then the rest by name."""
    keys = {k for r in recipes for k in r}
    return [k for k in _SHORT if k in keys] + sorted(keys - set(_SHORT))


def _micro_part(config: dict, recipe: dict) -> str:
    """A varying split of the global batch reads as the micro-batch it gives (``--micro-batch``)."""
    try:
        return f"micro-batch {recipe['batch_size'] // (int(config.get('nproc') or 1) * recipe['grad_accum'])}"
    except (KeyError, TypeError, ZeroDivisionError):
        return f"grad_accum={recipe.get('grad_accum')}"


def _part(key: str, value) -> str:
    short = _SHORT.get(key)
    return short(value) if short else f"{key}={value}"
