"""Public types that plugins implement or construct.

Three kinds of thing plug into ftbench:

* a :class:`Task` says what the model learns, where its data comes from, how
  an example becomes tokens and how quality is judged;
* a :class:`BackendSpec` names an :class:`Engine` class, which says *how* a
  training step runs (eager, compiled, DeepSpeed, DDP...);
* a :class:`ModelPreset` builds a small randomly initialised model offline.

The runner (``ftbench.harness.cell.worker``) owns the loop, the data order, the optimizer
recipe and every clock; plugins never time anything themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from ftbench.harness.contract.memory_model import MemoryPlan


#: Model kinds a task may accept.
DECODER = "decoder"
ENCODER_DECODER = "encoder-decoder"
ENCODER = "encoder"
MODEL_KINDS = (DECODER, ENCODER_DECODER, ENCODER)

#: Labels position ignored by the loss (the Hugging Face convention).
IGNORE_INDEX = -100


class FtbenchError(Exception):
    """An error caused by the user's input; the CLI prints it and exits 2.

    The message should name the problem and the fix, e.g.
    ``FtbenchError("unknown task 'genration'; did you mean 'generation'? ...")``.
    """


class DataError(FtbenchError):
    """Bad data: the message names the file, the line and the field.

    Example: ``DataError("data/train.jsonl line 7: missing field 'label'")``.
    """


class Unavailable(Exception):
    """Raised by :meth:`Engine.check_available` when a dependency is missing.

    The message is an install hint, e.g.
    ``Unavailable("needs deepspeed: pip install 'ftbench[deepspeed]'")``.
    """


# --------------------------------------------------------------------- tasks


@dataclass
class Encoded:
    """One tokenized example, ready for collation.

    ``labels`` is aligned with ``input_ids`` for decoder models (prompt
    positions set to ``IGNORE_INDEX``), is the target sequence for
    encoder-decoder models, and is a one-element list ``[class_id]`` for
    classification heads.  ``truncated`` counts the tokens cut off.

    Example: ``Encoded(input_ids=[5, 9, 2], labels=[-100, 9, 2])``.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: int = 0
    #: Position of each token in its own document (document-packed rows only; None: 0, 1, 2, ...).
    position_ids: list[int] | None = None


@dataclass
class EvalContext:
    """What :meth:`Task.evaluate` receives after training.

    ``model`` is the trained model in eval mode on ``device``; ``examples``
    the raw held-out examples (at most ``max_examples``); ``eval_loss`` the
    runner's loss on the encoded held-out split; ``generate(prompts)`` is a
    ready greedy decoder returning one string per prompt, for tasks that
    judge generated text; ``classify(examples)`` returns the class
    probabilities of each example, for tasks with a classification head.

    Example inside a task::

        preds = ctx.generate([ex["prompt"] for ex in ctx.examples])
        probs = ctx.classify(ctx.examples)     # [[p0, p1, ...], ...]
    """

    model: Any
    tokenizer: Any
    model_kind: str
    device: Any
    examples: list[dict]
    eval_loss: float
    options: dict
    generate: Callable[[list[str]], list[str]]
    max_new_tokens: int = 32
    classify: Callable[[list[dict]], list[list[float]]] | None = None


