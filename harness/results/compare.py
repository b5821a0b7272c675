"""``ftbench compare BASE NEW``: did anything get slower, bigger or worse?

Cells are paired by ``cell_id`` (the same configuration).  A cell whose
configuration changed gets a new id; it is paired with the old one when
task, backend, model, data and ranks still match one-to-one, and then the
*recipe fingerprint* decides: a different recipe computes something else,
so no verdict is given, only the reason.

For each pair, four figures: throughput (``tokens_per_s``), median step
time, peak memory and the task's primary metric (in its own direction).
The verdict must survive a noisy machine (DESIGN §7: 2 shared cores):

* **with repeats** on both sides (``--repeat K``, K >= 2) a change counts only
  when (1) the medians of the per-repeat figures differ by at least the
  figure's threshold, (2) the per-repeat ranges do not overlap, and
  (3) for the speed figures, a Mann-Whitney U test on the steady-state
  per-step times of all repeats gives p < alpha.  (1) ignores changes too
  small to matter, (2) one disturbed run, (3) a difference the step-time
  distributions do not support.
* **single runs** can only be judged against the threshold; the evidence
  column says so, and ``--repeat`` is the cure.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from ftbench.harness.api import FtbenchError
from ftbench.harness.results.format import fmt_bytes, fmt_num
from ftbench.harness.results.resultset import (ResultSet, as_float, config_diff, environment_diff, load_result_set, repeat_of,
                        slot_of, variant_labels)

#: Relative change below which a figure is "unchanged", per figure.  Speed on a
#: shared CPU easily moves 5% between runs; memory (peak RSS) a few MB.
DEFAULT_THRESHOLDS = {"tokens_per_s": 0.10, "step_time_s": 0.10, "peak_memory_bytes": 0.10, "metric": 0.02}
ALIASES = {"throughput": "tokens_per_s", "tokens": "tokens_per_s", "tok/s": "tokens_per_s",
           "step_time": "step_time_s", "step": "step_time_s", "memory": "peak_memory_bytes",
           "peak_memory": "peak_memory_bytes", "mem": "peak_memory_bytes", "quality": "metric",
           "accuracy": "metric"}
DEFAULT_ALPHA = 0.01
REGRESSION, IMPROVEMENT, UNCHANGED, REFUSED = "regression", "improvement", "unchanged", "refused"


def parse_threshold(text: str) -> tuple[str, float]:
    """``"tokens_per_s=5%"`` / ``"memory=0.2"`` -> ``("tokens_per_s", 0.05)`` / ``("peak_memory_bytes", 0.2)``."""
    key, eq, value = text.partition("=")
    key = ALIASES.get(key.strip(), key.strip())
    if not eq or key not in DEFAULT_THRESHOLDS:
        raise FtbenchError(f"invalid --threshold {text!r}: write FIGURE=VALUE with FIGURE one of "
                           f"{', '.join(DEFAULT_THRESHOLDS)} (or {', '.join(sorted(ALIASES))}), "
                           "VALUE a fraction or a percentage, e.g. --threshold tokens_per_s=5%")
    value = value.strip()
    try:
        v = float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        v = -1.0
    if not (0 <= v < 100):
        raise FtbenchError(f"invalid --threshold {text!r}: the value must be a non-negative fraction (0.05) or "
                           "percentage (5%)")
    return key, v


@dataclass
class Row:
    """One figure of one cell pair, and its verdict."""

    cell: str
    task: str
    figure: str
    base: list[float]
    new: list[float]
    change: float | None
    verdict: str
    evidence: str
    cell_id: str = ""
    unit: str = ""


@dataclass
class Comparison:
    """Everything ``compare`` found; ``regressions`` decides the exit status.

    Example::

        c = compare_sets("results/baseline-cpu", "runs/today")
        sys.exit(1 if c.regressions else 0)
    """

    rows: list[Row] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    only_base: list[str] = field(default_factory=list)
    only_new: list[str] = field(default_factory=list)
    thresholds: dict = field(default_factory=dict)
    alpha: float = DEFAULT_ALPHA

    @property
    def regressions(self) -> list[Row]:
        return [r for r in self.rows if r.verdict == REGRESSION]

    def counts(self) -> dict:
        out = {v: 0 for v in (REGRESSION, IMPROVEMENT, UNCHANGED, REFUSED)}
        for r in self.rows:
            out[r.verdict] = out.get(r.verdict, 0) + 1
        return out

    def frame(self):
        """The rows as a pandas DataFrame with display strings."""
        import pandas as pd

        return pd.DataFrame([{
            "task": r.task, "cell": r.cell, "figure": r.figure, "base": _fmt_values(r.base, r.unit),
            "new": _fmt_values(r.new, r.unit), "change": _fmt_change(r.change), "evidence": r.evidence,
            "verdict": r.verdict} for r in self.rows],
            columns=["task", "cell", "figure", "base", "new", "change", "evidence", "verdict"])

    def markdown(self, base: str, new: str) -> str:
        c = self.counts()
        lines = [f"# ftbench compare", "", f"- base: `{base}`", f"- new: `{new}`",
                 f"- verdict: **{c[REGRESSION]} regression(s)**, {c[IMPROVEMENT]} improvement(s), "
                 f"{c[UNCHANGED]} unchanged, {c[REFUSED]} refused",
                 f"- thresholds: " + ", ".join(f"{k} {v:.0%}" for k, v in self.thresholds.items())
                 + f"; rank test alpha {self.alpha}", ""]
        if self.warnings or self.refused or self.only_base or self.only_new:
            lines += ["## Notes", ""]
            lines += [f"- warning: {w}" for w in self.warnings]
            lines += [f"- refused: {w}" for w in self.refused]
            lines += [f"- only in base: {w}" for w in self.only_base]
            lines += [f"- only in new: {w}" for w in self.only_new]
            lines.append("")
        if self.rows:
            lines += ["## Figures", "", self.frame().to_markdown(index=False), ""]
        return "\n".join(lines)


# ------------------------------------------------------------------ verdicts


def judge(base: list[float], new: list[float], higher_is_better: bool, threshold: float,
          alpha: float = DEFAULT_ALPHA, base_steps: list[float] | None = None,
          new_steps: list[float] | None = None) -> tuple[float | None, str, str]:
    """(relative change, verdict, evidence) for one figure.

    ``base``/``new`` hold one figure per repeat; ``*_steps`` the pooled
    steady-state step times behind a speed figure (enables the rank test).

    Example: ``judge([100, 101, 99], [60, 61, 59], True, 0.1, base_steps=..., new_steps=...)``
    -> ``(-0.4, "regression", "p=2e-06, ranges separate")``.
    """
    base = [v for v in base if v is not None and not math.isnan(v)]
    new = [v for v in new if v is not None and not math.isnan(v)]
    if not base or not new:
        return None, UNCHANGED, "no figure on one side"
    mb, mn = statistics.median(base), statistics.median(new)
    if mb == mn:
        change = 0.0
    elif mb == 0 or math.isinf(mb):
        change = math.copysign(math.inf, mn - mb)
    else:
        change = (mn - mb) / abs(mb)
    worse = change < 0 if higher_is_better else change > 0
    big = abs(change) >= threshold
    if len(base) >= 2 and len(new) >= 2:
        separated = max(new) < min(base) or min(new) > max(base)
        evidence = [f"ranges {'separate' if separated else 'overlap'}"]
        significant = True
        if base_steps and new_steps and len(base_steps) >= 3 and len(new_steps) >= 3:
            from scipy.stats import mannwhitneyu

            p = float(mannwhitneyu(base_steps, new_steps, alternative="two-sided").pvalue)
            significant = p < alpha
            evidence.insert(0, f"U test p={p:.1g}")
        changed = big and separated and significant
        evidence.append(f"n={len(base)}/{len(new)}")
    else:
        changed = big
        evidence = [f"single run: threshold ±{threshold:.0%}"]
    if not changed:
        verdict = UNCHANGED
        if big:
            evidence.append("within noise")
    else:
        verdict = REGRESSION if worse else IMPROVEMENT
    return change, verdict, ", ".join(evidence)


# ------------------------------------------------------------------ pairing


def _by_cell(rs: ResultSet) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rs.records:
        out.setdefault(r["cell_id"], []).append(r)
    for recs in out.values():
        recs.sort(key=repeat_of)
    return out


def _pairs(base: dict, new: dict, refused: list[str]) -> tuple[list[tuple], list[str], list[str]]:
    pairs = [(cid, cid) for cid in base if cid in new]
    rest_b = [c for c in base if c not in new]
    rest_n = [c for c in new if c not in base]
    slots_b, slots_n = {}, {}
    for c in rest_b:
        slots_b.setdefault(slot_of(base[c][0]), []).append(c)
    for c in rest_n:
        slots_n.setdefault(slot_of(new[c][0]), []).append(c)
    for slot, cb in slots_b.items():
        cn = slots_n.get(slot, [])
        if len(cb) == 1 and len(cn) == 1:
            pairs.append((cb[0], cn[0]))
            rest_b.remove(cb[0])
            rest_n.remove(cn[0])
    return pairs, rest_b, rest_n


def _describe(r: dict) -> str:
    return f"{r.get('task')} × {r.get('backend')} × {r.get('model')}"


def _steps(recs: list[dict]) -> list[float]:
    out = []
    for r in recs:
        warm = int(((r.get("config") or {}).get("recipe") or {}).get("warmup", 0) or 0)
        out += [float(t) for t in (r.get("step_times_s") or [])[warm:] if as_float(t) is not None]
    return out


def compare_sets(base_dir, new_dir, thresholds: dict | None = None, alpha: float = DEFAULT_ALPHA) -> Comparison:
    """Compare two result directories.

    Example: ``compare_sets("results/baseline-cpu", "runs/ci", {"tokens_per_s": 0.05})``.
    """
    base, new = load_result_set(base_dir), load_result_set(new_dir)
    cmp = compare_result_sets(base, new, thresholds, alpha)
    cmp.warnings[:0] = [f"base: {p}" for p in base.problems] + [f"new: {p}" for p in new.problems]
    return cmp


def compare_result_sets(base: ResultSet, new: ResultSet, thresholds: dict | None = None,
                        alpha: float = DEFAULT_ALPHA) -> Comparison:
    """Pure logic of :func:`compare_sets` on loaded result sets."""
    th = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    cmp = Comparison(thresholds=th, alpha=alpha)
    if not base.records:
        raise FtbenchError(f"the base result set {base.path} has no readable records")
    if not new.records:
        raise FtbenchError(f"the new result set {new.path} has no readable records")
    eb, en = base.environments(), new.environments()
    if eb[0] != en[0]:
        cmp.warnings.append("environments differ, so speed and memory changes may come from the machine, not "
                            "the code: " + "; ".join(environment_diff(eb[0], en[0])))
    for side, envs in (("base", eb), ("new", en)):
        if len(envs) > 1:
            cmp.warnings.append(f"the {side} set mixes {len(envs)} environments")

    b, n = _by_cell(base), _by_cell(new)
    pairs, only_b, only_n = _pairs(b, n, cmp.refused)
    cmp.only_base = [f"{_describe(b[c][0])} ({c})" for c in only_b]
    cmp.only_new = [f"{_describe(n[c][0])} ({c})" for c in only_n]
    labels = variant_labels([recs[0] for recs in list(b.values()) + list(n.values())])
    for cb, cn in pairs:
        rb, rn = b[cb], n[cn]
        label = labels.get(cb, _describe(rb[0]))
        if cb != cn:
            label = f"{label} (config changed)"
        task = str(rb[0].get("task"))
        fb, fn = rb[0].get("recipe_fingerprint"), rn[0].get("recipe_fingerprint")
        if fb != fn:
            diff = config_diff(rb[0], rn[0]) or [
                f"recipe fingerprint {fb} -> {fn} with the same settings: the two sets were made by ftbench "
                "versions that define the recipe differently"]
            reason = (f"{_describe(rb[0])}: recipes differ ({', '.join(diff)}), so the two cells compute "
                      "different things and no regression can be called; rerun both with the same recipe")
            cmp.refused.append(reason)
            cmp.rows.append(Row(label, task, "recipe", [], [], None, REFUSED, "recipes differ: " + ", ".join(diff),
                                cb))
            continue
        note = config_diff(rb[0], rn[0]) if cb != cn else []
        cmp.rows += _compare_cell(label, task, cb, rb, rn, th, alpha, note)
    if pairs and all(r.verdict == REFUSED for r in cmp.rows):
        raise FtbenchError("nothing to compare: " + " | ".join(cmp.refused))
    if not pairs:
        raise FtbenchError(f"the result sets have no cell in common: {base.path} holds "
                           f"{', '.join(sorted({_describe(r[0]) for r in b.values()}))}; {new.path} holds "
                           f"{', '.join(sorted({_describe(r[0]) for r in n.values()}))}")
    return cmp


def _compare_cell(label, task, cid, rb, rn, th, alpha, note) -> list[Row]:
    ok_b = [r for r in rb if r.get("status") == "ok"]
    ok_n = [r for r in rn if r.get("status") == "ok"]
    extra = f"; config: {', '.join(note)}" if note else ""
    if not ok_b or not ok_n:
        sb = "/".join(sorted({str(r.get("status")) for r in rb}))
        sn = "/".join(sorted({str(r.get("status")) for r in rn}))
        err = next((r.get("error") for r in rn if r.get("error")), None)
        if ok_b and not ok_n:
            verdict, why = REGRESSION, f"the cell now fails: {err}" if err else "the cell now fails"
        elif ok_n and not ok_b:
            verdict, why = IMPROVEMENT, "the cell failed before and runs now"
        else:
            verdict, why = UNCHANGED, "failed on both sides"
        return [Row(label, task, "status", [], [], None, verdict, f"{sb} -> {sn}: {why}{extra}", cid)]
    rows = []
    failed_n = len(rn) - len(ok_n)
    if failed_n and len(rb) == len(ok_b):
        rows.append(Row(label, task, "status", [], [], None, REGRESSION,
                        f"{failed_n} of {len(rn)} repeats failed (none before){extra}", cid))
    steps_b, steps_n = _steps(ok_b), _steps(ok_n)
    metric_b, metric_n = ok_b[0].get("metric"), ok_n[0].get("metric")
    figures = [("tokens_per_s", "tokens_per_s", True, "tok/s", True),
               ("step_time_s", "step_time_s", False, "s", True),
               ("peak_memory_bytes", "peak_memory_bytes", False, "bytes", False)]
    for key, figure, hib, unit, steps in figures:
        change, verdict, ev = judge([as_float(r.get(key)) for r in ok_b], [as_float(r.get(key)) for r in ok_n],
                                    hib, th[key], alpha, steps_b if steps else None, steps_n if steps else None)
        rows.append(Row(label, task, figure, _clean(ok_b, key), _clean(ok_n, key), change, verdict, ev + extra,
                        cid, unit))
    if metric_b is not None or metric_n is not None:
        if metric_b != metric_n:
            rows.append(Row(label, task, f"metric", [], [], None, REFUSED,
                            f"primary metric changed ({metric_b} -> {metric_n})", cid))
        else:
            hib = ok_n[0].get("higher_is_better")
            if hib is None:
                hib = ok_b[0].get("higher_is_better")
            arrow = "↑" if hib else "↓"
            change, verdict, ev = judge([as_float(r.get("metric_value")) for r in ok_b],
                                        [as_float(r.get("metric_value")) for r in ok_n], bool(hib), th["metric"],
                                        alpha)
            rows.append(Row(label, task, f"{metric_b} {arrow}", _clean(ok_b, "metric_value"),
                            _clean(ok_n, "metric_value"), change, verdict, ev + extra, cid))
    return rows


def _clean(recs, key) -> list[float]:
    return [v for v in (as_float(r.get(key)) for r in recs) if v is not None]


def _fmt_one(v: float, unit: str) -> str:
    if unit == "bytes":
        return fmt_bytes(v)
    if unit == "s":
        return f"{fmt_num(v * 1e3)} ms"
    return fmt_num(v)


def _fmt_values(vals: list[float], unit: str) -> str:
    if not vals:
        return "-"
    med = _fmt_one(statistics.median(vals), unit)
    if len(vals) == 1:
        return med
    return f"{med} [{_fmt_one(min(vals), unit)}–{_fmt_one(max(vals), unit)}]"


def _fmt_change(change: float | None) -> str:
    if change is None:
        return "-"
    if math.isinf(change):
        return "+inf" if change > 0 else "-inf"
    return f"{change:+.1%}"


def print_comparison(cmp: Comparison, console, base: str, new: str) -> None:
    """Render a comparison as a rich table, with warnings and a one-line verdict."""
    from rich.markup import escape
    from rich.table import Table

    colours = {REGRESSION: "bold red", IMPROVEMENT: "green", UNCHANGED: "dim", REFUSED: "yellow"}
    for w in cmp.warnings:
        console.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)
    for w in cmp.refused:
        console.print(f"[yellow]refused:[/] {escape(w)}", soft_wrap=True)
    for w in cmp.only_base:
        console.print(f"only in base: {escape(w)}")
    for w in cmp.only_new:
        console.print(f"only in new: {escape(w)}")
    t = Table(title=f"ftbench compare: {base} -> {new}")
    for col in ("task", "cell", "figure", "base (median [min–max])", "new", "change", "evidence", "verdict"):
        t.add_column(escape(col), overflow="fold")
    for r, d in zip(cmp.rows, cmp.frame().to_dict("records")):
        cells = [escape(str(d[k])) for k in ("task", "cell", "figure", "base", "new", "change", "evidence")]
        t.add_row(*cells, f"[{colours.get(r.verdict, '')}]{r.verdict}[/]")
    console.print(t)
    c = cmp.counts()
    colour = "bold red" if c[REGRESSION] else "green"
    console.print(f"[{colour}]{c[REGRESSION]} regression(s)[/], {c[IMPROVEMENT]} improvement(s), "
                  f"{c[UNCHANGED]} unchanged, {c[REFUSED]} refused")
