"""Keeping a finished record when ``OUT/results.jsonl`` cannot take it.

A cell's record costs its whole run; a full disk, a read-only remount or a
vanished output directory at the moment of the append must not throw it
away.  :func:`keep_record` writes the record to a *recovery set* outside
``--out``, a result set of its own (``results.jsonl`` + ``environment.json``)
under ``$FTBENCH_CACHE/recovered/`` or, when that cannot be written either,
the system temp directory; as a last resort the record goes to stderr as one
JSON line.  The grid then stops with :data:`EXIT_RESULTS_NOT_WRITTEN`.

The record comes back in one of two ways (docs/data.md, "A full disk"):

* rerun the same ``ftbench run --out OUT`` once there is space:
  :func:`restore_into` appends the recovered records to ``OUT`` before any
  cell runs, so only cells without a record run again;
* or move to a roomier place: ``ftbench merge NEW OUT RECOVERY_DIR``, then
  ``ftbench run ... --out NEW``.

Example::

    try:
        append_record(out, record)
    except OSError as e:
        raise ResultsNotWritten(out, e, keep_record(out, record, environment))
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from ftbench.harness.cell.tokenization import cache_root
from ftbench.harness.results.store import RESULTS_FILE, append_record, finished_keys, read_records
from ftbench.harness.contract.api import FtbenchError

#: ``ftbench run`` exit status when a finished record could not be written to ``--out``.
EXIT_RESULTS_NOT_WRITTEN = 3

_CAUSES = {
    errno.ENOSPC: ("the file system of {out} is full", "free space there"),
    errno.EDQUOT: ("your disk quota on {out} is used up", "free space or raise the quota"),
    errno.EROFS: ("{out} is on a read-only file system", "remount it read-write"),
    errno.ENOENT: ("{out} no longer exists (deleted or unmounted while the grid ran)", "recreate or remount it"),
    errno.EACCES: ("{out} is no longer writable", "restore write permission"),
    errno.EIO: ("the disk holding {out} reported an I/O error", "check the disk (dmesg)"),
    errno.ELOOP: ("{out}/results.jsonl became a symbolic link while the grid ran (ftbench does not write "
                  "through links)", "replace the link by a plain file"),
}


class ResultsNotWritten(Exception):
    """A finished record could not be appended to ``OUT/results.jsonl``; it was kept elsewhere.

    ``str(exc)`` is the one-paragraph message for the user; ``kept`` says
    where the record went (a recovery directory, or ``None``: stderr only).
    """

    def __init__(self, out: Path, error: OSError, kept: Path | None, cell_id: str = ""):
        self.out, self.error, self.kept = Path(out), error, kept
        cause, fix = _CAUSES.get(error.errno, ("writing to {out} failed", "make it writable"))
        cause = cause.format(out=out)
        where = (f"The record is safe in {kept / 'results.jsonl'}." if kept is not None else
                 "It could not be saved anywhere on disk, so it was printed on stderr as one JSON line "
                 "(save that line as RECOVERED/results.jsonl).")
        back = (f"To continue, {fix} and rerun the same command: the recovered record is put back into {out} "
                "first and only cells without a record run. Or continue elsewhere with "
                f"'ftbench merge NEW {out} {kept if kept is not None else 'RECOVERED'}' and "
                "'ftbench run ... --out NEW'.")
        super().__init__(f"could not write the record of cell {cell_id} to {Path(out) / 'results.jsonl'}: "
                         f"{cause} ({error.strerror or error}). The grid stopped here; every record written "
                         f"before is intact. {where} {back}")


def recovery_dirs(out: str | os.PathLike) -> list[Path]:
    """Where the records of ``out`` are kept when ``out`` cannot take them, in order of preference."""
    name = Path(out).resolve()
    tag = f"{name.name or 'out'}-{hashlib.sha256(str(name).encode()).hexdigest()[:12]}"
    return [cache_root() / "recovered" / tag, Path(tempfile.gettempdir()) / "ftbench-recovered" / tag]


def keep_record(out: str | os.PathLike, record: dict, environment: dict) -> Path | None:
    """Save ``record`` to the first recovery directory that takes it; ``None`` means stderr only."""
    for path in recovery_dirs(out):
        try:
            path.mkdir(parents=True, exist_ok=True)
            env = path / "environment.json"
            if not env.exists():
                _write_here(env, json.dumps(environment, indent=2, default=str))
            _write_here(path / "ORIGIN", f"{Path(out).resolve()}\n")
            append_record(path, record)
            return path
        except OSError:
            continue
    print(json.dumps(record, sort_keys=True, default=str), file=sys.stderr, flush=True)
    return None


def _write_here(path: Path, text: str) -> None:
    # Not through a link: a recovery set, like a result set, is written where it says it is.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def restore_into(out: Path) -> tuple[int, list[Path]]:
    """Append the records kept for ``out`` that it lacks; the number restored and the dirs emptied.

    Called under the output lock before any cell runs.  A recovery
    directory is removed only once every record in it is in ``out``.
    """
    restored, emptied = 0, []
    for path in recovery_dirs(out):
        if not (path / RESULTS_FILE).exists():
            continue
        done = finished_keys(out)
        for rec in read_records(path).records:
            key = (rec["cell_id"], int(rec.get("config", {}).get("repeat", 0)))
            if key not in done:
                append_record(out, rec)  # an OSError here leaves the recovery set untouched
                done.add(key)
                restored += 1
        for name in (RESULTS_FILE, "environment.json", "ORIGIN"):
            (path / name).unlink(missing_ok=True)
        try:
            path.rmdir()
        except OSError:
            pass
        emptied.append(path)
    return restored, emptied


def check_free_space(out: str | os.PathLike, cells: list) -> None:
    """Refuse an ``--out`` whose file system cannot hold the grid's records (an FtbenchError, exit 2).

    The estimate is generous (records carry per-step times and losses): it
    catches an almost full disk before hours of training, not a disk that
    fills up during the run, which :class:`ResultsNotWritten` handles.
    """
    need = record_bytes_estimate(cells)
    probe = Path(out).resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        st = os.statvfs(probe)
    except OSError:
        return  # nothing to measure; the writability probe in the driver speaks for itself
    free = st.f_bavail * st.f_frsize
    if free < need:
        raise FtbenchError(f"--out {out} has {free / 1024:.0f} KiB free, but the {len(cells)} cell(s) of this grid "
                           f"need about {need / 1024:.0f} KiB for their records; free space there or pass --out on "
                           "a file system with room (nothing was run or written)")


def record_bytes_estimate(cells: list) -> int:
    """Bytes the records of ``cells`` may take: about twice a typical record, plus the environment file."""
    per_cell = sum(2 * (6144 + 64 * int(getattr(c.recipe, "steps", 0) or 0)) for c in cells)
    return per_cell + 16384
