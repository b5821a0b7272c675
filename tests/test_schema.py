"""The record schema: it builds the record, documents it, and every command reads result sets through it.

Real cells (eager, and ddp on two ranks) show that the worker writes no key
the schema does not know and that every key the schema promises is in their
records; synthetic result sets with one bad line of each kind show that
report, compare, history, merge and the resume of run skip it with a warning
naming the file and line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import ftbench.harness.contract.schema as schema
import ftbench.harness.running.driver as driver
from ftbench.harness.cli import main
from ftbench.harness.contract.config import CellSpec, Recipe
from ftbench.harness.contract.schema import (KEYS, RECORD, SCHEMA_VERSION, SOURCES, TYPES, always_present,
                                             rank_report_keys, render_markdown, validate_record)
from ftbench.harness.results.record import build_record
from ftbench.harness.results.store import read_records
from ftbench.harness.running.cellproc import CellOutcome

from results_factory import ENV, make_record, write_set

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "results" / "baseline-cpu"
TINY = ["--steps", "4", "--warmup", "1", "--batch-size", "4", "--seq-len", "32", "--eval-examples", "8"]


# ------------------------------------------------------------------ the schema itself


def test_docs_records_md_is_generated_from_the_schema():
    doc = (ROOT / "docs" / "records.md").read_text()
    assert doc == render_markdown(), "docs/records.md is out of date: python -m ftbench.harness.contract.schema " \
                                     "> docs/records.md"


def test_every_key_has_a_known_type_a_source_and_a_meaning():
    assert len(KEYS) == len(RECORD), "a key is defined twice"
    for k in RECORD:
        assert k.type in TYPES and k.source in SOURCES and k.meaning, k
    assert {"cell_id", "status", "config", "environment", "schema_version"} <= set(always_present())


def test_a_key_added_to_the_schema_is_copied_from_rank_0_without_touching_the_builder(monkeypatch):
    new = schema.Key("bubbles_per_s", "float", "bubbles/s", schema.RANK0, "a figure a future worker measures")
    monkeypatch.setattr(schema, "RECORD", schema.RECORD + (new,))
    spec = CellSpec(task="generation", backend="eager", model="tiny-gpt2", recipe=Recipe())
    ranks = [{"rank": 0, "status": "ok", "bubbles_per_s": 7.5, "tokens_per_s": 100.0}]
    record = build_record(spec, CellOutcome(ranks=ranks, status="ok", error=None, wall_s=1.0, returncode=0,
                                            tree_peak_bytes=1), ENV, time.time())
    assert record["bubbles_per_s"] == 7.5 and record["tokens_per_s"] == 100.0
    assert record["schema_version"] == SCHEMA_VERSION


def unknown_rank_keys(report: dict) -> set[str]:
    return set(report) - rank_report_keys()


def test_a_rank_key_the_schema_does_not_know_is_caught():
    assert unknown_rank_keys({"rank": 0, "tokens_per_s": 1.0}) == set()
    assert unknown_rank_keys({"rank": 0, "bubbles_per_s": 1.0}) == {"bubbles_per_s"}


# ------------------------------------------------------------------ real cells


@pytest.fixture(scope="module")
def real_cells(tmp_path_factory):
    """An eager cell and a ddp cell on two ranks, through the real CLI; their rank reports and records."""
    tmp = tmp_path_factory.mktemp("schema")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "rank_reports.py"), str(tmp / "reports.json"),
                           "run", "--task", "generation", "--backend", "eager", "--backend", "ddp", "--nproc", "2",
                           *TINY, "--out", str(tmp / "run")],
                          capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "FTBENCH_CACHE": os.environ.get("FTBENCH_CACHE",
                                                                             str(ROOT / ".pytest-ftbench-cache"))})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads((tmp / "reports.json").read_text()), read_records(tmp / "run")


def test_the_worker_writes_no_key_the_schema_does_not_know(real_cells):
    reports, _ = real_cells
    assert len(reports) == 3  # eager's rank 0, ddp's ranks 0 and 1
    for report in reports:
        assert report["status"] == "ok", report.get("error")
        assert not unknown_rank_keys(report), f"rank report keys missing from the schema: {unknown_rank_keys(report)}"


def test_real_records_carry_every_promised_key_and_no_other(real_cells):
    _, rr = real_cells
    assert not rr.problems and len(rr.records) == 2
    assert rr.versions == {SCHEMA_VERSION: 2}
    for rec in rr.records:
        assert validate_record(rec) is None
        assert rec["schema_version"] == SCHEMA_VERSION
        assert not [k for k in always_present() if k not in rec], "the schema promises keys the record lacks"
        assert not [k for k in rec if k not in KEYS], "the record holds keys the schema does not define"
        # Figures the old hand-kept list dropped on the way from rank 0 to the record.
        assert rec["param_bytes"] == 4 * rec["total_params"] and rec["eval_examples"] == 8
        assert all(m["after_eval"]["host_peak_rss_bytes"] for m in rec["memory_per_rank"])
    ddp = next(r for r in rr.records if r["backend"] == "ddp")
    assert [m["rank"] for m in ddp["memory_per_rank"]] == [0, 1]


def test_new_records_keep_every_key_of_the_committed_baseline(real_cells):
    _, rr = real_cells
    old = read_records(BASELINE)
    assert not old.problems and old.versions == {1: len(old.records)}
    had = set().union(*(set(r) for r in old.records))
    assert not had - set(rr.records[0]), "keys the baseline's records had are gone"


# ------------------------------------------------------------------ one validating reader

GOOD = json.loads(json.dumps(make_record()))  # as read back: lists, not tuples


def _line(**changes) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


#: One line of each kind that must be skipped, with a phrase of its warning.
BAD_LINES = {
    "truncated": (b'{"cell_id": "torn", "sta', "unreadable record"),
    "binary": (b"\x00\xff\xfe\x80\x01 garbage \x9c\x07", "unreadable record"),
    "latin-1": ('{"cell_id": "x", "status": "ok", "task": "caf\u00e9"}'.encode("latin-1"), "unreadable record"),
    "utf-16": ('{"cell_id": "x", "status": "ok"}'.encode("utf-16"), "unreadable record"),
    "nested 100000 deep": (b'{"cell_id": "deep", "status": "ok", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                           "nested deeper"),
    "nested 40 deep": (_line(metrics={"m": json.loads("[" * 40 + "]" * 40)}), "nested deeper than 32"),
    "environment: x": (_line(environment="x"), "environment: 'x' is not object"),
    "repeat: zero": (_line(repeat="zero"), "repeat: 'zero' is not int"),
    "status: 5": (_line(status=5), "status: 5 is not str"),
    "unknown status": (_line(status="fine"), "status: 'fine' is not one of"),
    "task: [a]": (_line(task=["a"]), "task: ['a'] is not str"),
    "tokens_per_s: 1e400": (_line(tokens_per_s=1.0).replace(b'"tokens_per_s": 1.0', b'"tokens_per_s": 1e400'),
                            "tokens_per_s: inf is not a finite number"),
    "NaN": (_line(eval_loss=1.5).replace(b'"eval_loss": 1.5', b'"eval_loss": NaN'), "NaN is not valid JSON"),
    "config: null": (_line(config=None), "config: None is not object"),
    "config.repeat: x": (_line(config={**GOOD["config"], "repeat": "x"}), "config/repeat"),
    "parity: ok": (_line(parity="ok"), "parity: 'ok' is not object"),
    "train_loss: [a]": (_line(train_loss=["a"]), "train_loss/0: 'a' is not a number"),
    "schema_version: x": (_line(schema_version="x"), "schema_version"),
    "lone surrogate": (_line(task="x").replace(b'"task": "x"', b'"task": "\\ud800"'), "not valid Unicode"),
    "not an object": (b"[1, 2, 3]", "not a JSON object"),
}


def corrupted_set(path: Path, records: list[dict]) -> tuple[Path, dict[str, int]]:
    """``records`` with one bad line of each kind between them; the line number of each."""
    d = write_set(path, records[:1])
    lines = {}
    with open(d / "results.jsonl", "ab") as f:
        for n, (name, (raw, _)) in enumerate(BAD_LINES.items(), start=2):
            f.write(raw + b"\n")
            lines[name] = n
        for rec in records[1:]:
            f.write(json.dumps(rec).encode() + b"\n")
    return d, lines


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_each_bad_line_is_skipped_with_a_warning_naming_file_and_line(tmp_path, name):
    raw, phrase = BAD_LINES[name]
    d = write_set(tmp_path / "rs", [GOOD])
    with open(d / "results.jsonl", "ab") as f:
        f.write(raw + b"\n")
    rr = read_records(d)
    assert rr.records == [GOOD]
    [problem] = rr.problems
    assert f"{d / 'results.jsonl'} line 2:" in problem and phrase in problem and problem.endswith("skipped"), problem


def test_the_good_line_variants_are_accepted():
    assert validate_record(GOOD) is None
    assert validate_record({**GOOD, "eval_loss": "nan", "train_loss": [1.0, "inf"]}) is None  # the writer's encoding
    assert validate_record({**GOOD, "a_key_from_a_newer_ftbench": [1]}) is None
    assert validate_record({"cell_id": "a", "status": "ok"}) is None  # older and minimal records


def _assert_warned(text: str, path: Path, lines: dict[str, int]) -> None:
    text = " ".join(text.split())
    assert "Traceback" not in text, text
    for name, n in lines.items():
        assert f"results.jsonl line {n}:" in text, (name, text[-3000:])
    assert str(path) in text


def invoke(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), (res.output, res.exception)
    return res.exit_code, res.output


def records_of_three_repeats() -> list[dict]:
    return [make_record(repeat=r) for r in range(3)]


def test_report_skips_every_bad_line_and_says_which_version_it_read(tmp_path):
    d, lines = corrupted_set(tmp_path / "rs", records_of_three_repeats())
    code, out = invoke("report", d, "--out", tmp_path / "rep")
    assert code == 0, out
    _assert_warned(out, d, lines)
    assert "3 record(s) of schema version 1" in out  # the factory's records carry no schema_version
    assert "schema version 1" in (tmp_path / "rep" / "summary.md").read_text()


def test_compare_skips_every_bad_line(tmp_path):
    base = write_set(tmp_path / "base", records_of_three_repeats())
    new, lines = corrupted_set(tmp_path / "new", records_of_three_repeats())
    code, out = invoke("compare", base, new)
    assert code == 0, out
    _assert_warned(out, new, lines)
    assert "read base: 3 record(s) of schema version 1" in " ".join(out.split())


def test_history_skips_every_bad_line(tmp_path):
    write_set(tmp_path / "sets" / "a", records_of_three_repeats())
    bad, lines = corrupted_set(tmp_path / "sets" / "b", records_of_three_repeats())
    code, out = invoke("history", tmp_path / "sets", "--out", tmp_path / "hist")
    assert code in (0, 1), out
    _assert_warned(out, bad, lines)
    assert "6 record(s) of schema version 1" in " ".join(out.split())


def test_merge_skips_every_bad_line_and_keeps_the_rest(tmp_path):
    bad, lines = corrupted_set(tmp_path / "rs", records_of_three_repeats())
    code, out = invoke("merge", tmp_path / "merged", bad)
    assert code == 0, out
    _assert_warned(out, bad, lines)
    assert len(read_records(tmp_path / "merged").records) == 3
    assert "schema version 1" in out


def test_resume_skips_every_bad_line_and_reruns_nothing_it_has(tmp_path, monkeypatch):
    ran = []

    def fake_cell(spec, *args, **kwargs):
        ran.append(spec.cell_id)
        step = {"median": 0.01, "mean": 0.01, "min": 0.01, "max": 0.01, "iqr": 0.0, "stdev": 0.0, "n": 3}
        rank = {"rank": 0, "status": "ok", "tokens_per_s": 1000.0, "step_time": step,
                "memory": {"host_peak_rss_bytes": 1 << 28}, "train_loss": [4.0] * 4}
        return CellOutcome(ranks=[rank], status="ok", error=None, wall_s=0.01, returncode=0, tree_peak_bytes=1)

    monkeypatch.setattr(driver, "run_cell_process", fake_cell)
    out = tmp_path / "rs"
    args = ["run", "--task", "generation", "--backend", "eager", *TINY, "--out", out]
    assert invoke(*args)[0] == 0 and len(ran) == 1
    [done] = read_records(out).records
    # Bad lines, some of them about the very cell that is done, and a wrong-typed copy of its record.
    with open(out / "results.jsonl", "ab") as f:
        for raw, _ in BAD_LINES.values():
            f.write(raw + b"\n")
        f.write(json.dumps({**done, "config": None}).encode() + b"\n")
    code, text = invoke(*args)
    assert code == 0, text
    assert len(ran) == 1, "a finished cell ran again"
    _assert_warned(text, out, {name: n for n, name in enumerate(BAD_LINES, start=2)})


# ------------------------------------------------------------------ versions


def test_a_set_of_old_and_new_records_says_both_versions(tmp_path):
    old = make_record(repeat=0)
    new = {**make_record(repeat=1), "schema_version": SCHEMA_VERSION}
    rr = read_records(write_set(tmp_path / "rs", [old, new]))
    assert not rr.problems
    assert rr.versions_read() == f"schema versions 1 (1 record), {SCHEMA_VERSION} (1 record)"


def test_records_of_a_newer_schema_are_read_with_a_note(tmp_path):
    newer = {**GOOD, "schema_version": SCHEMA_VERSION + 1, "a_future_key": {"x": 1}}
    rr = read_records(write_set(tmp_path / "rs", [newer]))
    assert rr.records == [newer]
    assert len(rr.problems) == 1 and f"schema version {SCHEMA_VERSION + 1}, newer" in rr.problems[0]


def test_the_record_of_a_cell_that_reported_nothing_is_valid_and_complete():
    """A cell whose process died before any rank wrote its report still makes a whole, valid record."""
    spec = CellSpec(task="generation", backend="eager", model="tiny-gpt2", recipe=Recipe())
    record = build_record(spec, CellOutcome(ranks=[], status="error", error="boom", wall_s=1.0, returncode=1,
                                            tree_peak_bytes=None, stderr_tail="x"), ENV, time.time())
    assert validate_record(json.loads(json.dumps(record))) is None
    # The driver adds the memory model's keys after building the record.
    assert set(always_present()) - set(record) == {"micro_batch", "memory_predicted_bytes"}


# ------------------------------------------------------------------ non-finite values the writer itself stores


def test_times_and_throughput_are_finite_but_losses_and_metrics_may_not_be():
    assert validate_record({**GOOD, "train_loss": [4.0, "nan"], "eval_loss": "inf", "metric_value": "nan",
                            "metrics": {"perplexity": "inf"}}) is None
    for key, value in (("tokens_per_s", "inf"), ("step_time_s", "nan"), ("step_times_s", [0.1, "inf"]),
                       ("setup_s", "inf"), ("step_time", {**GOOD["step_time"], "median": "nan"})):
        assert validate_record({**GOOD, key: value}) is not None, key


def test_a_diverged_curve_and_a_nan_metric_are_reported_not_crashed_on(tmp_path):
    """The writer stores an infinite parity deviation and a NaN metric as strings; report reads them."""
    ref = {**GOOD, "parity": {"status": "reference", "reason": "reference backend"}}
    bad = {**make_record(backend="compile"), "parity": {"status": "compared", "max_rel_dev": "inf",
                                                         "window_max_rel_dev": "inf", "tolerance": 1e-5,
                                                         "passed": False, "left_tolerance_at_step": 3},
           "eval_curve": [{"step": 6, "train_s": 0.1, "metrics": {"perplexity": "nan"}},
                          {"step": 12, "train_s": 0.2, "metrics": {"perplexity": 50.0}}]}
    d = write_set(tmp_path / "rs", [ref, json.loads(json.dumps(bad))])
    code, out = invoke("report", d, "--out", tmp_path / "rep")
    assert code == 0, out
    assert "✗ inf, drift inf from step 3" in (tmp_path / "rep" / "summary.md").read_text()
