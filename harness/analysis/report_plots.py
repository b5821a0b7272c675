"""The plots of ``ftbench report``: throughput and memory bars, loss curves, quality against throughput.

One panel per task.  Every cell keeps one look in every panel and plot
(:mod:`ftbench.harness.analysis.plotstyle`: a colour per backend, a marker
per model, from the whole result set).  A cell that failed is marked where
its figure would be (bars) or named under the panel (curves, points); curves
that lie on one another are named and drawn in dashes that take turns, so
each stays visible; equal quality figures get a readable range
and a note (:mod:`ftbench.harness.analysis.plots`).

Example::

    styles = styles_for(rs.records, variant_labels(rs.records))
    plot_loss(rs, summary, styles, Path("report/plots/loss.png"))
"""

from __future__ import annotations

from pathlib import Path

from ftbench.harness.contract.format import fmt_num
from ftbench.harness.analysis.plots import (coincide_note, coinciding, failed_note, flat_range, grid_axes,
                                            interleaved, literal, panel_note, save_figure)
from ftbench.harness.analysis.plotstyle import Styles, add_legend
from ftbench.harness.analysis.resultset import ResultSet, as_float

FAILED = "#c0392b"


def _has(v) -> bool:
    return v is not None and v == v  # NaN is not equal to itself


def plot_bars(summary, df, col: str, ylabel: str, title: str, path: Path, styles: Styles, records: list[dict],
              scale: float = 1.0) -> Path:
    """One panel per task, one bar per cell (median), whiskers min–max, dots per repeat; a cell without
    a successful run gets a red × where its bar would stand, with its status."""
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(summary["task"]))
    fig, axes = grid_axes(plt, len(tasks))
    for ax, task in zip(axes, tasks):
        s = summary[(summary["task"] == task) & ((summary["ok"] == 0) | summary[f"{col}_median"].notna())]
        x = list(range(len(s)))
        tops = [1.0]
        bars, marks = [], []
        for i, (_, row) in enumerate(s.iterrows()):
            if row["ok"] == 0 or not _has(row[f"{col}_median"]):
                ax.plot(i, 0, marker="x", color=FAILED, markersize=10, markeredgewidth=2, clip_on=False, zorder=4,
                        gid=f"failed:{row['cell_id']}")
                marks.append((i, str(row["status"])))
                continue
            med = row[f"{col}_median"] / scale
            lo, hi = row[f"{col}_min"] / scale, row[f"{col}_max"] / scale
            bar = ax.bar(i, med, color=styles.of(row["cell_id"]).colour, gid=row["cell_id"], yerr=[[med - lo], [hi - med]], capsize=4,
                         edgecolor="black", linewidth=0.5, error_kw={"elinewidth": 1})
            bars.append((bar, med))
            pts = df[(df["cell_id"] == row["cell_id"]) & (df["status"] == "ok")][col].dropna() / scale
            ax.scatter([i] * len(pts), pts, color="black", s=10, zorder=3)
            tops.append(max([hi, med, *pts]))
        many = len(s) > 6
        for bar, med in bars:
            ax.bar_label(bar, labels=[fmt_num(med)], padding=3, fontsize=7 if many else 8,
                         rotation=90 if many else 0)
        top = max(tops) * (1.3 if many else 1.18)
        for i, status in marks:
            ax.annotate(status, (i, 0), xytext=(0, 9), textcoords="offset points", ha="center", va="bottom",
                        fontsize=7.5, color=FAILED, rotation=90 if many else 0)
        ax.set_xticks(x, [literal(v) for v in s["variant"]], rotation=30 if len(s) > 2 else 0,
                      ha="right" if len(s) > 2 else "center", fontsize=8)
        ax.set_title(task)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, top)
        ax.grid(axis="y", alpha=0.3)
        if not bars:
            ax.text(0.5, 0.5, "no successful cell", ha="center", va="center", transform=ax.transAxes)
        panel_note(ax, [failed_note(records, styles.labels, task)])
    return save_figure(plt, fig, title, path)


def _curve(rs: ResultSet, cid: str, x: str):
    """The cell's median loss curve over its runs, the min and max, and its x values (None: no curve)."""
    import numpy as np

    runs = [r for r in rs.records if r["cell_id"] == cid and r.get("status") in ("ok", "diverged")
            and r.get("train_loss")]
    if not runs:
        return None
    curves = [[as_float(v) for v in r["train_loss"]] for r in runs]
    n = min(len(c) for c in curves)
    arr = np.array([[np.nan if v is None else v for v in c[:n]] for c in curves], dtype=float)
    steps = np.arange(1, n + 1, dtype=float)
    if x == "time":
        times = [np.cumsum([as_float(v) or 0.0 for v in (r.get("step_times_s") or [])][:n]) for r in runs]
        times = [t for t in times if len(t) == n]
        steps = np.median(np.array(times), axis=0) if times else steps
    return steps, np.nanmedian(arr, axis=0), np.nanmin(arr, axis=0), np.nanmax(arr, axis=0), len(curves)


