"""``ftbench report DIR``: tables and plots of a result set.

Writes into ``DIR/report/``:

* ``summary.md`` and ``summary.csv`` — one row per cell, repeats folded into
  median and [min–max] (the CSV keeps raw numbers for further analysis);
  ``records.csv`` — one row per record;
* ``plots/*.png`` — throughput and peak memory by backend per task, loss
  curves per task overlaying backends, quality vs throughput;
* ``report.html`` — one self-contained page (plots embedded as data URIs,
  each also linked to its PNG file).
"""

from __future__ import annotations

import base64
import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ftbench.harness.contract.format import fmt_bytes, fmt_num
from ftbench.harness.analysis.markdown import md_table, md_text
from ftbench.harness.analysis.plotstyle import styles_for
from ftbench.harness.analysis.report_plots import plot_bars, plot_loss, plot_quality
from ftbench.harness.analysis.report_terminal import terminal_tables
from ftbench.harness.analysis.ladder_report import ladder_frame, plot_ladder
from ftbench.harness.analysis.fairness import compare_cells, counterpart, differs_label, has_account
from ftbench.harness.analysis.profiles import profile_html, profile_markdown, profile_rows
from ftbench.harness.analysis.quality_report import plot_quality_vs_time, time_to_target_frame
from ftbench.harness.analysis.resultset import ResultSet, as_float, load_result_set, repeat_of, variant_labels
from ftbench.harness.results.parity import parity_label

REPORT_DIR = "report"
MiB = 2**20


@dataclass
class Report:
    """Paths of what :func:`write_report` produced."""

    out: Path
    markdown: Path
    csv: Path
    records_csv: Path
    html: Path
    plots: dict[str, Path] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    #: What was read: ``"12 record(s) of schema version 1"``.
    read: str = ""
    #: The time-to-target table (a DataFrame) when any cell had a target.
    time_to_target: object = None
    #: The optimization ladder table (a DataFrame) when cells differ by their optimizations.
    ladder: object = None
    #: What the terminal shows: ``(title, DataFrame)`` per task, key columns only (report_terminal).
    terminal: list = field(default_factory=list)


# ------------------------------------------------------------------ tables


def records_frame(rs: ResultSet):
    """One row per record, the figures a table needs, plus the cell's label."""
    import pandas as pd

    labels = variant_labels(rs.records)
    rows = []
    for r in rs.records:
        st = r.get("step_time") or {}
        rows.append({
            "cell_id": r["cell_id"], "task": r.get("task"), "variant": labels.get(r["cell_id"]),
            "backend": r.get("backend"), "model": r.get("model"), "nproc": r.get("nproc", 1),
            "repeat": repeat_of(r), "status": r.get("status"), "error": r.get("error"),
            "tokens_per_s": as_float(r.get("tokens_per_s")), "samples_per_s": as_float(r.get("samples_per_s")),
            "step_time_s": as_float(r.get("step_time_s")), "step_iqr_s": as_float(st.get("iqr")),
            "peak_memory_bytes": as_float(r.get("peak_memory_bytes")), "memory_kind": r.get("memory_kind"),
            "setup_peak_memory_bytes": as_float(r.get("setup_peak_memory_bytes")),
            "train_peak_memory_bytes": as_float(r.get("train_peak_memory_bytes")),
            "memory_predicted_bytes": as_float(r.get("memory_predicted_bytes")),
            "micro_batch": r.get("micro_batch"), "micro_batch_probes": _probes(r.get("micro_batch_search")),
            "setup_s": as_float(r.get("setup_s")), "compile_s": as_float(r.get("compile_s")),
            "metric": r.get("metric"), "metric_value": as_float(r.get("metric_value")),
            "metric_before": as_float((r.get("metrics_before") or {}).get(r.get("metric"))),
            "higher_is_better": r.get("higher_is_better"), "eval_loss": as_float(r.get("eval_loss")),
            "parity": _parity(r.get("parity")), "recipe_fingerprint": r.get("recipe_fingerprint"),
            "differs": _differs(r, rs.records),
        })
    return pd.DataFrame(rows)


