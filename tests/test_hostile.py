"""Hostile inputs and shared machines: what a file, a plugin or a neighbour on
the machine could do to a run, and what ftbench does instead
(docs/reliability.md).

Each test reproduces one way in and checks the clear refusal (exit 2 before
any cell runs) or the bounded cost that replaced it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import pty
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from click.testing import CliRunner

from ftbench.harness.cli import main
from ftbench.harness.contract.config import CellSpec

from conftest import ROOT, processes_with_env, records

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


# ------------------------------------------------------------- listening sockets


def _listening(processes) -> set:
    found = set()
    for p in processes:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        found |= {(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN}
    return found


def test_a_multi_rank_cell_listens_on_loopback_only(tmp_path):
    """Every socket the ddp x2 cell's processes listen on, sampled while it runs, is on the loopback interface."""
    mark = f"listen-{os.getpid()}"
    env = {**os.environ, "FTBENCH_CACHE": str(ROOT / ".pytest-ftbench-cache"), "FTBENCH_TEST_MARK": mark}
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation",
                             "--backend", "ddp", "--nproc", "2", "--steps", "12", "--warmup", "2", "--batch-size", "4",
                             "--seq-len", "32", "--eval-examples", "8", "--out", str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    seen: set = set()
    try:
        while proc.poll() is None:
            seen |= _listening(p for p in processes_with_env(FTBENCH_TEST_MARK=mark) if p.pid != proc.pid)
            time.sleep(0.05)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    record = records(out)[0]
    assert record["status"] == "ok", record
    store = record["launch"]["store"]
    assert store["bind"] == "127.0.0.1" and (store["bind"], store["port"]) in seen, (store, seen)
    assert seen and all(ipaddress.ip_address(ip).is_loopback for ip, _ in seen), seen


def test_a_store_binds_only_the_address_it_serves():
    from ftbench.harness.running.listen import bound_store

    store, where = bound_store("127.0.0.1", 0, 1)
    try:
        mine = _listening([psutil.Process()])
        assert ("127.0.0.1", where["port"]) in mine
        assert not [a for a in mine if a[1] == where["port"] and a[0] != "127.0.0.1"], mine
        store.set("k", "v")
        assert store.get("k") == b"v"
    finally:
        del store


# ------------------------------------------------------------ waits and signals


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_ends_node_0_waiting_for_the_others(tmp_path, signum):
    """Node 0 waiting for node 1 says what it waits for and until when, and a signal ends it at once."""
    from ftbench.harness.running.nodes import free_port

    port = free_port()
    env = {**os.environ, "FTBENCH_CACHE": str(ROOT / ".pytest-ftbench-cache")}
    node0 = subprocess.Popen([sys.executable, "-m", "ftbench.harness.cli", "run", "--task", "generation",
                              "--backend", "ddp", *TINY, "--nnodes", "2", "--node-rank", "0", "--master-addr",
                              "127.0.0.1", "--master-port", str(port), "--out", str(tmp_path / "out")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = node0.stdout.readline()
            lines.append(line)
            if "waiting for node(s) 1" in line or not line:
                break
        assert "waiting for node(s) 1 of 2" in lines[-1] and "until" in lines[-1], "".join(lines)
        listening = _listening([psutil.Process(node0.pid)])
        assert listening == {("127.0.0.1", port)}, listening  # the interface of --master-addr only
        t0 = time.monotonic()
        node0.send_signal(signum)
        rest = node0.communicate(timeout=30)[0]
        took = time.monotonic() - t0
    finally:
        if node0.poll() is None:
            node0.kill()
    assert took < 5, took
    assert node0.returncode == 128 + signum, (node0.returncode, rest)
    assert "interrupted" in rest and "Traceback" not in rest, rest
