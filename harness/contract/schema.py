"""The result record's schema: every key of a ``results.jsonl`` record, written once.

One :class:`Key` per record key says its type, unit, meaning and where it
comes from (rank 0's report, every rank, a figure aggregated over the ranks,
or the driver that runs the grid).  The same table

* builds the record: :mod:`ftbench.harness.results.record` copies every
  rank-0 key that has no ``how`` from rank 0's report, so a new figure the
  worker measures needs one line here and nothing else;
* validates it: :func:`validate_record` is what the one reader of result sets
  (:mod:`ftbench.harness.results.store`) checks each line against;
* documents it: ``docs/records.md`` is :func:`render_markdown`'s output
  (``python -m ftbench.harness.contract.schema > docs/records.md``), and a
  test fails when the two differ.

Example::

    KEYS["tokens_per_s"].unit             # 'tokens/s'
    validate_record({"cell_id": "ab", "status": 5})
    # "status: 5 is not one of ['ok', 'error', ...]"

Adding a key is one line in :data:`RECORD`; changing a key's type, unit or
meaning, or removing one, is a new :data:`SCHEMA_VERSION` (see
``docs/records.md``).
"""

from __future__ import annotations

import functools
import json
import math
import sys
from dataclasses import dataclass
from typing import Callable

import jsonschema

#: The version of this schema that new records follow, stored in each record as ``schema_version``.
#: Records written before the key existed (the committed baseline among them) carry none and
#: are version 1; this module's first definition is therefore 2.
SCHEMA_VERSION = 2

#: A record without ``schema_version`` was written before it existed.
UNVERSIONED = 1

#: How a cell ended.  ``cancelled``: a Slurm job cancelled or preempted before its cell finished.
STATUSES = ("ok", "error", "oom", "diverged", "timeout", "skipped", "cancelled")

# Where a key's value comes from.
RANK0 = "rank 0"          # rank 0's report, taken as it is (its figures are already global)
ALL_RANKS = "all ranks"   # one entry per rank
AGGREGATED = "aggregated"  # computed over every rank's report (max, sum, first that says so)
DRIVER = "driver"         # the process running the grid: the cell's spec, its processes, or later checks
SOURCES = (RANK0, ALL_RANKS, AGGREGATED, DRIVER)

#: Every record carries it (``when`` None), possibly as null.
ALWAYS = None


@dataclass(frozen=True)
class Key:
    """One record key.

    ``type`` is one of :data:`TYPES`; ``nullable`` says null is a valid
    value; ``when`` is None for a key every record carries, else the
    condition under which it appears; ``how`` says how a non-copied value is
    derived (None: rank 0's same-named figure, copied as it is);
    ``from_rank`` names the rank-report keys it is built from; ``empty`` is
    the value a copied key takes when rank 0 did not report it; ``shape`` is
    extra JSON Schema for the parts readers rely on.

    Example::

        Key("eval_s", "float", "s", RANK0, "evaluation after training")
    """

    name: str
    type: str
    unit: str
    source: str
    meaning: str
    nullable: bool = True
    when: str | None = ALWAYS
    how: str | None = None
    from_rank: tuple[str, ...] | None = None
    empty: Callable[[], object] | None = None
    shape: dict | None = None

    @property
    def rank_keys(self) -> tuple[str, ...]:
        """The keys of a rank's report this record key is made from."""
        if self.from_rank is not None:
            return self.from_rank
        return (self.name,) if self.source in (RANK0, AGGREGATED) else ()

    @property
    def copied(self) -> bool:
        """Taken from rank 0's report unchanged (the record builder's generic case)."""
        return self.source == RANK0 and self.how is None


# A float is a finite number (NaN, Infinity and an overflowing 1e400 are refused as read). JSON has no
# NaN or infinity, so the writer stores a non-finite value as one of these strings: only losses and
# metrics may be one (a diverging run), never a time, a throughput or a size.
_NON_FINITE = ("nan", "inf", "-inf")
_NUMBER = {"type": "number"}
_FLOAT = {"type": ["number", "string"], "pattern": "^(nan|inf|-inf)$"}
# A list of floats (a loss curve, every step's time) is checked by one keyword of ours, in one
# loop: jsonschema's per-item descent costs ~50 us an item, seconds for a history of long runs.
FLOAT_ITEMS = "ftbenchFloatItems"

