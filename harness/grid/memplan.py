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

from ftbench.harness.cell.remote_code import hf_kwargs
from ftbench.harness.contract.api import ENCODER_DECODER, FtbenchError
from ftbench.harness.contract.activations import BlockLayout
from ftbench.harness.contract.gpus import BY_NAME, CUDA_CONTEXT_BYTES, Gpu, find
from ftbench.harness.contract.memory_model import MiB, ModelShape, ParamCounts, Prediction, harness_floor_bytes, predict
from ftbench.harness.contract.specs import Spec
from ftbench.harness.contract.optimization import memory_effects, resolve_opts
from ftbench.harness.cell.modeling import block_stacks, count_params, load_tokenizer, resolve_model
from ftbench.harness.cell.rowsource import load_run_data, sample_texts
from ftbench.harness.cell.tuning import tune
from ftbench.harness.cell.mfu import flop_model


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
    gpu: Gpu | None = None
    #: With a GPU: what the ranks of one node offload to host memory, and whether this machine holds it.
    host_need_bytes: int = 0
    host_fits: bool | None = None

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
#: Training FLOPs of one micro-batch ``(batch, source_len, target_len) -> FLOPs``, per model, beside ``_FACTS``.
_FLOPS: dict = {}
#: The longest sequence a model directory's config allows (``max_position_embeddings``), by model name.
_POSITIONS: dict = {}


def model_facts(reg, cell) -> tuple[ParamCounts, ModelShape]:
    """Parameter counts and shape of a cell's model, built on the meta device (cached)."""
    key = (cell.model, cell.task, cell.data, cell.columns, cell.recipe.seed, cell.recipe.tuning)
    if key not in _FACTS:
        _FACTS[key], _FLOPS[key] = _build_facts(reg, cell)
    return _FACTS[key]


def model_flops(reg, cell):
    """The FLOP model of a cell's model (:func:`ftbench.harness.cell.mfu.flop_model`), or None if unknown."""
    model_facts(reg, cell)
    return _FLOPS.get((cell.model, cell.task, cell.data, cell.columns, cell.recipe.seed, cell.recipe.tuning))


def _preset_tokenizer(source, task, cell):
    """The preset's offline tokenizer for this data (cached on disk by the cell runs), or its nominal size.

    A preset's vocabulary is trained on the task's text and is often far
    smaller than its nominal size; the embeddings and the logits follow it.
    """
    options = {**dict(task.defaults), **cell.task.options}
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

    task = reg.task(cell.task.name)
    source = resolve_model(cell.model, reg, task, cell.trust_remote_code, describe_only=True)
    tokenizer, labels = _preset_tokenizer(source, task, cell) if source.preset is not None else (None, None)
    with torch.device("meta"):
        if source.preset is not None:
            model = source.preset.build(tokenizer=tokenizer, head=task.head, num_labels=labels)
        else:
            model = _from_config(source, task)
        cfg = getattr(model, "config", None)
        _POSITIONS[cell.model] = _first(cfg, "max_position_embeddings", "n_positions") if cfg is not None else None
        # The worker's own call: LoRA adapters are injected (on meta too), frozen parameters frozen.
        model = tune(model, cell.recipe.tuning, task.head, source.kind)
    trainable, total = count_params(model)
    blocks = [b for stack in block_stacks(model) for b in stack]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    largest = max([sum(p.numel() for p in b.parameters()) for b in blocks] +
                  [sum(p.numel() for p in m.parameters(recurse=False) if id(p) not in in_blocks)
                   for m in model.modules()] + [0])

    return (ParamCounts(total, trainable, largest), shape_of(model, source.kind, task.head)), \
        flop_model(model, source.kind)


def _from_config(source, task):
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification)

    config = AutoConfig.from_pretrained(source.path, **hf_kwargs(source.trust_remote_code))  # a hub id: its cached snapshot
    if task.head == "classification":
        return AutoModelForSequenceClassification.from_config(config, **hf_kwargs(source.trust_remote_code))
    cls = AutoModelForSeq2SeqLM if source.kind == ENCODER_DECODER else AutoModelForCausalLM
    return cls.from_config(config, **hf_kwargs(source.trust_remote_code))


