"""Faults, interruption and durable results: a crash, a kill or a torn file
costs only the cell it touched.

Faulty cells come from ``tests/fault_plugin.py`` (loaded through
``FTBENCH_PLUGINS_EXTRA``); every signal is sent to a real process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from ftbench.harness.contract.schema import always_present
from ftbench.harness.results.store import append_record, finished_keys, read_records

from conftest import ROOT, assert_none_left, ftbench, records, with_setting

TESTS = Path(__file__).resolve().parent
TINY = ["--steps", "6", "--warmup", "1", "--seq-len", "32", "--batch-size", "4", "--eval-examples", "8"]
FAULT_ENV = {"FTBENCH_PLUGINS_EXTRA": "fault_plugin",
             "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
MEMORY_LIMIT_MB = 1500


def _env():
    env = dict(os.environ)
    env.setdefault("FTBENCH_CACHE", str(ROOT / ".pytest-ftbench-cache"))
    env.update(FAULT_ENV)
    return env


def _start(args, **kw):
    """``ftbench ARGS`` as a real background process in its own session (like a shell job).

    SIGINT is reset to its default in the child: a test run started in the
    background of a non-interactive shell inherits SIGINT *ignored*, which
    would hide Ctrl-C from ftbench (Python keeps an inherited SIG_IGN).
    """
    return subprocess.Popen([sys.executable, "-m", "ftbench.harness.cli", *map(str, args)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_default_sigint, **kw)


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(pred, timeout, what, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"ftbench exited early ({proc.returncode}) while waiting for {what}:\n"
                                 + proc.stdout.read())
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _n_lines(out: Path) -> int:
    path = out / "results.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _cell_started(driver_pid: int) -> bool:
    # A cell is forked from the fork server (a grandchild) or exec'd as ftbench.harness.cell.worker.
    for p in _descendants(driver_pid):
        try:
            if p.ppid() != driver_pid or "ftbench.harness.cell.worker" in " ".join(p.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def _assert_all_gone(procs, timeout=15):
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, f"processes survived: {alive}"


# --------------------------------------------------------- crash isolation


FAULTS = ["segv", "kill", "memhog", "memerror", "raise", "nan", "orphan"]


@pytest.fixture(scope="module")
def fault_grid(tmp_path_factory):
    """One grid in which every cell but the last misbehaves; the grid must go on."""
    tmp = tmp_path_factory.mktemp("faults")
    out, pidfile = tmp / "out", tmp / "orphan.pid"
    backends = []
    for kind in FAULTS:
        opts = f"kind={kind},at_step={3 if kind == 'nan' else 0}"
        if kind == "orphan":
            opts += f",pidfile={pidfile}"
        backends += ["--backend", f"fault:{opts}"]
    proc = ftbench("run", "--task", "generation", *backends, *TINY, "--memory-limit-mb", MEMORY_LIMIT_MB,
                   "--time-limit", 300, "--out", out, env=FAULT_ENV)
    yield proc, out, {r["backend"].split("kind=")[1].split(",")[0]: r for r in records(out)}, pidfile
    if pidfile.exists():  # never leave the sleeper behind, even when a test fails
        try:
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_fault_grid_runs_every_cell_and_keeps_every_record(fault_grid):
    proc, out, by_kind, _ = fault_grid
    assert proc.returncode == 0, proc.stdout + proc.stderr  # failures are results, not a failed run
    assert sorted(by_kind) == sorted(FAULTS)
    rr = read_records(out)
    assert not rr.problems and len(rr.records) == len(FAULTS)
    for rec in rr.records:
        assert not [k for k in always_present() if k not in rec]


def test_segfault_is_an_error_with_the_signal_and_frame(fault_grid):
    rec = fault_grid[2]["segv"]
    assert rec["status"] == "error"
    assert "died from signal SIGSEGV" in rec["error"]
    assert "Segmentation fault at File" in rec["error"]  # the innermost Python frame
    assert "fault_plugin.py" in rec["stderr_tail"]  # and the whole stack is kept


def test_sigkill_is_an_error_naming_the_signal(fault_grid):
    rec = fault_grid[2]["kill"]
    assert rec["status"] == "error"
    assert "died from signal SIGKILL" in rec["error"]


def test_host_memory_limit_is_oom(fault_grid):
    rec = fault_grid[2]["memhog"]
    assert rec["status"] == "oom"
    assert f"host memory limit of {MEMORY_LIMIT_MB} MB" in rec["error"]
    assert rec["memory_tree_peak_bytes"] > MEMORY_LIMIT_MB * 2**20


def test_memory_error_is_oom(fault_grid):
    rec = fault_grid[2]["memerror"]
    assert rec["status"] == "oom"
    assert rec["error"].startswith("MemoryError") and "shrink --batch-size" in rec["error"]


def test_exception_is_an_error_with_traceback(fault_grid):
    rec = fault_grid[2]["raise"]
    assert rec["status"] == "error"
    assert "RuntimeError: fault plugin: deliberate failure" in rec["error"]
    assert "fault_plugin.py" in rec["traceback"]


def test_divergence_is_recorded_at_its_step(fault_grid):
    rec = fault_grid[2]["nan"]
    assert rec["status"] == "diverged"
    assert rec["diverged_at_step"] == 3 and "step 3" in rec["error"]
    assert len(rec["train_loss"]) == 4 and rec["train_loss"][3] == "nan"
    assert all(isinstance(x, float) for x in rec["train_loss"][:3])


def test_leftover_process_is_killed_and_named(fault_grid):
    _, _, by_kind, pidfile = fault_grid
    rec = by_kind["orphan"]
    pid = int(pidfile.read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # The cell itself finished: its measurements stand, with a warning naming the straggler.
    assert rec["status"] == "ok" and rec["error"] is None
    assert [p["pid"] for p in rec["leftover_processes"]] == [pid]
    assert f"pid {pid}" in rec["warnings"][0]


def test_hang_is_a_timeout_and_fail_fast_stops_the_grid(tmp_path):
    out = tmp_path / "out"
    proc = ftbench("run", "--task", "generation", "--backend", "fault:kind=hang,at_step=0",
                   "--backend", "fault:kind=none", *TINY, "--time-limit", 4, "--fail-fast", "--out", out,
                   env=FAULT_ENV)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    recs = records(out)
    assert len(recs) == 1  # the second cell never ran
    assert recs[0]["status"] == "timeout"
    assert "time limit of 4 s" in recs[0]["error"]


# ------------------------------------------------------------ interruption


def test_ctrl_c_keeps_finished_records_and_resumes(tmp_path):
    out = tmp_path / "out"
    # Two real cells; the interrupt lands while the second runs. Forked cells of
    # TINY's 12 steps finish in a fraction of a second, too fast to interrupt, so
    # these train long enough (a few seconds) for the signal to land mid-cell.
    args = ["run", "--task", "generation", "--backend", "eager", "--model", "tiny-gpt2", "--model", "tiny-llama",
            *with_setting(TINY, "--steps", 300), "--out", out]
    proc = _start(args)
    try:
        _wait_for(lambda: _n_lines(out) >= 1, 180, "the first record", proc)
        first = (out / "results.jsonl").read_bytes()
        procs = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole job
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, text
    flat = " ".join(text.split())
    assert "interrupted" in flat and f"--out {out}" in flat and "Resume" in flat
    assert (out / "results.jsonl").read_bytes() == first  # finished record intact, no partial one
    assert read_records(out).records[0]["status"] == "ok"
    _assert_all_gone(procs)

    # Even a torn line (as a SIGKILL mid-write could leave) does not stop the resume: it is named, then skipped.
    with open(out / "results.jsonl", "ab") as f:
        f.write(b'{"cell_id": "torn", "sta')
    again = ftbench(*args, env=FAULT_ENV)
    assert again.returncode == 0, again.stdout + again.stderr
    flat = " ".join(again.stdout.split())
    assert "already in the result set" in flat and "results.jsonl line 2" in flat
    assert (out / "results.jsonl").read_bytes().startswith(first)
    rr = read_records(out)
    assert [r["model"] for r in rr.records] == ["tiny-gpt2", "tiny-llama"]
    assert all(r["status"] == "ok" for r in rr.records) and len(rr.problems) == 1


def test_locked_out_refuses_a_second_run_and_sigterm_stops_the_first(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    append_record(out, {"cell_id": "earlier", "status": "ok", "config": {"repeat": 0}})
    before = (out / "results.jsonl").read_bytes()
    first = _start(["run", "--task", "generation", "--backend", "fault:kind=hang,at_step=0", *TINY, "--out", out])
    try:
        # environment.json is written under the lock, so once it exists the lock is held.
        _wait_for(lambda: (out / "environment.json").exists(), 120, "the first run to take the lock", first)
        second = ftbench("run", "--task", "generation", "--backend", "eager", *TINY, "--out", out, env=FAULT_ENV)
        assert second.returncode == 2
        msg = " ".join(second.stderr.split())
        assert "another 'ftbench run' is writing to" in msg and "different --out" in msg
        assert (out / "results.jsonl").read_bytes() == before
        procs = _descendants(first.pid)
        first.send_signal(signal.SIGTERM)  # what a scheduler or `kill` does: ftbench alone
        text, _ = first.communicate(timeout=60)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == 143, text
    flat = " ".join(text.split())
    assert "interrupted" in flat and f"--out {out}" in flat and "Resume" in flat
    assert (out / "results.jsonl").read_bytes() == before
    _assert_all_gone(procs)


# --------------------------------------------------------- durable results


def _rec(i: int) -> dict:
    return {"cell_id": f"cell{i}", "status": "ok", "config": {"repeat": 0}, "tokens_per_s": float(i)}


def test_torn_last_line_is_reported_and_the_next_append_is_clean(tmp_path):
    for i in range(3):
        append_record(tmp_path, _rec(i))
    path = tmp_path / "results.jsonl"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])  # a kill in the middle of writing record 3
    rr = read_records(tmp_path)
    assert [r["cell_id"] for r in rr.records] == ["cell0", "cell1"]
    assert len(rr.problems) == 1 and "line 3" in rr.problems[0]
    assert finished_keys(tmp_path) == {("cell0", 0), ("cell1", 0)}  # so resume reruns cell2

    append_record(tmp_path, _rec(2))
    rr = read_records(tmp_path)
    assert [r["cell_id"] for r in rr.records] == ["cell0", "cell1", "cell2"]
    assert len(rr.problems) == 1 and "line 3" in rr.problems[0]


def test_corrupt_line_in_the_middle_is_reported_by_line_number(tmp_path):
    append_record(tmp_path, _rec(0))
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write("this is not json\n")
        f.write('["a list, not a record"]\n')
        f.write('{"no_cell_id": 1}\n')
    append_record(tmp_path, _rec(1))
    rr = read_records(tmp_path)
    assert [r["cell_id"] for r in rr.records] == ["cell0", "cell1"]
    assert [p.split(": ")[0].rsplit(" ", 1)[-1] for p in rr.problems] == ["2", "3", "4"]


def test_concurrent_appends_never_interleave(tmp_path):
    code = ("import sys; from ftbench.harness.results.store import append_record\n"
            "for i in range(40): append_record(sys.argv[1], {'cell_id': sys.argv[2] + str(i), 'status': 'ok',"
            " 'pad': 'x' * 5000})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"w{w}-"], cwd=ROOT) for w in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    rr = read_records(tmp_path)
    assert not rr.problems and len(rr.records) == 160


def test_kill_during_writes_leaves_a_readable_file(tmp_path):
    code = ("import sys; from ftbench.harness.results.store import append_record\n"
            "i = 0\n"
            "while True:\n"
            "    append_record(sys.argv[1], {'cell_id': str(i), 'status': 'ok', 'pad': 'x' * 200000}); i += 1\n")
    writer = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT)
    try:
        _wait_for(lambda: _n_lines(tmp_path) >= 3, 60, "some records")
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
    rr = read_records(tmp_path)
    assert len(rr.records) >= 3 and len(rr.problems) <= 1  # at most the line being written
    n = len(rr.records)
    append_record(tmp_path, {"cell_id": "after", "status": "ok"})
    rr2 = read_records(tmp_path)
    assert len(rr2.records) == n + 1 and rr2.records[-1]["cell_id"] == "after"


@pytest.mark.parametrize("command", ["report", "compare"])
def test_report_and_compare_name_the_torn_line_and_use_the_rest(tmp_path, command):
    sets = []
    for name in ("base", "new"):
        d = tmp_path / name
        d.mkdir()
        for i in range(2):
            append_record(d, {**_rec(i), "task": "generation", "backend": "eager", "model": "tiny-gpt2",
                              "error": None, "metric": "perplexity", "metric_value": 10.0,
                              "higher_is_better": False, "step_time_s": 0.1, "peak_memory_bytes": 1,
                              "recipe_fingerprint": "f", "nproc": 1, "repeat": 0, "data": "builtin"})
        with open(d / "results.jsonl", "ab") as f:
            f.write(b'{"cell_id": "torn", "sta')
        sets.append(d)
    args = [sets[0]] if command == "report" else sets
    proc = ftbench(command, *args)
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode in (0, 1), text  # compare may call a change a regression; never a crash
    assert "Traceback" not in text
    assert "results.jsonl line 3" in text


def test_a_sigkilled_driver_takes_its_running_cell_with_it(tmp_path):
    out = tmp_path / "out"
    run = _start(["run", "--task", "generation", "--backend", "fault:kind=hang,at_step=0", *TINY, "--out", out])
    try:
        _wait_for(lambda: (out / "environment.json").exists(), 120, "the run to start", run)
        _wait_for(lambda: _cell_started(run.pid), 120, "the cell to start", run)
        time.sleep(2.0)
        procs = _descendants(run.pid)
        run.send_signal(signal.SIGKILL)  # no handler can run: the cell must notice on its own
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    _assert_all_gone(procs, timeout=20)
    assert not (out / "results.jsonl").exists()


# ---------------------------------------------- multi-rank cells (forked ranks)

#: Multi-rank fault cells: rank 1 misbehaves at step 1 while rank 0 waits in DDP's all-reduce.
RANK_FAULTS = ["segv", "kill", "memhog"]
RANKS_MEMORY_LIMIT_MB = 2500  # above a healthy 2-rank cell's summed resident memory, far below memhog's


@pytest.fixture(scope="module")
def rank_fault_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("rank-faults") / "out"
    mark = f"rank-faults-{os.getpid()}-{time.time()}"
    backends = []
    for kind in RANK_FAULTS:
        backends += ["--backend", f"fault-dp:kind={kind},at_step=1,rank=1"]
    proc = ftbench("run", "--task", "generation", *backends, "--nproc", 2, *TINY, "--memory-limit-mb",
                   RANKS_MEMORY_LIMIT_MB, "--time-limit", 300, "--out", out,
                   env={**FAULT_ENV, "FTBENCH_TEST_MARK": mark})
    return proc, {r["backend"].split("kind=")[1].split(",")[0]: r for r in records(out)}, mark


def test_forked_ranks_segfault_sigkill_and_memory_limit_fail_only_their_cell(rank_fault_grid):
    proc, by_kind, mark = rank_fault_grid
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(by_kind) == sorted(RANK_FAULTS)
    segv, kill, memhog = by_kind["segv"], by_kind["kill"], by_kind["memhog"]
    assert all(r["nproc"] == 2 for r in by_kind.values())
    # The rank that failed first gives the cell its status and message; its peer was killed, not blamed.
    assert segv["status"] == "error" and "rank 1 of 2 died from signal SIGSEGV" in segv["error"]
    # The faulting thread's frame, not that of another thread in the dump.
    assert "Segmentation fault at File" in segv["error"] and "string_at" in segv["error"]
    assert "fault_plugin.py" in segv["stderr_tail"]
    # Rank 0 may notice its peer's death ("connection closed") and fail too: the cause is rank 1's SIGKILL.
    assert kill["status"] == "error" and "rank 1 of 2 died from signal SIGKILL" in kill["error"]
    # The limit covers the whole cell: the leader and both ranks.
    assert memhog["status"] == "oom" and f"host memory limit of {RANKS_MEMORY_LIMIT_MB} MB" in memhog["error"]
    assert memhog["memory_tree_peak_bytes"] > RANKS_MEMORY_LIMIT_MB * 2**20
    assert_none_left(FTBENCH_TEST_MARK=mark)


def test_forked_ranks_hanging_past_the_time_limit_are_all_killed(tmp_path):
    out, mark = tmp_path / "out", f"rank-hang-{os.getpid()}-{time.time()}"
    proc = ftbench("run", "--task", "generation", "--backend", "fault-dp:kind=hang,at_step=1,rank=1", "--nproc", 2,
                   *TINY, "--time-limit", 8, "--out", out, env={**FAULT_ENV, "FTBENCH_TEST_MARK": mark})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (rec,) = records(out)
    assert rec["status"] == "timeout" and "time limit of 8 s" in rec["error"]
    assert_none_left(FTBENCH_TEST_MARK=mark)


def test_ctrl_c_during_a_multi_rank_cell_stops_every_rank_and_resumes(tmp_path):
    out = tmp_path / "out"
    # The second cell trains long enough for the interrupt to land while its ranks run.
    args = ["run", "--task", "generation", "--backend", "ddp", "--nproc", 2, "--model", "tiny-gpt2", "--model",
            "tiny-llama", *with_setting(TINY, "--steps", 120), "--out", out]
    proc = _start(args)
    try:
        # A whole line: a record read while it is being appended would compare as changed.
        _wait_for(lambda: _n_lines(out) >= 1 and (out / "results.jsonl").read_bytes().endswith(b"\n"), 240,
                  "the first record", proc)
        first = (out / "results.jsonl").read_bytes()
        _wait_for(lambda: len(_descendants(proc.pid)) >= 4, 60, "the second cell's ranks", proc)
        procs = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, text
    assert (out / "results.jsonl").read_bytes() == first
    _assert_all_gone(procs)
    again = ftbench(*args, env=FAULT_ENV)
    assert again.returncode == 0, again.stdout + again.stderr
    rr = read_records(out)
    assert [r["model"] for r in rr.records] == ["tiny-gpt2", "tiny-llama"]
    assert all(r["status"] == "ok" and r["nproc"] == 2 for r in rr.records), [r["error"] for r in rr.records]


FORKED_LOCK = """
import multiprocessing as mp, multiprocessing.resource_tracker, os, sys
from ftbench.harness.running.childexit import exit_child
mp.resource_tracker.ensure_running()  # shared with the forked child, as the driver's is with cells
pid = os.fork()
if pid == 0:
    lock = mp.get_context("spawn").Lock()  # a named semaphore, registered with the tracker (not under "fork")
    exit_child(0) if sys.argv[1] == "exit_child" else os._exit(0)
os.waitpid(pid, 0)
"""


@pytest.mark.parametrize("ending", ["exit_child", "os._exit"])
def test_a_forked_child_releases_its_semaphores_before_it_exits(ending):
    """Cells, ranks and preparation end with exit_child; a bare os._exit leaves the semaphore to the
    tracker, which warns as the last line of the run."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FORKED_LOCK, ending], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert ("leaked semaphore" in out.stderr) == (ending == "os._exit"), out.stderr
