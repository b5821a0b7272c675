"""The machine's load over a cell's timed steps: measured, recorded, and named by compare."""

from __future__ import annotations

import os
import time

import pytest

from ftbench.harness.analysis.compare import compare_sets
from ftbench.harness.cell.machineload import LoadProbe, combine, load_differs

from results_factory import grid_records, modified, write_set

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux's /proc/stat")


def _spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def test_a_reading_counts_this_process_and_the_machine():
    probe = LoadProbe.start()
    _spin(0.4)
    r = probe.stop()
    # this process's CPU time is at most its wall time (one thread), and the machine was at least that busy
    assert 0 < r["own_cpu_s"] <= r["window_s"] * 1.05 + 0.02
    assert r["busy_cpu_s"] >= r["own_cpu_s"] * 0.9 - 0.02
    assert r["loadavg_1m"] is not None and r["steal_cpu_s"] >= 0


def test_combine_takes_the_cells_ranks_out_of_the_machines_busy_time():
    # 2 cores for 1 s: the machine was busy 1.5 core-seconds, the cell's two ranks used 0.5 each
    ranks = [{"window_s": 1.0, "cpus": 2, "own_cpu_s": 0.5, "busy_cpu_s": 1.5, "steal_cpu_s": 0.1,
              "loadavg_1m": 1.2, "cpu_mhz": 2000.0},
             {"window_s": 1.0, "cpus": 2, "own_cpu_s": 0.5, "busy_cpu_s": 1.45, "steal_cpu_s": 0.1}]
    load = combine(ranks)
    assert load["other_cpu_share"] == pytest.approx(0.25) and load["steal_share"] == pytest.approx(0.05)
    assert load["loadavg_1m"] == 1.2 and load["cpu_mhz"] == 2000.0
    assert combine([]) is None and combine([None]) is None
    # no /proc/stat: the shares are unknown, not zero
    assert combine([{**ranks[0], "busy_cpu_s": None, "steal_cpu_s": None}])["other_cpu_share"] is None


def test_load_differs_names_only_large_differences():
    assert load_differs({"other_cpu_share": 0.01}, {"other_cpu_share": 0.04}) is None  # both idle (floor 5%)
    assert load_differs({"other_cpu_share": 0.30}, {"other_cpu_share": 0.50}) is None
    note = load_differs({"other_cpu_share": 0.02}, {"other_cpu_share": 0.60})
    assert "new side ran under 12.0x" in note
    assert load_differs(None, {"other_cpu_share": 0.6}) is None


def test_compare_names_a_load_difference_beside_a_speed_change(tmp_path):
    base = grid_records(tasks=("generation",), backends=("eager",), repeats=3)
    base = modified(base, machine_load={"other_cpu_share": 0.01})
    new = modified(base, tokens_per_s=lambda r: r["tokens_per_s"] * 0.5, machine_load={"other_cpu_share": 0.7})
    cmp = compare_sets(write_set(tmp_path / "b", base), write_set(tmp_path / "n", new))
    speed = next(r for r in cmp.rows if r.figure == "speed")
    assert speed.verdict == "regression" and "other's load" in speed.evidence
    assert any("load difference" in w and "ftbench ab" in w for w in cmp.warnings)
    # the same change under the same load carries no such note
    same = modified(new, machine_load={"other_cpu_share": 0.01})
    cmp = compare_sets(write_set(tmp_path / "b2", base), write_set(tmp_path / "n2", same))
    speed = next(r for r in cmp.rows if r.figure == "speed")
    assert speed.verdict == "regression" and "load" not in speed.evidence