#: The types a key may have, as JSON Schema.
TYPES = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": _NUMBER,
    "float|nan|inf": _FLOAT,
    "bool": {"type": "boolean"},
    "object": {"type": "object"},
    "list[float]": {"type": "array", FLOAT_ITEMS: "finite"},
    "list[float|nan|inf]": {"type": "array", FLOAT_ITEMS: "any"},
    "list[str]": {"type": "array", "items": {"type": "string"}},
    "list[object]": {"type": "array", "items": {"type": "object"}},
}

_COUNTS = {"additionalProperties": {"type": "integer"}}
_NULLABLE_NUMBER = {"type": ["number", "null"]}
_NULLABLE_FLOAT = {**_FLOAT, "type": _FLOAT["type"] + ["null"]}
_STEP_STATS = {"properties": {k: _NULLABLE_NUMBER
                              for k in ("median", "mean", "min", "max", "iqr", "stdev")}
               | {"n": {"type": "integer"}}}
#: Task metrics by name (``Task.evaluate`` returns ``dict[str, float]``).
_METRICS = {"additionalProperties": _NULLABLE_FLOAT}
_EVAL_POINT = {"type": "object", "required": ["step", "train_s"],
               "properties": {"step": {"type": "integer"}, "train_s": _NUMBER,
                              "metrics": {"type": "object", **_METRICS}}}
_PROFILE = {"properties": {"phases_s": {"type": "object", "additionalProperties": _NUMBER},
                           "step_s": _NULLABLE_NUMBER,
                           "traces": {"type": "object", "additionalProperties": {"type": "string"}}}}
_PARITY = {"properties": {"status": {"type": "string"}, "passed": {"type": "boolean"},
                          **{k: _NULLABLE_FLOAT for k in ("max_rel_dev", "window_max_rel_dev")},
                          "tolerance": _NULLABLE_NUMBER,
                          **{k: {"type": ["integer", "null"]} for k in ("worst_step", "left_tolerance_at_step")}}}


def _k(name, type_, unit, source, meaning, **kw) -> Key:
    return Key(name, type_, unit, source, meaning, **kw)


