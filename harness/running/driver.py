"""Running a list of cells into a result set, one fresh process per cell."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ftbench.harness.cell import reaper
from ftbench.harness.running import launch
from ftbench.harness.running.prepare import pin_extensions_dir, prepare_engines
from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.running.cellproc import run_cell_process
from ftbench.harness.running.nodes import NodeGroup, NodeLost, multi_node
from ftbench.harness.contract.config import CellSpec, Launch
from ftbench.harness.grid.expand import INTERLEAVED, order_repeats
from ftbench.harness.results.record import build_record
from ftbench.harness.results.recovery import ResultsNotWritten, keep_record, restore_into
from ftbench.harness.results.store import append_record, finished_keys, read_records

LOCK_FILE = ".ftbench.lock"
#: Where ``--profile`` traces go inside a result set.
TRACES_DIR = "traces"


@dataclass
class RunSummary:
    records: list[dict] = field(default_factory=list)
    skipped_done: int = 0
    interrupted: bool = False
    #: Unreadable lines of an existing results.jsonl (their cells are rerun).
    problems: list[str] = field(default_factory=list)
    #: One-off preparations of the grid's engines (see ftbench.harness.running.prepare), before any cell.
    prepared: list[dict] = field(default_factory=list)
    #: Records put back from a recovery set (kept there when an earlier run could not write them).
    restored: int = 0


def prepare_out_dir(out: str | os.PathLike) -> Path:
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


def _write_atomic(path: Path, text: str) -> None:
    # A kill mid-write must leave the previous file, not half a new one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class OutputLock:
    """An exclusive lock on a result set, so two runs cannot interleave writes."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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


def _open_result_set(out_dir: Path, environment: dict) -> int:
    """Write the environment and put back records an earlier run could not write; how many came back."""
    try:
        _write_atomic(out_dir / "environment.json", json.dumps(environment, indent=2, default=str))
    except OSError as e:
        raise FtbenchError(f"cannot write {out_dir / 'environment.json'} ({e.strerror or e}); free space there or "
                           "pass --out on a writable file system with room (no cell has run)") from None
    try:
        return restore_into(out_dir)[0]
    except OSError as e:
        raise FtbenchError(f"cannot put the recovered records back into {out_dir} ({e.strerror or e}); free "
                           "space there first (the recovered records stay where they are)") from None


def _append_or_keep(out_dir: Path, record: dict, environment: dict, cell_id: str) -> None:
    try:
        append_record(out_dir, record)
    except OSError as e:  # full disk, read-only or vanished --out: keep the record, stop cleanly
        raise ResultsNotWritten(out_dir, e, keep_record(out_dir, record, environment), cell_id) from None


def run_cells(cells: list[CellSpec], out: str | os.PathLike, environment: dict, *, force: bool = False,
              fail_fast: bool = False, progress=None, annotate=None, registry=None,
              search_micro_batch: bool = False, order: str = INTERLEAVED, nodes: Launch | None = None) -> RunSummary:
    """Run every cell not already in ``out`` and append its record.

    ``order`` arranges the repeats (:func:`~ftbench.harness.grid.expand.order_repeats`):
    round-robin by default.  Each record keeps its place in that order
    (``run_order``) next to its ``started_at``.

    ``progress`` receives events ``("start"|"end"|"skip"|"probe", index, total, spec, record)``;
    ``annotate(record, earlier_records)`` may add fields (e.g. loss parity)
    before the record is written.  With a ``registry`` every record gets the
    memory model's ``memory_predicted_bytes``; ``search_micro_batch`` first
    finds each cell's largest fitting micro-batch with probe cells
    (:mod:`ftbench.harness.running.fit`), once per cell for all its repeats
    (single-node cells).  ``nodes`` holds the multi-node settings (a
    :class:`~ftbench.harness.contract.config.Launch`): with ``nnodes`` > 1 this
    driver is one node of the grid (:mod:`.nodes`), and a node other than 0
    writes nothing to ``out``.
    """
    cells = order_repeats(cells, order)
    group = NodeGroup.from_launcher(nodes or Launch())
    reaper.become_subreaper()
    os.environ[reaper.DRIVER_PID_ENV] = str(os.getpid())  # before the first cell (or fork server) starts
    if group is not None and not group.leader:
        return _follow(cells, group, progress)
    out_dir = prepare_out_dir(out)
    summary = RunSummary()
    with OutputLock(out_dir):
        if group is not None:
            group.rendezvous(cells)  # before anything is written: a mismatched grid leaves no trace
        try:
            _lead(cells, out_dir, environment, summary, force, fail_fast, progress, annotate, registry,
                  search_micro_batch, order, group)
        finally:
            if group is not None:
                group.stop_all()
                group.farewell()
    return summary