class Task:
    """Base class for task plugins; override what differs.

    Minimal example (a complete task)::

        class Reverse(Task):
            name = "reverse"
            metric = "eval_loss"
            higher_is_better = False
            fields = ("text",)

            def builtin_data(self, seed, options):
                words = ["alpha", "beta", "gamma"]
                rows = [{"text": " ".join(words[::-1])}] * 64
                return {"train": rows, "validation": rows[:8]}

            def prompt_and_target(self, example, options):
                return "", example["text"]
    """

    #: Registry name, as given to ``--task``.
    name: str = ""
    description: str = ""
    #: Primary metric in the result record, and its direction.
    metric: str = "eval_loss"
    higher_is_better: bool = False
    #: The other metrics :meth:`evaluate` reports, name -> higher is better;
    #: ``--target`` may name any of them (see :meth:`metric_directions`).
    other_metrics: Mapping[str, bool] = {}
    #: Model kinds this task can train; the first is the default.
    model_kinds: tuple[str, ...] = (DECODER,)
    #: ``"lm"`` (token targets) or ``"classification"`` (one label per example).
    head: str = "lm"
    #: Fields every example must have (after column mapping).
    fields: tuple[str, ...] = ("text",)
    #: Default task options (overridable with ``--task NAME:key=value``).
    defaults: Mapping[str, Any] = {}

    def builtin_data(self, seed: int, options: dict) -> dict[str, list[dict]]:
        """Small deterministic offline data: ``{"train": [...], "validation": [...]}``."""
        raise NotImplementedError

    def validate(self, example: dict, where: str, options: dict) -> None:
        """Raise :class:`DataError` (prefixed with ``where``) if ``example`` is unusable."""
        for f in self.fields:
            if f not in example:
                raise DataError(f"{where}: missing field {f!r} (task {self.name!r} needs {list(self.fields)}); "
                                "rename it in the data or map it with --column FIELD=COLUMN")

    def prepare(self, splits: dict[str, list[dict]], options: dict) -> dict:
        """Inspect the loaded data once (e.g. collect the label set); return
        updates to ``options`` (e.g. ``{"num_labels": 2}``)."""
        return {}

    def prompt_and_target(self, example: dict, options: dict) -> tuple[str, str]:
        """The text the model is given and the text it must produce."""
        raise NotImplementedError

    def label(self, example: dict, options: dict) -> int:
        """Class id of an example (classification heads only)."""
        raise NotImplementedError

    def texts(self, example: dict, options: dict) -> Iterable[str]:
        """Texts used to train the offline tokenizer of a preset model."""
        prompt, target = self.prompt_and_target(example, options)
        return [t for t in (prompt, target) if t]

    def metric_directions(self) -> dict[str, bool]:
        """Every metric this task reports, name -> higher is better.

        Example: ``{"accuracy": True, "macro_f1": True, "eval_loss": False}``.
        """
        out = {"eval_loss": False, **dict(self.other_metrics), self.metric: self.higher_is_better}
        if type(self).evaluate is Task.evaluate:
            out["perplexity"] = False
        return out

    def evaluate(self, ctx: EvalContext) -> dict[str, float]:
        """All task metrics by name; must include :attr:`metric`.

        The default reports the eval loss and its perplexity.
        """
        return {"eval_loss": ctx.eval_loss, "perplexity": _safe_exp(ctx.eval_loss)}


def _safe_exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


# ------------------------------------------------------------------- models


@dataclass
class ModelPreset:
    """A model built from a config, randomly initialised, offline.

    ``build(tokenizer, head, num_labels)`` returns a ``torch.nn.Module`` of
    the Hugging Face kind ``kind``.  ``vocab_size`` sizes the offline
    tokenizer trained for it.

    Example::

        ModelPreset("tiny-gpt2", kind="decoder", build=build_tiny_gpt2,
                    description="2 layers x 64 wide GPT-2")
    """

    name: str
    kind: str
    build: Callable[..., Any]
    description: str = ""
    vocab_size: int = 2000
    max_positions: int = 512
    #: The preset a task gets when no ``--model`` is given, per model kind.
    default: bool = False
    #: Modules worth importing once in the fork server (``ftbench.harness.running.launch``),
    #: e.g. ``("transformers.models.gpt2.modeling_gpt2",)``: importing a model
    #: family costs seconds, building a tiny model milliseconds.
    preload: tuple[str, ...] = ()


# ----------------------------------------------------------------- backends


