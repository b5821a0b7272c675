"""The ranks of a single-node multi-process cell, forked from the warm fork server.

``torchrun`` starts every rank as a new interpreter that imports torch,
transformers, the plugins and the backend library again: 5-9 s per cell on
a small CPU.  Here the fork server forks one *cell leader* (a fresh process
in a session of its own, exactly like a single-process cell), and the
leader forks the ranks from its pre-imported image.  The leader plays
torchrun's part on one node:

* each rank gets torchrun's environment (``RANK``, ``LOCAL_RANK``,
  ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``GROUP_RANK``, ``ROLE_*``,
  ``MASTER_ADDR``/``MASTER_PORT``, ``TORCHELASTIC_*``) and forms its own
  process group with ``init_method=env://``;
* the rendezvous store is hosted by the leader on a port the kernel picks
  (``TCPStore(port=0)``, torchrun ``--standalone``'s way), so concurrent
  cells on one machine never race for a port, and it listens on the
  loopback interface only (:mod:`ftbench.harness.running.listen`); the ranks
  connect to it as clients (``TORCHELASTIC_USE_AGENT_STORE``); where it
  listened goes to ``RESULT_DIR/launch.json`` and the record's ``launch``;
* ``OMP_NUM_THREADS``: when the variable is unset a rank gets the cores this
  process may run on divided by the ranks (:func:`threads_per_rank`; torchrun
  would give 1, which leaves DeepSpeed's CPU Adam of an offload cell
  single-threaded on a machine with cores to spare), else the variable's
  value (applied with ``torch.set_num_threads``: the OpenMP runtime read the
  environment when the server loaded it);
* the ranks live and die together: the first rank to exit abnormally gets
  the others SIGKILLed, and the leader exits the way that rank did (same
  exit code, or the same signal), naming it in ``RESULT_DIR/first_failure.json``;
  a rank also dies with its leader (``PR_SET_PDEATHSIG``).

Everything stays in the leader's session, so the driver's time-out, memory
limit (summed over the leader's tree) and Ctrl-C take the whole cell down,
as for any cell.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path

from ftbench.harness.running.childexit import exit_child
from ftbench.harness.running.listen import LOOPBACK, bound_store

_PR_SET_PDEATHSIG = 1

#: How a forked rank's process group finds the leader's store (torchrun's agent-store protocol).
MASTER_ADDR = LOOPBACK


def threads_per_rank(nproc: int) -> int:
    """Threads each of ``nproc`` ranks gets when ``OMP_NUM_THREADS`` is unset: the usable cores
    (``sched_getaffinity``, which a Slurm or container CPU set narrows) divided by the ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, nproc))


def rank_env(rank: int, nproc: int, port: int, environ: dict) -> dict:
    """The variables torchrun (standalone, one node) gives rank ``rank`` of ``nproc``."""
    env = {
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
        "ROLE_NAME": "default", "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_WORLD_SIZE": "1", "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": MASTER_ADDR,
        "MASTER_PORT": str(port), "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
        "TORCHELASTIC_RUN_ID": f"ftbench-{os.getpid()}", "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": environ.get("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1"),
    }
    if "OMP_NUM_THREADS" not in environ and nproc > 1:
        env["OMP_NUM_THREADS"] = str(threads_per_rank(nproc))
    return env


def lead(argv: list[str], nproc: int, run_rank) -> int:
    """In the cell leader: fork ``nproc`` ranks running ``run_rank(argv)``, host
    their store, and return the cell's exit status (or die of a rank's signal)."""
    pipes, pids = [], {}
    for rank in range(nproc):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            for _, other in pipes:
                os.close(other)
            _rank_main(rank, nproc, r, argv, run_rank)  # never returns
        os.close(r)
        pipes.append((rank, w))
        pids[pid] = rank
    # The store's server thread starts only now: nothing multi-threaded is ever forked.
    store, where = bound_store(MASTER_ADDR, 0, nproc)
    for _, w in pipes:
        os.write(w, str(store.port).encode())
        os.close(w)
    result_dir = Path(argv[1])
    write_launch(result_dir, {"store": where, "ranks": "forked"})
    first = None
    while pids:
        pid, status = os.waitpid(-1, 0)
        rank = pids.pop(pid, None)
        if rank is None:
            continue
        code = os.waitstatus_to_exitcode(status)
        if code != 0 and first is None:
            first = (rank, code)
            _write_first_failure(result_dir, rank, nproc, code)
            for other in pids:  # the rest are most likely blocked in a collective
                _kill(other)
    if first is None:
        return 0
    code = first[1]
    if code < 0:
        # Die of the same signal, so the driver reads the cause as for a one-process cell.
        _die_of(-code)
    return code if code > 0 else 1


def _die_of(signum: int) -> None:
    import resource

    sys.stdout.flush()
    sys.stderr.flush()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the rank's fault is reported, not dumped again
    if signum not in (signal.SIGKILL, signal.SIGSTOP):
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # not reached: a deliverable signal kills before kill() returns


def _rank_main(rank: int, nproc: int, port_fd: int, argv: list[str], run_rank) -> None:
    code = 1
    try:
        leader = os.getppid()
        _die_with_parent()
        if os.getppid() != leader:  # the leader died before the line above took effect
            os._exit(1)
        data = b""
        while chunk := os.read(port_fd, 32):
            data += chunk
        os.close(port_fd)
        if not data:  # the leader went away before starting the store
            os._exit(1)
        env = rank_env(rank, nproc, int(data), os.environ)
        os.environ.update(env)
        import torch

        torch.set_num_threads(_threads(os.environ.get("OMP_NUM_THREADS", "1")))
        code = run_rank(argv)
    except BaseException:  # noqa: BLE001 - the cell's log is the only place left to say why
        import traceback

        traceback.print_exc()
    finally:
        exit_child(code)


def _threads(value: str) -> int:
    # OpenMP also accepts a list ("4,2"): its first entry is the outer level's count.
    try:
        return max(1, int(value.split(",")[0]))
    except ValueError:
        return 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _write_first_failure(result_dir: Path, rank: int, nproc: int, code: int) -> None:
    try:
        (result_dir / "first_failure.json").write_text(json.dumps({"rank": rank, "nproc": nproc, "exitcode": code}))
    except OSError:
        pass


def write_launch(result_dir: Path, details: dict) -> None:
    """How the cell was launched (where its store listened), for the record's ``launch``."""
    try:
        (result_dir / "launch.json").write_text(json.dumps(details))
    except OSError:
        pass


def launch_details(result_dir: Path) -> dict | None:
    """What :func:`write_launch` left, if anything."""
    try:
        details = json.loads((result_dir / "launch.json").read_text())
    except (OSError, ValueError):
        return None
    return details if isinstance(details, dict) else None


def first_failure(result_dir: Path) -> dict | None:
    """The rank whose abnormal exit ended a forked multi-rank cell, if any."""
    try:
        return json.loads((result_dir / "first_failure.json").read_text())
    except (OSError, ValueError):
        return None
