"""The verdict on a cell's optimizations (``--opt``): parity, or quality within a tolerance.

An optimization that keeps the math (``exact``, or ``tolerance``: the same
math in another rounding order) leaves the recipe fingerprint unchanged, so
:mod:`ftbench.harness.results.parity` compares its loss curve with the
reference cell of that recipe: the same cell without it.  One that changes
numerics (8-bit optimizer states, a step without global clipping, packed
rows) enters the fingerprint, so no loss curve matches; it is judged on
quality instead: its held-out loss and the task's metric against the
baseline cell (same task, model, data, backend and ranks, no optimization that changes numerics),
within the largest tolerance its optimizations declare.  A change for the
better always passes.  The record says ``numerics changed``, never parity.

Example::

    annotate_optimizations(record, earlier)
    record["opt_verdict"]   # {"kind": "numerics changed", "passed": True, "eval_loss_change": 0.004, ...}
"""

from __future__ import annotations

import json
import math

from ftbench.harness.contract.optimization import parse_opts

#: ``record["opt_verdict"]["kind"]``.
PARITY, NUMERICS_CHANGED = "parity", "numerics changed"


def annotate_optimizations(record: dict, earlier: list[dict]) -> None:
    """Set ``record["opt_verdict"]`` for a cell with optimizations (others are left alone)."""
    cfg = record.get("config") or {}
    opts = record.get("optimizations") or []
    if not cfg.get("opt") or record.get("status") != "ok" or not opts:
        return
    numerics = [o for o in opts if o.get("math") == "numerics"]
    if not numerics:
        parity = record.get("parity") or {}
        record["opt_verdict"] = {"kind": PARITY, "passed": parity.get("passed"),
                                 "reference": parity.get("reference")}
        return
    tol = max(float(o.get("tolerance") or 0.0) for o in numerics)
    base = baseline_of(record, earlier)
    verdict = {"kind": NUMERICS_CHANGED, "by": [o["spec"] for o in numerics], "tolerance": tol}
    if base is None:
        record["opt_verdict"] = {**verdict, "passed": None,
                                 "reason": "no finished baseline cell (the same cell without --opt) to judge against"}
        return
    loss = _worse_by(record.get("eval_loss"), base.get("eval_loss"), higher_is_better=False)
    metric = _worse_by(record.get("metric_value"), base.get("metric_value"), bool(record.get("higher_is_better")))
    changes = [c for c in (loss, metric) if c is not None]
    record["opt_verdict"] = {**verdict, "baseline_cell_id": base.get("cell_id"), "eval_loss_change": loss,
                             "metric_change": metric, "metric": record.get("metric"),
                             "passed": bool(changes) and all(c <= tol for c in changes)}


def baseline_of(record: dict, earlier: list[dict]) -> dict | None:
    """The earlier finished cell that differs from ``record`` only by its optimizations, with none
    that changes numerics and the fewest others (a ladder's base rung; usually no ``--opt`` at all)."""
    def key(r):
        c = dict(r.get("config") or {})
        c.pop("opt", None)
        c.pop("repeat", None)
        recipe = dict(c.pop("recipe", None) or {})
        for k in ("numerics", "packing"):
            recipe.pop(k, None)
        # As JSON: a fresh record holds tuples where one read back from results.jsonl holds lists.
        return json.dumps([c, recipe], sort_keys=True, default=str)

    mine = key(record)
    found = [r for r in earlier if r is not record and r.get("status") == "ok" and key(r) == mine
             and not ((r.get("config") or {}).get("recipe") or {}).get("numerics")]
    return min(found, key=lambda r: len(parse_opts((r.get("config") or {}).get("opt") or "")), default=None)


def _worse_by(value, base, higher_is_better: bool) -> float | None:
    """Relative change of ``value`` against ``base``, positive when worse."""
    if not isinstance(value, (int, float)) or not isinstance(base, (int, float)) or not math.isfinite(base) \
            or base == 0:
        return None
    change = (value - base) / abs(base)
    return -change if higher_is_better else change


def verdict_label(v: dict | None) -> str | None:
    """Short table text: ``numerics changed: eval loss +0.4%, perplexity +1.1% (tol 5%) ✓``, each change
    positive when worse (None: parity says it)."""
    if not v or v.get("kind") != NUMERICS_CHANGED:
        return None
    if v.get("passed") is None:
        return "numerics changed: " + str(v.get("reason", "not judged"))
    mark = "✓" if v["passed"] else "✗"
    parts = []
    if v.get("eval_loss_change") is not None:
        parts.append(f"eval loss {_signed(v['eval_loss_change'])}")
    if v.get("metric_change") is not None and v.get("metric") not in (None, "eval_loss"):
        parts.append(f"{v['metric']} {_signed(v['metric_change'])}")
    return f"numerics changed: {', '.join(parts)} (tol {v['tolerance']:.0%}) {mark}"


def _signed(x: float) -> str:
    return f"{x:+.1%}"
