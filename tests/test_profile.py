"""``--profile``: a trace of extra steps after the measured ones, a phase breakdown that
adds up, a report that links both, and nothing paid by cells that do not ask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from ftbench.harness.cell.profile import PHASES, breakdown, profile_after_training
from results_factory import read

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--task", "generation", "--steps", "10", "--warmup", "2", "--seq-len", "32", "--batch-size", "8",
        "--eval-examples", "8", "--repeat", "2"]


def _run(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.setdefault("FTBENCH_CACHE", str(ROOT / ".pytest-ftbench-cache"))
    cmd = [sys.executable, "-m", "ftbench.harness.cli", "run", *TINY, *extra, "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return read(out)


def _check_profile(out: Path, rec: dict, nproc: int) -> dict:
    p = rec["profile"]
    assert p["steps"] == 3 and set(p["traces"]) == {str(r) for r in range(nproc)}
    for rel in p["traces"].values():
        trace = json.loads((out / rel).read_text())
        names = {e.get("name") for e in trace["traceEvents"]}
        assert "ftbench::step" in names and "ftbench::optimizer" in names
    phases = p["phases_s"]
    assert set(phases) == set(PHASES) and all(v >= 0 for v in phases.values())
    assert phases["forward"] > 0 and phases["backward"] > 0 and phases["optimizer"] > 0
    assert abs(sum(phases.values()) - p["step_s"]) <= 0.10 * p["step_s"], p
    return phases


def test_profiled_cells_trace_extra_steps_and_their_phases_add_up(tmp_path):
    from click.testing import CliRunner

    from ftbench.harness.cli import main

    plain = _run(tmp_path / "plain", "--backend", "eager")
    profiled = _run(tmp_path / "prof", "--backend", "eager", "--profile")
    assert all(r["profile"] is None for r in plain) and not (tmp_path / "plain" / "traces").exists()
    for rec in profiled:
        assert rec["status"] == "ok" and rec["config"]["profile_steps"] == 3
        phases = _check_profile(tmp_path / "prof", rec, 1)
        assert phases["communication"] == 0.0  # one process: nothing to communicate
    # same cells (profiling is not part of a cell's identity), so resume and compare pair them
    assert {r["cell_id"] for r in plain} == {r["cell_id"] for r in profiled}
    # the measured steps ran before the profiler started: same work, so step times stay in the same range
    # (this shared machine's run-to-run noise reaches +-40%; a profiler inside the loop costs 2x and more)
    med = lambda recs: sorted(r["step_time_s"] for r in recs)[len(recs) // 2]
    assert 0.5 < med(profiled) / med(plain) < 2.0
    # the report shows the breakdown and links every trace
    res = CliRunner().invoke(main, ["report", str(tmp_path / "prof"), "--quiet"])
    assert res.exit_code == 0, res.output
    md = (tmp_path / "prof" / "report" / "summary.md").read_text()
    assert "## Profiles" in md and "backward" in md
    html = (tmp_path / "prof" / "report" / "report.html").read_text()
    for rec in profiled:
        assert f"href='../{rec['profile']['traces']['0']}'" in html


@pytest.mark.slow
def test_data_parallel_profiles_show_communication_per_rank(tmp_path):
    recs = _run(tmp_path / "ddp", "--backend", "ddp", "--nproc", "2", "--profile")
    for rec in recs:
        phases = _check_profile(tmp_path / "ddp", rec, 2)
        assert phases["communication"] > 0
        assert set(rec["profile"]["phases_s_per_rank"]) == {"0", "1"}


def test_cells_without_profile_pay_nothing():
    spec = SimpleNamespace(profile_steps=0, profile_dir=None)
    before = set(sys.modules)
    assert profile_after_training(spec, engine=None, steps_data=[], device=None, rank=0) == {}
    assert "torch.profiler" in before or "torch.profiler" not in sys.modules


def test_breakdown_is_exclusive_and_covers_the_step():
    def ev(name, a, b):
        return SimpleNamespace(name=name, time_range=SimpleNamespace(start=a, end=b))

    events = [ev("ftbench::step", 0, 100), ev("ftbench::forward_backward", 0, 70),
              ev("aten::mm", 5, 20), ev("autograd::engine::evaluate_function: MmBackward0", 30, 40),
              ev("autograd::engine::evaluate_function: AddBackward0", 50, 65),
              ev("c10d::allreduce_", 60, 75), ev("ftbench::optimizer", 72, 95)]
    got = {k: round(v * 1e6, 3) for k, v in breakdown(events).items()}
    # comm 60-75; backward = envelope 30-65 minus comm = 30-60; optimizer 75-95; forward 0-30 + 65..70 minus comm
    assert got == {"communication": 15, "backward": 30, "optimizer": 20, "forward": 30, "other": 5}
    assert sum(got.values()) == 100