#: Every key of a result record, grouped as docs/records.md shows them.
RECORD: tuple[Key, ...] = (
    # ---- identity: which cell, which recipe, how it ended
    _k("schema_version", "int", "", DRIVER, "version of this schema the record follows; absent in records "
       "written before it existed, which are version 1", nullable=False),
    _k("cell_id", "str", "", DRIVER, "stable id of the cell's configuration (same configuration, same id)",
       nullable=False),
    _k("recipe_fingerprint", "str", "", DRIVER, "hash of everything that defines the math of a step; only cells "
       "with equal fingerprints are compared"),
    _k("task", "str", "", DRIVER, "task, with its options as given"),
    _k("backend", "str", "", DRIVER, "backend, with its options as given (`deepspeed:stage=3`)"),
    _k("model", "str", "", DRIVER, "model preset, Hugging Face id or local directory"),
    _k("data", "str", "", DRIVER, "`builtin`, a local directory or `hf:NAME`"),
    _k("nproc", "int", "ranks", DRIVER, "ranks per node"),
    _k("nnodes", "int", "nodes", DRIVER, "nodes the cell ran on (a multi-node record comes from node 0)"),
    _k("world_size", "int", "ranks", RANK0, "ranks in all", how="rank 0's WORLD_SIZE, else nproc x nnodes"),
    _k("repeat", "int", "", DRIVER, "which repeat of the cell (0, 1, ...)", nullable=False),
    _k("status", "str", "", DRIVER, "how the cell ended: " + ", ".join(f"`{s}`" for s in STATUSES),
       nullable=False, how="the driver's verdict from the ranks' reports and exit", from_rank=("status",),
       shape={"enum": list(STATUSES)}),
    _k("error", "str", "", DRIVER, "what went wrong, for a cell that is not ok; else null",
       how="the first failing rank's error, or the driver's", from_rank=("error",)),
    _k("started_at", "str", "ISO 8601 UTC", DRIVER, "when the driver started the cell"),
    _k("wall_s", "float", "s", DRIVER, "the cell's wall time, process start to exit"),
    _k("launch", "object", "", DRIVER, "how the cell was started: `mode` (`fork` from the warm server, `exec`, "
       "`torchrun`) and, for several ranks, where their rendezvous store listened (`store`: `bind`, `port`)"),
    _k("machine_load", "object", "", AGGREGATED, "the machine's load over the timed steps: `other_cpu_share`, "
       "`steal_share` (shares of all cores), `loadavg_1m`, `cpu_mhz`, `window_s` (docs/comparisons.md)",
       how="from every rank's reading of /proc/stat and its own CPU time", from_rank=("machine_load_reading",)),
    _k("run_order", "object", "", DRIVER, "`order` of the grid, this cell's `position` and `of` how many",
       when="written by the local and multi-node launchers"),
    _k("config", "object", "", DRIVER, "everything needed to rerun the cell (the cell spec and its recipe)",
       nullable=False, shape={"properties": {"repeat": {"type": "integer"}, "recipe": {"type": "object"},
                                             "columns": {"type": "array"}}}),
    _k("recipe_defaults", "str", "", DRIVER, "which recipe defaults applied: `scratch` or `pretrained`"),
    _k("environment", "object", "", DRIVER, "versions, machine, device and git commit of the project",
       nullable=False, how="the run's environment with rank 0's `device`", from_rank=("device",),
       shape={"properties": {"device": {"type": "object"}, "versions": {"type": "object"}}}),
    # ---- throughput: steady state, global, warmup excluded
    _k("tokens_per_s", "float", "tokens/s", RANK0, "non-pad tokens of the measured steps over their time, "
       "all ranks together"),
    _k("samples_per_s", "float", "samples/s", RANK0, "examples of the measured steps over their time"),
    _k("padded_tokens_per_s", "float", "tokens/s", RANK0, "as tokens_per_s, counting padding"),
    _k("loss_tokens_per_s", "float", "tokens/s", RANK0, "as tokens_per_s, counting only tokens that carry loss"),
    _k("tokens", "object", "tokens", RANK0, "`padded`, `nonpad`, `loss` tokens and `samples` of the measured "
       "steps", shape=_COUNTS),
    _k("step_time_s", "float", "s", RANK0, "median steady-state step time", how="rank 0's step_time median",
       from_rank=("step_time",)),
    _k("step_time", "object", "s", RANK0, "steady-state step times: median, mean, min, max, iqr, stdev, n",
       how="rank 0's, null when empty", shape=_STEP_STATS),
    _k("step_times_s", "list[float]", "s", RANK0, "every optimizer step's time, warmup included"),
    _k("pad_fraction", "float", "fraction", RANK0, "share of the padded tokens that are padding"),
    _k("flops_per_s", "float", "FLOP/s", AGGREGATED, "model FLOPs of the measured steps over their time",
       how="sum over ranks; null unless every rank reported"),
    _k("peak_flops", "float", "FLOP/s", AGGREGATED, "the devices' peak for matmul_dtype",
       how="sum over ranks; null unless every rank reported"),
    _k("peak_flops_source", "str", "", RANK0, "where the peak comes from (table entry or measurement)"),
    _k("mfu", "float", "fraction", AGGREGATED, "flops_per_s / peak_flops, never above 1",
       how="from flops_per_s and peak_flops; null when a rank is missing or the peak does not apply",
       from_rank=()),
    _k("mfu_note", "str", "", AGGREGATED, "why mfu is withheld", when="an mfu above 1 was withheld",
       from_rank=()),
    _k("compile_s", "float", "s", RANK0, "extra time of the warmup steps over the steady state; null where "
       "nothing compiles"),
    _k("backend_stats", "object", "", RANK0, "the engine's own figures (`Engine.stats()`)", empty=dict),
    # ---- setup
    _k("setup_s", "float", "s", RANK0, "launch to the first training step (process start, imports, data, "
       "model, engine)"),
    _k("setup_phases", "object", "s", RANK0, "setup_s by phase (imports, data, tokenizer, model, encode, "
       "engine)"),
    _k("rows_read", "object", "rows", RANK0, "rows of each split the cell read (docs/data.md)"),
    _k("as_run", "object", "", AGGREGATED, "what the cell actually computed, for the fairness check: loss "
       "normalisation, precision policy, optimizer, weight decay, attention, data order digest, the stack's "
       "differences from the recipe (docs/fairness.md)", how="rank 0's account with one data-order digest over "
       "every rank's rows", from_rank=("as_run",)),
    _k("lr_per_step", "list[float]", "", RANK0, "the learning rate of every optimizer step"),
    _k("step_tokens", "object", "tokens", RANK0, "tokens per optimizer step: padded, real, loss-bearing"),
    _k("optimizations", "list[object]", "", RANK0, "the cell's --opt optimizations as applied: name, options, "
       "what each changes and whether it keeps the math (docs/optimizations.md)"),
    _k("packing_probe", "object", "", RANK0, "per-document loss of packed rows against the same documents "
       "unpacked (docs/optimizations.md)", when="a packed cell"),
    _k("opt_verdict", "object", "", DRIVER, "an optimized cell against the same cell without its optimizations: "
       "parity for exact ones, held-out loss and metric within the declared tolerance for the others",
       when="a cell with --opt"),
    _k("provenance", "object", "", RANK0, "content digests: `model_digest`, `data_digest` (the rows read), "
       "`tokenizer_digest`; on CUDA `software` (driver, CUDA, cuDNN, NCCL) (docs/tracking.md)"),
    _k("truncated_examples", "object", "examples", RANK0, "examples cut at seq_len, per split", shape=_COUNTS),
    _k("truncated_tokens", "object", "tokens", RANK0, "tokens cut at seq_len, per split", shape=_COUNTS),
    _k("packed_rows", "int", "rows", RANK0, "training rows after --packing; null without packing"),
    # ---- model
    _k("model_kind", "str", "", RANK0, "`decoder`, `encoder-decoder` or `encoder`"),
    _k("vocab_size", "int", "tokens", RANK0, "the tokenizer's vocabulary"),
    _k("total_params", "int", "parameters", RANK0, "parameters of the model (LoRA adapters included)"),
    _k("trainable_params", "int", "parameters", RANK0, "parameters that train (fewer under LoRA or freezing)"),
    _k("param_bytes", "int", "bytes", RANK0, "bytes the model's parameters occupy as built"),
    _k("state_bytes_theory", "int", "bytes", RANK0, "fp32 weights + gradients + two AdamW moments: "
       "4 x (total + 3 x trainable)"),
    _k("weights_stored_dtype", "str", "", RANK0, "dtype of the checkpoint's weights on disk (null for presets)"),
    _k("weights_dtype", "str", "", RANK0, "dtype the weights train in"),
    _k("matmul_dtype", "str", "", RANK0, "dtype of the matrix products (autocast)"),
    # ---- memory
    _k("memory_kind", "str", "", RANK0, "what peak_memory_bytes is: `cuda_peak_allocated` or the CPU "
       "peak resident set under --cpu-memory", how="from rank 0's device and cpu_memory",
       from_rank=("device", "cpu_memory")),
    _k("peak_memory_bytes", "int", "bytes", AGGREGATED, "the larger of the setup and training peaks, max "
       "over ranks", from_rank=("memory",)),
    _k("setup_peak_memory_bytes", "int", "bytes", AGGREGATED, "peak before the first training step, max over "
       "ranks", from_rank=("memory",)),
    _k("train_peak_memory_bytes", "int", "bytes", AGGREGATED, "peak of the training window, max over ranks",
       from_rank=("memory",)),
    _k("memory_window_reset", "str", "", AGGREGATED, "how the training window's peak was separated from setup",
       from_rank=("memory",)),
    _k("setup_peak_reset_by", "list[str]", "", AGGREGATED, "who reset the peak statistics inside setup (e.g. "
       "DeepSpeed ZeRO-1/2); the setup peak keeps what was reached before", from_rank=("memory",)),
    _k("memory_figures", "object", "", AGGREGATED, "what each CUDA memory figure is (allocated, reserved, "
       "driver-used)", when="on CUDA", from_rank=("memory",)),
    _k("peak_reserved_bytes", "int", "bytes", AGGREGATED, "CUDA memory reserved by the caching allocator, max "
       "over ranks", when="on CUDA", from_rank=("memory",)),
    _k("driver_used_bytes", "int", "bytes", AGGREGATED, "device memory in use by every process (CUDA driver), "
       "max over ranks", when="on CUDA", from_rank=("memory",)),
    _k("memory_per_rank", "list[object]", "bytes", ALL_RANKS, "each rank's peaks: both windows, and "
       "`after_eval` (the peaks once evaluation ended)", nullable=False,
       from_rank=("rank", "memory", "memory_after_eval")),
    _k("memory_tree_peak_bytes", "int", "bytes", DRIVER, "peak resident memory of the cell's whole process "
       "tree, sampled by the driver"),
    _k("rss_before_model_bytes", "int", "bytes", RANK0, "resident memory before the model existed (libraries, "
       "data)"),
    _k("cpu_memory", "str", "", RANK0, "the --cpu-memory mode in effect (`resident` or `live`)"),
    _k("cpu_memory_note", "str", "", RANK0, "why --cpu-memory live fell back to resident"),
    _k("micro_batch", "int", "examples", DRIVER, "examples per rank per forward/backward"),
    _k("memory_predicted_bytes", "int", "bytes", DRIVER, "the memory model's predicted peak per rank "
       "(docs/memory.md)"),
    _k("memory_predicted", "object", "", DRIVER, "the prediction's breakdown and phases, or its `error`",
       when="the prediction was attempted (not for multi-node cells)"),
    _k("micro_batch_search", "object", "", DRIVER, "what --micro-batch auto probed and chose",
       when="--micro-batch auto", shape={"properties": {"cell_id": {"type": "string"}}}),
    # ---- quality
    _k("train_loss", "list[float|nan|inf]", "loss", RANK0, "global loss of every optimizer step", nullable=False,
       empty=list),
    _k("eval_loss", "float|nan|inf", "loss", RANK0, "held-out loss after training"),
    _k("metric", "str", "", RANK0, "the task's primary metric, e.g. `perplexity`, `accuracy`"),
    _k("metric_value", "float|nan|inf", "", RANK0, "its value after training"),
    _k("higher_is_better", "bool", "", RANK0, "the metric's direction"),
    _k("metrics", "object", "", RANK0, "every metric of the task, by name (eval_loss among them)",
       nullable=False, empty=dict, shape=_METRICS),
    _k("metrics_before", "object", "", RANK0, "a pretrained model's metrics before tuning; null for presets",
       shape=_METRICS),
    _k("eval_examples", "int", "examples", RANK0, "validation examples evaluated"),
    _k("eval_s", "float", "s", RANK0, "the evaluation after training"),
    _k("eval_before_s", "float", "s", RANK0, "the evaluation before tuning"),
    _k("diverged_at_step", "int", "step", AGGREGATED, "first step whose loss was not finite",
       how="the first rank that says so"),
    _k("parity", "object", "", DRIVER, "the loss curve against the reference backend's (status, max_rel_dev, "
       "tolerance, passed...)", when="written by `ftbench run`", shape=_PARITY),
    # ---- time to quality (docs/time-to-quality.md)
    _k("eval_curve", "list[object]", "", RANK0, "evaluations during training: step, train_s, metrics",
       shape={"items": _EVAL_POINT}),
    _k("eval_every", "int", "steps", RANK0, "steps between evaluations during training"),
    _k("eval_during_training_s", "float", "s", RANK0, "time spent evaluating during training (outside the step "
       "clock)"),
    _k("target", "object", "", RANK0, "the quality target: metric, value, direction, text"),
    _k("target_reached", "bool", "", RANK0, "whether the target was reached"),
    _k("steps_to_target", "int", "steps", RANK0, "optimizer steps until the target"),
    _k("time_to_target_s", "float", "s", RANK0, "training time until the target"),
    _k("stopped_at_target", "bool", "", RANK0, "training stopped when it reached the target"),
    # ---- extras
    _k("profile", "object", "", AGGREGATED, "--profile: rank 0's phase breakdown, every rank's trace and phases",
       how="rank 0's breakdown, every rank's trace path", shape=_PROFILE),
    _k("slurm", "object", "", DRIVER, "job id, state and host", when="--launcher slurm"),
    _k("warnings", "list[str]", "", DRIVER, "what a reader of the figures must know (leftover processes, "
       "tuning that made the loss worse)", when="there is something to warn about"),
    _k("leftover_processes", "list[object]", "", DRIVER, "processes the cell left running, which ftbench killed",
       when="the cell left processes behind"),
    _k("stderr_tail", "str", "", DRIVER, "the end of the cell's stderr", when="the cell failed"),
    _k("traceback", "str", "", AGGREGATED, "the failing rank's traceback", when="a rank raised",
       how="the first rank that has one"),
)

