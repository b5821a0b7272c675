"""Writing a history: terminal table, Markdown, PNG plots, one HTML page and the database.

Into OUT (default ``history/``): ``history.md``, ``plots/<figure>.png``
(one panel per cell: the repeats as dots, the per-set median as a line,
each change as a vertical line at the set where it began), ``history.html``
(self-contained, plots embedded and linked) and ``history.sqlite``
(:mod:`ftbench.harness.analysis.historystore`).
"""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ftbench.harness.contract.format import fmt_bytes, fmt_num
from ftbench.harness.analysis.history import History, build_history
from ftbench.harness.analysis.series import Series
from ftbench.harness.analysis.plots import save_figure
from ftbench.harness.analysis.plotstyle import styles_for
from ftbench.harness.analysis.historystore import write_db
from ftbench.harness.analysis.markdown import md_table


@dataclass
class HistoryFiles:
    out: Path
    markdown: Path
    html: Path
    db: Path
    plots: dict[str, Path] = field(default_factory=dict)


def _fmt(v: float, unit: str) -> str:
    return fmt_bytes(v) if unit == "bytes" else fmt_num(v)


def _short(commit: str | None) -> str:
    if not commit:
        return "?"
    dirty = commit.endswith("-dirty")
    return commit[:8] + ("-dirty" if dirty else "")


def describe_events(sr: Series) -> str:
    if not sr.events:
        return sr.note or "none"
    return "; ".join(f"{e.kind} {e.change:+.1%} at {e.set_name} (commits {_short(e.commit_before)}.."
                     f"{_short(e.commit_after)}): {e.verdict}" for e in sr.events)


def table_rows(h: History) -> list[dict]:
    rows = []
    for sr in sorted(h.series, key=lambda s: (s.task, s.cell, s.figure)):
        newest = sr.points[-1]
        rows.append({"task": sr.task, "cell": sr.cell, "figure": sr.figure, "points": len(sr.points),
                     "series (medians)": " → ".join(_fmt(p.median, sr.unit) for p in sr.points),
                     "newest": _fmt(newest.median, sr.unit), "changes": describe_events(sr),
                     "newest point": "REGRESSION" if sr.newest_regression else "ok"})
    return rows


def markdown(h: History) -> str:
    import pandas as pd

    lines = ["# ftbench history", "", f"Read {h.read}.", "",
             f"{len(h.included)} result set(s) in measurement order:", "",
             "| # | set | started | commit |", "|---:|---|---|---|"]
    lines += [f"| {s.position + 1} | {s.name} | {s.started_at[:19]} | {_short(s.commit)} |" for s in h.included]
    lines += ["", "Thresholds: " + ", ".join(f"{k} {v:.0%}" for k, v in h.thresholds.items()),
              f"; newest point regressed in **{len(h.regressions)}** series.", ""]
    if h.warnings:
        lines += ["## Notes", ""] + [f"- {w}" for w in h.warnings] + [""]
    lines += ["## Series", "", md_table(pd.DataFrame(table_rows(h))), ""]
    return "\n".join(lines)


