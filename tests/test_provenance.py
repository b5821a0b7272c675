"""Provenance: content digests of the model, the rows read and the tokenizer in every record."""

from __future__ import annotations

import json
from pathlib import Path

from ftbench.harness.cell.provenance import digest_directory, digest_rows

from conftest import TINY, ftbench, records, with_setting


def _data(root: Path, words: str) -> Path:
    root.mkdir(parents=True)
    for split, n in (("train", 40), ("validation", 8)):
        (root / f"{split}.jsonl").write_text("".join(json.dumps({"text": f"{words} {i} " * 6}) + "\n" for i in range(n)))
    return root


def _run(out: Path, data: Path) -> dict:
    proc = ftbench("run", "--task", "generation", "--backend", "eager", "--data", data, *with_setting(TINY, "--steps", 4),
                   "--out", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (rec,) = records(out)
    assert rec["status"] == "ok", rec["error"]
    return rec["provenance"]


def test_same_grid_same_data_same_digests_and_a_changed_file_changes_them(tmp_path):
    data = _data(tmp_path / "d", "the cat sat on the mat")
    a, b = _run(tmp_path / "a", data), _run(tmp_path / "b", data)
    assert a == b and all(v.startswith("sha256:") for v in a.values())
    other = _data(tmp_path / "d2", "a dog ran in the park")
    c = _run(tmp_path / "c", other)
    assert c["data_digest"] != a["data_digest"]
    assert c["tokenizer_digest"] != a["tokenizer_digest"]  # the preset's tokenizer is trained on the data


def test_a_model_directory_digest_follows_its_files(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gpt2"}')
    (d / "model.safetensors").write_bytes(b"\x00" * 1000)
    first = digest_directory(d)
    assert digest_directory(d) == first
    (d / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")
    assert digest_directory(d) != first
    (d / ".cache").mkdir()
    (d / ".cache" / "x").write_text("not the model")
    changed = digest_directory(d)
    (d / ".cache" / "x").write_text("still not the model")
    assert digest_directory(d) == changed


def test_row_digest_is_order_sensitive():
    assert digest_rows([{"a": 1}, {"a": 2}]) != digest_rows([{"a": 2}, {"a": 1}])
    assert digest_rows([{"a": 1, "b": 2}]) == digest_rows([{"b": 2, "a": 1}])