def summary_frame(df):
    """One row per cell: median, min and max over ok repeats of each figure."""
    import pandas as pd

    if df.empty:
        return pd.DataFrame()
    out = []
    for cid, g in df.groupby("cell_id", sort=False):
        ok = g[g["status"] == "ok"]
        first = g.iloc[0]
        row = {"task": first["task"], "variant": first["variant"], "backend": first["backend"],
               "model": first["model"], "nproc": first["nproc"], "repeats": len(g), "ok": len(ok),
               "status": "/".join(sorted(set(g["status"]))), "metric": first["metric"],
               "higher_is_better": first["higher_is_better"], "memory_kind": first["memory_kind"],
               "parity": next((p for p in g["parity"] if p and p != "-"), "-"),
               "differs": next((d for d in g["differs"] if d and d != "-"), "-"),
               "error": next((e for e in g["error"] if isinstance(e, str) and e), None), "cell_id": cid,
               "micro_batch": first["micro_batch"], "micro_batch_probes": first["micro_batch_probes"]}
        for col in ("tokens_per_s", "step_time_s", "peak_memory_bytes", "setup_peak_memory_bytes",
                    "train_peak_memory_bytes", "memory_predicted_bytes", "setup_s", "compile_s", "metric_value",
                    "metric_before"):
            vals = ok[col].dropna()
            row[f"{col}_median"] = vals.median() if len(vals) else None
            row[f"{col}_min"] = vals.min() if len(vals) else None
            row[f"{col}_max"] = vals.max() if len(vals) else None
        out.append(row)
    return pd.DataFrame(out)


def _spread(row, col, fmt) -> str:
    med = row[f"{col}_median"]
    if med is None or (isinstance(med, float) and math.isnan(med)):
        return "-"
    lo, hi = row[f"{col}_min"], row[f"{col}_max"]
    if row["ok"] > 1 and lo != hi:
        return f"{fmt(med)} [{fmt(lo)}–{fmt(hi)}]"
    return fmt(med)


def display_frame(summary):
    """The summary with human-readable cells (what Markdown, HTML and the terminal show)."""
    import pandas as pd

    rows = []
    for _, s in summary.iterrows():
        arrow = "↑" if s["higher_is_better"] else "↓"
        metric = f"{s['metric']} {arrow} {_spread(s, 'metric_value', fmt_num)}" if s["metric"] else "-"
        if s["metric"] and _spread(s, "metric_before", fmt_num) != "-":
            metric += f" (from {_spread(s, 'metric_before', fmt_num)})"
        status = s["status"] if s["ok"] == s["repeats"] else f"{s['status']} ({s['ok']}/{s['repeats']} ok)"
        if s["error"] and s["ok"] < s["repeats"]:
            status += f": {str(s['error'])[:80]}"
        rows.append({
            "task": s["task"], "cell": s["variant"], "model": s["model"], "repeats": int(s["repeats"]),
            "status": status, "tokens/s": _spread(s, "tokens_per_s", fmt_num),
            "step ms": _spread(s, "step_time_s", lambda v: fmt_num(v * 1e3)),
            "peak memory": _spread(s, "peak_memory_bytes", fmt_bytes),
            # The verdicts next to the headline figures, the details after them: a page too narrow
            # for every column still shows what a reader scans first.
            "metric": metric, "parity": s["parity"], "differs": s["differs"],
            # The two windows the headline peak is the larger of (setup: start to engine ready).
            "setup peak": _spread(s, "setup_peak_memory_bytes", fmt_bytes),
            "train peak": _spread(s, "train_peak_memory_bytes", fmt_bytes),
            "predicted": _predicted(s),
            "setup s": _spread(s, "setup_s", fmt_num), "compile s": _spread(s, "compile_s", fmt_num),
        })
    out = pd.DataFrame(rows)
    if len(out) and (out["predicted"] == "-").all():
        out = out.drop(columns="predicted")  # result sets from before the memory model
    return out


def _probes(search) -> str | None:
    if not search:
        return None
    return ", ".join(f"{p['micro_batch']} {p['status']}" for p in search.get("probes") or [])


def _predicted(s) -> str:
    """The memory model's prediction, and how far the measured peak is from it."""
    pred, peak = s.get("memory_predicted_bytes_median"), s.get("peak_memory_bytes_median")
    if pred is None or (isinstance(pred, float) and math.isnan(pred)):
        return "-"
    if peak is None or (isinstance(peak, float) and math.isnan(peak)) or not peak:
        return fmt_bytes(pred)
    return f"{fmt_bytes(pred)} ({(pred - peak) / peak:+.0%})"


def micro_batch_frame(summary):
    """Per backend (and task, model): the largest micro-batch found, the probes, and tokens/s at it."""
    import pandas as pd

    if not len(summary) or "micro_batch_probes" not in summary or not summary["micro_batch_probes"].notna().any():
        return pd.DataFrame()
    rows = []
    for _, s in summary[summary["micro_batch_probes"].notna()].iterrows():
        rows.append({"task": s["task"], "backend": s["variant"], "model": s["model"],
                     "largest micro-batch": s["micro_batch"] if s["ok"] else "none fits",
                     "probes (micro-batch status)": s["micro_batch_probes"],
                     "tokens/s at it": _spread(s, "tokens_per_s", fmt_num),
                     "peak memory": _spread(s, "peak_memory_bytes", fmt_bytes)})
    return pd.DataFrame(rows)