#: Each key by name.
KEYS: dict[str, Key] = {k.name: k for k in RECORD}

#: Keys of a rank's report (``rank<R>.json``) that go into no record key, with the reason.
RANK_ONLY = {"pid": "the rank's process id, to match a rank file with a log"}


def rank_report_keys() -> set[str]:
    """Every key a rank's report may hold: those record keys are built from, and :data:`RANK_ONLY`."""
    return {r for k in RECORD for r in k.rank_keys} | set(RANK_ONLY)


def copied_from_rank0() -> tuple[Key, ...]:
    """The keys the record takes unchanged from rank 0's report."""
    return tuple(k for k in RECORD if k.copied)


def always_present() -> tuple[str, ...]:
    """Keys every record of this version carries."""
    return tuple(k.name for k in RECORD if k.when is ALWAYS)


def version_of(record: dict) -> int:
    """The schema version ``record`` follows (1 for records written before the key existed)."""
    v = record.get("schema_version", UNVERSIONED)
    return v if isinstance(v, int) and not isinstance(v, bool) else UNVERSIONED


# ------------------------------------------------------------ validation

#: Deeper than this, a value is not a record's (the deepest key, memory_predicted, is 5 levels).
MAX_DEPTH = 32


def json_schema(portable: bool = False) -> dict:
    """The record schema as JSON Schema (draft 2020-12); unknown keys are allowed (newer writers, plugins).

    ``portable`` spells float lists with the standard ``items`` (slower here) for other tools.
    """
    props = {}
    for k in RECORD:
        typed = {**TYPES[k.type], **(k.shape or {})}
        if portable and FLOAT_ITEMS in typed:
            typed["items"] = _NUMBER if typed.pop(FLOAT_ITEMS) == "finite" else _FLOAT
        if k.nullable:
            kinds = typed["type"] if isinstance(typed["type"], list) else [typed["type"]]
            typed = {**typed, "type": kinds + ["null"]}
        props[k.name] = typed
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "ftbench result record",
            "type": "object", "required": ["cell_id", "status"], "properties": props}


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _float_items(validator, wanted, instance, schema):
    """``wanted`` "finite": every item a number; "any": a number or the writer's "nan", "inf", "-inf"."""
    if not validator.is_type(instance, "array"):
        return
    for i, x in enumerate(instance):
        if not (_is_number(x) or wanted == "any" and isinstance(x, str) and x in _NON_FINITE):
            yield jsonschema.ValidationError(f"{_short(repr(x), 60)} is not a number", path=(i,))
            return


