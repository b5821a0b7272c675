"""Turning a finished cell process into a result record (DESIGN §5)."""

from __future__ import annotations

import datetime as _dt

from ftbench.harness.running.cellproc import CellOutcome
from ftbench.harness.grid.config import CellSpec

#: What a memory figure means, by device.
MEMORY_KINDS = {
    "cpu": "cpu_peak_rss",              # peak resident set of the rank's process tree (max over ranks)
    "cuda": "cuda_peak_allocated",      # torch.cuda.max_memory_allocated (max over ranks)
}


def build_record(spec: CellSpec, outcome: CellOutcome, environment: dict, started_at: float) -> dict:
    ranks = outcome.ranks
    main = next((r for r in ranks if r.get("rank") == 0), ranks[0] if ranks else {})
    device = main.get("device") or {}
    per_rank = []
    for r in ranks:
        mem = r.get("memory") or {}
        per_rank.append({"rank": r.get("rank"), **mem})
    on_cuda = device.get("type") == "cuda"
    if on_cuda:
        peaks = [m.get("cuda_peak_allocated_bytes") for m in per_rank if m.get("cuda_peak_allocated_bytes")]
    else:
        peaks = [m.get("host_peak_rss_bytes") for m in per_rank if m.get("host_peak_rss_bytes")]
    step = main.get("step_time") or {}
    env = dict(environment)
    env["device"] = device
    record = {
        "cell_id": spec.cell_id,
        "recipe_fingerprint": spec.fingerprint(),
        "task": spec.task,
        "backend": spec.backend,
        "model": spec.model,
        "data": spec.data,
        "nproc": spec.nproc,
        # Ranks per node x nodes: a multi-node cell's records come from node 0, which sees its own ranks
        # in memory_per_rank; throughput, losses and metrics are global.
        "nnodes": spec.nnodes,
        "world_size": main.get("world_size") or spec.nproc * spec.nnodes,
        "repeat": spec.repeat,
        "status": outcome.status,
        "error": outcome.error,
        "tokens_per_s": main.get("tokens_per_s"),
        "samples_per_s": main.get("samples_per_s"),
        "padded_tokens_per_s": main.get("padded_tokens_per_s"),
        "loss_tokens_per_s": main.get("loss_tokens_per_s"),
        "step_time_s": step.get("median"),
        "step_time": step or None,
        "step_times_s": main.get("step_times_s"),
        "tokens": main.get("tokens"),
        "peak_memory_bytes": max(peaks) if peaks else None,
        "memory_kind": MEMORY_KINDS["cuda" if on_cuda else "cpu"],
        "memory_per_rank": per_rank,
        "memory_tree_peak_bytes": outcome.tree_peak_bytes or None,
        "rss_before_model_bytes": main.get("rss_before_model_bytes"),
        "state_bytes_theory": main.get("state_bytes_theory"),
        "flops_per_s": _sum_or_none(r.get("flops_per_s") for r in ranks),
        "peak_flops": _sum_or_none(r.get("peak_flops") for r in ranks),
        "peak_flops_source": main.get("peak_flops_source"),
        "setup_s": main.get("setup_s"),
        "setup_phases": main.get("setup_phases"),
        "compile_s": main.get("compile_s"),
        "eval_s": main.get("eval_s"),
        "train_loss": main.get("train_loss") or [],
        "eval_loss": main.get("eval_loss"),
        "metric": main.get("metric"),
        "metric_value": main.get("metric_value"),
        "higher_is_better": main.get("higher_is_better"),
        "metrics": main.get("metrics") or {},
        "trainable_params": main.get("trainable_params"),
        "total_params": main.get("total_params"),
        "model_kind": main.get("model_kind"),
        "vocab_size": main.get("vocab_size"),
        "truncated_examples": main.get("truncated_examples"),
        "truncated_tokens": main.get("truncated_tokens"),
        "backend_stats": main.get("backend_stats") or {},
        "diverged_at_step": next((r.get("diverged_at_step") for r in ranks if "diverged_at_step" in r), None),
        "wall_s": outcome.wall_s,
        "started_at": _dt.datetime.fromtimestamp(started_at, _dt.timezone.utc).isoformat(),
        "config": spec.to_dict(),
        "environment": env,
    }
    if record["flops_per_s"] and record["peak_flops"] and len(ranks) == spec.nproc:
        record["mfu"] = record["flops_per_s"] / record["peak_flops"]
    else:
        record["mfu"] = None
    if outcome.leftovers:
        # The cell's own result stands (a compile worker pool that lingers is not a failed run), but
        # the user must know that its measurements may have shared the machine with these.
        record["leftover_processes"] = outcome.leftovers
        names = ", ".join(f"pid {p['pid']} ({' '.join(p['command'].split())[:60]})" for p in outcome.leftovers)
        record["warnings"] = [f"the cell left {len(outcome.leftovers)} process(es) running after it ended; "
                              f"ftbench killed them: {names}"]
    if outcome.status not in ("ok", "diverged", "skipped"):
        record["stderr_tail"] = outcome.stderr_tail[-2000:]
        tb = next((r.get("traceback") for r in ranks if r.get("traceback")), None)
        if tb:
            record["traceback"] = tb
    return record


def _sum_or_none(values) -> float | None:
    """Sum over ranks, or None unless every rank reported a figure."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return float(sum(values))
