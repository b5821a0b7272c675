"""The activation estimate per family against what autograd really saves (saved-tensor hooks).

Small random-init configs of each family, dropout as its released checkpoints set it; the
estimate reads the same model's modules and config as ``ftbench plan`` does.
"""

from __future__ import annotations

import pytest

from ftbench.harness.contract.memory_model import saved_activation_bytes
from ftbench.harness.grid.memplan import shape_of

H, V = 128, 1000


def _families():
    from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                              T5Config, T5ForConditionalGeneration)

    # Dropout as the public checkpoints set it: GPT-2, BERT and T5 0.1, the Llama family none (their defaults).
    return {
        "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=V, n_embd=H, n_layer=2, n_head=4, n_positions=256), "decoder"),
        "llama": (LlamaForCausalLM, LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=352, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=1), "decoder"),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=352, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
                  "decoder"),
        "mistral": (MistralForCausalLM, MistralConfig(vocab_size=V, hidden_size=H, intermediate_size=448,
                                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                    "decoder"),
        "bert": (BertForSequenceClassification, BertConfig(vocab_size=V, hidden_size=H, intermediate_size=4 * H,
                                                           num_hidden_layers=2, num_attention_heads=4), "encoder"),
        "t5": (T5ForConditionalGeneration, T5Config(vocab_size=V, d_model=H, d_kv=32, d_ff=4 * H, num_layers=2,
                                                    num_decoder_layers=2, num_heads=4, decoder_start_token_id=0,
                                                    pad_token_id=0), "encoder-decoder"),
    }


def saved_bytes(model, kind: str, b: int, s: int, autocast: bool = False) -> int:
    """Bytes of the unique storages autograd saves in one training forward.

    Parameters are not activations, nor (under bf16 autocast) their cached bf16 copies, which the
    memory model counts as model states (``autocast_copies``)."""
    import torch

    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(), tuple(t.shape), t.dtype)
        return t

    ids = torch.randint(0, V, (b, s))
    mask = torch.ones_like(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if kind == "encoder":
            model(input_ids=ids, attention_mask=mask, labels=torch.zeros(b, dtype=torch.long))
        elif kind == "encoder-decoder":
            model(input_ids=ids, attention_mask=mask, labels=ids)
        else:
            logits = model(input_ids=ids, attention_mask=mask).logits
            torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    return sum(n for k, (n, shape, dtype) in seen.items()
               if k not in params and not (autocast and dtype == torch.bfloat16 and shape in shapes))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["saved", "checkpointed"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral", "bert", "t5"])
@pytest.mark.parametrize("b,s", [(4, 64), pytest.param(2, 160, marks=pytest.mark.slow)])  # longer: the seq x seq terms
def test_activation_estimate_per_family_within_15_percent(family, checkpointing, b, s):
    import torch

    cls, config, kind = _families()[family]
    torch.manual_seed(0)
    model = cls(config).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    measured = saved_bytes(model, kind, b, s)
    shape = shape_of(model, kind, "classification" if kind == "encoder" else "lm")
    predicted = saved_activation_bytes(shape, b, s, checkpointing, device_type="cpu")
    assert predicted == pytest.approx(measured, rel=0.15), (family, predicted / measured, shape.block())


@pytest.mark.parametrize("checkpointing", [False, True], ids=["saved", "checkpointed"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "t5"])
def test_activation_estimate_under_bf16_autocast(family, checkpointing):
    """fp32 weights under bf16 autocast (ftbench's mixed precision): matmul inputs and outputs in bf16, one
    cast of the stream per projection, norms, masks and the residual stream in fp32."""
    import torch

    cls, config, kind = _families()[family]
    torch.manual_seed(0)
    model = cls(config).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    measured = saved_bytes(model, kind, 4, 64, autocast=True)
    shape = shape_of(model, kind, "classification" if kind == "encoder" else "lm")
    predicted = saved_activation_bytes(shape, 4, 64, checkpointing, element_bytes=2, device_type="cpu")
    assert predicted == pytest.approx(measured, rel=0.15), (family, predicted / measured)


def test_layouts_follow_the_family():
    cases = {name: shape_of(cls(cfg), kind, "lm").block() for name, (cls, cfg, kind) in _families().items()}
    assert cases["llama"].mlp == "swiglu" and cases["llama"].norm == "rmsnorm" and cases["llama"].kv_hidden == 32
    assert cases["gpt2"].mlp == "gelu_tanh" and cases["gpt2"].fused_qkv and cases["gpt2"].attn_dropout
    assert cases["bert"].mlp == "gelu" and cases["bert"].hidden_dropout
    assert cases["t5"].attention == "eager" and cases["t5"].inner_dropout and cases["t5"].mlp == "relu"
    assert not cases["qwen2"].attn_dropout and not cases["mistral"].hidden_dropout