@functools.cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json_schema()
    base = jsonschema.validators.validator_for(schema)
    base.check_schema(schema)
    return jsonschema.validators.extend(base, {FLOAT_ITEMS: _float_items})(schema)


def validate_record(record) -> str | None:
    """What is wrong with ``record`` (a parsed line), or None when it is a valid record.

    Checks what every reader relies on: an object, no nesting deeper than
    :data:`MAX_DEPTH`, finite numbers, text that can be written out again,
    and each known key's type.

    Example: ``validate_record({"cell_id": "a", "status": "ok", "repeat": "zero"})``
    is ``"repeat: 'zero' is not of type 'integer'"``.
    """
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    problem = _walk(record)
    if problem:
        return problem
    error = jsonschema.exceptions.best_match(_validator().iter_errors(record))
    if error is None:
        return None
    path = list(error.absolute_path)
    if error.schema.get("pattern") == _FLOAT["pattern"]:
        return f"{'/'.join(map(str, path))}: {_short(repr(error.instance), 60)} is not a number"
    if len(path) == 1 and path[0] in KEYS and error.validator != "enum":
        k = KEYS[path[0]]
        return f"{k.name}: {_short(repr(error.instance), 60)} is not {k.type}{' or null' if k.nullable else ''}"
    return f"{'/'.join(map(str, path)) or 'record'}: {_short(error.message)}"


