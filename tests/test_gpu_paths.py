"""What the CUDA paths rely on, proven on the CPU: weights in the recipe's dtype,
MFU against the peak of the dtype the matmuls ran in, two memory windows,
exact GPU names in the peak table, a fork server that never touches CUDA,
the schedule over fp16 skipped steps, the launch mode in records (with torch's fork poisoning
emulated), CUDA memory figures, device-time profiles, offload threads and one-off builds.
The prepared GPU check itself is tested in test_gpu_check.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TINY, ftbench, records

TESTS = Path(__file__).resolve().parent


def _save_gpt2_pair(tmp_path: Path) -> tuple[Path, Path]:
    """The same GPT-2 weights saved twice: stored in bf16, and stored in fp32 after rounding to bf16
    (so both copies hold identical values once loaded as fp32)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ftbench.harness.cell.tokenization import train_tokenizer
    from ftbench.harness.contract.registry import Registry

    task = Registry.load().task("generation")
    rows = task.builtin_data(0, {})["train"]
    tok = train_tokenizer((t for ex in rows for t in task.texts(ex, {})), 1000)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=128, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(cfg).to(torch.bfloat16)
    bf16_dir, fp32_dir = tmp_path / "gpt2-bf16", tmp_path / "gpt2-fp32"
    model.save_pretrained(bf16_dir)
    model.to(torch.float32).save_pretrained(fp32_dir)
    for d in (bf16_dir, fp32_dir):
        tok.save_pretrained(d)
    return bf16_dir, fp32_dir


def test_bf16_checkpoint_trains_with_fp32_weights_like_its_fp32_copy(tmp_path):
    bf16_dir, fp32_dir = _save_gpt2_pair(tmp_path)
    out = tmp_path / "out"
    ftbench("run", "--task", "generation", "--backend", "eager", "--model", bf16_dir, "--model", fp32_dir,
            "--steps", "16", "--warmup", "3", "--batch-size", "4", "--seq-len", "32", "--eval-examples", "8",
            "--out", out, check=True)
    by_model = {Path(r["model"]).name: r for r in records(out)}
    b, f = by_model["gpt2-bf16"], by_model["gpt2-fp32"]
    assert b["status"] == f["status"] == "ok"
    assert (b["weights_stored_dtype"], b["weights_dtype"], b["matmul_dtype"]) == ("bf16", "fp32", "fp32")
    assert (f["weights_stored_dtype"], f["weights_dtype"], f["matmul_dtype"]) == ("fp32", "fp32", "fp32")
    # Same fp32 values, same recipe: the same math, step for step.
    assert b["train_loss"] == pytest.approx(f["train_loss"], rel=1e-6)
    # Same work in the same dtype: step times agree within this shared machine's noise, judged on each
    # cell's fastest step (medians of cells run at different moments differed 3x under load); MFU is
    # against the fp32 peak and at most 1 (before the fix the bf16 copy ran its matmuls in bf16 and
    # reported MFU 1.32 against the fp32 peak).
    assert 1 / 3 < b["step_time"]["min"] / f["step_time"]["min"] < 3
    assert 0 < b["mfu"] <= 1 and 0 < f["mfu"] <= 1


def test_mfu_uses_the_peak_of_the_matmul_dtype_and_never_exceeds_one(tmp_path):
    out = tmp_path / "out"
    ftbench("run", "--task", "generation", "--backend", "eager", "--precision", "bf16", *TINY, "--out", out,
            env={"FTBENCH_LAUNCH": "exec"}, check=True)
    (r,) = records(out)
    assert r["status"] == "ok" and r["matmul_dtype"] == "bf16" and r["weights_dtype"] == "fp32"
    assert "bf16" in r["peak_flops_source"]
    assert r["mfu"] is None or 0 < r["mfu"] <= 1
    assert r["mfu"] is not None or "exceeds" in r["mfu_note"]


def test_an_mfu_above_one_is_withheld_with_its_reason():
    from ftbench.harness.results.record import _mfu

    rec = {"flops_per_s": 2e12, "peak_flops": 1e12, "matmul_dtype": "fp32", "peak_flops_source": "datasheet"}
    mfu, note = _mfu(rec, all_ranks=True)
    assert mfu is None and "exceeds the fp32 peak" in note
    assert _mfu({**rec, "flops_per_s": 5e11}, all_ranks=True) == (0.5, None)


