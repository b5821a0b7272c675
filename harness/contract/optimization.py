"""Optimizations: the switches users choose between (attention kernel, chunked loss,
8-bit or fused optimizer, packing...), as a plugin kind of their own.

An :class:`Optimization` says what it changes, whether it keeps the math, where
it works, and how it is applied through hooks the runner calls at fixed points
of a cell: on the recipe (the batch plan), on the model before the engine, on
the loss function, on the optimizer's construction, and around each
micro-batch's forward and backward.  A cell asks for optimizations with
``--opt NAME[:key=value]`` (``+`` combines several in one cell); see
docs/optimizations.md.

Example (a complete optimization plugin)::

    from ftbench import Optimization, hookimpl

    class NoDecay(Optimization):
        name = "no-decay"
        description = "AdamW without weight decay"
        changes = ("optimizer",)
        math = "numerics"
        tolerance = 0.05
        needs = ("optimizer",)

        def build_optimizer(self, params, recipe, options, inner):
            import torch
            return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)

    @hookimpl
    def register_optimizations(register):
        register(NoDecay())
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

from ftbench.harness.contract.api import MODEL_KINDS, FtbenchError, Unavailable
from ftbench.harness.contract.memory_model import MemoryEffects
from ftbench.harness.contract.specs import Spec

#: What an optimization may change.
CHANGES = ("model", "loss", "optimizer", "data", "memory")
#: Whether it keeps the math: bit-for-bit, within the dtype's rounding, or not.
EXACT, TOLERANCE, NUMERICS = "exact", "tolerance", "numerics"
MATH = (EXACT, TOLERANCE, NUMERICS)
#: Hook points inside an engine's step that an optimization may need the engine to honour.
#: The runner applies the model, loss, data and activation hooks for every engine; an engine
#: lists the rest in ``Engine.optimization_hooks``.
ENGINE_HOOKS = ("optimizer", "backward-step")


class Optimization:
    """Base class of optimization plugins; override what applies.

    Attributes say what it is; methods are the hooks the runner calls (each
    default does nothing).  ``options`` is the merged dict of
    :attr:`defaults` and the cell's ``NAME:key=value`` options.

    Example::

        class Sdpa(Optimization):
            name = "sdpa"
            changes = ("model",)
            math = "tolerance"
            model_kinds = ("decoder",)

            def apply_model(self, model, options):
                model.set_attn_implementation("sdpa")
                return model
    """

    #: Registry name, as given to ``--opt``.
    name: str = ""
    description: str = ""
    #: What it changes, a subset of :data:`CHANGES`.
    changes: tuple[str, ...] = ()
    #: ``exact``, ``tolerance`` (same math, other rounding) or ``numerics`` (other math).
    math: str = EXACT
    #: For ``numerics``: largest relative change of held-out loss and task metric against the
    #: same cell without it that still passes the quality verdict.
    tolerance: float = 0.05
    #: Device types (``cpu``, ``cuda``) where it can run; elsewhere a cell is skipped.
    devices: tuple[str, ...] = ("cpu", "cuda")
    #: Model kinds and task heads (``lm``, ``classification``) it supports.
    model_kinds: tuple[str, ...] = MODEL_KINDS
    heads: tuple[str, ...] = ("lm", "classification")
    #: Engine hook points it needs (:data:`ENGINE_HOOKS`); an engine that does not honour one refuses it.
    needs: tuple[str, ...] = ()
    #: Backend names it is limited to (None: every backend that honours :attr:`needs`).
    backends: tuple[str, ...] | None = None
    #: Default options, and the allowed values of options that take a fixed set.
    defaults: Mapping[str, Any] = {}
    choices: Mapping[str, tuple] = {}

    # ------------------------------------------------------------ checks

    def validate_options(self, options: dict) -> dict:
        """Check and normalise options; raise :class:`FtbenchError` naming a bad key or value."""
        known = set(self.defaults) | set(self.choices)
        unknown = sorted(set(options) - known)
        if unknown:
            raise FtbenchError(f"unknown option(s) {unknown} for optimization {self.name!r}; allowed: "
                               f"{', '.join(sorted(known)) or 'none'}")
        for key, allowed in self.choices.items():
            if key in options and options[key] not in allowed:
                raise FtbenchError(f"invalid {self.name} option {key}={options[key]!r}; choose one of "
                                   f"{', '.join(map(str, allowed))}")
        return options

    def check_available(self, options: dict, device: str) -> None:
        """Raise :class:`ftbench.Unavailable` (with the install hint) when it cannot run on ``device`` here."""
        if device not in self.devices:
            raise Unavailable(f"runs on {' or '.join(self.devices)} only (this cell trains on {device})")

    def check_cell(self, recipe, options: dict) -> None:
        """Raise :class:`FtbenchError` when the cell's recipe cannot use it (e.g. gradient accumulation)."""

    def math_of(self, options: dict) -> str:
        """Whether it keeps the math with these options (default :attr:`math`)."""
        return self.math

    # ------------------------------------------------------------- hooks

    def apply_recipe(self, recipe, options: dict):
        """The recipe this cell trains with (e.g. another packing of the batches); default unchanged."""
        return recipe

    def apply_model(self, model, options: dict):
        """Change the built model before the engine wraps it; return the model."""
        return model

    def wrap_loss(self, loss_fn: Callable, model, options: dict) -> Callable:
        """A replacement for ``loss_fn(model, batch)`` (the summed loss); ``model`` is the
        unwrapped model :meth:`apply_model` returned."""
        return loss_fn

    def build_optimizer(self, params, recipe, options: dict, inner: Callable):
        """The optimizer over ``params`` (the recipe's hyper-parameters), or None to leave it.

        ``inner(params)`` builds the optimizer the cell would have without this one
        (the next optimization's, or the recipe's AdamW), for one that wraps it.
        """
        return None

    def step_context(self, options: dict):
        """A context manager entered around each micro-batch's forward and backward."""
        return contextlib.nullcontext()

    def memory(self, effects: MemoryEffects, options: dict) -> MemoryEffects:
        """What it changes in the memory prediction (:class:`MemoryEffects`)."""
        return effects


