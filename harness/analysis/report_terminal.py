"""What ``ftbench report`` prints: the key figures of every cell in 100 columns.

The full table (ranges over repeats, setup and memory windows, the memory
model's prediction, setup and compile seconds, errors, what a cell computed
differently) has 15 columns and needs about 160; it stays in the Markdown
and HTML reports.  The terminal gets one table per task, titled with the
task, its model (when it has one) and its metric, whose columns are those
a reader scans: the backend, the model where a task has several, status,
tokens/s, step ms, peak memory, the metric and the parity verdict, each
the median over repeats.

Example::

    for title, table in terminal_tables(summary, variant_labels(rs.records, without=("model",))):
        print(title, table.columns)
"""

from __future__ import annotations

import math

from ftbench.harness.contract.format import fmt_bytes, fmt_num

#: The console width the tables are laid out for (and tested at).
WIDTH = 100
#: Columns of numbers: right-aligned and never wrapped.
NUMBERS = ("tokens/s", "step ms", "peak memory")


def _value(v, fmt) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt(v)


def _status(s) -> str:
    if s["ok"] == s["repeats"]:
        return "ok"
    if s["ok"] == 0:
        return str(s["status"])
    return f"{int(s['ok'])}/{int(s['repeats'])} ok"


def short_parity(label) -> str:
    """The verdict of a parity label without its details: ``✓ 1.2e-07``, ``reference``, ``recipe differs
    from eager`` (the drift and the reasons' details are in the Markdown)."""
    text = str(label or "-")
    if text[:1] in ("✓", "✗"):
        return text.split(",")[0]
    return text.split(":")[0].split(" (")[0]


def terminal_tables(summary, short_labels: dict[str, str]) -> list[tuple[str, object, list[str]]]:
    """``(title, DataFrame, errors)`` per task, in the order of the summary; ``short_labels`` names each
    cell id without its model (``variant_labels(records, without=("model",))``); ``errors`` has a line
    per cell with a failed run, its first error."""
    import pandas as pd

    out = []
    if not len(summary):
        return out
    for task in dict.fromkeys(summary["task"]):
        s = summary[summary["task"] == task]
        models = list(dict.fromkeys(str(m) for m in s["model"]))
        metrics = {(m, bool(h)) for m, h in zip(s["metric"], s["higher_is_better"]) if m}
        quality = "quality"
        if len(metrics) == 1:
            metric, hib = next(iter(metrics))
            quality = f"{metric} {'↑' if hib else '↓'}"
        rows, errors = [], []
        for _, row in s.iterrows():
            r = {"backend": short_labels.get(row["cell_id"], row["variant"])}
            if row["ok"] < row["repeats"] and isinstance(row["error"], str) and row["error"]:
                errors.append(f"{r['backend']} ({_status(row)}): {' '.join(row['error'].split())}")
            if len(models) > 1:
                r["model"] = row["model"]
            value = _value(row["metric_value_median"], fmt_num)
            if len(metrics) > 1 and row["metric"]:
                value = f"{row['metric']} {value}"
            r.update({"status": _status(row), "tokens/s": _value(row["tokens_per_s_median"], fmt_num),
                      "step ms": _value(row["step_time_s_median"], lambda v: fmt_num(v * 1e3)),
                      "peak memory": _value(row["peak_memory_bytes_median"], fmt_bytes),
                      quality: value, "parity": short_parity(row["parity"])})
            rows.append(r)
        title = " · ".join([str(task)] + (models if len(models) == 1 else []))
        out.append((title, pd.DataFrame(rows), errors))
    return out


def print_terminal_tables(tables, console, title: str, details: str) -> None:
    """The tables, then where the rest is; laid out for :data:`WIDTH` columns (wrapping words in the
    text columns, never numbers) on a console at least that wide."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    console.print(escape(title))
    width = min(WIDTH, console.width)
    for name, frame, errors in tables:
        t = Table(title=escape(name), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for col in frame.columns:
            number = col in NUMBERS
            t.add_column(escape(str(col)), justify="right" if number else "left", no_wrap=number,
                         overflow="fold")
        for row in frame.itertuples(index=False):
            t.add_row(*(escape(str(v)) for v in row))
        console.print(t)
        for line in errors:  # the first error of each failed cell, cut to one line
            console.print(escape(line if len(line) <= width - 2 else line[:width - 3] + "…"), style="yellow")
    console.print(escape(f"Medians over repeats. {details}"))
