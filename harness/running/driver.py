"""Running a list of cells into a result set, one fresh process per cell.

The result set itself is written by :class:`ftbench.harness.results.writer.ResultSetWriter`
(lock, environment, resume, appends, fail-fast), as for every launcher; this
module decides what runs where: here, or across nodes (:mod:`.nodes`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from ftbench.harness.cell import reaper
from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.config import CellSpec, Launch
from ftbench.harness.grid.expand import order_repeats
from ftbench.harness.grid.memplan import divisors
from ftbench.harness.grid.microbatch import per_rank_batch, with_micro_batch
from ftbench.harness.results.record import build_record
from ftbench.harness.results.writer import ResultSetWriter, RunSummary, WriteOptions
from ftbench.harness.running import launch
from ftbench.harness.running.cellproc import CellOutcome, run_cell_process
from ftbench.harness.running.fit import FitResult, search_micro_batch
from ftbench.harness.running.nodes import NodeGroup, NodeLost, multi_node
from ftbench.harness.running.prepare import pin_extensions_dir, prepare_engines

#: Where ``--profile`` traces go inside a result set.
TRACES_DIR = "traces"


@dataclass(frozen=True)
class RunOptions:
    """How :func:`run_cells` runs a grid.

    Example: ``RunOptions(WriteOptions(force=True), search_micro_batch=True, nodes={"nnodes": 2, "node_rank": 0})``.
    """

    #: How the result set is written (resume, order, fail-fast, annotations, predictions, progress).
    write: WriteOptions = field(default_factory=WriteOptions)
    #: Find each cell's largest fitting micro-batch with probe cells first (single-node cells).
    search_micro_batch: bool = False
    #: Multi-node settings (``nnodes``, ``node_rank``, ``master_addr``, ``master_port``).
    nodes: Launch | None = None


def run_cells(cells: list[CellSpec], out: str | os.PathLike, environment: dict,
              options: RunOptions = RunOptions()) -> RunSummary:
    """Run every cell not already in ``out`` and append its record.

    ``options.write.order`` arranges the repeats (round-robin by default);
    with ``options.search_micro_batch`` each cell first finds its largest
    fitting micro-batch with probe cells (:mod:`ftbench.harness.running.fit`),
    once per cell for all its repeats.  With ``options.nodes["nnodes"]`` > 1
    this driver is one node of the grid (:mod:`.nodes`), and a node other
    than 0 writes nothing to ``out``.
    """
    group = NodeGroup.from_launcher(options.nodes or Launch())
    reaper.become_subreaper()
    os.environ[reaper.DRIVER_PID_ENV] = str(os.getpid())  # before the first cell (or fork server) starts
    if group is not None and not group.leader:
        return _follow(order_repeats(cells, options.write.order), group, options.write.progress)
    progress = options.write.progress
    with ResultSetWriter(out, environment, cells, options.write) as writer:
        if group is not None:  # before anything is written: a mismatched grid leaves no trace
            group.rendezvous([spec for _, spec in writer.cells],
                             lambda line: progress and progress("note", 0, len(cells), None, line))
        try:
            _lead(writer, options.search_micro_batch, group)
        finally:
            if group is not None:
                group.stop_all()
                group.farewell()
    return writer.summary


def _lead(writer: ResultSetWriter, search: bool, group: NodeGroup | None) -> None:
    """Run the cells here (node 0's share of multi-node ones) and write each record."""
    writer.open()
    progress = writer.options.progress
    fits: dict = _earlier_searches(writer.records) if search else {}
    if progress:
        progress("warmup", 0, writer.total, None, None)
    writer.note_prepared(*_start_grid(writer.pending(), progress))
    k = -1  # index among the multi-node cells, which every node counts alike
    for i, spec in writer.cells:
        spread = group is not None and multi_node(spec)
        k += spread
        if writer.finished(spec):
            if spread:
                group.announce(k, spec, run=False)
            writer.skip(i, spec)
            continue
        if progress:
            progress("start", i, writer.total, spec, None)
        if spread:
            spec, record, fit = _measure_spread(spec, group, k, writer.environment)
        else:
            spec, record, fit = _measure(writer, i, spec, fits if search else None)
        if writer.write(i, spec, record, fit):
            break


def _measure(writer: ResultSetWriter, i: int, spec: CellSpec, fits: dict | None):
    """Run one cell (at its fitting micro-batch when ``fits`` searches them); the spec as run, record, search."""
    if spec.profile_steps:
        spec = spec.with_(profile_dir=str((writer.out_dir / TRACES_DIR).resolve()))
    started = time.time()
    fit = None
    if fits is not None:
        spec, fit = _fit(writer.options.registry, spec, fits, writer.options.progress, i, writer.total)
    outcome = _no_fit_outcome(fit) if fit and fit.micro_batch is None else run_cell_process(spec)
    if fit and fit.micro_batch and outcome.status == "oom":
        spec, outcome = _smaller(spec, fit, outcome)
    return spec, build_record(spec, outcome, writer.environment, started), fit


def _measure_spread(spec: CellSpec, group, k: int, environment: dict):
    """Node 0's share of multi-node cell ``k``, with the other nodes told to start theirs; its record."""
    started = time.time()
    outcome = run_cell_process(group.announce(k, spec, run=True), env_extra=group.cell_env(spec),
                               abort_if=group.leader_watch())
    outcome.launch = {**(outcome.launch or {}), **group.launch_details(k)}
    group.finished(k, outcome.status)
    return spec, build_record(spec, outcome, environment, started), None


def _follow(cells, group, progress) -> RunSummary:
    """A node other than 0: run this node's share of each multi-node cell node 0 starts; record nothing."""
    summary = RunSummary()
    group.rendezvous(cells, lambda line: progress and progress("note", 0, len(cells), None, line))
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


def _start_grid(pending: list[CellSpec], progress) -> tuple[list[dict], dict | None]:
    """Start the fork server and do the engines' one-off work before the first cell; returns the
    preparations' reports and what the fork server's CUDA probe found."""
    pin_extensions_dir()  # inherited by the fork server and every cell
    probe = launch.warm_up(pending)
    if not pending:
        return [], probe
    return prepare_engines(pending, launch.context_for(pending), progress), probe


def _fit(registry, spec: CellSpec, fits: dict, progress, i: int, total: int):
    """``spec`` at its largest fitting micro-batch (searched once per cell, shared by repeats)."""
    if spec.cell_id not in fits:
        def on_probe(probe):
            if progress:
                progress("probe", i, total, spec, probe)

        fits[spec.cell_id] = search_micro_batch(registry, spec, on_probe=on_probe)
    fit = fits[spec.cell_id]
    return (with_micro_batch(spec, fit.micro_batch) if fit.micro_batch else spec), fit


def _earlier_searches(records: list[dict]) -> dict:
    """Micro-batch searches a resumed grid's records hold, by planned cell id: repeats still to run reuse them."""
    fits = {}
    for r in records:
        fit = FitResult.from_record(r)
        if fit is not None and fit.micro_batch:
            fit.note = "; ".join(filter(None, [fit.note, "found by an earlier run of this result set"]))
            fits[fit.cell_id] = fit
    return fits


def _smaller(spec: CellSpec, fit, outcome):
    """The full run outgrew what its probe fitted in: once more at the next smaller micro-batch."""
    below = [d for d in divisors(per_rank_batch(spec)) if d < fit.micro_batch]
    fit.note = (f"the full run at micro-batch {fit.micro_batch} ran out of memory after its probe fitted"
                + (f"; rerun at {below[-1]}" if below else ""))
    if not below:
        return spec, outcome
    fit.micro_batch = below[-1]
    smaller = with_micro_batch(spec, below[-1])
    return smaller, run_cell_process(smaller)


def _no_fit_outcome(fit):
    tried = ", ".join(f"{p['micro_batch']}: {p['status']}" for p in fit.probes)
    return CellOutcome(ranks=[], status="oom", error=f"no micro-batch fits under the memory limit ({fit.note}; "
                       f"probes {tried}); use a backend that shards or offloads, or --grad-checkpointing",
                       wall_s=0.0, returncode=None, tree_peak_bytes=0)
