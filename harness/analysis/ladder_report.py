"""The optimization ladder in ``ftbench report``, as torchtune's README shows it.

Cells that differ only by their optimizations (``--opt``, ``--ladder``,
``--ablation``) form a group per task, backend (with its ranks), model and
data.  Within a group the rungs are ordered by how many optimizations they
add to the baseline (the rung with the fewest).  When each rung holds the
previous one's optimizations, the group is a ladder and every figure is
shown with its % change from the previous rung and from the baseline; else
it is an ablation, each rung against the baseline only.  The verdict column
is the loss parity for optimizations that keep the math, and the quality
verdict (``numerics changed``) for those that do not
(:mod:`ftbench.harness.results.opt_verdict`).

Example::

    table = ladder_frame(load_result_set("runs/ladder"))
    plot_ladder(load_result_set("runs/ladder"), Path("runs/ladder/report/plots/ladder.png"))
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ftbench.harness.contract.format import fmt_bytes, fmt_num
from ftbench.harness.contract.optimization import format_opts, parse_opts
from ftbench.harness.analysis.plots import literal, save_figure
from ftbench.harness.analysis.plotstyle import Styles, styles_for
from ftbench.harness.analysis.resultset import ResultSet, as_float, opt_of
from ftbench.harness.results.opt_verdict import verdict_label
from ftbench.harness.results.parity import parity_label


def ladder_rows(rs: ResultSet) -> list[dict]:
    """One dict per rung of every group with at least two rungs, with raw figures and changes."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in rs.records:
        cfg = r.get("config") or {}
        key = (r.get("task"), r.get("backend"), r.get("nproc") or 1, r.get("model"), r.get("data"),
               repr(sorted((k, v) for k, v in (cfg.get("recipe") or {}).items() if k not in ("numerics", "packing"))))
        groups.setdefault(key, {}).setdefault(opt_of(r), []).append(r)
    rows: list[dict] = []
    for key, by_opt in groups.items():
        if len(by_opt) < 2:
            continue
        rungs = sorted(by_opt, key=lambda o: (len(parse_opts(o)), list(by_opt).index(o)))
        names = [{n for n, _ in parse_opts(o)} for o in rungs]
        ladder = all(names[i - 1] <= names[i] for i in range(1, len(rungs)))
        base = _figures(by_opt[rungs[0]])
        prev = base
        for i, opt in enumerate(rungs):
            fig = _figures(by_opt[opt])
            rows.append({"task": key[0], "backend": key[1] + (f" ×{key[2]}" if key[2] > 1 else ""),
                         "backend_name": key[1],
                         "model": key[3], "kind": "ladder" if ladder else "ablation", "rung": i,
                         "step": _step_label(rungs[0], opt, rungs[i - 1] if i else None, ladder), "opt": opt,
                         **fig, "vs_prev": _changes(fig, prev) if (ladder and i) else {},
                         "vs_base": _changes(fig, base) if i else {}})
            prev = fig
    return rows


def _figures(records: list[dict]) -> dict:
    ok = [r for r in records if r.get("status") == "ok"]
    first = (ok or records)[0]

    def med(key):
        vals = [as_float(r.get(key)) for r in ok]
        vals = [v for v in vals if v is not None]
        return statistics.median(vals) if vals else None

    peak = med("train_peak_memory_bytes")
    parity, quality = first.get("parity") or {}, verdict_label(first.get("opt_verdict"))
    # A rung after one that changed numerics is still parity-checked against that rung: show both.
    verdict = " · ".join(v for v in ((parity_label(parity) if parity.get("status") == "compared" or not quality
                                      else None), quality) if v)
    return {"status": first.get("status") if not ok else "ok", "repeats": len(ok), "tokens_per_s": med("tokens_per_s"),
            "train_peak_bytes": peak if peak is not None else med("peak_memory_bytes"),
            "memory_kind": first.get("memory_kind"), "metric": first.get("metric"),
            "metric_value": med("metric_value"), "higher_is_better": first.get("higher_is_better"),
            "eval_loss": med("eval_loss"), "verdict": verdict if ok else str(first.get("error") or "-")[:80]}


