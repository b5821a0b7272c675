"""Bad input: one clear paragraph naming the problem and the fix, exit status 2,
and nothing written or lost.

Every case runs ``ftbench run`` against an output directory that already
holds a finished record, and checks that the directory is byte-identical
afterwards.  None of these cases may start a cell, so most run in-process
(click's runner) to stay fast; a few go through a real subprocess to prove
the exit status end to end.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftbench.harness.cli import main
from ftbench.harness.results.store import append_record, read_records

from conftest import ftbench

TINY = ["--steps", "6", "--warmup", "1", "--seq-len", "32", "--batch-size", "4"]
SEED_RECORD = {"cell_id": "0123456789abcdef", "status": "ok", "task": "generation", "backend": "eager",
               "model": "tiny-gpt2", "error": None, "config": {"repeat": 0}}


@pytest.fixture
def out(tmp_path):
    """A result set with one finished record, as a user's earlier run would leave it."""
    d = tmp_path / "out"
    d.mkdir()
    append_record(d, SEED_RECORD)
    return d


def snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()} \
        if d.exists() else None


def refused(args, out: Path, *phrases, exists_after=True):
    """Run ``ftbench run ARGS --out OUT`` in-process; assert exit 2, the phrases, nothing touched."""
    before = snapshot(out)
    result = CliRunner().invoke(main, ["run", *map(str, args), "--out", str(out)])
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    assert "Traceback" not in text and "error:" in text, text
    message = " ".join(text.split())
    for phrase in phrases:
        assert phrase.lower() in message.lower(), (phrase, message)
    assert snapshot(out) == before, "the output directory changed"
    if before is not None:
        assert read_records(out).records == [SEED_RECORD]
    return message


# ------------------------------------------------------------------ names


def test_unknown_task_lists_choices_and_suggests(out):
    refused(["--task", "genration", "--backend", "eager", *TINY], out,
            "unknown task 'genration'", "did you mean 'generation'", "available:", "ftbench list")


def test_unknown_backend_lists_choices_and_suggests(out):
    refused(["--task", "generation", "--backend", "eagr", *TINY], out,
            "unknown backend 'eagr'", "did you mean 'eager'", "available:")


def test_unknown_model_preset_lists_choices_and_suggests(out):
    refused(["--task", "generation", "--backend", "eager", "--model", "tiny-gpt3", *TINY], out,
            "unknown model preset 'tiny-gpt3'", "did you mean 'tiny-gpt2'", "available:")


def test_unknown_name_writes_nothing_in_a_new_out(tmp_path):
    fresh = tmp_path / "never"
    refused(["--task", "genration", "--backend", "eager"], fresh, "unknown task")
    assert not fresh.exists()


@pytest.mark.parametrize("backend", ["eager:stage", "eager:=3", "eager:a=1,,b=2"])
def test_malformed_backend_option_string(out, backend):
    refused(["--task", "generation", "--backend", backend, *TINY], out,
            "malformed backend option", "NAME:key=value,key=value")


@pytest.mark.parametrize("backend,phrases", [
    ("compile:mod=default", ["unknown compile option", "mod", "allowed"]),
    ("compile:mode=fastest", ["invalid compile mode='fastest'", "choose one of"]),
])
def test_unknown_or_invalid_backend_option(out, backend, phrases):
    refused(["--task", "generation", "--backend", backend, *TINY], out, *phrases)


def test_batch_that_cannot_be_split_over_ranks(out):
    refused(["--task", "generation", "--backend", "ddp", "--nproc", "3", *TINY], out,
            "global batch 4 cannot be split over nproc 3", "multiple of 3")


