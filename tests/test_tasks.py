"""The task plugins end to end, through the real CLI (each cell a fresh process).

To keep the suite fast on 2 CPU cores, cells are batched: one ``ftbench
run`` trains every task on built-in data with the default recipe; one run per
task reads a local JSONL directory and a CSV with a column mapping on the
task's *other* model kind with a few steps.  Real-data tests run only when
``FTBENCH_REAL_DATA`` points at the shared ``data/`` folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftbench.harness.contract.registry import Registry
from ftbench.tasks import metrics

TASKS = ("translation", "classification", "summarization", "dialogue")
EVAL_EXAMPLES = 64  # the CLI default


def ftbench(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ftbench.harness.cli", "run", "--backend", "eager", *args],
                          capture_output=True, text=True, timeout=900, cwd=cwd)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def failure_message(proc: subprocess.CompletedProcess, out: Path) -> str:
    """The error of a run expected to fail: the CLI may refuse it up front
    (exit 2, message on stderr) or record the failed cell (status error)."""
    if proc.returncode == 2:
        return proc.stderr
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = records(out)
    assert rec["status"] == "error"
    return rec["error"]


def by_task(recs: list[dict]) -> dict[str, dict]:
    return {r["task"].split(":")[0]: r for r in recs}


# ------------------------------------------------------- built-in data, default recipe


@pytest.fixture(scope="module")
def builtin_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("builtin")
    args = [a for t in TASKS for a in ("--task", t)]
    proc = ftbench(*args, "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return by_task(records(out)), proc.stdout


def _validation(name: str) -> list[dict]:
    task = Registry.load().task(name)
    return task.builtin_data(0, dict(task.defaults))["validation"][:EVAL_EXAMPLES]


@pytest.mark.parametrize("name", TASKS)
def test_builtin_cell_ok_with_its_default_preset_and_primary_metric(builtin_run, name):
    recs, _ = builtin_run
    rec = recs[name]
    assert rec["status"] == "ok", rec["error"]
    task = Registry.load().task(name)
    assert rec["metric"] == task.metric and rec["metric_value"] == rec["metrics"][task.metric]
    assert rec["higher_is_better"] == task.higher_is_better
    assert rec["config"]["recipe"]["steps"] == 50  # the default recipe, nothing task-specific
    default_model = {"translation": "tiny-t5", "classification": "tiny-gpt2", "summarization": "tiny-t5",
                     "dialogue": "tiny-gpt2"}[name]
    assert rec["model"] == default_model


def test_summary_table_shows_each_primary_metric(builtin_run):
    _, stdout = builtin_run
    for metric in ("bleu", "accuracy", "rougeL", "perplexity"):
        assert metric in stdout


def test_classification_beats_the_majority_class(builtin_run):
    rec = builtin_run[0]["classification"]
    labels = [ex["label"] for ex in _validation("classification")]
    majority = max(labels.count(x) for x in set(labels)) / len(labels)
    assert rec["metrics"]["accuracy"] > majority + 0.1, (rec["metrics"], majority)
    assert 0.0 <= rec["metrics"]["macro_f1"] <= 1.0
    assert "roc_auc" not in rec["metrics"]  # four classes: ROC-AUC is for binary tasks


def test_translation_beats_copying_the_source(builtin_run):
    rec = builtin_run[0]["translation"]
    pairs = [ex["translation"] for ex in _validation("translation")]
    copy_bleu = metrics.bleu([p["en"] for p in pairs], [p["de"] for p in pairs])
    copy_chrf = metrics.chrf([p["en"] for p in pairs], [p["de"] for p in pairs])
    assert rec["metrics"]["bleu"] > copy_bleu + 5, (rec["metrics"], copy_bleu)
    assert rec["metrics"]["chrf"] > copy_chrf, (rec["metrics"], copy_chrf)


def test_summarization_beats_the_lead_sentence(builtin_run):
    rec = builtin_run[0]["summarization"]
    docs = _validation("summarization")
    lead = metrics.rouge([d["document"].split(" . ")[0] + " ." for d in docs], [d["summary"] for d in docs])
    assert rec["metrics"]["rougeL"] > lead["rougeL"], (rec["metrics"], lead)
    assert {"rouge1", "rouge2", "rougeL"} <= set(rec["metrics"])


def test_dialogue_learns_the_responses(builtin_run):
    rec = builtin_run[0]["dialogue"]
    # Trivial baseline: the untrained model (first step's loss, ~log of the vocabulary).
    untrained = metrics.perplexity(rec["train_loss"][0])
    assert rec["metrics"]["perplexity"] < untrained / 20, (rec["metrics"], untrained)
    assert rec["metrics"]["chrf"] > 0


# ------------------------------------------- local JSONL and CSV, the other model kind


def _write_local(root: Path, name: str) -> tuple[Path, Path, list[str]]:
    """A JSONL dir with the conventional fields and a CSV dir with other column
    names, from the task's own built-in data; returns both and the --column args."""
    task = Registry.load().task(name)
    data = task.builtin_data(3, dict(task.defaults))
    jdir, cdir = root / f"{name}-jsonl", root / f"{name}-csv"
    jdir.mkdir()
    cdir.mkdir()
    for split in ("train", "validation"):
        rows = data[split][:200 if split == "train" else 16]
        (jdir / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        import csv

        flat = {
            "translation": lambda r: {"english": r["translation"]["en"], "german": r["translation"]["de"]},
            "classification": lambda r: {"sentence": r["text"], "topic": r["label"]},
            "summarization": lambda r: {"article": r["document"], "highlights": r["summary"]},
            "dialogue": lambda r: {"turns": "\n".join(r["dialogue"])},
        }[name]
        with open(cdir / f"{split}.csv", "w", newline="") as f:
            flat_rows = [flat(r) for r in rows]
            w = csv.DictWriter(f, fieldnames=list(flat_rows[0]))
            w.writeheader()
            w.writerows(flat_rows)
    columns = {"translation": ["translation.en=english", "translation.de=german"],
               "classification": ["text=sentence", "label=topic"],
               "summarization": ["document=article", "summary=highlights"],
               "dialogue": ["dialogue=turns"]}[name]
    return jdir, cdir, [a for c in columns for a in ("--column", c)]


OTHER_KIND = {"translation": "tiny-gpt2", "classification": "tiny-bert", "summarization": "tiny-gpt2",
              "dialogue": "tiny-t5"}


@pytest.mark.parametrize("name", TASKS)
def test_local_jsonl_and_csv_with_column_mapping_on_the_other_model_kind(tmp_path, name):
    jdir, cdir, columns = _write_local(tmp_path, name)
    out = tmp_path / "out"
    proc = ftbench("--task", name, "--model", OTHER_KIND[name], "--data", str(jdir), "--data", str(cdir),
                   *columns, "--steps", "4", "--warmup", "1", "--eval-examples", "8", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = {r["config"]["data"]: r for r in records(out)}
    assert set(recs) == {str(jdir), str(cdir)}
    for data, rec in recs.items():
        assert rec["status"] == "ok", (data, rec["error"])
        assert rec["model"] == OTHER_KIND[name]
        assert rec["metric_value"] is not None
        assert rec["config"]["eval_examples"] == 8


def test_a_model_kind_the_task_cannot_use_is_a_clear_error(tmp_path):
    out = tmp_path / "out"
    proc = ftbench("--task", "classification", "--model", "tiny-t5", "--steps", "2", "--warmup", "1",
                   "--out", str(out))
    message = failure_message(proc, out)
    assert "'classification' cannot train encoder-decoder models" in message
    assert "decoder, encoder" in message


def test_kind_checks_in_process():
    from ftbench.harness.contract.api import FtbenchError
    from ftbench.harness.cell.modeling import choose_kind, resolve_model

    reg = Registry.load()
    for task_name, model in (("translation", "tiny-bert"), ("summarization", "tiny-bert"),
                             ("dialogue", "tiny-bert"), ("generation", "tiny-t5")):
        task = reg.task(task_name)
        with pytest.raises(FtbenchError, match=f"cannot train .* models such as .*{model}"):
            choose_kind(resolve_model(model, reg, task), task)


def test_bad_local_data_fails_the_cell_naming_file_line_and_field(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    (tmp_path / "validation.jsonl").write_text('{"text": "a", "label": 0}\n{"text": "c", "label": 5}\n')
    out = tmp_path / "out"
    proc = ftbench("--task", "classification", "--data", str(tmp_path), "--steps", "2", "--warmup", "1",
                   "--out", str(out))
    message = failure_message(proc, out)
    assert f"{tmp_path / 'validation.jsonl'} line 2: field 'label': 5 is not in the label set" in message


# ------------------------------------------------------------- real data (optional)

REAL = os.environ.get("FTBENCH_REAL_DATA")
# Short smoke runs (the README's figures use --steps 200): loading, encoding,
# training and every metric on each real dataset, a few seconds each.
REAL_RUNS = {
    "classification": ("sst2", ["--task", "classification", "--seq-len", "64"]),
    "translation": ("multi30k_en_de", ["--task", "translation:max_new_tokens=40", "--seq-len", "64"]),
    "summarization": ("dialogsum", ["--task", "summarization:max_new_tokens=48", "--seq-len", "256"]),
    "generation": ("tiny_shakespeare", ["--task", "generation", "--seq-len", "128"]),
    "dialogue": ("dailydialog", ["--task", "dialogue", "--seq-len", "128"]),
}


@pytest.mark.realdata
@pytest.mark.skipif(not REAL, reason="set FTBENCH_REAL_DATA to the shared data/ folder")
@pytest.mark.parametrize("name", sorted(REAL_RUNS))
def test_real_data(tmp_path, name):
    dataset, args = REAL_RUNS[name]
    out = tmp_path / "out"
    proc = ftbench(*args, "--data", str(Path(REAL) / dataset), "--steps", "10", "--warmup", "2",
                   "--eval-examples", "16", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (rec,) = records(out)
    assert rec["status"] == "ok", rec["error"]
    assert rec["metric_value"] is not None
    if name == "classification":
        assert rec["metrics"]["accuracy"] > 0 and "roc_auc" in rec["metrics"]