def test_matmul_dtype_follows_autocast_then_weights_then_tf32(monkeypatch):
    from ftbench.harness.cell import weights

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert weights.matmul_dtype("bf16", "fp32", cpu) == "bf16"
    assert weights.matmul_dtype("fp32", "bf16", cpu) == "bf16"
    assert weights.matmul_dtype("fp32", "fp32", cpu) == "fp32"
    for mode, dtype in (("medium", "bf16"), ("high", "tf32"), ("highest", "fp32")):
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda mode=mode: mode)
        assert weights.matmul_dtype("fp32", "fp32", cuda) == dtype
        assert weights.matmul_dtype("fp32", "fp32", cpu) == "fp32"
        assert weights.matmul_dtype("fp16", "fp32", cuda) == "fp16"


def test_medium_matmul_precision_divides_by_the_bf16_peak_not_tf32():
    """torch.set_float32_matmul_precision("medium") allows bf16 inside fp32 matmuls: dividing by the
    TF32 peak would overstate MFU up to 2x."""
    from ftbench.harness.cell.mfu import gpu_peak

    torch_mode = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        from ftbench.harness.cell.weights import fp32_matmul_dtype

        dtype = fp32_matmul_dtype()
    finally:
        torch.set_float32_matmul_precision(torch_mode)
    assert dtype == "bf16"
    assert gpu_peak("NVIDIA H200", dtype)[0] == 2 * gpu_peak("NVIDIA H200", "tf32")[0]


@pytest.mark.parametrize("name, model", [
    ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("NVIDIA L40", "L40"),
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"), ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200"), ("NVIDIA H200 NVL", "H200 NVL"), ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A10G", "A10G"), ("NVIDIA A10", "A10"), ("Tesla V100-SXM2-16GB", "V100 SXM2"),
    ("Tesla V100-PCIE-32GB", "V100 PCIe"), ("NVIDIA GeForce RTX 4090", None), ("NVIDIA L4X", None),
])
def test_gpu_peak_table_matches_exact_model_names(name, model):
    from ftbench.harness.cell.mfu import gpu_model, gpu_peak

    assert gpu_model(name) == model
    peak, source = gpu_peak(name, "bf16")
    assert (peak is None) == (model is None or model.startswith("V100"))


def test_tf32_peak_differs_from_plain_fp32():
    from ftbench.harness.cell.mfu import gpu_peak

    assert gpu_peak("NVIDIA H100 80GB HBM3", "tf32")[0] > 5 * gpu_peak("NVIDIA H100 80GB HBM3", "fp32")[0]
    assert gpu_peak("NVIDIA L4", "bf16")[0] != gpu_peak("NVIDIA L40S", "bf16")[0]


