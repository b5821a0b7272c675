"""A cell's predicted memory, its verdict against the limit, and what would fit.

Nothing here trains or starts a process: the model is built on the meta
device (shapes, no storage) to count its parameters, the backend's
:meth:`~ftbench.harness.contract.api.Engine.memory_plan` says how it shards them, and
:func:`ftbench.harness.contract.memory_model.predict` adds it all up.

Example::

    cp = plan_cell(Registry.load(), cell)
    cp.prediction.device_bytes, cp.fits, cp.suggestions
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ftbench.harness.contract.api import ENCODER_DECODER, FtbenchError
from ftbench.harness.contract.memory_model import MiB, ModelShape, ParamCounts, Prediction, harness_floor_bytes, predict
from ftbench.harness.contract.optimization import memory_effects, resolve_opts


@dataclass
class CellPlan:
    """The prediction for one cell and its verdict (``fits`` is None when unknown)."""

    cell: object
    prediction: Prediction | None
    limit_bytes: int | None
    limit_source: str
    fits: bool | None
    compared: str = "device"
    suggestions: list[str] = field(default_factory=list)
    why_unknown: str | None = None

    @property
    def compared_bytes(self) -> int | None:
        p = self.prediction
        if p is None:
            return None
        return p.tree_bytes if self.compared == "process tree" else p.device_bytes


class _VocabOnly:
    """Stands in for a preset's tokenizer when only the model's shapes matter."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


_FACTS: dict = {}


def model_facts(reg, cell) -> tuple[ParamCounts, ModelShape]:
    """Parameter counts and shape of a cell's model, built on the meta device (cached)."""
    key = (cell.model, cell.task, cell.data, cell.columns, cell.recipe.seed, cell.recipe.tuning)
    if key not in _FACTS:
        _FACTS[key] = _build_facts(reg, cell)
    return _FACTS[key]


def _preset_tokenizer(source, task, cell):
    """The preset's offline tokenizer for this data (cached on disk by the cell runs), or its nominal size.

    A preset's vocabulary is trained on the task's text and is often far
    smaller than its nominal size; the embeddings and the logits follow it.
    """
    from ftbench.harness.cell.modeling import load_tokenizer
    from ftbench.harness.cell.rowsource import load_run_data, sample_texts

    tname, topts = cell.task_name_and_options()
    options = {**dict(task.defaults), **topts}
    try:
        # The rows and tokenizer sample the cell itself reads: the same (cached) tokenizer, never the whole file.
        run = load_run_data(task, cell.data, options, cell.recipe.validate(), cell.eval_examples, 1,
                            dict(cell.columns))
        options.update(task.prepare(run.splits, options) or {})
        tok = load_tokenizer(source, sample_texts(run, task, options))
        return tok, options.get("num_labels")
    except Exception:  # noqa: BLE001 - hub data or a plugin's error: fall back to the nominal size
        return _VocabOnly(source.preset.vocab_size), None


def _build_facts(reg, cell):
    import torch

    from ftbench.harness.cell.modeling import apply_tuning, block_stacks, resolve_model
    from ftbench.harness.contract.config import parse_tuning

    tname, _ = cell.task_name_and_options()
    task = reg.task(tname)
    source = resolve_model(cell.model, reg, task)
    tokenizer, labels = _preset_tokenizer(source, task, cell) if source.preset is not None else (None, None)
    with torch.device("meta"):
        if source.preset is not None:
            model = source.preset.build(tokenizer=tokenizer, head=task.head, num_labels=labels)
        else:
            model = _from_config(source, task)
    tuning = cell.recipe.tuning
    mode, n = parse_tuning(tuning)
    model = apply_tuning(model, mode, n) or model  # a tuning that wraps the model (LoRA) returns the wrapper
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = [b for stack in block_stacks(model) for b in stack]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    largest = max([sum(p.numel() for p in b.parameters()) for b in blocks] +
                  [sum(p.numel() for p in m.parameters(recurse=False) if id(p) not in in_blocks)
                   for m in model.modules()] + [0])
    return ParamCounts(total, trainable, largest), _shape(model, source.kind, task.head)


def _from_config(source, task):
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification)

    config = AutoConfig.from_pretrained(source.path)
    if task.head == "classification":
        return AutoModelForSequenceClassification.from_config(config)
    cls = AutoModelForSeq2SeqLM if source.kind == ENCODER_DECODER else AutoModelForCausalLM
    return cls.from_config(config)


