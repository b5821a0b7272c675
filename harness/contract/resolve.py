"""Resolving a cell: its task, backend, options and the checks of their fit.

The pre-run check (:mod:`ftbench.harness.grid.preflight`) and the cell's own
process (:mod:`ftbench.harness.cell.worker`) both go through
:func:`resolve_cell`, so a rule such as "the global batch must split over the
ranks" is written once and cannot drift between the two.

Example::

    cell = resolve_cell(Registry.load(), spec)
    cell.task.metric, cell.backend_options
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ftbench.harness.contract.api import BackendSpec, FtbenchError, Task
from ftbench.harness.contract.optimization import AppliedOpt, check_combination, recipe_with, resolve_opts


@dataclass
class ResolvedCell:
    """A cell's configuration with its plugins looked up and its options merged and checked."""

    spec: Any  # the CellSpec
    recipe: Any  # the validated Recipe
    task_name: str
    task: Task
    task_options: dict
    backend_name: str
    backend: BackendSpec
    backend_options: dict
    #: The cell's optimizations (``--opt``), looked up and checked against the backend, task and recipe.
    opts: list[AppliedOpt]


def resolve_cell(reg, spec, world_size: int | None = None) -> ResolvedCell:
    """Look up the cell's plugins and check what can be known without data or model.

    ``world_size`` is the number of ranks the cell runs on (the worker knows
    it from its environment; preflight takes the cell's ``nproc``).
    """
    opts = resolve_opts(reg, spec.opt)
    recipe = recipe_with(opts, spec.recipe).validate()
    task_name, task_opts = spec.task.name, spec.task.options
    backend_name, backend_opts = spec.backend.name, spec.backend.options
    task = reg.task(task_name)
    bspec = reg.backend(backend_name)
    try:
        options = bspec.engine.validate_options({**dict(bspec.defaults), **backend_opts})
    except FtbenchError as e:
        raise FtbenchError(f"backend {str(spec.backend)!r}: {e}") from None
    world = spec.nproc if world_size is None else world_size
    if world > 1 and not bspec.data_parallel:
        raise FtbenchError(f"backend {backend_name!r} runs in one process; use --nproc 1 "
                           "(or a data-parallel backend such as ddp, fsdp or deepspeed)")
    check_batch_split(recipe, world)
    check_combination(opts, backend_name=backend_name, engine_hooks=bspec.engine.optimization_hooks, kind=None,
                      head=task.head, recipe=recipe, opt_text=spec.opt)
    return ResolvedCell(spec=spec, recipe=recipe, task_name=task_name, task=task,
                        task_options={**dict(task.defaults), **task_opts}, backend_name=backend_name,
                        backend=bspec, backend_options=options, opts=opts)


def check_batch_split(recipe, world_size: int) -> None:
    """The global batch must split evenly into ranks x micro-batches."""
    parts = world_size * recipe.grad_accum
    if recipe.batch_size % parts:
        raise FtbenchError(f"global batch {recipe.batch_size} cannot be split over nproc {world_size} x "
                           f"grad_accum {recipe.grad_accum}; pick a --batch-size that is a multiple of {parts}")


def check_seq_len(seq_len: int, limit: int | None, model: str) -> None:
    """``seq_len`` must fit the model's position embeddings (``limit``; None: unknown)."""
    if limit is not None and seq_len > limit:
        raise FtbenchError(f"seq_len {seq_len} is too long for model {model!r}, which holds at most {limit} "
                           f"positions; pass --seq-len {limit} or less (or pick a model with longer positions)")
