"""Multi-node cells end to end: two real ``ftbench run`` node processes on loopback.

Node 0 leads and records, node 1 follows; data-parallel cells run as one world
over both.  Nothing is mocked: the nodes meet over TCP on 127.0.0.1 as they
would across machines.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest

from conftest import ROOT, TINY, assert_none_left, processes_with_env, records, with_setting
from ftbench.harness.running.nodes import free_port


def _node(rank: int, port: int, args, out, mark: str, extra_env=None) -> subprocess.Popen:
    env = dict(os.environ)
    env.setdefault("FTBENCH_CACHE", str(ROOT / ".pytest-ftbench-cache"))
    env.update({"FTBENCH_TEST_MARK": mark, "FTBENCH_TEST_NODE": str(rank), "FTBENCH_RENDEZVOUS_TIMEOUT_S": "120"})
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "ftbench.harness.cli", "run", *map(str, args), "--nnodes", "2", "--node-rank",
           str(rank), "--master-addr", "127.0.0.1", "--master-port", str(port), "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _both(args, out0, out1, timeout=600, extra_env=None):
    port, mark = free_port(), uuid.uuid4().hex
    n0 = _node(0, port, args, out0, mark, extra_env)
    n1 = _node(1, port, args, out1, mark, extra_env)
    try:
        o0 = n0.communicate(timeout=timeout)
        o1 = n1.communicate(timeout=60)
    finally:
        for p in (n0, n1):
            if p.poll() is None:
                p.kill()
    return (n0.returncode, *o0), (n1.returncode, *o1), mark


def test_nodes_that_expanded_different_grids_refuse_to_start(tmp_path):
    port, mark = free_port(), uuid.uuid4().hex
    n0 = _node(0, port, ["--task", "generation", "--backend", "ddp", *TINY], tmp_path / "n0", mark)
    n1 = _node(1, port, ["--task", "generation", "--backend", "ddp", *with_setting(TINY, "--steps", 13)], tmp_path / "n1", mark)
    err0, err1 = n0.communicate(timeout=300)[1], n1.communicate(timeout=120)[1]
    assert n0.returncode == 2 and n1.returncode == 2, (err0, err1)
    for err in (err0, err1):
        assert "expanded a different grid" in err and "differing only in --node-rank" in err, err
    assert not (tmp_path / "n0" / "results.jsonl").exists()
    assert not (tmp_path / "n0" / "environment.json").exists()
    assert not (tmp_path / "n1").exists()  # a follower never writes a result set


@pytest.mark.slow
@pytest.mark.timeout(1500)  # three cells across two nodes, then a resume, on a shared 2-core machine
def test_two_nodes_run_ddp_and_deepspeed_as_one_world_with_parity_and_resume(tmp_path):
    args = ["--task", "generation", "--backend", "eager", "--backend", "ddp", "--backend", "zero2", "--nproc", "1",
            *TINY]
    (rc0, out0, err0), (rc1, out1, err1), mark = _both(args, tmp_path / "n0", tmp_path / "n1")
    assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])
    assert not (tmp_path / "n1").exists(), "only node 0 writes records"
    recs = {r["backend"]: r for r in records(tmp_path / "n0")}
    assert sorted(recs) == ["ddp", "eager", "zero2"]  # eager ran once, on node 0
    assert (recs["eager"]["nnodes"], recs["eager"]["world_size"]) == (1, 1)
    for b in ("ddp", "zero2"):
        r = recs[b]
        assert r["status"] == "ok", r["error"]
        assert (r["nnodes"], r["nproc"], r["world_size"]) == (2, 1, 2)
        assert r["parity"]["status"] == "compared" and r["parity"]["passed"], r["parity"]
        assert r["parity"]["reference"] == "eager"
    assert not processes_with_env(FTBENCH_TEST_MARK=mark), "processes left behind"

    # Resume: node 0's result set says everything ran; both nodes finish without running a cell.
    (rc0, out0, err0), (rc1, out1, err1), _ = _both(args, tmp_path / "n0", tmp_path / "n1", timeout=300)
    assert rc0 == 0 and rc1 == 0, (err0[-3000:], err1[-3000:])
    assert len(records(tmp_path / "n0")) == 3
    assert out0.count("skipped (use --force") == 3 and out1.count("already in node 0's result set") == 2


@pytest.mark.slow
def test_a_dead_node_ends_the_cell_as_error_on_node_0_and_leaves_nothing(tmp_path):
    port, mark = free_port(), uuid.uuid4().hex
    limit = 240
    args = ["--task", "generation", "--backend", "ddp", "--nproc", "1", "--steps", "100000", "--warmup", "2",
            "--batch-size", "4", "--seq-len", "32", "--eval-examples", "16", "--time-limit", limit]
    n0 = _node(0, port, args, tmp_path / "n0", mark, {"FTBENCH_NODE_TIMEOUT_S": "10"})
    n1 = _node(1, port, args, tmp_path / "n1", mark, {"FTBENCH_NODE_TIMEOUT_S": "10"})
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not any("ftbench.harness.cell.worker" in " ".join(p.cmdline())
                                                 for p in processes_with_env(FTBENCH_TEST_MARK=mark, FTBENCH_TEST_NODE="1") if p.is_running()):
            time.sleep(0.5)
        time.sleep(5)  # well inside the training loop
        killed_at = time.time()
        n1.send_signal(signal.SIGKILL)  # node 1's ftbench dies, as with a crashed machine's
        n0.communicate(timeout=limit + 60)
        elapsed = time.time() - killed_at
    finally:
        for p in (n0, n1):
            if p.poll() is None:
                p.kill()
    assert n0.returncode == 0
    (rec,) = records(tmp_path / "n0")
    assert rec["status"] == "error" and rec["nnodes"] == 2, rec
    assert elapsed < limit, f"node 0 took {elapsed:.0f} s to end the cell"
    assert_none_left(poll=0.3, FTBENCH_TEST_MARK=mark)


def test_nodes_on_one_machine_split_its_cores_and_use_loopback(monkeypatch):
    from ftbench.harness.contract.config import CellSpec
    from ftbench.harness.running.nodes import NodeGroup

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    spec = CellSpec(task="generation", backend="ddp", model="tiny-gpt2", nproc=1, launcher={"nnodes": 2})
    group = NodeGroup(2, 1, "127.0.0.1", 29500)
    group.peers = {0: {"host": "a/boot", "cpus": 8}, 1: {"host": "a/boot", "cpus": 8}}
    assert group.cell_env(spec) == {"OMP_NUM_THREADS": "4", "GLOO_SOCKET_IFNAME": "lo"}
    # Separate machines keep torchrun's own choice (every core for a lone rank).
    remote = NodeGroup(2, 1, "10.0.0.7", 29500)
    remote.peers = {0: {"host": "a/boot", "cpus": 8}, 1: {"host": "b/boot", "cpus": 8}}
    assert remote.cell_env(spec) == {}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
    assert "OMP_NUM_THREADS" not in group.cell_env(spec)
