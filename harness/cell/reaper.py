"""Making sure nothing a cell started outlives it.

Killing the cell's session catches every descendant that stayed in it, but a
process that calls ``setsid()`` and whose parent exits (the classic daemon
double fork) leaves both the session and the tree that the memory sampler
walks.  On Linux the driver therefore makes itself a *child subreaper*: such
orphans are re-parented to the driver instead of to init, where
:class:`CellGuard` finds them once the cell has ended, names them in the
record and kills them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

import psutil

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Adopt orphaned descendants (Linux); False where the kernel has no such thing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


class CellGuard:
    """Finds and kills what a cell left behind.

    Create it right after the cell's process has started (the driver's
    children at that moment, e.g. a fork server, are not the cell's), then
    call :meth:`leftovers` once the cell's main process has ended.
    """

    def __init__(self, cell_pid: int):
        self.cell_pid = cell_pid
        self.me = psutil.Process()
        self.before = {p.pid for p in self._children()}
        self.found: dict[int, psutil.Process] = {}

    def _children(self):
        try:
            return self.me.children(recursive=False)
        except psutil.Error:
            return []

    def leftovers(self, seen: dict | None = None) -> list[dict]:
        """Processes of the cell still alive: its session, the tree the sampler
        saw (``seen``: pid -> psutil.Process), and orphans adopted by us."""
        found: dict[int, psutil.Process] = {}
        for p in (seen or {}).values():
            if p.pid != self.cell_pid and _alive(p):
                found[p.pid] = p
        for p in self._children():
            if p.pid not in self.before and p.pid != self.cell_pid and _alive(p):
                found[p.pid] = p
                for c in _descendants(p):
                    found[c.pid] = c
        for p in psutil.process_iter():
            if p.pid in found or p.pid == self.cell_pid:
                continue
            try:
                if os.getsid(p.pid) == self.cell_pid and _alive(p):
                    found[p.pid] = p
            except (OSError, psutil.Error):
                continue
        self.found.update(found)
        return [_describe(p) for p in found.values()]

    def kill_all(self) -> None:
        """SIGKILL every leftover found, and reap those that are our children."""
        for p in self.found.values():
            try:
                p.send_signal(signal.SIGKILL)  # psutil checks the pid was not reused
            except psutil.Error:
                pass
        for p in self.found.values():
            try:
                p.wait(timeout=5)
            except (psutil.Error, ChildProcessError):
                pass


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _descendants(p: psutil.Process):
    try:
        return p.children(recursive=True)
    except psutil.Error:
        return []


def _describe(p: psutil.Process) -> dict:
    try:
        cmd = " ".join(p.cmdline())[:200] or p.name()
    except psutil.Error:
        cmd = "?"
    return {"pid": p.pid, "command": cmd}


#: Set by the driver, inherited by every cell (fork server, exec'd worker, torchrun ranks).
DRIVER_PID_ENV = "FTBENCH_DRIVER_PID"


def watch_driver(poll_s: float = 1.0) -> None:
    """In a cell: die, with the cell's whole process group, when the driver is gone.

    The driver kills its cell on Ctrl-C or SIGTERM, but a driver that is itself
    SIGKILLed (by a user, a scheduler or the kernel's OOM killer) cannot; without
    this a hung cell would run forever with no one left to record it.
    """
    pid = os.environ.get(DRIVER_PID_ENV)
    if not pid or not pid.isdigit():
        return
    try:
        driver = psutil.Process(int(pid))
    except psutil.Error:
        driver = None

    def orphaned() -> bool:
        try:
            return driver is None or not driver.is_running() or driver.status() == psutil.STATUS_ZOMBIE
        except psutil.Error:
            return True

    def loop():
        while not orphaned():
            time.sleep(poll_s)
        try:
            os.killpg(os.getpgrp(), signal.SIGKILL)
        finally:
            os._exit(137)

    threading.Thread(target=loop, name="ftbench-driver-watch", daemon=True).start()