def _first(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def _shape(model, kind: str, head: str) -> ModelShape:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() or cfg
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model", default=0)
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers", default=0)
    dec = _first(cfg, "num_decoder_layers", default=layers) if kind == ENCODER_DECODER else 0
    return ModelShape(kind=kind, hidden=hidden, layers=layers, decoder_layers=dec,
                      ffn=_first(cfg, "intermediate_size", "n_inner", "d_ff", default=4 * hidden),
                      vocab=_first(cfg, "vocab_size", default=0), heads=_first(cfg, "num_attention_heads",
                                                                                  "n_head", "num_heads", default=1),
                      classification=head == "classification")


def device_type(cell) -> str:
    if cell.device != "auto":
        return cell.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_memory_bytes(dtype: str) -> int:
    if dtype == "cuda":
        import torch

        return int(torch.cuda.get_device_properties(0).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


def micro_batch_of(cell) -> int:
    r = cell.recipe
    return r.batch_size // (cell.nproc * r.grad_accum)


def predict_cell(reg, cell, micro_batch: int | None = None, backend: str | None = None,
                 nproc: int | None = None, checkpointing: bool | None = None) -> Prediction:
    """The prediction for ``cell``, optionally with another micro-batch, backend, rank count or checkpointing."""
    from ftbench.harness.contract.config import parse_spec

    bname, bopts = parse_spec(backend or cell.backend, "backend")
    spec = reg.backend(bname)
    options = spec.engine.validate_options({**dict(spec.defaults), **bopts})
    world = nproc or cell.nproc
    counts, shape = model_facts(reg, cell)
    recipe = cell.recipe if checkpointing is None else dataclasses.replace(cell.recipe,
                                                                           grad_checkpointing=checkpointing)
    effects = memory_effects(resolve_opts(reg, cell.opt))
    return predict(counts, shape, recipe, spec.engine.memory_plan(options, world), world,
                   micro_batch or micro_batch_of(cell), device_type(cell), effects)


def plan_cell(reg, cell, suggest: bool = True) -> CellPlan:
    """Predict ``cell``'s peak and judge it against ``--memory-limit-mb`` or the device's memory."""
    dtype = device_type(cell)
    if cell.memory_limit_mb:
        limit, source = int(cell.memory_limit_mb * MiB), "--memory-limit-mb"
    else:
        limit, source = device_memory_bytes(dtype), f"{dtype} memory"
    # On CPU the limit holds the cell's whole process tree; on a GPU each rank has its own device.
    compared = "process tree" if dtype == "cpu" else "device"
    try:
        pred = predict_cell(reg, cell)
    except Exception as e:  # noqa: BLE001 - a model that cannot be built on meta (or a hub id offline): no prediction
        return CellPlan(cell, None, limit, source, None, compared, why_unknown=f"{type(e).__name__}: {e}")
    cp = CellPlan(cell, pred, limit, source, None, compared)
    cp.fits = cp.compared_bytes <= limit
    if suggest and not cp.fits:
        cp.suggestions = suggestions(reg, cell, limit, compared)
    return cp


def _bytes_of(pred: Prediction, compared: str) -> int:
    return pred.tree_bytes if compared == "process tree" else pred.device_bytes


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def largest_fitting_micro_batch(reg, cell, limit: int, compared: str, **kw) -> int | None:
    """The largest micro-batch (a divisor of the per-rank batch) predicted to fit, or None."""
    nproc = kw.get("nproc") or cell.nproc
    best = None
    for m in divisors(cell.recipe.batch_size // nproc) if cell.recipe.batch_size % nproc == 0 else []:
        if _bytes_of(predict_cell(reg, cell, micro_batch=m, **kw), compared) <= limit:
            best = m
    return best


def suggestions(reg, cell, limit: int, compared: str) -> list[str]:
    """What would fit instead: a smaller micro-batch, checkpointing, another backend or more ranks."""
    out = []
    m = micro_batch_of(cell)
    smaller = largest_fitting_micro_batch(reg, cell, limit, compared)
    if smaller and smaller < m:
        out.append(f"micro-batch {smaller}: --grad-accum {cell.recipe.batch_size // (cell.nproc * smaller)} "
                   "(same global batch and recipe), or --micro-batch auto")
    if not cell.recipe.grad_checkpointing and \
            _bytes_of(predict_cell(reg, cell, checkpointing=True), compared) <= limit:
        out.append("--grad-checkpointing")
    counts = [cell.nproc] + ([2, 4, 8] if cell.nproc == 1 else [])
    for nproc in counts:
        found = []
        for name, entry in reg.backends.items():
            spec = entry.obj
            if nproc > 1 and not spec.data_parallel or name == cell.backend or reg.backend_availability(name):
                continue
            try:
                pred = predict_cell(reg, cell, backend=name, nproc=nproc)
            except FtbenchError:
                continue
            if _bytes_of(pred, compared) <= limit:
                found.append(f"{name} ({pred.plan.get('note') or 'as declared'}, "
                             f"{_bytes_of(pred, compared) / MiB:,.0f} MiB)")
        if found:
            where = "" if nproc == cell.nproc else f" with --nproc {nproc}"
            out.append(f"--backend {' / '.join(found)}{where}")
            break
    if not out:
        out.append("nothing predicted to fit: a smaller model, --seq-len, or more memory")
    return out


def check_memory_limits(reg, cells) -> None:
    """Bad input: a memory limit below what the harness itself needs, before any model exists."""
    for cell in cells:
        if not cell.memory_limit_mb or device_type(cell) != "cpu":
            continue
        bname, bopts = cell.backend_name_and_options()
        spec = reg.backend(bname)
        plan = spec.engine.memory_plan(spec.engine.validate_options({**dict(spec.defaults), **bopts}), cell.nproc)
        floor = harness_floor_bytes(cell.nproc, plan)
        if cell.memory_limit_mb * MiB < floor:
            raise FtbenchError(
                f"--memory-limit-mb {cell.memory_limit_mb:g} is below what the harness itself needs for backend "
                f"{cell.backend!r} on {cell.nproc} rank(s) before any model exists (about {floor / MiB:,.0f} MB: "
                "Python, torch, transformers, data and the backend's runtime per rank); every cell would be "
                f"killed at start. Pass --memory-limit-mb {int(floor / MiB * 1.5)} or more, or leave it out.")
