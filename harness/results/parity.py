"""Loss parity: did two backends compute the same training run?

Cells are compared only when their ``recipe_fingerprint`` matches (same
model, data order, global batch, optimizer, schedule, clipping, precision,
tuning scope and seed; see :meth:`ftbench.harness.contract.config.Recipe.fingerprint`).  Each
such cell's per-step ``train_loss`` is compared with a *reference* cell's,
and ``record["parity"]`` gets the largest relative deviation and a verdict
against a tolerance that depends on the precision.

How the reference is chosen (the core never names a backend):

1. a backend registered with ``BackendSpec(reference=True)`` (the built-in
   ``eager`` is one): the first finished cell of such a backend with the
   fingerprint is the reference; the grid runs those cells first
   (:func:`ftbench.harness.grid.expand.reference_first`), so it exists before the others
   finish;
2. when no reference backend finished with that fingerprint (none in the
   grid, or it failed), the first finished cell of the fingerprint is the
   reference, so a grid of compile and DeepSpeed alone still cross-checks.

A cell whose recipe differs from every earlier one of the same task, model
and data is not compared, and its ``reason`` names the settings that differ
(``"recipe differs from eager: lr 0.003→0.001"``), so the table says why.

The verdict looks at the first :data:`WINDOW` steps.  Two runs of the same
math drift apart later all the same: rounding differences of 1e-7 (another
reduction order) grow step by step through AdamW, which normalises even
tiny gradient differences (measured, tiny-t5 translation, fp32: ddp ×2
against eager 1e-7 at step 5, 5e-5 at step 40, 2e-4 at step 45).  A backend
that changes the math (another learning rate, a wrong loss scale, a missing
clip) deviates by 1e-3 or more within a few steps, inside the window.  So
``passed`` judges the window against the tolerance; ``max_rel_dev`` (and
``worst_step``) describe the whole curve and the table shows the drift when
it exceeds the tolerance; a non-finite value anywhere fails.

Tolerances were measured on a 2-core CPU in fp32 (12 steps, tiny-gpt2, the
largest relative deviation from eager): DeepSpeed ZeRO 0-3, DDP and FSDP on
2 ranks 1.1e-7, compile 8.4e-7, DeepSpeedCPUAdam offload 6.7e-7; the fp32
bound is 1e-4.  The bf16/fp16 bounds allow for the rounding of different but
equally valid kernel orders under autocast.
"""

from __future__ import annotations

import math
from typing import Callable

from ftbench.harness.contract.specs import Spec
from ftbench.harness.results.opt_verdict import annotate_optimizations
from ftbench.harness.contract.config import FINGERPRINT_FIELDS
from ftbench.harness.contract.registry import Registry

#: Largest relative deviation of a loss curve that still passes, by precision.
TOLERANCES = {"fp32": 1e-4, "bf16": 5e-2, "fp16": 2e-2}

#: Steps judged against the tolerance (later steps drift apart by chaos alone).
WINDOW = 10

#: Statuses of ``record["parity"]["status"]``.
REFERENCE, COMPARED, NOT_COMPARED = "reference", "compared", "not-compared"

_COMPARABLE = ("ok", "diverged")


def annotate_parity(record: dict, earlier: list[dict],
                    is_reference: Callable[[str], bool] | None = None) -> None:
    """Set ``record["parity"]`` by comparing it with ``earlier`` records.

    ``is_reference(backend_name)`` says whether a backend is a registered
    reference; by default it asks the plugin registry.

    Example::

        annotate_parity(rec, previous_records, is_reference=lambda b: b == "eager")
        rec["parity"]   # {"status": "compared", "max_rel_dev": 3e-8, "passed": True, ...}
    """
    if is_reference is None:
        is_reference = _registry_lookup()
    record["parity"] = _parity(record, [r for r in earlier if r is not record], is_reference)
    annotate_optimizations(record, earlier)


def _parity(record: dict, earlier: list[dict], is_reference) -> dict:
    status = record.get("status")
    losses = record.get("train_loss") or []
    if status not in _COMPARABLE or not losses:
        return {"status": NOT_COMPARED, "reason": f"cell {status}, no loss curve" if status != "ok"
                else "no loss curve"}
    fp = record.get("recipe_fingerprint")
    same = [r for r in earlier if r.get("recipe_fingerprint") == fp and r.get("status") == "ok"
            and r.get("train_loss")]
    flagged = [r for r in same if is_reference(_name(r))]
    numerics = ((record.get("config") or {}).get("recipe") or {}).get("numerics")
    if numerics and not same:
        # Another math on purpose: judged on quality against its baseline (opt_verdict), not on its loss curve.
        return {"status": NOT_COMPARED, "reason": f"numerics changed by {numerics}"}
    if is_reference(_name(record)) and not flagged:
        return {"status": REFERENCE, "reason": "reference backend"}
    ref = (flagged or same or [None])[0]
    if ref is None:
        other = _closest_other_recipe(record, earlier, is_reference)
        if other is not None:
            return {"status": NOT_COMPARED, "reference": _label(other),
                    "reason": f"recipe differs from {_label(other)}: {_recipe_diff(other, record)}"}
        return {"status": REFERENCE, "reason": "first cell of its recipe (no reference backend ran it)"}
    return _compare(record, ref)


