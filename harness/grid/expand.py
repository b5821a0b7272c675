"""A grid: axes whose product (minus exclusions) is the list of cells.

Axes are ``task``, ``backend``, ``model`` and ``data`` (lists), plus any
*swept* setting (``sweep={"lr": [1e-3, 3e-3]}``); every other setting is
shared by all cells (recipe settings such as ``steps`` or ``lr``, and cell
settings such as ``nproc`` or ``time_limit_s``).  ``per_cell`` rules give
matching cells their own cell settings (e.g. a longer time limit for
compiled backends) without changing what they compute.

``nproc`` applies to backends that run data-parallel; the others run in one
process, so ``--backend eager --backend ddp --nproc 2`` gives eager on 1
rank and ddp on 2 with the same global batch and recipe.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.config import RECIPE_FIELDS, CellSpec, Launch, Recipe
from ftbench.harness.contract.optimization import combine, recipe_with, resolve_opts
from ftbench.harness.contract.specs import Spec
from ftbench.harness.grid.recipes import defaults_for_model, is_pretrained
from ftbench.harness.contract.targets import check_grid_targets, target_for_task

AXES = ("task", "backend", "model", "data", "opt")
CELL_SETTINGS = ("nproc", "time_limit_s", "memory_limit_mb", "eval_examples", "device", "columns", "launcher",
                 "eval_every", "stop_at_target", "profile_steps", "cpu_memory", "trust_remote_code")
#: Settings a grid may sweep as extra axes: the recipe, and the rank count.
SWEEPABLE = tuple(RECIPE_FIELDS) + ("nproc", "eval_examples")
#: Settings a ``per_cell`` rule may set: how a cell runs, never what it computes.
PER_CELL_SETTINGS = ("time_limit_s", "memory_limit_mb", "eval_examples", "device", "launcher", "eval_every", "cpu_memory",
                     "profile_steps")
AUTO_MODEL = "auto"
#: Ranks per node, far past any machine (a typo costs an error line).
MAX_NPROC = 1024
#: A grid of more cells runs only when confirmed (``--yes`` or the grid key ``max_cells``).
LARGE_GRID = 500
#: Cells between two progress lines while a large grid expands.
PROGRESS_EVERY = 5000


@dataclass
class Grid:
    """Axes, shared settings, exclusions and repeats.

    Example::

        Grid(axes={"task": ["generation"], "backend": ["eager", "compile"]},
             settings={"steps": 20}).cells(registry)
    """

    axes: dict[str, list] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    exclude: list[dict] = field(default_factory=list)
    repeat: int = 1
    sweep: dict[str, list] = field(default_factory=dict)
    per_cell: list[dict] = field(default_factory=list)
    #: How repeats are ordered when the grid runs (:func:`order_repeats`).
    order: str = "interleaved"
    source: str | None = None
    #: Where the cells run: ``local`` (default) or ``slurm``, and the grid file's ``slurm:`` mapping.
    launcher: str | None = None
    slurm: dict | None = None
    #: Quality targets, ``[TASK:]METRIC=VALUE`` (see :mod:`ftbench.harness.contract.targets`).
    targets: list[str] = field(default_factory=list)
    #: The most cells the grid's author expects (grid key ``max_cells``); past :data:`LARGE_GRID`
    #: cells, a grid runs only with it (or ``--yes``), see :meth:`check_size`.
    max_cells: int | None = None
    #: Record sinks every record of the run also goes to (grid key ``sink``, ``--sink``).
    sinks: list[str] = field(default_factory=list)
    #: Optimizations added one by one on top of each ``opt`` of the grid (``--ladder A,B,C``:
    #: baseline, +A, +A+B, +A+B+C), or each alone against it (``--ablation A,B,C``).
    ladder: list[str] = field(default_factory=list)
    ablation: list[str] = field(default_factory=list)

    def size(self, registry) -> int:
        """How many cells the grid expands to at most (exclusions not yet taken off), computed
        without expanding it.

        Example: 2 tasks x 3 backends x a sweep of 4 values x repeat 5 gives 120.
        """
        n = self.repeat
        for a in AXES:
            values = list(self.axes.get(a) or []) or ["-"]
            if a == "task":
                values = _expand_all(values, lambda: list(registry.tasks))
            elif a == "backend":
                values = _expand_all(values, lambda: available_backends(registry))
            n *= len(values)
        for values in self.sweep.values():
            n *= len(values)
        return n

    def check_size(self, registry, confirmed: bool) -> int:
        """Refuse a grid of more than :data:`LARGE_GRID` cells unless confirmed (``--yes``) or
        declared (``max_cells``); the cell count otherwise."""
        n = self.size(registry)
        if n > LARGE_GRID and not confirmed and (self.max_cells is None or n > self.max_cells):
            sizes = " x ".join(f"{len(v)} {k}" for k, v in {**self.axes, **self.sweep}.items() if len(v) > 1)
            declared = f" (its max_cells is {self.max_cells:,})" if self.max_cells is not None else ""
            raise FtbenchError(f"{self.source or 'the grid'} expands to up to {n:,} cells ({sizes or 'axes'} x "
                               f"repeat {self.repeat}){declared}, more than {LARGE_GRID} without asking; pass "
                               f"--yes (or put max_cells: {n} in the grid file) to run it, or narrow the grid")
        return n

    @property
    def launch(self) -> Launch:
        """The multi-node settings the grid's data-parallel cells share (``settings.launcher``)."""
        return Launch.from_dict(self.settings.get("launcher"), f"{self.source or 'grid'}: settings.launcher")

    def with_launch(self, launch: Launch) -> "Grid":
        """A copy of the grid whose data-parallel cells span ``launch``'s nodes."""
        return dataclasses.replace(self, settings={**self.settings, "launcher": launch})

    def cells(self, registry, progress=None) -> list[CellSpec]:
        """Every cell of the grid, repeats included, in axis order.

        ``progress(done, total)`` hears about a large expansion as it goes.

        Example: ``Grid(axes={"task": ["generation"], "backend": ["eager"]},
        sweep={"lr": [1e-3, 3e-3]}, repeat=2).cells(reg)`` gives 4 cells.
        """
        where = f"{self.source}: " if self.source else ""
        if self.targets:
            tasks = {Spec.parse(t, "task").name for t in _expand_all(list(self.axes.get("task") or []),
                                                                  lambda: list(registry.tasks))}
            check_grid_targets(self.targets, [registry.task(n) for n in sorted(tasks)])
        base_settings = {k: v for k, v in self.settings.items() if k not in self.sweep}
        sweep_keys = list(self.sweep)
        cells: list[CellSpec] = []
        total = self.size(registry) if progress else 0
        made = [0]

        def tell():
            made[0] += 1
            if made[0] % PROGRESS_EVERY == 0:
                progress(made[0], total)
        tell = tell if progress and total > LARGE_GRID else None
        for values in itertools.product(*(self.sweep[k] for k in sweep_keys)):
            point = dict(zip(sweep_keys, values))
            try:
                cells += self._cells_at({**base_settings, **point}, point, registry, tell)
            except FtbenchError as e:
                if not where or str(e).startswith(where):
                    raise
                raise FtbenchError(f"{where}{e}") from None
        return reference_first(cells, registry)

    def _cells_at(self, settings: dict, point: dict, registry, tell=None) -> list[CellSpec]:
        axes = {a: list(self.axes.get(a) or []) for a in AXES}
        axes["model"] = axes["model"] or [AUTO_MODEL]
        axes["data"] = axes["data"] or ["builtin"]
        axes["opt"] = opt_axis(axes["opt"], self.ladder, self.ablation)
        axes["task"] = _expand_all(axes["task"], lambda: list(registry.tasks))
        axes["backend"] = _expand_all(axes["backend"], lambda: available_backends(registry))
        for a in ("task", "backend"):
            if not axes[a]:
                raise FtbenchError(f"the grid's {a} axis is empty; list at least one {a} (ftbench list)")
        unknown = set(settings) - set(RECIPE_FIELDS) - set(CELL_SETTINGS)
        if unknown:
            raise FtbenchError(f"unknown setting(s) {sorted(unknown)}; allowed: "
                               f"{', '.join(sorted(set(RECIPE_FIELDS) | set(CELL_SETTINGS)))}")
        recipe_kw = {k: v for k, v in settings.items() if k in RECIPE_FIELDS}
        if "betas" in recipe_kw:
            recipe_kw["betas"] = tuple(recipe_kw["betas"])
        try:
            recipe = Recipe(**recipe_kw).validate()
        except TypeError as e:
            raise FtbenchError(f"invalid recipe setting: {e}") from None
        cell_kw = {k: v for k, v in settings.items() if k in CELL_SETTINGS}
        nproc = int(cell_kw.pop("nproc", 1) or 1)
        if not 1 <= nproc <= MAX_NPROC:
            raise FtbenchError(f"invalid nproc={nproc}: must be from 1 to {MAX_NPROC} (ranks per node)")
        if "columns" in cell_kw:
            cell_kw["columns"] = tuple(sorted(dict(cell_kw["columns"]).items()))
        cells = []
        for task, backend, model, data, opt in itertools.product(*(axes[a] for a in AXES)):
            task, backend = Spec.parse(task, "task"), Spec.parse(backend, "backend")
            task_obj = registry.task(task.name)
            bspec = registry.backend(backend.name)
            if model == AUTO_MODEL:
                model = default_model(registry, task_obj)
            target = target_for_task(self.targets, task_obj)
            cell = {"task": task, "backend": backend, "model": model, "data": data, "opt": opt, **point}
            cell_recipe = defaults_for_model(recipe, settings, is_pretrained(model, registry))
            cell_recipe = recipe_with(resolve_opts(registry, opt), cell_recipe)
            if any(_matches(cell, ex) for ex in self.exclude):
                continue
            own = dict(cell_kw)
            for rule in self.per_cell:
                if _matches(cell, rule.get("match") or {}):
                    own.update({k: v for k, v in rule.items() if k != "match"})
            if not bspec.data_parallel:
                # Multi-node launch settings, like nproc, concern data-parallel backends only.
                own.pop("launcher", None)
            for r in range(self.repeat):
                cells.append(CellSpec(task=task, backend=backend, model=model, data=data, opt=opt, recipe=cell_recipe,
                                      nproc=nproc if bspec.data_parallel else 1, repeat=r, target=target, **own))
                if tell:
                    tell()
        # Sweeping nproc over a single-process backend would repeat the same cell.
        seen, unique = set(), []
        for c in cells:
            if (c.cell_id, c.repeat) not in seen:
                seen.add((c.cell_id, c.repeat))
                unique.append(c)
        return unique


