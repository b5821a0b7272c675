"""Running one cell in its own process (group) and turning it into a record.

The cell runs in a new session so that a time-out, a memory limit or the
user's Ctrl-C can kill its whole process tree at once, and nothing it
started survives it.  A sampler thread follows the tree's resident memory
(for the memory limit and the tree-wide peak); each rank also reports its
own kernel-tracked peak (VmHWM), which no sampling can miss.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from ftbench.harness.cell import reaper
from ftbench.harness.running import launch
from ftbench.harness.results.record import CellOutcome
from ftbench.harness.running.ranks import first_failure, launch_details, threads_per_rank
from ftbench.harness.contract.config import CellSpec

#: Exit code conventions of the worker: 0 finished (ok/diverged/skipped), 1 failed.


@dataclass
class TreeWatch:
    """Samples the summed RSS of a process tree and enforces a memory limit."""

    root: psutil.Process
    limit_bytes: float | None = None
    interval: float = 0.2
    peak_bytes: int = 0
    #: pid -> psutil.Process of every process seen in the tree (psutil refuses a reused pid).
    pids: dict = field(default_factory=dict)
    over_limit: bool = False

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=2)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self):
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
                self.pids.setdefault(p.pid, p)
            except psutil.Error:
                continue
        self.peak_bytes = max(self.peak_bytes, total)
        if self.limit_bytes and total > self.limit_bytes and not self.over_limit:
            self.over_limit = True
            kill_tree(self.root.pid, self.pids)


def kill_tree(pgid: int, pids=()) -> None:
    """SIGKILL the cell's process group and any straggler that left it."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for p in (pids.values() if isinstance(pids, dict) else pids):
        try:
            if isinstance(p, psutil.Process):
                p.send_signal(signal.SIGKILL)
            else:
                os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass


def worker_args(spec_path: Path, result_dir: Path, t_launch: float) -> list[str]:
    """The worker's own arguments (what ``python -m ftbench.harness.cell.worker`` takes)."""
    return [str(spec_path), str(result_dir), repr(t_launch)]


def command_for(spec: CellSpec, args: list[str]) -> list[str]:
    """The command that starts the cell's worker with ``args`` as a process of its own, or under torchrun."""
    worker = ["-m", "ftbench.harness.cell.worker", *args]
    if spec.nproc <= 1 and spec.nnodes <= 1:
        return [sys.executable, *worker]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(spec.nproc)]
    if spec.nnodes > 1:
        lc = spec.launcher
        launch += ["--nnodes", str(spec.nnodes), "--node-rank", str(lc.rank), "--master-addr", lc.addr,
                   "--master-port", str(lc.port)]
    else:
        launch += ["--standalone"]
    return launch + worker


def cell_env(spec: CellSpec, env_extra: dict | None) -> dict:
    """The environment of a cell started as a subprocess (exec or torchrun)."""
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(env_extra or {})
    if spec.nproc > 1 and "OMP_NUM_THREADS" not in env:  # torchrun would give each rank 1 thread
        env["OMP_NUM_THREADS"] = str(threads_per_rank(spec.nproc))
    return env


def run_cell_process(spec: CellSpec, env_extra: dict | None = None, abort_if=None) -> CellOutcome:
    """Run ``spec`` in a fresh process tree; never raises for a failing cell.

    ``env_extra`` is added to the cell's environment; ``abort_if()``, polled
    while the cell runs, may return a reason to stop it as ``error`` (a
    multi-node cell whose other node died).
    """
    with tempfile.TemporaryDirectory(prefix="ftbench-cell-") as tmp:
        tmp = Path(tmp)
        spec_path = tmp / "spec.json"
        spec_path.write_text(json.dumps(spec.to_dict()))
        t_launch = time.time()
        args = worker_args(spec_path, tmp, t_launch)
        env = cell_env(spec, env_extra)
        stderr_path = tmp / "stderr.log"
        stderr_path.touch()
        t0 = time.perf_counter()
        proc = launch.start(spec, args, command_for(spec, args), env, str(stderr_path))
        guard = reaper.CellGuard(proc.pid)
        limit = spec.memory_limit_mb * 2**20 if spec.memory_limit_mb else None
        watch = TreeWatch(psutil.Process(proc.pid), limit_bytes=limit).start()
        timed_out, aborted = False, None
        try:
            timed_out, aborted = _wait(proc, spec.time_limit_s, abort_if)
        except BaseException:
            # Ctrl-C / SIGTERM in the driver: take the whole cell down with us.
            watch.stop()
            kill_tree(proc.pid, watch.pids)
            proc.wait()
            raise
        finally:
            watch.sample()
            watch.stop()
            ended_by_itself = proc.returncode is not None and not watch.over_limit
            leftovers = guard.leftovers(watch.pids)
            kill_tree(proc.pid, watch.pids)
            guard.kill_all()
            proc.wait()
        wall = time.perf_counter() - t0
        ranks = []
        for p in sorted(tmp.glob("rank*.json"), key=lambda p: p.stat().st_mtime):
            try:
                ranks.append(json.loads(p.read_text()))
            except ValueError:
                continue
        stderr_tail = _tail(stderr_path)
        culprit = first_failure(tmp)
        launched = launch_details(tmp)
    status, error = _verdict(spec, proc.returncode, timed_out, watch.over_limit, ranks, stderr_tail, culprit)
    if aborted and status != "timeout":
        status, error = "error", aborted + (f" (first failure reported: {error})" if error else "")
    return CellOutcome(ranks=sorted(ranks, key=lambda r: r.get("rank", 0)), status=status, error=error,
                       wall_s=wall, returncode=proc.returncode, tree_peak_bytes=watch.peak_bytes,
                       stderr_tail=stderr_tail, leftovers=leftovers if ended_by_itself else [],
                       launch={"mode": proc.launch, **(launched or {})})