def _differs(record: dict, records: list[dict]) -> str:
    """What the cell actually did differently from its parity reference (the fairness check)."""
    other = counterpart(record, records)
    if other is None or not (has_account(record) and has_account(other)):
        return "-"
    return differs_label(compare_cells(other, record))


def fairness_markdown(rs: ResultSet) -> list[str]:
    """A section naming every cell that did not compute what its reference did, with the differences."""
    lines = []
    for r in rs.records:
        other = counterpart(r, rs.records)
        if other is None or not (has_account(r) and has_account(other)):
            continue
        diffs = compare_cells(other, r)
        if any(d.changes_math for d in diffs):
            lines.append(f"- **{r.get('task')} · {r.get('backend')}** vs {other.get('backend')}: "
                         + "; ".join(d.describe() for d in diffs if d.changes_math))
    if not lines:
        return []
    return ["## Cells that did not compute the same run", "",
            "Their speeds are not comparable with their reference's without these notes "
            "(`ftbench explain DIR CELL_A CELL_B` lists every difference):", "", *lines, ""]


def _parity(p) -> str:
    return parity_label(p)


# -------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{font-size:1.6em} h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:1em 0}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3} tr:nth-child(even) td{background:#fafafa}
figure{margin:1.5em 0} img{max-width:100%;border:1px solid #eee}
figcaption{font-size:.85em;color:#555} .warn{color:#a60}
.wide{overflow-x:auto} table.cells td{white-space:nowrap}
"""

LADDER_NOTE = ("Each rung adds the named optimization to the one above (an ablation: each alone against the "
               "baseline). tokens/s and training-window peak memory are medians over repeats; Δ prev / Δ base: "
               "% change from the previous rung / from the baseline; verdict: loss parity for optimizations that "
               "keep the math, held-out quality against the baseline for those that change numerics "
               "(docs/optimizations.md).")

PLOT_TITLES = {
    "throughput": "Throughput per task (median; whiskers min–max; dots = repeats)",
    "memory": "Peak memory per task",
    "loss": "Loss curves per task",
    "quality": "Quality vs throughput",
    "quality_vs_time": "Quality against training time",
    "ladder": "Optimization ladder: tokens/s and training-window peak per rung",
}


def render_html(rs: ResultSet, display, plots: dict[str, Path], out: Path, problems: list[str],
                time_to_target=None, extra: str = "") -> str:
    """The report page: the summary table and every plot, embedded so the file stands alone."""
    env = next((r.get("environment") for r in rs.records if r.get("environment")), {}) or {}
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items() if v)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>ftbench report: {html.escape(str(rs.path))}"
             f"</title><style>{_CSS}</style></head><body>",
             f"<h1>ftbench report — {html.escape(str(rs.path))}</h1>",
             f"<p>{len(rs.records)} record(s), {display.shape[0]} cell(s). Machine: "
             f"{html.escape(str(env.get('cpu', '?')))} ({env.get('cpu_count', '?')} CPUs); "
             f"{html.escape(versions)}; commit {html.escape(str(env.get('git_commit')))}.</p>"]
    for p in problems:
        parts.append(f"<p class='warn'>warning: {html.escape(p)}</p>")
    parts += ["<h2>Cells</h2>",
              "<p>Figures are the median over repeats, with [min–max] when there are several.</p>",
              # One line per cell (a figure and its range never broken), scrolled sideways when wide.
              "<div class='wide'>" + display.to_html(index=False, escape=True, border=0, classes="cells") + "</div>"]
    if time_to_target is not None:
        parts += ["<h2>Time to target</h2>", f"<p>{html.escape(TTT_NOTE)}</p>",
                  time_to_target.to_html(index=False, escape=True, border=0, classes="ttt")]
    parts += [extra, "<h2>Plots</h2>"]
    for key, path in plots.items():
        data = base64.b64encode(path.read_bytes()).decode()
        rel = os.path.relpath(path, out)
        parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(PLOT_TITLES[key])}' "
                     f"data-file='{html.escape(rel)}'><figcaption>{html.escape(PLOT_TITLES[key])} — "
                     f"<a href='{html.escape(rel)}'>{html.escape(rel)}</a></figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


# -------------------------------------------------------------------- main

TTT_NOTE = ("Training seconds until the first evaluation that met the target (measured steps, warmup and "
            "compilation included, evaluation excluded); median over seeds and repeats, a run that never reached "
            "it counting as infinitely slow, so 'not reached' means half or more did not.")


def _plots(rs: ResultSet, df, summary, plots_dir: Path, loss_x: str) -> dict[str, Path]:
    """Every plot of the report, by name: every cell, a failed one marked where its figure would be."""
    # One look per cell in every plot, from every record (failed ones too), never per panel.
    styles = styles_for(rs.records, variant_labels(rs.records))
    ok = summary[summary["ok"] > 0]
    plots: dict[str, Path] = {}
    plots["throughput"] = plot_bars(summary, df, "tokens_per_s", "tokens/s (non-pad, global)",
                                    PLOT_TITLES["throughput"], plots_dir / "throughput.png", styles, rs.records)
    kinds = ", ".join(sorted({str(k) for k in ok["memory_kind"] if k}))
    plots["memory"] = plot_bars(summary, df, "peak_memory_bytes", "peak memory (MiB)",
                                f"Peak memory per task ({kinds}; median, whiskers min–max)", plots_dir / "memory.png",
                                styles, rs.records, scale=MiB)
    plots["loss"] = plot_loss(rs, summary, styles, plots_dir / "loss.png", x=loss_x)
    plots["quality"] = plot_quality(summary, styles, rs.records, plots_dir / "quality_vs_throughput.png")
    ladder_plot = plot_ladder(rs, plots_dir / "ladder.png", styles)
    if ladder_plot:
        plots["ladder"] = ladder_plot
    vs_time = plot_quality_vs_time(rs, plots_dir / "quality_vs_time.png", styles)
    if vs_time:
        plots["quality_vs_time"] = vs_time
    return plots


def write_report(result_dir, out: str | os.PathLike | None = None, loss_x: str = "step") -> tuple[Report, object]:
    """Write the Markdown, CSV, PNG and HTML report of a result set.

    Returns the report's paths and the display table (for the terminal).

    Example::

        rep, table = write_report("results/baseline-cpu")
        print(rep.html)   # results/baseline-cpu/report/report.html
    """
    import matplotlib

    matplotlib.use("Agg")
    rs = load_result_set(result_dir)
    problems = list(rs.problems)
    if rs.replaced:
        problems.append(f"{rs.replaced} record(s) were superseded by a later rerun of the same cell and repeat "
                        "(--force); the latest is shown")
    out = Path(out) if out else Path(result_dir) / REPORT_DIR
    plots_dir = out / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    df = records_frame(rs)
    summary = summary_frame(df)
    display = display_frame(summary)
    rep = Report(out=out, markdown=out / "summary.md", csv=out / "summary.csv", records_csv=out / "records.csv",
                 html=out / "report.html", problems=problems, read=rs.versions_read(),
                 terminal=terminal_tables(summary, variant_labels(rs.records, without=("model",))))
    df.to_csv(rep.records_csv, index=False)
    summary.to_csv(rep.csv, index=False)
    md = [f"# ftbench report: {md_text(result_dir)}", "", f"Read {rep.read}.", "",
          "Median over repeats, [min–max] when there are several.", "", md_table(display), ""]
    micro = micro_batch_frame(summary)
    if len(micro):
        md += ["## Largest micro-batch per backend (--micro-batch auto)", "", md_table(micro), ""]
    ttt = time_to_target_frame(rs)
    if len(ttt):
        rep.time_to_target = ttt
        md += ["## Time to target", "", TTT_NOTE, "", md_table(ttt), ""]
    ladder = ladder_frame(rs)
    if len(ladder):
        rep.ladder = ladder
        md += ["## Optimization ladder", "", LADDER_NOTE, "", md_table(ladder), ""]
    md += fairness_markdown(rs)
    if problems:
        md += ["## Warnings", ""] + [f"- {md_text(p)}" for p in problems] + [""]
    profiled = profile_rows(rs, out)
    md += profile_markdown(profiled)
    if len(summary) and (summary["ok"] > 0).any():
        rep.plots.update(_plots(rs, df, summary, plots_dir, loss_x))
        md += ["## Plots", ""] + [f"![{PLOT_TITLES[k]}]({os.path.relpath(p, out)})" for k, p in rep.plots.items()]
    rep.markdown.write_text("\n".join(md) + "\n")
    rep.html.write_text(render_html(rs, display, rep.plots, out, problems, ttt if len(ttt) else None,
                                    profile_html(profiled)))
    return rep, display


def print_table(display, console, title: str) -> None:
    """A table in the terminal (rich), its words wrapped to the console rather than cut."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=escape(title), box=box.SIMPLE_HEAD, pad_edge=False)
    for col in display.columns:
        t.add_column(escape(str(col)), overflow="fold")
    for row in display.itertuples(index=False):
        t.add_row(*(escape(str(v)) for v in row))
    console.print(t)
