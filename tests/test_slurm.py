"""``--launcher slurm`` against a real single-node Slurm cluster on this machine.

The cluster is started by ``.ci/start-slurm.sh`` (munged, slurmctld and
slurmd from Debian's packages).  Where it cannot start (not root, Slurm not
installed), these tests are skipped with the reason; nothing is faked.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, ftbench, records

#: Four tiny cells: three single-process, one data-parallel (one rank), each its own array task.
GRID = ["--task", "generation", "--task", "classification", "--backend", "eager", "--backend", "ddp",
        "--steps", "4", "--warmup", "1", "--batch-size", "4", "--seq-len", "16", "--eval-examples", "4"]


@pytest.fixture(scope="module")
def slurm():
    if shutil.which("sbatch") is None:
        pytest.skip("Slurm is not installed here (no sbatch on PATH); .ci/run installs it with "
                    "'apt-get install -y slurm-wlm munge'")
    proc = subprocess.run([str(ROOT / ".ci" / "start-slurm.sh")], capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        pytest.skip(f"the test Slurm cluster did not start: {proc.stderr.strip() or proc.stdout.strip()}")


def _array_ids(text: str) -> list[str]:
    m = re.search(r"as job array ([0-9, ]+)", text)
    return [x.strip() for x in m.group(1).split(",")] if m else []


def _squeue(array_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-r", "-j", array_id, "-o", "%i %T"], capture_output=True,
                          text=True).stdout


def test_a_grid_through_slurm_is_one_result_set_that_resumes(slurm, tmp_path):
    out = tmp_path / "out"
    proc = ftbench("run", "--launcher", "slurm", *GRID, "--out", out, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _array_ids(proc.stdout), proc.stdout
    recs = records(out)
    assert len(recs) == 4 and len({(r["cell_id"], r["repeat"]) for r in recs}) == 4
    for r in recs:
        assert r["status"] == "ok", (r["backend"], r["error"], r.get("stderr_tail"))
        assert r["slurm"]["state"] == "COMPLETED" and r["slurm"]["job_id"]
    ddp = [r for r in recs if r["backend"] == "ddp"]
    assert all(r["parity"]["status"] == "compared" and r["parity"]["passed"] for r in ddp), ddp

    rep = ftbench("report", out, "--quiet")
    assert rep.returncode == 0 and (out / "report").is_dir(), rep.stderr
    cmp = ftbench("compare", out, out)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr

    again = ftbench("run", "--launcher", "slurm", *GRID, "--out", out, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "4 cell(s) were already in the result set" in again.stdout
    assert not _array_ids(again.stdout), "a rerun submitted jobs for finished cells"
    assert len(records(out)) == 4


def _start_long_cell(tmp_path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    env.setdefault("FTBENCH_CACHE", str(ROOT / ".pytest-ftbench-cache"))
    cmd = [sys.executable, "-m", "ftbench.harness.cli", "run", "--launcher", "slurm", "--task", "generation",
           "--backend", "eager", "--steps", "100000", "--warmup", "1", "--batch-size", "4", "--seq-len", "16",
           "--eval-examples", "4", "--time-limit", "600", "--out", str(tmp_path / "out")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                            bufsize=1)
    seen = ""
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stdout.readline()
        seen += line
        ids = _array_ids(seen)
        if ids:
            return proc, ids[0]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"no job was submitted:\n{seen}")


def _wait_running(array_id: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if "RUNNING" in _squeue(array_id):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {array_id} never ran: {_squeue(array_id)}")


def test_scancel_of_a_job_becomes_a_cancelled_record(slurm, tmp_path):
    proc, array_id = _start_long_cell(tmp_path)
    try:
        _wait_running(array_id)
        time.sleep(3)
        subprocess.run(["scancel", array_id], check=True)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, rest
    (rec,) = records(tmp_path / "out")
    assert rec["status"] == "cancelled", rec
    assert f"Slurm job {array_id} was cancelled" in rec["error"]
    assert rec["slurm"]["state"] == "CANCELLED"


@pytest.mark.slow
def test_ctrl_c_cancels_every_job_it_submitted(slurm, tmp_path):
    proc, array_id = _start_long_cell(tmp_path)
    try:
        _wait_running(array_id)
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    deadline = time.time() + 30
    while _squeue(array_id).strip() and time.time() < deadline:
        time.sleep(0.5)
    assert not _squeue(array_id).strip(), f"jobs left in the queue: {_squeue(array_id)}"
    assert not (tmp_path / "out" / "results.jsonl").exists()  # the interrupted cell is not recorded


# ----------------------------------------------------------------- bad input (no cluster needed)

TINY_ONE = ["--task", "generation", "--backend", "eager", "--steps", "4", "--warmup", "1"]


def test_launcher_slurm_without_submitit_names_the_install(tmp_path):
    blocker = tmp_path / "block" / "submitit"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named submitit')\n")
    proc = ftbench("run", "--launcher", "slurm", *TINY_ONE, "--out", tmp_path / "out",
                   env={"PYTHONPATH": str(blocker.parent)})
    assert proc.returncode == 2, proc.stderr
    assert "needs the submitit package" in proc.stderr and "pip install 'ftbench[slurm]'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_launcher_slurm_without_sbatch_on_path(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    proc = ftbench("run", "--launcher", "slurm", *TINY_ONE, "--out", tmp_path / "out", env={"PATH": str(empty)})
    assert proc.returncode == 2, proc.stderr
    assert "needs Slurm's sbatch on PATH" in proc.stderr and "--launcher local" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(shutil.which("sbatch") is None, reason="needs sbatch to know its options")
def test_an_unknown_slurm_option_is_refused_with_the_closest_one(tmp_path):
    proc = ftbench("run", "--launcher", "slurm", *TINY_ONE, "--slurm-option", "acount=perf", "--out",
                   tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "unknown Slurm option 'acount'" in proc.stderr and "'account'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_slurm_flags_without_the_slurm_launcher_are_refused(tmp_path):
    proc = ftbench("run", *TINY_ONE, "--slurm-partition", "gpu", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "only apply with --launcher slurm" in proc.stderr, proc.stderr


def test_a_grid_file_can_choose_slurm_and_its_options_are_checked(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text("task: [generation]\nbackend: [eager]\nlauncher: slurm\nslurm: {partiton: gpu}\n")
    proc = ftbench("run", "--grid", grid, "--out", tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert "unknown key 'partiton' in slurm" in proc.stderr and "'partition'" in proc.stderr
