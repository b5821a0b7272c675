"""Applying a cell's optimizations (``--opt``) at the runner's hook points.

The runner calls each :class:`ftbench.Optimization` hook at one fixed point
of the cell, for every engine alike: availability on the cell's device (a
cell whose optimization cannot run here is ``skipped`` with the reason), the
model before the engine wraps it, the loss function, and a context around
each micro-batch's forward and backward.  The optimizer hook is the engine's
(``EngineContext.build_optimizer``); the recipe hook ran when the grid was
expanded (``ftbench.harness.contract.optimization.recipe_with``).

Example::

    why = unavailable(cell.opts, "cpu")          # None, or why a cell is skipped
    model = apply_to_model(cell.opts, model)
"""

from __future__ import annotations

import contextlib
import functools

from ftbench.harness.contract.api import Unavailable
from ftbench.harness.contract.optimization import AppliedOpt, Optimization


def unavailable(opts: list[AppliedOpt], device_type: str) -> str | None:
    for a in opts:
        try:
            a.opt.check_available(a.options, device_type)
        except Unavailable as e:
            return f"optimization {a.spec!r} is unavailable: {e}"
    return None


def apply_to_model(opts: list[AppliedOpt], model):
    for a in opts:
        model = a.opt.apply_model(model, a.options)
    return model


def wrap_loss(opts: list[AppliedOpt], loss_fn, model):
    for a in opts:
        loss_fn = a.opt.wrap_loss(loss_fn, model, a.options)
    return loss_fn


def within_step_contexts(opts: list[AppliedOpt], engine) -> None:
    """Enter the optimizations' step contexts around ``engine.forward_backward`` (none: unchanged)."""
    active = [a for a in opts if type(a.opt).step_context is not Optimization.step_context]
    if not active:
        return
    inner = engine.forward_backward

    @functools.wraps(inner)
    def forward_backward(batch, boundary):
        with contextlib.ExitStack() as stack:
            for a in active:
                stack.enter_context(a.opt.step_context(a.options))
            return inner(batch, boundary)

    engine.forward_backward = forward_backward


def describe(opts: list[AppliedOpt]) -> list[dict]:
    """The record's ``optimizations``: each one's spec, what it changes and whether it keeps the math."""
    return [{"name": a.name, "spec": a.spec, "options": a.options, "changes": list(a.opt.changes),
             "math": a.opt.math_of(a.options), "tolerance": a.opt.tolerance} for a in opts]
