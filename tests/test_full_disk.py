"""A full disk, a vanished or read-only --out: the finished record is kept, the grid stops cleanly.

The end-to-end test mounts a real size-limited tmpfs (root only; skipped with
the reason otherwise), lets the run start, fills the file system while the
first cell trains, and checks what the user sees and gets back.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ftbench.harness.results.recovery import (EXIT_RESULTS_NOT_WRITTEN, ResultsNotWritten, check_free_space,
                                              keep_record, restore_into)
from ftbench.harness.results.store import append_record, read_records
from ftbench.harness.cell.reaper import DRIVER_PID_ENV

from conftest import ROOT, fill_up, ftbench, records

CELLS = ["--task", "generation", "--task", "classification", "--backend", "eager"]
TINY = ["--steps", "4", "--warmup", "1", "--seq-len", "32", "--batch-size", "4", "--eval-examples", "8"]


def _processes_of(driver_pid: int) -> list[psutil.Process]:
    mine = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(DRIVER_PID_ENV) == str(driver_pid) and p.status() != psutil.STATUS_ZOMBIE:
                mine.append(p)
        except psutil.Error:
            continue
    return mine


def test_full_disk_keeps_the_record_stops_cleanly_and_resumes_elsewhere(small_fs, tmp_path):
    out = small_fs / "out"
    env = dict(os.environ)
    env.setdefault("FTBENCH_CACHE", str(ROOT / ".pytest-ftbench-cache"))
    run = subprocess.Popen([sys.executable, "-m", "ftbench.harness.cli", "run", *CELLS, *TINY, "--out", str(out)],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "environment.json").exists():  # preflight passed, the first cell is about to train
        assert run.poll() is None and time.time() < deadline, run.stdout.read()
        time.sleep(0.05)
    fill_up(small_fs)
    output, _ = run.communicate(timeout=600)

    assert run.returncode == EXIT_RESULTS_NOT_WRITTEN, output
    assert "Traceback" not in output
    assert "is full" in output and "The grid stopped here" in output
    kept = Path(re.search(r"The record is safe in (\S+/results\.jsonl)\.", output).group(1))
    assert not kept.is_relative_to(small_fs)
    [rec] = read_records(kept.parent).records
    assert rec["status"] == "ok" and rec["task"] == "generation"
    # no half-written line was left behind, and nothing of the run is still alive
    assert not (out / "results.jsonl").exists() or (out / "results.jsonl").read_bytes() == b""
    time.sleep(1)
    assert _processes_of(run.pid) == []

    roomy = tmp_path / "roomy"
    ftbench("merge", roomy, out, kept.parent, check=True)
    again = ftbench("run", *CELLS, *TINY, "--out", roomy, check=True)
    assert again.stdout.count("already in the result set, skipped") == 1, again.stdout
    recs = records(roomy)
    assert [r["task"] for r in recs] == ["generation", "classification"]
    assert recs[0] == rec  # the recovered record itself, not a rerun


def test_a_vanished_out_keeps_the_record_and_the_same_out_takes_it_back(tmp_path, monkeypatch):
    monkeypatch.setenv("FTBENCH_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    out.mkdir()
    record = {"cell_id": "abc", "status": "ok", "config": {"repeat": 0}}
    out.rmdir()  # unmounted or deleted while the cell ran
    with pytest.raises(OSError) as info:
        append_record(out, record)
    kept = keep_record(out, record, {"host": "x"})
    assert kept is not None and kept.is_relative_to(tmp_path / "cache")
    msg = str(ResultsNotWritten(out, info.value, kept, "abc"))
    assert "no longer exists" in msg and str(kept / "results.jsonl") in msg and "ftbench merge" in msg

    out.mkdir()
    append_record(out, {"cell_id": "other", "status": "ok", "config": {"repeat": 0}})
    assert restore_into(out)[0] == 1
    assert [r["cell_id"] for r in read_records(out).records] == ["other", "abc"]
    assert not kept.exists()  # put back once, never twice
    assert restore_into(out)[0] == 0


def test_read_only_out_names_the_cause():
    msg = str(ResultsNotWritten(Path("/mnt/ro"), OSError(errno.EROFS, "Read-only file system"), None, "c1"))
    assert "read-only" in msg and "printed on stderr" in msg


def test_preflight_refuses_an_out_without_room(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(mnt)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        res = ftbench("run", *CELLS, *TINY, "--out", mnt / "out")
        assert res.returncode == 2, res.stdout + res.stderr
        assert "KiB free" in res.stderr and "for their records" in res.stderr
        assert not (mnt / "out").exists()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_free_space_estimate_grows_with_the_grid(tmp_path):
    class Short:
        class recipe:
            steps = 50

    class Endless:
        class recipe:
            steps = 10**15  # per-step figures of a run this long fill any disk

    check_free_space(tmp_path, [Short()] * 3)  # a normal disk has room
    with pytest.raises(Exception, match="need about"):
        check_free_space(tmp_path, [Endless()] * 3)
