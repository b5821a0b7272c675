"""``ftbench compare --calibrate A1 A2 -o FILE``: thresholds from an A/A pair run on the machine itself.

The file's format, and its use by ``compare``, are in
:mod:`ftbench.harness.analysis.calibration`.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform

from ftbench.harness.analysis.calibration import FLOOR, KIND, SAFETY, VERSION, figure_key, machines
from ftbench.harness.analysis.compare import compare_result_sets
from ftbench.harness.analysis.resultset import environment_diff, load_result_set
from ftbench.harness.contract.api import FtbenchError


def calibrate(a1: str | os.PathLike, a2: str | os.PathLike) -> dict:
    """Per-figure noise thresholds from an A/A pair of result sets.

    Example: ``calibrate("runs/aa1", "runs/aa2")["thresholds"]`` ->
    ``{"speed": 0.21, "peak_memory_bytes": 0.01, "metric": 0.005}``.
    """
    s1, s2 = load_result_set(a1), load_result_set(a2)
    m1, m2 = machines(s1), machines(s2)
    if len(m1) != 1 or m1 != m2:
        diff = environment_diff(m1[0], m2[0]) if m1 and m2 and m1 != m2 else ["a set mixes machines"]
        raise FtbenchError(f"an A/A calibration needs two result sets from one machine; {a1} and {a2} differ: "
                           f"{'; '.join(diff)}. Run the same grid twice in a row on the machine to calibrate")
    cmp = compare_result_sets(s1, s2)
    observed, worst = [], {k: 0.0 for k in FLOOR}
    for row in cmp.rows:
        if row.change is None or not math.isfinite(row.change):
            continue
        key = figure_key(row.figure)
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
