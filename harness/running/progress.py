"""What ``ftbench run`` shows while it works: a line per cell, a live timer, a summary table."""

from __future__ import annotations

import time

from rich.markup import escape

from ftbench.harness.contract.format import fmt_bytes, fmt_num


class RunView:
    """Progress events from :func:`ftbench.harness.running.driver.run_cells`, rendered with rich."""

    def __init__(self, console, total: int, out: str, follower: bool = False):
        self.con = console
        self.total = total
        self.out = out
        self.status = None
        self.follower = follower
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
            self.con.print(f"[{i}/{total}] {spec.task} × {spec.backend}: probe micro-batch "
                           f"{record['micro_batch']}: {record['status']} (tree peak {peak})")
            return
        if kind not in ("skip", "start", "end"):
            return
        label = f"[{i}/{total}] {spec.task} × {spec.backend}{' + ' + spec.opt if spec.opt else ''} × {spec.model}" + (
            f" (nproc {spec.nproc})" if spec.nproc > 1 else "") + (f" repeat {spec.repeat}" if spec.repeat else "")
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
        label = f"[{i}/{total}] {spec.task} × {spec.backend} × {spec.model} ({spec.nnodes} nodes)"
        if kind == "follow-skip":
            self.con.print(f"{label}: already in node 0's result set, skipped")
        elif kind == "follow-start":
            self.con.print(f"{label}: running this node's ranks…")
        else:
            self.con.print(f"{label}: this node's share ended ({outcome.status}); node 0 records the cell")

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
        from rich import box
        from rich.table import Table

        recs = summary.records
        t = Table(title=f"ftbench run: {len(recs)} cell(s) in {time.perf_counter() - self.t0:.0f} s",
                  box=box.SIMPLE_HEAD, pad_edge=False, caption="step: median ± IQR of the measured steps; "
                  "mem: " + ", ".join(sorted({r.get("memory_kind") or "-" for r in recs})))
        # Short headers, unwrapped figures and no all-empty columns keep the
        # table readable in 80 columns.
        columns = [("task · backend · model", {"overflow": "fold", "min_width": 22}), ("status", {})] + [
            (c, {"justify": "right", "no_wrap": True}) for c in ("tok/s", "step ms", "mem", "setup s", "compile s")
        ] + [("metric", {"overflow": "fold"}), ("parity", {"overflow": "fold"})]
        rows = []
        for r in recs:
            st = r.get("step_time") or {}
            step = (f"{fmt_num(st['median'] * 1e3)}±{fmt_num(st['iqr'] * 1e3, 2)}"
                    if st.get("median") is not None else "-")
            metric = f"{r['metric']} {fmt_num(r['metric_value'])}" if r.get("metric_value") is not None else "-"
            metric += metric_change(r)
            backend = r["backend"] + (f" ×{r['nproc']}" if r.get("nproc", 1) > 1 else "")
            opt = (r.get("config") or {}).get("opt")
            backend += f" + {opt}" if opt else ""
            rows.append([f"{r['task']} · {backend} · {r['model']}", r["status"], fmt_num(r.get("tokens_per_s")), step,
                         fmt_bytes(r.get("peak_memory_bytes")), fmt_num(r.get("setup_s"), 2),
                         fmt_num(r.get("compile_s"), 2), metric, _parity(r)])
        keep = [i for i in range(len(columns)) if i < 2 or any(row[i] != "-" for row in rows)]
        for i in keep:
            t.add_column(columns[i][0], **columns[i][1])
        for row in rows:
            t.add_row(*(row[i] for i in keep))
        self.con.print(t)
        if summary.skipped_done:
            self.con.print(f"{summary.skipped_done} cell(s) were already in the result set and were skipped.")
        self.con.print(f"records: {self.out}/results.jsonl — report with: ftbench report {self.out}")


def metric_change(r: dict) -> str:
    """`` (from X)``: the primary metric before tuning, when the record has one."""
    before = (r.get("metrics_before") or {}).get(r.get("metric"))
    return f" (from {fmt_num(before)})" if before is not None and r.get("metric_value") is not None else ""


def _parity(r: dict) -> str:
    from ftbench.harness.results.parity import parity_label

    return parity_label(r.get("parity"))
