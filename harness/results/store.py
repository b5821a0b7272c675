"""The result store: ``OUT/results.jsonl``, one JSON object per finished cell.

Writes are append-only, one ``os.write`` of a whole line on a file opened
with ``O_APPEND`` followed by ``fsync``, so a reader never sees half a record
and a kill during a write can at worst leave a torn *last* line.

:func:`read_records` is the one reader of a result set, for every command
(report, compare, history, merge, and the resume of run): each line is parsed
as strict JSON and checked against the record schema
(:mod:`ftbench.harness.contract.schema`); a line that fails either (torn,
binary, another encoding, nested too deep, a known key of the wrong type) is
reported with its file and line number, and skipped.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.schema import SCHEMA_VERSION, parse_line, validate_record, version_of

RESULTS_FILE = "results.jsonl"

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
    """Records read from a result set, the lines that could not be used, and the schema versions read."""

    records: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    #: schema version -> how many records follow it (1: written before records said so)
    versions: Counter = field(default_factory=Counter)

    def versions_read(self) -> str:
        """``"schema version 1"``, or ``"schema versions 1 (3 records), 2 (9 records)"``."""
        return describe_versions(self.versions)


def describe_versions(versions: Counter) -> str:
    """How many records of each schema version were read, in one phrase."""
    if not versions:
        return "no records"
    if len(versions) == 1:
        return f"schema version {next(iter(versions))}"
    return "schema versions " + ", ".join(f"{v} ({n} record{'s' if n != 1 else ''})"
                                          for v, n in sorted(versions.items()))


def read_records(out_dir: str | os.PathLike, strict: bool = False) -> ReadResult:
    """Every valid record of ``OUT/results.jsonl``; bad lines are reported, not fatal.

    Example::

        rr = read_records("runs/today")
        for p in rr.problems: print("warning:", p)   # ".../results.jsonl line 3: invalid record (...); skipped"
        rr.versions_read()                           # "schema version 2"
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
                rec = parse_line(raw)
            except ValueError as e:
                problem = f"unreadable record ({_first_line(e)})"
            else:
                why = validate_record(rec)
                problem = f"invalid record ({why})" if why else None
            if problem:
                msg = f"{path} line {lineno}: {problem}; skipped"
                if strict:
                    raise FtbenchError(msg) from None
                rr.problems.append(msg)
                continue
            rr.records.append(rec)
            rr.versions[version_of(rec)] += 1
    newer = sorted(v for v in rr.versions if v > SCHEMA_VERSION)
    if newer:
        rr.problems.append(f"{path}: {sum(rr.versions[v] for v in newer)} record(s) follow schema version "
                           f"{newer[-1]}, newer than this ftbench's {SCHEMA_VERSION}; keys it does not know are "
                           "ignored (upgrade ftbench to read them)")
    return rr


def _first_line(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= 160 else text[:160] + "..."


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
