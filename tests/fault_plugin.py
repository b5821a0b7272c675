"""A test-only backend whose step misbehaves on purpose.

Loaded with ``FTBENCH_PLUGINS_EXTRA=fault_plugin`` and ``tests/`` on
``PYTHONPATH`` (both inherited by the cell processes), so the core never
knows it exists.  ``--backend fault:kind=KIND,at_step=N`` runs the standard
eager step and, at optimizer step ``N`` (0-based), does one of:

``none``     nothing (a normal cell)
``kill``     SIGKILL itself
``segv``     read address 0 (a real segmentation fault)
``memhog``   grow resident memory without bound (for the per-cell memory limit)
``memerror`` cap its address space, then allocate past it (a real MemoryError,
             the same path as a CUDA out-of-memory exception)
``hang``     sleep forever (for the time limit and for interruption tests)
``orphan``   start a double-forked, setsid'd sleeper that would outlive the
             cell, write its pid to ``pidfile``, then finish normally
``nan``      return a NaN loss (divergence)
``raise``    raise an ordinary exception

``--backend fault-dp:kind=KIND,at_step=N,rank=R --nproc 2`` is the same on
DDP, where only rank ``R`` misbehaves while the others wait for it in the
gradient all-reduce.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

from ftbench import hookimpl
from ftbench.harness.contract.api import BackendSpec, FtbenchError
from ftbench.harness.contract.engine import StandardEngine
from ftbench.plugins.data_parallel import DDPEngine

KINDS = ("none", "kill", "segv", "memhog", "memerror", "hang", "orphan", "nan", "raise")


class FaultEngine(StandardEngine):
    @classmethod
    def validate_options(cls, options):
        if options.get("kind") not in KINDS:
            raise FtbenchError(f"fault backend: kind must be one of {', '.join(KINDS)}")
        return options

    def forward_backward(self, batch, boundary):
        loss = super().forward_backward(batch, boundary)
        step = getattr(self, "_fault_step", 0)
        if step == int(self.options.get("at_step", 1)):
            self._fault_step = -1  # fire once
            fault = _do_fault(self.options)
            if fault == "nan":
                return loss * float("nan")
        return loss

    def step(self):
        super().step()
        if getattr(self, "_fault_step", 0) >= 0:
            self._fault_step = getattr(self, "_fault_step", 0) + 1


class RankFaultEngine(DDPEngine):
    @classmethod
    def validate_options(cls, options):
        return FaultEngine.validate_options(options)

    def forward_backward(self, batch, boundary):
        loss = super().forward_backward(batch, boundary)
        step = getattr(self, "_fault_step", 0)
        if self.ctx.rank == int(self.options.get("rank", 1)) and step == int(self.options.get("at_step", 1)):
            _do_fault(self.options)
        return loss

    def step(self):
        super().step()
        self._fault_step = getattr(self, "_fault_step", 0) + 1


def _do_fault(options):
    kind = options["kind"]
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "segv":
        ctypes.string_at(0)
    elif kind == "memhog":
        hog = []
        for _ in range(400):  # up to ~25 GB: the limit must stop it long before
            hog.append(b"\x01" * (64 << 20))  # multiplication writes every page: resident, not just reserved
            time.sleep(0.02)
        raise RuntimeError("memhog: the memory limit was not enforced")
    elif kind == "memerror":
        import resource

        with open("/proc/self/statm") as f:
            vm_pages = int(f.read().split()[0])
        resource.setrlimit(resource.RLIMIT_AS, (vm_pages * os.sysconf("SC_PAGE_SIZE") + (256 << 20),) * 2)
        _ = bytearray(2 << 30)
    elif kind == "hang":
        while True:
            time.sleep(60)
    elif kind == "orphan":
        # The intermediate child exits at once, so the sleeper is re-parented
        # away from the cell and, in its own session, escapes its process group.
        code = ("import os, sys, time\n"
                "if os.fork(): os._exit(0)\n"
                "os.setsid()\n"
                f"open({options['pidfile']!r}, 'w').write(str(os.getpid()))\n"
                "time.sleep(600)\n")
        subprocess.run([sys.executable, "-c", code], check=True)
        deadline = time.time() + 10
        while not os.path.exists(options["pidfile"]) and time.time() < deadline:
            time.sleep(0.05)
    elif kind == "raise":
        raise RuntimeError("fault plugin: deliberate failure")
    return kind


@hookimpl
def register_backends(register):
    register(BackendSpec("fault", engine=FaultEngine, defaults={"kind": "none", "at_step": 1},
                         description="test-only: a step that crashes, hangs, leaks or diverges on purpose"))
    register(BackendSpec("fault-dp", engine=RankFaultEngine, data_parallel=True,
                         defaults={"kind": "none", "at_step": 1, "rank": 1},
                         description="test-only: DDP whose rank R crashes, hangs or leaks on purpose"))
