"""Clocks, step statistics and memory figures.

Throughput is the tokens of the measured steps divided by the summed time of
those same steps (never volume / mean step time, which inflates the figure
by the number of steps).
"""

from __future__ import annotations

import os
import statistics
import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so a clock read means what it says."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now() -> float:
    return time.perf_counter()


def step_stats(times: list[float]) -> dict:
    """Median and spread of per-step times (seconds)."""
    if not times:
        return {"median": None, "mean": None, "min": None, "max": None, "iqr": None, "stdev": None, "n": 0}
    q = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {
        "median": statistics.median(times),
        "mean": statistics.fmean(times),
        "min": min(times),
        "max": max(times),
        "iqr": q[2] - q[0],
        "stdev": statistics.stdev(times) if len(times) > 1 else 0.0,
        "n": len(times),
    }


def throughput(counts: list[dict], times: list[float], key: str) -> float | None:
    """Sum of ``counts[i][key]`` over the sum of ``times`` (same steps)."""
    total = sum(times)
    if not times or total <= 0:
        return None
    return sum(c[key] for c in counts) / total


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """Kernel-tracked peak resident set size (VmHWM) of one process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # noqa: BLE001 - non-Linux fallback only
        return None


def current_rss_bytes(pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


def memory_snapshot(device: torch.device) -> dict:
    """This rank's memory figures: CUDA peaks when on CUDA, always the host peak RSS."""
    snap = {"host_peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        snap["cuda_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        snap["cuda_peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    return snap
