"""Starting a cell's process: forked from a pre-imported server, or exec'd.

Importing torch and transformers costs seconds of CPU per process, which
would dominate a grid of small cells.  Single-process cells are therefore
forked from a *fork server* (``multiprocessing``'s ``forkserver``) that has
imported the heavy libraries once and never runs any cell itself: every cell
still gets its own fresh process, with its own memory peak, compile state
and crash, but skips the imports.  The server is started lazily by the
driver and dies with it.

Multi-process cells (``nproc > 1``) go through ``torchrun`` as ordinary
subprocesses.  ``FTBENCH_LAUNCH=exec`` forces that path for every cell
(e.g. to measure the cost the fork server saves).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

#: Modules the fork server imports once; cells forked from it start warm.
PRELOAD = ("ftbench.harness.running.preload",)

_context = None


def use_fork_server(spec) -> bool:
    # A multi-node cell goes through torchrun even with one rank per node: the nodes meet there.
    return (os.environ.get("FTBENCH_LAUNCH", "fork") != "exec" and spec.nproc <= 1
            and int((spec.launcher or {}).get("nnodes", 1) or 1) <= 1 and sys.platform.startswith("linux"))


def cuda_initialized() -> bool:
    """Whether this process has initialised CUDA (False when torch is not even imported).

    The fork server must never do so: a child forked from a process with a
    CUDA context cannot use CUDA at all.
    """
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


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


def _cell_main(argv: list[str], log_path: str) -> None:
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
        from ftbench.harness.cell.worker import main

        check_fork_cuda()
        code = main(argv)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip interpreter teardown: atexit handlers of libraries imported by
        # the server are not this cell's to run.
        os._exit(code)


def warm_up(cells) -> None:
    """Start the fork server now if any cell will use it, so that its one-off
    start-up is not charged to the first cell's wall time."""
    if any(use_fork_server(c) for c in cells):
        # The server imports its preload after it starts answering; a no-op
        # child returns only once that is done.
        probe = _fork_context().Process(target=_noop)
        probe.start()
        probe.join()


def _noop() -> None:
    pass


class ForkedCell:
    """A cell process forked from the fork server (same interface as Popen here)."""

    def __init__(self, argv: list[str], log_path: str):
        self.proc = _fork_context().Process(target=_cell_main, args=(argv, log_path), daemon=False)
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
    """Start a cell: forked when possible, else ``command`` as a subprocess."""
    if use_fork_server(spec):
        return ForkedCell(worker_argv, log_path)
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    finally:
        log.close()
