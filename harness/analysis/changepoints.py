"""Change points of one history series: level shifts beyond noise.

:mod:`ruptures` proposes the breakpoints (PELT with a least-squares cost on
the log of the per-set medians, so a shift is a ratio).  Its penalty is
``PENALTY * sigma**2 * log(n)``, a BIC-like cost per breakpoint, where
``sigma`` is the series' noise: the larger of the spread between the repeats
of a set and a robust estimate of the spread between sets (from consecutive
differences), since runs minutes apart differ more than the repeats of one.  A proposal
is kept only when the levels on its two sides differ by at least the
figure's threshold *and* by ``Z`` standard errors of the difference of the
two segment means; weaker ones are merged away, weakest first.
"""

from __future__ import annotations

import math
import statistics

from ftbench.harness.analysis.series import SHIFT, TRANSIENT, Event, Series, SetInfo, log_level, verdict_of

PENALTY = 3.0
#: Standard errors a kept shift must span.
Z = 3.0
#: Below this many points no level can be told from noise.
MIN_POINTS = 3


def noise(levels: list[float], per_set: list[list[float]]) -> float:
    """The series' noise in level units (log ratio for positive figures)."""
    within = 0.0
    groups = [v for v in per_set if len(v) >= 2]
    if groups:  # pooled standard deviation of the repeats around their set's mean
        ss = sum(sum((x - statistics.mean(v)) ** 2 for x in v) for v in groups)
        within = math.sqrt(ss / sum(len(v) - 1 for v in groups))
    # Runs minutes apart differ more than the repeats of one run: a robust estimate from
    # consecutive differences (a step moves one of them; their median ignores it).
    diffs = [abs(b - a) for a, b in zip(levels, levels[1:])]
    between = statistics.median(diffs) / (0.6745 * math.sqrt(2)) if diffs else 0.0
    return max(within, between, 1e-6)


def _segments(bkps: list[int], n: int) -> list[tuple[int, int]]:
    edges = [0, *bkps, n]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a]


def _change(before: list[float], after: list[float], logged: bool) -> float:
    a, b = statistics.mean(before), statistics.mean(after)
    if logged:
        return math.exp(b - a) - 1
    return (b - a) / abs(a) if a else math.copysign(math.inf, b - a)


def _strength(levels: list[float], before: tuple, after: tuple, threshold: float, sigma: float,
              logged: bool) -> float:
    """How far a shift clears both bars (>= 1 clears them): the threshold and Z standard errors."""
    (a, b), (_, c) = before, after
    rel = abs(_change(levels[a:b], levels[b:c], logged)) / threshold if threshold else math.inf
    diff = abs(statistics.mean(levels[b:c]) - statistics.mean(levels[a:b]))
    z = diff / (Z * sigma * math.sqrt(1 / (b - a) + 1 / (c - b)))
    return min(rel, z)


def _prune(levels: list[float], bkps: list[int], threshold: float, sigma: float, logged: bool) -> list[int]:
    """Drop breakpoints that do not clear the threshold and the noise, weakest first."""
    bkps = sorted(set(bkps))
    while bkps:
        segs = _segments(bkps, len(levels))
        strengths = [_strength(levels, s0, s1, threshold, sigma, logged) for s0, s1 in zip(segs, segs[1:])]
        weakest = min(range(len(strengths)), key=strengths.__getitem__)
        if strengths[weakest] >= 1:
            break
        bkps.pop(weakest)
    return bkps


def detect(series: Series, sets: list[SetInfo], threshold: float) -> tuple[list[Event], str]:
    """The changes of ``series`` (and a note when none could be sought).

    Example: medians 100, 101, 99, 60, 61 -> one ``shift`` event at the
    fourth set, change -40%, verdict ``regression`` (for a higher-is-better figure).
    """
    import numpy as np
    import ruptures

    pts = series.points
    if len(pts) < MIN_POINTS:
        return [], f"{len(pts)} point(s): too few to find a change"
    medians = [p.median for p in pts]
    logged = all(v > 0 for v in medians) and all(v > 0 for p in pts for v in p.values)
    levels = log_level(medians) if logged else medians
    per_set = [log_level(p.values) if logged else p.values for p in pts]
    sigma = noise(levels, per_set)
    algo = ruptures.Pelt(model="l2", min_size=1, jump=1).fit(np.asarray(levels).reshape(-1, 1))
    proposed = [b for b in algo.predict(pen=PENALTY * sigma ** 2 * math.log(len(levels))) if b < len(levels)]
    bkps = _prune(levels, proposed, threshold, sigma, logged)
    return _events(series, sets, levels, bkps, threshold, logged), ""


def _events(series: Series, sets: list[SetInfo], levels: list[float], bkps: list[int], threshold: float,
            logged: bool) -> list[Event]:
    by_pos = {s.position: s for s in sets}
    pts = series.points
    segs = _segments(bkps, len(levels))
    events, skip = [], False
    for k in range(1, len(segs)):
        if skip:
            skip = False
            continue
        (a, b), (_, c) = segs[k - 1], segs[k]
        nxt = segs[k + 1] if k + 1 < len(segs) else None
        kind = SHIFT
        change = _change(levels[a:b], levels[b:c], logged)
        if nxt and c - b == 1 and abs(_change(levels[a:b], levels[nxt[0]:nxt[1]], logged)) < threshold:
            kind, skip = TRANSIENT, True  # one set off the level of both neighbours, which agree
        here, before = by_pos[pts[b].position], by_pos[pts[b - 1].position]
        events.append(Event(position=pts[b].position, set_name=here.name, commit_before=before.commit,
                            commit_after=here.commit, change=change, kind=kind,
                            verdict=verdict_of(change, series.higher_is_better)))
    return events