def opt_axis(bases: list[str], ladder: list[str], ablation: list[str]) -> list[str]:
    """The ``opt`` axis: each base (none: the cell without optimizations) and its ladder or ablation rungs.

    Example: ``opt_axis([], ["a", "b"], [])`` is ``["", "a", "a+b"]``;
    ``opt_axis([], [], ["a", "b"])`` is ``["", "a", "b"]``.
    """
    if ladder and ablation:
        raise FtbenchError("--ladder and --ablation both given; a grid runs one of them (run the other as "
                           "a second grid into its own --out)")
    out: list[str] = []
    for base in [combine(b) for b in bases] or [""]:
        rungs, acc = [base], base
        for step in ladder:
            acc = combine(acc, step)
            rungs.append(acc)
        rungs += [combine(base, step) for step in ablation]
        out += [r for r in rungs if r not in out]
    return out


def reference_first(cells: list[CellSpec], registry) -> list[CellSpec]:
    """Cells of reference backends (``BackendSpec.reference``) first, the rest in order.

    Loss parity compares each cell with the reference cell of its recipe
    (:mod:`ftbench.harness.results.parity`), which must have finished by then.  The sort is
    stable, so the grid's own order holds within each group.
    """
    def is_ref(cell: CellSpec) -> bool:
        return bool(getattr(registry.backend(cell.backend.name), "reference", False))

    return sorted(cells, key=lambda c: not is_ref(c))


