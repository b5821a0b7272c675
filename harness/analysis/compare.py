"""``ftbench compare BASE NEW``: did anything get slower, bigger or worse?

Cells are paired by ``cell_id`` (the same configuration).  A cell whose
configuration changed gets a new id; it is paired with the old one when
task, backend, model, data and ranks still match one-to-one, and then the
*recipe fingerprint* decides: a different recipe computes something else,
so no verdict is given, only the reason.

For each pair, three figures: **speed** (one verdict: throughput, with the
step time derived from the same ratio so the two cannot disagree), peak
memory and the task's primary metric (in its own direction).  The unit of
evidence is the *repeat* (one process): the steps of one process share its
machine state and are not independent samples, so pooling them makes
p-values absurdly small (pseudo-replication).  Per figure:

* the per-repeat values of each side and their medians; the change is the
  ratio of the medians;
* with two or more repeats per side, a bootstrap confidence interval of
  that ratio (:func:`scipy.stats.bootstrap`, percentile, fixed seed); a
  change counts only when the **whole interval lies beyond the threshold**;
* a two-sided Mann-Whitney U test on the per-repeat values, but only when
  enough repeats make it meaningful: its smallest attainable p-value,
  ``2 / C(n+m, n)``, must lie below ``alpha`` (with 3/3 repeats it is 0.1,
  so the test could never fire; 5/5 gives 0.008);
* single runs are judged by the threshold alone.

The evidence column says which of these was available (``n=3/3: threshold
and interval only``).  Thresholds default to :data:`DEFAULT_THRESHOLDS` or
come from an A/A calibration file (:mod:`ftbench.harness.analysis.calibrate`).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from ftbench.harness.cell.machineload import load_differs
from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.format import fmt_bytes, fmt_num
from ftbench.harness.analysis.calibration import read_calibration
from ftbench.harness.analysis.explain import explain
from ftbench.harness.analysis.markdown import md_table, md_text
from ftbench.harness.analysis.fairness import compare_cells, has_account
from ftbench.harness.analysis.resultset import (ResultSet, as_float, config_diff, environment_diff, load_result_set, repeat_of,
                        slot_of, variant_labels)

#: Relative change below which a figure is "unchanged", per figure.  Speed is
#: one figure (throughput; step time is its reciprocal).
DEFAULT_THRESHOLDS = {"speed": 0.10, "peak_memory_bytes": 0.10, "metric": 0.02, "time_to_target": 0.15}
ALIASES = {"tokens_per_s": "speed", "step_time_s": "speed", "throughput": "speed", "tokens": "speed",
           "tok/s": "speed", "step_time": "speed", "step": "speed", "memory": "peak_memory_bytes",
           "peak_memory": "peak_memory_bytes", "mem": "peak_memory_bytes", "quality": "metric",
           "accuracy": "metric", "time_to_target_s": "time_to_target", "ttt": "time_to_target"}
DEFAULT_ALPHA = 0.01
#: Confidence level of the interval of the ratio of medians.
CONFIDENCE = 0.95
#: Bootstrap resamples; the seed is fixed so that a comparison is reproducible.
RESAMPLES = 4999
REGRESSION, IMPROVEMENT, UNCHANGED, REFUSED = "regression", "improvement", "unchanged", "refused"


def parse_threshold(text: str) -> tuple[str, float]:
    """``"tokens_per_s=5%"`` / ``"memory=0.2"`` -> ``("speed", 0.05)`` / ``("peak_memory_bytes", 0.2)``."""
    key, eq, value = text.partition("=")
    key = ALIASES.get(key.strip(), key.strip())
    if not eq or key not in DEFAULT_THRESHOLDS:
        raise FtbenchError(f"invalid --threshold {text!r}: write FIGURE=VALUE with FIGURE one of "
                           f"{', '.join(DEFAULT_THRESHOLDS)} (or {', '.join(sorted(ALIASES))}), "
                           "VALUE a fraction or a percentage, e.g. --threshold speed=5%")
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
    #: Confidence interval of the relative change (ratio of medians - 1), when repeats allow one.
    interval: tuple[float, float] | None = None
    p_value: float | None = None
    #: For a regression or improvement: what else differed between the two sides (analysis.explain).
    why: list = field(default_factory=list)


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
    #: Where the thresholds came from ("defaults", a calibration file, ...).
    threshold_source: str = "defaults"
    #: What each side read: ``["base: 12 record(s) of schema version 1", ...]``.
    read: list[str] = field(default_factory=list)

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
            "new": _fmt_values(r.new, r.unit), "change": _fmt_change(r.change, r.figure), "evidence": r.evidence,
            "verdict": r.verdict} for r in self.rows],
            columns=["task", "cell", "figure", "base", "new", "change", "evidence", "verdict"])

    def markdown(self, base: str, new: str) -> str:
        c = self.counts()
        lines = [f"# ftbench compare", "", f"- base: `{base}`", f"- new: `{new}`",
                 *(f"- read {r}" for r in self.read),
                 f"- verdict: **{c[REGRESSION]} regression(s)**, {c[IMPROVEMENT]} improvement(s), "
                 f"{c[UNCHANGED]} unchanged, {c[REFUSED]} refused",
                 f"- thresholds ({self.threshold_source}): "
                 + ", ".join(f"{k} {v:.1%}" for k, v in self.thresholds.items())
                 + f"; {CONFIDENCE:.0%} bootstrap interval of the ratio of medians must lie beyond the threshold;"
                 f" rank test on repeats (alpha {self.alpha}) where enough repeats allow it", ""]
        if self.warnings or self.refused or self.only_base or self.only_new:
            lines += ["## Notes", ""]
            lines += [f"- warning: {w}" for w in self.warnings]
            lines += [f"- refused: {w}" for w in self.refused]
            lines += [f"- only in base: {w}" for w in self.only_base]
            lines += [f"- only in new: {w}" for w in self.only_new]
            lines.append("")
        if self.rows:
            lines += ["## Figures", "", md_table(self.frame()), ""]
        flagged = self.flagged()
        if flagged:
            lines += ["## What differed between the two sides", ""]
            for (cell, figure, verdict), why in flagged:
                lines.append(f"- **{md_text(cell)}**, {md_text(figure)} ({verdict}): "
                             + (md_text("; ".join(f"{d.kind}: {d.what}" for d in why)) if why else
                                "nothing recorded differs (same software, machine, cell, data; no profiles)"))
            lines.append("")
        return "\n".join(lines)

    def flagged(self) -> list[tuple[tuple[str, str, str], list]]:
        """Each regression or improvement with its explanation."""
        return [((r.cell, r.figure, r.verdict), r.why) for r in self.rows if r.verdict in (REGRESSION, IMPROVEMENT)]

    def as_json(self) -> dict:
        """Everything above as plain data, for bots (``compare --json``)."""
        return {"counts": self.counts(), "thresholds": self.thresholds, "threshold_source": self.threshold_source,
                "alpha": self.alpha, "warnings": self.warnings, "refused": self.refused,
                "only_base": self.only_base, "only_new": self.only_new,
                "rows": [{"cell": r.cell, "cell_id": r.cell_id, "task": r.task, "figure": r.figure, "base": r.base,
                          "new": r.new, "change": r.change, "interval": r.interval, "p_value": r.p_value,
                          "verdict": r.verdict, "evidence": r.evidence,
                          "why": [d.as_dict() for d in r.why]} for r in self.rows]}


# ------------------------------------------------------------------ verdicts


@dataclass
class Judgement:
    """The verdict on one figure and the evidence behind it."""

    change: float | None
    verdict: str
    evidence: str
    interval: tuple[float, float] | None = None
    p_value: float | None = None


def relative_change(base: float, new: float) -> float:
    if base == new:
        return 0.0
    if base == 0 or math.isinf(base):
        return math.copysign(math.inf, new - base)
    return (new - base) / abs(base)


def median_ratio_interval(base: list[float], new: list[float],
                          confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Bootstrap interval of ``median(new) / median(base) - 1`` (both sides resampled independently).

    Example: ``median_ratio_interval([100, 101, 99], [60, 61, 59])`` -> about ``(-0.42, -0.38)``.
    """
    import numpy as np
    from scipy.stats import bootstrap

    def ratio(x, y, axis=-1):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.median(y, axis=axis) / np.median(x, axis=axis)

    kw = dict(n_resamples=RESAMPLES, method="percentile", vectorized=True, confidence_level=confidence)
    try:
        res = bootstrap((np.asarray(base, float), np.asarray(new, float)), ratio, rng=np.random.default_rng(0), **kw)
    except TypeError:  # scipy < 1.15 names the generator random_state
        res = bootstrap((np.asarray(base, float), np.asarray(new, float)), ratio,
                        random_state=np.random.default_rng(0), **kw)
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return lo - 1, hi - 1