def plot_loss(rs: ResultSet, summary, styles: Styles, path: Path, x: str = "step") -> Path:
    """One panel per task: the train loss per optimizer step of every cell
    (median over repeats, band min–max); the dashed line ends the warmup.
    ``x="time"`` puts training seconds (the median run's cumulative step
    times) on the x-axis instead of steps.  Curves that coincide are named
    under the panel and drawn in dashes that take turns, so that each shows."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.lines import Line2D

    tasks = list(dict.fromkeys(summary["task"]))
    fig, axes = grid_axes(plt, len(tasks), height=3.6)
    drawn, warm_shown = [], False
    for ax, task in zip(axes, tasks):
        curves = {}
        warm = None
        for cid in summary[summary["task"] == task]["cell_id"]:
            c = _curve(rs, cid, x)
            if c is not None:
                curves[cid] = c
            rec = next(r for r in rs.records if r["cell_id"] == cid)
            warm = ((rec.get("config") or {}).get("recipe") or {}).get("warmup", warm)
        meds = [v for c in curves.values() for v in c[1] if np.isfinite(v)]
        span = (max(meds) - min(meds)) if meds else 0.0
        groups = coinciding({cid: (c[0], c[1]) for cid, c in curves.items()}, span)
        dashes = {cid: interleaved(i, len(g)) for g, _ in groups for i, cid in enumerate(g)}
        for k, (cid, (steps, med, lo, hi, runs)) in enumerate(curves.items()):
            every = max(1, len(steps) // 6, len(curves))  # markers of coinciding curves at different steps
            look = styles.line(cid, linewidth=1.6, markevery=(k % every, every))
            if cid in dashes:
                look["linestyle"] = dashes[cid]
            ax.plot(steps, med, **look)
            if runs > 1:
                ax.fill_between(steps, lo, hi, color=styles.of(cid).colour, alpha=0.18, linewidth=0)
            drawn.append(cid)
        if warm and x == "step":
            ax.axvline(warm + 0.5, color="grey", linestyle="--", linewidth=0.8)
            warm_shown = True
        ax.set_title(task)
        ax.set_xlabel("optimizer step" if x == "step" else "training seconds (cumulative step time)")
        ax.set_ylabel("train loss")
        ax.grid(alpha=0.3)
        named = [([styles.of(c).label for c in g], worst) for g, worst in groups]
        panel_note(ax, coincide_note(named) + [failed_note(rs.records, styles.labels, task)])
    extra = ([Line2D([], [], color="grey", linestyle="--", linewidth=0.8)], ["end of warmup"]) if warm_shown else ((), ())
    add_legend(fig, styles, drawn, line=True, extra=extra)
    return save_figure(plt, fig, "Training loss (median over repeats; band = min–max)", path)


def plot_quality(summary, styles: Styles, records: list[dict], path: Path) -> Path:
    """One panel per task: primary metric against throughput, whiskers min–max; a legend, not labels."""
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(summary["task"]))
    fig, axes = grid_axes(plt, len(tasks))
    drawn = []
    for ax, task in zip(axes, tasks):
        s = summary[(summary["task"] == task) & summary["tokens_per_s_median"].notna()
                    & summary["metric_value_median"].notna()]
        for _, row in s.iterrows():
            x, y = row["tokens_per_s_median"], row["metric_value_median"]
            ax.errorbar(x, y, xerr=[[x - row["tokens_per_s_min"]], [row["tokens_per_s_max"] - x]],
                        yerr=[[y - row["metric_value_min"]], [row["metric_value_max"] - y]], capsize=3,
                        **styles.point(row["cell_id"]))
            drawn.append(row["cell_id"])
        metric = next(iter(s["metric"]), None) if len(s) else None
        hib = bool(next(iter(s["higher_is_better"]), False)) if len(s) else False
        ax.set_title(task)
        ax.set_xlabel("throughput (tokens/s, higher is better)")
        ax.set_ylabel(f"{metric} ({'higher' if hib else 'lower'} is better)" if metric else "metric")
        ax.grid(alpha=0.3)
        ax.margins(x=0.25, y=0.25)
        ax.set_xlim(left=0)  # no throughput is negative; from zero, as the bars, so that ratios read true
        values = [*s["metric_value_median"], *s["metric_value_min"], *s["metric_value_max"]]
        notes = [flat_range(ax, values, str(metric or "metric"), len(s)) if len(s) > 1 else ""]
        if not len(s):
            ax.text(0.5, 0.5, "no successful cell", ha="center", va="center", transform=ax.transAxes)
        panel_note(ax, notes + [failed_note(records, styles.labels, task)])
    add_legend(fig, styles, drawn)
    return save_figure(plt, fig, "Quality vs throughput (median; whiskers min–max)", path)
