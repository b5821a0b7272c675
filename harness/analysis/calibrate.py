"""Thresholds for ``compare`` measured on the machine itself: an A/A calibration.

Run the same grid twice in a row on the machine that will run the checks
(nothing changed in between), then::

    ftbench compare --calibrate A1 A2 -o thresholds.json
    ftbench compare BASE NEW --thresholds-from thresholds.json

Per figure (speed, peak memory, the primary metric) the A/A pair shows how
far the median of a cell moves by noise alone.  The threshold is the largest
such move over all cells times :data:`SAFETY`, and never below
:data:`FLOOR`.  The file keeps the machine it was measured on
(:func:`machine_view`); a comparison whose result sets come from another
machine refuses it, since another machine has another noise.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from pathlib import Path

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.analysis.resultset import ResultSet, environment_diff, load_result_set

KIND = "ftbench-compare-calibration"
VERSION = 1
#: Margin over the largest A/A move: one A/A pair is a small sample of the noise.
SAFETY = 1.5
#: Smallest threshold per figure, so a figure that did not move at all in the pair
#: (memory, a deterministic metric) still tolerates rounding.
FLOOR = {"speed": 0.02, "peak_memory_bytes": 0.01, "metric": 0.005, "time_to_target": 0.02}


def machine_view(env: dict) -> dict:
    """What identifies the machine (not the software under test) in a record's environment."""
    device = env.get("device") or {}
    return {"cpu": env.get("cpu"), "cpu_count": env.get("cpu_count"), "cpu_affinity": env.get("cpu_affinity"),
            "omp_num_threads": env.get("omp_num_threads"),
            "device": {k: device.get(k) for k in ("type", "name", "count") if k in device}}


def _machines(rs: ResultSet) -> list[dict]:
    seen = []
    for r in rs.records:
        m = machine_view(r.get("environment") or {})
        if m not in seen:
            seen.append(m)
    return seen


def _figure_key(figure: str) -> str:
    return figure if figure in FLOOR else "metric"


def calibrate(a1: str | os.PathLike, a2: str | os.PathLike) -> dict:
    """Per-figure noise thresholds from an A/A pair of result sets.

    Example: ``calibrate("runs/aa1", "runs/aa2")["thresholds"]`` ->
    ``{"speed": 0.21, "peak_memory_bytes": 0.01, "metric": 0.005}``.
    """
    from ftbench.harness.analysis.compare import compare_result_sets

    s1, s2 = load_result_set(a1), load_result_set(a2)
    m1, m2 = _machines(s1), _machines(s2)
    if len(m1) != 1 or m1 != m2:
        diff = environment_diff(m1[0], m2[0]) if m1 and m2 and m1 != m2 else ["a set mixes machines"]
        raise FtbenchError(f"an A/A calibration needs two result sets from one machine; {a1} and {a2} differ: "
                           f"{'; '.join(diff)}. Run the same grid twice in a row on the machine to calibrate")
    cmp = compare_result_sets(s1, s2)
    observed, worst = [], {k: 0.0 for k in FLOOR}
    for row in cmp.rows:
        if row.change is None or not math.isfinite(row.change):
            continue
        key = _figure_key(row.figure)
        if key not in worst or row.figure in ("status", "recipe"):
            continue
        worst[key] = max(worst[key], abs(row.change))
        observed.append({"cell": row.cell, "figure": key, "change": row.change, "interval": row.interval,
                         "n": [len(row.base), len(row.new)]})
    if not observed:
        raise FtbenchError(f"{a1} and {a2} have no successful cell in common to calibrate from; run the same grid "
                           "twice (with --repeat 3 or more) and calibrate on those two sets")
    thresholds = {k: max(FLOOR[k], math.ceil(SAFETY * v * 200) / 200) for k, v in worst.items()}
    return {"kind": KIND, "version": VERSION, "machine": m1[0], "hostname": platform.node(),
            "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(), "sets": [str(a1), str(a2)],
            "safety": SAFETY, "largest_aa_change": worst, "thresholds": thresholds, "observed": observed}


def write_calibration(path: str | os.PathLike, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def read_calibration(path: str | os.PathLike, sets: list[ResultSet]) -> dict:
    """The thresholds of a calibration file, after checking it fits the machine of every set.

    Example: ``read_calibration("thresholds.json", [base, new])`` -> ``{"speed": 0.21, ...}``.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise FtbenchError(f"cannot read the calibration file {path}: {e}; write one with "
                           "'ftbench compare --calibrate A1 A2 -o FILE'") from None
    if not isinstance(data, dict) or data.get("kind") != KIND or not isinstance(data.get("thresholds"), dict):
        raise FtbenchError(f"{path} is not a calibration file written by 'ftbench compare --calibrate A1 A2 -o FILE'")
    for rs in sets:
        for machine in _machines(rs):
            if machine != data.get("machine"):
                diff = "; ".join(environment_diff(data.get("machine") or {}, machine))
                raise FtbenchError(f"the calibration file {path} was measured on another machine than {rs.path} "
                                   f"({diff}); its noise thresholds do not apply there. Calibrate on this machine "
                                   "with 'ftbench compare --calibrate A1 A2 -o FILE', or drop --thresholds-from")
    return {k: float(v) for k, v in data["thresholds"].items() if k in FLOOR}
