"""``ftbench history``: a series of result sets, its change points, the commits where
each began, the database behind it, and its HTML page in a real browser."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from ftbench.harness.cli import main
from ftbench.harness.analysis.history import build_history
from results_factory import ENV, make_record, read, write_set

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--task", "generation", "--backend", "eager", "--steps", "12", "--warmup", "2", "--seq-len", "32",
        "--batch-size", "8", "--eval-examples", "8"]
#: autograd anomaly detection in every cell process: 2.5-4x the CPU time of a tiny step, same result
#: (see tests/test_compare.py).
SLOWDOWN = "import torch\ntorch.autograd.set_detect_anomaly(True, check_nan=True)\n"


def history(*args):
    res = CliRunner(env={"COLUMNS": "250"}).invoke(main, ["history", *map(str, args)], catch_exceptions=False)
    return res.exit_code, res.output


def _commit(i: int) -> str:
    return f"{i:02d}" + "c0ffee" * 6 + "ab"


def _split(records, sizes, first_set, root, commit_from):
    """Cut one run's records into result sets of ``sizes`` repeats, each with its own commit."""
    out, k = [], 0
    for j, n in enumerate(sizes):
        recs = [dict(r, environment=dict(r["environment"], git_commit=_commit(commit_from + j)))
                for r in records[k:k + n]]
        out.append(write_set(root / f"set{first_set + j}", recs))
        k += n
    return out


