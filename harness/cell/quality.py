"""Quality during training: evaluation every N steps, and time to a target.

The evaluation runs between steps, outside the step clock, so it never
changes a measured step time.  Each point of the curve keeps the step, the
training seconds so far (every step's measured time, warmup and compilation
included, evaluation excluded: what MLPerf Training counts as time to
train), the wall seconds since training began (evaluations included) and
the metrics.

Example::

    tracker = QualityTracker(every=10, target="perplexity=20", higher_is_better=False,
                             evaluate=lambda: {"perplexity": 18.0, "eval_loss": 2.9})
    stop = tracker.after_step(10, step_times)   # evaluates; True only with stop_at_target
"""

from __future__ import annotations

from typing import Callable

from ftbench.harness.cell.measure import now
from ftbench.harness.contract.targets import parse_target

#: With a target but no --eval-every, evaluate this many times over the run.
DEFAULT_EVALS = 10


def evaluation_interval(eval_every: int, target: str | None, steps: int) -> int:
    """Steps between evaluations: the cell's setting, else enough to find a target, else none."""
    if eval_every:
        return eval_every
    return max(1, steps // DEFAULT_EVALS) if target else 0


class QualityTracker:
    """Evaluates every ``every`` steps and watches for the target."""

    def __init__(self, every: int, target: str | None, metric_directions: dict[str, bool],
                 evaluate: Callable[[], dict], stop_at_target: bool = False, warmup: int = 0,
                 agree: Callable[[bool], bool] = lambda x: x):
        self.every = every
        self.target = parse_target(target) if target else None
        self.higher = metric_directions.get(self.target.metric, False) if self.target else False
        self.evaluate = evaluate
        self.stop_at_target = stop_at_target
        self.warmup = warmup
        self.agree = agree  # all ranks take the same decision (rank 0's)
        self.curve: list[dict] = []
        self.eval_s = 0.0
        self.reached_at: dict | None = None
        self.t_start = now()
        self.last_metrics: dict | None = None

    def after_step(self, step: int, times: list[float]) -> bool:
        """Called after optimizer step ``step`` (1-based); True to end training here."""
        if not self.every or step % self.every:
            return False
        self.record(step, times)
        # Stop only once some steps are measured, so the cell still has a steady-state figure.
        return self.agree(self.stop_at_target and self.reached_at is not None and step > self.warmup)

    def record(self, step: int, times: list[float]) -> dict:
        wall = now() - self.t_start
        t0 = now()
        metrics = self.evaluate()
        self.eval_s += now() - t0
        point = {"step": step, "train_s": float(sum(times[:step])), "wall_s": wall, "eval_loss": metrics.get("eval_loss"),
                 "metric_value": metrics.get(self.target.metric) if self.target else None, "metrics": metrics}
        self.curve.append(point)
        self.last_metrics = metrics
        if self.target and self.reached_at is None and \
                self.target.reached(metrics.get(self.target.metric), self.higher):
            self.reached_at = point
        return point

    def final(self, step: int, times: list[float], metrics: dict) -> None:
        """The evaluation after training joins the curve (it is the last point)."""
        if self.curve and self.curve[-1]["step"] == step:
            return
        saved = self.evaluate, self.eval_s
        self.evaluate = lambda: metrics
        self.record(step, times)
        self.evaluate, self.eval_s = saved[0], saved[1]  # that evaluation is the cell's eval_s, not this one's

    def figures(self) -> dict:
        """The record's time-to-quality keys."""
        out = {"eval_curve": self.curve, "eval_every": self.every, "eval_during_training_s": self.eval_s}
        if self.target:
            hit = self.reached_at
            out.update(target={"metric": self.target.metric, "value": self.target.value,
                               "higher_is_better": self.higher, "text": self.target.text()},
                       target_reached=hit is not None, steps_to_target=hit["step"] if hit else None,
                       time_to_target_s=hit["train_s"] if hit else None)
        return out
