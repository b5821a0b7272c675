"""End to end: one honest generation x eager cell, its record, and repeatability."""

from __future__ import annotations

import pytest

from ftbench.harness.contract.schema import always_present

from conftest import TINY, ftbench, records


@pytest.fixture(scope="module")
def seeded_pair(tmp_path_factory):
    """The same cell twice (two fresh processes, same seed)."""
    out = tmp_path_factory.mktemp("run")
    proc = ftbench("run", "--task", "generation", "--backend", "eager", "--repeat", "2", "--out", out,
                   "--steps", "30", "--warmup", "5", "--batch-size", "8", "--seq-len", "48", "--eval-examples", "32")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out, records(out), proc


def test_record_has_every_key_and_is_ok(seeded_pair):
    _, recs, _ = seeded_pair
    assert len(recs) == 2
    for rec in recs:
        missing = [k for k in always_present() if k not in rec]
        assert not missing
        assert rec["status"] == "ok", rec["error"]
        assert rec["error"] is None
        assert rec["metric"] == "perplexity" and rec["metric_value"] > 1
        assert len(rec["train_loss"]) == 30
        assert rec["environment"]["versions"]["torch"]
        assert rec["config"]["recipe"]["steps"] == 30
        load = rec["machine_load"]  # the machine's load over the timed steps (docs/comparisons.md)
        assert 0 <= load["other_cpu_share"] <= 1 and load["window_s"] > 0


def test_loss_falls(seeded_pair):
    loss = seeded_pair[1][0]["train_loss"]
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    assert last < 0.8 * first, loss


def test_throughput_is_tokens_of_measured_steps_over_their_time(seeded_pair):
    rec = seeded_pair[1][0]
    warm = rec["config"]["recipe"]["warmup"]
    measured = rec["step_times_s"][warm:]
    assert len(measured) == 25 == rec["step_time"]["n"]
    assert rec["tokens_per_s"] == pytest.approx(rec["tokens"]["nonpad"] / sum(measured), rel=1e-9)
    assert rec["samples_per_s"] == pytest.approx(25 * 8 / sum(measured), rel=1e-9)
    assert rec["tokens"]["padded"] == 25 * 8 * 48
    assert rec["tokens"]["loss"] <= rec["tokens"]["nonpad"] <= rec["tokens"]["padded"]
    assert rec["step_time_s"] == pytest.approx(sorted(measured)[12])


def test_memory_is_measured_and_plausible(seeded_pair):
    rec = seeded_pair[1][0]
    param_bytes = rec["total_params"] * 4
    assert rec["memory_kind"] == "cpu_peak_rss"
    # The process holds torch itself plus weights, grads and two AdamW moments.
    assert rec["peak_memory_bytes"] > 4 * param_bytes
    assert rec["peak_memory_bytes"] > 50 * 2**20


def test_setup_is_separate_from_steady_state(seeded_pair):
    rec = seeded_pair[1][0]
    assert rec["setup_s"] > 0 and rec["compile_s"] is None
    assert set(rec["setup_phases"]) >= {"start_and_imports_s", "data_s", "tokenizer_s", "model_s", "engine_s"}


def test_same_seed_same_losses(seeded_pair):
    a, b = seeded_pair[1]
    assert a["cell_id"] == b["cell_id"] and (a["repeat"], b["repeat"]) == (0, 1)
    assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6, abs=1e-7)
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6)


def test_different_seed_different_cell(tmp_path):
    from ftbench.harness.contract.config import CellSpec, Recipe

    a = CellSpec("generation", "eager", "tiny-gpt2", recipe=Recipe(seed=0))
    b = CellSpec("generation", "eager", "tiny-gpt2", recipe=Recipe(seed=1))
    assert a.cell_id != b.cell_id and a.cell_id == CellSpec("generation", "eager", "tiny-gpt2").cell_id
    assert a.with_(repeat=3).cell_id == a.cell_id


def test_summary_table_and_progress(seeded_pair):
    _, _, proc = seeded_pair
    assert "[1/2]" in proc.stdout and "[2/2]" in proc.stdout
    assert "perplexity" in proc.stdout and "results.jsonl" in proc.stdout


@pytest.mark.parametrize("flag,name,listed", [("--task", "genration", "generation"),
                                              ("--backend", "eagr", "eager"),
                                              ("--model", "tiny-gtp2", "tiny-gpt2")])
def test_unknown_name_lists_available_and_keeps_results(seeded_pair, flag, name, listed):
    out = seeded_pair[0]
    before = (out / "results.jsonl").read_bytes()
    args = {"--task": "generation", "--backend": "eager"}
    args[flag] = name
    cli = ["run", "--out", out, *TINY]
    for k, v in args.items():
        cli += [k, v]
    if flag == "--model":
        cli += ["--model", name]
    proc = ftbench(*cli)
    assert proc.returncode == 2
    assert name in proc.stderr and listed in proc.stderr and "Did you mean" in proc.stderr
    assert (out / "results.jsonl").read_bytes() == before