def _compare(record: dict, ref: dict) -> dict:
    precision = (record.get("config") or {}).get("recipe", {}).get("precision", "fp32")
    tol = TOLERANCES.get(precision, TOLERANCES["fp32"])
    mine, theirs = record["train_loss"], ref["train_loss"]
    n = min(len(mine), len(theirs))
    devs = []
    for a, b in zip(mine[:n], theirs[:n]):
        if not (math.isfinite(a) and math.isfinite(b)):
            devs.append(0.0 if a == b else math.inf)
        else:
            devs.append(abs(a - b) / max(abs(b), 1e-12))
    worst_step = max(range(n), key=devs.__getitem__) if n else None
    worst = devs[worst_step] if n else 0.0
    window = max(devs[:WINDOW], default=0.0)
    # A run that ended at its quality target is shorter by design: compare the steps both ran.
    same_length = len(mine) == len(theirs) or record.get("stopped_at_target") or ref.get("stopped_at_target")
    passed = window <= tol and math.isfinite(worst) and bool(same_length)
    out = {"status": COMPARED, "reference": _label(ref), "reference_cell_id": ref.get("cell_id"),
           "max_rel_dev": worst, "worst_step": worst_step, "window_max_rel_dev": window,
           "window_steps": min(WINDOW, n), "steps_compared": n, "tolerance": tol, "precision": precision,
           "passed": passed}
    # Where the curve left the tolerance, if it did (after the window: drift; in it: a failure).
    left = next((i for i, d in enumerate(devs) if d > tol or not math.isfinite(d)), None)
    out["left_tolerance_at_step"] = left
    if not same_length:
        out["reason"] = f"loss curve has {len(mine)} steps, the reference {len(theirs)}"
    elif not passed:
        step = worst_step if left is None else left
        out["reason"] = f"deviates {devs[step]:.1e} > {tol:.0e} at step {step}"
    return out


def parity_label(p: dict | None) -> str:
    """Short table text: ``reference``, ``✓ 1.2e-07``, ``✓ 1.2e-07, drift 2.2e-04 from step 37`` or the reason."""
    if not p:
        return "-"
    if p.get("status") == REFERENCE:
        return "reference"
    if p.get("max_rel_dev") is None:
        return str(p.get("reason", "-"))
    # float(): a curve that left every bound is stored with the deviation "inf" (JSON has no infinity)
    judged, worst = float(p.get("window_max_rel_dev", p["max_rel_dev"])), float(p["max_rel_dev"])
    text = f"{'✓' if p.get('passed') else '✗'} {judged:.1e}"
    if worst > (p.get("tolerance") or math.inf):
        text += f", drift {worst:.1e}"
        if p.get("left_tolerance_at_step") is not None:
            text += f" from step {p['left_tolerance_at_step']}"
    return text


def _closest_other_recipe(record: dict, earlier: list[dict], is_reference) -> dict | None:
    """An earlier finished cell of the same task, model and data (a reference backend first)."""
    key = _setting(record)
    others = [r for r in earlier if r.get("status") == "ok" and _setting(r) == key
              and r.get("recipe_fingerprint") != record.get("recipe_fingerprint")]
    flagged = [r for r in others if is_reference(_name(r))]
    return (flagged or others or [None])[0]


def _setting(r: dict) -> tuple:
    cfg = r.get("config") or {}
    return r.get("task"), r.get("model"), r.get("data"), str(cfg.get("columns"))


def _recipe_diff(ref: dict, record: dict) -> str:
    a = (ref.get("config") or {}).get("recipe") or {}
    b = (record.get("config") or {}).get("recipe") or {}

    diffs = [f"{k} {_fmt(a.get(k))}→{_fmt(b.get(k))}" for k in FINGERPRINT_FIELDS if a.get(k) != b.get(k)]
    return ", ".join(diffs) or "task options differ"


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _name(r: dict) -> str:
    return Spec.parse(str(r.get("backend") or "?")).name


def _label(r: dict) -> str:
    nproc = r.get("nproc") or 1
    return r.get("backend", "?") + (f" ×{nproc}" if nproc > 1 else "")


def _registry_lookup() -> Callable[[str], bool]:
    try:
        backends = Registry.load().backends
    except Exception:  # noqa: BLE001 - parity must never fail a finished run
        backends = {}

    def is_reference(name: str) -> bool:
        entry = backends.get(name)
        return bool(entry is not None and getattr(entry.obj, "reference", False))

    return is_reference