def _walk(record: dict) -> str | None:
    """Depth, non-finite numbers and unwritable text, without recursion (a line may nest deeply).

    Paths are tuples until something is wrong: a loss curve has thousands of items.
    """
    stack = [(record, 1, ())]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            return f"{_where(path)}: nested deeper than {MAX_DEPTH} levels"
        for key, item in (value.items() if isinstance(value, dict) else enumerate(value)):
            if type(item) is float:
                if not math.isfinite(item):
                    return f"{_where(path + (key,))}: {item} is not a finite number"
            elif isinstance(item, str):
                if not _writable(item):
                    return f"{_where(path + (key,))}: text that is not valid Unicode"
            elif isinstance(item, (dict, list)):
                stack.append((item, depth + 1, path + (key,)))
            if isinstance(key, str) and not _writable(key):
                return f"{_where(path)}: a key is not valid text"
    return None


def _where(path: tuple) -> str:
    return "/".join(map(str, path)) or "record"


def _writable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape
        return False
    return True


def _short(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def parse_line(raw: bytes):
    """A line of ``results.jsonl`` parsed as strict JSON: UTF-8 only (json.loads would also take
    UTF-16 or -32 bytes), and no NaN or Infinity (an overflowing 1e400 parses as inf, which
    :func:`validate_record` refuses).

    Raises ValueError for anything that is not such a line (a RecursionError becomes one).
    """
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError("nested deeper than Python can parse") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


# ---------------------------------------------------------- documentation


def render_markdown() -> str:
    """``docs/records.md``: every key with its type, unit, source and meaning."""
    lines = [
        "# Result records",
        "",
        "<!-- Generated by `python -m ftbench.harness.contract.schema > docs/records.md` from",
        "     harness/contract/schema.py; tests/test_schema.py fails when this file is out of date. -->",
        "",
        "`ftbench run` appends one JSON object per cell to `OUT/results.jsonl`. This page lists every key of",
        f"such a record, as of schema version **{SCHEMA_VERSION}** (the record's `schema_version`).",
        "",
        "**Versions.** Records written before `schema_version` existed carry none and are version 1 (the",
        "committed baseline in `results/` is one); version 2 is the first that says so, with the keys below.",
        "Adding a key keeps the version (readers ignore keys they do not know); changing a key's type, unit",
        "or meaning, or removing one, makes a new version. `ftbench report`, `compare`, `history` and `merge`",
        "read every version and say which ones they read.",
        "",
        "**Reading.** Each line is checked against this schema as it is read: a line that is not a JSON",
        "object, is nested deeper than " f"{MAX_DEPTH} levels, holds a non-finite number or gives a known key",
        "a value of the wrong type is skipped with a warning naming the file and line, in every command.",
        "A `float` is a finite number. JSON has no NaN or infinity, so the writer stores a non-finite value",
        "as the string `\"nan\"`, `\"inf\"` or `\"-inf\"`; only losses and metrics (`float|nan|inf`, and the",
        "values of `metrics`) may hold one, never a time, a throughput or a size.",
        "",
        "**Source** says where a value comes from: *rank 0* — rank 0's report (`rank0.json`), whose",
        "figures are already global (throughput over all ranks, all-reduced losses, one evaluation);",
        "*all ranks* — one entry per rank; *aggregated* — computed over every rank's report; *driver* —",
        "the process running the grid (the cell's configuration, its processes, checks after the cell).",
        "**When** is empty for keys every record carries (possibly as null). The same schema as JSON Schema",
        "(draft 2020-12, for other tools): `python -m ftbench.harness.contract.schema --json`.",
        "",
        "| key | type | unit | source | when | meaning |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for k in RECORD:
        kind = k.type.replace("|", "\\|") + ("" if k.nullable else ", never null")
        meaning = k.meaning + (f" ({k.how})" if k.how else "")
        lines.append(f"| `{k.name}` | {kind} | {k.unit} | {k.source} | {k.when or ''} | {meaning} |")
    lines += ["", "A rank's report also holds: " +
              "; ".join(f"`{name}`, {why}" for name, why in RANK_ONLY.items()) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--json"]:
        print(json.dumps(json_schema(portable=True), indent=2))
    else:
        sys.stdout.write(render_markdown())
