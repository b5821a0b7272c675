"""The result store: ``OUT/results.jsonl``, one JSON object per finished cell.

Writes are append-only, one ``os.write`` of a whole line on a file opened
with ``O_APPEND`` followed by ``fsync``, so a reader never sees half a record
and a kill during a write can at worst leave a torn *last* line, which
:func:`read_records` reports by line number and skips.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ftbench.harness.contract.api import FtbenchError

RESULTS_FILE = "results.jsonl"

#: Keys every record carries (DESIGN §5).
RECORD_KEYS = (
    "cell_id", "task", "backend", "model", "status", "error",
    "tokens_per_s", "samples_per_s", "step_time_s",
    "peak_memory_bytes", "memory_kind", "setup_s", "compile_s",
    "train_loss", "eval_loss", "metric", "metric_value", "metrics",
    "config", "environment",
)

#: `cancelled`: a Slurm job cancelled or preempted before its cell finished (--launcher slurm).
STATUSES = ("ok", "error", "oom", "diverged", "timeout", "skipped", "cancelled")


def _clean(value):
    """JSON has no NaN/inf: store them as strings so every reader can parse the line."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def append_record(out_dir: str | os.PathLike, record: dict) -> None:
    """Append one record durably (never through a symbolic link: that raises ``OSError`` ELOOP)."""
    line = (json.dumps(_clean(record), sort_keys=True, allow_nan=False) + "\n").encode()
    path = Path(out_dir) / RESULTS_FILE
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    size = os.fstat(fd).st_size
    try:
        # If an earlier writer was killed mid-line, start on a fresh line so
        # the torn fragment stays one bad line instead of corrupting this one.
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        view = memoryview(line)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except OSError:
        # A full disk can take half a line: cut it off again, so the file
        # stays whole records only (the caller keeps the record elsewhere).
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass
        raise
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)


def end_torn_line(path: Path) -> bool:
    """End a torn last line (a writer killed mid-append) with a newline; True when there was one.

    The fragment stays, as one line that readers report and skip; what is
    appended next starts on a line of its own.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        size = os.fstat(fd).st_size
        if not size or os.pread(fd, 1, size - 1) == b"\n":
            return False
        os.write(fd, b"\n")
        os.fsync(fd)
        return True
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    # A new file's name lives in its directory: without this, a power cut can lose the whole file.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@dataclass
class ReadResult:
    """Records read from a result set, and the lines that could not be used."""

    records: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_records(out_dir: str | os.PathLike, strict: bool = False) -> ReadResult:
    """Every valid record of ``OUT/results.jsonl``; bad lines are reported, not fatal.

    Example::

        rr = read_records("runs/today")
        for p in rr.problems: print("warning:", p)
    """
    path = Path(out_dir)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise FtbenchError(f"no result set at {out_dir}: {path} does not exist. "
                           "Pass the --out directory of an 'ftbench run'.")
    rr = ReadResult()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not a JSON object")
                missing = [k for k in ("cell_id", "status") if k not in rec]
                if missing:
                    raise ValueError(f"missing keys {missing}")
            except ValueError as e:
                msg = f"{path} line {lineno}: unreadable record ({e}); skipped"
                if strict:
                    raise FtbenchError(msg) from None
                rr.problems.append(msg)
                continue
            rr.records.append(rec)
    return rr


def finished_keys(out_dir: str | os.PathLike) -> set[tuple[str, int]]:
    """``(cell_id, repeat)`` of every record already in the result set (for resume)."""
    path = Path(out_dir) / RESULTS_FILE
    if not path.exists():
        return set()
    keys = set()
    for r in read_records(out_dir).records:
        repeat = int(r.get("config", {}).get("repeat", 0))
        keys.add((r["cell_id"], repeat))
        # A cell run at the micro-batch --micro-batch auto found has another id than the cell planned.
        planned = (r.get("micro_batch_search") or {}).get("cell_id")
        if planned:
            keys.add((planned, repeat))
    return keys