def smallest_p(n: int, m: int) -> float:
    """Smallest two-sided p-value a Mann-Whitney U test on n and m values can give: ``2 / C(n+m, n)``."""
    return min(1.0, 2 / math.comb(n + m, n))


def judge(base: list[float], new: list[float], higher_is_better: bool, threshold: float,
          alpha: float = DEFAULT_ALPHA) -> Judgement:
    """The verdict on one figure from its per-repeat values.

    A change counts when the median ratio moves by at least ``threshold``,
    the whole confidence interval of that ratio lies beyond the threshold,
    and (where enough repeats make it meaningful) the rank test on the
    repeats gives p < alpha.

    Example: ``judge([100, 101, 99], [60, 61, 59], True, 0.1).verdict == "regression"``
    with evidence ``"n=3/3: threshold and interval only, 95% CI -41.6%..-38.4%"``.
    """
    base = [v for v in base if v is not None and not math.isnan(v)]
    new = [v for v in new if v is not None and not math.isnan(v)]
    if not base or not new:
        return Judgement(None, UNCHANGED, "no figure on one side")
    change = relative_change(statistics.median(base), statistics.median(new))
    worse = change < 0 if higher_is_better else change > 0
    big = abs(change) >= threshold
    n = f"n={len(base)}/{len(new)}"
    interval, p = None, None
    if len(base) < 2 or len(new) < 2:
        changed = big
        evidence = [f"{n}: threshold only (±{threshold:.0%}); more --repeat gives an interval"]
    elif math.isinf(change) or 0 in base:
        changed, evidence = big, [f"{n}: threshold only (zero base)"]
    else:
        interval = median_ratio_interval(base, new)
        lo, hi = interval
        beyond = lo >= threshold or hi <= -threshold
        floor = smallest_p(len(base), len(new))
        if floor < alpha:
            from scipy.stats import mannwhitneyu

            p = float(mannwhitneyu(base, new, alternative="two-sided").pvalue)
            evidence = [f"{n}: U test p={p:.2g}"]
            changed = big and beyond and p < alpha
        else:
            evidence = [f"{n}: threshold and interval only"]
            changed = big and beyond
        evidence.append(f"{CONFIDENCE:.0%} CI {lo:+.1%}..{hi:+.1%}")
    return verdict_of_change(change, changed, big, worse, evidence, interval, p)