@pytest.fixture(scope="module")
def real_series(tmp_path_factory):
    """Five result sets of one real tiny cell, two repeats each: the code 'got slower' at set 3.

    Two real runs (one normal with 4 repeats, one with autograd anomaly detection and 6 repeats)
    are cut into sets of 2 repeats, each given its own commit, so the series costs two process
    start-ups instead of five.  The measurements are the cells' own.
    """
    root = tmp_path_factory.mktemp("hist")
    hook = root / "slowdown"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(SLOWDOWN)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.setdefault("FTBENCH_CACHE", str(ROOT / ".pytest-ftbench-cache"))
    runs = []
    for name, repeat, slow in (("fast", 4, False), ("slow", 6, True)):
        e = dict(env, PYTHONPATH=os.pathsep.join(p for p in (str(hook), env.get("PYTHONPATH")) if p)) if slow else env
        cmd = [sys.executable, "-m", "ftbench.harness.cli", "run", *TINY, "--repeat", str(repeat), "--out",
               str(root / name)]
        proc = subprocess.run(cmd, env=e, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        runs.append(read(root / name))
    series = root / "series"
    _split(runs[0], [2, 2], 1, series, 1)
    _split(runs[1], [2, 2, 2], 3, series, 3)
    return series


def test_history_of_real_cells_names_the_slowed_set_and_no_other(real_series, tmp_path):
    code, out = history(real_series, "--out", tmp_path / "h")
    assert code == 1, out  # the newest point is slower than the level before set 3
    h = build_history([real_series])
    assert [s.name for s in h.included] == [f"set{i}" for i in range(1, 6)]
    events = [(s.figure, e) for s in h.series for e in s.events]
    assert events, out
    assert {e.set_name for _, e in events} == {"set3"}, events
    speed = next(e for f, e in events if f == "speed")
    assert speed.kind == "shift" and speed.verdict == "regression" and speed.change < -0.4
    assert (speed.commit_before, speed.commit_after) == (_commit(2), _commit(3))
    assert "set3 (commits 02c0ffee..03c0ffee)" in " ".join(out.split())
    # the database holds what the report shows
    db = sqlite3.connect(tmp_path / "h" / "history.sqlite")
    rows = db.execute("SELECT s.name, c.kind, c.verdict, c.newest_regression FROM changes c JOIN sets s "
                      "USING (set_id) WHERE c.figure = 'speed'").fetchall()
    assert rows == [("set3", "shift", "regression", 1)]
    medians = db.execute("SELECT median FROM series WHERE figure = 'speed' ORDER BY position").fetchall()
    assert len(medians) == 5 and medians[3][0] < 0.7 * medians[1][0]
    md = (tmp_path / "h" / "history.md").read_text()
    assert "REGRESSION" in md and "set3" in md
    assert (tmp_path / "h" / "plots" / "speed.png").stat().st_size > 10_000


# ------------------------------------------------------- synthetic sets


def _series(root, slow_at, n=6, env_of=None, cells_of=None):
    for i in range(n):
        env = dict((env_of or {}).get(i, ENV), git_commit=_commit(i))
        recs = []
        for t in (cells_of or {}).get(i, ("generation", "classification")):
            for r in range(3):
                rec = make_record(task=t, repeat=r, seed=i, jitter=0.1, env=env,
                                  step_s=0.02 * (2.0 if i in slow_at else 1.0))
                rec["started_at"] = f"2025-01-{i + 1:02d}T00:00:{r:02d}+00:00"
                recs.append(rec)
        write_set(root / f"s{i}", recs)
    return root


def test_one_slowed_set_between_normal_ones_is_a_transient_at_that_set(tmp_path):
    root = _series(tmp_path / "sets", slow_at={3})
    code, out = history(root, "--out", tmp_path / "h")
    assert code == 0, out  # the newest point is back on its level
    h = build_history([root])
    events = [e for s in h.series for e in s.events]
    assert events and {(e.set_name, e.kind) for e in events} == {("s3", "transient")}, events
    # nothing moved in a flat series
    flat = build_history([_series(tmp_path / "flat", slow_at=set())])
    assert not [e for s in flat.series for e in s.events]


def test_sets_of_other_machines_and_grids_are_named_and_the_rest_still_shown(tmp_path):
    other = dict(ENV, cpu="Other CPU")
    root = _series(tmp_path / "sets", slow_at={4, 5}, env_of={2: other},
                   cells_of={1: ("generation",)})
    code, out = history(root, "--out", tmp_path / "h")
    flat = " ".join(out.split())
    assert "s2 was measured on another machine (cpu 'Test CPU' -> 'Other CPU')" in flat, out
    assert "s1 has no record of 1 of the 2 cells" in flat and "the grids differ" in flat, out
    assert code == 1, out
    h = build_history([root])
    assert "s2" not in [s.name for s in h.included]
    speed = {s.task: s for s in h.series if s.figure == "speed"}
    assert len(speed["generation"].points) == 5 and len(speed["classification"].points) == 4
    assert all([e.set_name for e in s.events] == ["s4"] for s in speed.values())
    # a calibration of the main machine applies to the sets of that machine; one of another is refused
    res = CliRunner().invoke(main, ["compare", "--calibrate", str(root / "s0"), str(root / "s3"), "-o",
                                    str(tmp_path / "cal.json")])
    assert res.exit_code == 0, res.output
    code, out = history(root, "--out", tmp_path / "h2", "--thresholds-from", tmp_path / "cal.json")
    assert code == 1 and "s4" in out, out
    res = CliRunner().invoke(main, ["compare", "--calibrate", str(root / "s2"), str(root / "s2"), "-o",
                                    str(tmp_path / "other.json")])
    assert res.exit_code == 0, res.output
    code, out = history(root, "--out", tmp_path / "h3", "--thresholds-from", tmp_path / "other.json")
    assert code == 2 and "another machine" in out, out


def test_history_bad_input(tmp_path):
    code, out = history(tmp_path / "missing")
    assert code == 2 and "neither a result set" in out
    (tmp_path / "empty").mkdir()
    code, out = history(tmp_path / "empty")
    assert code == 2 and "no result set under" in out
    one = _series(tmp_path / "one", slow_at=set(), n=1)
    code, out = history(one)
    assert code == 2 and "at least two result sets" in out


# ---------------------------------------------------------- the browser


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_history_page_renders_in_headless_chromium(tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run tries it)")
    root = _series(tmp_path / "sets", slow_at={3, 4, 5})
    code, _ = history(root, "--out", tmp_path / "h", "--quiet")
    assert code == 1
    page = (tmp_path / "h" / "history.html").resolve()
    shot = tmp_path / "shot.png"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--no-first-run", "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'prof'}",
           "--window-size=1400,1800", "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    assert shot.stat().st_size > 20_000  # a page with tables and plots, not a blank or error page
    console_errors = [line for line in proc.stderr.splitlines() if "CONSOLE" in line and "ERROR" in line.upper()]
    assert not console_errors, console_errors
    keep = os.environ.get("FTBENCH_SCREENSHOT_DIR")
    if keep:
        shutil.copy(shot, Path(keep) / "history-chromium.png")
