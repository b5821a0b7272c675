"""What a training cell needs in memory, per rank, before it runs.

The model adds up, per rank:

* **model states** (the ZeRO paper's term): weights, gradients and the two
  AdamW moments, each divided over the ranks the backend shards it across,
  plus a backend's own fp32 copy of its weight shard (ZeRO-style optimizers
  keep one) and extra gradient buffers (data-parallel reduction buckets).  Weights and moments are
  fp32: mixed precision in ftbench is autocast over fp32 weights, so a
  lower precision adds autocast's cached low-precision copies of the
  weights instead of shrinking them;
* **activations** saved for backward, per block term by term as the
  model's family builds it (:mod:`ftbench.harness.contract.activations`),
  per token of the micro-batch, with or without activation checkpointing
  (measured with saved-tensor hooks on GPT-2, Llama, Qwen2, Mistral, BERT
  and T5, see docs/memory.md);
* on CPU, the **harness's own footprint** (Python, torch, transformers, the
  data) and what the backend's runtime adds;
* what the cell's **optimizations** change (``--opt``, a :class:`MemoryEffects`):
  a chunked or fused loss replaces the full-logits term by one chunk's, 8-bit
  moments cost 2 bytes per parameter instead of 8, an optimizer stepping in
  backward holds one parameter's gradient at a time, offloaded activations
  move to the host (docs/optimizations.md).

A backend says how it shards through :meth:`ftbench.Engine.memory_plan`,
which returns a :class:`MemoryPlan`; the core never names a backend.

Example::

    counts = ParamCounts(total=124_000_000, trainable=124_000_000, largest_layer=38_000_000)
    pred = predict(counts, shape, recipe, MemoryPlan(optimizer_shards=2, grads_shards=2,
                                                     master_weights=True), world_size=2, micro_batch=4)
    pred.device_bytes, pred.breakdown["optimizer"]
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, replace

from ftbench.harness.contract.activations import BlockLayout, block_bytes_per_token

MiB = 2**20
FP32 = 4
#: Bytes per element of autocast's low-precision weight copies and activations.
LOW_PRECISION = {"fp32": 4, "bf16": 2, "fp16": 2}
#: Resident memory of a CPU cell process besides its model: Python, torch, transformers,
#: the harness, data and tokenizer (``rss_before_model_bytes``: 295-365 MiB; a fork-server
#: cell also has its backends' libraries imported by then), plus what the first training step
#: maps.  Measured under ``--cpu-memory live`` as a cell's peak less its predicted model part:
#: 324-385 MiB for eager, ddp and fsdp at 3.3M and 57M parameters (docs/memory.md).
HARNESS_CPU_BYTES = 350 * MiB
#: The process that starts a multi-rank cell's ranks (torchrun's agent, forked with the harness's
#: libraries loaded), CPU tree only: a probe's tree peak less its ranks' peaks, 328-350 MiB (docs/memory.md).
LAUNCHER_CPU_BYTES = 340 * MiB


@dataclass(frozen=True)
class MemoryPlan:
    """How a backend holds the training state on each rank.

    Each ``*_shards`` is the number of ranks a component is split across
    (1: every rank holds all of it).  ``offload_optimizer`` moves the AdamW
    moments, the fp32 master copy and the fp32 gradient partition to host
    memory (the optimizer steps on the CPU); ``offload_weights`` moves the
    weight shards there too.  ``master_weights``: the backend keeps its own
    fp32 copy of its weight shard beside the model's weights.
    ``grad_buffers``: extra gradient-sized buffers, as a multiple of the
    full gradients (reduction buckets as large as the gradients: 1.0).  ``gathered_layers``: with
    sharded weights, how many of the largest layers are gathered in full at
    once (weights and their gradients); ``gathered_params``: weights (in
    parameters, at most all of them) that stay gathered through the forward
    pass instead (ZeRO-3's prefetch and reuse), ``gather_copies`` times
    (2 when gathered weights are also copied in from host memory).
    ``host_buffers``: staging copies of the rank's optimizer partition that
    an offloading optimizer keeps in host memory.  ``bucket_params``: elements
    of one gradient reduction bucket (at most the trainable parameters), of
    which ``persistent_buckets`` live for the whole run and ``reduce_copies``
    exist while a bucket is reduced (the bucket and its copies for the
    collective); ``bucket_hidden_sq`` sizes the bucket from the model instead,
    in multiples of hidden² elements (Hugging Face's DeepSpeed "auto" sizing).  ``step_copies``: temporaries of the optimizer step, in
    copies of the rank's fp32 optimizer partition.  ``runtime_bytes``: what
    the backend's libraries add to each rank's host footprint (CPU only).

    The peak is the persistent state plus the largest of three transient
    phases: forward/backward (activations, gathered weights), gradient
    reduction (bucket copies) and the optimizer step (its temporaries).

    Example (ZeRO-2 over 2 ranks, from a backend plugin)::

        @classmethod
        def memory_plan(cls, options, world_size):
            return MemoryPlan(grads_shards=world_size, optimizer_shards=world_size,
                              master_weights=True)
    """

    weights_shards: int = 1
    grads_shards: int = 1
    optimizer_shards: int = 1
    offload_optimizer: bool = False
    offload_weights: bool = False
    master_weights: bool = False
    grad_buffers: float = 0.0
    gathered_layers: int = 0
    gathered_params: int = 0
    gather_copies: int = 1
    host_buffers: float = 0.0
    bucket_params: int = 0
    bucket_hidden_sq: float = 0.0
    persistent_buckets: int = 0
    reduce_copies: int = 0
    step_copies: float = 0.0
    runtime_bytes: int = 0
    note: str = ""


@dataclass(frozen=True)
class ParamCounts:
    """Parameters of a model: all, trainable (LoRA or frozen layers: fewer), largest layer."""

    total: int
    trainable: int
    largest_layer: int = 0


@dataclass(frozen=True)
class ModelShape:
    """What the activation estimate needs: kind, widths, depths and vocabulary.

    ``layers`` counts encoder (or decoder-only) blocks, ``decoder_layers``
    the decoder blocks of an encoder-decoder model.  ``layout`` says what a
    block does (norms, MLP, attention kernel, dropout); left out, a GPT-2
    block without dropout.  ``relative_bias``: each stack keeps a
    ``heads x seq`` position bias per token (T5).

    Example::

        ModelShape("decoder", hidden=4096, layers=32, ffn=14336, vocab=128256, heads=32,
                   layout=BlockLayout(4096, 14336, 32, 1024, norm="rmsnorm", mlp="swiglu", fused_qkv=False))
    """

    kind: str
    hidden: int
    layers: int
    ffn: int
    vocab: int
    heads: int = 1
    decoder_layers: int = 0
    classification: bool = False
    layout: BlockLayout | None = None
    relative_bias: bool = False

    def block(self, cross: bool = False) -> BlockLayout:
        base = self.layout or BlockLayout(self.hidden, self.ffn, self.heads, self.hidden)
        return dataclasses.replace(base, cross_attention=True) if cross else base


@dataclass(frozen=True)
class MemoryEffects:
    """What the optimizations of a cell change in its memory prediction.

    ``logit_chunks``: the loss materialises the ``tokens x vocab`` logits in that
    many chunks, one at a time (1: all at once); ``optimizer_bytes_per_param``:
    bytes of optimizer state per trainable parameter (AdamW fp32: 8, 8-bit: 2);
    ``grads_freed_in_backward``: each gradient is applied and freed as soon as it
    is ready, so at most the largest layer's gradient lives; ``activations_on_host``:
    saved activations are moved to host memory.

    Example: ``MemoryEffects(logit_chunks=8)``.
    """

    logit_chunks: int = 1
    optimizer_bytes_per_param: int = 8
    grads_freed_in_backward: bool = False
    activations_on_host: bool = False


@dataclass
class Prediction:
    """Predicted peak memory of one rank, by component (bytes).

    ``device_bytes`` is what one rank needs where it trains (GPU memory, or
    the process's resident memory on CPU, harness included); ``host_bytes``
    what it offloads to host memory; ``tree_bytes`` the whole cell's
    process tree on CPU (what ``--memory-limit-mb`` limits there).
    """

    breakdown: dict[str, int]
    host_breakdown: dict[str, int]
    device_bytes: int
    host_bytes: int
    tree_bytes: int
    state_bytes: int
    activation_bytes: int
    micro_batch: int
    plan: dict = field(default_factory=dict)
    #: The transient phase the peak falls in, and what each phase adds to the persistent state.
    peak_phase: str = "forward/backward"
    phases: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def model_state_bytes(counts: ParamCounts, plan: MemoryPlan, weight_bytes: int = FP32,
                      autocast_bytes: int = FP32,
                      effects: MemoryEffects = MemoryEffects()) -> tuple[dict[str, int], dict[str, int]]:
    """Weights, gradients, optimizer states per rank: (on the device, offloaded to host).

    ``weight_bytes`` is the weights' and gradients' element size: 4 under
    ftbench's policy; 2 reproduces ZeRO's 16-bit weight modes (the published
    estimators' inputs), where
    the optimizer also keeps fp32 master weights and fp32 gradients.
    ``autocast_bytes`` < 4 adds autocast's cached low-precision weight copies.
    """
    P, T = counts.total, counts.trainable
    dev: dict[str, int] = {}
    host: dict[str, int] = {}
    weights = weight_bytes * P // plan.weights_shards
    (host if plan.offload_weights else dev)["weights"] = weights
    moved = plan.offload_optimizer
    grads = weight_bytes * T // plan.grads_shards
    if effects.grads_freed_in_backward:
        # Each gradient is applied and freed in its hook: at most the largest one lives at a time.
        grads = weight_bytes * min(T, counts.largest_layer or T) // plan.grads_shards
    if not moved:
        dev["gradients"] = grads
    elif weight_bytes == FP32:
        # The gradient partition is copied out as it is produced and accumulated where the optimizer steps.
        host["gradients"] = grads
    # else: low-precision gradients stream into the host's fp32 master gradients (counted below).
    if plan.grad_buffers:
        dev["gradient_buffers"] = int(plan.grad_buffers * weight_bytes * T)
    if plan.persistent_buckets:
        dev["reduction_bucket"] = plan.persistent_buckets * bucket_bytes(counts, plan, weight_bytes)
    opt = host if moved else dev
    opt["optimizer"] = effects.optimizer_bytes_per_param * T // plan.optimizer_shards
    if plan.master_weights or weight_bytes != FP32:
        opt["master_weights"] = FP32 * T // plan.optimizer_shards
    if weight_bytes != FP32:
        opt["master_gradients"] = FP32 * T // plan.optimizer_shards
    if plan.host_buffers and moved:
        host["staging_buffers"] = int(plan.host_buffers * FP32 * T / plan.optimizer_shards)
    if autocast_bytes < FP32:
        dev["autocast_copies"] = autocast_bytes * P // plan.weights_shards
    return {k: v for k, v in dev.items() if v}, host


def activation_terms(shape: ModelShape, micro_batch: int, seq_len: int, checkpointing: bool,
                     element_bytes: int = FP32, device_type: str = "cpu") -> dict[str, int]:
    """Activations one micro-batch's forward saves for backward, by term (bytes).

    Every block's terms (:func:`~ftbench.harness.contract.activations.block_bytes_per_token`;
    with checkpointing its input only), then outside the blocks: the
    embeddings' dropout mask, the final norm, the head's input and the
    language-model loss's fp32 log-softmax over the vocabulary (one row per
    sequence for a classification head); T5's relative position bias.
    """
    tokens = micro_batch * seq_len
    out: dict[str, float] = {}
    stacks = [(shape.block(), shape.layers)]
    if shape.decoder_layers:
        stacks.append((shape.block(cross=True), shape.decoder_layers))
    for layout, n in stacks:
        for k, v in block_bytes_per_token(layout, seq_len, element_bytes, checkpointing, device_type).items():
            out[f"blocks: {k}"] = out.get(f"blocks: {k}", 0) + n * v * tokens
    base = shape.block()
    h = shape.hidden
    norm = (2 if base.norm == "rmsnorm" else 1) * h * FP32
    # Per stack: the final norm and the embeddings' dropout mask, and T5's dropout after its final norm.
    masks = (1 + shape.relative_bias) if base.hidden_dropout else 0
    outside = len(stacks) * (norm + masks * h * FP32)
    if not shape.classification:
        outside += h * element_bytes  # the LM head's input
    elif shape.kind == "encoder" and element_bytes == FP32:
        outside += h * FP32  # the pooler's first-token view keeps the whole last hidden state (autocast copies it)
    if shape.relative_bias:
        outside += len(stacks) * shape.heads * seq_len * FP32
    out["embeddings, final norm, head input"] = outside * tokens
    out["loss"] = micro_batch * FP32 * (1 if shape.classification else seq_len * shape.vocab)
    return {k: int(v) for k, v in out.items()}


def saved_activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, checkpointing: bool,
                           element_bytes: int = FP32, device_type: str = "cpu") -> int:
    """The sum of :func:`activation_terms`."""
    return sum(activation_terms(shape, micro_batch, seq_len, checkpointing, element_bytes, device_type).values())


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, checkpointing: bool,
                     element_bytes: int = FP32, device_type: str = "cpu") -> int:
    """Saved activations plus what backward adds at its peak: the loss's gradient and
    the logits' (two more fp32 vocabulary-wide tensors per token) and, with
    checkpointing, the one block being recomputed."""
    saved = saved_activation_bytes(shape, micro_batch, seq_len, checkpointing, element_bytes, device_type)
    tokens = micro_batch * seq_len
    head = 2 * micro_batch * FP32 * (1 if shape.classification else seq_len * shape.vocab)
    recompute = 0
    if checkpointing:
        block = shape.block(cross=bool(shape.decoder_layers))
        recompute = int(tokens * sum(block_bytes_per_token(block, seq_len, element_bytes, False,
                                                           device_type).values()))
    return saved + head + recompute


def full_logits_bytes(shape: ModelShape, micro_batch: int, seq_len: int) -> int:
    """The language-model loss's vocabulary-wide terms of :func:`activation_bytes`: the fp32
    log-softmax saved for backward and, in backward, the loss's and the logits' gradients."""
    if shape.classification:
        return 0
    return 3 * micro_batch * seq_len * shape.vocab * FP32


def chunked_logits_bytes(shape: ModelShape, chunks: int, micro_batch: int, seq_len: int) -> int:
    """What a chunked (or fused) loss holds instead: one chunk's logits, their fp32 copy and gradient."""
    if shape.classification:
        return 0
    return 3 * -(-micro_batch * seq_len // max(1, chunks)) * shape.vocab * FP32


def bucket_bytes(counts: ParamCounts, plan: MemoryPlan, weight_bytes: int = FP32) -> int:
    """One gradient reduction bucket: ``bucket_params`` elements, never more than the gradients."""
    return weight_bytes * min(plan.bucket_params, counts.trainable)


def transient_phases(counts: ParamCounts, plan: MemoryPlan, activations: int,
                     weight_bytes: int = FP32) -> dict[str, dict[str, int]]:
    """What each phase of a step adds on top of the persistent state, by component.

    Forward/backward: the saved activations, plus the weights a sharded
    backend gathers (``gathered_layers`` largest layers with their gradients,
    or ``gathered_params`` kept gathered through the pass).  Gradient
    reduction: the bucket and its copies.  Optimizer step: its temporaries
    (on the host when the optimizer is offloaded).
    """
    fwd = {"activations": activations}
    if plan.gathered_layers:
        # A gathered layer holds its full weights and, in backward, their full gradients.
        fwd["gathered_layers"] = 2 * weight_bytes * counts.largest_layer * plan.gathered_layers
    if plan.gathered_params:
        fwd["gathered_weights"] = plan.gather_copies * weight_bytes * min(plan.gathered_params, counts.total)
    phases = {"forward/backward": fwd}
    if plan.reduce_copies and plan.bucket_params:
        phases["gradient reduction"] = {"reduction_copies": plan.reduce_copies * bucket_bytes(counts, plan,
                                                                                             weight_bytes)}
    if plan.step_copies:
        phases["optimizer step"] = {"step_temporaries": int(plan.step_copies * FP32 * counts.trainable
                                                            / plan.optimizer_shards)}
    return phases


def predict(counts: ParamCounts, shape: ModelShape, recipe, plan: MemoryPlan, world_size: int,
            micro_batch: int, device_type: str = "cpu", effects: MemoryEffects = MemoryEffects()) -> Prediction:
    """Peak memory of one rank of a cell training ``micro_batch`` examples at a time.

    Every model state exists from the first optimizer step on; the peak is
    that persistent state plus the largest transient phase of a step
    (:func:`transient_phases`): the micro-batch's saved activations in
    backward, a gradient bucket being reduced, or the optimizer's
    temporaries, whichever is largest.
    """
    if plan.bucket_hidden_sq and not plan.bucket_params:
        plan = replace(plan, bucket_params=int(plan.bucket_hidden_sq * shape.hidden ** 2))
    low = LOW_PRECISION.get(recipe.precision, FP32)
    dev, host = model_state_bytes(counts, plan, FP32, low, effects)
    acts = activation_bytes(shape, micro_batch, recipe.seq_len, recipe.grad_checkpointing, low, device_type)
    if effects.logit_chunks > 1:
        acts += chunked_logits_bytes(shape, effects.logit_chunks, micro_batch, recipe.seq_len) \
            - full_logits_bytes(shape, micro_batch, recipe.seq_len)
    phases = transient_phases(counts, plan, acts)
    if effects.activations_on_host:
        # Saved activations wait in host memory; the device holds those of the layer at work.
        per_layer = acts // max(1, shape.layers + shape.decoder_layers)
        host["activations"] = acts - per_layer
        phases["forward/backward"]["activations"] = per_layer
    if device_type == "cuda" and not plan.step_copies and not plan.offload_optimizer:
        # The recipe's torch.optim.AdamW runs its multi-tensor (foreach) step on CUDA, which
        # builds sqrt(v) for every parameter at once; on CPU it steps tensor by tensor.
        phases["optimizer step"] = {"step_temporaries": FP32 * counts.trainable // plan.optimizer_shards}
    if plan.offload_optimizer and "optimizer step" in phases:
        host.update(phases.pop("optimizer step"))
    peak_phase = max(phases, key=lambda name: sum(phases[name].values()))
    breakdown = {**dev, **phases[peak_phase]}
    state = sum(dev.values()) + sum(host.values())
    if device_type == "cpu":
        # On CPU the offloaded states live in the same process's resident memory.
        breakdown.update({f"{k} (offloaded)": v for k, v in host.items()})
        breakdown["harness"] = HARNESS_CPU_BYTES
        if plan.runtime_bytes:
            breakdown["backend runtime"] = plan.runtime_bytes
    device = sum(breakdown.values())
    host_total = sum(host.values())
    tree = device * world_size + (LAUNCHER_CPU_BYTES if world_size > 1 else 0) \
        if device_type == "cpu" else host_total * world_size
    return Prediction(breakdown=breakdown, host_breakdown=host, device_bytes=device, host_bytes=host_total,
                      tree_bytes=tree, state_bytes=state, activation_bytes=acts, micro_batch=micro_batch,
                      plan=asdict(plan), peak_phase=peak_phase,
                      phases={name: sum(parts.values()) for name, parts in phases.items()})


def harness_floor_bytes(world_size: int, plan: MemoryPlan | None = None) -> int:
    """What a CPU cell's process tree holds before any model exists (the limit's floor)."""
    per_rank = HARNESS_CPU_BYTES + (plan.runtime_bytes if plan else 0)
    return per_rank * world_size + (LAUNCHER_CPU_BYTES if world_size > 1 else 0)