def test_exit_status_2_through_a_real_process(out):
    before = snapshot(out)
    proc = ftbench("run", "--task", "generation", "--backend", "eagr", *TINY, "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert "did you mean 'eager'" in " ".join(proc.stderr.split()).lower()
    assert "Traceback" not in proc.stderr
    assert snapshot(out) == before


# -------------------------------------------------------------- grid files

GRIDS = {
    "yaml-syntax.yaml": ("task: [generation\nbackend: eager\n", ["invalid YAML", "yaml-syntax.yaml"]),
    "toml-syntax.toml": ("task = [generation\n", ["invalid TOML", "line 1"]),
    "unknown-key.yaml": ("task: generation\nbackend: eager\nbackends: compile\n",
                         ["unknown key", "backends", "allowed"]),
    "axis-type.yaml": ("task: 3\nbackend: eager\n", ["task", "list of strings"]),
    "settings-type.yaml": ("task: generation\nbackend: eager\nsettings: 5\n", ["settings", "mapping"]),
    "steps-type.yaml": ("task: generation\nbackend: eager\nsettings: {steps: ten}\n",
                        ["steps", "'ten'", "integer"]),
    "lr-type.yaml": ("task: generation\nbackend: eager\nsettings: {lr: fast}\n", ["lr", "'fast'", "number"]),
    "time-limit-type.yaml": ("task: generation\nbackend: eager\nsettings: {time_limit_s: soon}\n",
                             ["time_limit_s", "'soon'"]),
    "memory-limit-type.yaml": ("task: generation\nbackend: eager\nsettings: {memory_limit_mb: lots}\n",
                               ["memory_limit_mb", "'lots'"]),
    "unknown-setting.yaml": ("task: generation\nbackend: eager\nsettings: {stepz: 3}\n",
                             ["unknown", "stepz"]),
    "empty-axis.yaml": ("task: generation\nbackend: []\n", ["backend", "empty", "at least one"]),
    "repeat-type.yaml": ("task: generation\nbackend: eager\nrepeat: twice\n", ["repeat", "integer"]),
    "toml-unknown-key.toml": ('task = ["generation"]\nbackend = ["eager"]\nsteps = 3\n', ["unknown key", "steps"]),
}


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_invalid_grid_file(out, tmp_path, name):
    text, phrases = GRIDS[name]
    grid = tmp_path / name
    grid.write_text(text)
    refused(["--grid", grid], out, *phrases)


def test_missing_grid_file(out, tmp_path):
    refused(["--grid", tmp_path / "nope.yaml"], out, "nope.yaml", "does not exist")


def test_grid_file_cannot_run_code(out, tmp_path):
    marker = tmp_path / "PWNED"
    grid = tmp_path / "evil.yaml"
    grid.write_text(f'task: !!python/object/apply:os.system ["touch {marker}"]\nbackend: eager\n')
    refused(["--grid", grid], out, "invalid YAML")
    assert not marker.exists()


# -------------------------------------------------------------------- data


def _data_dir(tmp_path, train: str | None, validation: str | None, ext=".jsonl") -> Path:
    d = tmp_path / "data"
    d.mkdir()
    if train is not None:
        (d / f"train{ext}").write_text(train)
    if validation is not None:
        (d / f"validation{ext}").write_text(validation)
    return d


GOOD = "".join(json.dumps({"text": f"the cat {i} meows."}) + "\n" for i in range(8))


def test_missing_data_directory(out, tmp_path):
    refused(["--task", "generation", "--backend", "eager", "--data", tmp_path / "nodata", *TINY], out,
            "data directory", "does not exist", "train.jsonl")


def test_missing_split(out, tmp_path):
    d = _data_dir(tmp_path, GOOD, None)
    refused(["--task", "generation", "--backend", "eager", "--data", d, *TINY], out,
            "no validation split", "add validation.jsonl")


def test_invalid_json_line_names_file_and_line(out, tmp_path):
    d = _data_dir(tmp_path, GOOD + '{"text": "broken\n' + GOOD, GOOD)
    refused(["--task", "generation", "--backend", "eager", "--data", d, *TINY], out,
            "train.jsonl line 9", "invalid JSON")


def test_missing_field_names_file_line_and_fix(out, tmp_path):
    d = _data_dir(tmp_path, GOOD, GOOD + json.dumps({"txt": "oops"}) + "\n")
    refused(["--task", "generation", "--backend", "eager", "--data", d, *TINY], out,
            "validation.jsonl line 9", "missing field 'text'", "--column")


def test_wrongly_typed_field(out, tmp_path):
    d = _data_dir(tmp_path, json.dumps({"text": 42}) + "\n" + GOOD, GOOD)
    refused(["--task", "generation", "--backend", "eager", "--data", d, *TINY], out,
            "train.jsonl line 1", "'text' must be a string")


def test_label_outside_the_label_set(out, tmp_path):
    rows = [{"text": f"good {i}", "label": "pos"} for i in range(4)] + \
           [{"text": f"bad {i}", "label": "neg"} for i in range(4)]
    val = rows[:3] + [{"text": "meh", "label": "maybe"}]
    d = _data_dir(tmp_path, "".join(json.dumps(r) + "\n" for r in rows),
                  "".join(json.dumps(r) + "\n" for r in val))
    refused(["--task", "classification", "--backend", "eager", "--data", d, *TINY], out,
            "validation.jsonl line 4", "'maybe'", "not in the label set")


# ------------------------------------------------------- sequence and batch


@pytest.mark.parametrize("flag,value,phrases", [
    ("--seq-len", "0", ["invalid seq_len=0", "positive integer"]),
    ("--seq-len", "-8", ["invalid seq_len=-8", "positive integer"]),
    ("--seq-len", "100000", ["seq_len 100000 is too long", "at most 512 positions", "--seq-len 512 or less"]),
    ("--batch-size", "0", ["invalid batch_size=0", "positive integer"]),
    ("--batch-size", "-4", ["invalid batch_size=-4", "positive integer"]),
])
def test_sequence_length_and_batch_size(out, flag, value, phrases):
    args = ["--task", "generation", "--backend", "eager", "--steps", "6", "--warmup", "1"]
    args += ["--seq-len", "32", "--batch-size", "4"]
    args[args.index(flag) + 1] = value
    refused(args, out, *phrases)


def test_batch_larger_than_the_data(out, tmp_path):
    d = _data_dir(tmp_path, GOOD, GOOD)
    refused(["--task", "generation", "--backend", "eager", "--data", d, "--steps", "6", "--warmup", "1",
             "--seq-len", "32", "--batch-size", "16"], out,
            "batch size 16 is larger than the 8 training examples", "--batch-size 8 or less")


# ------------------------------------------------------------------ output


def test_out_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("precious")
    result = CliRunner().invoke(main, ["run", "--task", "generation", "--backend", "eager", *TINY,
                                       "--out", str(target)])
    assert result.exit_code == 2
    message = " ".join((result.output + result.stderr).split())
    assert "cannot create output directory" in message and "pass --out" in message
    assert target.read_text() == "precious"


def test_out_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(main, ["run", "--task", "generation", "--backend", "eager", *TINY,
                                       "--out", str(tmp_path / "file" / "out")])
    assert result.exit_code == 2
    assert "cannot create output directory" in " ".join((result.output + result.stderr).split())


def test_out_not_writable(out):
    if os.geteuid() == 0:
        pytest.skip("root can write to a read-only directory mode")
    out.chmod(0o555)
    try:
        refused(["--task", "generation", "--backend", "eager", *TINY], out, "not writable", "pass --out")
    finally:
        out.chmod(0o755)


# ------------------------------------------------------------------- models


def _model_dir(tmp_path, weights=True, tokenizer=True) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                                               "n_positions": 64}))
    if weights:
        (d / "model.safetensors").write_bytes(b"")
    if tokenizer:
        (d / "tokenizer.json").write_text("{}")
    return d


