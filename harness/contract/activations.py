"""What one transformer block saves for backward, term by term, per token.

Each term is what a Hugging Face block of that family keeps alive between
its forward and its backward (counted with saved-tensor hooks, unique
storages, tests/test_activations.py; docs/memory.md lists the terms):

* ``norms``: a LayerNorm keeps its input; an RMSNorm (Llama, Qwen2,
  Mistral, T5) computed in fp32 keeps its input and the normalised tensor
  the weight multiplies;
* ``linear inputs``: the normalised input of the attention and of the MLP
  projections; under bf16/fp16 autocast each projection keeps its own
  low-precision copy (q, k, v: three; SwiGLU's gate and up: two);
* ``attention``: q, k and v as the kernel keeps them (k and v at the key/value
  width under GQA when the kernel takes them unrepeated), the output and,
  on the math path (eager attention, or SDPA with attention dropout on a
  CPU), the ``heads x seq`` probabilities: once, or three times with dropout
  (probabilities, mask, dropped probabilities);
* ``mlp``: exact GELU keeps 2 f (its input, the down projection's input),
  ``gelu_new`` (tanh approximation in Python ops) 5 f, SwiGLU 4 f, ReLU
  with T5's inner dropout 3 f;
* ``dropout masks``: one activation-sized mask per hidden dropout with p > 0
  (on CPU as a tensor of the activation dtype; CUDA's fused dropout keeps
  a one-byte mask, so there this term is conservative);
* residual-stream terms (norms, masks) stay fp32 under autocast (the
  weights are fp32); matmul inputs and outputs take the autocast dtype.

With checkpointing a block keeps only its input.

Example::

    layout = BlockLayout(hidden=4096, ffn=14336, heads=32, kv_hidden=1024, norm="rmsnorm", mlp="swiglu")
    block_bytes_per_token(layout, seq_len=2048, element_bytes=2, checkpointing=False)
"""

from __future__ import annotations

from dataclasses import dataclass

FP32 = 4
#: MLP kinds: elements per token of the feed-forward width ``f`` that the MLP saves.
MLP_SAVED = {"gelu": 2, "gelu_tanh": 5, "swiglu": 4, "relu": 2}
#: Attention implementations that never keep ``seq x seq`` probabilities (they keep a log-sum-exp).
FUSED_ATTENTION = ("flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass(frozen=True)
class BlockLayout:
    """What a family's block does, as far as its saved activations go.

    ``kv_hidden`` is the key/value width (``kv_heads x head_dim``; the hidden
    size without GQA).  ``attention`` is the implementation the model runs
    (``eager``, ``sdpa``, ``flash_attention_2``, ``flex_attention``);
    ``fused_qkv``: one projection makes q, k and v (GPT-2's ``c_attn``),
    whose output the fused kernel keeps whole, plus a contiguous copy of q.
    ``inner_dropout``: a dropout inside the MLP (T5).  ``cross_attention``:
    a decoder block of an encoder-decoder model.

    Example (GPT-2 as its checkpoints set it)::

        BlockLayout(hidden=768, ffn=3072, heads=12, kv_hidden=768, norm="layernorm", mlp="gelu_tanh",
                    attn_dropout=True, hidden_dropout=True, fused_qkv=True)
    """

    hidden: int
    ffn: int
    heads: int = 1
    kv_hidden: int = 0
    norm: str = "layernorm"
    mlp: str = "gelu_tanh"
    attention: str = "sdpa"
    attn_dropout: bool = False
    hidden_dropout: bool = False
    inner_dropout: bool = False
    fused_qkv: bool = True
    cross_attention: bool = False


def math_path(layout: BlockLayout, device_type: str) -> bool:
    """Whether attention keeps its ``seq x seq`` probabilities.

    Eager attention always does; SDPA does with attention dropout on a CPU
    (its fused CPU kernel has no dropout, so it falls back to the math
    path); CUDA's fused SDPA kernels and FlashAttention-2/flex never do.
    """
    if layout.attention in FUSED_ATTENTION:
        return False
    if layout.attention == "sdpa":
        return layout.attn_dropout and device_type == "cpu"
    return True


def attention_terms(layout: BlockLayout, seq_len: int, math: bool, e: int, kv_source: int = 0) -> dict[str, float]:
    """Bytes per token of one attention (self, or cross over ``kv_source`` tokens per target token)."""
    h, kv = layout.hidden, layout.kv_hidden or layout.hidden
    # Under autocast each projection casts the fp32 stream itself (one copy each); in fp32 they share it.
    casts = 3 if e < FP32 and not layout.fused_qkv else 1
    terms = {"linear inputs": casts * h * e}
    if math:
        # Eager and the math path repeat GQA's keys/values to the full width and keep the scores.
        probs = (3 if layout.attn_dropout else 1) * layout.heads * (kv_source or seq_len)
        terms["attention"] = (4 * h) * e + probs * FP32
    elif layout.fused_qkv:
        terms["attention"] = 6 * h * e  # the fused qkv output, q's copy, the output and the projection's input
    else:
        terms["attention"] = (2 * h + 2 * kv) * e + layout.heads * FP32  # q, k, v, output; log-sum-exp
    return terms


def block_bytes_per_token(layout: BlockLayout, seq_len: int, element_bytes: int = FP32,
                          checkpointing: bool = False, device_type: str = "cpu") -> dict[str, float]:
    """Saved bytes per token of one block, by term (the block's input alone with checkpointing)."""
    h, f, e = layout.hidden, layout.ffn, element_bytes
    if checkpointing:
        return {"block input": h * FP32}
    norm = (2 if layout.norm == "rmsnorm" else 1) * h * FP32
    attentions = 2 if layout.cross_attention else 1
    mlp_inputs = 2 if layout.mlp == "swiglu" and e < FP32 else 1  # gate and up each cast the stream
    terms: dict[str, float] = {"norms": norm * (attentions + 1), "linear inputs": mlp_inputs * h * e,
                               "attention": 0.0}
    math = math_path(layout, device_type)
    for _ in range(attentions):
        for k, v in attention_terms(layout, seq_len, math, e).items():
            terms[k] += v
    terms["mlp"] = MLP_SAVED.get(layout.mlp, 4) * f * e + (f * e if layout.inner_dropout else 0)
    if layout.hidden_dropout:
        terms["dropout masks"] = (attentions + 1) * h * FP32
    return terms
