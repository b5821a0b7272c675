"""Resume after an interruption, --force, shards and ``ftbench merge``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import ftbench.harness.running.driver as driver
from ftbench.harness.results.writer import WriteOptions
from ftbench.harness.running.driver import RunOptions
from ftbench.harness.running.cellproc import CellOutcome
from ftbench.harness.cli import main
from ftbench.harness.grid.request import GridRequest
from ftbench.harness.grid.files import build_grid, select_shard
from ftbench.harness.contract.registry import Registry
from results_factory import ENV, make_record, modified, read, write_set

ROOT = Path(__file__).resolve().parent.parent

GRID = """
task: [generation]
backend: [eager]
model: [tiny-gpt2, tiny-llama]
sweep: {lr: [1.0e-3, 3.0e-3]}
settings: {steps: 12, warmup: 2}
repeat: 2
"""


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    p = tmp_path_factory.mktemp("grid") / "g.yaml"
    p.write_text(GRID)
    return build_grid(GridRequest(str(p))).cells(Registry.load())


class FakeRunner:
    """Stands in for the cell process: records what ran, can 'crash' the driver at the Nth cell."""

    def __init__(self, interrupt_at: int | None = None):
        self.ran = []
        self.interrupt_at = interrupt_at

    def __call__(self, spec, on_start=None):
        if self.interrupt_at is not None and len(self.ran) == self.interrupt_at:
            raise KeyboardInterrupt  # what Ctrl-C / SIGTERM does in the driver
        self.ran.append((spec.cell_id, spec.repeat))
        rank = {"rank": 0, "status": "ok", "tokens_per_s": 1000.0, "step_time": {"median": 0.01},
                "step_times_s": [0.01] * 12, "memory": {"host_peak_rss_bytes": 1 << 28}, "metric": "perplexity",
                "metric_value": 50.0, "higher_is_better": False, "train_loss": [4.0] * 12}
        return CellOutcome(ranks=[rank], status="ok", error=None, wall_s=0.01, returncode=0, tree_peak_bytes=1)


def test_resume_runs_only_the_missing_cells(cells, tmp_path, monkeypatch):
    out = tmp_path / "rs"
    first = FakeRunner(interrupt_at=3)
    monkeypatch.setattr(driver, "run_cell_process", first)
    with pytest.raises(KeyboardInterrupt):
        driver.run_cells(cells, out, ENV)
    assert len(read(out)) == 3  # finished cells were kept

    second = FakeRunner()
    monkeypatch.setattr(driver, "run_cell_process", second)
    summary = driver.run_cells(cells, out, ENV)
    assert summary.skipped_done == 3
    assert set(second.ran) == {(c.cell_id, c.repeat) for c in cells} - set(first.ran)
    keys = [(r["cell_id"], r["repeat"]) for r in read(out)]
    assert sorted(keys) == sorted((c.cell_id, c.repeat) for c in cells)  # each exactly once

    third = FakeRunner()
    monkeypatch.setattr(driver, "run_cell_process", third)
    assert driver.run_cells(cells, out, ENV).skipped_done == len(cells) and third.ran == []
    forced = FakeRunner()
    monkeypatch.setattr(driver, "run_cell_process", forced)
    driver.run_cells(cells, out, ENV, RunOptions(WriteOptions(force=True)))
    assert len(forced.ran) == len(cells)


def test_shards_merge_back_into_the_whole_grid(cells, tmp_path, monkeypatch):
    monkeypatch.setattr(driver, "run_cell_process", FakeRunner())
    shards = []
    for i in (1, 2, 3):
        d = tmp_path / f"shard{i}"
        driver.run_cells(select_shard(cells, f"{i}/3"), d, ENV)
        shards.append(str(d))
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "all"), *shards, shards[0]])  # one shard twice
    assert res.exit_code == 0, res.output
    merged = read(tmp_path / "all")
    assert sorted((r["cell_id"], r["repeat"]) for r in merged) == sorted((c.cell_id, c.repeat) for c in cells)
    assert "identical duplicate" in res.output
    assert json.loads((tmp_path / "all" / "merge.json").read_text())["sources"]
    # merging into an existing result set is refused
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "all"), shards[0]])
    assert res.exit_code == 2 and "already holds a result set" in res.output


def test_merge_refuses_incompatible_sets_and_says_why(tmp_path):
    a = write_set(tmp_path / "a", [make_record(repeat=0), make_record(repeat=1)])
    # the same cell and repeat measured again, with another result
    b = write_set(tmp_path / "b", [make_record(repeat=1, step_s=0.5)])
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "m1"), str(a), str(b)])
    assert res.exit_code == 2
    assert "repeat 1" in res.output and "measured in both" in res.output
    assert not (tmp_path / "m1" / "results.jsonl").exists()

    other = dict(ENV, cpu="Other CPU")
    c = write_set(tmp_path / "c", [make_record(task="classification", env=other)])
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "m2"), str(a), str(c)])
    assert res.exit_code == 2 and "different environments" in res.output and "Other CPU" in res.output
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "m3"), str(a), str(c), "--allow-mixed-environments"])
    assert res.exit_code == 0 and len(read(tmp_path / "m3")) == 3

    d = write_set(tmp_path / "d", modified([make_record(repeat=2)], recipe_fingerprint="0000"))
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "m4"), str(a), str(d)])
    assert res.exit_code == 2 and "recipe fingerprint" in res.output


def test_merge_keeps_the_valid_records_of_a_set_with_a_corrupt_line(tmp_path):
    a = write_set(tmp_path / "a", [make_record(repeat=0)])
    b = write_set(tmp_path / "b", [make_record(repeat=1)])
    with open(b / "results.jsonl", "a") as f:
        f.write('{"torn": \n')
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "m"), str(a), str(b)])
    assert res.exit_code == 0 and "line 2" in res.output
    assert len(read(tmp_path / "m")) == 2


def test_a_real_interrupted_run_resumes_where_it_stopped(tmp_path):
    """SIGTERM a real `ftbench run` after its first cell; the rerun does only the rest."""
    out = tmp_path / "rs"
    cmd = [sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation", "--backend", "eager", "--steps", "8",
           "--warmup", "2", "--seq-len", "32", "--eval-examples", "8", "--repeat", "2", "--out", str(out)]
    env = dict(os.environ, COLUMNS="200")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    results = out / "results.jsonl"
    while time.time() < deadline and not (results.exists() and results.read_text().count("\n") >= 1):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    first = read(out)
    assert len(first) == 1 and first[0]["repeat"] == 0
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "already in the result set, skipped" in rerun.stdout
    recs = read(out)
    assert sorted(r["repeat"] for r in recs) == [0, 1]
    assert recs[0]["started_at"] == first[0]["started_at"]  # the finished cell was not rerun


def test_repeats_run_round_robin_by_default_and_back_to_back_on_request(cells, tmp_path, monkeypatch):
    ids = list(dict.fromkeys(c.cell_id for c in cells))
    runner = FakeRunner(interrupt_at=len(ids) + 1)  # stopped early in the second round
    monkeypatch.setattr(driver, "run_cell_process", runner)
    with pytest.raises(KeyboardInterrupt):
        driver.run_cells(cells, tmp_path / "rr", ENV)
    # every cell's first repeat before any cell's second, in the grid's order
    assert runner.ran == [(cid, 0) for cid in ids] + [(ids[0], 1)]
    resumed = FakeRunner()
    monkeypatch.setattr(driver, "run_cell_process", resumed)
    driver.run_cells(cells, tmp_path / "rr", ENV)
    assert resumed.ran == [(cid, 1) for cid in ids[1:]]
    recs = read(tmp_path / "rr")
    # the record shows the order: start times and positions follow the round-robin
    assert [r["run_order"]["position"] for r in recs] == list(range(1, len(ids) + 2)) + list(
        range(len(ids) + 2, 2 * len(ids) + 1))
    assert all(r["run_order"]["order"] == "interleaved" for r in recs)
    starts = [r["started_at"] for r in recs]
    assert starts == sorted(starts)
    # a shard holds all repeats of its cells and interleaves them too
    shard = FakeRunner()
    monkeypatch.setattr(driver, "run_cell_process", shard)
    mine = select_shard(cells, "1/2")
    driver.run_cells(mine, tmp_path / "s1", ENV)
    sid = list(dict.fromkeys(c.cell_id for c in mine))
    assert shard.ran == [(c, 0) for c in sid] + [(c, 1) for c in sid]

    seq = FakeRunner()
    monkeypatch.setattr(driver, "run_cell_process", seq)
    driver.run_cells(cells, tmp_path / "seq", ENV, RunOptions(WriteOptions(order="sequential")))
    assert seq.ran == [(cid, r) for cid in ids for r in (0, 1)]


def test_order_is_a_grid_key_and_a_flag(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(GRID + "order: sequential\n")
    assert build_grid(GridRequest(str(p))).order == "sequential"
    assert build_grid(GridRequest(str(p), order="interleaved")).order == "interleaved"
    assert build_grid(GridRequest(axes={"task": ("generation",)})).order == "interleaved"
    p.write_text(GRID + "order: random\n")
    res = CliRunner().invoke(main, ["run", "--grid", str(p), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "order must be one of interleaved, sequential" in res.output
