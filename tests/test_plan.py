"""``ftbench plan``, ``--micro-batch`` and the memory limits' bad input."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import ftbench
from ftbench.harness.cli import main
from ftbench.harness.grid import memplan
from ftbench.harness.contract.config import CellSpec, Recipe
from ftbench.harness.contract.memory_model import ModelShape, ParamCounts
from ftbench.harness.contract.registry import Registry


@pytest.fixture
def no_training(monkeypatch):
    """Any attempt to start a cell process fails the test."""
    from ftbench.harness.running import cellproc, launch

    def refuse(*a, **k):
        raise AssertionError("ftbench plan started a cell process")

    monkeypatch.setattr(launch, "start", refuse)
    monkeypatch.setattr(cellproc, "run_cell_process", refuse)


def test_plan_says_what_would_fit_without_training(no_training):
    # Global batch 256 x 512 tokens in one micro-batch: gigabytes of activations on a tiny model.
    args = ["plan", "--task", "generation", "--backend", "eager", "--batch-size", "256", "--seq-len", "512",
            "--memory-limit-mb", "1500", "--device", "cpu"]
    res = CliRunner().invoke(main, args, env={"COLUMNS": "250"})
    assert res.exit_code == 0, res.output
    assert "does NOT fit" in res.output and "would fit" in res.output
    assert "--grad-accum" in res.output  # a smaller micro-batch of the same global batch
    res = CliRunner().invoke(main, args + ["--json"])
    row = json.loads(res.output)[0]
    assert row["fits"] is False and row["compared_bytes"] > row["limit_bytes"] == 1500 * 2**20
    assert set(row["prediction"]["breakdown"]) >= {"weights", "gradients", "optimizer", "activations", "harness"}
    small = CliRunner().invoke(main, args[:-6] + ["--batch-size", "8", "--seq-len", "64", "--json",
                                                  "--memory-limit-mb", "1500", "--device", "cpu"])
    assert json.loads(small.output)[0]["fits"] is True


def test_suggestions_name_sharding_and_offload_backends_for_a_large_model(monkeypatch):
    """A model whose state dominates (1e9 parameters, faked into the meta-model cache) on a GPU:
    plan names a backend that offloads or shards, from the registry, not from a list in the core."""
    reg = Registry.load()
    cell = CellSpec(task="generation", backend="eager", model="tiny-gpt2", device="cuda", memory_limit_mb=8000,
                    recipe=Recipe(batch_size=8, seq_len=64))
    key = (cell.model, cell.task, cell.data, cell.columns, cell.recipe.seed, cell.recipe.tuning)
    monkeypatch.setitem(memplan._FACTS, key, (ParamCounts(10**9, 10**9, 5 * 10**7),
                                              ModelShape("decoder", 2048, 20, 8192, 32000)))
    cp = memplan.plan_cell(reg, cell)
    assert cp.fits is False and cp.prediction.state_bytes == 16 * 10**9
    text = " ".join(cp.suggestions)
    assert "offload" in text and "--backend" in text


def test_micro_batch_sets_grad_accum_and_keeps_the_recipe(no_training):
    res = CliRunner().invoke(main, ["plan", "--task", "generation", "--backend", "eager", "--backend", "ddp",
                                    "--nproc", "2", "--batch-size", "16", "--micro-batch", "2", "--json",
                                    "--device", "cpu"])
    assert res.exit_code == 0, res.output
    rows = {r["backend"]: r for r in json.loads(res.output)}
    assert (rows["eager"]["micro_batch"], rows["eager"]["grad_accum"]) == (2, 8)
    assert (rows["ddp"]["micro_batch"], rows["ddp"]["grad_accum"]) == (2, 4)


@pytest.mark.parametrize("args,words", [
    (["--backend", "ddp", "--nproc", "2", "--batch-size", "5", "--micro-batch", "auto"],
     ["global batch 5", "nproc 2", "no micro-batch divides"]),
    (["--backend", "eager", "--batch-size", "8", "--micro-batch", "3"], ["--micro-batch 3", "[1, 2, 4, 8]"]),
    (["--backend", "eager", "--micro-batch", "auto", "--grad-accum", "2"], ["--grad-accum"]),
    (["--backend", "eager", "--memory-limit-mb", "100"], ["below what the harness itself needs", "--memory-limit-mb"]),
    (["--backend", "ddp", "--nproc", "2", "--memory-limit-mb", "700"], ["below what the harness itself needs"]),
])
def test_bad_memory_input_exits_2_before_any_cell(tmp_path, args, words):
    out = tmp_path / "out"
    proc = ftbench("run", "--task", "generation", *args, "--device", "cpu", "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr
    assert proc.stderr.count("\n") <= 8 and not (out / "results.jsonl").exists()
