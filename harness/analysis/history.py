"""``ftbench history SET... | DIR``: figures of many result sets over time, and where they changed.

Result sets (a nightly or per-commit series) are ordered by the time they
were measured (the earliest ``started_at`` of their records) and carry their
``git_commit``.  For every cell and figure (speed, peak memory, the primary
metric) the series is the per-set median of the repeats.  Change points are
found by :mod:`ruptures` (PELT, least-squares cost on the log of the
medians, penalty scaled by the series' noise) and kept only when the level
moves by at least the figure's threshold (the same thresholds as
``compare``).  A single set off the level of both its neighbours is a
*transient*, reported at that set alone.  Each change names the set where it
began and the commit range ``previous set's commit .. this set's commit``.

Sets from another machine than most of them are left out (and named); cells
that some sets lack simply have fewer points.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.analysis.calibration import machine_view, read_calibration
from ftbench.harness.analysis.compare import DEFAULT_THRESHOLDS
from ftbench.harness.analysis.resultset import (ResultSet, as_float, environment_diff, load_result_set,
                                                variant_labels)
from ftbench.harness.results.store import RESULTS_FILE, describe_versions
from ftbench.harness.analysis.changepoints import detect
from ftbench.harness.analysis.series import Point, Series, SetInfo

#: Figures followed over time: (figure, record key, higher is better, unit).
FIGURES = (("speed", "tokens_per_s", True, "tok/s"), ("peak_memory_bytes", "peak_memory_bytes", False, "bytes"))


@dataclass
class History:
    """Every series of a history and what was left out.

    Example::

        h = build_history(["runs/nightly"])
        [s.cell for s in h.series if s.newest_regression]
    """

    sets: list[SetInfo]
    series: list[Series]
    warnings: list[str] = field(default_factory=list)
    thresholds: dict = field(default_factory=dict)
    #: What was read: ``"3 result set(s), 36 record(s) of schema version 1"``.
    read: str = ""

    @property
    def included(self) -> list[SetInfo]:
        return [s for s in self.sets if s.included]

    @property
    def regressions(self) -> list[Series]:
        return [s for s in self.series if s.newest_regression]


# ------------------------------------------------------------------ loading


def find_sets(paths: list[str | os.PathLike]) -> list[Path]:
    """Result sets named directly, or found under the directories given."""
    found: list[Path] = []
    for p in map(Path, paths):
        if (p / RESULTS_FILE).exists():
            hits = [p]
        elif p.is_dir():
            hits = sorted(f.parent for f in p.rglob(RESULTS_FILE))
        else:
            raise FtbenchError(f"{p} is neither a result set nor a directory of result sets; pass result set "
                               "directories (each holding results.jsonl) or a directory above them")
        if not hits:
            raise FtbenchError(f"no result set under {p}: no results.jsonl found; pass the directories that "
                               "'ftbench run --out' wrote")
        found += [h for h in hits if h not in found]
    return found


def _set_info(path: Path, rs: ResultSet) -> SetInfo | None:
    if not rs.records:
        return None
    starts = sorted(str(r.get("started_at")) for r in rs.records if r.get("started_at"))
    envs = [r.get("environment") or {} for r in rs.records]
    commit = Counter(e.get("git_commit") for e in envs).most_common(1)[0][0]
    machine = Counter(repr(machine_view(e)) for e in envs).most_common(1)[0][0]
    return SetInfo(path=path, name=path.name, started_at=starts[0] if starts else "", commit=commit,
                   machine=next(machine_view(e) for e in envs if repr(machine_view(e)) == machine),
                   records=rs.records)


def load_sets(paths, versions: Counter | None = None) -> tuple[list[SetInfo], list[str]]:
    """The sets in measurement order, with the majority machine's sets included; ``versions`` counts the
    schema versions of the records read."""
    sets, warnings = [], []
    for p in find_sets(paths):
        rs = load_result_set(p)
        warnings += rs.problems
        if versions is not None:
            versions.update(rs.versions)
        info = _set_info(p, rs)
        if info is None:
            warnings.append(f"{p} has no readable records; left out")
        else:
            sets.append(info)
    if len(sets) < 2:
        raise FtbenchError(f"history needs at least two result sets with records, found {len(sets)}; pass more "
                           "sets or a directory holding them")
    sets.sort(key=lambda s: (s.started_at, str(s.path)))
    names = Counter(s.name for s in sets)
    for s in sets:
        if names[s.name] > 1:
            s.name = str(s.path)
    counts = Counter(repr(s.machine) for s in sets)
    main = max(counts, key=lambda m: (counts[m], max(i for i, s in enumerate(sets) if repr(s.machine) == m)))
    reference = next(s.machine for s in sets if repr(s.machine) == main)
    for s in sets:
        if repr(s.machine) != main:
            s.included = False
            warnings.append(f"{s.name} was measured on another machine ({'; '.join(environment_diff(reference, s.machine))}); "
                            "left out of the series, whose speed and memory it cannot share")
    for i, s in enumerate(x for x in sets if x.included):
        s.position = i
    return sets, warnings


# ------------------------------------------------------------------- series


def _grid_warnings(sets: list[SetInfo], labels: dict) -> list[str]:
    every = {r["cell_id"] for s in sets for r in s.records}
    out = []
    for s in sets:
        missing = every - {r["cell_id"] for r in s.records}
        if missing:
            names = ", ".join(sorted(labels.get(c, c) for c in missing))
            out.append(f"{s.name} has no record of {len(missing)} of the {len(every)} cells ({names}); their series "
                       "skip it (the grids differ)")
    return out


def build_series(sets: list[SetInfo]) -> list[Series]:
    labels = variant_labels([r for s in sets for r in s.records])
    series: dict[tuple, Series] = {}
    for s in sets:
        for r in s.records:
            if r.get("status") != "ok":
                continue
            label = labels.get(r["cell_id"], r["cell_id"])
            figures = list(FIGURES)
            if r.get("metric"):
                figures.append((str(r["metric"]), "metric_value", bool(r.get("higher_is_better")), ""))
            for figure, key, hib, unit in figures:
                v = as_float(r.get(key))
                if v is None:
                    continue
                sr = series.setdefault((r["cell_id"], figure), Series(r["cell_id"], label, str(r.get("task")),
                                                                      figure, unit, hib))
                if not sr.points or sr.points[-1].position != s.position:
                    sr.points.append(Point(s.position, []))
                sr.points[-1].values.append(v)
    return list(series.values())


def build_history(paths, thresholds: dict | None = None, calibration: str | None = None) -> History:
    """Load, order and analyse the result sets under ``paths``.

    ``calibration`` (a ``compare --calibrate`` file) must come from the machine
    of the included sets; ``thresholds`` override single figures.

    Example: ``build_history(["runs/nightly"], {"speed": 0.15}).regressions``.
    """

    versions: Counter = Counter()
    sets, warnings = load_sets(paths, versions)
    included = [s for s in sets if s.included]
    calibrated = read_calibration(calibration, included) if calibration else {}
    th = {**DEFAULT_THRESHOLDS, **calibrated, **(thresholds or {})}
    labels = variant_labels([r for s in included for r in s.records])
    warnings += _grid_warnings(included, labels)
    series = build_series(included)
    for sr in series:
        threshold = th.get(sr.figure, th["metric"])
        sr.events, sr.note = detect(sr, included, threshold)
    read = f"{len(sets)} result set(s), {sum(versions.values())} record(s) of {describe_versions(versions)}"
    return History(sets=sets, series=series, warnings=warnings, thresholds=th, read=read)