def test_model_dir_without_weights(out, tmp_path):
    refused(["--task", "generation", "--backend", "eager", "--model", _model_dir(tmp_path, weights=False), *TINY],
            out, "has no weights", "save_pretrained")


def test_model_dir_without_tokenizer(out, tmp_path):
    refused(["--task", "generation", "--backend", "eager", "--model", _model_dir(tmp_path, tokenizer=False),
             *TINY], out, "has no tokenizer", "tokenizer.save_pretrained")


def test_sequence_too_long_for_a_model_directory(out, tmp_path):
    refused(["--task", "generation", "--backend", "eager", "--model", _model_dir(tmp_path), "--steps", "6",
             "--warmup", "1", "--seq-len", "128", "--batch-size", "4"], out,
            "seq_len 128 is too long", "at most 64 positions")


def test_model_dir_without_config(out, tmp_path):
    d = _model_dir(tmp_path)
    (d / "config.json").unlink()
    refused(["--task", "generation", "--backend", "eager", "--model", d, *TINY], out, "no config.json")


# ---------------------------------------------------------- untrusted files


def _unsafe_calls(source: str, filename: str) -> list[str]:
    import ast

    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
        base = f.value.id if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else ""
        kw = {k.arg: k.value for k in node.keywords}
        const = {k: getattr(v, "value", None) for k, v in kw.items()}
        where = f"{filename}:{node.lineno}"
        if isinstance(f, ast.Name) and name in ("eval", "exec"):
            found.append(f"{where} {name}()")
        elif base == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load", "full_load_all"):
            found.append(f"{where} yaml.{name} (use yaml.safe_load)")
        elif base in ("pickle", "cPickle", "dill", "marshal", "shelve") and name in ("load", "loads", "open"):
            found.append(f"{where} {base}.{name}")
        elif base == "torch" and name == "load" and const.get("weights_only") is not True:
            found.append(f"{where} torch.load without weights_only=True")
        elif name == "load" and const.get("allow_pickle") is True:
            found.append(f"{where} load(allow_pickle=True)")
        if const.get("trust_remote_code") is True:
            found.append(f"{where} trust_remote_code=True")
        if name in ("from_pretrained", "from_config") and not _says_trust(node):
            found.append(f"{where} {name} without an explicit trust_remote_code (it would prompt)")
    return found