def _lead(cells, out_dir, environment, summary, force, fail_fast, progress, annotate, registry,
          search_micro_batch, order, group) -> None:
    summary.restored = _open_result_set(out_dir, environment)
    if summary.restored and progress:
        progress("note", 0, len(cells), None, f"put back {summary.restored} record(s) an earlier run kept")
    done = set() if force else finished_keys(out_dir)
    earlier = []
    fits: dict = {}
    if (out_dir / "results.jsonl").exists():
        earlier = _existing(out_dir, summary, progress, len(cells))
        if search_micro_batch:
            fits.update(_earlier_searches(earlier))
    total = len(cells)
    if progress:
        progress("warmup", 0, total, None, None)
    summary.prepared = _start_grid([c for c in cells if (c.cell_id, c.repeat) not in done], out_dir, environment,
                                   progress)
    k = -1  # index among the multi-node cells, which every node counts alike
    for i, spec in enumerate(cells, start=1):
        spread = group is not None and multi_node(spec)
        k += spread
        if (spec.cell_id, spec.repeat) in done:
            if spread:
                group.announce(k, spec, run=False)
            summary.skipped_done += 1
            if progress:
                progress("skip", i, total, spec, None)
            continue
        if progress:
            progress("start", i, total, spec, None)
        if spread:
            spec, record = _measure_spread(spec, group, k, environment)
        else:
            spec, record = _measure(spec, out_dir, environment, registry, fits if search_micro_batch else None,
                                    progress, i, total)
        record["run_order"] = {"order": order, "position": i, "of": total}
        if annotate:
            annotate(record, earlier)
        _append_or_keep(out_dir, record, environment, spec.cell_id)
        earlier.append(record)
        summary.records.append(record)
        if progress:
            progress("end", i, total, spec, record)
        if fail_fast and record["status"] not in ("ok", "skipped"):
            break


def _measure(spec: CellSpec, out_dir: Path, environment: dict, registry, fits: dict | None, progress, i: int,
             total: int) -> tuple[CellSpec, dict]:
    """Run one cell (at its fitting micro-batch when ``fits`` searches them) and build its record."""
    if spec.profile_steps:
        spec = spec.with_(profile_dir=str((out_dir / TRACES_DIR).resolve()))
    started = time.time()
    spec, fit = _fit(registry, spec, fits, progress, i, total) if fits is not None else (spec, None)
    outcome = _no_fit_outcome(fit) if fit and fit.micro_batch is None else run_cell_process(spec)
    if fit and fit.micro_batch and outcome.status == "oom":
        spec, outcome = _smaller(spec, fit, outcome)
    record = build_record(spec, outcome, environment, started)
    record.update(memory_fields(registry, spec, fit))
    return spec, record


def _measure_spread(spec: CellSpec, group, k: int, environment: dict) -> tuple[CellSpec, dict]:
    """Node 0's share of multi-node cell ``k``, with the other nodes told to start theirs; its record."""
    started = time.time()
    outcome = run_cell_process(group.announce(k, spec, run=True), env_extra=group.cell_env(spec),
                               abort_if=group.leader_watch(k))
    group.finished(k, outcome.status)
    record = build_record(spec, outcome, environment, started)
    record.update(memory_fields(None, spec))
    return spec, record


def _existing(out_dir: Path, summary: RunSummary, progress, total: int) -> list[dict]:
    """The records already in ``out_dir``; unreadable lines become the summary's problems."""
    existing = read_records(out_dir)
    summary.problems = existing.problems
    if progress:
        for problem in existing.problems:
            progress("problem", 0, total, None, problem)
    return existing.records


def _follow(cells, group, progress) -> RunSummary:
    """A node other than 0: run this node's share of each multi-node cell node 0 starts; record nothing."""
    summary = RunSummary()
    group.rendezvous(cells)
    pin_extensions_dir()  # as node 0 does: the ranks of one world build and load native ops alike
    shared = [c for c in cells if multi_node(c)]
    try:
        for k, spec in enumerate(shared):
            try:
                mine = group.next_cell(k, spec)
            except FtbenchError:
                raise
            except Exception as e:  # noqa: BLE001 - the store's connection to node 0 broke
                raise NodeLost(f"node 0 is gone ({str(e).splitlines()[0][:120]}); this node stops too") from None
            if mine is None:
                break
            if mine is False:
                summary.skipped_done += 1
                if progress:
                    progress("follow-skip", k + 1, len(shared), spec, None)
                continue
            if progress:
                progress("follow-start", k + 1, len(shared), spec, None)
            outcome = run_cell_process(mine, env_extra=group.cell_env(spec), abort_if=group.follower_watch(k))
            if progress:
                progress("follow-end", k + 1, len(shared), spec, outcome)
    finally:
        group.close()
        group.say_bye()
    return summary


