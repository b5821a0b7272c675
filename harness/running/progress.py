"""What ``ftbench run`` shows while it works: a line per cell, a live timer, a summary table."""

from __future__ import annotations

import statistics
import time
from collections import Counter

from rich import box
from rich.markup import escape
from rich.table import Table

from ftbench.harness.contract.format import fmt_bytes, fmt_num
from ftbench.harness.grid.labels import varying_labels
from ftbench.harness.results.parity import parity_label


class RunView:
    """Progress events from the launchers and their result-set writer, rendered with rich.

    Example: ``RunView(console, 4, "runs/x").event("skip", 1, 4, spec, None)``.

    ``cells`` (the run's checked cells) name each cell by what varies among
    them (:mod:`ftbench.harness.grid.labels`) and count its repeats.
    """

    def __init__(self, console, total: int, out: str, follower: bool = False, cells=()):
        self.con = console
        self.total = total
        self.out = out
        self.status = None
        self.follower = follower
        self.labels = varying_labels({c.cell_id: c.to_dict() for c in cells})
        self.repeats = Counter(c.cell_id for c in cells)
        self.t0 = time.perf_counter()
        if follower:
            self.con.print(f"ftbench: {total} cell(s); this node runs its share of the multi-node ones, "
                           "node 0 writes the records")
        else:
            self.con.print(f"ftbench: {total} cell(s) -> {out}/results.jsonl")

    def event(self, kind, i, total, spec, record):
        if kind.startswith("follow-"):
            self._follow_event(kind, i, total, spec, record)
            return
        if kind == "problem":
            self.con.print(f"[yellow]warning:[/] {escape(record)} (a cell without a readable record runs again)",
                           soft_wrap=True)
            return
        if kind == "submitted":
            self.con.print(f"submitted {i} cell(s) to Slurm as job array {', '.join(record)} (logs in "
                           f"{self.out}/slurm/); records are written as jobs end. Ctrl-C cancels them.")
            return
        if kind == "note":
            self.con.print(escape(record), soft_wrap=True)
            return
        if kind == "warmup":
            self.status = self.con.status("starting the cell launcher (imports torch and the plugins once)…")
            self.status.start()
            return
        if kind == "prepare":
            self._prepare(record)
            return
        if kind == "probe":
            peak = fmt_bytes(record.get("memory_tree_peak_bytes")) if record.get("memory_tree_peak_bytes") else "-"
            self.con.print(f"[{i}/{total}] {self._name(spec)}: probe micro-batch "
                           f"{record['micro_batch']}: {record['status']} (tree peak {peak})")
            return
        if kind not in ("skip", "start", "end"):
            return
        label = f"[{i}/{total}] {self._name(spec)}"
        if kind == "skip":
            self.con.print(f"{label}: already in the result set, skipped (use --force to rerun)")
        elif kind == "start":
            if self.status:
                self.status.stop()
            self.status = self.con.status(f"{label}: running…")
            self.status.start()
        else:
            if self.status:
                self.status.stop()
            self.con.print(f"{label}: {self._one_line(record)}")

    def _follow_event(self, kind, i, total, spec, outcome):
        label = f"[{i}/{total}] {self._name(spec)} ({spec.nnodes} nodes)"
        if kind == "follow-skip":
            self.con.print(f"{label}: already in node 0's result set, skipped")
        elif kind == "follow-start":
            self.con.print(f"{label}: running this node's ranks…")
        else:
            self.con.print(f"{label}: this node's share ended ({outcome.status}); node 0 records the cell")

    def _name(self, spec) -> str:
        """``generation · eager · lora · bf16 · repeat 2/3``: the task, what sets the cell apart, its repeat."""
        label = self.labels.get(spec.cell_id) or f"{spec.backend} · {spec.model}" + (
            f" ×{spec.nproc}" if spec.nproc > 1 else "")
        n = self.repeats.get(spec.cell_id, 1)
        return f"{spec.task} · {label}" + (f" · repeat {spec.repeat + 1}/{n}" if n > 1 else "")

    def _prepare(self, job: dict) -> None:
        if self.status:
            self.status.stop()
        device = "" if job["device"] == "auto" else f" ({job['device']})"
        what = f"preparing {', '.join(job['backends'])}{device} once for the grid"
        if job["status"] == "running":
            self.status = self.con.status(f"{what} (e.g. building native ops on first use)…")
            self.status.start()
        elif job["status"] == "ok":
            self.con.print(f"{what}: done in {job['seconds']:.1f} s (not counted in any cell)")
        else:
            self.con.print(f"[yellow]warning:[/] {what} failed after {job['seconds']:.1f} s: "
                           f"{escape(job.get('error') or '')}; its cells will try on their own", soft_wrap=True)

    @staticmethod
    def _one_line(r: dict) -> str:
        colour = {"ok": "green", "skipped": "yellow"}.get(r["status"], "red")
        s = f"[{colour}]{r['status']}[/] in {r['wall_s']:.1f} s"
        if r["status"] == "ok":
            s += (f", {fmt_num(r['tokens_per_s'])} tok/s, step {fmt_num(r['step_time_s'] * 1e3)} ms, "
                  f"mem {fmt_bytes(r['peak_memory_bytes'])}, {r['metric']} {fmt_num(r['metric_value'])}"
                  f"{metric_change(r)}")
        elif r.get("error"):
            s += f": {escape(r['error'])}"  # library messages carry [brackets] that rich would read as markup
        for w in r.get("warnings") or ():
            s += f" [yellow](warning: {escape(w)})[/]"
        return s

    def interrupted(self, out):
        if self.status:
            self.status.stop()
        self.con.print(f"[yellow]interrupted[/]: finished cells are kept in {out}/results.jsonl; the running cell "
                       f"was stopped and not recorded. Resume with the same command and --out {out}.")

    def finish(self, summary):
        if self.follower:
            self.con.print(f"done in {time.perf_counter() - self.t0:.0f} s; records are in node 0's result set")
            return
        recs = summary.records
        groups: dict[str, list[dict]] = {}
        for r in recs:
            groups.setdefault(r["cell_id"], []).append(r)
        labels = varying_labels({cid: _config(rs[0]) for cid, rs in groups.items()})
        several = any(len(rs) > 1 for rs in groups.values())
        t = Table(title=f"ftbench run: {len(recs)} record(s) of {len(groups)} cell(s) in "
                        f"{time.perf_counter() - self.t0:.0f} s", box=box.SIMPLE_HEAD, pad_edge=False,
                  caption="step: median ± IQR of the measured steps" + (
                      "; a cell's repeats: median \\[min–max] over its ok runs" if several else "")
                  + "; mem: " + ", ".join(sorted({r.get("memory_kind") or "-" for r in recs})))
        # Short headers, unwrapped figures and no all-empty columns keep the
        # table readable in 80 columns.
        width = min(40, max((len(f"{rs[0]['task']} · {labels[cid]}") for cid, rs in groups.items()), default=22))
        columns = [("cell", {"overflow": "fold", "min_width": width}), ("runs", {"justify": "right"}),
                   ("status", {})] + [
            (c, {"justify": "right", "no_wrap": True}) for c in ("tok/s", "step ms", "mem", "setup s", "compile s")
        ] + [("metric", {"overflow": "fold"}), ("parity", {"overflow": "fold"})]
        rows = [[escape(f"{rs[0]['task']} · {labels[cid]}"), str(len(rs)), *_figures(rs)]
                for cid, rs in groups.items()]
        keep = [i for i in range(len(columns)) if i in (0, 2) or (i == 1 and several)
                or (i > 2 and any(row[i] != "-" for row in rows))]
        for i in keep:
            t.add_column(columns[i][0], **columns[i][1])
        for row in rows:
            t.add_row(*(row[i] for i in keep))
        self.con.print(t)
        if summary.skipped_done:
            self.con.print(f"{summary.skipped_done} cell(s) were already in the result set and were skipped.")
        self.con.print(f"records: {self.out}/results.jsonl — report with: ftbench report {self.out}")