@dataclass
class BackendSpec:
    """A named way to run training steps.

    ``engine`` is an :class:`Engine` subclass; ``defaults`` its options;
    ``preset_of`` names the backend a preset abbreviates (for ``list``).
    ``data_parallel`` says the engine uses ``--nproc`` ranks.  ``reference``
    marks a backend whose loss curve others are checked against for parity
    (see :mod:`ftbench.harness.results.parity`); the grid runs reference cells first.
    ``preload`` names modules worth importing once in the fork server that
    every cell (and every rank) is forked from, as :attr:`ModelPreset.preload`
    does: the backend's library, its distributed modules.  A module listed
    here must be safe to import before a fork: no device, no threads, no
    accelerator choice that depends on the cell; a module that decides it is
    not safe here may simply import nothing.

    Example::

        BackendSpec("zero2", engine=DeepSpeedEngine, defaults={"stage": 2},
                    preset_of="deepspeed", data_parallel=True,
                    preload=("ftbench.plugins._deepspeed_preload",))
    """

    name: str
    engine: type
    defaults: Mapping[str, Any] = field(default_factory=dict)
    description: str = ""
    preset_of: str | None = None
    data_parallel: bool = False
    reference: bool = False
    preload: tuple[str, ...] = ()


class Engine:
    """How a training step runs.  The runner drives it like this::

        engine = spec.engine(options, ctx)          # ctx: an ftbench.EngineContext
        engine.setup(model)                         # wrap, shard, build optimizer
        for step in range(steps):
            for i, micro_batch in enumerate(micro_batches):
                # boundary: this micro-batch ends the optimizer step (the last of
                # the accumulation), e.g. where DDP must all-reduce gradients
                engine.forward_backward(micro_batch, boundary=i == len(micro_batches) - 1)
            engine.step()                           # clip, optimizer, schedule
        model = engine.eval_model()                 # for evaluation

    Each micro-batch carries ``loss_scale`` = 1 / (loss-bearing units of the
    whole global step): the engine multiplies its summed loss by it, so that
    micro-batches and ranks add up to the global mean loss.

    :class:`ftbench.harness.contract.engine.StandardEngine` implements all of this for plain
    PyTorch; most backends subclass it and override ``wrap`` only.
    """

    #: True when the first steps compile (their time is reported as compile_s).
    compiles: bool = False
    #: Hook points of the step this engine lets optimizations change (see
    #: ``ftbench.Optimization.needs``): ``optimizer`` (it builds the optimizer through
    #: ``EngineContext.build_optimizer``) and ``backward-step`` (an optimizer stepping inside
    #: backward sees reduced gradients).  The runner applies model, loss, data and
    #: activation hooks for every engine.
    optimization_hooks: frozenset = frozenset()
    #: True when the engine runs the training loop itself (a stack with a loop of its own, such
    #: as the Hugging Face ``Trainer``): the runner calls :meth:`run_loop` instead of
    #: ``forward_backward``/``step`` and still owns the clock, through the :class:`StepClock` it passes.
    owns_loop: bool = False
    #: Option names this engine accepts (``None``: any).
    OPTIONS: tuple[str, ...] | None = None

    def __init__(self, options: dict, ctx: Any):
        self.options = options
        self.ctx = ctx

    @classmethod
    def check_available(cls, options: dict) -> None:
        """Raise :class:`Unavailable` with an install hint if this cannot run here."""

    @classmethod
    def validate_options(cls, options: dict) -> dict:
        """Check and normalise options; raise :class:`FtbenchError` naming a bad key.

        The default accepts exactly the keys in :attr:`OPTIONS` (anything,
        when ``OPTIONS`` is ``None``).
        """
        if cls.OPTIONS is not None:
            unknown = sorted(set(options) - set(cls.OPTIONS))
            if unknown:
                allowed = ", ".join(sorted(cls.OPTIONS)) or "none"
                raise FtbenchError(f"unknown option(s) {unknown} for this backend; allowed: {allowed}")
        return options

    @classmethod
    def prepare_once(cls, options: list[dict], device: str) -> None:
        """Once per grid, before its first cell of this engine: do the one-off work
        every cell would otherwise pay on its own, such as building native ops.

        Runs in a process of its own (forked like a cell), so a crash here
        costs nothing but a warning; its time is shown as a progress line and
        reported once per grid (``prepared`` in ``environment.json``), never
        in a cell's ``setup_s``.  ``options`` holds the validated options of
        the grid's cells of this engine, ``device`` is ``"cpu"`` or ``"cuda"``.
        Work that should last beyond this grid belongs in a persistent cache
        (``TORCH_EXTENSIONS_DIR`` is one per installation under ftbench's cache).

        Example::

            @classmethod
            def prepare_once(cls, options, device):
                if device == "cpu":
                    build_my_cpu_kernels()  # JIT-compiled once, loaded by every cell
        """

    @classmethod
    def memory_plan(cls, options: dict, world_size: int) -> "MemoryPlan":
        """How this engine holds weights, gradients and optimizer states on each rank.

        ``ftbench plan``, ``memory_predicted_bytes`` and ``--micro-batch auto``
        build their prediction from it (:mod:`ftbench.harness.contract.memory_model`).
        The default is plain PyTorch: everything replicated on every rank.
        A sharding backend overrides it::

            @classmethod
            def memory_plan(cls, options, world_size):
                return MemoryPlan(grads_shards=world_size, optimizer_shards=world_size)
        """
        return MemoryPlan()

    def setup(self, model: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def forward_backward(self, batch: dict, boundary: bool) -> Any:  # pragma: no cover - interface
        """Forward and backward of one micro-batch; the detached loss.

        ``boundary`` is True for the micro-batch that ends the optimizer step.
        """
        raise NotImplementedError

    def step(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def eval_model(self) -> Any:  # pragma: no cover - interface
        raise NotImplementedError

    def run_loop(self, steps: Iterable, clock: "StepClock") -> None:  # pragma: no cover - interface
        """Train on every step of ``steps`` in order, telling ``clock`` where each optimizer step
        begins and ends (engines with :attr:`owns_loop` only).

        ``steps`` yields ``(micro_batches, global_counts)`` exactly as the runner's own loop
        consumes them (same rows, same order, same ``loss_scale``).  Example::

            def run_loop(self, steps, clock):
                for micro_batches, _ in steps:
                    clock.begin()
                    loss = sum(self.forward_backward(mb, i == len(micro_batches) - 1)
                               for i, mb in enumerate(micro_batches))
                    self.step()
                    if clock.end(loss, lr=self.current_lr()):
                        break  # the runner asked to stop (e.g. a quality target was reached)
        """
        raise NotImplementedError

    def current_lr(self) -> float | None:
        """The learning rate the next optimizer step uses (recorded per step for the fairness check)."""
        optimizer = getattr(self, "optimizer", None)
        groups = getattr(optimizer, "param_groups", None)
        return float(groups[0]["lr"]) if groups else None

    def facts(self) -> dict:
        """What this engine actually computes, for the fairness check (``ftbench explain``).

        Keys (each optional): ``loss_normalisation`` (how micro-batch and rank losses combine),
        ``precision_policy`` (weights, autocast, gradient reduction, optimizer states),
        ``optimizer`` (the class and kernel that stepped), ``data_order_rows`` (when the
        engine feeds the rows itself: each step's ``ftbench.rows_fingerprint`` of what it
        read) and ``differences`` (a list: each way the stack's
        semantics differ from the recipe, in words).  Example::

            {"loss_normalisation": "sum / global loss tokens", "differences": [
                "scheduler: linear warmup starts at lr 0 (the recipe's at lr/warmup)"]}
        """
        return {}

    def stats(self) -> dict:
        """Backend-specific facts for the record (e.g. graph breaks)."""
        return {}


class StepClock:
    """The runner's clock, handed to an engine that owns its loop (:meth:`Engine.run_loop`).

    ``begin()`` synchronises the device and starts an optimizer step's clock; ``end(loss, lr)``
    synchronises the device, keeps the step's time, its loss (a detached 0-d tensor: this rank's
    share, the ranks' shares summing to the global mean loss) and the learning rate it used, and
    returns True when the runner wants training to end.  Steps that follow each other without a
    ``begin()`` are timed end to end, so that what the loop does between steps counts::

        clock.begin()
        for step in ...:
            ...                      # the stack's own step
            if clock.end(loss, lr):
                break
    """

    def begin(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def end(self, loss: Any, lr: float | None = None) -> bool:  # pragma: no cover - interface
        raise NotImplementedError