def _start_grid(pending: list[CellSpec], out_dir: Path, environment: dict, progress) -> list[dict]:
    """Start the fork server and do the engines' one-off work before the first cell."""
    pin_extensions_dir()  # inherited by the fork server and every cell
    launch.warm_up(pending)
    if not pending:
        return []
    prepared = prepare_engines(pending, launch.context_for(pending), progress)
    if prepared:  # reported once per grid, not in any cell's setup_s
        try:
            _write_atomic(out_dir / "environment.json",
                          json.dumps({**environment, "prepared": prepared}, indent=2, default=str))
        except OSError:
            pass  # the report is informational; the progress line already showed it
    return prepared


def _fit(registry, spec: CellSpec, fits: dict, progress, i: int, total: int):
    """``spec`` at its largest fitting micro-batch (searched once per cell, shared by repeats)."""
    from ftbench.harness.grid.microbatch import with_micro_batch
    from ftbench.harness.running.fit import search_micro_batch

    if spec.cell_id not in fits:
        def on_probe(probe):
            if progress:
                progress("probe", i, total, spec, probe)

        fits[spec.cell_id] = search_micro_batch(registry, spec, on_probe=on_probe)
    fit = fits[spec.cell_id]
    return (with_micro_batch(spec, fit.micro_batch) if fit.micro_batch else spec), fit


def _earlier_searches(records: list[dict]) -> dict:
    """Micro-batch searches a resumed grid's records hold, by planned cell id: repeats still to run reuse them."""
    from ftbench.harness.running.fit import FitResult

    fits = {}
    for r in records:
        fit = FitResult.from_record(r)
        if fit is not None and fit.micro_batch:
            fit.note = "; ".join(filter(None, [fit.note, "found by an earlier run of this result set"]))
            fits[fit.cell_id] = fit
    return fits


def _smaller(spec: CellSpec, fit, outcome):
    """The full run outgrew what its probe fitted in: once more at the next smaller micro-batch."""
    from ftbench.harness.grid.memplan import divisors
    from ftbench.harness.grid.microbatch import per_rank_batch, with_micro_batch

    below = [d for d in divisors(per_rank_batch(spec)) if d < fit.micro_batch]
    fit.note = (f"the full run at micro-batch {fit.micro_batch} ran out of memory after its probe fitted"
                + (f"; rerun at {below[-1]}" if below else ""))
    if not below:
        return spec, outcome
    fit.micro_batch = below[-1]
    smaller = with_micro_batch(spec, below[-1])
    return smaller, run_cell_process(smaller)


def _no_fit_outcome(fit):
    from ftbench.harness.running.cellproc import CellOutcome

    tried = ", ".join(f"{p['micro_batch']}: {p['status']}" for p in fit.probes)
    return CellOutcome(ranks=[], status="oom", error=f"no micro-batch fits under the memory limit ({fit.note}; "
                       f"probes {tried}); use a backend that shards or offloads, or --grad-checkpointing",
                       wall_s=0.0, returncode=None, tree_peak_bytes=0)


def memory_fields(registry, spec: CellSpec, fit=None) -> dict:
    """The record's memory-model keys: the prediction for the cell as run, and the micro-batch search."""
    fields = {"micro_batch": spec.micro_batch, "memory_predicted_bytes": None}
    if fit is not None:
        fields["micro_batch_search"] = fit.to_dict()
    if registry is None:
        return fields
    from ftbench.harness.grid.memplan import predict_cell

    try:
        pred = predict_cell(registry, spec)
    except Exception as e:  # noqa: BLE001 - a model the meta device cannot build still runs, unpredicted
        fields["memory_predicted"] = {"error": f"{type(e).__name__}: {e}"}
        return fields
    fields["memory_predicted_bytes"] = pred.device_bytes
    fields["memory_predicted"] = {"breakdown": pred.breakdown, "tree_bytes": pred.tree_bytes,
                                  "state_bytes": pred.state_bytes, "activation_bytes": pred.activation_bytes,
                                  "peak_phase": pred.peak_phase, "phases": pred.phases}
    return fields
