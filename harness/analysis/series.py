"""The values a history follows: result sets, points, series and the changes found in them.

Shared by :mod:`ftbench.harness.analysis.history`, which builds them from
result sets, and :mod:`ftbench.harness.analysis.changepoints`, which finds
their changes.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ftbench.harness.analysis.compare import IMPROVEMENT, REGRESSION

SHIFT, TRANSIENT = "shift", "transient"


@dataclass
class SetInfo:
    """One result set in the history."""

    path: Path
    name: str
    started_at: str
    commit: str | None
    machine: dict
    records: list[dict]
    position: int = 0
    included: bool = True


@dataclass
class Point:
    position: int          # index of the set among the included sets
    values: list[float]    # one per repeat

    @property
    def median(self) -> float:
        return statistics.median(self.values)


@dataclass
class Event:
    """A change in a series: where it began, by how much, and which way."""

    position: int
    set_name: str
    commit_before: str | None
    commit_after: str | None
    change: float
    kind: str
    verdict: str


@dataclass
class Series:
    cell_id: str
    cell: str
    task: str
    figure: str
    unit: str
    higher_is_better: bool
    points: list[Point] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    note: str = ""

    @property
    def newest_regression(self) -> Event | None:
        """The change the newest point belongs to, when it made the figure worse."""
        if not self.events or not self.points:
            return None
        last = self.events[-1]
        if last.verdict == REGRESSION and (last.kind == SHIFT or last.position == self.points[-1].position):
            return last
        return None


def verdict_of(change: float, higher_is_better: bool) -> str:
    worse = change < 0 if higher_is_better else change > 0
    return REGRESSION if worse else IMPROVEMENT


def log_level(values: list[float]) -> list[float]:
    """Log of positive figures (ratios become differences); raw values otherwise."""
    if all(v > 0 for v in values):
        return [math.log(v) for v in values]
    return list(values)
