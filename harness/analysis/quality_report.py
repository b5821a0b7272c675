"""Time to quality in reports: the time-to-target table and quality against training time.

Seeds: time to a target varies with the seed far more than step time does,
so the cells of one configuration that differ only in their seed are one
row.  The row's time is the **median over all its seeds, a seed that never
reached the target counting as infinitely slow**: the median is a number
only when more than half the seeds reached the target, and the row always
says how many did (``2/3``).  MLPerf Training drops the fastest and slowest
of its runs and averages the rest; with the three to five seeds a benchmark
grid can afford, the median keeps the same robustness to one lucky or
unlucky seed without discarding a third of the data.

Example::

    table = time_to_target_frame(load_result_set("runs/ttq"))
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ftbench.harness.contract.format import fmt_num
from ftbench.harness.analysis.resultset import ResultSet, as_float, variant_labels
from ftbench.harness.analysis.plots import (coincide_note, coinciding, failed_note, flat_range, grid_axes, interleaved,
                                            panel_note, save_figure)
from ftbench.harness.analysis.plotstyle import Styles, add_legend, styles_for


def _groups(rs: ResultSet) -> dict[tuple, list[dict]]:
    labels = variant_labels(rs.records, without=("seed",))
    groups: dict[tuple, list[dict]] = {}
    for r in rs.records:
        if r.get("target"):
            groups.setdefault((r.get("task"), labels[r["cell_id"]], r.get("model")), []).append(r)
    return groups


def median_time_to_target(records: list[dict]) -> float | None:
    """Median over records, not-reached as +inf; None when half or more never reached it."""
    times = [r["time_to_target_s"] if r.get("target_reached") else math.inf
             for r in records if r.get("status") == "ok"]
    if not times:
        return None
    m = statistics.median(times)
    return m if math.isfinite(m) else None


def time_to_target_frame(rs: ResultSet):
    """One row per configuration (its seeds and repeats together)."""
    import pandas as pd

    rows = []
    for (task, label, model), recs in _groups(rs).items():
        ok = [r for r in recs if r.get("status") == "ok"]
        reached = [r for r in ok if r.get("target_reached")]
        med = median_time_to_target(recs)
        times = [r["time_to_target_s"] for r in reached]
        steps = [r["steps_to_target"] for r in reached]
        rows.append({
            "task": task, "cell": label, "model": model, "target": recs[0]["target"].get("text"),
            "seeds": len({(r.get("config") or {}).get("recipe", {}).get("seed") for r in recs}),
            "runs": len(recs), "reached": f"{len(reached)}/{len(ok)}",
            "time to target s (median)": fmt_num(med) if med is not None else "not reached",
            "range s": f"{fmt_num(min(times))}–{fmt_num(max(times))}" if len(times) > 1 else "-",
            "steps to target (median)": fmt_num(statistics.median(steps)) if steps else "-",
            "tokens/s (median)": fmt_num(statistics.median([r["tokens_per_s"] for r in ok if r.get("tokens_per_s")]))
            if any(r.get("tokens_per_s") for r in ok) else "-",
        })
    return pd.DataFrame(rows)


def plot_quality_vs_time(rs: ResultSet, path: Path, styles: Styles | None = None) -> Path | None:
    """One panel per task: the target metric against training seconds, a line per run; each cell in its
    report-wide look (``styles``: a colour per backend, a marker per model)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = [r for r in rs.records if r.get("eval_curve") and r.get("status") in ("ok", "diverged")]
    if not runs:
        return None
    styles = styles or styles_for(rs.records, variant_labels(rs.records))
    tasks = list(dict.fromkeys(r.get("task") for r in runs))
    fig, axes = grid_axes(plt, len(tasks), height=3.8)
    drawn, targets = [], False
    for ax, task in zip(axes, tasks):
        mine = [r for r in runs if r.get("task") == task]
        metric = (mine[0].get("target") or {}).get("metric") or mine[0].get("metric")
        curves = {}
        for i, r in enumerate(mine):
            # as_float: a diverged evaluation's metric is stored as the string "nan"
            pts = [(p["train_s"], as_float((p.get("metrics") or {}).get(metric))) for p in r["eval_curve"]]
            pts = [(x, y) for x, y in pts if y is not None and math.isfinite(y)]
            if pts:
                curves[i] = tuple(zip(*pts))
        values = [y for _, ys in curves.values() for y in ys]
        groups = coinciding(curves, (max(values) - min(values)) if values else 0.0)
        dashes = {i: interleaved(k, len(g)) for g, _ in groups for k, i in enumerate(g)}
        for i, (xs, ys) in curves.items():
            look = styles.line(mine[i]["cell_id"], markersize=3.5, linewidth=1.2, alpha=0.85)
            if i in dashes:
                look["linestyle"] = dashes[i]
            ax.plot(xs, ys, **look)
            drawn.append(mine[i]["cell_id"])
        target = next((r["target"] for r in mine if r.get("target")), None)
        if target:
            ax.axhline(target["value"], color="grey", linestyle="--", linewidth=0.9)
            targets = True
        hib = (target or {}).get("higher_is_better", mine[0].get("higher_is_better"))
        ax.set_title(task)
        ax.set_xlabel("training seconds (measured steps, warmup and compile included)")
        ax.set_ylabel(f"{metric} ({'higher' if hib else 'lower'} is better)")
        ax.grid(alpha=0.3)
        named = [([styles.of(mine[i]["cell_id"]).label for i in g], worst) for g, worst in groups]
        notes = [f"target {target['text']} (dashed)" if target else "", *coincide_note(named),
                 flat_range(ax, values, str(metric)) if not target else "",
                 failed_note(rs.records, styles.labels, task)]
        panel_note(ax, notes)
    extra = ([Line2D([], [], color="grey", linestyle="--", linewidth=0.9)], ["target"]) if targets else ((), ())
    add_legend(fig, styles, drawn, line=True, extra=extra)
    return save_figure(plt, fig, "Quality against training time (one line per run; evaluation time excluded)",
                       path)
