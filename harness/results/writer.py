"""The one writer of a result set, whatever launches the cells.

Every launcher — the local driver, node 0 of a multi-node grid, the Slurm
driver — writes ``OUT`` through a :class:`ResultSetWriter`, so each gets the
same guarantees (docs/reliability.md):

* **one writer at a time**: an exclusive lock on ``OUT/.ftbench.lock``; a
  second run into the same ``--out`` is refused (exit 2);
* **writes stay inside --out**: ``results.jsonl``, ``environment.json`` and
  the lock are never followed through a symbolic link (refused, exit 2,
  before anything is written);
* **environment.json** written atomically before the first cell;
* **resume**: records kept by an earlier run that could not write them are
  put back first (:mod:`.recovery`), a torn last line is ended so the next
  record starts on its own line, unreadable lines are reported (their cells
  run again), finished ``(cell_id, repeat)`` pairs are skipped;
* **durable appends** (:func:`.store.append_record`); when ``OUT`` cannot
  take a record (full disk, read-only, vanished) the record is kept in a
  recovery set and :class:`.recovery.ResultsNotWritten` stops the grid
  (exit 3);
* every record carries the memory model's prediction
  (``memory_predicted_bytes``) and its place in the run (``run_order``);
* **fail-fast**: :meth:`ResultSetWriter.write` says when the grid should stop;
* **record sinks**: callbacks handed each record once it is durably written
  (a failing sink is reported once and never stops the grid).

Example::

    with ResultSetWriter(out, environment, cells, WriteOptions(fail_fast=True)) as writer:
        writer.open()
        for position, spec in writer.cells:
            if writer.finished(spec):
                writer.skip(position, spec)
                continue
            record = build_record(spec, run_cell_process(spec), environment, time.time())
            if writer.write(position, spec, record):
                break
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.config import CellSpec
from ftbench.harness.grid.expand import INTERLEAVED, order_repeats
from ftbench.harness.grid.memplan import predict_cell
from ftbench.harness.results.recovery import ResultsNotWritten, keep_record, restore_into
from ftbench.harness.results.store import (RESULTS_FILE, append_record, end_torn_line, finished_keys,
                                           read_records)

LOCK_FILE = ".ftbench.lock"
ENVIRONMENT_FILE = "environment.json"
#: The files of ``OUT`` the writer writes: none of them may be a symbolic link.
WRITTEN_FILES = (RESULTS_FILE, ENVIRONMENT_FILE, LOCK_FILE)

#: A record sink: called with each record after it is durably in ``results.jsonl``.
RecordSink = Callable[[dict], None]


@dataclass(frozen=True)
class WriteOptions:
    """How a run writes its result set.

    Example: ``WriteOptions(fail_fast=True, order="sequential", annotate=annotate_parity, registry=reg)``.
    """

    #: Rerun cells already in the result set.
    force: bool = False
    #: Stop after the first record whose status is neither ``ok`` nor ``skipped``.
    fail_fast: bool = False
    #: How repeats are arranged (:func:`~ftbench.harness.grid.expand.order_repeats`).
    order: str = INTERLEAVED
    #: ``annotate(record, earlier_records)`` may add fields (loss parity) before the record is written.
    annotate: Callable | None = None
    #: The plugin registry: with one, every record gets the memory model's prediction.
    registry: object = None
    #: Receives events ``(kind, index, total, spec, payload)``; see ftbench.harness.running.progress.
    progress: Callable | None = None
    #: Record sinks, each called with every record once it is durably written (``--sink``).
    sinks: tuple = ()


@dataclass
class RunSummary:
    """What a run did to its result set."""

    records: list[dict] = field(default_factory=list)
    skipped_done: int = 0
    interrupted: bool = False
    #: Unreadable lines of an existing results.jsonl (their cells are rerun).
    problems: list[str] = field(default_factory=list)
    #: One-off preparations of the grid's engines (see ftbench.harness.running.prepare), before any cell.
    prepared: list[dict] = field(default_factory=list)
    #: Records put back from a recovery set (kept there when an earlier run could not write them).
    restored: int = 0
    #: The first failure of each record sink that failed (the records themselves were written).
    sink_failures: list[str] = field(default_factory=list)


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` and prove it writable with a real file (an :class:`FtbenchError` otherwise)."""
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FtbenchError(f"cannot create output directory {path}: {e.strerror}; pass --out to a writable "
                           "directory") from None
    # Probe with a real file: os.access says yes to root on a read-only mount's ACLs and the like.
    try:
        fd, probe = tempfile.mkstemp(prefix=".ftbench-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FtbenchError(f"output directory {path} is not writable ({e.strerror}); pass --out to a "
                           "directory you can write to") from None
    return path


