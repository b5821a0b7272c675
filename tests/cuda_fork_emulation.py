"""Torch's real fork poisoning, emulated on a CPU build of torch.

On a CUDA build, ``torch.cuda.is_available()`` reaches ``device_count()``,
whose fallback past NVML is ``torch._C._cuda_getDeviceCount()``: CUDA's
``cudaGetDeviceCount``, which initialises the driver and makes every process
forked afterwards a "bad fork" (``torch.cuda._is_in_bad_fork()`` is true in
the child, and CUDA cannot be used there).  A CPU build returns from
``is_available()`` before that call (``_is_compiled()`` is false), so a test
on this machine would never see the poisoning.

:func:`install` makes this process behave like a CUDA build without NVML: the
device-count query marks the process (and writes a line to the file named by
``FTBENCH_EMULATED_CUDA_MARKS``), and a child forked after the mark is in a
bad fork.  The count is 0, so nothing tries to use a device.

``sitecustomize_text()`` is a ``sitecustomize.py`` that installs it in the fork
server only (``FTBENCH_EMULATE_CUDA_FORK=1``), and with
``FTBENCH_PLANT_CUDA_CALL=1`` also plants a ``torch.cuda.is_available()`` call
there, as a careless import in the server's preload would.
"""

from __future__ import annotations

import os
import threading

_state = {"marked": False, "bad_fork": False}


def _mark() -> int:
    if not _state["marked"]:
        _state["marked"] = True
        os.register_at_fork(after_in_child=lambda: _state.update(bad_fork=True))
    path = os.environ.get("FTBENCH_EMULATED_CUDA_MARKS")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {'server' if os.getpid() == _state.get('server_pid') else 'child'}\n")
    return 0


_inside = {"depth": 0}
_lock = threading.RLock()


def _as_cuda_build(fn):
    import torch.cuda

    def wrapped(*args, **kwargs):
        # torch.cuda._is_compiled() is hasattr(torch._C, "_cuda_getDeviceCount"): the query exists
        # only while a wrapped call runs (nested calls and other threads share it).
        with _lock:
            _inside["depth"] += 1
            torch._C._cuda_getDeviceCount = _mark
        try:
            return fn(*args, **kwargs)
        finally:
            with _lock:
                _inside["depth"] -= 1
                if _inside["depth"] == 0 and hasattr(torch._C, "_cuda_getDeviceCount"):
                    del torch._C._cuda_getDeviceCount

    return wrapped


def install(server: bool = False) -> None:
    import torch
    import torch.cuda

    if server:
        _state["server_pid"] = os.getpid()
    # The real is_available and device_count run, as on a CUDA build; only inside them does torch
    # believe it was compiled with CUDA (elsewhere, imports such as torch._dynamo's would reach for
    # CUDA ops that a CPU build lacks).
    originals = {name: getattr(torch.cuda, name) for name in ("is_available", "device_count", "_device_count_nvml")}
    for name in ("is_available", "device_count"):
        setattr(torch.cuda, name, _as_cuda_build(originals[name]))
    torch.cuda._device_count_nvml = lambda: -1  # no NVML: the count goes through the CUDA runtime
    # Only the process installed in is emulated: a forked child (a cell) is a CPU build again,
    # keeping just the bad-fork mark it inherited.
    os.register_at_fork(after_in_child=lambda: [setattr(torch.cuda, k, v) for k, v in originals.items()])
    torch.cuda._is_in_bad_fork = lambda: _state["bad_fork"]


SITECUSTOMIZE = '''\
import os, sys
if os.environ.get("FTBENCH_EMULATE_CUDA_FORK") and "multiprocessing.forkserver" in " ".join(getattr(sys, "orig_argv", [])):
    import cuda_fork_emulation
    cuda_fork_emulation.install(server=True)
    if os.environ.get("FTBENCH_PLANT_CUDA_CALL"):
        import torch
        torch.cuda.is_available()
'''
