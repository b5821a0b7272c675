"""Time to quality: evaluation during training, targets and seeds."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
from conftest import ftbench, records

from ftbench.harness.contract.targets import check_target, parse_target

#: Tiny generation cells that reach perplexity 20 within 30 steps (measured: ~15-20 steps).
RECIPE = ["--task", "generation", "--steps", "30", "--warmup", "3", "--batch-size", "8", "--seq-len", "32",
          "--eval-examples", "16", "--eval-every", "5"]
TARGET = 20.0


@functools.cache
def ttq_run() -> list[dict]:
    out = Path(tempfile.mkdtemp(prefix="ftbench-ttq-")) / "run"
    ftbench("run", *RECIPE, "--backend", "eager", "--backend", "compile", "--backend", "ddp", "--nproc", "2",
            "--target", f"perplexity={TARGET:g}", "--out", out, check=True, timeout=900)
    return records(out)


def test_every_backend_reaches_the_target_and_the_figures_agree_with_the_curve():
    recs = ttq_run()
    assert {r["backend"] for r in recs} == {"eager", "compile", "ddp"}
    for r in recs:
        assert r["status"] == "ok", r.get("error")
        assert r["target"]["text"] == f"perplexity={TARGET:g}" and r["target_reached"] is True
        curve = r["eval_curve"]
        assert [p["step"] for p in curve] == [5, 10, 15, 20, 25, 30]
        first = next(p for p in curve if p["metrics"]["perplexity"] <= TARGET)
        assert r["steps_to_target"] == first["step"]
        assert r["time_to_target_s"] == pytest.approx(sum(r["step_times_s"][: first["step"]]))
        assert 0 < r["time_to_target_s"] <= sum(r["step_times_s"])
        # The points before it missed the target; training time and wall time grow along the curve.
        assert all(p["metrics"]["perplexity"] > TARGET for p in curve if p["step"] < first["step"])
        assert all(a["train_s"] < b["train_s"] and a["wall_s"] < b["wall_s"] for a, b in zip(curve, curve[1:]))
        # Evaluation ran outside the step clock: its time is its own figure.
        assert r["eval_during_training_s"] > 0
        # The final evaluation is the curve's last point.
        assert r["metric_value"] == pytest.approx(curve[-1]["metrics"]["perplexity"])


def test_the_report_has_a_time_to_target_table_and_a_quality_vs_time_plot(tmp_path):
    from ftbench.harness.analysis.report import write_report

    recs = ttq_run()
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rep, _ = write_report(tmp_path)
    table = rep.time_to_target
    assert len(table) == 3 and list(table["reached"]) == ["1/1"] * 3
    assert all(v != "not reached" for v in table["time to target s (median)"])
    assert rep.plots["quality_vs_time"].exists()
    assert "## Time to target" in rep.markdown.read_text()


def test_a_target_out_of_reach_is_an_ok_cell_that_did_not_reach_it(tmp_path):
    out = tmp_path / "run"
    ftbench("run", "--task", "generation", "--backend", "eager", "--steps", "6", "--warmup", "1",
            "--batch-size", "4", "--seq-len", "32", "--eval-examples", "8", "--target", "perplexity=1.01",
            "--out", out, check=True)
    (r,) = records(out)
    assert r["status"] == "ok" and r["target_reached"] is False
    assert r["steps_to_target"] is None and r["time_to_target_s"] is None
    # No --eval-every: a target alone evaluates about ten times over the run (here every step).
    assert [p["step"] for p in r["eval_curve"]] == list(range(1, 7))


def test_stop_at_target_ends_the_cell_early_with_its_steady_state_figures(tmp_path):
    out = tmp_path / "run"
    ftbench("run", "--task", "generation", "--backend", "eager", "--steps", "12", "--warmup", "2",
            "--batch-size", "4", "--seq-len", "32", "--eval-examples", "8", "--eval-every", "4",
            "--target", "perplexity=100000", "--stop-at-target", "--out", out, check=True)
    (r,) = records(out)
    assert r["status"] == "ok" and r["stopped_at_target"] is True
    assert r["steps_to_target"] == 4 and len(r["train_loss"]) == 4 and len(r["step_times_s"]) == 4
    assert r["tokens_per_s"] > 0 and r["tokens"]["samples"] == 4 * 2  # two measured steps of batch 4


def test_seeds_run_each_cell_under_every_seed(tmp_path):
    out = tmp_path / "run"
    ftbench("run", "--task", "generation", "--backend", "eager", "--steps", "4", "--warmup", "1",
            "--batch-size", "4", "--seq-len", "32", "--eval-examples", "8", "--seeds", "1,2,3",
            "--target", "perplexity=1000000", "--out", out, check=True)
    recs = records(out)
    assert sorted(r["config"]["recipe"]["seed"] for r in recs) == [1, 2, 3]
    assert len({r["cell_id"] for r in recs}) == 3 and all(r["target_reached"] for r in recs)


def test_median_time_to_target_counts_a_miss_as_infinitely_slow():
    from ftbench.harness.analysis.quality_report import median_time_to_target

    def run(t):
        return {"status": "ok", "target_reached": t is not None, "time_to_target_s": t}

    assert median_time_to_target([run(3.0), run(5.0), run(None)]) == 5.0
    assert median_time_to_target([run(3.0), run(None), run(None)]) is None


class _Task:
    name = "generation"

    def metric_directions(self):
        return {"perplexity": False, "eval_loss": False, "accuracy": True}


@pytest.mark.parametrize("text,phrase", [
    ("bleu=20", "has no metric 'bleu'"),
    ("perplexity>=20", "points the wrong way"),
    ("accuracy<=0.9", "points the wrong way"),
    ("accuracy=1.5", "can never be reached"),
    ("perplexity=0.5", "can never be reached"),
])
def test_a_target_the_task_cannot_reach_is_refused(text, phrase):
    from ftbench import FtbenchError

    with pytest.raises(FtbenchError, match=phrase):
        check_target(parse_target(text), _Task())


@pytest.mark.parametrize("args,phrases", [
    (["--target", "bleu=20"], ["applies to no task of the grid", "generation (eval_loss, perplexity)"]),
    (["--target", "perplexity>=20"], ["points the wrong way", "perplexity<=20"]),
    (["--target", "perplexity"], ["malformed target", "METRIC=VALUE"]),
    (["--stop-at-target"], ["stop_at_target", "needs a target"]),
    (["--seeds", "1,x"], ["--seeds", "comma-separated"]),
])
def test_bad_targets_exit_2_before_any_cell_runs(tmp_path, args, phrases):
    out = tmp_path / "run"
    proc = ftbench("run", "--task", "generation", "--backend", "eager", "--steps", "4", "--warmup", "1", *args,
                   "--out", out)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr
    assert not (out / "results.jsonl").exists()


def _ttq_record(repeat, reached, t):
    from results_factory import make_record

    r = make_record(repeat=repeat)
    r.update(target={"metric": "perplexity", "value": 20.0, "higher_is_better": False, "text": "perplexity=20"},
             target_reached=reached, time_to_target_s=t if reached else None, steps_to_target=10 if reached else None)
    return r


def test_compare_flags_a_target_no_longer_reached_and_judges_the_time_to_it(tmp_path):
    from results_factory import write_set

    from ftbench.harness.analysis.compare import REGRESSION, UNCHANGED, compare_sets

    base = write_set(tmp_path / "base", [_ttq_record(i, True, 10.0 + i * 0.1) for i in range(3)])
    missed = write_set(tmp_path / "missed", [_ttq_record(i, False, None) for i in range(3)])
    same = write_set(tmp_path / "same", [_ttq_record(i, True, 10.05 + i * 0.1) for i in range(3)])
    slower = write_set(tmp_path / "slower", [_ttq_record(i, True, 20.0 + i * 0.1) for i in range(3)])

    def ttq_row(new):
        return next(r for r in compare_sets(base, new).rows if r.figure == "time_to_target")

    row = ttq_row(missed)
    assert row.verdict == REGRESSION and "no longer reached" in row.evidence and "3/3 -> 0/3" in row.evidence
    assert ttq_row(same).verdict == UNCHANGED
    assert ttq_row(slower).verdict == REGRESSION and ttq_row(slower).change > 0.9
