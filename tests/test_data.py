"""Data loading: built-in, local JSONL/CSV/TSV, column mapping, hf:, and the
errors bad data gets (file, line and field named).  All in-process: no cell runs,
but every split is read through the loader cells use (``rowsource``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ftbench.harness.contract.api import DataError, FtbenchError
from ftbench.harness.cell.data import Rows, where
from ftbench.harness.cell.rowsource import open_sources, read_rows
from ftbench.harness.contract.registry import Registry

TASKS = ("generation", "translation", "classification", "summarization", "dialogue")


@pytest.fixture(scope="module")
def reg():
    return Registry.load()


def _load(reg, task_name, data, columns=None, options=None):
    task = reg.task(task_name)
    opts = {**dict(task.defaults), **(options or {})}
    sources = open_sources(task, str(data), opts, 0, stream_rows=1000)
    splits = {name: read_rows(src, range(len(src)), task, opts, columns or {}) for name, src in sources.items()}
    opts.update(task.prepare(splits, opts) or {})
    return task, splits, opts


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", TASKS)
def test_builtin_data_is_deterministic_and_seeded(reg, name):
    task = reg.task(name)
    a, b = task.builtin_data(0, dict(task.defaults)), task.builtin_data(0, dict(task.defaults))
    assert a == b
    assert task.builtin_data(1, dict(task.defaults))["train"] != a["train"]
    assert len(a["train"]) >= 1000 and len(a["validation"]) >= 64
    _, splits, opts = _load(reg, name, "builtin")
    for ex in splits["validation"][:5]:
        if task.head == "lm":
            prompt, target = task.prompt_and_target(ex, opts)
            assert target


def test_builtin_translation_validation_is_held_out(reg):
    data = reg.task("translation").builtin_data(0, {})
    train = {r["translation"]["en"] for r in data["train"]}
    assert not train & {r["translation"]["en"] for r in data["validation"]}


def test_translation_pair_and_direction_come_from_the_data(reg, tmp_path):
    rows = [{"translation": {"fr": f"le chat {i}", "es": f"el gato {i}"}} for i in range(3)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", rows)
    task, splits, opts = _load(reg, "translation", tmp_path)
    assert (opts["source"], opts["target"]) == ("fr", "es")
    assert task.prompt_and_target(splits["train"][0], opts) == ("le chat 0", "el gato 0")
    _, _, opts = _load(reg, "translation", tmp_path, options={"source": "es"})
    assert (opts["source"], opts["target"]) == ("es", "fr")
    with pytest.raises(DataError, match=r"train.jsonl line 1: missing field 'translation.de'"):
        _load(reg, "translation", tmp_path, options={"target": "de"})


def test_csv_and_tsv_with_column_mapping(reg, tmp_path):
    (tmp_path / "train.csv").write_text('english,german\n"the cat, small",die katze\nthe dog,der hund\n')
    (tmp_path / "validation.tsv").write_text("english\tgerman\nthe cow\tdie kuh\n")
    task, splits, opts = _load(reg, "translation", tmp_path,
                               columns={"translation.en": "english", "translation.de": "german"})
    assert splits["train"][0] == {"translation": {"en": "the cat, small", "de": "die katze"}}
    assert task.prompt_and_target(splits["validation"][0], opts) == ("the cow", "die kuh")


def test_classification_labels_from_csv_strings_and_names(reg, tmp_path):
    (tmp_path / "train.csv").write_text("sentence,y\ngood,1\nbad,0\nfine,1\n")
    (tmp_path / "validation.csv").write_text("sentence,y\nok,1\n")
    task, splits, opts = _load(reg, "classification", tmp_path, columns={"text": "sentence", "label": "y"})
    assert opts["num_labels"] == 2
    assert [task.label(ex, opts) for ex in splits["train"]] == [1, 0, 1]

    (tmp_path / "train.csv").unlink()
    (tmp_path / "validation.csv").unlink()
    names = [{"text": "t", "label": lab} for lab in ("sports", "food", "music", "food")]
    write_jsonl(tmp_path / "train.jsonl", names)
    write_jsonl(tmp_path / "validation.jsonl", names[:2])
    task, splits, opts = _load(reg, "classification", tmp_path)
    assert opts["num_labels"] == 3 and opts["label_names"] == ["food", "music", "sports"]
    assert [task.label(ex, opts) for ex in splits["train"]] == [2, 0, 1, 0]


def test_dialogue_turns_from_a_list_or_a_separated_string(reg, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"dialogue": ["hi", "hello", "how are you ?", "fine ."]}])
    (tmp_path / "validation.csv").write_text('talk\n"hi __eou__ hello __eou__"\n')
    task, splits, opts = _load(reg, "dialogue", tmp_path, columns={"dialogue": "talk"},
                               options={"turn_sep": "__eou__"})
    assert task.prompt_and_target(splits["train"][0], opts) == ("hi\nhello\nhow are you ?", "fine .")
    assert task.prompt_and_target(splits["validation"][0], opts) == ("hi", "hello")


def test_hub_data_through_datasets(reg, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}]
    calls = []

    def fake_load_dataset(name, config=None, streaming=False):
        calls.append((name, config))
        assert streaming, "cells stream hub data"
        if config is not None:  # "owner/name" is tried as NAME/CONFIG first
            raise ValueError("no such config")
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                                     "validation": datasets.Dataset.from_list(rows)})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task, splits, opts = _load(reg, "classification", "hf:someone/sst2", columns={"text": "sentence"})
    assert calls == [("someone", "sst2"), ("someone/sst2", None)]
    assert splits["train"][0] == {"text": "good", "label": 1} and opts["num_labels"] == 2


# ------------------------------------------------------------- bad data


def _pair(tmp_path, train_rows, validation_rows=None):
    write_jsonl(tmp_path / "train.jsonl", train_rows)
    write_jsonl(tmp_path / "validation.jsonl", validation_rows if validation_rows is not None else train_rows[:1])


def test_missing_field_names_file_line_and_field(reg, tmp_path):
    _pair(tmp_path, [{"document": "d", "summary": "s"}, "", {"document": "d"}])
    with pytest.raises(DataError) as e:
        _load(reg, "summarization", tmp_path)
    # blank line 2 is skipped but still counted: the bad row is on line 3
    assert f"{tmp_path / 'train.jsonl'} line 3: missing field 'summary'" in str(e.value)
    assert "--column" in str(e.value)


def test_label_outside_the_label_set(reg, tmp_path):
    _pair(tmp_path, [{"text": "a", "label": 0}, {"text": "b", "label": 1}],
          [{"text": "a", "label": 1}, {"text": "c", "label": "maybe"}])
    with pytest.raises(DataError) as e:
        _load(reg, "classification", tmp_path)
    assert f"{tmp_path / 'validation.jsonl'} line 2: field 'label': 'maybe'" in str(e.value)
    _pair(tmp_path, [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}],
          [{"text": "a", "label": "neutral"}])
    with pytest.raises(DataError, match=r"validation.jsonl line 1: field 'label': 'neutral' is not in the label set"):
        _load(reg, "classification", tmp_path)
    with pytest.raises(DataError, match=r"train.jsonl line 1: field 'label': 'pos' is not in the label set"):
        _load(reg, "classification", tmp_path, options={"labels": "neg|neutral"})
    _pair(tmp_path, [{"text": "a", "label": -1}])
    with pytest.raises(DataError, match=r"train.jsonl line 1: field 'label' must be a class id"):
        _load(reg, "classification", tmp_path)


def test_csv_error_lines_count_the_header(reg, tmp_path):
    (tmp_path / "train.csv").write_text("text,label\ngood,1\n\"multi\nline\",0\nbad,\n")
    (tmp_path / "validation.csv").write_text("text,label\nok,1\n")
    with pytest.raises(DataError, match=r"train.csv line 5: field 'label' must be a class id"):
        _load(reg, "classification", tmp_path)


def test_empty_split(reg, tmp_path):
    _pair(tmp_path, [{"text": "a"}], [])
    with pytest.raises(DataError, match=r"validation.jsonl: the validation split is empty"):
        _load(reg, "generation", tmp_path)


def test_missing_split_and_missing_dir(reg, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="no validation split"):
        _load(reg, "generation", tmp_path)
    with pytest.raises(FtbenchError, match="does not exist"):
        _load(reg, "generation", tmp_path / "nope")


def test_invalid_json(reg, tmp_path):
    _pair(tmp_path, ['{"text": "a"}', '{"text": "b",}'])
    with pytest.raises(DataError, match=r"train.jsonl line 2: invalid JSON"):
        _load(reg, "generation", tmp_path)


@pytest.mark.parametrize("task_name,row,message", [
    ("translation", {"translation": "the cat"}, "field 'translation' must be an object"),
    ("translation", {"translation": {"en": "a", "de": 3}}, "field 'translation.de' must be a string"),
    ("dialogue", {"dialogue": ["only one turn"]}, "field 'dialogue' needs at least two"),
    ("dialogue", {"dialogue": 7}, "field 'dialogue' must be a list of turns"),
    ("summarization", {"document": ["a"], "summary": "s"}, "field 'document' must be a string"),
    ("classification", {"text": None, "label": 1}, "field 'text' must be a string"),
])
def test_wrong_field_types(reg, tmp_path, task_name, row, message):
    _pair(tmp_path, [row])
    with pytest.raises(DataError, match=r"train.jsonl line 1: " + message):
        _load(reg, task_name, tmp_path)


def test_rows_remember_where_they_came_from():
    rows = Rows([{"a": 1}], origin="x.csv", lines=[2])
    assert where(rows, 0) == "x.csv line 2"
    assert where([{"a": 1}], 0) == "example 1"
