"""``ftbench plan`` for rented hardware: a model from its config alone, a named GPU, time and frontier."""

from __future__ import annotations

import json
import os

import pytest

from results_factory import make_record
from click.testing import CliRunner

from conftest import ROOT
from ftbench.harness.cli import main
from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.gpus import BY_NAME, lookup, parse_gpu

LLAMA_8B = ROOT / "examples" / "configs" / "llama-3-8b"


@pytest.fixture(scope="module")
def llama8b_plan():
    """The issue's question: Llama-3-8B, full fine-tuning, 8 x H100 SXM, bf16, seq 2048."""
    args = ["plan", "--task", "generation", "--model", str(LLAMA_8B), "--gpu", "h100-sxm", "--nproc", "8",
            "--precision", "bf16", "--seq-len", "2048", "--batch-size", "8", "--backend", "eager",
            "--backend", "zero3", "--backend", "fsdp", "--backend", "zero3-offload", "--host-memory-gb", "256",
            "--frontier", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return {row["backend"]: row for row in json.loads(res.output)}


def test_config_only_directory_plans_an_8b_llama_on_8_h100(llama8b_plan, tmp_path):
    assert set(os.listdir(LLAMA_8B)) == {"config.json"}  # no weights, no tokenizer
    eager, z3, fsdp = llama8b_plan["eager"], llama8b_plan["zero3"], llama8b_plan["fsdp"]
    assert eager["fits"] is False and eager["limit_bytes"] == (80 - 1) * 2**30
    for row in (z3, fsdp):
        assert row["fits"] is True and row["gpu"] == "h100-sxm" and row["nproc"] == 8
        assert row["frontier"]["micro_batch"] >= 1 and row["frontier"]["seq_len_checkpointed"] >= 2048
    assert eager["frontier"]["micro_batch"] is None and eager["frontier"]["micro_batch_checkpointed"] is None
    # Step time from the FLOPs at the assumed MFU, and it says so.
    st = z3["step_time"]
    assert st["mfu_source"].startswith("--mfu 0.4") and st["tokens_per_step"] == 8 * 2048
    p_matmul = 8.03e9 - 128256 * 4096  # Llama-3-8B less its input embedding (the untied head is a matmul)
    assert st["step_s"] == pytest.approx(6 * p_matmul * 2048 / (989e12 * 0.4), rel=0.1)


def test_offloaded_parts_are_compared_with_host_memory(llama8b_plan):
    off, z3 = llama8b_plan["zero3-offload"], llama8b_plan["zero3"]
    P = off["parameters"]["total"]
    # Eight ranks' weight shards (offload_param), fp32 gradient, moments, master and two staging copies of
    # their partition: 4 + 4 + 8 + 4 + 8 = 28 bytes per parameter per node; 225 GB < 256 GiB.
    assert off["host_need_bytes"] == pytest.approx(28 * P, rel=1e-6) and off["host_fits"] is True
    assert off["compared_bytes"] < z3["compared_bytes"] and z3["host_need_bytes"] == 0


def test_zero3_model_states_agree_with_deepspeeds_estimator(llama8b_plan):
    """ZeRO-3's per-rank model states for the 8B parameter count, against DeepSpeed's own estimator.

    DeepSpeed estimates its 16-bit weight mode (2-byte weights, fp32 master, gradient and moments:
    18 bytes per parameter over the ranks, plus the largest layer); ftbench trains fp32 weights under
    autocast (docs/memory.md): 4 + 4 + 8 + 4 bytes plus autocast's 2-byte copies, and the reduction
    bucket stage 3 keeps.  Every difference is one of those terms: the rest agrees to the byte."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    z3 = llama8b_plan["zero3"]
    P, n = z3["parameters"]["total"], 8
    _, gpu, largest = estimate_zero3_model_states_mem_needs(P, z3["parameters"]["largest_layer"], num_gpus_per_node=n,
                                                            cpu_offload=False, cpu_offload_params=False,
                                                            zero_init=True, additional_buffer_factor=1.0)
    b = z3["prediction"]["breakdown"]
    ftbench_states = sum(b[k] for k in ("weights", "gradients", "optimizer", "master_weights", "autocast_copies"))
    # DeepSpeed 16-bit mode per rank: 2 (weights) + 16 (fp32 gradient, master, moments) per parameter / N.
    assert gpu - largest == pytest.approx(18 * P / n, abs=n * 8)
    # ftbench: fp32 weights (+2), fp32 gradients held as the model's own (its 4 counted in DeepSpeed's 16),
    # autocast copies (+2): 22 bytes per parameter / N.
    assert ftbench_states == pytest.approx((gpu - largest) + 4 * P / n, abs=n * 16)
    # sized as Hugging Face's DeepSpeed integration sizes it ("auto"): hidden² elements, fp32
    hidden = json.loads((LLAMA_8B / "config.json").read_text())["hidden_size"]
    assert b["reduction_bucket"] == 4 * hidden * hidden


def test_device_cuda_without_cuda_or_gpu_is_exit_2_in_one_paragraph():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    res = CliRunner().invoke(main, ["plan", "--task", "generation", "--device", "cuda"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "--gpu" in res.output and "h100-sxm" in res.output


def test_unknown_gpu_lists_the_known_ones():
    res = CliRunner().invoke(main, ["plan", "--task", "generation", "--gpu", "h1000"])
    assert res.exit_code == 2 and all(name in res.output for name in ("a100-40gb", "mi300x", "l4"))


def test_gpu_names_and_counts():
    assert parse_gpu("h100-sxmx8") == (lookup("h100-sxm"), 8)
    assert parse_gpu("8xa100-40gb") == (lookup("a100-40gb"), 8)
    assert parse_gpu("mi300x") == (lookup("mi300x"), None) and parse_gpu("mi300xx4")[1] == 4
    assert lookup("H100") is BY_NAME["h100-sxm"] and lookup("a100-40gb").memory_bytes == 40 * 2**30
    with pytest.raises(FtbenchError, match="known"):
        lookup("rtx-9090")


def test_hub_id_not_in_the_cache_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from ftbench.harness.cell.modeling import cached_hub_config_dir

    with pytest.raises(FtbenchError, match="config.json is not in the local Hugging Face cache"):
        cached_hub_config_dir("nobody/nothing-here")


def test_calibrate_from_takes_the_measured_mfu_of_that_gpu_and_backend(tmp_path):
    from ftbench.harness.analysis.plan_time import calibrated_mfu

    out = tmp_path / "runs"
    out.mkdir()
    recs = [{"cell_id": str(i), "status": "ok", "backend": "zero3", "mfu": m,
             "environment": {"device": {"name": name}}}
            for i, (m, name) in enumerate([(0.31, "NVIDIA H100 80GB HBM3"), (0.35, "NVIDIA H100 80GB HBM3"),
                                           (0.33, "NVIDIA H100 80GB HBM3"), (0.9, "NVIDIA A100-SXM4-40GB")])]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    mfu, source = calibrated_mfu(str(out), "H100 SXM", "zero3")
    assert mfu == pytest.approx(0.33) and "3 record" in source
    assert calibrated_mfu(str(out), "H100 SXM", "fsdp") is None


def test_a_hub_id_plans_from_its_cached_config_alone(tmp_path, monkeypatch):
    """A hub id whose config.json (only) is in the local Hugging Face cache: planned offline, nothing fetched."""
    repo = tmp_path / "hub" / "models--meta-llama--Meta-Llama-3-8B"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((LLAMA_8B / "config.json").read_text())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    res = CliRunner().invoke(main, ["plan", "--task", "generation", "--model", "meta-llama/Meta-Llama-3-8B",
                                    "--gpu", "h100-sxmx8", "--precision", "bf16", "--seq-len", "2048",
                                    "--batch-size", "8", "--backend", "eager", "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.output)[0]
    assert row["parameters"]["total"] == 8_030_261_248 and row["fits"] is False
    # Sharded over more GPUs at the same global batch (smaller micro-batches per rank).
    assert any("fsdp" in s and "--nproc" in s for s in row["suggestions"]), row["suggestions"]


def test_accelerates_training_estimate_against_the_plans_model_states(llama8b_plan):
    """accelerate's estimator (its own functions, offline, on the fp32 meta model of the same config):
    its fp32 "Training using Adam" peak is weights + gradients + two moments, 16 bytes per parameter,
    exactly eager's model states in fp32; its bf16 figure is the largest single component (the
    moments, 8 B/param), below what mixed precision over fp32 weights holds at once (docs/memory.md)."""
    import torch
    from accelerate import init_empty_weights
    from accelerate.commands.estimate import estimate_training_usage
    from accelerate.utils import calculate_maximum_sizes
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftbench.harness.contract.memory_model import MemoryPlan, ParamCounts, model_state_bytes

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(LLAMA_8B), dtype=torch.float32)
    total_bytes, _ = calculate_maximum_sizes(model)
    P = llama8b_plan["eager"]["parameters"]["total"]
    assert total_bytes - 4 * P < 2**20  # the plan's parameters (accelerate also counts the rotary buffers)
    fp32 = max(estimate_training_usage(total_bytes, "float32").values())
    eager_fp32, _ = model_state_bytes(ParamCounts(P, P), MemoryPlan())
    assert sum(eager_fp32.values()) == 16 * P and fp32 == pytest.approx(16 * P, abs=2**22)
    bf16 = max(estimate_training_usage(total_bytes, "bfloat16").values())
    b = llama8b_plan["eager"]["prediction"]["breakdown"]
    assert bf16 == pytest.approx(8 * P, abs=2**22)
    assert sum(b[k] for k in ("weights", "gradients", "optimizer", "autocast_copies")) == 18 * P


def test_plan_says_which_mfu_its_step_time_uses(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    rec = make_record(backend="eager")  # a whole record: the reader skips lines that are not one
    rec.update(mfu=0.2, environment={**rec["environment"], "device": {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}})
    (out / "results.jsonl").write_text(json.dumps(rec) + "\n")
    base = ["plan", "--task", "generation", "--backend", "eager", "--gpu", "h100-sxm", "--json"]
    assumed = json.loads(CliRunner().invoke(main, base).output)[0]["step_time"]
    measured = json.loads(CliRunner().invoke(main, base + ["--calibrate-from", str(out)]).output)[0]["step_time"]
    assert assumed["mfu_source"] == "--mfu 0.4 (assumed)" and measured["mfu_source"].startswith("measured MFU 0.200")
    assert measured["step_s"] == pytest.approx(2 * assumed["step_s"])  # half the MFU, twice the time
    res = CliRunner().invoke(main, base + ["--mfu", "1.5"])
    assert res.exit_code == 2 and "--mfu" in res.output
