"""Hostile inputs and shared machines: what a file, a plugin or a neighbour on
the machine could do to a run, and what ftbench does instead
(docs/reliability.md).

Each test reproduces one way in and checks the clear refusal (exit 2 before
any cell runs) or the bounded cost that replaced it.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftbench.harness.cli import main
from ftbench.harness.contract.config import CellSpec

from conftest import ROOT

TINY = ["--steps", "6", "--warmup", "1", "--seq-len", "32", "--batch-size", "4"]


# --------------------------------------------------- model directories and code


def _code_model_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A model directory whose config asks transformers to import its own Python file."""
    d = tmp_path / "custom-model"
    d.mkdir()
    marker = tmp_path / "code-ran"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    for module in ("configuration_custom", "modeling_custom", "tokenization_custom"):
        (d / f"{module}.py").write_text(payload)
    (d / "config.json").write_text(json.dumps({
        "model_type": "custom-never-registered", "architectures": ["CustomForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_custom.CustomTokenizer", None]}}))
    (d / "model.safetensors").write_bytes(b"")
    return d, marker


def _run_without_answer(args, stdin, cache: Path, timeout=60) -> subprocess.CompletedProcess:
    env = {**os.environ, "FTBENCH_CACHE": str(cache), "HF_MODULES_CACHE": str(cache / "hf-modules"),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ftbench.harness.cli", *map(str, args)], stdin=stdin,
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


def test_model_directory_code_is_refused_without_a_prompt(tmp_path):
    """Neither a closed stdin nor a terminal ever sees transformers' "[y/N]" prompt; nothing is imported."""
    d, marker = _code_model_dir(tmp_path)
    args = ["run", "--task", "generation", "--backend", "eager", "--model", d, *TINY, "--out", tmp_path / "out"]
    closed = _run_without_answer(args, subprocess.DEVNULL, tmp_path / "cache")
    leader, follower = pty.openpty()  # a terminal on stdin: where transformers would ask and wait
    try:
        with_tty = _run_without_answer(["plan", *args[1:-2]], follower, tmp_path / "cache")
    finally:
        os.close(leader)
        os.close(follower)
    for proc in (closed, with_tty):
        text = proc.stdout + proc.stderr
        message = " ".join(text.split())
        assert proc.returncode == 2, text
        assert "Traceback" not in text and "[y/N]" not in text and "custom code" not in text, text
        for phrase in ("would run its own Python code", "configuration_custom.py", "modeling_custom.py",
                       "tokenization_custom.py", "--trust-remote-code"):
            assert phrase in message, (phrase, message)
    assert not marker.exists(), "the model directory's code ran"
    assert not (tmp_path / "cache" / "hf-modules").exists() or not any((tmp_path / "cache" / "hf-modules").rglob(
        "*custom*.py")), "transformers copied the directory's code to import it"
    assert not (tmp_path / "out").exists()


def test_the_trust_flag_is_a_permission_kept_in_the_record_not_in_the_cell_id():
    trusted = CellSpec(task="generation", backend="eager", model="m", trust_remote_code=True)
    plain = CellSpec(task="generation", backend="eager", model="m")
    assert trusted.cell_id == plain.cell_id  # resuming with the flag does not rerun finished cells
    assert trusted.to_dict()["trust_remote_code"] is True and plain.to_dict()["trust_remote_code"] is False
    assert CellSpec.from_dict(trusted.to_dict()).trust_remote_code is True


def test_grid_key_and_flag_reach_the_cells(tmp_path):
    from ftbench.harness.contract.registry import Registry
    from ftbench.harness.grid.files import build_grid

    grid_file = tmp_path / "g.yaml"
    grid_file.write_text("task: [generation]\nbackend: [eager]\nsettings: {trust_remote_code: true}\n")
    assert all(c.trust_remote_code for c in build_grid(str(grid_file), {}, {}).cells(Registry.load()))
    assert not any(c.trust_remote_code for c in build_grid(None, {"task": ["generation"], "backend": ["eager"]},
                                                           {}).cells(Registry.load()))
    assert all(c.trust_remote_code for c in build_grid(None, {"task": ["generation"], "backend": ["eager"]},
                                                       {"trust_remote_code": True}).cells(Registry.load()))
