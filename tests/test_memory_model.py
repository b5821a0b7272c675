"""The memory model against DeepSpeed's own estimators, the ZeRO paper, and saved-tensor measurement."""

from __future__ import annotations

import os

import pytest

import ftbench
from ftbench.harness.contract.memory_model import (MemoryPlan, ModelShape, ParamCounts, model_state_bytes, predict,
                                          saved_activation_bytes, transient_phases)

P, LAYER = 1_234_567_891, 98_765_432


def zero(stage: int, n: int, offload: bool = False, offload_param: bool = False, **ds) -> MemoryPlan:
    from ftbench.plugins.deepspeed_zero import DeepSpeedEngine

    return DeepSpeedEngine.memory_plan({"stage": stage, "offload": "cpu" if offload else "none",
                                        "offload_param": "cpu" if offload_param else "none", **ds}, n)


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
    # Differs with offload: the estimator leaves out the two host staging copies of the fp32 partition
    # (measured, docs/memory.md).  The reduction bucket is transient: not a model state here either.
    if offload:
        assert host.pop("staging_buffers") == pytest.approx(2 * 4 * P / n, abs=8)
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
    # DeepSpeed's own bucket (its estimator's config), not the model-sized one ftbench uses by default.
    plan = zero(3, n, offload, offload_param, **{"ds.zero_optimization.stage3_prefetch_bucket_size": 0,
                                                 "ds.zero_optimization.reduce_bucket_size": 5e8})
    dev, host = model_state_bytes(ParamCounts(P, P, LAYER), plan, weight_bytes=2)
    # Differs: DeepSpeed's stage-3 estimate leaves out the 16-bit gradient partition (2/N bytes per
    # parameter) that its stage-2 estimate counts and that stage 3 also holds, the reduction bucket
    # stage 3 keeps (measured) and, with offload, the host staging copies.
    grads16 = 0 if offload else 2 * P / n
    bucket = dev.pop("reduction_bucket")
    assert bucket == 2 * 500_000_000
    assert sum(dev.values()) == pytest.approx(gpu + grads16 - largest, abs=n * 8)
    # The estimator's largest layer (its 16-bit weights and gradients) is the forward pass's gathered layer
    # when nothing is prefetched; with DeepSpeed's defaults the prefetched weights stay gathered instead.
    fwd = transient_phases(ParamCounts(P, P, LAYER), plan, 0, weight_bytes=2)["forward/backward"]
    assert fwd["gathered_layers"] == largest
    default = transient_phases(ParamCounts(P, P, LAYER), zero(3, n, offload, offload_param), 0, weight_bytes=2)
    assert default["forward/backward"]["gathered_weights"] == (2 if offload_param else 1) * 2 * 1_000_000_000
    if offload:
        host.pop("staging_buffers")
        assert sum(host.values()) * n == pytest.approx(cpu, abs=n * 8)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_paper_bytes_per_parameter_plus_fp32_gradients(stage):
    """The ZeRO paper (K = 12: fp32 master, momentum, variance): stage 1 2+2+K/N, stage 2 2+(2+K)/N,
    stage 3 (2+2+K)/N bytes per parameter.  DeepSpeed also keeps the optimizer's fp32 gradient
    partition, 4/N more; so do we.  Its stage 1 runs through the same optimizer class as stage 2 and
    keeps only the gradient partition between steps (measured, docs/memory.md): 2/N, not the paper's 2."""
    n, k = 4, 12
    paper = {1: 2 + 2 + k / n, 2: 2 + (2 + k) / n, 3: (2 + 2 + k) / n}[stage]
    if stage == 1:
        paper += 2 / n - 2
    dev, _ = model_state_bytes(ParamCounts(P, P, 0), zero(stage, n), weight_bytes=2)
    dev.pop("reduction_bucket", None)  # DeepSpeed's reduction buffer, in neither the paper nor the estimator
    assert sum(dev.values()) / P == pytest.approx(paper + 4 / n, rel=1e-6)


def test_peak_is_the_persistent_state_plus_the_largest_phase():
    """Activations, a bucket being reduced and the optimizer's temporaries do not coexist: the peak
    takes the largest phase, so a larger micro-batch moves the peak from the step to backward."""
    from ftbench.harness.contract.config import Recipe

    counts, shape = ParamCounts(10**7, 10**7, 10**6), ModelShape("decoder", 256, 4, 1024, 1000)
    plan = zero(2, 2, **{"ds.zero_optimization.reduce_bucket_size": 5e8})  # DeepSpeed's own bucket size
    small = predict(counts, shape, Recipe(seq_len=32), plan, 2, 1, "cuda")
    large = predict(counts, shape, Recipe(seq_len=32), plan, 2, 64, "cuda")
    assert small.peak_phase == "gradient reduction"  # two 40 MB bucket copies beat 1 x 32 tokens
    assert small.breakdown["reduction_copies"] == 2 * 4 * 10**7 and "activations" not in small.breakdown
    assert large.peak_phase == "forward/backward" and "reduction_copies" not in large.breakdown
    assert small.device_bytes == sum(small.breakdown.values())
    assert small.phases["optimizer step"] == 3 * 4 * 10**7 // 2
    # Offloaded, DeepSpeed's CPU Adam steps in place: no step temporaries, on the device or the host.
    off = predict(counts, shape, Recipe(seq_len=32), zero(2, 2, offload=True), 2, 1, "cuda")
    assert "optimizer step" not in off.phases and "step_temporaries" not in off.host_breakdown
    assert off.host_breakdown["staging_buffers"] == 2 * 4 * 10**7 // 2


