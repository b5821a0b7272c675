"""The timed training loop: the runner's clock around the engine's steps.

The engine runs each micro-batch and the optimizer step; this loop owns the
clock (device synchronised before each reading), keeps every step's time and
loss, and checks for divergence every few steps without adding a host copy
to each step.

Example::

    run = train(engine, steps, device, world_size=1)
    run.times, run.losses
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

from ftbench.harness.cell.measure import now, step_stats, synchronize, throughput
from ftbench.harness.contract.api import StepClock
from ftbench.harness.contract.engine import rows_fingerprint


class Diverged(Exception):
    """A non-finite loss; ``partial`` keeps what the cell measured until then."""

    def __init__(self, step: int, value: float, partial: dict):
        super().__init__(f"loss became {value} at step {step}")
        self.step = step
        self.partial = partial


@dataclass
class TrainingRun:
    """Per-step wall times (seconds), global losses and learning rates of one training run, and a
    fingerprint of each step's rows on this rank (the fairness check's data order)."""

    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    lrs: list[float | None] = field(default_factory=list)
    row_sums: list[int] = field(default_factory=list)


class RunnerClock(StepClock):
    """The runner's :class:`StepClock`: the device synchronised before every reading, each step's
    time, loss and learning rate kept, divergence checked every few steps, ``after_step`` asked
    (outside the clock) whether to stop."""

    def __init__(self, device, world_size: int, partial: dict, n_steps: int, after_step=None):
        self.run = TrainingRun()
        self.device, self.world_size, self.partial, self.last = device, world_size, partial, n_steps - 1
        self.after_step = after_step
        self.pending: list = []  # device tensors, read back in chunks so the loop adds no host copies
        self.check_every = int(os.environ.get("FTBENCH_CHECK_EVERY", "10"))
        self.t0: float | None = None

    def begin(self) -> None:
        synchronize(self.device)
        self.t0 = now()

    def end(self, loss, lr: float | None = None) -> bool:
        synchronize(self.device)
        t = now()
        run = self.run
        run.times.append(t - self.t0)
        run.lrs.append(lr)
        self.pending.append(loss)
        step = len(run.times) - 1
        stop = self.after_step is not None and self.after_step(step + 1, run.times)
        if (step + 1) % self.check_every == 0 or step == self.last or stop:
            _check_finite(run, self.pending, self.world_size, self.partial)
            self.pending = []
        # A loop that goes straight on to its next step is timed end to end; begin() restarts the clock.
        self.t0 = now()
        return stop


def digested(steps, sink: TrainingRun):
    """``steps``, passed through, with ``sink.row_sums`` growing by each step's
    :func:`rows_fingerprint` (this rank's rows, as handed out)."""
    for micro, counts in steps:
        sink.row_sums.append(sum(rows_fingerprint(mb) for mb in micro) % 2**64)
        yield micro, counts


def train(engine, steps, device, world_size: int, partial: dict | None = None,
          after_step: Callable[[int, list[float]], bool] | None = None) -> TrainingRun:
    """Run every step of ``steps`` (``[(micro_batches, global_counts)]``) through ``engine``.

    ``after_step(n, times)`` runs after optimizer step ``n`` (1-based),
    outside the step's clock (evaluation during training); True ends training.
    An engine that owns its loop (``Engine.owns_loop``) gets the steps and this
    clock through ``Engine.run_loop``; every other engine is driven here.
    """
    clock = RunnerClock(device, world_size, partial or {}, len(steps), after_step)
    # Iterating collates the step's batches: before its clock starts.
    stream = digested(steps, clock.run)
    if getattr(engine, "owns_loop", False):
        engine.run_loop(stream, clock)
        if clock.pending:
            _check_finite(clock.run, clock.pending, world_size, partial or {})
        return clock.run
    for micro, _ in stream:
        lr = engine.current_lr()
        clock.begin()
        step_loss = None
        for i, mb in enumerate(micro):
            loss = engine.forward_backward(mb, boundary=i == len(micro) - 1)
            step_loss = loss if step_loss is None else step_loss + loss
        engine.step()
        if clock.end(step_loss, lr):
            break
    return clock.run


def _check_finite(run: TrainingRun, pending, world_size: int, partial: dict) -> None:
    checked = len(run.losses)
    run.losses.extend(global_losses(pending, world_size))
    bad = next((i for i in range(checked, len(run.losses)) if not math.isfinite(run.losses[i])), None)
    if bad is not None:
        raise Diverged(bad, run.losses[bad], {**partial, "train_loss": run.losses[: bad + 1],
                                              "step_times_s": run.times})


def global_losses(chunk, world_size: int) -> list[float]:
    """Per-step global losses: this rank's contributions summed over ranks."""
    import torch

    if not chunk:
        return []
    stacked = torch.stack([c.float() for c in chunk])
    if world_size > 1:
        if stacked.device.type == "cpu" and torch.distributed.get_backend() == "nccl":
            stacked = stacked.cuda()
        torch.distributed.all_reduce(stacked)
    return [float(v) for v in stacked.cpu().tolist()]


def summarize(run: TrainingRun, step_counts: list[dict], warmup: int, compiles: bool) -> dict:
    """Steady-state figures: warmup steps excluded; tokens of the measured
    steps (``step_counts``: each step's global token counts, as many as
    steps ran) divided by the time of those same steps (the steps that ran,
    when training ended early at its target)."""
    measured, counts = run.times[warmup:], step_counts[warmup:len(run.times)]
    stats = step_stats(measured)
    return dict(
        train_loss=run.losses,
        lr_per_step=run.lrs,
        step_times_s=run.times,
        step_time=stats,
        tokens_per_s=throughput(counts, measured, "nonpad"),
        padded_tokens_per_s=throughput(counts, measured, "padded"),
        loss_tokens_per_s=throughput(counts, measured, "loss"),
        samples_per_s=throughput(counts, measured, "samples"),
        tokens={k: sum(c[k] for c in counts) for k in ("padded", "nonpad", "loss", "samples")},
        # Compilation shows as warmup steps slower than the steady state.
        compile_s=(sum(run.times[:warmup]) - warmup * stats["median"]) if compiles and warmup else None,
    )
