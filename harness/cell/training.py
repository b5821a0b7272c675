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


class Diverged(Exception):
    """A non-finite loss; ``partial`` keeps what the cell measured until then."""

    def __init__(self, step: int, value: float, partial: dict):
        super().__init__(f"loss became {value} at step {step}")
        self.step = step
        self.partial = partial


@dataclass
class TrainingRun:
    """Per-step wall times (seconds) and global losses of one training run."""

    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)


def train(engine, steps, device, world_size: int, partial: dict | None = None,
          after_step: Callable[[int, list[float]], bool] | None = None) -> TrainingRun:
    """Run every step of ``steps`` (``[(micro_batches, global_counts)]``) through ``engine``.

    ``after_step(n, times)`` runs after optimizer step ``n`` (1-based),
    outside the step's clock (evaluation during training); True ends training.
    """
    run = TrainingRun()
    pending = []  # device tensors, read back in chunks so the loop adds no host copies
    check_every = int(os.environ.get("FTBENCH_CHECK_EVERY", "10"))
    last = len(steps) - 1
    for step, (micro, _) in enumerate(steps):
        t0 = now()
        step_loss = None
        for i, mb in enumerate(micro):
            loss = engine.forward_backward(mb, boundary=i == len(micro) - 1)
            step_loss = loss if step_loss is None else step_loss + loss
        engine.step()
        synchronize(device)
        run.times.append(now() - t0)
        pending.append(step_loss)
        stop = after_step is not None and after_step(step + 1, run.times)
        if (step + 1) % check_every == 0 or step == last or stop:
            _check_finite(run, pending, world_size, partial or {})
            pending = []
        if stop:
            break
    return run


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


def summarize(run: TrainingRun, steps, warmup: int, compiles: bool) -> dict:
    """Steady-state figures: warmup steps excluded; tokens of the measured
    steps divided by the time of those same steps (the steps that ran, when
    training ended early at its target)."""
    measured, counts = run.times[warmup:], [c for _, c in steps[warmup:len(run.times)]]
    stats = step_stats(measured)
    return dict(
        train_loss=run.losses,
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
