"""The batch plan: which examples each optimizer step and micro-batch uses.

The plan depends only on the recipe (global batch, steps, seed) and the
number of training examples, so every backend and world size sees the same
data in the same order; a rank takes its contiguous slice of each global
batch.  The plan holds only indices; each step's micro-batches are collated
(and, on CUDA, page-locked) when the loop asks for them, *before* that
step's clock starts, so the timed part does no host-side data work and
memory does not grow with ``--steps`` (:class:`StepStream`).  The plan
itself is computed step by step as it is read (:class:`BatchPlan`), so its
setup cost and memory are flat in ``--steps`` and in the batch size.

Example::

    plan = batch_plan(len(train), recipe, world_size=2, rank=0, seed=recipe.seed)
    global_indices, my_micro_batches = plan[0]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Callable

import numpy as np


class BatchPlan(Sequence):
    """``plan[step]`` is ``(global_indices, my_micro_batches)``, computed when read.

    The data order is one stream: a seeded permutation of the training
    rows, then another, and so on; step ``k`` takes positions ``k*g`` to
    ``(k+1)*g`` of it (``g`` the global batch), and each rank its contiguous
    slice.  Only the permutation being read is kept (O(rows), whatever the
    steps); reading the steps in order draws each permutation once, and a
    step behind the kept one replays the stream from the seed.

    Example: ``BatchPlan(100, Recipe(steps=10**6, batch_size=8), 2, 0, 0)[999_999]``
    costs what ``[0]`` does, once the permutations before it are drawn.
    """

    def __init__(self, n_train: int, recipe, world_size: int, rank: int, seed: int):
        self.n, self.g, self.steps, self.accum = n_train, recipe.batch_size, recipe.steps, recipe.grad_accum
        self.world, self.rank, self.seed = world_size, rank, seed
        self.micro = recipe.micro_batch(world_size)
        self._restart()

    def _restart(self) -> None:
        self._rng = np.random.default_rng(self.seed)
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int):
        if epoch < self._epoch:
            self._restart()
        while self._epoch < epoch:
            self._perm = self._rng.permutation(self.n)
            self._epoch += 1
        return self._perm

    def global_indices(self, step: int) -> list[int]:
        """The example indices of step ``step``'s global batch, in order."""
        out: list[int] = []
        position = step * self.g
        while len(out) < self.g:
            epoch, offset = divmod(position + len(out), self.n)
            out += self._permutation(epoch)[offset:offset + self.g - len(out)].tolist()
        return out

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step):
        if isinstance(step, slice):
            return [self[i] for i in range(*step.indices(self.steps))]
        if step < 0:
            step += self.steps
        if not 0 <= step < self.steps:
            raise IndexError(step)
        global_idx = self.global_indices(step)
        g, w = self.g, self.world
        mine = global_idx[self.rank * g // w:(self.rank + 1) * g // w]
        return global_idx, [mine[i * self.micro:(i + 1) * self.micro] for i in range(self.accum)]

    def __eq__(self, other) -> bool:
        # Equal to the list of its steps (what the plan was before it became lazy): tests compare plans.
        return isinstance(other, (Sequence, list)) and len(self) == len(other) and list(self) == list(other)

    __hash__ = None

    def first_use(self) -> list[int]:
        """Every row the plan draws, once, in the order first drawn.

        The stream begins with a whole permutation, so the rows first drawn
        are its first ``steps * g`` entries (all of it when the run is longer
        than one pass): no step needs to be walked.
        """
        used = min(self.steps * self.g, self.n)
        return self._permutation(0)[:used].tolist()


def batch_plan(n_train: int, recipe, world_size: int, rank: int, seed: int) -> BatchPlan:
    """For each optimizer step: the example indices of the global batch and of
    this rank's micro-batches.  Identical for every backend and world size."""
    return BatchPlan(n_train, recipe, world_size, rank, seed)


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