def check_confined(out_dir: Path) -> None:
    """Refuse a result set whose files are symbolic links: records must land in ``out_dir`` itself."""
    for name in WRITTEN_FILES:
        path = out_dir / name
        if path.is_symlink():
            raise FtbenchError(f"{path} is a symbolic link (to {os.readlink(path)}); ftbench writes a result set "
                               "only inside --out and never follows a link out of it. Replace the link by the "
                               f"file itself (cp --remove-destination \"$(readlink -f {path})\" {path}), or pass "
                               "another --out (nothing was run or written)")


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` at once: a kill mid-write leaves the previous file, not half a new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    # O_EXCL and O_NOFOLLOW: a link planted under the temporary name is not written through.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)  # rename replaces a link itself, never its target


class OutputLock:
    """An exclusive lock on a result set, so two runs cannot interleave writes."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self.fd)
            self.fd = None
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise FtbenchError(f"another 'ftbench run' is writing to {self.path.parent}; wait for it to "
                                   "finish or pass a different --out") from None
            raise
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, str(os.getpid()).encode())  # for people; the flock is what counts
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        return False


class ResultSetWriter:
    """The result set ``out`` of one run of ``cells``; see the module docstring for its guarantees.

    ``with`` takes the lock (after checking ``out``); :meth:`open` writes the
    environment and reads what is already there, so a launcher can do what
    must precede any write (the multi-node rendezvous) in between.
    """

    def __init__(self, out: str | os.PathLike, environment: dict, cells: list[CellSpec],
                 options: WriteOptions = WriteOptions()):
        self.out_dir = prepare_out_dir(out)
        check_confined(self.out_dir)
        self.environment = environment
        self.options = options
        #: ``(position, spec)`` in the order the run takes them, positions from 1.
        self.cells = list(enumerate(order_repeats(cells, options.order), start=1))
        self.summary = RunSummary()
        #: Records already in the set, then each one written: what ``annotate`` compares against.
        self.records: list[dict] = []
        #: Record sinks, called in order after each durable write.
        self.sinks: list[RecordSink] = list(options.sinks)
        self._done: set = set()
        self._failed_sinks: set[int] = set()
        self._lock = OutputLock(self.out_dir)

    def __enter__(self) -> "ResultSetWriter":
        self._lock.__enter__()
        return self

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)

    @property
    def total(self) -> int:
        return len(self.cells)

    def _event(self, kind: str, i: int, spec, payload) -> None:
        if self.options.progress:
            self.options.progress(kind, i, self.total, spec, payload)

    # ------------------------------------------------------------ opening

    def open(self) -> None:
        """Write environment.json, put back recovered records, end a torn line and read what is there."""
        path = self.out_dir / ENVIRONMENT_FILE
        try:
            write_atomic(path, json.dumps(self.environment, indent=2, default=str))
        except OSError as e:
            raise FtbenchError(f"cannot write {path} ({e.strerror or e}); free space there or pass --out on a "
                               "writable file system with room (no cell has run)") from None
        try:
            self.summary.restored = restore_into(self.out_dir)[0]
            end_torn_line(self.out_dir / RESULTS_FILE)
        except OSError as e:
            raise FtbenchError(f"cannot put the recovered records back into {self.out_dir} ({e.strerror or e}); "
                               "free space there first (the recovered records stay where they are)") from None
        if self.summary.restored:
            self._event("note", 0, None, f"put back {self.summary.restored} record(s) an earlier run kept")
        if not (self.out_dir / RESULTS_FILE).exists():
            return
        existing = read_records(self.out_dir)
        self.records, self.summary.problems = existing.records, existing.problems
        for problem in existing.problems:
            self._event("problem", 0, None, problem)
        self._done = set() if self.options.force else finished_keys(self.out_dir)

    def note_prepared(self, prepared: list[dict], fork_server: dict | None = None) -> None:
        """Add the grid's one-off preparations, and what the fork server's CUDA probe found, to
        environment.json (informational: a failure is ignored)."""
        self.summary.prepared = prepared
        extra = {**({"prepared": prepared} if prepared else {}), **({"fork_server": fork_server} if fork_server else {})}
        if not extra:
            return
        try:
            write_atomic(self.out_dir / ENVIRONMENT_FILE,
                         json.dumps({**self.environment, **extra}, indent=2, default=str))
        except OSError:
            pass  # the progress line already showed it

    # ------------------------------------------------------------ cells

    def finished(self, spec: CellSpec) -> bool:
        """Whether ``spec`` (this repeat) already has a record (never, under ``force``)."""
        return (spec.cell_id, spec.repeat) in self._done

    def pending(self) -> list[CellSpec]:
        """The cells still to run, in order."""
        return [spec for _, spec in self.cells if not self.finished(spec)]

    def skip(self, position: int, spec: CellSpec) -> None:
        self.summary.skipped_done += 1
        self._event("skip", position, spec, None)

    def write(self, position: int, spec: CellSpec, record: dict, fit=None) -> bool:
        """Complete ``record`` (prediction, run order, annotations) and append it; True: stop the grid.

        ``spec`` is the cell as it ran (at the micro-batch a search chose);
        ``fit`` that search (:class:`ftbench.harness.running.fit.FitResult`), if any.
        Raises :class:`ResultsNotWritten` when ``OUT`` cannot take the record (kept elsewhere).
        """
        record.update(memory_fields(self.options.registry, spec, fit))
        record["run_order"] = {"order": self.options.order, "position": position, "of": self.total}
        if self.options.annotate:
            self.options.annotate(record, self.records)
        try:
            append_record(self.out_dir, record)
        except OSError as e:  # full disk, read-only or vanished --out: keep the record, stop cleanly
            raise ResultsNotWritten(self.out_dir, e, keep_record(self.out_dir, record, self.environment),
                                    spec.cell_id) from None
        self.records.append(record)
        self.summary.records.append(record)
        self._feed_sinks(record)
        self._event("end", position, spec, record)
        return self.options.fail_fast and record["status"] not in ("ok", "skipped")

    def _feed_sinks(self, record: dict) -> None:
        for i, sink in enumerate(self.sinks):
            try:
                sink(record)
            except Exception as e:  # noqa: BLE001 - a sink's failure never costs a record or the grid
                if i in self._failed_sinks:
                    continue
                self._failed_sinks.add(i)
                name = getattr(sink, "__qualname__", None) or type(sink).__name__
                msg = (f"warning: record sink {name} failed ({type(e).__name__}: {e}); the record is in "
                       f"{self.out_dir / RESULTS_FILE}, and this sink's later failures are not reported")
                self.summary.sink_failures.append(msg)
                self._event("note", 0, None, msg)


def memory_fields(registry, spec: CellSpec, fit=None) -> dict:
    """The record's memory-model keys: the prediction for the cell as run, and the micro-batch search."""
    r = spec.recipe
    world = spec.nproc * spec.nnodes
    micro = r.batch_size // (world * r.grad_accum)
    fields = {"micro_batch": micro, "memory_predicted_bytes": None}
    if fit is not None:
        fields["micro_batch_search"] = fit.to_dict()
    if registry is None:
        return fields
    try:
        pred = predict_cell(registry, spec, micro_batch=micro, nproc=world)
    except Exception as e:  # noqa: BLE001 - a model the meta device cannot build still runs, unpredicted
        fields["memory_predicted"] = {"error": f"{type(e).__name__}: {e}"}
        return fields
    fields["memory_predicted_bytes"] = pred.device_bytes
    fields["memory_predicted"] = {"breakdown": pred.breakdown, "tree_bytes": pred.tree_bytes,
                                  "state_bytes": pred.state_bytes, "activation_bytes": pred.activation_bytes,
                                  "peak_phase": pred.peak_phase, "phases": pred.phases}
    return fields


def read_environment(out_dir: str | os.PathLike) -> dict:
    """The environment a result set was written in (``{}`` when it has none or it is unreadable)."""
    try:
        data = json.loads((Path(out_dir) / ENVIRONMENT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
