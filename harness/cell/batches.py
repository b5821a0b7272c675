"""The batch plan: which examples each optimizer step and micro-batch uses.

The plan depends only on the recipe (global batch, steps, seed) and the
number of training examples, so every backend and world size sees the same
data in the same order; a rank takes its contiguous slice of each global
batch.  The plan holds only indices; each step's micro-batches are collated
(and, on CUDA, page-locked) when the loop asks for them, *before* that
step's clock starts, so the timed part does no host-side data work and
memory does not grow with ``--steps`` (:class:`StepStream`).

Example::

    plan = batch_plan(len(train), recipe, world_size=2, rank=0, seed=recipe.seed)
    global_indices, my_micro_batches = plan[0]
"""

from __future__ import annotations

from typing import Callable


def batch_plan(n_train: int, recipe, world_size: int, rank: int, seed: int):
    """For each optimizer step: the example indices of the global batch and of
    this rank's micro-batches.  Identical for every backend and world size."""
    import numpy as np

    g = recipe.batch_size
    micro = recipe.micro_batch(world_size)
    rng = np.random.default_rng(seed)
    # A numpy buffer sliced by views: memory and time stay O(n_train) int64s,
    # not a Python list of n_train ints copied at every step.
    order = np.empty(0, dtype=np.int64)
    plan = []
    for _ in range(recipe.steps):
        while len(order) < g:
            order = np.concatenate([order, rng.permutation(n_train)])
        global_idx, order = order[:g].tolist(), order[g:]
        mine = global_idx[rank * g // world_size:(rank + 1) * g // world_size]
        plan.append((global_idx, [mine[i * micro:(i + 1) * micro] for i in range(recipe.grad_accum)]))
    return plan


class StepStream:
    """The run's steps, collated one at a time: ``for micro, counts in stream``.

    Each micro-batch carries its ``loss_scale`` = 1 / (loss-bearing units of
    the whole *global* step), so that summing over micro-batches and ranks
    gives the global mean loss however the batch is split.  Only small
    per-step figures are kept (``counts``: the global step's token counts;
    ``shapes``: this rank's micro-batch shapes, for FLOPs), never a batch.

    Example::

        stream = StepStream(plan, lambda ix: make_batch(ix, rows), world_size=1, pin=False)
        for micro, counts in stream: ...
        stream.counts[5]["nonpad"]
    """

    def __init__(self, plan, make_batch: Callable[[list[int]], dict], world_size: int, pin: bool):
        self.plan, self.make_batch, self.world_size, self.pin = plan, make_batch, world_size, pin
        self.counts: list[dict] = []
        self.shapes: list[list[tuple[int, int, int]]] = []

    def __len__(self) -> int:
        return len(self.plan)

    def __iter__(self):
        for step in range(len(self.plan)):
            yield self.step(step)

    def step(self, step: int):
        """Step ``step``'s ``(micro_batches, global_counts)``, collated now."""
        global_idx, micro_idx = self.plan[step]
        micro = [self.make_batch(ix) for ix in micro_idx]
        global_counts = self.make_batch(global_idx)["counts"] if self.world_size > 1 else sum_counts(micro)
        for mb in micro:
            mb["loss_scale"] = 1.0 / max(1, global_counts["loss"])
            mb.pop("counts")
        if self.pin:
            _pin(micro)
        if step == len(self.counts):  # first visit: keep the step's figures
            self.counts.append(global_counts)
            self.shapes.append([_shape(mb) for mb in micro])
        return micro, global_counts


def collate_steps(plan, make_batch: Callable[[list[int]], dict], world_size: int, pin: bool):
    """Every step, collated up front (small runs and tests only: memory grows with the steps)."""
    stream = StepStream(plan, make_batch, world_size, pin)
    return [stream.step(i) for i in range(len(plan))]


def _shape(mb: dict) -> tuple[int, int, int]:
    return (mb["input_ids"].shape[0], mb["input_ids"].shape[1],
            mb["labels"].shape[1] if "decoder_input_ids" in mb else 0)


def _pin(micro) -> None:
    # Page-locked batches let the host-to-device copies run asynchronously
    # (``non_blocking``) instead of staging through pageable memory.
    import torch

    for mb in micro:
        for k, v in mb.items():
            if torch.is_tensor(v):
                mb[k] = v.pin_memory()


def sum_counts(micro: list[dict]) -> dict:
    keys = ("padded", "nonpad", "loss", "samples")
    return {k: sum(mb["counts"][k] for mb in micro) for k in keys}


def step_flops(shapes, flops_of) -> list[float]:
    """FLOPs of this rank's micro-batches per step, from the shapes :class:`StepStream` kept."""
    return [sum(flops_of(shape) for shape in step) for step in shapes]


def pad_fraction(counts: list[dict]) -> float | None:
    """Share of the training tokens that are padding, over every step of the run."""
    padded = sum(c["padded"] for c in counts)
    return 1.0 - sum(c["nonpad"] for c in counts) / padded if padded else None
