"""``ftbench report``: Markdown, CSV, PNG and one self-contained HTML page."""

from __future__ import annotations

import base64
import re
import statistics
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from ftbench.harness.cli import main
from results_factory import grid_records, make_record, write_set

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def result_set(tmp_path_factory):
    recs = grid_records(tasks=("generation", "classification"), backends=("eager", "compile:mode=default"))
    recs.append(make_record(task="classification", backend="zero2", status="error"))
    path = write_set(tmp_path_factory.mktemp("rs") / "set", recs)
    with open(path / "results.jsonl", "a") as f:
        f.write("{not json\n")
    res = CliRunner(env={"COLUMNS": "250"}).invoke(main, ["report", str(path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return path, recs, res.output


def test_report_writes_markdown_csv_png_and_html(result_set):
    path, _, out = result_set
    rep = path / "report"
    for name in ("summary.md", "summary.csv", "records.csv", "report.html"):
        assert (rep / name).stat().st_size > 0, name
    plots = sorted(p.name for p in (rep / "plots").glob("*.png"))
    assert plots == ["loss.png", "memory.png", "quality_vs_throughput.png", "throughput.png"]
    for p in (rep / "plots").glob("*.png"):
        assert p.read_bytes()[:8] == PNG
    # the terminal table names every cell, and the corrupt line is reported by number
    for part in ("generation", "classification", "eager", "compile:mode=default", "zero2", "error"):
        assert part in out
    assert "line 14" in out and "unreadable record" in out


def test_tables_fold_repeats_into_median_and_range(result_set):
    path, recs, _ = result_set
    csv = pd.read_csv(path / "report" / "summary.csv")
    assert len(csv) == 5  # 2 tasks x 2 backends + the failed cell
    row = csv[(csv.task == "generation") & (csv.backend == "eager")].iloc[0]
    tps = [r["tokens_per_s"] for r in recs if r["task"] == "generation" and r["backend"] == "eager"]
    assert row.repeats == 3 and row.ok == 3
    assert row.tokens_per_s_median == pytest.approx(statistics.median(tps))
    assert row.tokens_per_s_min == pytest.approx(min(tps)) and row.tokens_per_s_max == pytest.approx(max(tps))
    failed = csv[csv.backend == "zero2"].iloc[0]
    assert failed.ok == 0 and "error" in failed.status
    assert len(pd.read_csv(path / "report" / "records.csv")) == len(recs)
    md = (path / "report" / "summary.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| task"))
    for col in ("tokens/s", "step ms", "peak memory", "setup s", "compile s", "metric", "parity"):
        assert col in header
    assert re.search(r"\d+ \[\d+–\d+\]", md), "median [min–max] of repeats"
    assert "![" in md and "plots/throughput.png" in md


def test_html_holds_the_tables_and_plots_that_exist(result_set):
    path, _, _ = result_set
    rep = path / "report"
    page = (rep / "report.html").read_text()
    assert "<table" in page and "compile:mode=default" in page and "perplexity" in page
    imgs = re.findall(r"<img src='data:image/png;base64,([^']+)'[^>]*data-file='([^']+)'", page)
    assert len(imgs) == 4
    for data, rel in imgs:
        f = rep / rel
        assert f.exists(), rel
        assert base64.b64decode(data) == f.read_bytes()  # self-contained, and the same picture as the file
        assert f"href='{rel}'" in page
    assert "line 14" in page  # warnings reach the page too


def test_report_of_a_missing_directory_exits_2(tmp_path):
    res = CliRunner().invoke(main, ["report", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "no result set" in res.output


def test_report_into_another_directory(result_set, tmp_path):
    path, _, _ = result_set
    res = CliRunner().invoke(main, ["report", str(path), "--out", str(tmp_path / "r"), "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "report.html").exists() and (tmp_path / "r" / "plots" / "loss.png").exists()
