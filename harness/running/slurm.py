"""Running a grid's cells as Slurm jobs (``ftbench run --launcher slurm``).

The driver stays where the user started it (a login node): it submits the
cells that are not yet in the result set as job arrays through
`submitit <https://github.com/facebookincubator/submitit>`_, one array per
shape of job (nodes x ranks), and writes each record itself as its job ends,
through the same :class:`~ftbench.harness.results.writer.ResultSetWriter` as
the local launcher, so with the same guarantees (lock, environment, resume,
recovered records put back, a full disk's record kept and exit 3, memory
prediction and run order in every record, fail-fast).  A job that Slurm
ends without a result (cancelled, preempted, timed out, out of memory, a
failed node) becomes a record whose status says so.  Ctrl-C, fail-fast and
a record that cannot be written cancel every job this run submitted.

Inside a job, the cell runs exactly as on the local launcher (its own
process tree, torchrun for several ranks); a multi-node job runs one task
per node, each starting its node's share of the world under torchrun.

Example::

    ftbench run --grid grids/nightly.yaml --launcher slurm --slurm-partition gpu \\
        --slurm-time 30m --slurm-gpus-per-node 8 --slurm-option account=perf --out runs/nightly
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ftbench.harness.cell import reaper
from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.config import CellSpec
from ftbench.harness.results.record import build_record
from ftbench.harness.results.writer import ResultSetWriter, RunSummary, WriteOptions
from ftbench.harness.grid.slurm_options import SlurmOptions
from ftbench.harness.running.cellproc import CellOutcome, run_cell_process

#: Slurm job states of a job that has not ended yet (squeue/scontrol/sacct spelling).
_ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
           "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "PREEMPTED_REQUEUE"}
#: A job that ended without a result, by its final state: (record status, what happened).
_ENDED = {
    "CANCELLED": ("cancelled", "was cancelled (scancel, or an administrator) before the cell finished"),
    "PREEMPTED": ("cancelled", "was preempted by a higher-priority job before the cell finished"),
    "TIMEOUT": ("timeout", "ran past its Slurm time limit (raise --slurm-time)"),
    "DEADLINE": ("timeout", "reached its deadline before the cell finished"),
    "OUT_OF_MEMORY": ("oom", "ran out of the memory Slurm granted it (pass --slurm-option mem=...)"),
    "NODE_FAIL": ("error", "lost its node (NODE_FAIL)"),
    "BOOT_FAIL": ("error", "could not boot its node (BOOT_FAIL)"),
    "FAILED": ("error", "failed before the cell could report (see the job's log)"),
    "COMPLETED": ("error", "completed without returning a result (see the job's log)"),
}


# ------------------------------------------------------------------ checks


def check_slurm(opts: SlurmOptions) -> None:
    """Everything that can be known before submitting: raise one :class:`FtbenchError` naming the fix."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise FtbenchError("--launcher slurm needs the submitit package, which is not installed; install it with "
                           "pip install 'ftbench[slurm]' (or pip install submitit), or run with --launcher "
                           "local") from None
    if shutil.which("sbatch") is None:
        raise FtbenchError("--launcher slurm needs Slurm's sbatch on PATH, and there is none here; run ftbench "
                           "on a machine that can submit jobs (a cluster's login node), or add Slurm's bin "
                           "directory to PATH, or run with --launcher local")
    for key, value, low in (("nodes", opts.nodes, 1), ("gpus_per_node", opts.gpus_per_node, 0),
                            ("parallelism", opts.parallelism, 1), ("cpus_per_task", cpus_per_task(opts, 1), 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
            where = ("--slurm-option cpus-per-task=N or the grid's slurm.cpus_per_task" if key == "cpus_per_task"
                     else f"--slurm-{key.replace('_', '-')}")
            raise FtbenchError(f"invalid Slurm {key}={value!r}: must be an integer >= {low} ({where})")
    known = sbatch_options()
    for key in opts.options:
        if key in _OWNED:
            raise FtbenchError(f"--slurm-option {key} is set by ftbench itself ({_OWNED[key]}); leave it out")
        if known and key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FtbenchError(f"unknown Slurm option {key!r}{hint}: --slurm-option takes sbatch's long options "
                               f"without the dashes, e.g. --slurm-option account=perf; 'sbatch --help' lists them")


#: sbatch options ftbench sets from its own flags or needs for itself.
_OWNED = {"array": "one array task per cell", "partition": "use --slurm-partition", "p": "use --slurm-partition",
          "time": "use --slurm-time", "t": "use --slurm-time", "nodes": "use --slurm-nodes", "N": "use --slurm-nodes",
          "gpus-per-node": "use --slurm-gpus-per-node", "output": "logs go to OUT/slurm/",
          "error": "logs go to OUT/slurm/", "ntasks-per-node": "one task per node"}

#: Spellings of sbatch's --cpus-per-task in --slurm-option.
_CPUS = ("cpus-per-task", "c")


def cpus_per_task(opts: SlurmOptions, nproc: int):
    """CPUs each job asks for: ``--slurm-option cpus-per-task=N``, else the grid's
    ``slurm.cpus_per_task``, else one per rank (``nproc``)."""
    for key in _CPUS:
        if key in opts.options:
            value = opts.options[key]
            try:
                return int(value)
            except (TypeError, ValueError):
                return value  # check_slurm names it
    return opts.cpus_per_task if opts.cpus_per_task is not None else nproc


def sbatch_options() -> set[str]:
    """Long option names the installed sbatch knows (from ``sbatch --help``); empty when it cannot say."""
    try:
        text = subprocess.run(["sbatch", "--help"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return set(re.findall(r"--([a-z][a-z0-9-]*)", text))


# ------------------------------------------------------------------ in the job


def job_main(spec_dict: dict):
    """What an array task runs: one cell, as the local launcher runs it; the outcome for the driver.

    In a multi-node job every node's task starts its share of the world and
    only the first node's task returns the outcome.
    """
    reaper.become_subreaper()
    os.environ[reaper.DRIVER_PID_ENV] = str(os.getpid())  # the cell dies with the job
    spec = CellSpec.from_dict(spec_dict)
    node = {"job_id": os.environ.get("SLURM_JOB_ID"), "host": os.uname().nodename}
    if spec.nnodes > 1:
        import submitit  # optional dependency (ftbench[slurm]), installed only where Slurm is used

        env = submitit.JobEnvironment()
        port = 20000 + int(str(env.job_id).split("_")[0]) % 20000  # same on every node of the job
        spec = spec.with_(launcher=spec.launcher.with_(node_rank=env.node, master_addr=env.hostnames[0],
                                                       master_port=port))
        outcome = run_cell_process(spec)
        return (outcome, node) if env.global_rank == 0 else None
    return run_cell_process(spec), node


# ------------------------------------------------------------------ the driver


@dataclass
class _Pending:
    index: int  # position in the grid's order
    spec: object
    job: object
    first_seen_ended: float | None = None


def run_cells_slurm(cells, out, environment: dict, opts: SlurmOptions,
                    write: WriteOptions = WriteOptions()) -> RunSummary:
    """Submit every cell not already in ``out`` and append each record as its job ends."""
    with ResultSetWriter(out, environment, cells, write) as writer:
        writer.open()
        todo = []
        for i, spec in writer.cells:
            if writer.finished(spec):
                writer.skip(i, spec)
            else:
                todo.append((i, spec))
        if not todo:
            return writer.summary
        pending = _submit(todo, writer.out_dir, opts)
        if write.progress:
            write.progress("submitted", len(pending), writer.total, None, sorted({_array_id(p.job) for p in pending}))
        try:
            _collect(pending, writer)
        except _FailFast:
            _cancel(pending)
        except BaseException:
            _cancel(pending)  # Ctrl-C, SIGTERM, a record --out cannot take, or a bug: nothing keeps running
            raise
    return writer.summary


def _submit(todo, out_dir: Path, opts: SlurmOptions) -> list[_Pending]:
    import submitit  # optional dependency (ftbench[slurm]); check_slurm has made sure it is there

    folder = out_dir / "slurm" / time.strftime("%Y%m%d-%H%M%S")
    groups: dict = {}
    for i, spec in todo:
        groups.setdefault((spec.nnodes, spec.nproc), []).append((i, spec))
    pending = []
    for (nnodes, nproc), items in groups.items():
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
        limit = max((s.time_limit_s or 900.0) for _, s in items)
        minutes = math.ceil((opts.time_s or limit + 300) / 60)
        extra = {k: v for k, v in opts.options.items() if k not in _CPUS}
        params = dict(job_name="ftbench", time=minutes, nodes=nnodes, ntasks_per_node=1,
                      cpus_per_task=cpus_per_task(opts, nproc),
                      array_parallelism=opts.parallelism, additional_parameters=extra,
                      signal_delay_s=30, stderr_to_stdout=True)
        if opts.partition:
            params["partition"] = opts.partition
        if opts.gpus_per_node is not None:
            params["gpus_per_node"] = opts.gpus_per_node
        executor.update_parameters(**params)
        try:
            jobs = executor.map_array(job_main, [s.to_dict() for _, s in items])
        except Exception as e:  # noqa: BLE001 - sbatch's refusal, verbatim
            _cancel(pending)
            raise FtbenchError(f"Slurm refused the jobs: {str(e).strip()[-600:]}; fix the --slurm-* options "
                               "(partition, time, gpus) or the cluster's limits, and run the same command "
                               "again") from None
        pending += [_Pending(i, s, job) for (i, s), job in zip(items, jobs)]
    return pending


def _collect(pending, writer: ResultSetWriter) -> None:
    """Write each job's record through ``writer`` as it ends; raise :class:`_FailFast` when it says stop."""
    outcomes: dict = {}  # grid index -> (record, spec)
    waiting = {p.index for p in pending}
    by_fingerprint: dict = {}
    for p in pending:
        by_fingerprint.setdefault(p.spec.fingerprint(), []).append(p.index)
    started = {}
    while waiting:
        states = job_states(sorted({_array_id(p.job) for p in pending if p.index in waiting}))
        for p in pending:
            if p.index not in waiting or p.index in outcomes:
                continue
            state = states.get(p.job.job_id, "UNKNOWN")
            if state == "RUNNING" and p.index not in started:
                started[p.index] = time.time()
            rec = _finished(p, state, writer.environment, started.get(p.index))
            if rec is not None:
                outcomes[p.index] = rec
        # Write in completion order, except that a cell waits for the earlier cells of its recipe
        # (the grid puts the parity reference first), so that parity always has its reference.
        for index in sorted(outcomes):
            if index not in waiting:
                continue
            record, spec = outcomes[index]
            if any(j < index and j in waiting for j in by_fingerprint[spec.fingerprint()]):
                continue
            waiting.discard(index)
            if writer.write(index, spec, record):
                raise _FailFast()
        if waiting:
            time.sleep(1.0)


class _FailFast(Exception):
    pass


def _finished(p: _Pending, state: str, environment: dict, started: float | None):
    """The record of a job that has ended, else None.

    Slurm's word wins over a failed cell's: a cancelled or timed-out job
    kills its cell, which then reports some signal or a broken pipe.
    """
    job = p.job
    base = state.split()[0] if state else "UNKNOWN"
    active = base in _ACTIVE or base == "UNKNOWN"
    outcome, node, failure = None, {}, None
    if job.paths.result_pickle.exists():
        try:
            outcome, node = job.result()
        except Exception as e:  # noqa: BLE001 - the job's own exception (e.g. ftbench not importable there)
            failure = f"Slurm job {job.job_id} failed: {str(e).strip().splitlines()[-1][:300]}"
        if outcome is not None and outcome.status == "ok":
            return _from_outcome(p, outcome, node, environment, started), p.spec
    elif active:
        return None
    # Ended without a good outcome: give Slurm a moment to settle the job's final state (and a shared file
    # system to show a result file that is on its way).
    now = time.monotonic()
    if p.first_seen_ended is None:
        p.first_seen_ended = now
    if (active or base not in _ENDED) and now - p.first_seen_ended < (30 if active else 5):
        return None
    if base in _ENDED and base not in ("COMPLETED", "FAILED"):
        status, what = _ENDED[base]
        return _record_without_outcome(p, status, f"Slurm job {job.job_id} {what}", environment, base), p.spec
    if outcome is not None:
        return _from_outcome(p, outcome, node, environment, started), p.spec
    if failure:
        return _record_without_outcome(p, "error", failure, environment, base), p.spec
    status, what = _ENDED.get(base, ("error", f"ended in state {base}"))
    return _record_without_outcome(p, status, f"Slurm job {job.job_id} {what}", environment, base), p.spec


def _from_outcome(p: _Pending, outcome, node: dict, environment: dict, started) -> dict:
    record = build_record(p.spec, outcome, environment, started or time.time() - outcome.wall_s)
    record["slurm"] = {"job_id": p.job.job_id, "state": "COMPLETED", "host": node.get("host")}
    return record


def _record_without_outcome(p: _Pending, status: str, message: str, environment: dict, state: str) -> dict:
    log = _log_tail(p.job)
    outcome = CellOutcome(ranks=[], status=status, error=message, wall_s=0.0, returncode=None, tree_peak_bytes=0,
                          stderr_tail=log)
    record = build_record(p.spec, outcome, environment, time.time())
    record["slurm"] = {"job_id": p.job.job_id, "state": state}
    return record


def _log_tail(job, n: int = 2000) -> str:
    try:
        return (job.stdout() or "")[-n:]
    except OSError:
        return ""


def _array_id(job) -> str:
    return str(job.job_id).split("_")[0]


def job_states(array_ids: list[str]) -> dict[str, str]:
    """``"123_4" -> "RUNNING"`` for every task of the given arrays.

    ``scontrol`` answers without an accounting database (and keeps ended jobs
    for ``MinJobAge``); ``sacct`` covers jobs that ``scontrol`` has forgotten.
    """
    states: dict[str, str] = {}
    for aid in array_ids:
        try:
            text = subprocess.run(["scontrol", "show", "job", "-o", aid], capture_output=True, text=True,
                                  timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
        for line in text.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            task, state = fields.get("ArrayTaskId"), fields.get("JobState")
            if fields.get("ArrayJobId") == aid and state and task and task.isdigit():
                states[f"{aid}_{task}"] = state
            elif fields.get("JobId") == aid and state:
                states[aid] = state  # submitit submits a single cell as a plain job
        if not text.strip():
            states.update(_sacct_states(aid))
    return states


def _sacct_states(aid: str) -> dict[str, str]:
    try:
        text = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", aid], capture_output=True,
                              text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    out = {}
    for line in text.splitlines():
        job_id, _, state = line.partition("|")
        if job_id == aid or ("_" in job_id and job_id.split("_")[1].isdigit()):
            out[job_id] = state.split()[0] if state else "UNKNOWN"
    return out


def _cancel(pending) -> None:
    ids = sorted({_array_id(p.job) for p in pending})
    if ids:
        try:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            pass