def _config(r: dict) -> dict:
    """A record's cell configuration in ``CellSpec.to_dict()`` form (for labels)."""
    cfg = r.get("config") or {}
    return {**cfg, **{k: r.get(k, cfg.get(k)) for k in ("task", "backend", "model", "data", "nproc")}}


def _figures(rs: list[dict]) -> list[str]:
    """Status, tok/s, step, memory, setup, compile, metric and parity of one cell's records (its repeats)."""
    ok = [r for r in rs if r["status"] == "ok"]
    statuses = Counter(r["status"] for r in rs)
    status = " ".join(s if n == len(rs) else f"{s} {n}/{len(rs)}" for s, n in statuses.items())
    first = (ok or rs)[0]
    if len(rs) == 1:
        st = first.get("step_time") or {}  # one run: the spread of its own steps
        step = (f"{fmt_num(st['median'] * 1e3)}±{fmt_num(st['iqr'] * 1e3, 2)}"
                if st.get("median") is not None else "-")
        metric = f"{first['metric']} {fmt_num(first['metric_value'])}" if first.get("metric_value") is not None \
            else "-"
        return [status, fmt_num(first.get("tokens_per_s")), step, fmt_bytes(first.get("peak_memory_bytes")),
                fmt_num(first.get("setup_s"), 2), fmt_num(first.get("compile_s"), 2),
                metric + metric_change(first), _parity(first)]

    def values(key, scale=1.0) -> list[float]:
        return [r[key] * scale for r in ok if isinstance(r.get(key), (int, float))]

    def spread(key, scale=1.0, fmt=fmt_num) -> str:
        """Median over the ok repeats, and their range: ``9706 [9650–9810]``."""
        v = values(key, scale)
        if not v:
            return "-"
        mid = fmt(statistics.median(v))
        return f"{mid} [{fmt(min(v))}–{fmt(max(v))}]" if len(v) > 1 and min(v) != max(v) else mid

    metric = f"{first['metric']} {spread('metric_value')}" if ok and first.get("metric_value") is not None else "-"
    return [status, spread("tokens_per_s"), spread("step_time_s", 1e3),
            spread("peak_memory_bytes", fmt=fmt_bytes), spread("setup_s"), spread("compile_s"), metric,
            _parity(first)]


def metric_change(r: dict) -> str:
    """`` (from X)``: the primary metric before tuning, when the record has one."""
    before = (r.get("metrics_before") or {}).get(r.get("metric"))
    return f" (from {fmt_num(before)})" if before is not None and r.get("metric_value") is not None else ""


def _parity(r: dict) -> str:
    return parity_label(r.get("parity"))


def print_cells(console, cells) -> None:
    """``ftbench run --dry-run``: the cells a command line makes, in the order they would run, each named
    by what sets it apart."""
    labels = varying_labels({c.cell_id: c.to_dict() for c in cells})
    repeats = Counter(c.cell_id for c in cells)
    t = Table(title=f"ftbench run --dry-run: {len(cells)} cell(s) of {len(repeats)} configuration(s); "
                    "nothing was run", box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("#", "task", "cell", "repeat", "micro-batch", "cell id"):
        t.add_column(col, overflow="fold")
    for i, c in enumerate(cells, 1):
        t.add_row(str(i), escape(str(c.task)), escape(labels[c.cell_id]), f"{c.repeat + 1}/{repeats[c.cell_id]}",
                  str(c.micro_batch), c.cell_id)
    console.print(t)