def plot_figure(h: History, figure: str, path: Path) -> Path | None:
    """One panel per cell: the repeats as grey dots, the per-set median as a line in the cell's report-wide
    look (a colour per backend, a marker per model), each change as a dashed line.  The y-axis starts at
    zero for figures that cannot be negative, so that noise of a few MiB or tokens/s looks as small as it is."""
    import matplotlib.pyplot as plt

    series = sorted((s for s in h.series if s.figure == figure), key=lambda s: (s.task, s.cell))
    if not series:
        return None
    records = [r for s in h.included for r in s.records]
    styles = styles_for(records, {sr.cell_id: sr.cell for sr in h.series})
    cols = min(2, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.4 * rows), squeeze=False)
    ticks = [f"{s.position + 1}\n{_short(s.commit)[:7]}" for s in h.included]
    for ax, sr in zip(axes.flat, series):
        scale = 2**20 if sr.unit == "bytes" else 1
        values = [v / scale for p in sr.points for v in p.values]
        for p in sr.points:
            ax.scatter([p.position] * len(p.values), [v / scale for v in p.values], s=14, color="0.55", zorder=2)
        look = styles.point(sr.cell_id, markersize=6) if sr.cell_id in styles.cells else {"marker": "o"}
        look["linestyle"] = "-"
        ax.plot([p.position for p in sr.points], [p.median / scale for p in sr.points], zorder=3, **look)
        if values and min(values) >= 0:
            ax.set_ylim(0, max(values) * 1.15 or 1.0)
        for e in sr.events:
            ax.axvline(e.position - 0.5, color="red" if e.verdict == "regression" else "green", linestyle="--")
            ax.annotate(f"{e.change:+.0%}", (e.position - 0.45, ax.get_ylim()[1]), va="top", fontsize=8,
                        color="red" if e.verdict == "regression" else "green")
        ax.set_title(f"{sr.task} · {sr.cell}", fontsize=9)
        ax.set_xticks(range(len(ticks)), ticks, fontsize=7)
        ax.set_ylabel({"bytes": "MiB", "tok/s": "tokens/s"}.get(sr.unit, figure))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    return save_figure(plt, fig, f"{figure} per result set (dots: repeats; line: median; dashed: change)", path,
                       fontsize=10)


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}.warn{color:#a60}.bad{color:#c00;"
        "font-weight:bold}img{max-width:100%}")


def render_html(h: History, files: HistoryFiles) -> str:
    import pandas as pd

    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ftbench history</title>"
             f"<style>{_CSS}</style></head><body><h1>ftbench history</h1>",
             f"<p>{len(h.included)} result set(s); newest point regressed in "
             f"<span class='{'bad' if h.regressions else ''}'>{len(h.regressions)}</span> series.</p>"]
    parts += [f"<p class='warn'>note: {html.escape(w)}</p>" for w in h.warnings]
    sets = pd.DataFrame([{"#": s.position + 1, "set": s.name, "started": s.started_at[:19],
                          "commit": _short(s.commit)} for s in h.included])
    parts += ["<h2>Result sets</h2>", sets.to_html(index=False, border=0),
              "<h2>Series</h2>", pd.DataFrame(table_rows(h)).to_html(index=False, border=0), "<h2>Plots</h2>"]
    for figure, path in files.plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        rel = os.path.relpath(path, files.out)
        parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(figure)}'>"
                     f"<figcaption><a href='{html.escape(rel)}'>{html.escape(rel)}</a></figcaption></figure>")
    parts.append(f"<p>Query the data: <code>sqlite3 {html.escape(files.db.name)}</code> "
                 "(tables sets, records, series, changes).</p></body></html>")
    return "\n".join(parts)


def write_history(paths, out: str | os.PathLike | None = None, thresholds: dict | None = None,
                  calibration: str | None = None) -> tuple[History, HistoryFiles]:
    """Analyse the sets and write every output.

    Example: ``h, files = write_history(["runs/nightly"], "runs/nightly-history")``.
    """
    import matplotlib

    matplotlib.use("Agg")
    h = build_history(paths, thresholds, calibration)
    out = Path(out or "history")
    (out / "plots").mkdir(parents=True, exist_ok=True)
    files = HistoryFiles(out=out, markdown=out / "history.md", html=out / "history.html", db=out / "history.sqlite")
    for figure in dict.fromkeys(s.figure for s in h.series):
        name = "".join(ch if ch.isalnum() else "_" for ch in figure)
        p = plot_figure(h, figure, out / "plots" / f"{name}.png")
        if p:
            files.plots[figure] = p
    files.markdown.write_text(markdown(h))
    files.html.write_text(render_html(h, files))
    write_db(h, files.db)
    return h, files


def print_history(h: History, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    for w in h.warnings:
        console.print(f"[yellow]note:[/] {escape(w)}", soft_wrap=True)
    console.print(f"read {escape(h.read)}")
    t = Table(title=f"ftbench history: {len(h.included)} result sets")
    for col in ("task", "cell", "figure", "points", "series (medians)", "changes", "newest point"):
        t.add_column(col, overflow="fold")
    for r in table_rows(h):
        colour = "bold red" if r["newest point"] != "ok" else "green"
        t.add_row(*(escape(str(r[k])) for k in ("task", "cell", "figure", "points", "series (medians)", "changes")),
                  f"[{colour}]{r['newest point']}[/]")
    console.print(t)
