"""The ``--profile`` section of a report: per-phase time of the profiled steps, per cell, with trace links."""

from __future__ import annotations

import html
import os
from pathlib import Path

from ftbench.harness.analysis.resultset import ResultSet, repeat_of, variant_labels

PHASES = ("forward", "backward", "optimizer", "communication", "other")


def profile_rows(rs: ResultSet, out: Path) -> list[dict]:
    """One row per profiled record: phase times (ms and share), coverage, and trace paths relative to ``out``."""
    labels = variant_labels(rs.records)
    rows = []
    for r in rs.records:
        p = r.get("profile") or {}
        phases = p.get("phases_s") or {}
        if not phases:
            continue
        total = sum(phases.values()) or 1.0
        row = {"task": r.get("task"), "cell": labels.get(r["cell_id"], r["cell_id"]), "repeat": repeat_of(r),
               "profiled step ms": f"{1e3 * (p.get('step_s') or 0):.1f}"}
        for k in PHASES:
            row[k] = f"{1e3 * phases.get(k, 0.0):.1f} ({phases.get(k, 0.0) / total:.0%})"
        row["phases / step"] = f"{p.get('coverage') or 0:.2f}"
        row["traces"] = {rank: os.path.relpath(Path(rs.path) / rel, out)
                         for rank, rel in sorted((p.get("traces") or {}).items())}
        rows.append(row)
    return rows


def profile_markdown(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    head = [k for k in rows[0] if k != "traces"] + ["traces"]
    lines = ["## Profiles", "", "Mean ms per profiled step (share of the step), from `--profile` "
             "(steps after the measured ones; open a trace in chrome://tracing or ui.perfetto.dev).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        links = ", ".join(f"[rank {k}]({v})" for k, v in r["traces"].items())
        lines.append("| " + " | ".join(str(r[k]) for k in head[:-1]) + f" | {links} |")
    return lines + [""]


def profile_html(rows: list[dict]) -> str:
    if not rows:
        return ""
    head = [k for k in rows[0] if k != "traces"] + ["traces"]
    parts = ["<h2>Profiles</h2><p>Mean ms per profiled step (share of the step), from <code>--profile</code>: "
             "steps after the measured ones. Open a trace in chrome://tracing or ui.perfetto.dev.</p>",
             "<table class='cells'><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"]
    for r in rows:
        links = ", ".join(f"<a href='{html.escape(v)}'>rank {html.escape(k)}</a>" for k, v in r["traces"].items())
        parts.append("<tr>" + "".join(f"<td>{html.escape(str(r[k]))}</td>" for k in head[:-1])
                     + f"<td>{links}</td></tr>")
    return "\n".join(parts) + "</table>"