def verdict_of_change(change: float, changed: bool, big: bool, worse: bool, evidence: list[str],
                      interval: tuple[float, float] | None, p: float | None) -> Judgement:
    """The judgement once the evidence is in: a change that counts is a regression or an improvement;
    a big one that does not count is said to lie within noise."""
    if not changed:
        if big:
            evidence.append("within noise")
        return Judgement(change, UNCHANGED, ", ".join(evidence), interval, p)
    return Judgement(change, REGRESSION if worse else IMPROVEMENT, ", ".join(evidence), interval, p)


# ------------------------------------------------------------------ pairing


def by_cell(rs: ResultSet) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rs.records:
        out.setdefault(r["cell_id"], []).append(r)
    for recs in out.values():
        recs.sort(key=repeat_of)
    return out


def pair_cells(base: dict, new: dict) -> tuple[list[tuple], list[str], list[str]]:
    """Cells paired by id, then by slot (task, backend, model, data, ranks) where one cell of each side is left."""
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


def compare_sets(base_dir, new_dir, thresholds: dict | None = None, alpha: float = DEFAULT_ALPHA,
                 calibration: str | None = None) -> Comparison:
    """Compare two result directories.

    ``calibration`` names a file written by ``compare --calibrate``: its
    thresholds apply (``thresholds`` still override them), and it is refused
    when either set comes from another machine.

    Example: ``compare_sets("results/baseline-cpu", "runs/ci", {"speed": 0.05})``.
    """
    base, new = load_result_set(base_dir), load_result_set(new_dir)
    source = "defaults"
    if calibration:
        calibrated = read_calibration(calibration, [base, new])
        thresholds = {**calibrated, **(thresholds or {})}
        source = f"calibrated by {calibration}" + (", overridden by --threshold" if thresholds != calibrated else "")
    elif thresholds:
        source = "defaults and --threshold"
    cmp = compare_result_sets(base, new, thresholds, alpha)
    cmp.threshold_source = source
    cmp.warnings[:0] = [f"base: {p}" for p in base.problems] + [f"new: {p}" for p in new.problems]
    cmp.read = [f"base: {base.versions_read()}", f"new: {new.versions_read()}"]
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

    b, n = by_cell(base), by_cell(new)
    pairs, only_b, only_n = pair_cells(b, n)
    labels = variant_labels([recs[0] for recs in list(b.values()) + list(n.values())])
    # Cells of one set only, named by what sets them apart (two tunings must not read alike).
    cmp.only_base = [f"{b[c][0].get('task')} · {labels[c]} ({c})" for c in only_b]
    cmp.only_new = [f"{n[c][0].get('task')} · {labels[c]} ({c})" for c in only_n]
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
        cmp.warnings += fairness_notes(label, rb, rn)
        cmp.rows += _compare_cell(label, task, cb, rb, rn, th, alpha, note)
    explain_flagged(cmp, dict(pairs), b, n)
    shift = whole_run_shift(cmp.rows, th["speed"])
    if shift:
        cmp.warnings.append(shift)
    if pairs and all(r.verdict == REFUSED for r in cmp.rows):
        raise FtbenchError("nothing to compare: " + " | ".join(cmp.refused))
    if not pairs:
        raise FtbenchError(f"the result sets have no cell in common: {base.path} holds "
                           f"{', '.join(sorted({_describe(r[0]) for r in b.values()}))}; {new.path} holds "
                           f"{', '.join(sorted({_describe(r[0]) for r in n.values()}))}")
    return cmp