def _wait(proc, limit_s, abort_if) -> tuple[bool, str | None]:
    """Wait for the cell: (timed out, the reason ``abort_if`` gave to stop it)."""
    if abort_if is None:
        try:
            proc.wait(timeout=limit_s)
            return False, None
        except subprocess.TimeoutExpired:
            return True, None
    deadline = None if limit_s is None else time.monotonic() + limit_s
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return True, None
        try:
            proc.wait(timeout=0.5 if left is None else min(0.5, left))
            return False, None
        except subprocess.TimeoutExpired:
            reason = abort_if()
            if reason:
                return False, reason


def _tail(path: Path, n: int = 4000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    # faulthandler ends a crash dump with a long list of extension modules, which would push
    # the stack that matters out of the tail kept in the record.
    data = re.sub(rb"\nExtension modules: [^\n]*", b"", data[-4 * n:])
    return data[-n:].decode("utf-8", "replace")


def _verdict(spec, returncode, timed_out, over_limit, ranks, stderr_tail, culprit=None) -> tuple[str, str | None]:
    if timed_out:
        return "timeout", f"cell exceeded its time limit of {spec.time_limit_s:g} s and was killed"
    if over_limit:
        return "oom", (f"cell exceeded its host memory limit of {spec.memory_limit_mb:g} MB and was killed "
                       "(raise --memory-limit-mb or shrink the batch)")
    # Ranks that wrote a file, earliest first: the first failure is the cause.  But a rank that
    # died without a word (a signal) came first when its leader saw it end first: its peers'
    # errors ("connection closed by peer") are the consequence, not the cause.
    failed = [r for r in ranks if r.get("status") != "ok"]
    if culprit and not any(r.get("rank") == culprit["rank"] for r in failed):
        failed, returncode = [], culprit["exitcode"]
    if failed:
        first = failed[0]
        return first.get("status", "error"), first.get("error")
    if returncode != 0 or not ranks:
        # A forked multi-rank cell knows which rank ended it (torchrun's ranks say so in the log).
        who = f"rank {culprit['rank']} of {culprit['nproc']}" if culprit else "cell process"
        if returncode is not None and returncode < 0:
            name = signal.Signals(-returncode).name
            status = "oom" if name == "SIGKILL" and _looks_oom(stderr_tail) else "error"
            # A SIGKILL nobody in ftbench sent is most often the kernel's out-of-memory killer.
            hint = " (killed from outside ftbench: if the host ran out of memory, dmesg says so)" \
                if name == "SIGKILL" else ""
            return status, f"{who} died from signal {name}{hint}" + _last_line(stderr_tail)
        return "error", f"{who} exited with code {returncode} without a result" + _last_line(stderr_tail)
    if len(ranks) < max(1, spec.nproc):
        return "error", f"only {len(ranks)} of {spec.nproc} ranks reported a result" + _last_line(stderr_tail)
    return "ok", None


def _looks_oom(text: str) -> bool:
    # Whole words only: "oom" inside "room" or "bloom" is not a memory error.
    return re.search(r"out of memory|\boom\b|oom-kill", text, re.IGNORECASE) is not None


def _last_line(text: str) -> str:
    # faulthandler's dump ends with a list of extension modules; the fault and its frame say more.
    if "Fatal Python error:" in text:
        dump = text[text.rindex("Fatal Python error:"):].splitlines()
        # With several threads, the faulting one is the "Current thread" block.
        start = next((i for i, ln in enumerate(dump) if ln.startswith("Current thread")), 0)
        frame = next((ln.strip() for ln in dump[start:] if ln.strip().startswith("File ")), "")
        return f"; {dump[0].strip()[:200]}" + (f" at {frame[:300]}" if frame else "")
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return f"; last output: {lines[-1][:300]}" if lines else ""
