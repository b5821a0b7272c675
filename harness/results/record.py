"""Turning a finished cell process into a result record.

Every key, its meaning and where it comes from is in
:mod:`ftbench.harness.contract.schema` (and docs/records.md, generated from it):
the rank-0 figures are copied from there, so a figure the worker adds is one
line of the schema.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
from dataclasses import dataclass, field

from ftbench.harness.cell.hostalloc import MEMORY_KIND as CPU_MEMORY_KIND
from ftbench.harness.cell.machineload import combine as combine_load
from ftbench.harness.cell.memwindows import CUDA_FIGURES
from ftbench.harness.contract.config import CellSpec
from ftbench.harness.contract.schema import SCHEMA_VERSION, copied_from_rank0

#: What a CUDA memory figure is: torch.cuda.max_memory_allocated, max over ranks.  A CPU figure is
#: each rank's peak resident set, max over ranks, named by its --cpu-memory mode (CPU_MEMORY_KIND).
CUDA_MEMORY_KIND = "cuda_peak_allocated"


@dataclass
class CellOutcome:
    """What the driver learns from one cell process."""

    ranks: list[dict]
    status: str
    error: str | None
    wall_s: float
    returncode: int | None
    tree_peak_bytes: int
    stderr_tail: str = ""
    #: Processes still alive after the cell's main process ended on its own (killed by the driver).
    leftovers: list = field(default_factory=list)
    #: How the cell was launched: ``mode`` (``fork``, ``exec`` or ``torchrun``; see
    #: ``ftbench.harness.running.launch.LAUNCH_MODES``) and where its rendezvous store listened.
    launch: dict | None = None


def build_record(spec: CellSpec, outcome: CellOutcome, environment: dict, started_at: float) -> dict:
    """One result record from a finished cell's rank reports (every key: docs/records.md)."""
    ranks = outcome.ranks
    main = next((r for r in ranks if r.get("rank") == 0), ranks[0] if ranks else {})
    step = main.get("step_time") or {}
    record = {
        "schema_version": SCHEMA_VERSION,
        "cell_id": spec.cell_id, "recipe_fingerprint": spec.fingerprint(), "task": str(spec.task),
        "backend": str(spec.backend), "model": spec.model, "data": spec.data, "nproc": spec.nproc,
        # Ranks per node x nodes. A multi-node cell's record comes from node 0, whose own ranks are in
        # memory_per_rank; throughput, losses and metrics are global.
        "nnodes": spec.nnodes, "world_size": main.get("world_size") or spec.nproc * spec.nnodes,
        "repeat": spec.repeat, "status": outcome.status, "error": outcome.error,
        "step_time_s": step.get("median"), "step_time": step or None,
        **{key.name: _from_rank0(main, key) for key in copied_from_rank0()},
        **_memory(ranks, main, outcome),
        "flops_per_s": _sum_or_none(r.get("flops_per_s") for r in ranks),
        "peak_flops": _sum_or_none(r.get("peak_flops") for r in ranks),
        "as_run": as_run(ranks, main),
        "diverged_at_step": next((r.get("diverged_at_step") for r in ranks if "diverged_at_step" in r), None),
        "wall_s": outcome.wall_s,
        "machine_load": combine_load([r.get("machine_load_reading") for r in ranks]),
        # mode fork | exec | torchrun (ftbench.harness.running.launch): a forked CUDA cell that ran proves
        # the fork server was CUDA-clean (a cell forked from a poisoned server refuses to start); and where
        # the cell's rendezvous store listened.
        "launch": outcome.launch,
        "profile": _profile(ranks),
        "started_at": _dt.datetime.fromtimestamp(started_at, _dt.timezone.utc).isoformat(),
        "recipe_defaults": spec.recipe.recipe_defaults,
        "config": spec.to_dict(),
        "environment": {**environment, "device": main.get("device") or {}},
    }
    record["mfu"], note = _mfu(record, len(ranks) == spec.nproc)
    if note:
        record["mfu_note"] = note
    _add_warnings(record, outcome, ranks)
    return record


def _from_rank0(main: dict, key) -> object:
    value = main.get(key.name)
    return key.empty() if value is None and key.empty is not None else value
def as_run(ranks: list[dict], main: dict) -> dict | None:
    """Rank 0's account of what the cell computed, with one data-order digest: each step's row
    fingerprints summed over the ranks (so the digest does not depend on how the global batch was
    split), hashed in step order."""
    facts = dict(main.get("as_run") or {})
    if not facts:
        return None
    per_rank = [(r.get("as_run") or {}).get("data_order_rows_rank") for r in sorted(ranks, key=_rank)]
    facts.pop("data_order_rows_rank", None)
    if per_rank and all(isinstance(rows, list) for rows in per_rank):
        steps = min(len(rows) for rows in per_rank)
        sums = [sum(rows[i] for rows in per_rank) % 2**64 for i in range(steps)]
        facts["data_order_digest"] = hashlib.sha256(",".join(map(str, sums)).encode()).hexdigest()[:16]
    return facts


def _rank(r: dict) -> int:
    return int(r.get("rank") or 0)