def explain_flagged(cmp: Comparison, pairs: dict, b: dict, n: dict) -> None:
    """Attach to each regression or improvement what else differed (analysis.explain), and warn of load."""
    explained: dict = {}
    for row in cmp.rows:
        if row.verdict in (REGRESSION, IMPROVEMENT):
            if row.cell_id not in explained:
                cn = pairs.get(row.cell_id)
                explained[row.cell_id] = explain(b[row.cell_id], n[cn]) if cn else []
            row.why = explained[row.cell_id]
    loaded = [r.cell for r in cmp.rows if r.figure == "speed" and r.verdict in (REGRESSION, IMPROVEMENT)
              and "other's load" in r.evidence]
    if loaded:
        cmp.warnings.append(f"{len(loaded)} speed change(s) come with a load difference between the two runs "
                            f"({', '.join(loaded)}): the machine, not the code, may explain them; rerun both "
                            "sides together with ftbench ab (docs/comparisons.md)")
def fairness_notes(label: str, rb: list[dict], rn: list[dict]) -> list[str]:
    """A warning when the base and new cell did not compute the same run (docs/fairness.md), from
    what their first finished repeats recorded."""
    ok_b = [r for r in rb if r.get("status") == "ok" and has_account(r)]
    ok_n = [r for r in rn if r.get("status") == "ok" and has_account(r)]
    if not (ok_b and ok_n):
        return []
    math_ = [d.describe() for d in compare_cells(ok_b[0], ok_n[0]) if d.changes_math]
    if not math_:
        return []
    return [f"{label}: base and new did not compute the same run ({'; '.join(math_)}); its figures are "
            "compared with this note"]