#: Orders in which the repeats of a grid run (``--order``).
INTERLEAVED, SEQUENTIAL = "interleaved", "sequential"
ORDERS = (INTERLEAVED, SEQUENTIAL)


def order_repeats(cells: list[CellSpec], order: str = INTERLEAVED) -> list[CellSpec]:
    """The cells in the order they run: round-robin over repeats, or back to back.

    ``interleaved`` (the default) runs every cell's first repeat, then every
    cell's second, and so on: each cell samples several moments of a noisy
    machine, and every backend the same ones, so the spread of its repeats
    shows run-to-run noise instead of one minute's mood.  ``sequential``
    keeps a cell's repeats back to back.  Within a round the grid's order
    holds (reference backends first, for loss parity).

    Example: cells a0 a1 b0 b1 run as a0 b0 a1 b1 (interleaved).
    """
    if order not in ORDERS:
        raise FtbenchError(f"invalid order {order!r}: use one of {', '.join(ORDERS)}")
    if order == SEQUENTIAL:
        return list(cells)
    return sorted(cells, key=lambda c: c.repeat)  # stable: the grid's order within a round


ALL = "all"


def _expand_all(values: list, everything) -> list:
    """``all`` on the task or backend axis stands for every registered one."""
    out = []
    for v in values:
        out.extend(x for x in (everything() if v == ALL else [v]) if x not in out)
    return out


def available_backends(registry) -> list[str]:
    """Every backend that can run here, presets left out (they repeat a backend)."""
    return [name for name, entry in registry.backends.items()
            if entry.obj.preset_of is None and registry.backend_availability(name) is None]


def default_model(registry, task) -> str:
    """The default preset for the task's preferred model kind."""
    for kind in task.model_kinds:
        for name, entry in registry.models.items():
            if entry.obj.kind == kind and getattr(entry.obj, "default", False):
                return name
    for kind in task.model_kinds:
        for name, entry in registry.models.items():
            if entry.obj.kind == kind:
                return name
    raise FtbenchError(f"no model preset fits task {task.name!r} (needs {', '.join(task.model_kinds)}); "
                       "pass --model PATH_OR_HUB_ID")


def _matches(cell: dict, exclusion: dict) -> bool:
    """An exclusion matches when each of its keys equals the cell's value (or the
    name of a task or backend spec)."""
    for key, want in exclusion.items():
        have = cell.get(key)
        wants = want if isinstance(want, list) else [want]
        if isinstance(have, Spec):
            if str(have) not in wants and have.name not in wants:
                return False
        elif have not in wants:
            return False
    return True