def _changes(fig: dict, ref: dict) -> dict:
    out = {}
    for k in ("tokens_per_s", "train_peak_bytes", "metric_value"):
        a, b = fig.get(k), ref.get(k)
        out[k] = (a - b) / abs(b) if a is not None and b not in (None, 0) else None
    return out


def _step_label(base: str, opt: str, prev: str | None, ladder: bool) -> str:
    if prev is None:
        return f"baseline ({base})" if base else "baseline"
    ref = {n: o for n, o in parse_opts(prev if ladder else base)}
    added = [(n, o) for n, o in parse_opts(opt) if ref.get(n) != o]
    return "+" + format_opts(added) if added else opt


def ladder_frame(rs: ResultSet):
    """The display table (a DataFrame; empty when the set holds no ladder or ablation)."""
    import pandas as pd

    out = []
    for row in ladder_rows(rs):
        arrow = "↑" if row["higher_is_better"] else "↓"
        quality = f"{row['metric']} {arrow} {fmt_num(row['metric_value'])}" if row["metric_value"] is not None else "-"
        out.append({"task": row["task"], "backend": row["backend"], "model": row["model"], "rung": row["step"],
                    "status": row["status"],
                    "tokens/s": fmt_num(row["tokens_per_s"]) if row["tokens_per_s"] is not None else "-",
                    "Δ prev": _pct(row["vs_prev"].get("tokens_per_s")),
                    "Δ base": _pct(row["vs_base"].get("tokens_per_s")),
                    "train peak": fmt_bytes(row["train_peak_bytes"]) if row["train_peak_bytes"] else "-",
                    "Δ prev ": _pct(row["vs_prev"].get("train_peak_bytes")),
                    "Δ base ": _pct(row["vs_base"].get("train_peak_bytes")),
                    "quality": quality, "Δ base  ": _pct(row["vs_base"].get("metric_value")),
                    "verdict": row["verdict"]})
    return pd.DataFrame(out)


def _pct(x) -> str:
    return "-" if x is None else f"{x:+.1%}"


def plot_ladder(rs: ResultSet, path: Path, styles: Styles | None = None) -> Path | None:
    """Per group: tokens/s and training-window peak memory per rung, each bar labelled with its % change
    from the baseline; bars in the backend's report-wide colour (``styles``), the baseline's hatched."""
    rows = ladder_rows(rs)
    if not rows:
        return None
    import matplotlib.pyplot as plt

    styles = styles or styles_for(rs.records, {})
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["backend"], r["model"]), []).append(r)
    fig, axes = plt.subplots(len(groups), 2, figsize=(12, 1.2 + 0.55 * max(len(g) for g in groups.values())
                                                      * len(groups)), squeeze=False)
    for (task, backend, model), (ax_t, ax_m) in zip(groups, axes):
        g = groups[(task, backend, model)]
        labels = [r["step"] for r in g][::-1]
        colour = styles.colour.get(g[0]["backend_name"], "#3b7dd8")
        for ax, key, scale, xlabel in ((ax_t, "tokens_per_s", 1, "tokens/s"),
                                       (ax_m, "train_peak_bytes", 2**20, "training-window peak (MiB)")):
            vals = [(r[key] or 0) / scale for r in g][::-1]
            bars = ax.barh(range(len(vals)), vals, color=colour, edgecolor="black", linewidth=0.5,
                           gid=f"backend:{g[0]['backend_name']}")
            for bar, r in zip(bars, g[::-1]):
                if r["rung"] == 0:
                    bar.set_hatch("//")
                    bar.set_alpha(0.55)
                ch = r["vs_base"].get(key)
                if ch is not None:
                    ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {ch:+.0%}", va="center",
                            fontsize=8)
            ax.set_yticks(range(len(vals)), [literal(t) for t in labels] if ax is ax_t else [""] * len(vals),
                          fontsize=8)
            ax.set_xlabel(xlabel)
            ax.margins(x=0.15)
        ax_t.set_title(f"{task} · {backend} · {model}", fontsize=9, loc="left")
    return save_figure(plt, fig, "Optimization ladder (% change from the baseline, which is hatched)", path)
