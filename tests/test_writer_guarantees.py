"""The result set's guarantees, held by every launcher: here, two nodes on loopback, and Slurm.

Each launcher writes through one :class:`ResultSetWriter`; the same tests run
against each of them for real (the nodes meet over TCP on 127.0.0.1, Slurm is
the single-node cluster of ``.ci/start-slurm.sh``, skipped with the reason
where it cannot start).  The in-process tests at the end check what needs no
launcher: confinement, record sinks, and that the protocol is written once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, assert_none_left, fill_up, records
from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.config import CellSpec
from ftbench.harness.results.recovery import EXIT_RESULTS_NOT_WRITTEN, ResultsNotWritten, keep_record
from ftbench.harness.results.store import read_records
from ftbench.harness.results.writer import OutputLock, ResultSetWriter, WriteOptions
from ftbench.harness.running.nodes import free_port
from results_factory import ENV, make_record

TESTS = Path(__file__).resolve().parent
#: Two tiny cells: one single-process, one data-parallel (spanning both nodes under the nodes launcher).
GRID = ["--task", "generation", "--backend", "eager", "--backend", "ddp", "--nproc", "1", "--steps", "4",
        "--warmup", "1", "--batch-size", "4", "--seq-len", "16", "--eval-examples", "4"]
ONE = ["--task", "generation", "--backend", "eager", "--steps", "4", "--warmup", "1", "--batch-size", "4",
       "--seq-len", "16", "--eval-examples", "4"]
FAULT_ENV = {"FTBENCH_PLUGINS_EXTRA": "fault_plugin",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


class Launcher:
    """Starts ``ftbench run ARGS --out OUT`` the way one launcher does; the process that writes comes first."""

    name = "local"

    def __init__(self, mark: str):
        self.mark = mark

    def env(self, extra: dict | None = None) -> dict:
        env = dict(os.environ, COLUMNS="200", FTBENCH_TEST_MARK=self.mark)
        env.setdefault("FTBENCH_CACHE", str(ROOT / ".pytest-ftbench-cache"))
        env.update(extra or {})
        return env

    def args(self, args, out) -> list[list[str]]:
        return [[*map(str, args), "--out", str(out)]]

    def start(self, args, out, extra_env=None) -> list[subprocess.Popen]:
        return [subprocess.Popen([sys.executable, "-m", "ftbench.harness.cli", "run", *a], cwd=ROOT,
                                 env=self.env(extra_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for a in self.args(args, out)]

    def finish(self, procs: list[subprocess.Popen], timeout: float = 900) -> Ran:
        try:
            out, err = procs[0].communicate(timeout=timeout)
            for p in procs[1:]:  # a follower ends with node 0, or waits for a node 0 that refused to start
                try:
                    p.communicate(timeout=1 if procs[0].returncode == 2 else 60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.communicate()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        return Ran(procs[0].returncode, out, err)

    def run(self, args, out, extra_env=None, timeout: float = 900) -> Ran:
        return self.finish(self.start(args, out, extra_env), timeout)


class TwoNodes(Launcher):
    """Node 0 writes ``OUT``; node 1 follows with an ``--out`` of its own that it must never write."""

    name = "nodes"

    def env(self, extra=None):
        return {**super().env(extra), "FTBENCH_RENDEZVOUS_TIMEOUT_S": "120"}

    def args(self, args, out):
        port = free_port()
        return [[*map(str, args), "--nnodes", "2", "--node-rank", str(rank), "--master-addr", "127.0.0.1",
                 "--master-port", str(port), "--out", str(out if rank == 0 else f"{out}-node1")]
                for rank in (0, 1)]


class Slurm(Launcher):
    name = "slurm"

    def args(self, args, out):
        return [["--launcher", "slurm", *map(str, args), "--out", str(out)]]


_slurm_state: dict = {}


def _slurm_up() -> str | None:
    """None when the test cluster answers, else why not (asked once per session)."""
    if "why" not in _slurm_state:
        why = None
        if shutil.which("sbatch") is None:
            why = ("Slurm is not installed here (no sbatch on PATH); .ci/run installs it with "
                   "'apt-get install -y slurm-wlm munge'")
        else:
            proc = subprocess.run([str(ROOT / ".ci" / "start-slurm.sh")], capture_output=True, text=True,
                                  timeout=180)
            if proc.returncode != 0:
                why = f"the test Slurm cluster did not start: {proc.stderr.strip() or proc.stdout.strip()}"
        _slurm_state["why"] = why
    return _slurm_state["why"]


def on_launchers(*slow: str):
    """Run the test once per launcher; those named in ``slow`` only under ``-m slow`` (the default suite
    stays short, and each guarantee is still held by some launcher there)."""
    return pytest.mark.parametrize("launcher", [pytest.param(name, marks=pytest.mark.slow) if name in slow else name
                                                for name in ("local", "nodes", "slurm")], indirect=True)


@pytest.fixture
def launcher(request):
    if request.param == "slurm" and _slurm_up():
        pytest.skip(_slurm_up())
    mark = uuid.uuid4().hex
    yield {"local": Launcher, "nodes": TwoNodes, "slurm": Slurm}[request.param](mark)
    assert_none_left(timeout=30, FTBENCH_TEST_MARK=mark)


def _says(ran: Ran, *phrases: str) -> None:
    text = " ".join((ran.stdout + ran.stderr).split())
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in the output:\n{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"


# ----------------------------------------------------------------- every launcher, for real


@on_launchers("nodes")
def test_records_carry_prediction_and_run_order_and_a_rerun_resumes(launcher, tmp_path, monkeypatch):
    out = tmp_path / "out"
    ran = launcher.run(GRID, out)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert json.loads((out / "environment.json").read_text())["python"]
    recs = records(out)
    assert sorted(r["backend"] for r in recs) == ["ddp", "eager"]
    for r in recs:
        assert r["status"] == "ok", (r["backend"], r["error"], r.get("stderr_tail"))
        assert isinstance(r["memory_predicted_bytes"], int) and r["memory_predicted_bytes"] > 0, r["backend"]
        assert r["run_order"]["order"] == "interleaved" and r["run_order"]["of"] == 2
    assert sorted(r["run_order"]["position"] for r in recs) == [1, 2]
    if launcher.name == "nodes":
        ddp = next(r for r in recs if r["backend"] == "ddp")
        assert (ddp["nnodes"], ddp["world_size"], ddp["micro_batch"]) == (2, 2, 2)
        assert not Path(f"{out}-node1").exists(), "a follower never writes a result set"

    # Leave it as a crash would: the second record was kept in a recovery set (a full disk), and
    # a writer killed mid-append left a torn last line.
    first, second = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text(first + '{"cell_id": "torn", "sta')
    monkeypatch.setenv("FTBENCH_CACHE", launcher.env()["FTBENCH_CACHE"])
    kept = keep_record(out, json.loads(second), ENV)
    assert kept is not None

    again = launcher.run(GRID, out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    _says(again, "put back 1 record(s) an earlier run kept", "results.jsonl line 2: unreadable record")
    assert again.stdout.count("already in the result set, skipped") == 2, again.stdout
    assert "submitted" not in again.stdout  # nothing ran again (no Slurm job either)
    assert (out / "results.jsonl").read_text() == first + '{"cell_id": "torn", "sta\n' + second
    rr = read_records(out)
    assert [r["backend"] for r in rr.records] == [json.loads(line)["backend"] for line in (first, second)]
    assert len(rr.problems) == 1 and not kept.exists()


@on_launchers("nodes", "slurm")
def test_fail_fast_stops_at_the_first_failed_cell(launcher, tmp_path):
    out = tmp_path / "out"
    args = ["--task", "generation", "--task", "classification", "--backend", "fault:kind=raise,at_step=0",
            *ONE[4:], "--fail-fast"]
    ran = launcher.run(args, out, FAULT_ENV)
    assert ran.returncode == 1, ran.stdout[-3000:] + ran.stderr[-3000:]
    (rec,) = records(out)
    assert rec["status"] == "error" and rec["run_order"]["position"] == 1, rec


@on_launchers()
def test_a_locked_result_set_is_refused(launcher, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with OutputLock(out):  # as a first run holds it
        ran = launcher.run(ONE, out, timeout=300)
    assert ran.returncode == 2, ran.stdout[-3000:] + ran.stderr[-3000:]
    _says(ran, "another 'ftbench run' is writing to", "different --out")
    assert not (out / "environment.json").exists() and not (out / "results.jsonl").exists()


@on_launchers()
def test_a_symlinked_results_file_is_refused_and_its_target_untouched(launcher, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    elsewhere = tmp_path / "elsewhere.jsonl"
    line = json.dumps(make_record()) + "\n"
    elsewhere.write_text(line)
    (out / "results.jsonl").symlink_to(elsewhere)
    ran = launcher.run(ONE, out, timeout=300)
    assert ran.returncode == 2, ran.stdout[-3000:] + ran.stderr[-3000:]
    _says(ran, f"{out / 'results.jsonl'} is a symbolic link (to {elsewhere})", "never follows a link out of it",
          "nothing was run or written")
    assert "Traceback" not in ran.stderr
    assert elsewhere.read_text() == line and not (out / "environment.json").exists()


@on_launchers("local", "nodes")  # local: also tests/test_full_disk.py
def test_a_full_disk_keeps_the_record_and_exits_3(launcher, small_fs, tmp_path):
    out = small_fs / "out"
    if launcher.name == "slurm":
        # The jobs' own files (submitit's pickles and logs) live on another file system, as a
        # cluster's scratch would; only the result set's file system fills up.
        out.mkdir()
        (tmp_path / "jobs").mkdir()
        (out / "slurm").symlink_to(tmp_path / "jobs")
    procs = launcher.start(ONE, out)
    try:
        deadline = time.time() + 300
        while not (out / "environment.json").exists():  # under the lock, before the first cell ends
            assert procs[0].poll() is None and time.time() < deadline, procs[0].communicate()
            time.sleep(0.05)
        fill_up(small_fs)
    finally:
        ran = launcher.finish(procs)
    assert ran.returncode == EXIT_RESULTS_NOT_WRITTEN, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "Traceback" not in ran.stderr
    _says(ran, "is full", "The grid stopped here")
    kept = Path(re.search(r"The record is safe in (\S+/results\.jsonl)\.", " ".join(ran.stderr.split())).group(1))
    assert not kept.is_relative_to(small_fs)
    (rec,) = read_records(kept.parent).records
    assert rec["status"] == "ok" and rec["task"] == "generation", rec
    assert rec["memory_predicted_bytes"] and rec["run_order"]["position"] == 1
    assert not (out / "results.jsonl").exists() or (out / "results.jsonl").read_bytes() == b""
    shutil.rmtree(kept.parent)


# ----------------------------------------------------------------- in process


def test_every_file_the_writer_writes_is_refused_as_a_symlink(tmp_path):
    for name in ("results.jsonl", "environment.json", ".ftbench.lock"):
        out = tmp_path / name.strip(".")
        out.mkdir()
        (out / name).symlink_to(tmp_path / "target")
        with pytest.raises(FtbenchError, match=re.escape(f"{out / name} is a symbolic link")):
            ResultSetWriter(out, ENV, [])
        assert not (tmp_path / "target").exists()


def test_a_link_swapped_in_mid_run_is_not_written_through_and_the_record_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("FTBENCH_CACHE", str(tmp_path / "cache"))
    spec = _spec()
    with ResultSetWriter(tmp_path / "out", ENV, [spec]) as writer:
        writer.open()
        (tmp_path / "out" / "results.jsonl").symlink_to(tmp_path / "target")  # after the check at the start
        with pytest.raises(ResultsNotWritten) as info:
            writer.write(1, spec, make_record())
    assert not (tmp_path / "target").exists()
    assert "became a symbolic link" in str(info.value) and info.value.kept.is_relative_to(tmp_path / "cache")


def test_record_sinks_see_each_durable_record_and_a_failing_one_is_reported_once(tmp_path):
    spec, seen, events = _spec(), [], []

    def count(record):
        seen.append((record["cell_id"], (tmp_path / "out" / "results.jsonl").read_text().count("\n")))

    def broken(record):
        raise RuntimeError("tracking server unreachable")

    options = WriteOptions(progress=lambda kind, *rest: events.append((kind, rest[-1])))
    with ResultSetWriter(tmp_path / "out", ENV, [spec, spec.with_(repeat=1)], options) as writer:
        writer.sinks += [broken, count]
        writer.open()
        for position, s in writer.cells:
            assert writer.write(position, s, make_record(repeat=s.repeat)) is False
    cid = make_record()["cell_id"]
    assert seen == [(cid, 1), (cid, 2)]  # after the write, every record, despite `broken`
    notes = [p for kind, p in events if kind == "note"]
    assert len(notes) == 1 and "record sink" in notes[0] and "tracking server unreachable" in notes[0]
    assert writer.summary.sink_failures == notes and len(read_records(tmp_path / "out").records) == 2


def test_the_result_set_protocol_is_written_once():
    """Only results/writer.py locks, resumes, restores, keeps records and writes environment.json."""
    harness = ROOT / "harness"
    protocol = re.compile(r"fcntl\.flock|restore_into\(|keep_record\(|finished_keys\(|append_record\("
                          r"|[\"']environment\.json[\"']|ResultsNotWritten\(")
    where = {}
    for path in sorted(harness.rglob("*.py")):
        rel = path.relative_to(harness).as_posix()
        code = "\n".join(line for line in path.read_text().splitlines()
                         if not line.lstrip().startswith(("#", "def ", "from ", "import ", "class ")))
        hits = len(protocol.findall(code))
        if hits:
            where[rel] = hits
    # where the pieces are defined, and the guard that refuses report outputs named like a set's files
    users = set(where) - {"results/store.py", "results/recovery.py", "analysis/outputs.py"}
    # `ftbench merge` builds a new set from others: appends and an environment, no lock, resume or cells
    assert users <= {"results/writer.py", "analysis/resultset.py"}, where
    assert "running/driver.py" not in where and "running/slurm.py" not in where


def _spec() -> CellSpec:
    return CellSpec(task="generation", backend="eager", model="tiny-gpt2")
