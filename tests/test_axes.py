"""Every setting is an axis from the command line, and labels name what varies.

Repeating a setting's option (or ``--sweep KEY=V1,V2``) makes it an axis of
the product; a repeated option that cannot be an axis exits 2 naming it.
``--dry-run`` lists the cells, so these tests train nothing.
"""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from ftbench.harness.analysis.report import records_frame, summary_frame
from ftbench.harness.analysis.resultset import load_result_set, variant_labels
from ftbench.harness.cli import main
from ftbench.harness.contract.config import Recipe
from ftbench.harness.grid.labels import varying_labels
from results_factory import make_record, write_set

BASE = ["run", "--task", "generation", "--backend", "eager", "--steps", "6", "--warmup", "2", "--dry-run"]


def dry_run(*args) -> tuple[int, list[list[str]], str]:
    """Exit code, the listed rows (#, task, cell, repeat, micro-batch, id) and the whole output."""
    res = CliRunner().invoke(main, [*BASE, *args], env={"COLUMNS": "200"})
    rows = [re.split(r"\s{2,}", line.strip()) for line in res.output.splitlines()
            if re.match(r"\s*\d+\s{2,}generation", line)]
    return res.exit_code, rows, res.output


def test_repeated_tuning_and_precision_make_four_cells_that_say_what_differs():
    code, rows, out = dry_run("--tuning", "full", "--tuning", "lora", "--precision", "fp32", "--precision", "bf16")
    assert code == 0, out
    assert sorted(r[2] for r in rows) == ["eager · full · bf16", "eager · full · fp32", "eager · lora · bf16",
                                          "eager · lora · fp32"]
    assert len({r[5] for r in rows}) == 4  # four distinct cells


def test_every_sweepable_setting_is_an_axis_and_sweep_takes_any_other():
    code, rows, out = dry_run("--lr", "1e-3", "--lr", "3e-3", "--packing", "--no-packing", "--sweep", "weight_decay=0,0.1")
    assert code == 0, out
    assert len(rows) == 8 and len({r[2] for r in rows}) == 8
    assert "eager · packed · lr=0.001 · weight_decay=0.1" in {r[2] for r in rows}
    code, rows, out = dry_run("--sweep", "eval_examples=8,16", "--nproc", "1")
    assert code == 0 and sorted(r[2] for r in rows) == ["eager · eval_examples=16", "eager · eval_examples=8"], out
    code, rows, out = dry_run("--micro-batch", "2", "--micro-batch", "4", "--batch-size", "8")
    assert code == 0, out
    assert sorted((r[2], r[4]) for r in rows) == [("eager · micro-batch 2", "2"), ("eager · micro-batch 4", "4")]


def test_seeds_and_repeats_are_listed_as_such():
    code, rows, out = dry_run("--seed", "1", "--seed", "2", "--repeat", "2")
    assert code == 0, out
    assert [(r[2], r[3]) for r in rows] == [("eager · seed 1", "1/2"), ("eager · seed 2", "1/2"),
                                            ("eager · seed 1", "2/2"), ("eager · seed 2", "2/2")]


@pytest.mark.parametrize("args, named", [
    (["--device", "cpu", "--device", "cuda"], "--device"),
    (["--repeat", "2", "--repeat", "3"], "--repeat"),
    (["--out", "a", "--out", "b"], "--out"),
    (["--lr", "1e-3", "--sweep", "lr=1e-3,3e-3"], "--lr"),
    (["--sweep", "bogus=1,2"], "bogus"),
    (["--micro-batch", "auto", "--micro-batch", "2"], "--micro-batch auto"),
    (["--seed", "1", "--seeds", "2,3"], "--seeds"),
])
def test_a_repeated_option_that_cannot_be_an_axis_exits_2_naming_it(args, named):
    code, rows, out = dry_run(*args)
    assert code == 2 and named in out and not rows, out


def test_the_same_value_twice_is_one_value_not_an_error():
    code, rows, out = dry_run("--device", "cpu", "--device", "cpu", "--lr", "1e-3", "--lr", "1e-3")
    assert code == 0 and len(rows) == 1, out


def test_labels_name_only_what_varies():
    def cfg(**recipe):
        return {"backend": "eager", "model": "tiny-gpt2", "data": "builtin", "nproc": 1,
                "recipe": {"steps": 12, "lr": 3e-3, **recipe}}

    labels = varying_labels({"a": cfg(tuning="full", precision="fp32", seed=1),
                             "b": cfg(tuning="lora", precision="bf16", seed=2)})
    assert labels == {"a": "eager · full · fp32 · seed 1", "b": "eager · lora · bf16 · seed 2"}
    assert varying_labels({"a": cfg(), "b": {**cfg(), "backend": "compile"}}) == {"a": "eager", "b": "compile"}


def test_report_rows_tell_tunings_apart_and_show_repeats_as_repeats(tmp_path):
    recs = [make_record(recipe=Recipe(steps=12, warmup=2, seq_len=32, batch_size=4, tuning=t), repeat=r)
            for t in ("full", "lora") for r in range(3)]
    rs = load_result_set(write_set(tmp_path / "set", recs))
    assert sorted(set(variant_labels(rs.records).values())) == ["eager · full", "eager · lora"]
    summary = summary_frame(records_frame(rs))
    assert sorted(zip(summary["variant"], summary["repeats"])) == [("eager · full", 3), ("eager · lora", 3)]


def test_compare_lines_tell_tunings_and_precisions_apart(tmp_path):
    from ftbench.harness.analysis.compare import compare_result_sets

    def recs(jitter_seed):
        return [make_record(recipe=Recipe(steps=12, warmup=2, seq_len=32, batch_size=4, tuning=t, precision=p),
                            repeat=r, seed=jitter_seed)
                for t in ("full", "lora") for p in ("fp32", "bf16") for r in range(2)]

    base = load_result_set(write_set(tmp_path / "base", recs(0)))
    new = load_result_set(write_set(tmp_path / "new", recs(1)))
    cells = {row.cell for row in compare_result_sets(base, new).rows}
    assert cells == {"eager · full · fp32", "eager · full · bf16", "eager · lora · fp32", "eager · lora · bf16"}


def test_the_run_summary_shows_a_cells_repeats_as_one_row_with_their_spread():
    from types import SimpleNamespace

    from rich.console import Console

    from ftbench.harness.running.progress import RunView

    recs = [make_record(recipe=Recipe(steps=12, warmup=2, seq_len=32, batch_size=4, seed=s), repeat=r, jitter=0.3)
            for s in (1, 2) for r in range(3)]
    con = Console(record=True, width=200)
    RunView(con, len(recs), "out").finish(SimpleNamespace(records=recs, skipped_done=0))
    text = con.export_text()
    rows = [line for line in text.splitlines() if line.strip().startswith("generation")]
    assert len(rows) == 2, rows
    assert "eager · seed 1" in rows[0] and "eager · seed 2" in rows[1]
    assert all(re.search(r"\s3\s+ok\s", row) and "–" in row for row in rows), rows  # n runs, [min–max]
    assert "median [min–max] over its ok runs" in " ".join(text.split())
