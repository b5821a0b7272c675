"""Multi-process cells: a failing rank fails the cell with its own message and
leaves no process behind; multi-node settings reach torchrun intact."""

from __future__ import annotations

import json
import os
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from conftest import TINY, assert_none_left, ftbench, records, with_setting
from ftbench.harness.contract.config import CellSpec, Launch

#: A third-party backend plugin, installed the way pip would leave it: a module plus a
#: dist-info with an ``ftbench`` entry point, found on PYTHONPATH by the driver and every rank.
RANK_FAULT_PLUGIN = '''
import torch.distributed as dist

from ftbench import hookimpl
from ftbench.harness.contract.api import BackendSpec
from ftbench.plugins.data_parallel import DDPEngine


class RankFaultEngine(DDPEngine):
    """DDP whose rank 1 raises in its third micro-batch, while rank 0 waits in the all-reduce."""

    calls = 0

    def forward_backward(self, batch, boundary):
        self.calls += 1
        if dist.get_rank() == 1 and self.calls == 3:
            raise RuntimeError("injected fault on rank 1 at step 2")
        return super().forward_backward(batch, boundary)


@hookimpl
def register_backends(register):
    register(BackendSpec("rank-fault", engine=RankFaultEngine, data_parallel=True,
                         description="test-only: rank 1 raises"))
'''


def _install_plugin(root: Path) -> dict:
    (root / "ftbench_rank_fault.py").write_text(textwrap.dedent(RANK_FAULT_PLUGIN))
    dist = root / "ftbench_rank_fault-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: ftbench-rank-fault\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[ftbench]\nrank_fault = ftbench_rank_fault\n")
    return {"PYTHONPATH": str(root)}