def _first(cfg, *names, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return v
    return default


def _dropout(cfg, *names) -> bool:
    return any(isinstance(getattr(cfg, n, None), (int, float)) and getattr(cfg, n) > 0 for n in names)


#: Activation functions that run as one op saving only their input (else: Python ops, e.g. ``gelu_new``).
_ONE_OP_ACTIVATIONS = ("gelu", "relu", "silu", "swish", "gelu_pytorch_tanh", "quick_gelu", "gelu_fast")


def _layout(model, cfg, hidden: int, ffn: int, heads: int) -> BlockLayout:
    """What a block of this model does, read from its modules and config (docs/memory.md)."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    classes = {type(m).__name__ for m in model.modules()}
    act = str(getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", None)
              or getattr(cfg, "feed_forward_proj", None) or "gelu")
    gated = "gate_proj" in names or "wi_0" in names or act.startswith("gated")
    mlp = "swiglu" if gated else "relu" if act == "relu" else "gelu" if act in _ONE_OP_ACTIVATIONS else "gelu_tanh"
    kv_heads = _first(cfg, "num_key_value_heads", default=heads)
    head_dim = _first(cfg, "head_dim", "d_kv", default=hidden // max(heads, 1))
    attention = getattr(cfg, "_attn_implementation", None) or "sdpa"
    if not getattr(model, "_supports_attention_backend", True):
        attention = "eager"  # the family computes attention itself (T5): scores kept, whatever is configured
    t5_like = _first(cfg, "relative_attention_num_buckets", default=0) > 0
    return BlockLayout(hidden=hidden, ffn=ffn, heads=heads, kv_hidden=kv_heads * head_dim,
                       norm="rmsnorm" if any("RMSNorm" in c or c == "T5LayerNorm" for c in classes) else "layernorm",
                       mlp=mlp, attention=attention,
                       attn_dropout=_dropout(cfg, "attn_pdrop", "attention_probs_dropout_prob", "attention_dropout",
                                             "dropout_rate"),
                       hidden_dropout=_dropout(cfg, "resid_pdrop", "hidden_dropout_prob", "dropout_rate",
                                               "hidden_dropout"),
                       inner_dropout=t5_like and _dropout(cfg, "dropout_rate"),
                       fused_qkv=bool(names & {"c_attn", "qkv_proj", "query_key_value", "Wqkv"}))


def shape_of(model, kind: str, head: str) -> ModelShape:
    """The activation estimate's view of a (meta-device) model.

    Example: ``shape_of(LlamaForCausalLM(cfg), "decoder", "lm").block().mlp == "swiglu"``.
    """
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() or cfg
    hidden = _first(cfg, "hidden_size", "n_embd", "d_model", default=0)
    layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers", default=0)
    dec = _first(cfg, "num_decoder_layers", default=layers) if kind == ENCODER_DECODER else 0
    ffn = _first(cfg, "intermediate_size", "n_inner", "d_ff", default=4 * hidden)
    heads = _first(cfg, "num_attention_heads", "n_head", "num_heads", default=1)
    layout = _layout(model, cfg, hidden, ffn, heads)
    return ModelShape(kind=kind, hidden=hidden, layers=layers, decoder_layers=dec, ffn=ffn,
                      vocab=_first(cfg, "vocab_size", default=0), heads=heads,
                      classification=head == "classification", layout=layout,
                      relative_bias=_first(cfg, "relative_attention_num_buckets", default=0) > 0)


def device_type(cell) -> str:
    if cell.device != "auto":
        return cell.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def present_gpu() -> Gpu | None:
    """This machine's first CUDA device as a catalog entry (its own memory figure), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return find(props.name, int(props.total_memory))


def planning_gpu(cell, gpu: Gpu | None) -> Gpu | None:
    """The GPU a cell is planned for: ``--gpu``, else the one present when the cell trains on CUDA.

    ``--device cuda`` on a machine without CUDA, with neither ``--gpu`` nor ``--memory-limit-mb``, is bad
    input (there is nothing to compare a rank with).
    """
    if gpu is not None:
        return gpu
    if device_type(cell) != "cuda":
        return None
    found = present_gpu()
    if found is None and cell.memory_limit_mb:
        return None  # each rank is compared with the limit given
    if found is None:
        raise FtbenchError("--device cuda, but this machine has no CUDA device (torch sees none), so there is "
                           "no GPU memory to plan against. Name the GPU you plan for with --gpu NAME (e.g. --gpu h100-sxm --nproc 8; "
                           f"known: {', '.join(BY_NAME)}), or plan for this machine with --device cpu.")
    return found


def host_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def predict_cell(reg, cell, micro_batch: int | None = None, backend: str | None = None,
                 nproc: int | None = None, checkpointing: bool | None = None,
                 seq_len: int | None = None, device: str | None = None) -> Prediction:
    """The prediction for ``cell``, optionally with another micro-batch, backend, rank count, checkpointing,
    sequence length or device type (``cuda`` when planning for a named GPU)."""
    bspec = Spec.parse(backend) if backend else cell.backend
    spec = reg.backend(bspec.name)
    options = spec.engine.validate_options({**dict(spec.defaults), **bspec.options})
    world = nproc or cell.nproc
    counts, shape = model_facts(reg, cell)
    recipe = cell.recipe
    if checkpointing is not None:
        recipe = dataclasses.replace(recipe, grad_checkpointing=checkpointing)
    if seq_len is not None:
        recipe = dataclasses.replace(recipe, seq_len=seq_len)
    if micro_batch is None:
        # Another rank count keeps the global batch: each rank's micro-batch shrinks (at least 1).
        micro_batch = max(1, recipe.micro_batch(world)) if nproc else cell.micro_batch
    effects = memory_effects(resolve_opts(reg, cell.opt))
    return predict(counts, shape, recipe, spec.engine.memory_plan(options, world), world, micro_batch,
                   device or device_type(cell), effects)


def plan_cell(reg, cell, suggest: bool = True, gpu: Gpu | None = None,
              host_memory: int | None = None) -> CellPlan:
    """Predict ``cell``'s peak and judge it against ``--memory-limit-mb``, the named GPU or the device's memory.

    With a GPU (``--gpu`` or the one present) each rank is compared with its own device, less what the
    CUDA context takes; what the node's ranks offload to host memory with ``host_memory`` (bytes per
    node: ``--host-memory-gb``), else, for the GPU present, with this machine's memory.
    """
    target = planning_gpu(cell, gpu)
    dtype = "cuda" if target else device_type(cell)
    if dtype == "cuda":
        cell = dataclasses.replace(cell, device="cuda")
    if target is not None:
        limit, source = target.memory_bytes - CUDA_CONTEXT_BYTES, f"{target.name} {target.memory_gib:g} GiB " \
                                                                   "less 1 GiB CUDA context"
    elif cell.memory_limit_mb:
        limit, source = int(cell.memory_limit_mb * MiB), "--memory-limit-mb"
    else:
        limit, source = host_memory_bytes(), "cpu memory"
    # On CPU the limit holds the cell's whole process tree; on a GPU each rank has its own device.
    compared = "process tree" if dtype == "cpu" else "device"
    try:
        pred = predict_cell(reg, cell)
    except FtbenchError as e:
        if cell.model not in reg.models:
            raise  # the model named cannot be described: bad input, not an unknown verdict
        return CellPlan(cell, None, limit, source, None, compared, why_unknown=str(e))
    except Exception as e:  # noqa: BLE001 - a model that cannot be built on meta: no prediction
        return CellPlan(cell, None, limit, source, None, compared, why_unknown=f"{type(e).__name__}: {e}")
    cp = CellPlan(cell, pred, limit, source, None, compared, gpu=target)
    cp.fits = cp.compared_bytes <= limit
    if dtype == "cuda" and pred.host_bytes:
        cp.host_need_bytes = pred.host_bytes * cell.nproc
        host = host_memory or (host_memory_bytes() if gpu is None else None)
        cp.host_fits = None if host is None else cp.host_need_bytes <= host
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
    m = cell.micro_batch
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
            if nproc > 1 and not spec.data_parallel or name == str(cell.backend) or reg.backend_availability(name):
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


#: Micro-batches and sequence lengths the frontier tries (powers of two).
FRONTIER_MICRO_BATCHES = tuple(2**i for i in range(11))
FRONTIER_SEQ_LENS = tuple(2**i for i in range(7, 21))


@dataclass
class Frontier:
    """Per cell: the largest micro-batch at its ``--seq-len`` and the longest sequence at micro-batch 1
    predicted to fit, without and with checkpointing (None: not even the smallest)."""

    micro_batch: int | None
    micro_batch_checkpointed: int | None
    seq_len: int | None
    seq_len_checkpointed: int | None


def _largest(values, fits) -> int | None:
    best = None
    for v in values:
        if not fits(v):
            break  # memory grows with both: the first that does not fit ends the search
        best = v
    return best


def frontier(reg, cp: CellPlan) -> Frontier | None:
    """The capacity frontier of a planned cell on its limit (``ftbench plan --frontier``)."""
    if cp.prediction is None:
        return None
    cell, limit = cp.cell, cp.limit_bytes
    positions = _max_positions(reg, cell)
    seqs = [s for s in FRONTIER_SEQ_LENS if positions is None or s <= positions]

    def fits(**kw) -> bool:
        return _bytes_of(predict_cell(reg, cell, **kw), cp.compared) <= limit

    return Frontier(
        _largest(FRONTIER_MICRO_BATCHES, lambda m: fits(micro_batch=m, checkpointing=False)),
        _largest(FRONTIER_MICRO_BATCHES, lambda m: fits(micro_batch=m, checkpointing=True)),
        _largest(seqs, lambda s: fits(micro_batch=1, seq_len=s, checkpointing=False)),
        _largest(seqs, lambda s: fits(micro_batch=1, seq_len=s, checkpointing=True)))


def _max_positions(reg, cell) -> int | None:
    if cell.model in reg.models:
        return getattr(reg.model(cell.model), "max_positions", None)
    model_facts(reg, cell)
    return _POSITIONS.get(cell.model)


def check_memory_limits(reg, cells) -> None:
    """Bad input: a memory limit below what the harness itself needs, before any model exists."""
    for cell in cells:
        if not cell.memory_limit_mb or device_type(cell) != "cpu":
            continue
        spec = reg.backend(cell.backend.name)
        plan = spec.engine.memory_plan(spec.engine.validate_options({**dict(spec.defaults), **cell.backend.options}),
                                       cell.nproc)
        floor = harness_floor_bytes(cell.nproc, plan)
        if cell.memory_limit_mb * MiB < floor:
            raise FtbenchError(
                f"--memory-limit-mb {cell.memory_limit_mb:g} is below what the harness itself needs for backend "
                f"{str(cell.backend)!r} on {cell.nproc} rank(s) before any model exists (about {floor / MiB:,.0f} MB: "
                "Python, torch, transformers, data and the backend's runtime per rank); every cell would be "
                f"killed at start. Pass --memory-limit-mb {int(floor / MiB * 1.5)} or more, or leave it out.")
