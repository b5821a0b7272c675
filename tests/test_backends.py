"""The compile, DeepSpeed, DDP and FSDP backends: each runs a tiny cell to ``ok``,
reports what it should, builds its configuration from the recipe, and is
listed as unavailable (its cells skipped) when its package is missing."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from backend_grid import BACKENDS, RECIPE, all_backends_run, by_backend
from conftest import ftbench, records
from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.config import Recipe
from ftbench.harness.contract.engine import EngineContext

DATA_PARALLEL = {"zero0", "zero1", "zero2", "zero3", "zero2-offload", "ddp", "fsdp"}


@pytest.fixture(scope="module")
def run():
    return all_backends_run()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_runs_a_tiny_generation_cell(run, backend):
    _, _, recs = run
    rec = by_backend(recs)[backend]
    assert rec["status"] == "ok", rec["error"]
    assert len(rec["train_loss"]) == 8 and all(v == v for v in rec["train_loss"])
    assert rec["tokens_per_s"] > 0 and rec["eval_loss"] > 0
    assert rec["trainable_params"] == rec["total_params"] > 0
    nproc = 2 if backend in DATA_PARALLEL else 1
    assert rec["nproc"] == nproc
    # Memory per rank, the max over ranks as the cell's peak.
    per_rank = rec["memory_per_rank"]
    assert sorted(m["rank"] for m in per_rank) == list(range(nproc))
    assert rec["peak_memory_bytes"] == max(m["host_peak_rss_bytes"] for m in per_rank)


def test_a_grid_of_compile_and_deepspeed_cells_ends_without_leaked_semaphores(run):
    out, _, _ = run
    stderr = (out.parent / "stderr.log").read_text()
    assert "leaked semaphore" not in stderr and "resource_tracker" not in stderr, stderr[-2000:]


def test_all_backends_share_one_recipe_fingerprint(run):
    _, _, recs = run
    assert len({r["recipe_fingerprint"] for r in recs}) == 1


def test_compile_reports_compile_time_and_dynamo_counters(run):
    _, _, recs = run
    rec = by_backend(recs)["compile"]
    assert rec["compile_s"] is not None and rec["compile_s"] > 0
    stats = rec["backend_stats"]
    assert stats["unique_graphs"] >= 1
    # The tiny GPT-2 compiles whole, and every micro-batch has the same padded
    # shape: no graph break and nothing to recompile for.
    assert stats["graph_breaks"] == 0
    assert stats["recompiles"] == 0
    assert by_backend(recs)["eager"]["compile_s"] is None


@pytest.mark.parametrize("backend,stage,optimizer", [("zero0", 0, "AdamW"), ("zero1", 1, "AdamW"),
                                                     ("zero2", 2, "AdamW"), ("zero3", 3, "AdamW"),
                                                     ("zero2-offload", 2, "DeepSpeedCPUAdam")])
def test_deepspeed_config_comes_from_the_recipe(run, backend, stage, optimizer):
    _, _, recs = run
    stats = by_backend(recs)[backend]["backend_stats"]
    cfg = stats["deepspeed_config"]
    assert stats["zero_stage"] == stage and stats["optimizer"] == optimizer
    assert cfg["train_batch_size"] == 4 and cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["gradient_clipping"] == 1.0
    assert "optimizer" not in cfg and "scheduler" not in cfg and "bf16" not in cfg


# ------------------------------------------------------- DeepSpeed config


def _ds_engine(options, world=2, **recipe):
    from ftbench.plugins.deepspeed_zero import DeepSpeedEngine

    opts = DeepSpeedEngine.validate_options(options)
    ctx = EngineContext(recipe=Recipe(**recipe), device=torch.device("cpu"), loss_fn=None, world_size=world)
    return DeepSpeedEngine(opts, ctx)


def test_deepspeed_config_accumulation_precision_and_offload():
    cfg = _ds_engine({"stage": 3, "offload": "cpu", "offload_param": "cpu"}, world=2, batch_size=16, grad_accum=2,
                     precision="bf16", max_grad_norm=0.5).build_config()
    assert cfg["train_batch_size"] == 16 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 0.5
    # Same dtype policy as torch.autocast elsewhere: fp32 weights, fp32 gradient reduction.
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["offload_param"]["device"] == "cpu"


def test_deepspeed_settings_pass_through(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"overlap_comm": False}, "communication_data_type": "fp32"}))
    cfg = _ds_engine({"stage": 2, "config": str(path), "ds.zero_optimization.reduce_bucket_size": 1000}
                     ).build_config()
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 1000}
    assert cfg["communication_data_type"] == "fp32"


@pytest.mark.parametrize("options,message", [
    ({"ds.optimizer.type": "Lamb"}, "--lr"),
    ({"ds.train_batch_size": 64}, "--batch-size"),
    ({"ds.bf16.enabled": True}, "--precision"),
    ({"config": '{"gradient_clipping": 0}'}, "max_grad_norm"),
    ({"ds.zero_optimization.stage": 1}, "stage option"),
    ({"stage": 4}, "choose 0, 1, 2 or 3"),
    ({"stage": 0, "offload": "cpu"}, "needs ZeRO stage"),
    ({"stage": 2, "offload_param": "cpu"}, "needs stage=3"),
    ({"stages": 2}, "unknown deepspeed option"),
])
def test_deepspeed_rejects_settings_that_would_change_the_recipe(options, message):
    from ftbench.plugins.deepspeed_zero import DeepSpeedEngine

    with pytest.raises(FtbenchError, match=message):
        DeepSpeedEngine.validate_options({"stage": 2, **options})


@pytest.mark.parametrize("backend,options,message", [
    ("compile", {"mode": "fast"}, "invalid compile mode"),
    ("compile", {"fullgraph": "yes"}, "fullgraph=true"),
    ("compile", {"modes": "default"}, "unknown compile option"),
    ("ddp", {"bucket_cap_mb": -1}, "bucket_cap_mb"),
    ("fsdp", {"reshard": True}, "unknown fsdp option"),
])
def test_bad_backend_options_fail_with_the_fix(backend, options, message):
    from ftbench.harness.contract.registry import Registry

    spec = Registry.load().backend(backend)
    with pytest.raises(FtbenchError, match=message):
        spec.engine.validate_options({**spec.defaults, **options})


# ---------------------------------------------------- missing dependency


BLOCKER = '''
import sys

class _NoDeepSpeed:
    """Behaves as if deepspeed were not installed."""
    def find_spec(self, name, path=None, target=None):
        if name == "deepspeed" or name.startswith("deepspeed."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoDeepSpeed())
'''


def test_missing_deepspeed_is_unavailable_and_its_cell_skipped_with_the_hint(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    # sitecustomize runs at start-up of every process, the cell's included.
    (site / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    env = {"PYTHONPATH": str(site)}
    listing = ftbench("list", "--json", env=env, check=True)
    backends = {b["name"]: b for b in json.loads(listing.stdout)["backends"]}
    for name in ("deepspeed", "zero2", "zero3-offload"):
        assert backends[name]["available"] is False
        assert "pip install" in json.dumps(backends[name])
    assert backends["eager"]["available"] is True
    out = tmp_path / "out"
    proc = ftbench("run", "--task", "generation", "--backend", "zero2", *RECIPE, "--out", out, env=env,
                   check=True)
    (rec,) = records(out)
    assert rec["status"] == "skipped"
    assert "pip install 'ftbench[deepspeed]'" in rec["error"]
    assert "skipped" in proc.stdout


@pytest.mark.slow
def test_zero3_with_optimizer_and_parameter_offload(tmp_path):
    out = tmp_path / "out"
    ftbench("run", "--task", "generation", "--backend", "eager", "--backend", "zero3-offload", "--nproc", "2",
            *RECIPE, "--out", out, check=True)
    rec = by_backend(records(out))["zero3-offload"]
    assert rec["status"] == "ok", rec["error"]
    stats = rec["backend_stats"]
    assert stats["offload_param"] == "cpu" and stats["optimizer"] == "DeepSpeedCPUAdam"
    assert rec["parity"]["passed"] is True, rec["parity"]
