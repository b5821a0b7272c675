"""The calibration file: noise thresholds for ``compare`` measured on the machine itself (an A/A pair).

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

import json
import os
from pathlib import Path

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.analysis.resultset import ResultSet, environment_diff

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


def machines(rs: ResultSet) -> list[dict]:
    seen = []
    for r in rs.records:
        m = machine_view(r.get("environment") or {})
        if m not in seen:
            seen.append(m)
    return seen


def figure_key(figure: str) -> str:
    return figure if figure in FLOOR else "metric"


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
        for machine in machines(rs):
            if machine != data.get("machine"):
                diff = "; ".join(environment_diff(data.get("machine") or {}, machine))
                raise FtbenchError(f"the calibration file {path} was measured on another machine than {rs.path} "
                                   f"({diff}); its noise thresholds do not apply there. Calibrate on this machine "
                                   "with 'ftbench compare --calibrate A1 A2 -o FILE', or drop --thresholds-from")
    return {k: float(v) for k, v in data["thresholds"].items() if k in FLOOR}
