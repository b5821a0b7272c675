"""``--cpu-memory``: what a CPU cell's memory peak counts, and evaluation copies that must not outlive it."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from conftest import TINY, ftbench, records, with_setting
from ftbench.harness.contract.config import CellSpec

GLIBC = platform.libc_ver()[0] == "glibc"

#: Frees one 16 MiB tensor (glibc then raises its mmap threshold above 8 MiB), allocates fifty
#: 8 MiB tensors, frees all but the last, and prints how much of them stayed resident (MiB).
RETAINED = textwrap.dedent("""
    import sys, torch
    from ftbench.harness.cell.hostalloc import apply_cpu_memory
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
    assert apply_cpu_memory(sys.argv[1]) is None
    big = torch.ones(4 << 20); del big
    base = rss()
    kept = [torch.ones(2 << 20) for _ in range(50)]
    del kept[:-1]
    print(rss() - base)
""")


def _retained_mib(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", RETAINED, mode], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="the resident/live difference is glibc's dynamic mmap threshold")
def test_live_mode_returns_freed_tensors_that_glibc_keeps_by_default():
    resident, live = _retained_mib("resident"), _retained_mib("live")
    # 49 freed 8 MiB tensors: glibc's defaults keep them resident, the live mode gives them back.
    assert resident > 200, resident
    assert live < 40, live


def test_live_cell_records_its_memory_kind_and_is_another_cell(tmp_path):
    out = tmp_path / "out"
    res = ftbench("run", "--task", "generation", "--backend", "eager", *with_setting(TINY, "--steps", 4),
                  "--cpu-memory", "live", "--out", out)
    assert res.returncode == 0, res.stdout + res.stderr
    (rec,) = records(out)
    assert rec["status"] == "ok" and rec["cpu_memory"] == "live" and rec["memory_kind"] == "cpu_peak_rss_live"
    assert rec["peak_memory_bytes"] > rec["rss_before_model_bytes"]
    # The default is left out of the id (existing result sets keep their ids); live is another cell.
    resident = CellSpec.from_dict({**rec["config"], "cpu_memory": "resident"})
    assert rec["cell_id"] != resident.cell_id
    assert "cpu_memory" not in resident.identity()
    assert rec["recipe_fingerprint"] == resident.fingerprint()  # same computation, measured differently


def test_bad_cpu_memory_in_a_grid_file_is_refused_before_any_cell(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("task: [generation]\nbackend: [eager]\nsettings: {cpu_memory: exact}\n")
    res = ftbench("run", "--grid", grid, "--out", tmp_path / "out")
    assert res.returncode == 2
    assert "cpu_memory='exact'" in res.stderr and "resident or live" in res.stderr
    assert not (tmp_path / "out" / "results.jsonl").exists()


def test_an_evaluation_copy_does_not_outlive_the_evaluation():
    """FSDP and ZeRO-3 evaluate a full copy built from a meta skeleton; filling the skeleton itself
    kept a whole model alive through the rest of training (+4 bytes per parameter in its peak)."""
    import torch

    from ftbench.plugins.data_parallel import materialize, meta_copy

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    skeleton = meta_copy(model)
    full = dict(model.named_parameters())
    copy = materialize(skeleton, torch.device("cpu"), full, {})
    assert all(p.is_meta for p in skeleton.parameters())
    assert not any(p.is_meta for p in copy.parameters())
    assert torch.equal(copy[0].weight, model[0].weight)
    again = materialize(skeleton, torch.device("cpu"), full, {})
    assert again is not copy
