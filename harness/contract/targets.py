"""Quality targets: ``--target perplexity=20``, ``accuracy>=0.85``, ``eval_loss<=1.5``.

A target names one of the task's metrics (:meth:`ftbench.Task.metric_directions`)
and a value.  ``=`` takes the direction from the metric (reached when the
value is at least as good); ``>=`` and ``<=`` spell it out, and must agree
with the metric's direction: ``perplexity>=20`` asks for a worse model, which
is a mistake, not a target.  A command-line target may name its task
(``classification:accuracy=0.85``); without one it applies to every task of
the grid that reports that metric.

Example::

    t = parse_target("perplexity=20")
    t.reached(19.5, higher_is_better=False)   # True
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ftbench.harness.contract.api import FtbenchError

_FORM = re.compile(r"^\s*(?:(?P<task>[\w.-]+):)?(?P<metric>[\w.-]+)\s*(?P<op>>=|<=|=)\s*(?P<value>\S+)\s*$")
#: Metrics whose values cannot go past a bound, and the bound: a target beyond it can never be reached.
_BOUNDS = {"accuracy": (0.0, 1.0), "macro_f1": (0.0, 1.0), "roc_auc": (0.0, 1.0), "perplexity": (1.0, math.inf),
           "eval_loss": (0.0, math.inf), "bleu": (0.0, 100.0), "chrf": (0.0, 100.0), "rouge1": (0.0, 1.0),
           "rouge2": (0.0, 1.0), "rougeL": (0.0, 1.0)}


@dataclass(frozen=True)
class Target:
    """A metric and the value that counts as reached."""

    metric: str
    value: float
    op: str = "="
    task: str | None = None

    def reached(self, value: float | None, higher_is_better: bool) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value >= self.value if higher_is_better else value <= self.value

    def text(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_target(text: str) -> Target:
    m = _FORM.match(str(text))
    if not m:
        raise FtbenchError(f"malformed target {text!r}: write METRIC=VALUE (e.g. --target perplexity=20 or "
                           "--target accuracy>=0.85), optionally after the task: classification:accuracy=0.85")
    try:
        value = float(m["value"])
    except ValueError:
        raise FtbenchError(f"target {text!r}: {m['value']!r} is not a number (e.g. perplexity=20)") from None
    if not math.isfinite(value):
        raise FtbenchError(f"target {text!r}: the value must be a finite number")
    return Target(metric=m["metric"], value=value, op=m["op"], task=m["task"])


def target_for_task(targets: list[str], task) -> str | None:
    """The one target of ``targets`` that applies to ``task``, checked; None when none applies."""
    chosen = None
    for text in targets:
        t = parse_target(text)
        if t.task not in (None, task.name) or (t.task is None and t.metric not in task.metric_directions()):
            continue
        check_target(t, task)
        if chosen is not None and chosen.task == t.task:
            raise FtbenchError(f"two targets apply to task {task.name!r} ({chosen.text()} and {t.text()}); "
                               f"give each task one, e.g. --target {task.name}:{t.text()}")
        if chosen is None or t.task is not None:
            chosen = t
    return chosen.text() if chosen else None


def check_target(t: Target, task) -> None:
    """Refuse a target the task can never report or never reach, naming the fix."""
    directions = task.metric_directions()
    if t.metric not in directions:
        raise FtbenchError(f"target {t.text()}: task {task.name!r} has no metric {t.metric!r}; it reports "
                           f"{', '.join(sorted(directions))}")
    higher = directions[t.metric]
    if t.op != "=" and (t.op == ">=") != higher:
        better = "higher" if higher else "lower"
        raise FtbenchError(f"target {t.metric}{t.op}{t.value:g} points the wrong way: {better} {t.metric} is "
                           f"better, so write {t.metric}{'>=' if higher else '<='}{t.value:g} "
                           f"(or {t.metric}={t.value:g})")
    lo, hi = _BOUNDS.get(t.metric, (-math.inf, math.inf))
    if (higher and t.value > hi) or (not higher and t.value < lo):
        raise FtbenchError(f"target {t.text()} can never be reached: {t.metric} is never "
                           f"{'above' if higher else 'below'} {hi if higher else lo:g}")


def check_grid_targets(targets: list[str], tasks) -> None:
    """Every command-line target must apply to at least one task of the grid."""
    for text in targets:
        t = parse_target(text)
        hits = [task for task in tasks if t.task in (None, task.name)
                and (t.task is not None or t.metric in task.metric_directions())]
        if not hits:
            names = ", ".join(f"{task.name} ({', '.join(sorted(task.metric_directions()))})" for task in tasks)
            raise FtbenchError(f"target {text!r} applies to no task of the grid; the tasks and their metrics: "
                               f"{names}")
        for task in hits:
            check_target(t, task)
