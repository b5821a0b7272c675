"""One-off work of a grid, done before its first cell instead of inside one.

Some backends pay a cost the first time a process uses them that has
nothing to do with the cell: DeepSpeed JIT-compiles its CPU communication
op (and CPU Adam) with ``torch.utils.cpp_extension``, 20-50 s on a small
CPU.  Two things keep that out of the cells' ``setup_s``:

* :func:`pin_extensions_dir` gives JIT-built extensions a directory of this
  installation's own under ftbench's cache.  Torch's default,
  ``~/.cache/torch_extensions/py311_cpu``, is shared by every environment of
  the user: another virtual environment (another checkout, another torch)
  rewrites its build files with its own paths, and the next cell here
  rebuilds from scratch, on every run;
* :func:`prepare_engines` calls each engine's :meth:`Engine.prepare_once` once per
  grid, in a process of its own, before the first cell; the time is shown
  as a progress line and reported once, in ``environment.json``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from ftbench.harness.contract.api import Engine
from ftbench.harness.running.childexit import exit_child
from ftbench.harness.cell.tokenization import cache_dir
from ftbench.harness.contract.registry import Registry
from ftbench.harness.cell.reaper import watch_driver

#: Longest a preparation may take (a cold build of a large op on a slow CPU), in seconds.
PREPARE_TIME_LIMIT_S = 1800


def pin_extensions_dir() -> str:
    """Point ``TORCH_EXTENSIONS_DIR`` at this installation's own build directory (unless set)."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        try:
            torch_version = metadata.version("torch")
        except metadata.PackageNotFoundError:
            torch_version = "none"
        key = hashlib.sha256(f"{sys.prefix}|{sys.version}|{torch_version}".encode()).hexdigest()[:12]
        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache_dir() / "torch_extensions" / key)
    return os.environ["TORCH_EXTENSIONS_DIR"]


def _overrides_prepare(engine: type) -> bool:
    return getattr(engine.prepare_once, "__func__", None) is not Engine.prepare_once.__func__


def plan(cells, registry) -> list[dict]:
    """One job per (engine, device) whose engine has something to prepare."""
    jobs: dict = {}
    for c in cells:
        name, opts = c.backend.name, c.backend.options
        spec = registry.backend(name)
        if not _overrides_prepare(spec.engine):
            continue
        job = jobs.setdefault((spec.engine, c.device), {"backend": name, "backends": [], "device": c.device,
                                                        "options": []})
        if name not in job["backends"]:
            job["backends"].append(name)
        options = spec.engine.validate_options({**dict(spec.defaults), **opts})
        if options not in job["options"]:
            job["options"].append(options)
    return list(jobs.values())


def prepare_engines(cells, context, progress=None) -> list[dict]:
    """Run every needed :meth:`Engine.prepare_once` for ``cells``; one report dict per job.

    ``context`` is a ``multiprocessing`` context (the fork server's, or spawn).
    A failing preparation is reported, never raised: the cells then do the
    work themselves, and fail on their own if it cannot be done.
    """
    reports = []
    for job in plan(cells, Registry.load()):
        if progress:
            progress("prepare", 0, len(cells), None, {**job, "status": "running"})
        with tempfile.NamedTemporaryFile(prefix="ftbench-prepare-", suffix=".log", delete=False) as log:
            log_path = log.name
        t0 = time.perf_counter()
        _remove_locks(_stale(_build_locks()))
        locks_before = set(_build_locks())
        proc = context.Process(target=_prepare_main, args=(job["backend"], job["options"], job["device"], log_path))
        proc.start()
        try:
            proc.join(PREPARE_TIME_LIMIT_S)
        finally:
            if proc.exitcode is None:  # timed out, or Ctrl-C: the build's compilers go with it
                _kill_session(proc.pid)
                proc.join()
                _remove_locks(set(_build_locks()) - locks_before)
        seconds = time.perf_counter() - t0
        report = {"backends": job["backends"], "device": job["device"], "seconds": round(seconds, 3),
                  "status": "ok" if proc.exitcode == 0 else "failed"}
        if proc.exitcode != 0:
            report["error"] = _last_line(log_path) or f"exit code {proc.exitcode}"
        os.unlink(log_path)
        reports.append(report)
        if progress:
            progress("prepare", 0, len(cells), None, report)
    return reports


def _build_locks() -> list[Path]:
    """torch.utils.cpp_extension's per-extension build locks (a ``lock`` file while building)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    return list(Path(root).glob("*/lock")) if root else []


def _stale(locks: list[Path], grace_s: float = 30.0) -> list[Path]:
    """Locks no build holds: torch builds with ninja running inside the extension's directory,
    so a lock older than ``grace_s`` with no process working there was left by a killed build."""
    if not locks:
        return []
    import psutil

    busy = set()
    for p in psutil.process_iter():
        try:
            busy.add(Path(p.cwd()))
        except (psutil.Error, OSError):
            continue
    now = time.time()
    out = []
    for lock in locks:
        try:
            old = now - lock.stat().st_mtime > grace_s
        except OSError:
            continue
        if old and lock.parent not in busy:
            out.append(lock)
    return out


def _remove_locks(paths) -> None:
    # A build killed mid-way leaves its lock, and every later load of that op would wait on it forever.
    for path in paths:
        try:
            path.unlink()
        except OSError:
            pass


def _kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _prepare_main(backend: str, options: list[dict], device: str, log_path: str) -> None:
    # A session of its own, as for a cell: the driver can kill the build's whole tree, and the
    # build dies with a driver that is killed outright.
    os.setsid()

    watch_driver()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    code = 1
    try:
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        Registry.load().backend(backend).engine.prepare_once(options, device)
        code = 0
    except BaseException:  # noqa: BLE001 - reported as a warning by the driver
        import traceback

        traceback.print_exc()
    finally:
        exit_child(code)


def _last_line(path: str) -> str:
    try:
        lines = [ln.strip() for ln in Path(path).read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""
