"""What a CPU cell's resident peak counts: glibc's defaults, or live tensors (``--cpu-memory``).

glibc serves allocations above its mmap threshold with ``mmap`` and gives
them back on free, but the first time such a block is freed it raises the
threshold to that block's size (up to 32 MiB).  From then on tensors of up
to that size come from the heap, and freed heap memory mostly stays
resident.  A backend that gathers and frees weights layer by layer (FSDP,
ZeRO-3) therefore keeps far more resident than it ever has alive, and the
CPU peak measures glibc's history as much as the backend (docs/memory.md:
at 57M parameters, 1.66x the live peak for FSDP, 1.24x for ZeRO-3 and
1.05-1.17x for the others).

* ``resident`` (default): glibc's defaults, which keep steps fast; the peak
  is what the operating system sees and a memory limit enforces.
* ``live``: the threshold is pinned at 128 KiB in every rank
  (``mallopt(M_MMAP_THRESHOLD)``, which also turns the raising off), so a
  freed tensor leaves the resident set at once and the peak follows the
  tensors alive, as CUDA's allocated peak does.  Every large allocation
  then maps fresh pages: about 0.6x the tokens/s (docs/memory.md), so use it for
  memory studies (and checking ``ftbench plan``), not for speed.

Example::

    note = apply_cpu_memory("live")   # None when applied, else why not
"""

from __future__ import annotations

import ctypes
import ctypes.util

MODES = ("resident", "live")
#: glibc's compiled-in default threshold, and its ``mallopt`` parameter number (malloc.h).
LIVE_MMAP_THRESHOLD = 128 * 1024
M_MMAP_THRESHOLD = -3
#: How a record names its memory figure in each mode.
MEMORY_KIND = {"resident": "cpu_peak_rss", "live": "cpu_peak_rss_live"}


def apply_cpu_memory(mode: str) -> str | None:
    """Put this process's allocator in ``mode``: None when done, else why it could not be."""
    if mode == "resident":
        return None
    if mode not in MODES:
        raise ValueError(f"unknown cpu_memory {mode!r}; choose {' or '.join(MODES)}")
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError) as e:
        return f"no glibc mallopt here ({e}): the peak is glibc-independent or allocator-defined"
    if mallopt(M_MMAP_THRESHOLD, LIVE_MMAP_THRESHOLD) != 1:
        return "mallopt(M_MMAP_THRESHOLD) was refused: the peak includes freed memory the allocator keeps"
    return None