def test_training_peak_excludes_the_model_load_transient(tmp_path):
    """Setup window: the build's 400 MiB transient; training window: the timed steps only."""
    out = tmp_path / "out"
    env = {"FTBENCH_PLUGINS_EXTRA": "transient_plugin",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    ftbench("run", "--task", "generation", "--backend", "eager", "--model", "tiny-gpt2-transient", *TINY,
            "--out", out, env=env, check=True)
    (r,) = records(out)
    assert r["status"] == "ok" and r["memory_window_reset"] == "clear_refs"
    setup, train = r["setup_peak_memory_bytes"], r["train_peak_memory_bytes"]
    assert setup - train > 300 * 2**20, (setup, train)
    assert r["peak_memory_bytes"] == max(setup, train) == setup
    (rank,) = r["memory_per_rank"]
    assert rank["setup"]["host_peak_rss_bytes"] == setup and rank["train"]["host_peak_rss_bytes"] == train


def test_memory_windows_fall_back_and_say_so_without_clear_refs(monkeypatch):
    from ftbench.harness.cell import memwindows

    monkeypatch.setattr(memwindows, "CLEAR_REFS", "/proc/self/no-such-file")
    w = memwindows.MemoryWindows(torch.device("cpu"))
    w.end_setup()
    mem = w.end_training()
    assert mem["reset"].startswith("none:") and "includes setup" in mem["reset"]
    assert mem["host_peak_rss_bytes"] == max(mem["setup"]["host_peak_rss_bytes"], mem["train"]["host_peak_rss_bytes"])


def test_fork_server_preload_never_initialises_cuda():
    """Anything the fork server imports that initialised CUDA would break every forked CUDA cell."""
    code = ("import torch, torch.cuda\n"
            "calls = []\n"
            "torch.cuda._lazy_init = lambda *a, **k: calls.append(1)\n"
            "torch.cuda.init = lambda *a, **k: calls.append(1)\n"
            "from ftbench.harness.running import launch\n"
            "for m in launch.PRELOAD: __import__(m)\n"
            "print(len(calls), torch.cuda.is_initialized())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "False"]


def test_a_forked_cell_refuses_a_server_that_initialised_cuda(monkeypatch):
    from ftbench.harness.running import launch

    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(RuntimeError, match="FTBENCH_LAUNCH=exec"):
        launch.check_fork_cuda()
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: False)
    launch.check_fork_cuda()


def _fp16_engine():
    from ftbench.harness.contract.engine import EngineContext, StandardEngine
    from ftbench.harness.contract.config import Recipe

    def loss_fn(model, batch):
        return (model(batch["x"]) ** 2).sum() * batch["poison"]

    recipe = Recipe(precision="fp16", steps=10, warmup=1, schedule="linear", lr=1e-2)
    engine = StandardEngine({}, EngineContext(recipe, torch.device("cpu"), loss_fn))
    torch.manual_seed(0)
    engine.setup(torch.nn.Linear(4, 4))
    return engine


def test_schedule_does_not_advance_when_the_fp16_scaler_skips_the_step():
    engine = _fp16_engine()
    # Small inputs, so that clean steps stay finite under the scaler's initial 2**16.
    batch = {"x": 1e-3 * torch.randn(2, 4), "loss_scale": 1.0}
    weights = engine.raw_model.weight.detach().clone()
    lr = engine.optimizer.param_groups[0]["lr"]
    engine.forward_backward({**batch, "poison": torch.tensor(float("inf"))}, boundary=True)
    engine.step()
    # The scaler found inf gradients: no update, and the schedule stays where it was.
    assert torch.equal(engine.raw_model.weight, weights)
    assert engine.scheduler.last_epoch == 0 and engine.optimizer.param_groups[0]["lr"] == lr
    engine.forward_backward({**batch, "poison": torch.tensor(1.0)}, boundary=True)
    engine.step()
    assert not torch.equal(engine.raw_model.weight, weights)
    assert engine.scheduler.last_epoch == 1 and engine.optimizer.param_groups[0]["lr"] < lr


def test_deepspeed_below_the_version_floor_is_unavailable_with_the_fix(monkeypatch):
    from ftbench.harness.contract.api import Unavailable
    from ftbench.plugins import deepspeed_zero

    monkeypatch.setattr(deepspeed_zero, "_installed_version", lambda: "0.16.9")
    with pytest.raises(Unavailable, match=r"deepspeed>=0\.17\.6"):
        deepspeed_zero.DeepSpeedEngine.check_available({})
    monkeypatch.setattr(deepspeed_zero, "_installed_version", lambda: "0.17.6")
    deepspeed_zero.DeepSpeedEngine.check_available({})
    text = (ROOT / "pyproject.toml").read_text()
    assert '"deepspeed>=0.17.6"' in text


def _emulated_cuda_fork_env(tmp_path: Path, plant: bool) -> dict:
    """Environment that runs the fork server as a CUDA build would fork (tests/cuda_fork_emulation.py)."""
    from cuda_fork_emulation import SITECUSTOMIZE

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"FTBENCH_EMULATE_CUDA_FORK": "1", "FTBENCH_EMULATED_CUDA_MARKS": str(tmp_path / "marks"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(site), str(TESTS), os.environ.get("PYTHONPATH")]))}
    if plant:
        env["FTBENCH_PLANT_CUDA_CALL"] = "1"
    return env


def _marks(tmp_path: Path) -> list[str]:
    path = tmp_path / "marks"
    return path.read_text().split() if path.exists() else []


