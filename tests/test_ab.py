"""``ftbench ab``: two versions of the code interleaved in one run and judged on paired rounds.

The end-to-end tests make a small git repository from this source tree (a
commit, then an uncommitted change), so that ``--base HEAD`` and the working
tree are two real versions, each run from its own tree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftbench.harness.analysis.abtest import check_run_args, dependencies, paired_judgement, round_order
from ftbench.harness.contract.api import FtbenchError

from conftest import make_repo

ROOT = Path(__file__).resolve().parent.parent
CELL = ["--task", "generation", "--backend", "eager", "--steps", "6", "--warmup", "2", "--batch-size", "4",
        "--seq-len", "32", "--eval-examples", "8"]
#: Planted in StandardEngine.step of the "new" version: every optimizer step also sleeps this long.
SLEEP_S = 0.2


def test_rounds_alternate_abba():
    assert round_order(3) == [(1, "A"), (1, "B"), (2, "B"), (2, "A"), (3, "A"), (3, "B")]


def test_paired_rounds_see_through_load_that_moves_both_sides():
    # Each round ran under a different load, but within a round the two versions were equal.
    base = [10.0, 20.0, 14.0, 30.0, 12.0]
    new = [10.2, 19.8, 14.1, 29.7, 12.1]
    assert paired_judgement(base, new, 0.10).verdict == "unchanged"
    # The same load, and the new version twice as slow in every round: a regression, with its interval.
    j = paired_judgement(base, [2 * b for b in base], 0.10)
    assert j.verdict == "regression" and j.change == pytest.approx(-0.5)
    assert j.interval[1] <= -0.10 and "paired n=5" in j.evidence
    assert paired_judgement([10.0], [5.0], 0.10).verdict == "improvement"  # one round: threshold only


def test_a_paired_change_inside_its_noise_is_not_called():
    # Rounds disagree in sign: the interval straddles the threshold, so no verdict despite a big mean.
    j = paired_judgement([10, 10, 10, 10], [5, 14, 5, 14], 0.10)
    assert j.verdict == "unchanged" and "within noise" in j.evidence


def test_four_rounds_under_load_get_a_student_t_interval_not_a_bootstrap_of_four():
    """The false alarm ab_under_load.py found: four rounds each 12-60% apart under a load that came and
    went. A percentile bootstrap of four values is no wider than their range and called it; the
    Student-t interval (too few rounds for the signed-rank test) reaches below the threshold."""
    base = [10.0, 10.0, 10.0, 10.0]
    new = [10.0 / r for r in (1.12, 1.35, 1.15, 1.6)]
    j = paired_judgement(base, new, 0.10)
    assert j.verdict == "unchanged" and "within noise" in j.evidence, j.evidence
    assert j.interval[0] < 0.10 < j.interval[1]


def test_ab_owns_out_repeat_and_shard():
    with pytest.raises(FtbenchError, match="--out, --repeat"):
        check_run_args(["--task", "generation", "--repeat", "3", "--out=x"])
    check_run_args(CELL)


def _plant_slow_step(repo: Path) -> None:
    engine = repo / "harness" / "contract" / "engine.py"
    text = engine.read_text()
    anchor = "    def step(self) -> None:\n"
    assert anchor in text
    engine.write_text(text.replace(anchor, anchor + f"        __import__('time').sleep({SLEEP_S})\n", 1))


def _ab(repo: Path, out: Path, *extra: str, env: dict):
    # Three rounds: with two, the Student-t interval (1 degree of freedom) is so wide that even this
    # 20x slowdown is within noise when the base side's two rounds differ 2x, as under the suite's load.
    cmd = [sys.executable, "-m", "ftbench.harness.cli", "ab", "--base", "HEAD", "--rounds", "3", "--out", str(out),
           *extra, "--", *CELL]
    return subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow  # 2 min on the 2-core CI machine (12 cell runs); tests/test_ci_recipe.py runs ab end to end in the default suite
def test_a_planted_slowdown_in_the_working_tree_is_a_regression_and_versions_are_reused(tmp_path):
    repo = make_repo(tmp_path)
    _plant_slow_step(repo)
    env = {**os.environ, "FTBENCH_CACHE": str(tmp_path / "cache")}
    proc = _ab(repo, tmp_path / "ab1", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "extracting HEAD" in proc.stdout and "overlay of HEAD" in proc.stdout
    a = [json.loads(line) for line in (tmp_path / "ab1" / "A" / "results.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "ab1" / "B" / "results.jsonl").read_text().splitlines()]
    assert [r["repeat"] for r in a] == [0, 1, 2] and [r["repeat"] for r in b] == [0, 1, 2]
    # each side ran its own code: only B's steps carry the planted sleep
    assert min(r["step_time_s"] for r in b) > SLEEP_S > max(r["step_time_s"] for r in a)
    assert a[0]["cell_id"] == b[0]["cell_id"]
    md = (tmp_path / "ab1" / "ab.md").read_text()
    assert "regression" in md and "paired n=3 rounds" in md
    # A second ab reuses the extracted version: its first cell starts within seconds.
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "ftbench.harness.cli", "ab", "--base", "HEAD", "--rounds", "1",
                             "--out", str(tmp_path / "ab2"), "--", *CELL], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    for line in proc.stdout:
        if first is None and line.startswith("ab: cell 1/1 round 1/1 A") and "starting" in line:
            first = time.time() - t0
    proc.wait(timeout=600)
    assert first is not None
    log = (tmp_path / "ab2" / "ab.log").read_text()
    assert "extracting" not in log
    assert first < 10, f"the first cell started {first:.1f} s after ab did"


def test_dependencies_read_from_pyproject():
    deps = dependencies(ROOT)
    assert any(d.startswith("torch") for d in deps["dependencies"]) and "deepspeed" in deps["optional"]


def test_ab_outside_a_checkout_is_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ftbench.harness.cli", "ab", "--base", "main", "--", *CELL],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "git checkout of ftbench" in proc.stdout + proc.stderr
