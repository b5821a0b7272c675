"""``--micro-batch auto``: the search's logic (fast), and real probe cells under a memory limit (slow)."""

from __future__ import annotations

import os
import uuid

import pytest

from conftest import ftbench, processes_with_env, records
from ftbench.harness.contract.config import CellSpec, Recipe
from ftbench.harness.contract.registry import Registry
from ftbench.harness.running.cellproc import CellOutcome
from ftbench.harness.running.fit import search_micro_batch


def fake_runner(largest_ok: int, seen: list):
    def run(spec):
        r = spec.recipe
        micro = r.batch_size // (spec.nproc * r.grad_accum)
        seen.append((micro, r.batch_size, r.steps, spec.memory_limit_mb))
        status = "ok" if micro <= largest_ok else "oom"
        return CellOutcome(ranks=[], status=status, error=None, wall_s=0.1, returncode=0, tree_peak_bytes=1)
    return run


@pytest.mark.parametrize("largest_ok", [1, 4, 8, 32])
def test_search_finds_the_boundary_from_the_prediction(largest_ok):
    reg = Registry.load()
    cell = CellSpec(task="generation", backend="eager", model="tiny-gpt2", device="cpu", memory_limit_mb=4000,
                    recipe=Recipe(batch_size=32, seq_len=32, steps=20, warmup=5))
    seen: list = []
    found = search_micro_batch(reg, cell, run=fake_runner(largest_ok, seen))
    assert found.micro_batch == largest_ok
    statuses = {p["micro_batch"]: p["status"] for p in found.probes}
    assert statuses[largest_ok] == "ok" and statuses.get(2 * largest_ok, "oom") == "oom"
    assert seen[0][0] == found.predicted  # the search starts at the memory model's prediction
    # Probes are short runs of the same global batch under the same limit.
    assert all(b == 32 and steps <= 3 and limit == 4000 for _, b, steps, limit in seen)


def test_search_reports_when_nothing_fits():
    reg = Registry.load()
    cell = CellSpec(task="generation", backend="eager", model="tiny-gpt2", device="cpu", memory_limit_mb=4000,
                    recipe=Recipe(batch_size=8, seq_len=32))
    found = search_micro_batch(reg, cell, run=fake_runner(0, []))
    assert found.micro_batch is None and [p["micro_batch"] for p in found.probes][-1] == 1


@pytest.mark.slow
def test_auto_micro_batch_under_a_memory_limit(tmp_path):
    """Real probe cells on CPU: the micro-batch found fits, twice it does not; the global batch and
    the recipe fingerprint are the user's; no probe process is left behind."""
    tag = uuid.uuid4().hex
    common = ["--task", "generation", "--backend", "eager", "--steps", "4", "--warmup", "1", "--batch-size", "64",
              "--seq-len", "256", "--eval-examples", "8", "--device", "cpu"]
    out = tmp_path / "auto"
    proc = ftbench("run", *common, "--micro-batch", "auto", "--memory-limit-mb", LIMIT_MB, "--out", out,
                   env={"FTBENCH_TEST_TAG": tag})
    assert proc.returncode == 0, proc.stderr
    rec = records(out)[-1]
    search = rec["micro_batch_search"]
    probes = {p["micro_batch"]: p for p in search["probes"]}
    m = rec["micro_batch"]
    assert rec["status"] == "ok" and m == search["micro_batch"] and m < 64, search
    assert probes[m]["status"] == "ok" and probes[2 * m]["status"] == "oom", search
    assert rec["peak_memory_bytes"] <= LIMIT_MB * 2**20
    assert rec["config"]["recipe"]["batch_size"] == 64 and rec["config"]["recipe"]["grad_accum"] == 64 // m
    # The user's recipe (grad_accum 1, as given) has the same fingerprint as the cell as run.
    user = CellSpec.from_dict({**rec["config"], "recipe": {**rec["config"]["recipe"], "grad_accum": 1}})
    assert rec["recipe_fingerprint"] == user.fingerprint()
    assert processes_with_env(FTBENCH_TEST_TAG=tag) == []
    # Resumed with a second repeat: the planned cell counts as done, and the new repeat reuses the search.
    again = ftbench("run", *common, "--micro-batch", "auto", "--memory-limit-mb", LIMIT_MB, "--out", out,
                    "--repeat", "2")
    assert again.returncode == 0, again.stderr
    recs = records(out)
    assert len(recs) == 2 and recs[1]["config"]["repeat"] == 1 and recs[1]["micro_batch"] == m
    assert recs[1]["micro_batch_search"]["probes"] == search["probes"]
    assert "earlier run" in recs[1]["micro_batch_search"]["note"]


def test_a_search_names_the_planned_cell_so_a_resumed_grid_finds_it():
    from ftbench.harness.running.fit import FitResult

    cell = CellSpec(task="generation", backend="eager", model="tiny-gpt2", device="cpu", memory_limit_mb=1000,
                    recipe=Recipe(batch_size=16, seq_len=32))
    found = search_micro_batch(Registry.load(), cell, run=fake_runner(4, []))
    assert found.cell_id == cell.cell_id
    again = FitResult.from_record({"micro_batch_search": found.to_dict()})
    assert again == found
    assert FitResult.from_record({"micro_batch_search": {**found.to_dict(), "cell_id": None}}) is None


#: Tiny GPT-2, seq 256: ~20 KB of activations per token over a ~350 MiB process (docs/memory.md).
LIMIT_MB = int(os.environ.get("FTBENCH_TEST_FIT_LIMIT_MB", "480"))


def test_a_probe_that_only_just_fits_counts_as_not_fitting():
    reg = Registry.load()
    cell = CellSpec(task="generation", backend="eager", model="tiny-gpt2", device="cpu", memory_limit_mb=1000,
                    recipe=Recipe(batch_size=16, seq_len=32))

    def run(spec):  # every micro-batch "fits", but 8 and 16 within 2% of the limit
        micro = spec.recipe.batch_size // spec.recipe.grad_accum
        peak = int((980 if micro >= 8 else 500) * 2**20)
        return CellOutcome(ranks=[], status="ok", error=None, wall_s=0.1, returncode=0, tree_peak_bytes=peak)

    found = search_micro_batch(reg, cell, run=run)
    assert found.micro_batch == 4
    tight = next(p for p in found.probes if p["micro_batch"] == 8)
    assert tight["status"] == "oom" and "headroom" in tight["error"]