# ---------------------------------------------------------------- cell specs


def parse_opts(text: str) -> list[tuple[str, dict]]:
    """``"attn:impl=sdpa+chunked-ce"`` -> ``[("attn", {"impl": "sdpa"}), ("chunked-ce", {})]``.

    A name given twice keeps its last options (``--opt attn:impl=eager`` as the
    base of a ladder whose rung is ``attn:impl=sdpa``).
    """
    out: dict[str, dict] = {}
    for part in (text or "").split("+"):
        if not part.strip():
            if text and text.strip():
                raise FtbenchError(f"empty optimization in --opt {text!r}: write NAME[:key=value]+NAME...")
            continue
        spec = Spec.parse(part, "optimization")
        name, options = spec.name, spec.options
        out.pop(name, None)
        out[name] = options
    return list(out.items())


def _spelled(name: str, options: dict) -> str:
    # Sorted options: the same optimizations spell the same cell id whatever order they were given in.
    return str(Spec.of(name, dict(sorted(options.items()))))


def format_opts(items: list[tuple[str, dict]]) -> str:
    return "+".join(_spelled(n, o) for n, o in items)


def combine(*texts: str) -> str:
    """The optimizations of several specs in one (later names replace earlier ones)."""
    return format_opts(parse_opts("+".join(t for t in texts if t)))


@dataclass
class AppliedOpt:
    """One optimization of a cell, looked up and with its options merged and checked."""

    name: str
    opt: Optimization
    options: dict

    @property
    def spec(self) -> str:
        return _spelled(self.name, self.options)


def resolve_opts(reg, text: str) -> list[AppliedOpt]:
    """The cell's optimizations, looked up in the registry with their options validated."""
    out = []
    for name, options in parse_opts(text):
        opt = reg.optimization(name)
        try:
            merged = opt.validate_options({**dict(opt.defaults), **options})
        except FtbenchError as e:
            raise FtbenchError(f"--opt {text!r}: {e}") from None
        out.append(AppliedOpt(name, opt, merged))
    return out


def numerics_of(applied: list[AppliedOpt]) -> str:
    """The spec of the optimizations that change numerics (they enter the recipe fingerprint)."""
    return "+".join(_spelled(a.name, a.options)
                    for a in applied if a.opt.math_of(a.options) == NUMERICS)


def recipe_with(applied: list[AppliedOpt], recipe):
    """The recipe after every optimization's :meth:`Optimization.apply_recipe`, numerics recorded."""
    for a in applied:
        recipe = a.opt.apply_recipe(recipe, a.options)
    return replace(recipe, numerics=numerics_of(applied))


def check_combination(applied: list[AppliedOpt], *, backend_name: str, engine_hooks, kind: str | None,
                      head: str, recipe, opt_text: str) -> None:
    """FtbenchError (one paragraph, with the fix) when the cell cannot use its optimizations."""
    for a in applied:
        o = a.opt
        where = f"optimization {a.spec!r} (--opt {opt_text})"
        if o.backends is not None and backend_name not in o.backends:
            raise FtbenchError(f"{where} works with backend(s) {', '.join(o.backends)} only, not "
                               f"{backend_name!r}; drop it for this backend or exclude the pair in the grid")
        missing = [h for h in o.needs if h not in engine_hooks]
        if missing:
            raise FtbenchError(f"{where} needs the backend to apply its {' and '.join(missing)} hook, which "
                               f"backend {backend_name!r} does not (it builds or runs that part itself); drop it "
                               "for this backend, or use one that does (e.g. eager)")
        if kind is not None and kind not in o.model_kinds:
            raise FtbenchError(f"{where} supports {', '.join(o.model_kinds)} models, not this {kind} model; "
                               "drop it for this model")
        if head not in o.heads:
            raise FtbenchError(f"{where} supports task heads {', '.join(o.heads)}, not {head!r}; drop it for "
                               "this task")
        o.check_cell(recipe, a.options)


def memory_effects(applied: list[AppliedOpt]) -> MemoryEffects:
    effects = MemoryEffects()
    for a in applied:
        effects = a.opt.memory(effects, a.options)
    return effects


def local_device() -> str:
    """``cuda`` when this machine has an NVIDIA driver, else ``cpu``, without importing torch
    (``ftbench list`` stays fast); a cell decides by its own device."""
    return "cuda" if os.path.exists("/dev/nvidiactl") else "cpu"


def opt_summary(o: Optimization) -> dict:
    """What ``ftbench list`` shows of an optimization."""
    return {"changes": list(o.changes), "math": o.math, "tolerance": o.tolerance if o.math == NUMERICS else None,
            "devices": list(o.devices), "model_kinds": list(o.model_kinds), "needs": list(o.needs),
            "backends": list(o.backends) if o.backends is not None else None, "options": dict(o.defaults),
            "choices": {k: list(v) for k, v in o.choices.items()}, "description": o.description}