def _says_trust(call) -> bool:
    """A transformers load names ``trust_remote_code``, itself or through ``**hf_kwargs(...)``."""
    import ast

    for k in call.keywords:
        if k.arg == "trust_remote_code":
            return True
        f = getattr(k.value, "func", None)
        if k.arg is None and isinstance(k.value, ast.Call) and getattr(f, "id", getattr(f, "attr", "")) == "hf_kwargs":
            return True
    return False


def test_nothing_loaded_from_a_file_can_run_code():
    """Configuration, data, results and checkpoints are parsed with safe loaders only."""
    root = Path(__file__).resolve().parent.parent
    found = []
    for pkg in ("harness", "plugins", "tasks"):
        for path in sorted((root / pkg).rglob("*.py")):
            found += _unsafe_calls(path.read_text(), str(path.relative_to(root)))
    assert not found, "unsafe loaders:\n" + "\n".join(found)


def test_the_scan_would_catch_an_unsafe_loader():
    bad = "import yaml, torch, pickle\nyaml.load(s)\ntorch.load(p)\npickle.loads(b)\neval(x)\n" \
          "torch.load(p, weights_only=False)\nAutoModel.from_pretrained(p, trust_remote_code=True)\n"
    assert len(_unsafe_calls(bad, "x.py")) == 6
    assert not _unsafe_calls("yaml.safe_load(s)\ntorch.load(p, weights_only=True)\nmodel.eval()\n", "y.py")
    # A load that leaves trust_remote_code unset prompts on the terminal for a directory with auto_map.
    assert len(_unsafe_calls("AutoConfig.from_pretrained(p)\nM.from_config(c, **kw)\n", "z.py")) == 2
    assert not _unsafe_calls("AutoConfig.from_pretrained(p, trust_remote_code=False)\n"
                             "M.from_config(c, **hf_kwargs(t))\n", "w.py")
