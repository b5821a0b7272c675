"""A cell's configuration: the recipe (what is computed) and the cell (where
and how), with the ids that make results comparable.

``Recipe`` holds everything that defines the math of a training step; its
hash is the *recipe fingerprint*, so two cells may be compared for loss
parity or speed only when their fingerprints match.  The backend is *not* in
the recipe: a backend changes how a step runs, never what it computes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.format import shown
from ftbench.harness.contract.lora_options import is_lora, parse_lora
from ftbench.harness.contract.specs import Spec

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("constant", "linear", "cosine")
PADDINGS = ("max_length", "longest")
RECIPE_DEFAULTS = ("scratch", "pretrained")
#: Upper bounds of the recipe's integers: far past any real run, checked before anything is built, so
#: that a typo (``steps: 10000000000``) costs an error line instead of minutes and gigabytes.
LIMITS = {"steps": 10**7, "warmup": 10**7, "batch_size": 2**20, "grad_accum": 2**20, "seq_len": 2**20,
          "lr_warmup_steps": 10**7, "seed": 2**63 - 1}
#: ``--packing``: off, rows across documents (True), or per-document position ids.
DOCUMENTS = "documents"
PACKINGS = (False, True, DOCUMENTS)


@dataclass(frozen=True)
class Recipe:
    """The math of training, identical for every backend.

    ``batch_size`` is the *global* batch: examples per optimizer step over
    all ranks and accumulation micro-batches, so that ``eager`` with batch 8
    and ``ddp`` on 2 ranks with batch 8 compute the same step.

    Example: ``Recipe(steps=50, warmup=5, batch_size=8, seq_len=64)``.
    """

    steps: int = 50
    warmup: int = 5
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 64
    padding: str = "max_length"
    lr: float = 3e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "cosine"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    precision: str = "fp32"
    grad_checkpointing: bool = False
    tuning: str = "full"
    seed: int = 0
    #: Which defaults filled the settings left unset: ``scratch`` (random-init
    #: presets) or ``pretrained`` (a checkpoint: a fine-tuning recipe); see
    #: :mod:`ftbench.harness.grid.recipes`.
    recipe_defaults: str = "scratch"
    #: Concatenate decoder examples into full ``seq_len`` rows (EOS-separated): ``True``
    #: lets attention cross documents (run_clm); ``"documents"`` restarts position ids at
    #: each document so that attention stays inside it (docs/optimizations.md).
    packing: bool | str = False
    #: The cell's optimizations that change numerics (``--opt``), as a spec; see
    #: :mod:`ftbench.harness.contract.optimization`.  Exact ones are left out: they compute the same step.
    numerics: str = ""

    def validate(self) -> "Recipe":
        def bad(key, value, want):
            raise FtbenchError(f"invalid {key}={shown(value)}: {want}")

        for key in ("steps", "batch_size", "grad_accum", "seq_len"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(key, v, "must be a positive integer (e.g. --steps 50 --batch-size 8 --seq-len 64)")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            bad("warmup", self.warmup, "must be an integer >= 0")
        if self.warmup >= self.steps:
            bad("warmup", self.warmup, f"must be smaller than steps ({self.steps}) so that some steps are measured")
        if self.precision not in PRECISIONS:
            bad("precision", self.precision, f"choose one of {', '.join(PRECISIONS)}")
        if self.schedule not in SCHEDULES:
            bad("schedule", self.schedule, f"choose one of {', '.join(SCHEDULES)}")
        if self.padding not in PADDINGS:
            bad("padding", self.padding, f"choose one of {', '.join(PADDINGS)}")
        for key in ("lr", "weight_decay", "eps", "max_grad_norm"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                bad(key, v, "must be a number (e.g. --lr 3e-4)")
        for key in ("lr_warmup_steps", "seed"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(key, v, "must be an integer >= 0")
        if not isinstance(self.grad_checkpointing, bool):
            bad("grad_checkpointing", self.grad_checkpointing, "must be true or false")
        for key, most in LIMITS.items():
            v = getattr(self, key)
            if v > most:
                bad(key, v, f"must be at most {most:,} (a bound far past any real run)")
        if not isinstance(self.tuning, str):
            bad("tuning", self.tuning, "choose full, freeze-embeddings, freeze-lower:N or lora[:options]")
        if not (self.lr > 0):
            bad("lr", self.lr, "must be > 0")
        if self.recipe_defaults not in RECIPE_DEFAULTS:
            bad("recipe_defaults", self.recipe_defaults, f"choose one of {', '.join(RECIPE_DEFAULTS)}")
        if self.packing not in PACKINGS:
            bad("packing", self.packing, "must be true, false or documents (--packing [rows|documents])")
        if not isinstance(self.numerics, str):
            bad("numerics", self.numerics, "is set from --opt; leave it out of grid settings")
        parse_tuning(self.tuning)
        return self

    def micro_batch(self, world_size: int) -> int:
        """Examples per rank per forward pass: the global batch over ranks x accumulation steps.

        The one place this split is written (:func:`ftbench.harness.contract.resolve.check_batch_split`
        checks that it is exact).  Example: ``Recipe(batch_size=8, grad_accum=2).micro_batch(2) == 2``.
        """
        return self.batch_size // (world_size * self.grad_accum)

    def fingerprint(self, task: str, task_options: dict, model: str, data: str, columns: tuple = ()) -> str:
        """Hash of everything that defines the math of a step (not the backend).

        The world size enters only through the micro-batch it implies, which is
        already fixed by the global batch, so it is deliberately left out:
        eager on 1 rank and DDP on 2 ranks with the same global batch compute
        the same step.  For the same reason ``grad_accum`` (another split of
        the same global batch), ``grad_checkpointing`` (recomputation, not
        new math) and ``warmup`` (which steps are timed) are left out; see
        :data:`FINGERPRINT_FIELDS`.  ``columns`` changes which text is read.
        """
        recipe = {k: v for k, v in asdict(self).items() if k in FINGERPRINT_FIELDS}
        recipe = _without_later_defaults(recipe, Recipe)
        payload = {"recipe": recipe, "task": task, "task_options": task_options,
                   "model": model, "data": data}
        if columns:
            payload["columns"] = [list(c) for c in columns]
        return _hash(payload)


def parse_tuning(value: str) -> tuple[str, int]:
    """``full`` | ``freeze-embeddings`` | ``freeze-lower:N`` | ``lora[:options]`` -> (mode, N).

    LoRA options are checked by :func:`ftbench.harness.contract.lora_options.parse_lora`.
    """
    if is_lora(value):
        parse_lora(value)
        return "lora", 0
    if value in ("full", "freeze-embeddings"):
        return value, 0
    if value.startswith("freeze-lower:"):
        try:
            n = int(value.split(":", 1)[1])
        except ValueError:
            n = -1
        if n > 0:
            return "freeze-lower", n
    raise FtbenchError(f"invalid tuning={shown(value)}: choose full, freeze-embeddings, freeze-lower:N (N > 0 blocks) "
                       "or lora[:r=8,alpha=16,dropout=0,targets=NAME+NAME]")


def _hash(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Launch:
    """How a multi-node cell's ranks meet: torchrun's rendezvous settings (None: not given).

    Single-node cells leave it empty.  ``to_dict()`` holds only what was
    given, as the grid file's ``settings.launcher`` mapping spells it.

    Example: ``Launch(nnodes=2, node_rank=1, master_addr="10.0.0.1").nnodes_or_1 == 2``.
    """

    nnodes: int | None = None
    node_rank: int | None = None
    master_addr: str | None = None
    master_port: int | None = None

    DEFAULT_ADDR = "127.0.0.1"
    DEFAULT_PORT = 29500

    @classmethod
    def from_dict(cls, d: "dict | Launch | None", where: str = "launcher") -> "Launch":
        if isinstance(d, Launch):
            return d
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise FtbenchError(f"invalid {where}={d!r}: must be a mapping such as {{nnodes: 2, master_addr: host}}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise FtbenchError(f"unknown {where} key(s) {unknown}; allowed: {', '.join(sorted(known))}")
        types = {"nnodes": int, "node_rank": int, "master_addr": str, "master_port": int}
        for k, v in d.items():
            if v is not None and (not isinstance(v, types[k]) or isinstance(v, bool)):
                raise FtbenchError(f"invalid {where}.{k}={v!r}: must be {types[k].__name__}")
        return cls(**d)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def nnodes_or_1(self) -> int:
        """Nodes the world spans (1 unless given)."""
        return max(1, self.nnodes or 1)

    @property
    def rank(self) -> int:
        return self.node_rank or 0

    @property
    def addr(self) -> str:
        return self.master_addr or self.DEFAULT_ADDR

    @property
    def port(self) -> int:
        return self.master_port or self.DEFAULT_PORT

    def with_(self, **changes) -> "Launch":
        return replace(self, **changes)


@dataclass(frozen=True)
class CellSpec:
    """Everything needed to run (or rerun) one cell.

    Example::

        CellSpec(task="generation", backend="eager", model="tiny-gpt2",
                 recipe=Recipe(steps=20))
    """

    #: ``Spec`` values; text given here (``"deepspeed:stage=3"``) is parsed once, on construction.
    task: Spec
    backend: Spec
    model: str
    data: str = "builtin"
    recipe: Recipe = field(default_factory=Recipe)
    nproc: int = 1
    time_limit_s: float | None = 900.0
    memory_limit_mb: float | None = None
    eval_examples: int = 64
    columns: tuple[tuple[str, str], ...] = ()
    repeat: int = 0
    launcher: Launch = field(default_factory=Launch)
    device: str = "auto"
    #: Extra steps profiled after training and evaluation (``--profile``; 0: off), and where the
    #: traces go (the result set's ``traces/``, set by the driver).
    profile_steps: int = 0
    profile_dir: str | None = None
    #: Evaluate the held-out split every N optimizer steps (0: only after training).
    eval_every: int = 0
    #: Quality target, e.g. "perplexity=20" (see ftbench.harness.contract.targets).
    target: str | None = None
    #: End the cell once its target is reached.
    stop_at_target: bool = False
    #: What a CPU cell's memory peak counts: ``resident`` (glibc's defaults) or ``live``
    #: (freed tensors leave the resident set; slower), see ftbench.harness.cell.hostalloc.
    cpu_memory: str = "resident"
    #: Let a model directory or hub model run its own Python code (``--trust-remote-code``); a
    #: permission, not a setting of the cell, so it stays out of the cell id.
    trust_remote_code: bool = False
    #: Optimizations of the cell, ``NAME[:key=value]+NAME...`` (``--opt``; empty: none).
    opt: str = ""

    def __post_init__(self):
        # Frozen: the parsed values replace the text given, once, before anyone reads them.
        object.__setattr__(self, "task", Spec.parse(self.task, "task"))
        object.__setattr__(self, "backend", Spec.parse(self.backend, "backend"))
        object.__setattr__(self, "launcher", Launch.from_dict(self.launcher))

    def identity(self) -> dict:
        """The configuration that defines the cell (no repeat index, no limits)."""
        d = self.to_dict()
        for k in ("repeat", "time_limit_s", "memory_limit_mb", "launcher", "profile_steps", "profile_dir",
                  "trust_remote_code"):
            d.pop(k)
        d = _without_later_defaults(d, CellSpec)
        if self.nnodes > 1:
            # Two nodes x one rank is another world than one node x one rank (single-node ids unchanged).
            d["nnodes"] = self.nnodes
        return d

    @property
    def nnodes(self) -> int:
        """Nodes the cell's world spans (``launcher.nnodes``; 1 for single-node cells)."""
        return self.launcher.nnodes_or_1

    @property
    def micro_batch(self) -> int:
        """Examples per rank per forward pass (:meth:`Recipe.micro_batch` over the cell's ranks)."""
        return self.recipe.micro_batch(self.nproc)

    @property
    def cell_id(self) -> str:
        return _hash(self.identity())

    def fingerprint(self) -> str:
        return self.recipe.fingerprint(self.task.name, self.task.options, self.model, self.data, self.columns)

    def to_dict(self) -> dict:
        """Plain JSON-able values: specs as their spelling, the launch as its given keys."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(task=str(self.task), backend=str(self.backend), recipe=asdict(self.recipe),
                 launcher=self.launcher.to_dict(), columns=[list(c) for c in self.columns])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CellSpec":
        d = dict(d)
        recipe = d.pop("recipe", {}) or {}
        if "betas" in recipe:
            recipe["betas"] = tuple(recipe["betas"])
        d["columns"] = tuple(tuple(c) for c in d.get("columns", ()))
        known = {f.name for f in fields(cls)}
        return cls(recipe=Recipe(**recipe), **{k: v for k, v in d.items() if k in known})

    def with_(self, **changes) -> "CellSpec":
        return replace(self, **changes)


#: Settings added after the first release.  While one is at its default it is
#: left out of cell ids and recipe fingerprints, so that adding a setting does
#: not change the id of every existing cell (committed baselines and earlier
#: result sets keep pairing with new runs).  A new field of Recipe or CellSpec
#: belongs here; ``tests/test_grid.py`` checks the committed baseline's ids.
ADDED_LATER: frozenset[str] = frozenset({"eval_every", "target", "stop_at_target", "recipe_defaults",
                                          "packing", "cpu_memory", "trust_remote_code", "numerics", "opt"})


def _without_later_defaults(d: dict, cls) -> dict:
    defaults = {f.name: (f.default_factory() if f.default_factory is not MISSING else f.default)
                for f in fields(cls)}
    out = {}
    for k, v in d.items():
        if k == "recipe" and isinstance(v, dict):
            v = _without_later_defaults(v, Recipe)
        if k in ADDED_LATER and _same(v, defaults.get(k)):
            continue
        out[k] = v
    return out


def _same(value, default) -> bool:
    norm = lambda x: list(x) if isinstance(x, tuple) else x  # noqa: E731 - JSON turns tuples into lists
    return norm(value) == norm(default)


RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))
#: Recipe settings that change what a step computes (the rest change only how it is split or timed).
FINGERPRINT_FIELDS = tuple(f for f in RECIPE_FIELDS if f not in ("warmup", "grad_accum", "grad_checkpointing"))