def whole_run_shift(rows: list[Row], threshold: float) -> str | None:
    """A note when every cell's speed moved the same way beyond the threshold.

    Two runs minutes apart can meet different machines (load from other
    users); no statistic of one pair of runs can tell that from a change that
    slows every cell alike, but the user should know to look.
    """
    changes = [r.change for r in rows if r.figure == "speed" and r.change is not None and math.isfinite(r.change)]
    if len(changes) < 2 or not (all(c <= -threshold for c in changes) or all(c >= threshold for c in changes)):
        return None
    return (f"the speed of all {len(changes)} cells moved the same way ({min(changes):+.0%} to {max(changes):+.0%}): "
            "a shift of the whole run, from a change that affects every cell or from the machine (other load, "
            "clock, thermal state); an A/A calibration on this machine (compare --calibrate) tells how large "
            "such shifts get by themselves")


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
    metric_b, metric_n = ok_b[0].get("metric"), ok_n[0].get("metric")
    figures = [("speed", "tokens_per_s", True, "tok/s"), ("peak_memory_bytes", "peak_memory_bytes", False, "bytes")]
    load = load_differs(_median_load(ok_b), _median_load(ok_n))
    for figure, key, hib, unit in figures:
        vb, vn = _clean(ok_b, key), _clean(ok_n, key)
        j = judge(vb, vn, hib, th[figure], alpha)
        evidence = j.evidence + extra
        if figure == "speed" and load:
            evidence += f"; {load}"
        rows.append(Row(label, task, figure, vb, vn, j.change, j.verdict, evidence, cid, unit,
                        j.interval, j.p_value))
    if metric_b is not None or metric_n is not None:
        if metric_b != metric_n:
            rows.append(Row(label, task, "metric", [], [], None, REFUSED,
                            f"primary metric changed ({metric_b} -> {metric_n})", cid))
        else:
            hib = ok_n[0].get("higher_is_better")
            if hib is None:
                hib = ok_b[0].get("higher_is_better")
            arrow = "↑" if hib else "↓"
            vb, vn = _clean(ok_b, "metric_value"), _clean(ok_n, "metric_value")
            j = judge(vb, vn, bool(hib), th["metric"], alpha)
            rows.append(Row(label, task, f"{metric_b} {arrow}", vb, vn, j.change, j.verdict, j.evidence + extra,
                            cid, "", j.interval, j.p_value))
    rows += _time_to_target_rows(label, task, cid, ok_b, ok_n, th, alpha, extra)
    return rows


