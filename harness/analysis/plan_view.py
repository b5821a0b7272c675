"""``ftbench plan`` output: a table of predicted peaks and verdicts, or JSON."""

from __future__ import annotations

from ftbench.harness.contract.memory_model import MiB

#: Breakdown keys, shortest first in the table.
SHORT = {"weights": "weights", "gradients": "grads", "gradient_buffers": "grad buckets", "optimizer": "AdamW",
         "master_weights": "fp32 master", "master_gradients": "fp32 grads", "gathered_layers": "gathered",
         "autocast_copies": "autocast", "activations": "activations", "harness": "harness",
         "backend runtime": "runtime", "gathered_weights": "gathered weights", "reduction_bucket": "bucket",
         "reduction_copies": "bucket copies", "step_temporaries": "step temporaries", "staging_buffers": "staging"}


def _mib(v) -> str:
    return "-" if v is None else f"{v / MiB:,.0f} MiB"


def breakdown_text(breakdown: dict) -> str:
    parts = []
    for k, v in breakdown.items():
        name = SHORT.get(k.replace(" (offloaded)", ""), k)
        parts.append(f"{name}{' (host)' if 'offloaded' in k else ''} {v / MiB:,.1f}")
    return " · ".join(parts) + " MiB"


def _largest(reg, cp):
    from ftbench.harness.grid.memplan import largest_fitting_micro_batch

    if cp.prediction is None:
        return None
    return largest_fitting_micro_batch(reg, cp.cell, cp.limit_bytes, cp.compared)


def plan_json(reg, plans, search: bool) -> list[dict]:
    out = []
    for cp in plans:
        c = cp.cell
        row = {"task": c.task, "backend": c.backend, "opt": c.opt, "model": c.model, "nproc": c.nproc,
               "micro_batch": c.recipe.batch_size // (c.nproc * c.recipe.grad_accum),
               "grad_accum": c.recipe.grad_accum,
               "prediction": cp.prediction.to_dict() if cp.prediction else None,
               "compared": cp.compared, "compared_bytes": cp.compared_bytes, "limit_bytes": cp.limit_bytes,
               "limit_source": cp.limit_source, "fits": cp.fits, "suggestions": cp.suggestions,
               "why_unknown": cp.why_unknown}
        if search:
            row["largest_micro_batch_predicted"] = _largest(reg, cp)
        out.append(row)
    return out


def print_plans(reg, plans, console, search: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    t = Table(title="ftbench plan: predicted peak memory (nothing was trained)")
    cols = ["task", "backend", "model", "micro-batch", "per rank", "breakdown (per rank)", "vs limit", "verdict"]
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
        row = [c.task, c.backend + ranks + (f" + {c.opt}" if c.opt else ""), c.model, str(c.recipe.batch_size // (c.nproc * c.recipe.grad_accum)),
               f"{_mib(p.device_bytes)}, peak in {p.peak_phase}" if p else "-",
               escape(breakdown_text(p.breakdown)) if p else "-",
               f"{cp.compared} {_mib(cp.compared_bytes)} / {_mib(cp.limit_bytes)} ({escape(cp.limit_source)})",
               verdict]
        if search:
            row.insert(4, str(_largest(reg, cp) or "none"))
        t.add_row(*(r if r.startswith("[") else escape(r) if r is not row[5] else r for r in row))
    console.print(t)
    for cp in plans:
        if cp.fits is False:
            c = cp.cell
            console.print(f"[bold]{escape(c.task)} · {escape(c.backend)} · {escape(c.model)}[/] does not fit "
                          f"({_mib(cp.compared_bytes)} > {_mib(cp.limit_bytes)}); would fit:")
            for s in cp.suggestions:
                console.print(f"  - {escape(s)}", soft_wrap=True)
