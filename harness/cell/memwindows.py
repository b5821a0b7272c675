"""Two memory windows per rank: setup (process start to engine ready, then the
quality-before evaluation of a checkpoint) and training.

Every backend is measured the same way: the peaks of the setup window are
read once the engine is set up, then reset, so the training window's peak
covers the timed steps only.  Without the reset a backend that loads or
moves a whole model during setup (a checkpoint's load transient, FSDP or
ZeRO-3 before sharding) would carry that transient into its training peak,
while DeepSpeed ZeRO-1/2, which reset CUDA's peak statistics inside their
own initialisation, would not.  The quality-before evaluation belongs to
setup for the same reason: FSDP and ZeRO-3 evaluate a full copy of the
model.  Evaluations during training (``--eval-every``, a target) stay in
the training window: the run needs that memory while it trains.

* CPU: the kernel's peak resident set (VmHWM), reset by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux >= 4.0).  Where that write fails the
  training window cannot be separated: ``reset`` says so, and the training
  peak then includes setup.
* CUDA: ``max_memory_allocated`` and ``max_memory_reserved`` (reset with
  ``reset_peak_memory_stats``), plus the device memory in use according to
  the driver (``mem_get_info``; it includes the CUDA context, NCCL buffers
  and other processes on the device), read at the end of each window.

Example::

    windows = MemoryWindows(device)
    ...  # build the model, set up the engine
    windows.end_setup()
    ...  # train
    memory = windows.end_training()   # {"setup": {...}, "train": {...}, ...}
"""

from __future__ import annotations

from ftbench.harness.cell.measure import peak_rss_bytes

CLEAR_REFS = "/proc/self/clear_refs"


def reset_host_peak() -> str | None:
    """Reset this process's VmHWM to its current RSS; None when done, else why not."""
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")
    except OSError as e:
        return f"{CLEAR_REFS} not writable ({e.strerror or e})"
    return None


def window_peaks(device) -> dict:
    """The peaks of the current window on this rank (bytes)."""
    out = {"host_peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        import torch

        out["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["cuda_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        free, total = torch.cuda.mem_get_info(device)
        out["cuda_driver_used_bytes"] = int(total - free)
    return out


def headline(peaks: dict, device_type: str) -> int | None:
    """The one figure a window is compared by: CUDA allocated, else the host peak RSS."""
    return peaks.get("cuda_peak_allocated_bytes") if device_type == "cuda" else peaks.get("host_peak_rss_bytes")


class MemoryWindows:
    """Setup and training peaks of one rank (see the module docstring)."""

    def __init__(self, device):
        self.device = device
        self.setup: dict | None = None
        self.reset_note: str | None = None

    def end_setup(self) -> None:
        self.setup = window_peaks(self.device)
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        why = reset_host_peak()
        host = "clear_refs" if why is None else f"none: {why}; the training host peak includes setup"
        self.reset_note = f"cuda reset_peak_memory_stats; host {host}" if self.device.type == "cuda" else host

    def end_training(self) -> dict:
        """This rank's ``memory`` entry: both windows, and the larger of each figure at top level."""
        train = window_peaks(self.device)
        setup = self.setup or {}
        out = {"setup": setup, "train": train, "reset": self.reset_note}
        for key in train:
            values = [v for v in (setup.get(key), train.get(key)) if v is not None]
            out[key] = max(values) if values else None
        return out