def _time_to_target_rows(label, task, cid, ok_b, ok_n, th, alpha, extra) -> list[Row]:
    """Time to the quality target (docs/time-to-quality.md): reaching it is the first fact, its time the second.

    A side "reached" its target when more than half its runs did (the report's
    median rule); reaching it before and not now is a regression whatever the times.
    """
    tb = next((r["target"] for r in ok_b if r.get("target")), None)
    tn = next((r["target"] for r in ok_n if r.get("target")), None)
    if not tb and not tn:
        return []
    if (tb or {}).get("text") != (tn or {}).get("text"):
        return [Row(label, task, "time_to_target", [], [], None, REFUSED,
                    f"targets differ ({(tb or {}).get('text')} -> {(tn or {}).get('text')})", cid)]
    hit_b = [r for r in ok_b if r.get("target_reached")]
    hit_n = [r for r in ok_n if r.get("target_reached")]
    reached_b, reached_n = 2 * len(hit_b) > len(ok_b), 2 * len(hit_n) > len(ok_n)
    counts = f"reached in {len(hit_b)}/{len(ok_b)} -> {len(hit_n)}/{len(ok_n)} runs"
    vb, vn = _clean(hit_b, "time_to_target_s"), _clean(hit_n, "time_to_target_s")
    if reached_b != reached_n:
        verdict = REGRESSION if reached_b else IMPROVEMENT
        why = f"target {tb['text']} {'no longer' if reached_b else 'now'} reached ({counts}){extra}"
        return [Row(label, task, "time_to_target", vb, vn, None, verdict, why, cid, "sec")]
    if not reached_b:
        return [Row(label, task, "time_to_target", vb, vn, None, UNCHANGED,
                    f"target {tb['text']} reached on neither side ({counts}){extra}", cid, "sec")]
    j = judge(vb, vn, False, th["time_to_target"], alpha)
    return [Row(label, task, "time_to_target", vb, vn, j.change, j.verdict, f"{counts}; {j.evidence}{extra}", cid,
                "sec", j.interval, j.p_value)]


def _median_load(recs) -> dict | None:
    """The median of the repeats' ``machine_load`` shares (records before it carry none)."""
    shares = [v for v in (as_float((r.get("machine_load") or {}).get("other_cpu_share"))
                          for r in recs if isinstance(r.get("machine_load"), dict)) if v is not None]
    return {"other_cpu_share": statistics.median(shares)} if shares else None


def _clean(recs, key) -> list[float]:
    return [v for v in (as_float(r.get(key)) for r in recs) if v is not None]


def _fmt_one(v: float, unit: str) -> str:
    if unit == "bytes":
        return fmt_bytes(v)
    if unit == "s":
        return f"{fmt_num(v * 1e3)} ms"
    if unit == "sec":
        return f"{fmt_num(v)} s"
    return fmt_num(v)


def _fmt_values(vals: list[float], unit: str) -> str:
    if not vals:
        return "-"
    med = _fmt_one(statistics.median(vals), unit)
    if len(vals) == 1:
        return med
    return f"{med} [{_fmt_one(min(vals), unit)}–{_fmt_one(max(vals), unit)}]"


def _fmt_change(change: float | None, figure: str = "") -> str:
    if change is None:
        return "-"
    if math.isinf(change):
        return "+inf" if change > 0 else "-inf"
    if figure == "speed" and change > -1:
        # Step time is the reciprocal of throughput for the same work: one figure, one verdict.
        return f"{change:+.1%} tok/s ({1 / (1 + change) - 1:+.1%} step time)"
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
    for r in cmp.read:
        console.print(f"read {escape(r)}")
    console.print("thresholds (" + escape(cmp.threshold_source) + "): "
                  + ", ".join(f"{k} {v:.1%}" for k, v in cmp.thresholds.items()), soft_wrap=True)
    t = Table(title=f"ftbench compare: {base} -> {new}")
    for col in ("task", "cell", "figure", "base (median [min–max])", "new", "change", "evidence", "verdict"):
        t.add_column(escape(col), overflow="fold")
    for r, d in zip(cmp.rows, cmp.frame().to_dict("records")):
        cells = [escape(str(d[k])) for k in ("task", "cell", "figure", "base", "new", "change", "evidence")]
        t.add_row(*cells, f"[{colours.get(r.verdict, '')}]{r.verdict}[/]")
    console.print(t)
    for (cell, figure, verdict), why in cmp.flagged():
        console.print(f"[bold]{escape(cell)}[/], {escape(figure)} ({verdict}), what differed: "
                      + (escape("; ".join(f"{d.kind}: {d.what}" for d in why)) if why else "nothing recorded"),
                      soft_wrap=True)
    c = cmp.counts()
    colour = "bold red" if c[REGRESSION] else "green"
    console.print(f"[{colour}]{c[REGRESSION]} regression(s)[/], {c[IMPROVEMENT]} improvement(s), "
                  f"{c[UNCHANGED]} unchanged, {c[REFUSED]} refused")
