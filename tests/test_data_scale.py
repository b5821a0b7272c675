"""Reading only what a run uses: the line index, the rows a plan draws, the tokenizer
sample, streamed hub data, and errors in rows used versus rows never read."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from ftbench.harness.contract.api import DataError
from ftbench.harness.cell.batches import batch_plan
from ftbench.harness.cell.rowindex import FileRows
from ftbench.harness.cell.rowsource import (TOKENIZER_SAMPLE_ROWS, load_run_data, plan_indices, sample_indices,
                                            stream_sources)
from ftbench.harness.contract.config import Recipe
from ftbench.harness.contract.registry import Registry

from conftest import ftbench, records


@pytest.fixture(scope="module")
def reg():
    return Registry.load()


def recipe(**kw):
    base = dict(steps=5, warmup=1, batch_size=8, seq_len=32, seed=0)
    return Recipe(**{**base, **kw}).validate()


def big_jsonl(path: Path, n: int, bad: dict[int, str] | None = None) -> Path:
    bad = bad or {}
    with open(path, "w") as f:
        for i in range(n):
            f.write(bad.get(i, json.dumps({"text": f"line {i} of the big file"})) + "\n")
    return path


def _read_whole(path: Path) -> list[tuple[dict, str]]:
    """The reference: every row of a file read front to back with the standard library, with its line."""
    out = []
    if path.suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            start = 2
            for r in reader:
                out.append((dict(r), f"{path} line {start}"))
                start = reader.line_num + 1
        return out
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            out.append((json.loads(line), f"{path} line {lineno}"))
    return out


def test_index_matches_a_whole_file_read_for_jsonl_and_csv(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "a"}\n\n   \n{"text": "b"}\n  {"text": "c"}\n{"text": "d"}')
    (tmp_path / "b.csv").write_text('text,label\ngood,1\n"multi\nline, quoted",0\n"say ""hi""",1\nbad,\n')
    (tmp_path / "c.tsv").write_text("english\tgerman\nthe cow\tdie kuh\n\"a\tb\"\tc\n")
    for name in ("a.jsonl", "b.csv", "c.tsv"):
        full = _read_whole(tmp_path / name)
        lazy = FileRows(tmp_path / name)
        assert len(lazy) == len(full)
        assert [lazy.raw(i) for i in range(len(lazy))] == full
    assert FileRows(tmp_path / "a.jsonl").where(2) == f"{tmp_path / 'a.jsonl'} line 5"
    (tmp_path / "e.csv").write_text('text,label\ngood,1\n\n"multi\nline",0\n')
    assert FileRows(tmp_path / "e.csv").where(1) == f"{tmp_path / 'e.csv'} line 4"  # the line it starts on


