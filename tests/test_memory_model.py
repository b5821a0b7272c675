"""The memory model against DeepSpeed's own estimators, the ZeRO paper, and saved-tensor measurement."""

from __future__ import annotations

import os

import pytest

import ftbench
from ftbench.harness.memory_model import (MemoryPlan, ModelShape, ParamCounts, model_state_bytes, predict,
                                          saved_activation_bytes)

P, LAYER = 1_234_567_891, 98_765_432


def zero(stage: int, n: int, offload: bool = False, offload_param: bool = False) -> MemoryPlan:
    from ftbench.plugins.deepspeed_zero import DeepSpeedEngine

    return DeepSpeedEngine.memory_plan({"stage": stage, "offload": "cpu" if offload else "none",
                                        "offload_param": "cpu" if offload_param else "none"}, n)


@pytest.fixture(scope="module")
def ds():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return estimate_zero2_model_states_mem_needs, estimate_zero3_model_states_mem_needs


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("offload", [False, True])
def test_zero2_matches_deepspeeds_estimator(ds, n, offload):
    # DeepSpeed's estimator assumes 16-bit weights with an fp32 master copy: weight_bytes=2.
    cpu, gpu = ds[0](P, num_gpus_per_node=n, cpu_offload=offload, additional_buffer_factor=1.0)
    dev, host = model_state_bytes(ParamCounts(P, P, LAYER), zero(2, n, offload), weight_bytes=2)
    # Differs: the estimator leaves out the contiguous reduction buffer (a full gradient, measured).
    assert dev.pop("gradient_buffers") == 2 * P
    assert sum(dev.values()) == pytest.approx(gpu, abs=n * 8)
    if offload and n <= 4:
        # Per node: every rank's offloaded partition (DeepSpeed: max(4 N, 16) bytes per parameter).
        assert sum(host.values()) * n == pytest.approx(cpu, abs=n * 8)
    elif offload:
        # Differs: DeepSpeed's 4 N term is each process's transient fp32 copy during init, not the steady state.
        assert sum(host.values()) * n < cpu


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("offload,offload_param", [(False, False), (True, False), (True, True)])
def test_zero3_matches_deepspeeds_estimator(ds, n, offload, offload_param):
    cpu, gpu, largest = ds[1](P, LAYER, num_gpus_per_node=n, cpu_offload=offload, cpu_offload_params=offload_param,
                              zero_init=True, additional_buffer_factor=1.0)
    dev, host = model_state_bytes(ParamCounts(P, P, LAYER), zero(3, n, offload, offload_param), weight_bytes=2)
    # Differs without offload: DeepSpeed's stage-3 estimate leaves out the 16-bit gradient partition
    # (2/N bytes per parameter) that its stage-2 estimate counts and that stage 3 also holds.
    grads16 = 0 if offload else 2 * P / n
    assert sum(dev.values()) == pytest.approx(gpu + grads16, abs=n * 8)
    assert dev["gathered_layers"] == largest
    if offload:
        assert sum(host.values()) * n == pytest.approx(cpu, abs=n * 8)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_paper_bytes_per_parameter_plus_fp32_gradients(stage):
    """The ZeRO paper (K = 12: fp32 master, momentum, variance): stage 1 2+2+K/N, stage 2 2+(2+K)/N,
    stage 3 (2+2+K)/N bytes per parameter.  DeepSpeed also keeps the optimizer's fp32 gradient
    partition, 4/N more; so do we."""
    n, k = 4, 12
    paper = {1: 2 + 2 + k / n, 2: 2 + (2 + k) / n, 3: (2 + 2 + k) / n}[stage]
    dev, _ = model_state_bytes(ParamCounts(P, P, 0), zero(stage, n), weight_bytes=2)
    dev.pop("gradient_buffers", None)  # DeepSpeed's reduction buffer, in neither the paper nor the estimator
    assert sum(dev.values()) / P == pytest.approx(paper + 4 / n, rel=1e-6)


def test_ftbench_policy_fp32_weights():
    """ftbench trains fp32 weights under autocast: 16 bytes per parameter unsharded; ZeRO shards the
    optimizer side and adds DeepSpeed's fp32 master copy of the partition."""
    counts = ParamCounts(P, P, LAYER)
    eager, _ = model_state_bytes(counts, ftbench.Engine.memory_plan({}, 1))
    assert sum(eager.values()) == 16 * P
    z2, _ = model_state_bytes(counts, zero(2, 4))
    assert sum(z2.values()) == pytest.approx(4 * P + 4 * P + (4 + 8 + 4) * P / 4, rel=1e-6)
    z2o, host = model_state_bytes(counts, zero(2, 4, offload=True))
    assert z2o == {"weights": 4 * P, "gradient_buffers": 4 * P} and sum(host.values()) == pytest.approx((4 + 8 + 4) * P / 4, rel=1e-6)
    bf16, _ = model_state_bytes(counts, ftbench.Engine.memory_plan({}, 1), autocast_bytes=2)
    assert bf16["autocast_copies"] == 2 * P


def test_lora_counts_only_trainable_parameters_for_gradients_and_optimizer():
    lora = ParamCounts(total=P, trainable=P // 100, largest_layer=LAYER)
    dev, _ = model_state_bytes(lora, MemoryPlan())
    assert dev["weights"] == 4 * P and dev["gradients"] == 4 * (P // 100) and dev["optimizer"] == 8 * (P // 100)


def test_backends_declare_their_own_plans():
    from ftbench.plugins.data_parallel import DDPEngine, FSDPEngine

    assert DDPEngine.memory_plan({}, 2).grad_buffers == 1.0
    assert DDPEngine.memory_plan({"gradient_as_bucket_view": True}, 2).grad_buffers == 0.0
    f = FSDPEngine.memory_plan({"reshard_after_forward": True}, 4)
    assert (f.weights_shards, f.grads_shards, f.optimizer_shards) == (4, 4, 4)
    assert ftbench.MemoryPlan is MemoryPlan and "MemoryPlan" in ftbench.__all__


def _saved_bytes(model, b, s):
    import torch

    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, model.config.vocab_size, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(v for k, v in seen.items() if k not in params)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_against_saved_tensors(checkpointing):
    """The saved activations of a real GPT-2 forward (saved-tensor hooks), against the estimate."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    h, layers, vocab, b, s = 128, 3, 1000, 4, 64
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=h, n_layer=layers, n_head=4, n_positions=128,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    measured = _saved_bytes(model, b, s)
    shape = ModelShape("decoder", hidden=h, layers=layers, ffn=4 * h, vocab=vocab, heads=4)
    assert saved_activation_bytes(shape, b, s, checkpointing) == pytest.approx(measured, rel=0.15)


def test_predict_adds_the_harness_on_cpu_and_counts_the_tree():
    from ftbench.harness.grid.config import Recipe

    counts, shape = ParamCounts(10**6, 10**6, 10**5), ModelShape("decoder", 64, 2, 256, 500)
    one = predict(counts, shape, Recipe(), MemoryPlan(), 1, 4, "cpu")
    two = predict(counts, shape, Recipe(), MemoryPlan(optimizer_shards=2), 2, 2, "cpu")
    assert one.tree_bytes == one.device_bytes and "harness" in one.breakdown
    assert two.tree_bytes > 2 * two.device_bytes  # two ranks and the launcher
    gpu = predict(counts, shape, Recipe(), MemoryPlan(), 1, 4, "cuda")
    assert "harness" not in gpu.breakdown and gpu.device_bytes == one.device_bytes - one.breakdown["harness"]
