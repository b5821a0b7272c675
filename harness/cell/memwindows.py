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
* CUDA: the three figures of :data:`CUDA_FIGURES`.  Between the windows
  the caching allocator's free blocks are returned (``empty_cache``) before
  the peaks are reset, so the training window's reserved and driver-used
  figures do not still hold the blocks setup cached.  A library that resets
  CUDA's peak statistics itself during setup (DeepSpeed ZeRO-1/2 do, in
  their initialisation) would leave a setup peak that starts at its reset:
  such resets are caught, the peaks reached before each are kept, and the
  setup window names who reset (``reset_by``), so setup peaks stay
  comparable across backends.

Example::

    windows = MemoryWindows(device)
    ...  # build the model, set up the engine
    windows.end_setup()
    ...  # train
    memory = windows.end_training()   # {"setup": {...}, "train": {...}, ...}
"""

from __future__ import annotations

import sys

from ftbench.harness.cell.measure import peak_rss_bytes

CLEAR_REFS = "/proc/self/clear_refs"

#: What each CUDA figure of a window is (the record's ``memory_figures``).
CUDA_FIGURES = {
    "cuda_peak_allocated_bytes": "torch.cuda.max_memory_allocated: the most bytes live tensors held at once",
    "cuda_peak_reserved_bytes": "torch.cuda.max_memory_reserved: the most bytes the caching allocator held from "
                                "the driver (live tensors, cached free blocks, fragmentation)",
    "cuda_driver_used_bytes": "total - free from torch.cuda.mem_get_info at the window's end: everything on the "
                              "device (reserved memory, the CUDA context, NCCL and cuBLAS workspaces, other "
                              "processes)",
}

#: torch.cuda functions that reset the peak statistics (the latter two call the first).
_RESETS = ("reset_peak_memory_stats", "reset_max_memory_allocated", "reset_max_memory_cached")


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


def _caller() -> str:
    """The module outside torch and this one that called a reset."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "?")
        if not (name.startswith("torch") or name == __name__):
            return name
        frame = frame.f_back
    return "?"


class PeakResetSpy:
    """Catches whoever resets CUDA's peak statistics while installed, keeping the peaks reached
    before each reset (``read_peaks()`` -> {figure: bytes}) and the callers' module names.

    Example::

        spy = PeakResetSpy(lambda: {"cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated()})
        spy.install()
        ...   # a library calls torch.cuda.reset_peak_memory_stats()
        spy.uninstall()
        spy.callers, spy.peaks    # ["deepspeed.runtime.zero.stage_1_and_2"], {...}
    """

    def __init__(self, read_peaks):
        self.read_peaks = read_peaks
        self.callers: list[str] = []
        self.peaks: dict = {}
        self._saved: list = []
        self._inside = False

    def install(self) -> "PeakResetSpy":
        import torch.cuda
        import torch.cuda.memory

        for module in (torch.cuda, torch.cuda.memory):
            for name in _RESETS:
                original = getattr(module, name, None)
                if original is not None:
                    self._saved.append((module, name, original))
                    setattr(module, name, self._wrap(original))
        return self

    def uninstall(self) -> None:
        for module, name, original in reversed(self._saved):
            setattr(module, name, original)
        self._saved = []

    def _wrap(self, original):
        def reset(*args, **kwargs):
            if self._inside:  # reset_max_memory_allocated calls reset_peak_memory_stats: one reset
                return original(*args, **kwargs)
            self._inside = True
            try:
                self.callers.append(_caller())
                try:
                    for key, value in self.read_peaks().items():
                        self.peaks[key] = max(self.peaks.get(key, 0), value)
                except Exception:  # noqa: BLE001 - a figure we cannot read is not kept; the reset still runs
                    pass
                return original(*args, **kwargs)
            finally:
                self._inside = False

        return reset


class MemoryWindows:
    """Setup and training peaks of one rank (see the module docstring)."""

    def __init__(self, device):
        self.device = device
        self.setup: dict | None = None
        self.reset_note: str | None = None
        self.spy = PeakResetSpy(self._cuda_peaks).install()

    def _cuda_peaks(self) -> dict:
        if self.device.type != "cuda":
            return {}
        import torch

        return {"cuda_peak_allocated_bytes": int(torch.cuda.max_memory_allocated(self.device)),
                "cuda_peak_reserved_bytes": int(torch.cuda.max_memory_reserved(self.device))}

    def end_setup(self) -> None:
        self.spy.uninstall()
        self.setup = window_peaks(self.device)
        for key, value in self.spy.peaks.items():  # the peaks a library's own reset would have hidden
            self.setup[key] = max(self.setup.get(key) or 0, value)
        if self.spy.callers:
            self.setup["reset_by"] = sorted(set(self.spy.callers))
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # setup's cached blocks leave the training window's reserved figure
            torch.cuda.reset_peak_memory_stats(self.device)
        why = reset_host_peak()
        host = "clear_refs" if why is None else f"none: {why}; the training host peak includes setup"
        self.reset_note = (f"cuda empty_cache, reset_peak_memory_stats; host {host}" if self.device.type == "cuda"
                           else host)

    def end_training(self) -> dict:
        """This rank's ``memory`` entry: both windows, and the larger of each figure at top level."""
        train = window_peaks(self.device)
        setup = self.setup or {}
        out = {"setup": setup, "train": train, "reset": self.reset_note}
        for key in train:
            if key == "reset_by":
                continue
            values = [v for v in (setup.get(key), train.get(key)) if v is not None]
            out[key] = max(values) if values else None
        return out