def test_ftbench_policy_fp32_weights():
    """ftbench trains fp32 weights under autocast: 16 bytes per parameter unsharded; ZeRO shards the
    optimizer side and adds DeepSpeed's fp32 master copy of the partition."""
    counts = ParamCounts(P, P, LAYER)
    eager, _ = model_state_bytes(counts, ftbench.Engine.memory_plan({}, 1))
    assert sum(eager.values()) == 16 * P
    z2, _ = model_state_bytes(counts, zero(2, 4))
    assert sum(z2.values()) == pytest.approx(4 * P + (4 + 8 + 4) * P / 4, rel=1e-6)
    z2o, host = model_state_bytes(counts, zero(2, 4, offload=True))
    # Offloaded: gradients, moments, master and two staging copies of the partition on the host.
    assert z2o == {"weights": 4 * P} and sum(host.values()) == pytest.approx((4 + 8 + 4 + 8) * P / 4, rel=1e-6)
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
    assert (f.weights_shards, f.grads_shards, f.optimizer_shards) == (4, 4, 4) and f.gathered_params == 0
    assert FSDPEngine.memory_plan({"reshard_after_forward": False}, 4).gathered_params >= 10**12
    # DeepSpeed's own settings change the plan: a smaller bucket, or no prefetch (one layer gathered).
    z3 = zero(3, 2, **{"ds.zero_optimization.reduce_bucket_size": "1e6",
                       "ds.zero_optimization.stage3_prefetch_bucket_size": 0})
    assert (z3.bucket_params, z3.gathered_params, z3.gathered_layers, z3.persistent_buckets) == (10**6, 0, 1, 1)
    assert zero(3, 2).gathered_params == 10**9 and zero(2, 2).persistent_buckets == 0
    # By default the bucket follows the model's width (Hugging Face's "auto": hidden² elements).
    assert (zero(2, 2).bucket_params, zero(2, 2).bucket_hidden_sq) == (0, 1.0)
    assert zero(0, 2) == MemoryPlan(runtime_bytes=zero(0, 2).runtime_bytes, note="ZeRO stage 0")
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
    from ftbench.harness.contract.config import Recipe

    counts, shape = ParamCounts(10**6, 10**6, 10**5), ModelShape("decoder", 64, 2, 256, 500)
    one = predict(counts, shape, Recipe(), MemoryPlan(), 1, 4, "cpu")
    two = predict(counts, shape, Recipe(), MemoryPlan(optimizer_shards=2), 2, 2, "cpu")
    assert one.tree_bytes == one.device_bytes and "harness" in one.breakdown
    assert two.tree_bytes > 2 * two.device_bytes  # two ranks and the launcher
    gpu = predict(counts, shape, Recipe(), MemoryPlan(), 1, 4, "cuda")
    assert "harness" not in gpu.breakdown and gpu.device_bytes == one.device_bytes - one.breakdown["harness"]


@pytest.mark.slow
def test_prediction_tracks_the_measured_growth_where_state_dominates(tmp_path):
    """A 57M-parameter GPT-2 (0.9 GiB of unsharded state): the live peak's growth over the process
    before the model, against the prediction less the harness, within 15% for eager and ZeRO 1-3."""
    import json
    import sys

    from conftest import ROOT, ftbench, records
    from ftbench.harness.contract.config import CellSpec
    from ftbench.harness.grid.memplan import predict_cell
    from ftbench.harness.contract.registry import Registry

    pytest.importorskip("deepspeed")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from memory_check import save_model

    model = tmp_path / "gpt2-768x8"
    save_model(model, 768, 8)
    out = tmp_path / "out"
    args = ["run", "--task", "generation", "--model", model, "--steps", "3", "--warmup", "1", "--seq-len", "32",
            "--batch-size", "4", "--eval-examples", "4", "--nproc", "2", "--cpu-memory", "live", "--out", out]
    for backend in ("eager", "zero1", "zero2", "zero3"):
        args += ["--backend", backend]
    res = ftbench(*args, timeout=1200)
    assert res.returncode == 0, res.stderr[-3000:]
    reg = Registry.load()
    for rec in records(out):
        assert rec["status"] == "ok", (rec["backend"], rec["error"])
        pred = predict_cell(reg, CellSpec.from_dict(rec["config"]))
        fixed = pred.breakdown["harness"] + pred.breakdown.get("backend runtime", 0)
        measured = rec["peak_memory_bytes"] - rec["rss_before_model_bytes"]
        ratio = (pred.device_bytes - fixed) / measured
        assert 0.85 <= ratio <= 1.15, json.dumps({"backend": rec["backend"], "ratio": ratio,
                                                  "breakdown": pred.breakdown})


def test_cuda_foreach_adamw_step_makes_one_copy_of_the_trainable_state():
    """On CUDA torch.optim.AdamW takes its multi-tensor path: sqrt(v) of every parameter at once
    (one fp32 copy of the trainable parameters); on CPU it steps one tensor at a time."""
    from ftbench.harness.contract.config import Recipe

    counts, shape = ParamCounts(10**8, 10**8, 10**6), ModelShape("decoder", 256, 4, 1024, 1000)
    gpu = predict(counts, shape, Recipe(seq_len=16), MemoryPlan(), 1, 1, "cuda")
    cpu = predict(counts, shape, Recipe(seq_len=16), MemoryPlan(), 1, 1, "cpu")
    assert gpu.peak_phase == "optimizer step" and gpu.breakdown["step_temporaries"] == 4 * 10**8
    assert "optimizer step" not in cpu.phases
