"""Starting a cell's process: forked from a pre-imported server, or exec'd.

Importing torch and transformers costs seconds of CPU per process, which
would dominate a grid of small cells.  Cells are therefore forked from a
*fork server* (``multiprocessing``'s ``forkserver``) that has imported the
heavy libraries once and never runs any cell itself: every cell still gets
its own fresh process, with its own memory peak, compile state and crash,
but skips the imports.  The server is started lazily by the driver and dies
with it.

A single-node multi-process cell (``nproc > 1``) is forked the same way as
a *cell leader* that forks the ranks and plays torchrun's part
(:mod:`ftbench.harness.running.ranks`).  ``torchrun`` stays for multi-node
cells, for ``FTBENCH_LAUNCH=torchrun`` (multi-rank cells only), and for
CUDA cells if the fork server has initialised CUDA (never expected: the
preload touches no device; a probe child checks, a warning says so, and
``environment.json``'s ``fork_server`` says what the probe found).
``FTBENCH_LAUNCH=exec`` starts every cell as a plain subprocess (e.g. to
measure the cost the fork server saves).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import subprocess
import sys
import warnings
from pathlib import Path

from ftbench.harness.running.childexit import exit_child

#: Modules the fork server imports once; cells forked from it start warm.
PRELOAD = ("ftbench.harness.running.preload",)

#: Names the backends whose ``preload`` the fork server imports (all, when unset).
PRELOAD_BACKENDS_ENV = "FTBENCH_PRELOAD_BACKENDS"

_context = None
#: What the warm-up probe found in the fork server (None: not probed yet); see :func:`fork_server_probe`.
_server_probe: dict | None = None

#: Seconds the probe child may take (it may initialise the CUDA driver) before the server counts as touched.
PROBE_TIMEOUT_S = 60


def _may_fork(spec) -> bool:
    mode = os.environ.get("FTBENCH_LAUNCH", "fork")
    if mode == "exec" or not sys.platform.startswith("linux"):
        return False
    if spec.nnodes > 1:
        return False  # a multi-node cell goes through torchrun even with one rank per node: the nodes meet there
    return spec.nproc <= 1 or mode != "torchrun"


def use_fork_server(spec) -> bool:
    """Whether ``spec`` starts from the fork server (see the module docstring)."""
    if not _may_fork(spec):
        return False
    if spec.device != "cpu" and server_touched_cuda():
        warnings.warn("the fork server has initialised CUDA, so a cell forked from it could not use the GPU "
                      f"({fork_server_probe().get('why')}); CUDA cells start as plain processes (torchrun for "
                      "multi-rank cells) instead: slower start, same measurements", RuntimeWarning, stacklevel=2)
        return False
    return True


def server_touched_cuda() -> bool:
    """True if the fork server initialised CUDA (a forked child could then not use it)."""
    return fork_server_probe()["touched"]


def fork_server_probe() -> dict:
    """What a child forked from the fork server found about CUDA, probed once per driver.

    ``touched`` says a forked cell could not use the GPU, ``why`` says what showed it; the rest is
    the evidence.  Example (a CUDA machine whose server mapped the driver library but never
    initialised it, so forking is safe)::

        {"touched": False, "why": "libcuda is mapped, but a forked child can use CUDA",
         "bad_fork": False, "libcuda_mapped": True, "cuda_in_child": 0,
         "cuda_libraries": ["libcaffe2_nvrtc.so", "libcuda.so.1"]}
    """
    global _server_probe
    if _server_probe is None:
        ctx = _fork_context()
        reader, writer = ctx.Pipe(duplex=False)
        probe = ctx.Process(target=_probe_cuda, args=(writer,))
        probe.start()
        writer.close()
        found = reader.recv() if reader.poll(PROBE_TIMEOUT_S) else None
        if probe.exitcode is None and found is None:
            probe.kill()
        probe.join()
        _server_probe = cuda_verdict(found)
    return _server_probe


def cuda_verdict(found: dict | None) -> dict:
    """Whether a forked child can use CUDA, from what the probe child saw (``None``: it never answered).

    Torch's own flag (a device-count query or lazy init in the server makes every later fork a
    "bad fork") decides first.  A mapped driver library alone is not poisoning (a library may
    load it without initialising CUDA), so the probe child then does what a cell's first CUDA
    call does (initialise the driver, take device 0's primary context): a child of a server
    that had initialised CUDA cannot, a clean one can.
    """
    if found is None:
        return {"touched": True, "why": f"the probe child did not answer within {PROBE_TIMEOUT_S} s"}
    if found.get("bad_fork"):
        why = "torch marks a child of the server as a bad fork (CUDA initialised or its devices counted there)"
    elif found.get("libcuda_mapped") and found.get("cuda_in_child") != 0:
        why = f"libcuda is mapped and a forked child cannot use CUDA ({found.get('cuda_in_child')})"
    elif found.get("libcuda_mapped"):
        return {"touched": False, **found, "why": "libcuda is mapped, but a forked child can use CUDA"}
    else:
        return {"touched": False, **found, "why": "no CUDA state in the server"}
    return {"touched": True, **found, "why": why}


def check_fork_cuda() -> None:
    """In a forked cell: fail with the fix, not CUDA's late 'cannot re-initialize' error,
    when the server it was forked from had initialised CUDA."""
    import torch

    if torch.cuda._is_in_bad_fork():
        raise RuntimeError("this cell was forked from a fork server that had initialised CUDA, so it cannot use "
                           "CUDA; something the server preloads touches the GPU. Run with FTBENCH_LAUNCH=exec "
                           "until that import is fixed")


def _fork_context():
    global _context
    if _context is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(PRELOAD))
        _context = ctx
    return _context


def _run_worker(argv: list[str]) -> int:
    from ftbench.harness.cell.worker import main  # in the cell only: the fork server preloads it, the driver never runs it

    check_fork_cuda()
    return main(argv)


def _cell_main(argv: list[str], log_path: str, nproc: int = 1) -> None:
    # A session of its own, so the driver can kill the cell's whole tree.
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    code = 1
    try:
        if nproc > 1:
            from ftbench.harness.running.ranks import lead  # in a multi-rank cell only, after the fork

            code = lead(argv, nproc, _run_worker)
        else:
            code = _run_worker(argv)
    finally:
        exit_child(code)  # no interpreter teardown: the server's libraries' atexit handlers are not the cell's


def warm_up(cells) -> dict | None:
    """Start the fork server now if any cell will use it, so that its one-off start-up is not
    charged to the first cell's wall time; returns what the probe found (None: no fork server)."""
    if any(_may_fork(c) for c in cells):
        if _context is None:  # the server, started now, preloads this grid's backends only
            os.environ[PRELOAD_BACKENDS_ENV] = ",".join(sorted({c.backend.name for c in cells}))
        # The server imports its preload after it starts answering; the probe
        # child returns only once that is done, and says whether it touched CUDA.
        return fork_server_probe()
    return None


def context_for(cells):
    """The ``multiprocessing`` context for one-off work of a grid: the fork server when its
    cells use it, else a fresh interpreter."""
    return _fork_context() if any(_may_fork(c) for c in cells) else mp.get_context("spawn")


def _probe_cuda(answer) -> None:
    # A child cannot see a parent's CUDA context directly: torch flags a fork after its lazy
    # init or device count ("bad fork"); a library that initialised the driver itself leaves
    # libcuda mapped, and then the driver refuses to initialise again in a child.
    import torch

    found = {"bad_fork": bool(torch.cuda._is_in_bad_fork()), "libcuda_mapped": False, "cuda_libraries": []}
    try:
        with open("/proc/self/maps") as f:
            libs = {Path(line.split()[-1]).name for line in f if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:
        libs = set()
    found["cuda_libraries"] = sorted(n for n in libs if any(k in n for k in ("cuda", "nvrtc", "nvidia-ml")))
    found["libcuda_mapped"] = any(n.startswith("libcuda.so") for n in libs)
    if found["libcuda_mapped"] and not found["bad_fork"]:
        found["cuda_in_child"] = _use_the_driver()
    answer.send(found)
    answer.close()
    os._exit(0)


def _use_the_driver():
    """0 if this process can initialise CUDA and hold device 0's primary context (what a cell's
    first CUDA call does), else the first driver call that failed and its code."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        return f"libcuda.so.1 could not be loaded: {e}"
    count, dev, ctx = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_void_p()
    calls = [("cuInit", lambda: lib.cuInit(0)), ("cuDeviceGetCount", lambda: lib.cuDeviceGetCount(ctypes.byref(count))),
             ("cuDeviceGet", lambda: lib.cuDeviceGet(ctypes.byref(dev), 0) if count.value else 0),
             ("cuDevicePrimaryCtxRetain",
              lambda: lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev) if count.value else 0)]
    for name, call in calls:
        code = int(call())
        if code:
            return f"{name} {code}"
    return 0  # the context goes with this process, which exits now


#: How a cell's process was started, as its record's ``launch`` says: forked from the fork server,
#: a plain subprocess, or torchrun (multi-node cells, ``FTBENCH_LAUNCH=torchrun``, or CUDA cells
#: whose server had initialised CUDA).
LAUNCH_MODES = ("fork", "exec", "torchrun")


def launch_mode(command: list[str]) -> str:
    """``exec`` or ``torchrun`` for a cell started as ``command`` (not forked)."""
    return "torchrun" if "torch.distributed.run" in command else "exec"


class ForkedCell:
    """A cell process forked from the fork server (same interface as Popen here)."""

    launch = "fork"

    def __init__(self, argv: list[str], log_path: str, nproc: int = 1):
        self.proc = _fork_context().Process(target=_cell_main, args=(argv, log_path, nproc), daemon=False)
        self.proc.start()
        self.pid = self.proc.pid

    def wait(self, timeout: float | None = None) -> int:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise subprocess.TimeoutExpired("cell", timeout)
        return self.proc.exitcode

    @property
    def returncode(self):
        return self.proc.exitcode


def start(spec, worker_argv: list[str], command: list[str], env: dict, log_path: str):
    """Start a cell: forked when possible, else ``command`` as a subprocess; the returned
    process's ``launch`` attribute is one of :data:`LAUNCH_MODES`."""
    if use_fork_server(spec):
        return ForkedCell(worker_argv, log_path, spec.nproc)
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        log.close()
    proc.launch = launch_mode(command)
    return proc
