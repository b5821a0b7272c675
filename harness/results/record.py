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
    windows = memory_windows(per_rank, on_cuda)
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
        **windows,
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
        "weights_stored_dtype": main.get("weights_stored_dtype"),
        "weights_dtype": main.get("weights_dtype"),
        "matmul_dtype": main.get("matmul_dtype"),
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
    record["mfu"], note = _mfu(record, len(ranks) == spec.nproc)
    if note:
        record["mfu_note"] = note
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
           "memory_window_reset": next((m["reset"] for m in per_rank if m.get("reset")), None)}
    if on_cuda:
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


def _sum_or_none(values) -> float | None:
    """Sum over ranks, or None unless every rank reported a figure."""
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return float(sum(values))