def test_fork_server_never_queries_the_cuda_device_count_and_its_cells_say_fork(tmp_path):
    """With torch's fork poisoning emulated (the device-count query marks the process, as on a CUDA
    build), the real fork server's preload never makes that query, so the cell it forks is not in a
    bad fork, runs, and its record says it was forked."""
    out = tmp_path / "out"
    ftbench("run", "--task", "generation", "--backend", "eager", *TINY, "--out", out,
            env=_emulated_cuda_fork_env(tmp_path, plant=False), check=True)
    (r,) = records(out)
    assert "server" not in _marks(tmp_path)
    assert r["status"] == "ok" and r["launch"]["mode"] == "fork", (r.get("error"), r.get("stderr_tail"))
    probe = json.loads((out / "environment.json").read_text())["fork_server"]
    assert probe["touched"] is False and probe["bad_fork"] is False, probe


def _server_touched_cuda(env: dict) -> str:
    code = ("from ftbench.harness.running import launch; p = launch.fork_server_probe(); "
            "print(p['touched'], 'bad fork' if 'bad fork' in p['why'] else p['why'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_a_server_that_queried_the_cuda_device_count_is_detected(tmp_path):
    """The same emulation with a planted ``torch.cuda.is_available()`` in the server: the query marks
    it, and the driver's probe sees the mark, so CUDA cells then start as plain processes (and a
    cell forked anyway refuses to run: test_a_forked_cell_refuses_a_server_that_initialised_cuda)."""
    assert _server_touched_cuda(_emulated_cuda_fork_env(tmp_path, plant=True)) == "True bad fork"
    assert "server" in _marks(tmp_path)


def test_launch_mode_names_how_a_cell_process_was_started(monkeypatch):
    from ftbench.harness.contract.config import CellSpec
    from ftbench.harness.running import cellproc, launch

    monkeypatch.setenv("FTBENCH_LAUNCH", "exec")
    spec = CellSpec(task="generation", backend="eager", model="tiny-gpt2")
    assert not launch.use_fork_server(spec)
    proc = launch.start(spec, [], [sys.executable, "-c", "pass"], dict(os.environ), os.devnull)
    assert proc.wait(60) == 0 and proc.launch == "exec"
    assert launch.launch_mode([sys.executable, "-m", "torch.distributed.run", "--standalone", "-m", "x"]) == "torchrun"
    assert launch.ForkedCell.launch == "fork"
    assert set(launch.LAUNCH_MODES) == {"fork", "exec", "torchrun"}
    assert "launch" in cellproc.CellOutcome.__dataclass_fields__


def _library_resets_cuda_peaks():
    """Stands for a library (DeepSpeed ZeRO-1/2's initialisation) resetting CUDA's peak statistics."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.cuda.reset_max_memory_allocated()
    except (RuntimeError, AssertionError, AttributeError):
        pass  # a CPU build of torch cannot reset; the spy has already seen the call


def test_a_library_resetting_cuda_peaks_during_setup_is_named_and_its_peak_kept(monkeypatch):
    from ftbench.harness.cell import memwindows

    originals = (torch.cuda.reset_peak_memory_stats, torch.cuda.memory.reset_peak_memory_stats,
                 torch.cuda.reset_max_memory_allocated)
    w = memwindows.MemoryWindows(torch.device("cpu"))
    readings = iter([{"cuda_peak_allocated_bytes": 7 * 2**30}])
    monkeypatch.setattr(w.spy, "read_peaks", lambda: next(readings))  # the peak just before the reset
    _library_resets_cuda_peaks()
    w.end_setup()
    # One reset (reset_max_memory_allocated calls reset_peak_memory_stats), named by its module.
    assert w.setup["reset_by"] == [__name__]
    assert w.setup["cuda_peak_allocated_bytes"] == 7 * 2**30
    # After setup the spy is gone: torch's own functions are back.
    assert (torch.cuda.reset_peak_memory_stats, torch.cuda.memory.reset_peak_memory_stats,
            torch.cuda.reset_max_memory_allocated) == originals
    mem = w.end_training()
    assert "reset_by" not in mem["train"]


def test_record_says_who_reset_the_setup_peaks_and_what_each_cuda_figure_is():
    from ftbench.harness.results.record import memory_windows

    ranks = [{"setup": {"cuda_peak_allocated_bytes": 5, "reset_by": ["deepspeed.runtime.zero.stage_1_and_2"]},
              "train": {"cuda_peak_allocated_bytes": 3}, "cuda_peak_allocated_bytes": 5}]
    out = memory_windows(ranks, on_cuda=True)
    assert out["setup_peak_reset_by"] == ["deepspeed.runtime.zero.stage_1_and_2"]
    assert set(out["memory_figures"]) == {"cuda_peak_allocated_bytes", "cuda_peak_reserved_bytes",
                                          "cuda_driver_used_bytes"}
    assert memory_windows([{"setup": {}, "train": {}}], on_cuda=False)["setup_peak_reset_by"] is None


def test_slurm_cpus_per_task_is_configurable_and_one_per_rank_by_default():
    from ftbench.harness.grid.slurm_options import SlurmOptions, options_from
    from ftbench.harness.running.slurm import cpus_per_task

    assert cpus_per_task(SlurmOptions(), nproc=4) == 4
    assert cpus_per_task(options_from({"cpus_per_task": 32}, "grid"), nproc=4) == 32
    assert cpus_per_task(SlurmOptions(cpus_per_task=32, options={"cpus-per-task": "16"}), nproc=4) == 16
    assert options_from({"cpus_per_task": 32}, "grid").to_dict()["cpus_per_task"] == 32


def test_ranks_share_the_usable_cores_unless_omp_num_threads_is_set(monkeypatch):
    from ftbench.harness.running import ranks

    monkeypatch.setattr(ranks.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert ranks.threads_per_rank(2) == 8 and ranks.threads_per_rank(32) == 1
    assert ranks.rank_env(0, 4, 29600, {})["OMP_NUM_THREADS"] == "4"
    assert "OMP_NUM_THREADS" not in ranks.rank_env(0, 4, 29600, {"OMP_NUM_THREADS": "1"})


def test_deepspeed_builds_cpu_adam_before_the_first_cell_on_cuda_as_on_cpu(monkeypatch):
    """The one-off CPU-Adam build of offload cells is prepared outside every cell's clock on CUDA too
    (DeepSpeed's CUDA accelerator builds the same host-side op); the CPU-only comm op is not."""
    pytest.importorskip("deepspeed")
    import deepspeed.accelerator
    import deepspeed.ops

    from ftbench.plugins import deepspeed_zero

    loaded = []

    class Builder:
        def __init__(self, name):
            self.NAME = name

        def load(self):
            loaded.append(self.NAME)

    class Accelerator:
        def create_op_builder(self, name):
            return Builder(name)

    monkeypatch.setattr(deepspeed.accelerator, "get_accelerator", lambda: Accelerator())
    monkeypatch.setattr(deepspeed.ops, "__compatible_ops__", {"CPUAdamBuilder": True, "ShareMemCommBuilder": True},
                        raising=False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    offload = [{"stage": 2, "offload": "cpu"}]
    deepspeed_zero.DeepSpeedEngine.prepare_once(offload, "cuda")
    assert loaded == ["CPUAdamBuilder"] and "DS_ACCELERATOR" not in os.environ
    loaded.clear()
    deepspeed_zero.DeepSpeedEngine.prepare_once([{"stage": 2}], "cuda")
    assert loaded == []
    deepspeed_zero.DeepSpeedEngine.prepare_once(offload, "cpu")
    assert loaded == ["ShareMemCommBuilder", "CPUAdamBuilder"]


def test_profile_phases_on_cuda_are_device_time_by_launching_phase():
    """On CUDA the host only launches kernels; the GPU runs them later. A kernel launched in the
    forward pass but run while the host is already in the optimizer is forward time on the device."""
    from types import SimpleNamespace

    from ftbench.harness.cell.profile import breakdown, device_breakdown

    def ev(name, a, b, id=0, on="CPU", linked=0):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=a, end=b), id=id,
                               device_type=SimpleNamespace(name=on), linked_correlation_id=linked)

    host = [ev("ftbench::step", 0, 100), ev("ftbench::forward_backward", 0, 30),
            ev("autograd::engine::evaluate_function: MmBackward0", 20, 30),
            ev("cudaLaunchKernel", 5, 6, id=1), ev("cudaLaunchKernel", 22, 23, id=2),
            ev("ftbench::optimizer", 30, 40), ev("cudaLaunchKernel", 31, 32, id=3),
            ev("cudaLaunchKernel", 33, 34, id=4)]
    kernels = [ev("sm90_xmma_gemm_bf16", 10, 50, on="CUDA", linked=1),        # forward, ran 10-50
               ev("sm90_xmma_gemm_bf16_dgrad", 50, 80, on="CUDA", linked=2),  # backward, 50-80
               ev("multi_tensor_apply_kernel", 80, 90, on="CUDA", linked=3),  # optimizer, 80-90
               ev("ncclDevKernel_AllReduce", 90, 95, on="CUDA", linked=4)]    # a collective
    dev = {k: round(v * 1e6, 3) for k, v in device_breakdown(host + kernels).items()}
    assert dev == {"forward": 40, "backward": 30, "optimizer": 10, "communication": 5, "other": 15}
    # The host clock puts none of that GPU work where it ran (and ignores the device's events).
    assert {k: round(v * 1e6, 3) for k, v in breakdown(host + kernels).items()} == \
        {"forward": 20, "backward": 10, "optimizer": 10, "communication": 0, "other": 60}


def test_device_events_come_from_the_raw_results_on_the_host_events_clock():
    """The first GPU run (torch 2.11) put every profiled phase in ``other``: its ``FunctionEvent``
    has no ``linked_correlation_id``, so no kernel had a launcher. Kernels now come from the raw
    Kineto results, whose clock must be the one ``prof.events()`` uses: checked on a real CPU
    profile, and the linking on kernels whose host events carry no such attribute."""
    from types import SimpleNamespace

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from ftbench.harness.cell.profile import device_breakdown, device_events

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("ftbench::step"):
            torch.mm(torch.ones(64, 64), torch.ones(64, 64))
    results = prof.profiler.kineto_results
    raw = {k.name(): (k.start_ns() - results.trace_start_ns()) / 1e3 for k in results.events()}
    (step,) = [e for e in prof.events() if e.name == "ftbench::step"]
    assert abs(raw["ftbench::step"] - step.time_range.start) < 1e-3
    assert device_events(results) == []  # a CPU profile has no device events

    class Kineto(SimpleNamespace):  # a raw event: accessors are methods
        def __getattr__(self, name):
            raise AttributeError(name)

    def kernel(name, a, b, linked):
        return Kineto(name=lambda: name, device_type=lambda: SimpleNamespace(name="CUDA"),
                      correlation_id=lambda: 0, linked_correlation_id=lambda: linked,
                      start_ns=lambda: 1000 * a, end_ns=lambda: 1000 * b)

    fake = SimpleNamespace(trace_start_ns=lambda: 0,
                           events=lambda: [kernel("gemm", 10, 50, 1), kernel("gemm_dgrad", 50, 80, 2)])

    def host(name, a, b, id=0):  # like torch 2.11's FunctionEvent: no linked_correlation_id
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=a, end=b), id=id,
                               device_type=SimpleNamespace(name="CPU"))

    hosts = [host("ftbench::step", 0, 100), host("ftbench::forward_backward", 0, 30),
             host("autograd::engine::evaluate_function: MmBackward0", 20, 30),
             host("aten::mm", 5, 6, id=1), host("aten::mm", 22, 23, id=2)]
    dev = {k: round(v * 1e6, 3) for k, v in device_breakdown(hosts + device_events(fake)).items()}
    assert dev == {"forward": 40, "backward": 30, "optimizer": 0, "communication": 0, "other": 30}


def test_the_fork_server_probe_decides_on_torch_s_flag_then_on_the_driver_itself():
    """The first GPU run started every CUDA cell as ``exec``: the probe counted a mapped libcuda as
    poisoning. Now torch's bad-fork flag decides; a mapped libcuda alone is checked by using the
    driver in the probe child (init, device 0's context), and the verdict says why."""
    from ftbench.harness.running.launch import cuda_verdict

    assert cuda_verdict(None)["touched"]
    assert cuda_verdict({"bad_fork": True, "libcuda_mapped": True})["touched"]
    mapped_dead = cuda_verdict({"bad_fork": False, "libcuda_mapped": True, "cuda_in_child": "cuInit 3"})
    assert mapped_dead["touched"] and "cuInit 3" in mapped_dead["why"]
    assert cuda_verdict({"bad_fork": False, "libcuda_mapped": True, "cuda_in_child": "no lib"})["touched"]
    mapped_fine = cuda_verdict({"bad_fork": False, "libcuda_mapped": True, "cuda_in_child": 0})
    assert not mapped_fine["touched"] and "can use CUDA" in mapped_fine["why"]
    assert not cuda_verdict({"bad_fork": False, "libcuda_mapped": False})["touched"]
