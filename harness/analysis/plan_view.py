"""``ftbench plan`` output: a table of predicted peaks and verdicts, or JSON."""

from __future__ import annotations

from ftbench.harness.analysis.plan_time import calibrated_mfu, step_time
from ftbench.harness.contract.memory_model import MiB
from ftbench.harness.grid.memplan import FRONTIER_MICRO_BATCHES, frontier, largest_fitting_micro_batch, model_facts

#: The token volume the plan quotes a training time for.
TOKENS_QUOTED = 1e9
from ftbench.harness.grid.labels import varying_labels

#: Breakdown keys, shortest first in the table.
SHORT = {"weights": "weights", "gradients": "grads", "gradient_buffers": "grad buckets", "optimizer": "AdamW",
         "master_weights": "fp32 master", "master_gradients": "fp32 grads", "gathered_layers": "gathered",
         "autocast_copies": "autocast", "activations": "activations", "harness": "harness",
         "backend runtime": "runtime", "gathered_weights": "gathered weights", "reduction_bucket": "bucket",
         "reduction_copies": "bucket copies", "step_temporaries": "step temporaries", "staging_buffers": "staging"}


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            return f"{seconds / size:.3g} {unit}"
    return f"{seconds * 1e3:.3g} ms"


def _mib(v) -> str:
    return "-" if v is None else f"{v / MiB:,.0f} MiB"


def breakdown_text(breakdown: dict) -> str:
    parts = []
    for k, v in breakdown.items():
        name = SHORT.get(k.replace(" (offloaded)", ""), k)
        parts.append(f"{name}{' (host)' if 'offloaded' in k else ''} {v / MiB:,.1f}")
    return " · ".join(parts) + " MiB"


def _largest(reg, cp):
    if cp.prediction is None:
        return None
    return largest_fitting_micro_batch(reg, cp.cell, cp.limit_bytes, cp.compared)


def _time(reg, cp, how: dict):
    """The predicted step time at the calibrated MFU when the result set has one, else at ``--mfu``."""
    mfu, source = how["mfu"], f"--mfu {how['mfu']:g} (assumed)"
    if how.get("calibrate_from") and cp.gpu is not None:
        found = calibrated_mfu(how["calibrate_from"], cp.gpu.model, str(cp.cell.backend))
        if found:
            mfu, source = found[0], f"measured MFU {found[0]:.3f}, {found[1]}"
        else:
            source = f"--mfu {mfu:g} (no record of {cp.cell.backend} on {cp.gpu.model} in {how['calibrate_from']})"
    return step_time(reg, cp, mfu, source)


def plan_json(reg, plans, search: bool, how: dict | None = None) -> list[dict]:
    how = how or {"mfu": 0.4}
    out = []
    labels = varying_labels({cp.cell.cell_id: cp.cell.to_dict() for cp in plans})
    for cp in plans:
        c = cp.cell
        row = {"task": str(c.task), "cell": labels[c.cell_id], "backend": str(c.backend), "model": c.model, "nproc": c.nproc,
               "micro_batch": c.micro_batch,
               "grad_accum": c.recipe.grad_accum,
               "prediction": cp.prediction.to_dict() if cp.prediction else None,
               "compared": cp.compared, "compared_bytes": cp.compared_bytes, "limit_bytes": cp.limit_bytes,
               "limit_source": cp.limit_source, "fits": cp.fits, "suggestions": cp.suggestions,
               "why_unknown": cp.why_unknown}
        if search:
            row["largest_micro_batch_predicted"] = _largest(reg, cp)
        row["parameters"] = vars(model_facts(reg, c)[0]) if cp.prediction else None
        row["gpu"] = cp.gpu.name if cp.gpu else None
        row["host_need_bytes"], row["host_fits"] = cp.host_need_bytes, cp.host_fits
        st = _time(reg, cp, how)
        row["step_time"] = None if st is None else {
            "step_s": st.step_s, "tokens_per_step": st.tokens, "mfu": st.mfu, "mfu_source": st.mfu_source,
            "peak_flops": st.peak_flops, f"seconds_per_{TOKENS_QUOTED:.0e}_tokens": st.seconds_per(TOKENS_QUOTED)}
        if how.get("frontier"):
            fr = frontier(reg, cp)
            row["frontier"] = None if fr is None else vars(fr)
        out.append(row)
    return out


