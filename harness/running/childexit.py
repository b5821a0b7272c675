"""How a process forked by ftbench ends: its own cleanup, then ``os._exit``.

Cells, their ranks and the grid's preparation run in children forked from
the fork server.  They end with ``os._exit`` so that the interpreter's
teardown (the atexit handlers of libraries the server imported) is not run
once per child; but two things must still happen first:

* the child's own multiprocessing finalizers.  A lock or queue made in the
  child (torch.compile's compile-worker pool, a data library's lock)
  registers a named semaphore with the driver's resource tracker, which
  forked children share; its finalizer unlinks it and tells the tracker.
  Skipped, the tracker finds the semaphores "leaked" when the driver exits
  and prints a warning as the last line of a good run.  Finalizers are
  bound to the process that made them, so the server's own objects are left
  alone.  This is what multiprocessing's exit handler runs first (priority
  >= 0), without its joining of child processes;
* flushing stdout and stderr, which go to the cell's log.

Example::

    try:
        code = work()
    finally:
        exit_child(code)
"""

from __future__ import annotations

import os
import sys


def exit_child(code: int) -> None:
    """Run this process's multiprocessing finalizers, flush its output, and ``os._exit(code)``."""
    try:
        from multiprocessing import util

        util._run_finalizers(0)
    except Exception:  # noqa: BLE001 - teardown must never mask the child's result
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