def test_rows_read_are_the_plan_rows_for_every_world_size(reg, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    big_jsonl(data / "train.jsonl", 20_000)
    big_jsonl(data / "validation.jsonl", 100)
    task = reg.task("generation")
    r = recipe(batch_size=8, steps=5, grad_accum=2)
    runs = [load_run_data(task, str(data), {}, r, 16, world) for world in (1, 2, 4)]
    assert len({json.dumps(run.train_indices) for run in runs}) == 1
    assert len({run.rows_read["order"] for run in runs}) == 1
    for world in (1, 2, 4):  # every rank of every world size draws from exactly these rows
        for rank in range(world):
            drawn = {i for step, _ in batch_plan(20_000, r, world, rank, r.seed) for i in step}
            assert drawn == set(runs[0].plan_indices)
    run = runs[0]
    assert run.n_train == 20_000
    assert run.rows_read["train"] <= TOKENIZER_SAMPLE_ROWS + 40 and run.rows_read["validation"] == 16
    assert run.train_row(run.plan_indices[0]) == {"text": f"line {run.plan_indices[0]} of the big file"}


def test_tokenizer_sample_is_bounded_seeded_and_whole_for_small_splits():
    assert sample_indices(100) == list(range(100))
    a, b = sample_indices(10**6), sample_indices(10**6)
    assert a == b and len(a) == TOKENIZER_SAMPLE_ROWS and a == sorted(a)
    assert sample_indices(10**6 + 1) != a


def test_a_bad_line_in_rows_used_fails_with_file_and_line_one_never_read_does_not(reg, tmp_path):
    n = 30_000
    r = recipe()
    used = set(plan_indices(n, r, 1)) | set(sample_indices(n))
    in_use, unused = min(used - set(sample_indices(n))), next(i for i in range(n // 2, n) if i not in used)
    data = tmp_path / "d"
    data.mkdir()
    big_jsonl(data / "validation.jsonl", 50)
    task = reg.task("generation")

    big_jsonl(data / "train.jsonl", n, {in_use: '{"text": "broken'})
    with pytest.raises(DataError, match=rf"train.jsonl line {in_use + 1}: invalid JSON"):
        load_run_data(task, str(data), {}, r, 16)
    big_jsonl(data / "train.jsonl", n, {in_use: '{"txt": "wrong field"}'})
    with pytest.raises(DataError, match=rf"train.jsonl line {in_use + 1}: missing field 'text'"):
        load_run_data(task, str(data), {}, r, 16)

    big_jsonl(data / "train.jsonl", n, {unused: '{"text": "broken'})
    run = load_run_data(task, str(data), {}, r, 16)
    assert unused not in run.train_indices and run.n_train == n


def test_streamed_hub_data_reads_only_the_rows_the_run_consumes(reg, monkeypatch):
    datasets = pytest.importorskip("datasets")
    pulled = []

    def rows(n, prefix):
        for i in range(n):
            pulled.append(i)
            yield {"sentence": f"{prefix} {i}"}

    ds = datasets.IterableDatasetDict({
        "train": datasets.IterableDataset.from_generator(rows, gen_kwargs={"n": 100_000, "prefix": "t"}),
        "validation": datasets.IterableDataset.from_generator(rows, gen_kwargs={"n": 1000, "prefix": "v"})})
    calls = []

    def fake_load_dataset(name, config=None, streaming=False):
        calls.append((name, config, streaming))
        return ds

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    r = recipe(steps=5, batch_size=8)
    run = load_run_data(reg.task("generation"), "hf:someone/corpus", {}, r, 16, columns={"text": "sentence"})
    assert all(streaming for *_, streaming in calls)
    assert run.n_train == 40 and len(pulled) < 200  # 40 train + 40 validation rows, not 100,000
    assert run.splits["validation"][0] == {"text": "v 0"} and run.train_row(3) == {"text": "t 3"}
    assert "hf:someone/corpus[train] row" in run.splits["train"].where(0)
    assert stream_sources(ds, "x", 3)["train"].rows == [{"sentence": f"t {i}"} for i in range(3)]


def test_every_backend_of_a_grid_reads_the_same_rows_and_a_bad_unused_line_does_not_fail(tmp_path):
    n = 6000
    r = recipe(steps=4, batch_size=4, seq_len=32)
    used = set(plan_indices(n, r, 1)) | set(sample_indices(n))
    unused = next(i for i in range(n) if i not in used)
    data = tmp_path / "d"
    data.mkdir()
    big_jsonl(data / "train.jsonl", n, {unused: "not json at all"})
    big_jsonl(data / "validation.jsonl", 20)
    env = {"FTBENCH_PLUGINS_EXTRA": "fault_plugin", "PYTHONPATH": str(Path(__file__).resolve().parent)}
    ftbench("run", "--task", "generation", "--backend", "eager", "--backend", "fault:kind=none",
            "--data", data, "--steps", "4", "--warmup", "1", "--batch-size", "4", "--seq-len", "32",
            "--eval-examples", "8", "--out", tmp_path / "out", env=env, check=True)
    recs = records(tmp_path / "out")
    assert [x["status"] for x in recs] == ["ok", "ok"]
    assert recs[0]["rows_read"] == recs[1]["rows_read"]
    assert recs[0]["rows_read"]["train"] == len(used) and recs[0]["rows_read"]["validation"] == 8


def _list_plan(n_train, r, world_size, rank, seed):
    """The batch plan as first written (Python lists): the data order every result so far used."""
    import numpy as np

    g, micro = r.batch_size, r.batch_size // (world_size * r.grad_accum)
    rng, order, plan = np.random.default_rng(seed), [], []
    for _ in range(r.steps):
        while len(order) < g:
            order.extend(rng.permutation(n_train).tolist())
        global_idx, order = order[:g], order[g:]
        mine = global_idx[rank * g // world_size:(rank + 1) * g // world_size]
        plan.append((global_idx, [mine[i * micro:(i + 1) * micro] for i in range(r.grad_accum)]))
    return plan


@pytest.mark.parametrize("n", [3, 8, 101, 3001])
def test_the_numpy_plan_keeps_the_data_order(n):
    for steps, g, accum, world in ((20, 8, 1, 1), (13, 8, 2, 2), (50, 4, 1, 4)):
        r = recipe(steps=steps, batch_size=g, grad_accum=accum)
        for rank in range(world):
            assert batch_plan(n, r, world, rank, 5) == _list_plan(n, r, world, rank, 5)