def test_a_failing_rank_fails_the_cell_with_its_message_and_leaves_nothing(tmp_path):
    env = _install_plugin(tmp_path)
    mark = uuid.uuid4().hex
    env["FTBENCH_TEST_MARK"] = mark  # inherited by every process of the cell
    out = tmp_path / "out"
    proc = ftbench("run", "--task", "generation", "--backend", "rank-fault", "--nproc", "2", *TINY, "--out", out,
                   env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (rec,) = records(out)
    assert rec["nproc"] == 2
    assert rec["status"] == "error"
    assert "RuntimeError: injected fault on rank 1 at step 2" in rec["error"]
    assert rec["parity"]["status"] == "not-compared"
    assert_none_left(timeout=5, FTBENCH_TEST_MARK=mark)


def test_multi_node_settings_reach_torchrun_and_parse():
    from torch.distributed.run import get_args_parser

    from ftbench.harness.running.cellproc import command_for, worker_args

    spec = CellSpec(task="generation", backend="ddp", model="tiny-gpt2", nproc=2,
                    launcher={"nnodes": 2, "node_rank": 1, "master_addr": "10.0.0.7", "master_port": 29511})
    cmd = command_for(spec, worker_args(Path("spec.json"), Path("out"), time.time()))
    start = cmd.index("torch.distributed.run") + 1
    args = get_args_parser().parse_args(cmd[start:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "2", 1)
    assert (args.master_addr, args.master_port) == ("10.0.0.7", 29511)
    assert not args.standalone
    assert args.training_script == "ftbench.harness.cell.worker" and args.module


def test_single_node_cells_use_a_private_rendezvous():
    from torch.distributed.run import get_args_parser

    from ftbench.harness.running.cellproc import command_for, worker_args

    spec = CellSpec(task="generation", backend="ddp", model="tiny-gpt2", nproc=2)
    cmd = command_for(spec, worker_args(Path("spec.json"), Path("out"), time.time()))
    start = cmd.index("torch.distributed.run") + 1
    args = get_args_parser().parse_args(cmd[start:])
    # --standalone picks a free port, so concurrent cells on one machine never collide.
    assert args.standalone and args.nproc_per_node == "2"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["ddp", "fsdp"])
def test_data_parallel_backend_without_nproc_runs_one_rank(tmp_path, backend):
    # A one-rank cell needs a process group too; it gets one over an in-memory store.
    out = tmp_path / "out"
    ftbench("run", "--task", "generation", "--backend", backend, *with_setting(TINY, "--steps", 4), "--out", out, check=True)
    (rec,) = records(out)
    assert rec["status"] == "ok" and rec["nproc"] == 1, rec["error"]


def test_multi_node_settings_apply_to_data_parallel_backends_only():
    from ftbench.harness.grid.expand import Grid
    from ftbench.harness.contract.registry import Registry

    launcher = {"nnodes": 2, "node_rank": 0, "master_addr": "127.0.0.1", "master_port": 29512}
    cells = Grid(axes={"task": ["generation"], "backend": ["eager", "ddp"]},
                 settings={"nproc": 2, "launcher": launcher}).cells(Registry.load())
    by_backend = {str(c.backend): c for c in cells}
    assert by_backend["eager"].nproc == 1 and by_backend["eager"].launcher == Launch()
    assert by_backend["ddp"].nproc == 2 and by_backend["ddp"].launcher.to_dict() == launcher


# ------------------------------------------------ ranks forked from the fork server


def test_single_node_ranks_fork_unless_torchrun_is_asked_for_or_needed(monkeypatch):
    from ftbench.harness.running import launch

    monkeypatch.setattr(launch, "_server_probe", {"touched": False, "why": "no CUDA state in the server"})
    cpu = CellSpec(task="generation", backend="ddp", model="tiny-gpt2", nproc=2, device="cpu")
    two_nodes = CellSpec(task="generation", backend="ddp", model="tiny-gpt2", nproc=2,
                         launcher={"nnodes": 2, "node_rank": 0, "master_addr": "10.0.0.7", "master_port": 29511})
    monkeypatch.delenv("FTBENCH_LAUNCH", raising=False)
    assert launch.use_fork_server(cpu) and not launch.use_fork_server(two_nodes)
    monkeypatch.setenv("FTBENCH_LAUNCH", "torchrun")
    assert not launch.use_fork_server(cpu)
    assert launch.use_fork_server(CellSpec(task="generation", backend="eager", model="tiny-gpt2"))
    monkeypatch.delenv("FTBENCH_LAUNCH")
    # A server that initialised CUDA cannot hand it to a forked child: CUDA cells fall back, with a warning.
    monkeypatch.setattr(launch, "_server_probe", launch.cuda_verdict({"bad_fork": True}))
    gpu = CellSpec(task="generation", backend="ddp", model="tiny-gpt2", nproc=2, device="cuda")
    with pytest.warns(RuntimeWarning, match="torchrun"):
        assert not launch.use_fork_server(gpu)
    assert launch.use_fork_server(cpu)


def test_forked_ranks_get_torchrun_s_environment():
    from torch.distributed.rendezvous import _torchelastic_use_agent_store

    from ftbench.harness.running.ranks import rank_env

    env = rank_env(1, 2, 29600, {})
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")} == \
        {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "0"}
    assert env["MASTER_PORT"] == "29600" and env["MASTER_ADDR"] == "127.0.0.1"
    # Unless the user chose, each rank gets its share of the usable cores (torchrun would give 1).
    cores = len(os.sched_getaffinity(0))
    assert env["OMP_NUM_THREADS"] == str(max(1, cores // 2))
    assert "OMP_NUM_THREADS" not in rank_env(1, 2, 29600, {"OMP_NUM_THREADS": "2"})
    # The leader hosts the store; torch's env:// rendezvous must connect to it, not start its own.

    saved = os.environ.get("TORCHELASTIC_USE_AGENT_STORE")
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = env["TORCHELASTIC_USE_AGENT_STORE"]
    try:
        assert _torchelastic_use_agent_store()
    finally:
        if saved is None:
            del os.environ["TORCHELASTIC_USE_AGENT_STORE"]
        else:
            os.environ["TORCHELASTIC_USE_AGENT_STORE"] = saved


def test_jit_extensions_get_a_directory_of_this_installation(monkeypatch, tmp_path):
    from ftbench.harness.running.prepare import pin_extensions_dir

    monkeypatch.setenv("FTBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    path = pin_extensions_dir()
    assert path.startswith(str(tmp_path / "torch_extensions")) and pin_extensions_dir() == path
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")  # the user's choice wins
    assert pin_extensions_dir() == "/somewhere/else"


@pytest.mark.slow
def test_a_second_zero2_grid_pays_no_op_build_in_its_first_cell(tmp_path):
    # The first run builds (or loads) DeepSpeed's CPU ops once, before its first cell, under the
    # test cache; the second run's first cell then only loads them.
    runs = []
    for i in range(2):
        out = tmp_path / f"out{i}"
        ftbench("run", "--task", "generation", "--backend", "zero2", "--nproc", "2", *TINY, "--out", out, check=True)
        (rec,) = records(out)
        assert rec["status"] == "ok", rec["error"]
        prepared = json.loads((out / "environment.json").read_text())["prepared"]
        assert [p["status"] for p in prepared] == ["ok"]
        runs.append(rec)
    assert runs[1]["setup_phases"]["engine_s"] < 3.0, runs[1]["setup_phases"]


def test_a_build_lock_left_by_a_killed_build_is_stale_and_a_fresh_one_is_not(tmp_path):
    import os

    from ftbench.harness.running.prepare import _stale

    old, fresh = tmp_path / "cpu_adam" / "lock", tmp_path / "shm" / "lock"
    for lock in (old, fresh):
        lock.parent.mkdir()
        lock.touch()
    os.utime(old, (time.time() - 120, time.time() - 120))
    # torch waits on such a lock forever: every later load of that op would hang.
    assert _stale([old, fresh]) == [old]