def _memory(ranks: list[dict], main: dict, outcome: CellOutcome) -> dict:
    """Peak memory: the largest rank's, with what kind of figure it is, both windows, and every rank's."""
    per_rank = [{"rank": r.get("rank"), **(r.get("memory") or {}),
                 **({"after_eval": r["memory_after_eval"]} if r.get("memory_after_eval") else {})} for r in ranks]
    on_cuda = (main.get("device") or {}).get("type") == "cuda"
    return {**memory_windows(per_rank, on_cuda),
            "memory_kind": CUDA_MEMORY_KIND if on_cuda else CPU_MEMORY_KIND[main.get("cpu_memory") or "resident"],
            "memory_per_rank": per_rank,
            "memory_tree_peak_bytes": outcome.tree_peak_bytes or None}


def memory_windows(per_rank: list[dict], on_cuda: bool) -> dict:
    """Headline peak (the larger window), the setup and training peaks (max over ranks) and how
    the windows were separated (see ``ftbench.harness.cell.memwindows``)."""
    key = "cuda_peak_allocated_bytes" if on_cuda else "host_peak_rss_bytes"

    def peak(values):
        values = [v for v in values if v]
        return max(values) if values else None

    out = {"peak_memory_bytes": peak(m.get(key) for m in per_rank),
           "setup_peak_memory_bytes": peak((m.get("setup") or {}).get(key) for m in per_rank),
           "train_peak_memory_bytes": peak((m.get("train") or {}).get(key) for m in per_rank),
           "memory_window_reset": next((m["reset"] for m in per_rank if m.get("reset")), None),
           # Who reset the peak statistics inside setup (e.g. DeepSpeed ZeRO-1/2); the setup peak keeps
           # what was reached before (ftbench.harness.cell.memwindows).
           "setup_peak_reset_by": sorted({c for m in per_rank for c in (m.get("setup") or {}).get("reset_by") or ()})
           or None}
    if on_cuda:
        out["memory_figures"] = dict(CUDA_FIGURES)
        out["peak_reserved_bytes"] = peak(m.get("cuda_peak_reserved_bytes") for m in per_rank)
        out["driver_used_bytes"] = peak(m.get("cuda_driver_used_bytes") for m in per_rank)
    return out


def _mfu(record: dict, all_ranks: bool) -> tuple[float | None, str | None]:
    """Model FLOPs utilisation, never above 1: a figure above the peak means the peak is wrong for
    this run (e.g. matmuls in another dtype than the table's), so it is withheld with the reason."""
    flops, peak = record["flops_per_s"], record["peak_flops"]
    if not (flops and peak and all_ranks):
        return None, None
    mfu = flops / peak
    if mfu > 1:
        return None, (f"withheld: {flops:.3g} FLOP/s exceeds the {record.get('matmul_dtype')} peak "
                      f"{peak:.3g} ({record.get('peak_flops_source')}), so that peak does not apply to this run")
    return mfu, None


def _add_warnings(record: dict, outcome: CellOutcome, ranks: list[dict]) -> None:
    if outcome.leftovers:
        # The cell's own result stands (a compile worker pool that lingers is not a failed run), but
        # the user must know that its measurements may have shared the machine with these.
        record["leftover_processes"] = outcome.leftovers
        names = ", ".join(f"pid {p['pid']} ({' '.join(p['command'].split())[:60]})" for p in outcome.leftovers)
        record["warnings"] = [f"the cell left {len(outcome.leftovers)} process(es) running after it ended; "
                              f"ftbench killed them: {names}"]
    worse = tuning_made_worse(record)
    if worse:
        record.setdefault("warnings", []).append(worse)
    if outcome.status not in ("ok", "diverged", "skipped"):
        record["stderr_tail"] = outcome.stderr_tail[-2000:]
        tb = next((r.get("traceback") for r in ranks if r.get("traceback")), None)
        if tb:
            record["traceback"] = tb


def tuning_made_worse(record: dict) -> str | None:
    """A warning when fine-tuning raised the held-out loss above the model's loss before tuning."""
    before = (record.get("metrics_before") or {}).get("eval_loss")
    after = record.get("eval_loss")
    if record.get("status") != "ok" or before is None or after is None or not after > before:
        return None
    return (f"tuning made the held-out loss worse: {before:.4g} before, {after:.4g} after; the recipe may be too "
            f"aggressive for this checkpoint (try a lower --lr)")


def _sum_or_none(values) -> float | None:
    """Sum over ranks, or None unless every rank reported a figure."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return float(sum(values))


def _profile(ranks: list[dict]) -> dict | None:
    """Rank 0's phase breakdown of the profiled steps and every rank's trace (paths inside the result set)."""
    profiled = [r for r in ranks if r.get("profile")]
    if not profiled:
        return None
    main = dict(next((r for r in profiled if r.get("rank") == 0), profiled[0])["profile"])
    main.pop("trace", None)
    main["traces"] = {str(r.get("rank", 0)): f"traces/{r['profile']['trace']}" for r in profiled}
    main["phases_s_per_rank"] = {str(r.get("rank", 0)): r["profile"].get("phases_s") for r in profiled}
    return main
