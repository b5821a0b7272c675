"""``ftbench compare``: verdicts that survive noise, catch real slowdowns,
memory and quality regressions, and refuse to compare different recipes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftbench.harness.cli import main
from ftbench.harness.analysis.compare import IMPROVEMENT, REGRESSION, UNCHANGED, judge, parse_threshold, smallest_p
from ftbench.harness.contract.api import FtbenchError
from results_factory import ENV, make_record, modified, read, write_set

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--task", "generation", "--backend", "eager", "--steps", "12", "--warmup", "2", "--seq-len", "32",
        "--batch-size", "8", "--eval-examples", "8"]


def compare(base, new, *extra):
    # a wide console keeps rich from folding the table, so the output can be searched
    res = CliRunner(env={"COLUMNS": "250"}).invoke(main, ["compare", str(base), str(new), *map(str, extra)],
                                                   catch_exceptions=False)
    return res.exit_code, res.output


#: Loaded at start-up by every Python process of a slowed run (via PYTHONPATH): autograd's
#: anomaly detection, the debugging switch that is sometimes left on by mistake.  It records a
#: traceback for every autograd node and checks every gradient, and costs 2.5-3x the CPU time
#: of a tiny model's step (measured here) without changing what the step computes.
SLOWDOWN = "import torch\ntorch.autograd.set_detect_anomaly(True, check_nan=True)\n"


def _run(out, repeat, slow_dir=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="200")
    env.setdefault("FTBENCH_CACHE", str(ROOT / ".pytest-ftbench-cache"))
    if slow_dir:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(slow_dir), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "ftbench.harness.cli", "run", *TINY, "--repeat", str(repeat), "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def real_sets(tmp_path_factory):
    """The same tiny cell, 2 repeats each, run for real: once normally, and once
    with autograd anomaly detection switched on in the cell (:data:`SLOWDOWN`).

    The slowdown is in the work each step does, so other users of this
    shared machine cannot cancel it.  Slowing the cell by CPU share was
    tried first and rejected: pinned to one core (with or without a busy
    neighbour) it came out *faster* than the free cell whenever other users
    loaded the machine, because the scheduler moves their work off the
    pinned core; and low priority next to busy neighbours slowed setup far
    more than the steps.  Both sides use one thread (OMP_NUM_THREADS=1), so
    that thread spinning under contention adds no noise, and the runs are
    interleaved (base, slow, base, slow) so that load falls on both alike.
    """
    root = tmp_path_factory.mktemp("real")
    base, slow, hook = root / "base", root / "slow", root / "slowdown"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOWDOWN)
    for k in (1, 2):
        _run(base, k)
        _run(slow, k, slow_dir=hook)
    return base, slow


# ------------------------------------------------------------- real runs


def test_a_result_set_against_itself_is_no_regression(real_sets, tmp_path):
    base, _ = real_sets
    code, out = compare(base, base, "--markdown", tmp_path / "self.md")
    assert code == 0, out
    assert "0 regression(s)" in out
    rows = [line.split("|") for line in (tmp_path / "self.md").read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0]]
    verdicts = [c[header.index("verdict")].strip() for c in rows[2:]]
    figures = [c[header.index("figure")].strip() for c in rows[2:]]
    # one row per figure: speed (one verdict for throughput and step time), memory, the metric
    assert figures == ["speed", "peak_memory_bytes", "perplexity ↓"], figures
    assert verdicts == [UNCHANGED] * 3, verdicts


def test_a_real_slowdown_is_a_regression(real_sets, tmp_path):
    base, slow = real_sets
    b, s = read(base), read(slow)
    assert len(b) == len(s) == 2 and all(r["status"] == "ok" for r in b + s)
    code, out = compare(base, slow, "--markdown", tmp_path / "c.md")
    assert code == 1, out
    md = (tmp_path / "c.md").read_text()
    row = next(line for line in md.splitlines() if "| speed" in line and "eager" in line)
    # the evidence is stated: two repeats per side, no rank test possible, the interval beyond the threshold
    assert "regression" in row and "n=2/2: threshold and interval only" in row and "95% CI -" in row, row
    assert "shift of the whole run" not in out  # one cell only
    assert "step time)" in row and "step_time_s" not in md, row
    # and the other way round it is an improvement, not a regression
    code, out = compare(slow, base)
    assert code == 0 and "improvement" in out, out


def test_doubled_peak_memory_is_a_memory_regression(real_sets, tmp_path):
    base, _ = real_sets
    new = write_set(tmp_path / "new", modified(read(base), peak_memory_bytes=lambda r: 2 * r["peak_memory_bytes"]))
    code, out = compare(base, new, "--markdown", tmp_path / "m.md")
    assert code == 1, out
    rows = [line for line in (tmp_path / "m.md").read_text().splitlines() if line.startswith("|")]
    assert any("peak_memory_bytes" in r and "+100.0%" in r and "regression" in r for r in rows), rows
    assert all("regression" not in r for r in rows if "peak_memory_bytes" not in r), rows


def test_higher_perplexity_of_real_runs_is_a_quality_regression(real_sets, tmp_path):
    base, _ = real_sets
    new = write_set(tmp_path / "new", modified(read(base), metric_value=lambda r: r["metric_value"] * 1.5))
    code, out = compare(base, new, "--markdown", tmp_path / "q.md")
    assert code == 1, out
    rows = [line for line in (tmp_path / "q.md").read_text().splitlines()
            if line.startswith("|") and "perplexity" in line]
    assert rows and "regression" in rows[0] and "+50.0%" in rows[0], rows


# ------------------------------------------------------- synthetic records


def test_lower_accuracy_is_a_quality_regression_and_higher_an_improvement(tmp_path):
    base = write_set(tmp_path / "b", [make_record(task="classification", repeat=r, metric_value=0.8)
                                      for r in range(3)])
    worse = write_set(tmp_path / "w", [make_record(task="classification", repeat=r, metric_value=0.6)
                                       for r in range(3)])
    better = write_set(tmp_path / "g", [make_record(task="classification", repeat=r, metric_value=0.9)
                                        for r in range(3)])
    code, out = compare(base, worse)
    assert code == 1 and "accuracy ↑" in out, out
    code, out = compare(base, better)
    assert code == 0 and "improvement" in out, out


def test_mismatched_recipes_are_refused_with_the_reason(tmp_path):
    base = write_set(tmp_path / "b", [make_record(steps=12, repeat=r) for r in range(2)])
    new = write_set(tmp_path / "n", [make_record(steps=20, step_s=0.2, repeat=r) for r in range(2)])
    res = CliRunner().invoke(main, ["compare", str(base), str(new)])
    assert res.exit_code == 2, res.output
    assert "recipes differ" in res.output and "steps 12 -> 20" in res.output
    assert "no regression can be called" in res.output
    # next to a comparable cell, the mismatched one is listed as refused and the rest still compared
    both_b = write_set(tmp_path / "b2", read(base) + [make_record(backend="eager:x=1")])
    both_n = write_set(tmp_path / "n2", read(new) + [make_record(backend="eager:x=1")])
    code, out = compare(both_b, both_n)
    assert code == 0 and "refused" in out and "steps 12 -> 20" in out, out


def test_a_refusal_names_only_the_settings_that_really_differ(tmp_path):
    """An older record spells settings it predates as null or leaves them out (``packing None``,
    no ``numerics``), and writes 2 where the newer writes 2.0: none of that is a difference, and
    the one real difference (the learning rate) must be named, first."""
    base_recs = [make_record(repeat=r) for r in range(2)]
    for r in base_recs:
        r["config"]["recipe"]["packing"] = None
        r["config"]["recipe"].pop("numerics")
        r["config"]["recipe"]["max_grad_norm"] = 1
        r["config"]["opt"] = None
        r["config"]["time_limit_s"] = 60.0  # a limit, not a setting of the cell
    base = write_set(tmp_path / "b", base_recs)
    new = write_set(tmp_path / "n", [make_record(repeat=r, lr=1e-3) for r in range(2)])
    res = CliRunner(env={"COLUMNS": "250"}).invoke(main, ["compare", str(base), str(new)])
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.split())
    assert "recipes differ (lr 0.003 -> 0.001)" in flat, flat
    for spurious in ("packing", "numerics", "max_grad_norm", "opt", "time_limit_s"):
        assert spurious not in flat, (spurious, flat)

    from ftbench.harness.analysis.resultset import config_diff

    older, newer = base_recs[0], make_record(steps=20, lr=1e-3)
    newer["config"]["recipe"]["warmup"] = 3
    # the settings of the recipe fingerprint first (why the cells are not comparable), then the rest
    assert config_diff(older, newer) == ["lr 0.003 -> 0.001", "steps 12 -> 20", "warmup 2 -> 3"]


def test_noise_alone_is_not_a_regression(tmp_path):
    def run_set(name, step_times):
        return write_set(tmp_path / name, [make_record(repeat=r, step_s=s, jitter=0.1) for r, s in
                                           enumerate(step_times)])

    base = run_set("b", [0.020, 0.023, 0.019])
    # one repeat disturbed by a neighbour (2.5x slower): the median barely moves
    code, out = compare(base, run_set("n1", [0.021, 0.018, 0.050]))
    assert code == 0, out
    # medians ~20% apart, but the repeats overlap: within the machine's noise
    code, out = compare(run_set("b2", [0.020, 0.021, 0.030]), run_set("n2", [0.025, 0.026, 0.019]))
    assert code == 0 and "within noise" in out, out


def test_single_runs_are_judged_by_a_threshold_settable_per_figure(tmp_path):
    base = write_set(tmp_path / "b", [make_record(step_s=0.020, jitter=0)])
    new = write_set(tmp_path / "n", [make_record(step_s=0.021, jitter=0)])  # 5% slower
    code, out = compare(base, new)
    assert code == 0 and "n=1/1: threshold only" in out, out
    code, out = compare(base, new, "--threshold", "tokens_per_s=3%", "--threshold", "step_time=0.03")
    assert code == 1, out
    res = CliRunner().invoke(main, ["compare", str(base), str(new), "--threshold", "sped=5%"])
    assert res.exit_code == 2 and "speed" in res.output


def test_a_cell_that_now_fails_is_a_regression(tmp_path):
    base = write_set(tmp_path / "b", [make_record()])
    new = write_set(tmp_path / "n", [make_record(status="error")])
    code, out = compare(base, new)
    assert code == 1 and "now fails" in out, out


def test_corrupt_lines_are_reported_by_line_number_and_the_rest_used(tmp_path):
    base = write_set(tmp_path / "b", [make_record(repeat=r) for r in range(2)])
    new = tmp_path / "n"
    shutil.copytree(base, new)
    with open(new / "results.jsonl", "a") as f:
        f.write('{"cell_id": "torn", "stat\n')
    code, out = compare(base, new)
    assert code == 0, out
    assert "line 3" in out and "unreadable record" in out


def test_different_environments_are_warned_about(tmp_path):
    base = write_set(tmp_path / "b", [make_record()])
    other = dict(ENV, cpu="Other CPU", versions={"torch": "2.99", "transformers": "5.0"})
    new = write_set(tmp_path / "n", [make_record(env=other)])
    code, out = compare(base, new)
    assert code == 0
    flat = " ".join(out.split())
    assert "environments differ" in flat and "cpu 'Test CPU' -> 'Other CPU'" in flat and "torch" in flat


def test_bad_input_exits_2(tmp_path):
    res = CliRunner().invoke(main, ["compare", str(tmp_path / "nope"), str(tmp_path)])
    assert res.exit_code == 2 and "no result set" in res.output
    a = write_set(tmp_path / "a", [make_record(task="generation")])
    b = write_set(tmp_path / "b", [make_record(task="classification")])
    res = CliRunner().invoke(main, ["compare", str(a), str(b)])
    assert res.exit_code == 2 and "no cell in common" in res.output


def test_judge_rules():
    # a large change whose whole interval lies beyond the threshold is a regression
    j = judge([100, 101, 99], [50, 51, 49], True, 0.1)
    assert j.verdict == REGRESSION and j.change == pytest.approx(-0.5)
    assert j.interval[1] <= -0.1 and "n=3/3: threshold and interval only" in j.evidence and j.p_value is None
    # the same medians, but repeats so spread that the interval reaches inside the threshold
    j = judge([100, 60, 99], [50, 101, 49], True, 0.1)
    assert j.verdict == UNCHANGED and j.interval[0] < -0.1 < j.interval[1] and "within noise" in j.evidence
    # below the minimum effect size: unchanged even if perfectly separated
    assert judge([100, 100.5], [97, 97.5], True, 0.1).verdict == UNCHANGED
    # lower is better for step-like figures: growth is the regression
    assert judge([10, 10.1, 9.9], [20, 20.2, 19.8], False, 0.1).verdict == REGRESSION
    assert judge([20, 20.2, 19.8], [10, 10.1, 9.9], False, 0.1).verdict == IMPROVEMENT
    # the rank test is used only once enough repeats can reach p < alpha
    assert smallest_p(3, 3) == pytest.approx(0.1) and smallest_p(5, 5) < 0.01 < smallest_p(4, 4)
    j = judge([100 + i for i in range(7)], [50 + i for i in range(7)], True, 0.1)
    assert j.verdict == REGRESSION and j.p_value < 0.01 and "U test p=" in j.evidence
    # separated by a rank test's standards but interleaved by one repeat: the U test vetoes
    j = judge([100, 101, 102, 103, 104, 105, 60], [60, 61, 62, 63, 64, 65, 104], True, 0.1)
    assert j.p_value is not None and j.verdict == UNCHANGED
    assert parse_threshold("memory=25%") == ("peak_memory_bytes", 0.25)
    assert parse_threshold("step_time_s=30%") == parse_threshold("tokens_per_s=0.3") == ("speed", 0.3)
    with pytest.raises(FtbenchError):
        parse_threshold("tokens_per_s=lots")


# ------------------------------------------------------------ calibration


def _aa_pair(tmp_path, env=None):
    def one(name, seed):
        return write_set(tmp_path / name, [make_record(task=t, repeat=r, seed=seed, jitter=0.2, env=env,
                                                       step_s=0.02 * (1 + 0.07 * ((r + seed) % 3 - 1)))
                                           for t in ("generation", "classification") for r in range(3)])
    return one("aa1", 1), one("aa2", 2)


def test_calibration_writes_noise_thresholds_that_compare_reads(tmp_path):
    a1, a2 = _aa_pair(tmp_path)
    res = CliRunner().invoke(main, ["compare", "--calibrate", str(a1), str(a2), "-o", str(tmp_path / "t.json")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "t.json").read_text())
    assert data["machine"]["cpu"] == "Test CPU" and set(data["thresholds"]) == {"speed", "peak_memory_bytes", "time_to_target",
                                                                                   "metric"}
    # the speed threshold covers the largest A/A move with a margin; memory and metric did not move
    assert data["thresholds"]["speed"] >= 1.5 * data["largest_aa_change"]["speed"] > 0
    assert data["thresholds"]["peak_memory_bytes"] == 0.01
    code, out = compare(a1, a2, "--thresholds-from", tmp_path / "t.json")
    assert code == 0 and "calibrated by" in out, out
    # every cell slower alike: a regression, with a note that the whole run moved
    slow = write_set(tmp_path / "slow", modified(read(a2), tokens_per_s=lambda r: r["tokens_per_s"] / 2))
    code, out = compare(a1, slow)
    assert code == 1 and "shift of the whole run" in " ".join(out.split()), out
    # a set from another machine refuses the file, saying why
    b1, _ = _aa_pair(tmp_path / "other", env=dict(ENV, cpu="Other CPU"))
    res = CliRunner().invoke(main, ["compare", str(a1), str(b1), "--thresholds-from", str(tmp_path / "t.json")])
    assert res.exit_code == 2 and "another machine" in res.output and "Other CPU" in res.output, res.output
    # an A/A pair from two machines is no calibration
    res = CliRunner().invoke(main, ["compare", "--calibrate", str(a1), str(b1), "-o", str(tmp_path / "x.json")])
    assert res.exit_code == 2 and "one machine" in res.output
    res = CliRunner().invoke(main, ["compare", "--calibrate", str(a1), str(a2)])
    assert res.exit_code == 2 and "-o FILE" in res.output