def print_plans(reg, plans, console, search: bool, how: dict | None = None) -> None:
    how = how or {"mfu": 0.4}
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="ftbench plan: predicted peak memory (nothing was trained)")
    # Cells that differ only in a setting (tuning, precision, ...) must not read as duplicate rows.
    labels = varying_labels({cp.cell.cell_id: cp.cell.to_dict() for cp in plans})
    cols = ["task", "cell", "model", "micro-batch", "per rank", "breakdown (per rank)", "vs limit", "verdict"]
    if search:
        cols.insert(4, "largest micro-batch (predicted)")
    for col in cols:
        t.add_column(col, overflow="fold")
    for cp in plans:
        c = cp.cell
        p = cp.prediction
        ranks = f" ×{c.nproc}" if c.nproc > 1 else ""
        verdict = ("[green]fits[/]" if cp.fits else "[red]does NOT fit[/]") if cp.fits is not None else \
            f"unknown: {escape(cp.why_unknown or '')[:80]}"
        label = labels[c.cell_id]
        row = [str(c.task), label if f"×{c.nproc}" in label else f"{label}{ranks}", c.model, str(c.micro_batch),
               f"{_mib(p.device_bytes)}, peak in {p.peak_phase}" if p else "-",
               escape(breakdown_text(p.breakdown)) if p else "-",
               f"{cp.compared} {_mib(cp.compared_bytes)} / {_mib(cp.limit_bytes)} ({escape(cp.limit_source)})",
               verdict]
        if search:
            row.insert(4, str(_largest(reg, cp) or "none"))
        t.add_row(*(r if r.startswith("[") else escape(r) if r is not row[5] else r for r in row))
    console.print(t)
    _print_times(reg, plans, console, how)
    if how.get("frontier"):
        _print_frontier(reg, plans, console)
    for cp in plans:
        if cp.host_need_bytes:
            where = " (pass --host-memory-gb to check it)" if cp.host_fits is None else \
                (" (fits host memory)" if cp.host_fits else " ([red]more than the host memory[/])")
            console.print(f"{escape(str(cp.cell.backend))}: host memory for what {cp.cell.nproc} rank(s) offload: "
                          f"{_mib(cp.host_need_bytes)} per node{where}")
    for cp in plans:
        if cp.fits is False:
            c = cp.cell
            console.print(f"[bold]{escape(str(c.task))} · {escape(str(c.backend))} · {escape(c.model)}[/] does not fit "
                          f"({_mib(cp.compared_bytes)} > {_mib(cp.limit_bytes)}); would fit:")
            for s in cp.suggestions:
                console.print(f"  - {escape(s)}", soft_wrap=True)


def _print_times(reg, plans, console, how: dict) -> None:
    from rich.table import Table

    rows = [(cp, _time(reg, cp, how)) for cp in plans]
    rows = [(cp, st) for cp, st in rows if st is not None]
    if not rows:
        return
    t = Table(title=f"predicted step time per optimizer step (its FLOPs / the peak x MFU; {_gpu_text(rows[0][0])})")
    for col in ("task", "backend", "model", "tokens/step", "step", f"per {TOKENS_QUOTED:.0e} tokens", "MFU source"):
        t.add_column(col, overflow="fold")
    for cp, st in rows:
        t.add_row(str(cp.cell.task), str(cp.cell.backend), cp.cell.model, f"{st.tokens:,}", _duration(st.step_s),
                  _duration(st.seconds_per(TOKENS_QUOTED)), st.mfu_source)
    console.print(t)


def _gpu_text(cp) -> str:
    g = cp.gpu
    return f"{g.name}, {cp.cell.recipe.precision} dense peak {g.peak(cp.cell.recipe.precision) or 0:.3g} FLOP/s"


def _print_frontier(reg, plans, console) -> None:
    from rich.table import Table

    t = Table(title="capacity frontier (predicted; confirm a micro-batch on the hardware with --micro-batch auto)")
    for col in ("task", "backend", "model", "largest micro-batch at --seq-len", "with checkpointing",
                "longest --seq-len at micro-batch 1", "with checkpointing"):
        t.add_column(col, overflow="fold")
    top = FRONTIER_MICRO_BATCHES[-1]
    for cp in plans:
        fr = frontier(reg, cp)
        if fr is None:
            continue
        micro = [("none" if v is None else f"{v}+ (searched up to {top})" if v == top else str(v))
                 for v in (fr.micro_batch, fr.micro_batch_checkpointed)]
        seqs = ["none" if v is None else str(v) for v in (fr.seq_len, fr.seq_len_checkpointed)]
        t.add_row(str(cp.cell.task), str(cp.cell.backend), cp.cell.model, *micro, *seqs)
    console.print(t)
