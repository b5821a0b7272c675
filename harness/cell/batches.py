"""The batch plan: which examples each optimizer step and micro-batch uses.

The plan depends only on the recipe (global batch, steps, seed) and the
number of training examples, so every backend and world size sees the same
data in the same order; a rank takes its contiguous slice of each global
batch.  Every micro-batch is collated before training starts so that the
timed loop does no host-side data work.

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
    micro = g // (world_size * recipe.grad_accum)
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


def collate_steps(plan, make_batch: Callable[[list[int]], dict], world_size: int, pin: bool):
    """Every step's micro-batches, collated, each with its ``loss_scale``.

    ``loss_scale`` is 1 / (loss-bearing units of the whole *global* step), so
    that summing over micro-batches and ranks gives the global mean loss
    however the batch is split.  Returns ``[(micro_batches, global_counts)]``.
    """
    steps = []
    for global_idx, micro_idx in plan:
        micro = [make_batch(ix) for ix in micro_idx]
        global_counts = make_batch(global_idx)["counts"] if world_size > 1 else sum_counts(micro)
        for mb in micro:
            mb["loss_scale"] = 1.0 / max(1, global_counts["loss"])
            mb.pop("counts")
        steps.append((micro, global_counts))
    if pin:
        _pin(steps)
    return steps


def _pin(steps) -> None:
    # Page-locked batches let the per-step host-to-device copies run
    # asynchronously instead of staging through pageable memory.
    import torch

    for micro, _ in steps:
        for mb in micro:
            for k, v in mb.items():
                if torch.is_tensor(v):
                    mb[k] = v.pin_memory()


def sum_counts(micro: list[dict]) -> dict:
    keys = ("padded", "nonpad", "loss", "samples")
    return {k: sum(mb["counts"][k] for mb in micro) for k in keys}


def step_flops(steps, flops_of) -> list[float]:
    """FLOPs of this rank's micro-batches per step, from shapes known on the host."""
    return [sum(flops_of((mb["input_ids"].shape[0], mb["input_ids"].shape[1],
                          mb["labels"].shape[1] if "decoder_input_ids" in mb else 0)) for mb in micro)
            for micro, _ in steps]
