"""How busy the machine was while a cell's steps ran, as the kernel reports it.

A speed figure means little without the load it was measured under: on a
shared runner other jobs take cores, and a slower cell may be a busier
machine rather than slower code.  Each rank takes a :class:`LoadProbe`
around its timed steps; :func:`combine` turns the ranks' readings into the
record's ``machine_load``:

- ``other_cpu_share``: CPU time the machine spent on processes other than
  the cell's own ranks, as a share of all its cores over the window (0 on an
  idle machine, 1 when every core was busy with other work);
- ``steal_share``: CPU time the hypervisor gave to other guests (the
  ``steal`` column of ``/proc/stat``), same unit;
- ``loadavg_1m``: the kernel's one-minute load average at the window's end
  (it counts the cell itself, and it lags);
- ``cpu_mhz``: the cores' mean current clock where ``cpufreq`` or
  ``/proc/cpuinfo`` says it.

Every figure is ``None`` where the system does not report it (no
``/proc/stat`` outside Linux).

Example::

    probe = LoadProbe.start()
    ...  # the timed steps
    reading = probe.stop()          # one rank's reading
    combine([reading_rank0, reading_rank1])["other_cpu_share"]   # 0.02
"""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass

PROC_STAT = "/proc/stat"
#: /proc/stat columns after "cpu": user nice system idle iowait irq softirq steal guest guest_nice
_IDLE, _IOWAIT, _STEAL = 3, 4, 7


def _cpu_ticks() -> list[int] | None:
    try:
        with open(PROC_STAT) as f:
            first = f.readline().split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    # guest time is already counted in user time: the first 8 columns are the whole
    return [int(x) for x in first[1:9]]


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def _cpu_mhz() -> float | None:
    freqs = []
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq"):
        try:
            with open(path) as f:
                freqs.append(int(f.read()) / 1000)
        except (OSError, ValueError):
            continue
    if not freqs:
        try:
            with open("/proc/cpuinfo") as f:
                freqs = [float(line.split(":")[1]) for line in f if line.lower().startswith("cpu mhz")]
        except (OSError, ValueError, IndexError):
            freqs = []
    return round(sum(freqs) / len(freqs), 1) if freqs else None


@dataclass
class LoadProbe:
    """One rank's view of the machine between :meth:`start` and :meth:`stop`."""

    t0: float
    ticks0: list[int] | None
    own0: float

    @classmethod
    def start(cls) -> "LoadProbe":
        return cls(time.perf_counter(), _cpu_ticks(), _own_cpu_s())

    def stop(self) -> dict:
        """This rank's reading: wall seconds, its own CPU seconds, the machine's busy and stolen seconds."""
        wall = time.perf_counter() - self.t0
        ticks, own = _cpu_ticks(), _own_cpu_s()
        reading = {"window_s": wall, "own_cpu_s": own - self.own0, "cpus": os.cpu_count() or 1,
                   "busy_cpu_s": None, "steal_cpu_s": None, "cpu_mhz": _cpu_mhz(), "loadavg_1m": None}
        if ticks is not None and self.ticks0 is not None:
            hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
            delta = [a - b for a, b in zip(ticks, self.ticks0)]
            idle = delta[_IDLE] + delta[_IOWAIT]
            reading["busy_cpu_s"] = (sum(delta) - idle - delta[_STEAL]) / hz
            reading["steal_cpu_s"] = delta[_STEAL] / hz
        if hasattr(os, "getloadavg"):
            reading["loadavg_1m"] = os.getloadavg()[0]
        return reading


def combine(readings: list[dict]) -> dict | None:
    """The cell's ``machine_load`` from its ranks' readings on one node (see the module docstring)."""
    readings = [r for r in readings if isinstance(r, dict) and r.get("window_s")]
    if not readings:
        return None
    main = readings[0]
    capacity = main["window_s"] * main["cpus"]
    out = {"window_s": round(main["window_s"], 4), "other_cpu_share": None, "steal_share": None,
           "loadavg_1m": main.get("loadavg_1m"), "cpu_mhz": main.get("cpu_mhz")}
    busy = [r["busy_cpu_s"] for r in readings if r.get("busy_cpu_s") is not None]
    if busy and capacity > 0:
        # every rank saw the whole machine over (nearly) the same window; the cell's own CPU is all ranks'
        own = sum(r.get("own_cpu_s") or 0.0 for r in readings)
        out["other_cpu_share"] = round(min(1.0, max(0.0, (max(busy) - own) / capacity)), 4)
        steal = [r["steal_cpu_s"] for r in readings if r.get("steal_cpu_s") is not None]
        out["steal_share"] = round(max(steal) / capacity, 4) if steal else None
    return out


def load_differs(base: dict | None, new: dict | None, factor: float = 2.0, floor: float = 0.05) -> str | None:
    """A sentence when one side ran under more than ``factor`` times the other's load, else None.

    Shares below ``floor`` count as ``floor``: 0.1% against 0.3% of other load
    is an idle machine twice, not a difference.
    """
    if not base or not new:
        return None
    b, n = base.get("other_cpu_share"), new.get("other_cpu_share")
    if b is None or n is None:
        return None
    hi, lo = max(b, n, floor), max(min(b, n), floor)
    if hi / lo <= factor:
        return None
    side = "new" if n > b else "base"
    return (f"the {side} side ran under {hi / lo:.1f}x the other's load (other processes' CPU share "
            f"{b:.0%} -> {n:.0%}), which can explain a speed change by itself")
