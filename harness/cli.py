"""The ``ftbench`` command line (click for parsing, rich for output).

Errors caused by the user's input (:class:`ftbench.harness.contract.api.FtbenchError`) print
one paragraph naming the problem and the fix, and exit with status 2.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import click
from rich.markup import escape

from ftbench.harness.analysis.abtest import checkout_root, run_ab
from ftbench.harness.analysis.calibrate import calibrate
from ftbench.harness.analysis.calibration import write_calibration
from ftbench.harness.analysis.compare import DEFAULT_ALPHA, compare_sets, parse_threshold, print_comparison
from ftbench.harness.analysis.historyreport import print_history, write_history
from ftbench.harness.analysis.outputs import refuse_record_files
from ftbench.harness.analysis.report import print_table, write_report
from ftbench.harness.analysis.report_terminal import print_terminal_tables
from ftbench.harness.analysis.resultset import merge_result_sets
from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.config import Launch
from ftbench.harness.contract.environment import collect
from ftbench.harness.contract.gpus import parse_gpu
from ftbench.harness.contract.registry import Registry
from ftbench.harness.grid.expand import SWEEPABLE, order_repeats
from ftbench.harness.grid.files import build_grid, parse_duration, select_shard
from ftbench.harness.grid.microbatch import AUTO, apply_micro_batch, parse_micro_batch
from ftbench.harness.grid.request import GridRequest, distinct, parse_sweep
from ftbench.harness.results.parity import annotate_parity
from ftbench.harness.results.recovery import EXIT_RESULTS_NOT_WRITTEN, ResultsNotWritten, check_free_space
from ftbench.harness.running.nodes import NodeLost
from ftbench.harness.running.progress import RunView, print_cells
from ftbench.harness.grid.slurm_options import SlurmOptions, options_from, parse_option_flags
from ftbench.harness.contract.optimization import local_device, opt_summary
from ftbench.harness.analysis.fairness import compare_cells, explain, select_cell
from ftbench.harness.analysis.resultset import load_result_set

EXIT_USAGE = 2
EXIT_REGRESSION = 1


def _console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped to a log or CI, rich would assume 80 columns and fold the tables;
    # a wider page keeps each cell on one line. A terminal keeps its own width.
    width = None if stream.isatty() or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, highlight=False, width=width)


class FtbenchGroup(click.Group):
    """Turns :class:`FtbenchError` into a clean message and exit status 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FtbenchError as e:
            # Escaped: a fix such as pip install 'ftbench[slurm]' must print as written.
            _console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
            ctx.exit(EXIT_USAGE)


@click.group(cls=FtbenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ftbench")
def main():
    """Benchmark full-parameter fine-tuning across tasks, backends and models."""


# ------------------------------------------------------------------ list


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_cmd(as_json):
    """Tasks, backends, optimizations, model presets and record sinks: which plugin gave each, and availability."""
    reg = Registry.load()
    data = {
        "tasks": [{"name": e.name, "plugin": e.plugin, "metric": e.obj.metric,
                   "higher_is_better": e.obj.higher_is_better, "model_kinds": list(e.obj.model_kinds),
                   "description": e.obj.description} for e in reg.tasks.values()],
        "backends": [],
        "models": [{"name": e.name, "plugin": e.plugin, "kind": e.obj.kind, "default": e.obj.default,
                    "description": e.obj.description} for e in reg.models.values()],
        "sinks": [{"name": e.name, "plugin": e.plugin, "available": e.obj.unavailable() is None,
                   "unavailable_because": e.obj.unavailable(), "options": dict(e.obj.options),
                   "description": e.obj.description} for e in reg.sinks.values()],
        "broken_plugins": [{"plugin": name, "error": error} for name, error in sorted(reg.broken.items())],
    }

    here = local_device()
    data["optimizations"] = [{"name": e.name, "plugin": e.plugin, "device": here,
                              "available": (why := reg.optimization_availability(e.name, here)) is None,
                              "unavailable_because": why, **opt_summary(e.obj)} for e in reg.optimizations.values()]
    for e in reg.backends.values():
        why = reg.backend_availability(e.name)
        data["backends"].append({"name": e.name, "plugin": e.plugin, "available": why is None,
                                 "unavailable_because": why, "preset_of": e.obj.preset_of,
                                 "options": dict(e.obj.defaults), "data_parallel": e.obj.data_parallel,
                                 "description": e.obj.description})
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    _print_list(data, here)


def _print_list(data: dict, here: str) -> None:
    """``ftbench list``'s tables: one per kind of plugin, and the broken plugins."""
    from rich.table import Table

    con = _console()
    t = Table(title="tasks")
    for col in ("name", "metric", "model kinds", "plugin", "description"):
        t.add_column(col)
    for d in data["tasks"]:
        arrow = "↑" if d["higher_is_better"] else "↓"
        t.add_row(d["name"], f"{d['metric']} {arrow}", ", ".join(d["model_kinds"]), d["plugin"], d["description"])
    con.print(t)
    t = Table(title="backends")
    for col in ("name", "available", "options", "plugin", "description"):
        t.add_column(col)
    for d in data["backends"]:
        avail = "[green]yes[/]" if d["available"] else f"[red]no[/]: {d['unavailable_because']}"
        opts = ",".join(f"{k}={v}" for k, v in d["options"].items())
        if d["preset_of"]:
            opts = f"= {d['preset_of']}:{opts}" if opts else f"= {d['preset_of']}"
        t.add_row(d["name"], avail, opts, d["plugin"], d["description"])
    con.print(t)
    t = Table(title=f"optimizations (--opt; availability on {here})")
    for col in ("name", "available", "changes", "math", "options", "plugin", "description"):
        t.add_column(col)
    for d in data["optimizations"]:
        avail = "[green]yes[/]" if d["available"] else f"[red]no[/]: {d['unavailable_because']}"
        math = d["math"] + (f" (±{d['tolerance']:g})" if d["tolerance"] is not None else "")
        opts = ",".join(f"{k}={v}" for k, v in d["options"].items())
        t.add_row(d["name"], avail, ", ".join(d["changes"]), math, opts, d["plugin"], d["description"])
    con.print(t)
    t = Table(title="model presets")
    for col in ("name", "kind", "plugin", "description"):
        t.add_column(col)
    for d in data["models"]:
        t.add_row(d["name"] + (" (default)" if d["default"] else ""), d["kind"], d["plugin"], d["description"])
    con.print(t)
    con.print("Any local Hugging Face model directory or hub id also works as --model.")
    t = Table(title="record sinks (--sink NAME:key=value)")
    for col in ("name", "available", "options", "plugin", "description"):
        t.add_column(col)
    for d in data["sinks"]:
        avail = "[green]yes[/]" if d["available"] else f"[red]no[/]: {escape(d['unavailable_because'])}"
        t.add_row(d["name"], avail, ", ".join(d["options"]), d["plugin"], d["description"])
    con.print(t)
    if data["broken_plugins"]:
        t = Table(title="broken plugins (left out; everything else works)")
        for col in ("plugin", "error"):
            t.add_column(col)
        for d in data["broken_plugins"]:
            t.add_row(d["plugin"], f"[red]{escape(d['error'])}[/]")
        con.print(t)


# ------------------------------------------------------------------- run


def _setting(*decls, then=None, **kw):
    """An option that sets one grid setting.  Repeated, it is an axis of the grid when a grid can sweep
    that setting (its values are a tuple), and an error otherwise, never last-wins; ``then`` converts
    a single value."""
    def values(ctx, param, given):
        given = distinct(given)
        if param.name in CLI_AXES:
            return given
        if len(given) > 1:
            raise FtbenchError(f"{param.opts[0]} was given {len(given)} values ({', '.join(map(str, given))}), but "
                               f"it is not an axis of the grid: give it once")
        value = given[0] if given else None
        return then(value) if then else value

    name = next((d for d in decls if not d.startswith("-")), decls[0].split("/")[0].lstrip("-").replace("-", "_"))
    if name in CLI_AXES and kw.get("help"):
        kw["help"] += " Repeat it to sweep (an axis)."
    return click.option(*decls, multiple=True, callback=values, **kw)


# The modules that load torch (the pre-run check, the memory model, the launchers) are imported by the
# commands that use them, so that `ftbench list` and `--help` answer in a fraction of torch's import time.
#: Settings whose option, repeated, makes an axis: what a grid can sweep, and the micro-batch split.
CLI_AXES = frozenset(SWEEPABLE) | {"micro_batch"}

#: The options that define a grid's cells.  A setting's option is one line here; if the grid can
#: sweep that setting (a Recipe field, nproc, eval_examples), repeating the option sweeps it.
_CELL_OPTIONS = (
    _setting("--grid", "grid_file", type=click.Path(dir_okay=False), help="Grid file (YAML or TOML)."),
    click.option("--task", "tasks", multiple=True, help="Task, NAME or NAME:key=value (repeatable)."),
    click.option("--backend", "backends", multiple=True, help="Backend, NAME or NAME:key=value (repeatable)."),
    click.option("--opt", "opts", multiple=True,
                 help="Optimizations of a cell, NAME[:key=value], '+' combines (repeatable: one cell each)."),
    click.option("--ladder", help="Optimizations added one by one: A,B,C runs baseline, +A, +A+B, +A+B+C."),
    click.option("--ablation", help="Optimizations each alone against the baseline: A,B,C."),
    click.option("--model", "models", multiple=True, help="Preset name, local model dir or hub id (repeatable)."),
    click.option("--data", "datas", multiple=True, help="'builtin', a directory, or hf:NAME[/CONFIG] (repeatable)."),
    click.option("--column", "columns", multiple=True, help="Map a data column onto a task field: FIELD=COLUMN."),
    _setting("--steps", type=int, help="Optimizer steps per cell (warmup included)."),
    _setting("--warmup", type=int, help="First steps excluded from timing."),
    _setting("--batch-size", type=int, help="Global batch: examples per optimizer step over all ranks."),
    _setting("--grad-accum", type=int, help="Micro-batches accumulated per optimizer step."),
    _setting("--micro-batch", "micro_batch", metavar="N|auto",
             help="Examples per rank per forward pass (sets --grad-accum; the global batch stays); "
                  "'auto': the largest that fits, per backend, found by probe cells."),
    _setting("--seq-len", type=int, help="Maximum tokens per example (longer ones are truncated and counted)."),
    _setting("--lr", type=float, help="Peak learning rate of AdamW (default: by model origin and tuning scope)."),
    _setting("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="Mixed precision (GPU)."),
    _setting("--tuning", help="full | freeze-embeddings | freeze-lower:N | lora[:r=8,alpha=16,dropout=0,targets=A+B]"),
    _setting("--packing/--no-packing", help="Concatenate decoder examples (EOS-separated) into full --seq-len rows."),
    _setting("--recipe-defaults", type=click.Choice(["scratch", "pretrained"]),
             help="Defaults for unset recipe settings (default: pretrained for a checkpoint, else scratch)."),
    _setting("--grad-checkpointing/--no-grad-checkpointing", help="Activation checkpointing."),
    _setting("--seed", type=int, help="Seed for data order and initialisation."),
    click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2",
                 help="Sweep any other setting a grid file can sweep: --sweep warmup=2,4 (repeatable)."),
    _setting("--repeat", type=int, help="Run each cell K times, each in a fresh process."),
    _setting("--nproc", type=int, help="Ranks for data-parallel backends (others use 1)."),
    _setting("--nnodes", type=int, help="Nodes for multi-node runs (passed to torchrun)."),
    _setting("--node-rank", type=int, help="This node's rank (multi-node)."),
    _setting("--master-addr", help="Rendezvous address (multi-node)."),
    _setting("--master-port", type=int, help="Rendezvous port (multi-node)."),
    _setting("--time-limit", "time_limit_s", type=float, help="Seconds before a cell is killed (status timeout)."),
    _setting("--memory-limit-mb", type=float, help="Host memory per cell before it is killed (status oom)."),
    _setting("--eval-examples", type=int, help="Held-out examples evaluated per cell (and per evaluation)."),
    _setting("--eval-every", type=int, help="Evaluate every N optimizer steps during training (time to quality)."),
    click.option("--target", "targets", multiple=True,
                 help="Quality target [TASK:]METRIC=VALUE, e.g. perplexity=20 or accuracy>=0.85 (repeatable)."),
    click.option("--stop-at-target", is_flag=True, default=None, help="End a cell once its target is reached."),
    _setting("--seeds", then=lambda v: _parse_seeds(v),
             help="Run every cell under each seed: 1,2,3 (time to quality varies with the seed)."),
    _setting("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train (default auto)."),
    _setting("--cpu-memory", type=click.Choice(["resident", "live"]),
             help="CPU memory peak: resident (glibc defaults, default) or live (freed tensors leave the resident "
                  "set at once; about 0.6x the tokens/s; for memory studies)."),
    _setting("--shard", help="Run shard i of N of the cells: i/N (1-based)."),
    click.option("--yes", "confirm_large", is_flag=True, default=None,
                 help="Run a grid of more than 500 cells (grid file: max_cells: N)."),
    _setting("--trust-remote-code", is_flag=True,
             help="Let a model directory or hub model run its own Python code (auto_map); off by default."),
)


def cell_options(f):
    """The options that define a grid's cells, shared by ``run`` and ``plan``."""
    for option in reversed(_CELL_OPTIONS):
        f = option(f)
    return f


_LAUNCH_KEYS = ("nnodes", "node_rank", "master_addr", "master_port")
#: Cell options the request holds in fields of their own (the rest are grid settings).
_REQUEST_KEYS = ("grid_file", "tasks", "backends", "opts", "models", "datas", "columns", "shard", "micro_batch",
                 "targets", "repeat", "seeds", "sweeps", "confirm_large", *_LAUNCH_KEYS)


def grid_request(cell: dict, **run_settings) -> GridRequest:
    """The :class:`GridRequest` that the cell options (click's values, only read) and ``run``'s own
    settings (``order``, ``profile_steps``; None: not given) describe.

    An axis option's values come as a tuple: one value is a shared setting, several an axis.
    """
    order = run_settings.pop("order", None)
    settings, sweep = {}, {}
    for key, value in cell.items():
        if key in _REQUEST_KEYS or value is None or value == ():
            continue
        if isinstance(value, tuple) and len(value) > 1:
            sweep[key] = value
        else:
            settings[key] = value[0] if isinstance(value, tuple) else value
    settings.update({k: v for k, v in run_settings.items() if v is not None})
    if cell["columns"]:
        settings["columns"] = _parse_columns(cell["columns"])
    micro = tuple(cell["micro_batch"])
    for text in cell["sweeps"]:
        key, values = parse_sweep(text)
        option = "--" + key.replace("_", "-")
        if key in settings or key in sweep or (key == "micro_batch" and micro):
            raise FtbenchError(f"{key} is set by {option} and swept by --sweep {text}; keep one (repeating "
                               f"{option} sweeps it too)")
        if key == "micro_batch":
            micro = tuple(str(v) for v in values)
        else:
            sweep[key] = values
    if cell["seeds"]:
        if "seed" in settings or "seed" in sweep:
            raise FtbenchError("--seed and --seeds both set the seed; pass --seeds 1,2,3 alone to run every cell "
                               "under each seed")
        sweep["seed"] = tuple(cell["seeds"])
    return GridRequest(grid_file=cell["grid_file"],
                       axes={"task": cell["tasks"], "backend": cell["backends"], "model": cell["models"],
                             "data": cell["datas"], "opt": cell["opts"]},
                       settings=settings, sweep=sweep, targets=tuple(cell["targets"]), repeat=cell["repeat"],
                       order=order, launch=Launch(**{k: cell[k] for k in _LAUNCH_KEYS}),
                       micro_batch=_micro_batches(micro, settings, sweep), shard=cell["shard"])


def _micro_batches(values: tuple, settings: dict, sweep: dict) -> tuple:
    """The ``--micro-batch`` values, checked: numbers (several: an axis) or ``auto`` alone."""
    micro = tuple(parse_micro_batch(v, {**settings, **sweep}) for v in values)
    if AUTO in micro and len(micro) > 1:
        raise FtbenchError("--micro-batch auto searches the micro-batch itself and cannot be swept with "
                           f"numbers ({', '.join(map(str, values))}); pass auto alone, or numbers only")
    return micro


def _expansion_progress(done: int, total: int) -> None:
    click.echo(f"expanding the grid: {done:,} of up to {total:,} cells", err=True)


def checked_cells(reg, grid, request: GridRequest, confirmed: bool = False,
                  describe_only: bool = False) -> tuple[list, bool]:
    """The grid's cells, sharded and split into micro-batches as requested, checked before anything is
    written; and whether micro-batches are searched (``--micro-batch auto``).

    ``confirmed`` (``--yes``) lets a grid over the size limit expand; ``describe_only`` (``plan``) asks
    of a model only what describes it (its config), not weights or a tokenizer.
    """
    for name, error in sorted(reg.broken.items()):
        click.echo(f"warning: plugin {name} is broken and left out ({error}); the other plugins work "
                   "(ftbench list)", err=True)
    grid.check_size(reg, confirmed)  # counted, not expanded: a million-cell typo costs nothing
    cells = grid.cells(reg, progress=_expansion_progress)
    if request.shard:
        cells = select_shard(cells, request.shard)
    if request.micro_batch:  # several values: an axis, each micro-batch splitting every cell
        cells = [split for c in cells for micro in request.micro_batch for split in apply_micro_batch([c], micro)]
    from ftbench.harness.grid.preflight import check_cells  # loads torch: see the note above CLI_AXES

    # names, options, settings, data, seq_len, batch: before anything is written
    check_cells(reg, cells, describe_only)
    return cells, AUTO in request.micro_batch


@main.command("run")
@cell_options
@_setting("--order", type=click.Choice(["interleaved", "sequential"]),
          help="Repeats round-robin over the cells (interleaved, default) or back to back (sequential).")
@click.option("--profile", "profile_steps", flag_value=3, default=None, type=int,
              help="After each cell's training and evaluation, trace 3 more steps with torch.profiler: a Chrome "
                   "trace per rank in OUT/traces and a per-phase breakdown in the record.")
@_setting("--launcher", "launcher_kind", type=click.Choice(["local", "slurm"]),
          help="Where cells run: here (local, default) or as Slurm jobs (slurm).")
@_setting("--slurm-partition", help="Slurm partition for the jobs (--launcher slurm).")
@_setting("--slurm-time", help="Slurm time limit per job: 30m, 2h or seconds (default: the cell's limit + 5 min).")
@_setting("--slurm-gpus-per-node", type=int, help="GPUs per node of each job (--launcher slurm).")
@_setting("--slurm-nodes", type=int, help="Nodes per data-parallel cell, each running --nproc ranks.")
@click.option("--slurm-option", "slurm_flags", multiple=True, metavar="NAME=VALUE",
              help="Any other sbatch option, long name without dashes (repeatable), e.g. account=perf.")
@_setting("--out", help="Result set directory (default runs/<timestamp>).")
@click.option("--force", is_flag=True, help="Rerun cells already in the result set.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed cell.")
@click.option("--dry-run", is_flag=True, help="List the cells this command line makes, checked; run nothing.")
@click.option("--sink", "sinks", multiple=True, metavar="NAME[:key=value]",
              help="Also hand each record to a sink: mlflow:uri=URI, tensorboard, wandb (repeatable; grid: sink:).")
def run_cmd(out, force, fail_fast, dry_run, sinks, order, profile_steps, launcher_kind, slurm_partition, slurm_time,
            slurm_gpus_per_node, slurm_nodes, slurm_flags, **cell):
    """Run a grid of cells and append their records to OUT/results.jsonl.

    With no arguments, runs the embedded default grid.  Exit status: 0 done;
    1 a cell failed under --fail-fast; 2 bad input, nothing run; 3 a finished
    record could not be written to OUT (kept elsewhere, the message says
    where); 128+N stopped by signal N.
    """
    reg = Registry.load()
    request = grid_request(cell, order=order, profile_steps=profile_steps)
    grid = build_grid(request)
    slurm = _slurm_options(grid, SlurmFlags(launcher_kind, slurm_partition, slurm_time, slurm_gpus_per_node,
                                            slurm_nodes, slurm_flags))
    if slurm is not None and isinstance(slurm.nodes, int) and slurm.nodes > 1:
        grid = grid.with_launch(Launch(nnodes=slurm.nodes))  # data-parallel cells span the job's nodes
    cells, search = checked_cells(reg, grid, request, confirmed=bool(cell.get("confirm_large")))
    sink_specs = [*grid.sinks, *sinks]
    from ftbench.harness.results.sinkhub import check_sink_specs  # loads torch: see the note above CLI_AXES

    check_sink_specs(reg, sink_specs)  # an unknown sink or option: exit 2 before any cell
    if slurm is not None:
        if search:
            raise FtbenchError("--micro-batch auto searches with probe cells on this machine, which --launcher "
                               "slurm does not run; pass a number (--micro-batch 4), or run the search locally")
        from ftbench.harness.running.slurm import check_slurm  # loads torch: see the note above CLI_AXES

        check_slurm(slurm)
    if dry_run:
        print_cells(_console(), order_repeats(cells, grid.order))
        sys.exit(0)
    how = Launching(slurm=slurm, nodes=grid.launch, order=grid.order, search_micro_batch=search,
                    sinks=tuple(sink_specs))
    out = out or _default_out()
    if not how.follower:
        check_free_space(out, cells)
    view = RunView(_console(), len(cells), out, follower=how.follower, cells=cells)
    _install_sigterm()
    summary = _execute(reg, cells, out, view, how, force, fail_fast)
    view.finish(summary)
    bad = [r for r in summary.records if r["status"] not in ("ok", "skipped")]
    sys.exit(1 if bad and fail_fast else 0)


@dataclass(frozen=True)
class Launching:
    """Where and how the checked cells of a run go: Slurm (options) or here, maybe as one node of several."""

    slurm: SlurmOptions | None
    nodes: Launch
    order: str
    search_micro_batch: bool
    #: ``--sink`` and the grid's ``sink:``, as written
    sinks: tuple[str, ...] = ()

    @property
    def follower(self) -> bool:
        """This process is a node other than 0 of a multi-node grid: node 0 writes the records."""
        return self.nodes.nnodes_or_1 > 1 and self.nodes.rank > 0


def _execute(reg, cells, out, view, how: Launching, force, fail_fast):
    """Run the checked cells here (one node of several, maybe) or through Slurm; exit on an interruption."""
    from ftbench.harness.results.sinkhub import open_sinks  # loads torch: see the note above CLI_AXES
    from ftbench.harness.results.writer import WriteOptions  # loads torch: see the note above CLI_AXES
    from ftbench.harness.running.driver import RunOptions, run_cells  # loads torch: see the note above CLI_AXES
    from ftbench.harness.running.slurm import run_cells_slurm  # loads torch: see the note above CLI_AXES

    environment = collect(reg.pm)
    hub = open_sinks(reg, list(how.sinks) if not how.follower else [], out,
                     warn=lambda m: view.event("note", 0, len(cells), None, "warning: " + m))
    hub.start(environment)
    write = WriteOptions(force=force, fail_fast=fail_fast, order=how.order, annotate=annotate_parity, registry=reg,
                         progress=view.event, sinks=(hub.record,) if hub.sinks else ())
    try:
        if how.slurm is not None:
            return run_cells_slurm(cells, out, environment, how.slurm, write)
        return run_cells(cells, out, environment, RunOptions(write, search_micro_batch=how.search_micro_batch,
                                                             nodes=how.nodes))
    except KeyboardInterrupt as e:
        view.interrupted(out)
        sys.exit(128 + getattr(e, "signum", signal.SIGINT))
    except ResultsNotWritten as e:
        if view.status:
            view.status.stop()
        _console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(EXIT_RESULTS_NOT_WRITTEN)
    except NodeLost as e:
        _console(stderr=True).print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(1)
    finally:
        hub.close()


# ------------------------------------------------------------------ plan


@main.command("plan")
@cell_options
@click.option("--gpu", "gpu_spec", metavar="NAME[xN]",
              help="Plan for this GPU (e.g. h100-sxm, a100-40gb, h100-sxmx8 for 8 of them: --nproc 8) from any "
                   "machine: each rank against its memory, step time from its peak.")
@click.option("--mfu", type=float, default=0.4, show_default=True,
              help="Model FLOPs utilisation assumed for the predicted step time.")
@click.option("--calibrate-from", "calibrate_from", metavar="RUNS",
              help="Take the MFU from the measured records of a result set (same backend, same GPU model).")
@click.option("--host-memory-gb", type=float,
              help="Host memory per node of the machine planned for: what the ranks offload is compared with it.")
@click.option("--frontier", is_flag=True,
              help="Per cell: the largest micro-batch and the longest --seq-len predicted to fit.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan_cmd(as_json, gpu_spec, mfu, calibrate_from, host_memory_gb, frontier, **cell):
    """Predicted peak memory per rank of every cell, whether it fits, and its step time; trains nothing.

    Takes the same cell arguments as run. A model needs only what describes it: a directory with its
    config.json, a hub id in the local Hugging Face cache, or a preset. A cell that does not fit lists
    what would: a smaller micro-batch, checkpointing, another backend (a ZeRO stage, offload) or more ranks.
    """
    from ftbench.harness.analysis.plan_time import check_mfu  # loads torch: see the note above CLI_AXES
    from ftbench.harness.analysis.plan_view import plan_json, print_plans  # loads torch: see the note above CLI_AXES
    from ftbench.harness.grid.memplan import plan_cell  # loads torch: see the note above CLI_AXES

    check_mfu(mfu)
    gpu = None
    if gpu_spec:
        gpu, count = parse_gpu(gpu_spec)
        nproc = cell.get("nproc") or ()
        if count and nproc and set(nproc) != {count}:
            raise FtbenchError(f"--gpu {gpu_spec} says {count} GPUs but --nproc says {', '.join(map(str, nproc))}; "
                               "give one of them, or the same count")
        cell = {**cell, "device": ("cuda",), **({"nproc": (count,)} if count else {})}
    reg = Registry.load()
    request = grid_request(cell)
    cells, search = checked_cells(reg, build_grid(request), request, confirmed=bool(cell.get("confirm_large")),
                                  describe_only=True)
    seen, plans = set(), []
    host = int(host_memory_gb * 2**30) if host_memory_gb else None
    for c in cells:
        if c.cell_id in seen:
            continue  # repeats share one prediction
        seen.add(c.cell_id)
        plans.append(plan_cell(reg, c, gpu=gpu, host_memory=host))
    how = {"mfu": mfu, "calibrate_from": calibrate_from, "frontier": frontier}
    if as_json:
        click.echo(json.dumps(plan_json(reg, plans, search, how), indent=2))
    else:
        print_plans(reg, plans, _console(), search, how)
    sys.exit(0)


@dataclass(frozen=True)
class SlurmFlags:
    """The ``--launcher`` and ``--slurm-*`` flags as given (None: not given)."""

    launcher_kind: str | None
    partition: str | None
    time: str | None
    gpus_per_node: int | None
    nodes: int | None
    options: tuple[str, ...]

    def given(self) -> list[str]:
        """The ``--slurm-*`` flags given, as the user spelled them."""
        names = {"partition": "--slurm-partition", "time": "--slurm-time", "gpus_per_node": "--slurm-gpus-per-node",
                 "nodes": "--slurm-nodes", "options": "--slurm-option"}
        return [flag for key, flag in names.items() if getattr(self, key) not in (None, ())]


def _slurm_options(grid, flags: SlurmFlags) -> SlurmOptions | None:
    """The Slurm settings (grid file's ``slurm:``, then the flags), or None for the local launcher."""
    kind = flags.launcher_kind or grid.launcher or "local"
    if kind != "slurm":
        if flags.given():
            raise FtbenchError(f"{', '.join(sorted(flags.given()))} only apply with --launcher slurm; add "
                               "--launcher slurm, or drop them to run here")
        return None
    opts = options_from(grid.slurm or {}, grid.source or "grid")
    if flags.partition:
        opts.partition = flags.partition
    if flags.time:
        opts.time_s = parse_duration(flags.time, "--slurm-time")
    if flags.gpus_per_node is not None:
        opts.gpus_per_node = flags.gpus_per_node
    if flags.nodes is not None:
        opts.nodes = flags.nodes
    opts.options.update(parse_option_flags(flags.options or ()))
    if grid.launch.node_rank is not None:
        raise FtbenchError("--node-rank starts one node of a grid by hand; with --launcher slurm, Slurm starts "
                           "the nodes: drop --nnodes/--node-rank/--master-addr/--master-port and pass "
                           "--slurm-nodes N instead")
    return opts


def _parse_seeds(text):
    if not text:
        return None
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: write comma-separated integers, e.g. --seeds 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise click.BadParameter(f"{text!r}: give distinct seeds >= 0, e.g. --seeds 1,2,3")
    return seeds


def _parse_columns(items) -> dict:
    mapping = {}
    for item in items:
        field, eq, column = item.partition("=")
        if not eq or not field or not column:
            raise FtbenchError(f"malformed --column {item!r}: write FIELD=COLUMN, e.g. --column text=sentence")
        mapping[field.strip()] = column.strip()
    return mapping


def _default_out() -> str:
    import datetime as dt

    return os.path.join("runs", dt.datetime.now().strftime("%Y%m%d-%H%M%S"))


def _install_sigterm():
    # SIGTERM (and a closed terminal's SIGHUP) behave like Ctrl-C: stop the running cell, keep
    # every finished record; the exit status still says which signal it was (143 for SIGTERM).
    def handler(signum, frame):
        e = KeyboardInterrupt()
        e.signum = signum
        raise e

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGHUP, handler)



# ---------------------------------------------------------------- report


@main.command("report")
@click.argument("result_dir", type=click.Path(file_okay=False))
@click.option("--out", default=None, help="Where to write the report (default RESULT_DIR/report).")
@click.option("--quiet", is_flag=True, help="Write the files without printing the table.")
@click.option("--loss-x", type=click.Choice(["step", "time"]), default="step", show_default=True,
              help="x-axis of the loss plot: optimizer steps or training seconds.")
def report_cmd(result_dir, out, quiet, loss_x):
    """Tables (terminal, Markdown, CSV), PNG plots and an HTML page for a result set."""
    refuse_record_files(out, "--out", "report")
    rep, _ = write_report(result_dir, out, loss_x=loss_x)
    con = _console()
    for p in rep.problems:
        _console(stderr=True).print(f"[yellow]warning:[/] {escape(p)}", soft_wrap=True)
    con.print(f"read {escape(rep.read)} from {escape(str(result_dir))}")
    if not quiet:
        print_terminal_tables(rep.terminal, con, f"ftbench report: {result_dir}",
                              f"Ranges, memory windows and prediction, setup and compile seconds, errors and "
                              f"what each cell computed differently: {rep.markdown} and {rep.html}.")
        if rep.time_to_target is not None:
            print_table(rep.time_to_target, con, "time to target (median over seeds; not reached = infinitely slow)")
        if rep.ladder is not None:
            print_table(rep.ladder, con, "optimization ladder (Δ: % change from the previous rung / the baseline)")
    con.print(f"wrote {rep.markdown}, {rep.csv}, {rep.records_csv}, {rep.html}")
    for path in rep.plots.values():
        con.print(f"wrote {path}")


# --------------------------------------------------------------- compare


@main.command("compare")
@click.argument("base_dir", type=click.Path(file_okay=False))
@click.argument("new_dir", type=click.Path(file_okay=False))
@click.option("--threshold", "thresholds", multiple=True, metavar="FIGURE=VALUE",
              help="Smallest relative change that counts, per figure (speed, peak_memory_bytes, metric), "
                   "e.g. speed=5% (repeatable; tokens_per_s and step_time_s mean speed).")
@click.option("--thresholds-from", "calibration", type=click.Path(dir_okay=False),
              help="Thresholds from a calibration file written by --calibrate on this machine.")
@click.option("--calibrate", is_flag=True,
              help="BASE and NEW are an A/A pair (the same grid run twice): write noise thresholds to -o FILE.")
@click.option("-o", "--output", "output", type=click.Path(dir_okay=False), help="Calibration file to write.")
@click.option("--alpha", type=float, default=None, help="Significance level of the rank test on repeats "
                                                        "(used when enough repeats make it meaningful; default 0.01).")
@click.option("--markdown", "markdown_file", type=click.Path(dir_okay=False), help="Also write Markdown here.")
@click.option("--json", "json_file", type=click.Path(dir_okay=False),
              help="Also write the comparison, with what differed behind each flagged change, as JSON (- for stdout).")
def compare_cmd(base_dir, new_dir, thresholds, calibration, calibrate, output, alpha, markdown_file, json_file):
    """Regressions between two result sets; exit status 1 when something regressed.

    With --calibrate, BASE and NEW are the same grid run twice on one machine,
    and the noise they show becomes per-figure thresholds written to -o FILE.
    """
    refuse_record_files(markdown_file, "--markdown", "Markdown")
    refuse_record_files(output, "-o", "calibration")
    if calibrate:
        _calibrate(base_dir, new_dir, output)
        return
    if output:
        raise FtbenchError("-o/--output writes a calibration file and needs --calibrate; for a report of the "
                           "comparison use --markdown FILE")
    th = dict(parse_threshold(t) for t in thresholds)
    if alpha is not None and not 0 < alpha < 1:
        raise FtbenchError(f"invalid --alpha {alpha}: must be between 0 and 1, e.g. 0.01")
    cmp = compare_sets(base_dir, new_dir, th, DEFAULT_ALPHA if alpha is None else alpha, calibration)
    if json_file == "-":
        click.echo(json.dumps(cmp.as_json(), indent=2, default=str))
        sys.exit(EXIT_REGRESSION if cmp.regressions else 0)
    print_comparison(cmp, _console(), base_dir, new_dir)
    if json_file:
        with open(json_file, "w") as f:
            json.dump(cmp.as_json(), f, indent=2, default=str)
    if markdown_file:
        with open(markdown_file, "a" if markdown_file == os.environ.get("GITHUB_STEP_SUMMARY") else "w") as f:
            f.write(cmp.markdown(base_dir, new_dir))
    sys.exit(EXIT_REGRESSION if cmp.regressions else 0)


def _calibrate(a1, a2, output):
    if not output:
        raise FtbenchError("--calibrate needs -o FILE, the calibration file to write "
                           "(e.g. ftbench compare --calibrate A1 A2 -o thresholds.json)")
    data = calibrate(a1, a2)
    write_calibration(output, data)
    con = _console()
    for k, v in data["thresholds"].items():
        con.print(f"{k}: largest A/A change {data['largest_aa_change'][k]:.1%} -> threshold {v:.1%}")
    con.print(f"wrote {output} (machine: {data['machine'].get('cpu')}); use it with "
              f"ftbench compare BASE NEW --thresholds-from {output}")


# --------------------------------------------------------------- history


@main.command("history")
@click.argument("sets", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", default=None, help="Where to write Markdown, plots, HTML and history.sqlite (default history/).")
@click.option("--threshold", "thresholds", multiple=True, metavar="FIGURE=VALUE",
              help="Smallest level shift that counts, per figure, as for compare (repeatable).")
@click.option("--thresholds-from", "calibration", type=click.Path(dir_okay=False),
              help="Thresholds from a calibration file written by 'compare --calibrate'.")
@click.option("--quiet", is_flag=True, help="Write the files without printing the table.")
def history_cmd(sets, out, thresholds, calibration, quiet):
    """Series of result sets over time, their change points and the commits where each began.

    SETS are result set directories, or directories holding them. Exit status 1
    when the newest point of a series is a regression.
    """
    refuse_record_files(out, "--out", "report")
    th = dict(parse_threshold(t) for t in thresholds)
    h, files = write_history(sets, out, th, calibration)
    con = _console()
    if not quiet:
        print_history(h, con)
    con.print(f"wrote {files.markdown}, {files.html}, {files.db}")
    for p in files.plots.values():
        con.print(f"wrote {p}")
    if h.regressions:
        con.print(f"[bold red]the newest point regressed in {len(h.regressions)} series[/]")
    sys.exit(EXIT_REGRESSION if h.regressions else 0)


# --------------------------------------------------------------- explain


@main.command("explain")
@click.argument("runs", type=click.Path(file_okay=False))
@click.argument("cell_a")
@click.argument("cell_b")
@click.option("--other", "other_runs", default=None, type=click.Path(file_okay=False),
              help="Take CELL_B from this result set instead of RUNS (e.g. a baseline).")
def explain_cmd(runs, cell_a, cell_b, other_runs):
    """What two cells actually computed differently, from what each recorded.

    CELL_A and CELL_B name cells of the result set RUNS by cell id (or a unique
    prefix), BACKEND as written on the command line, or TASK/BACKEND. Exit status
    1 when their differences change the math (docs/fairness.md).
    """
    a = select_cell(load_result_set(runs).records, cell_a, runs)
    b = select_cell(load_result_set(other_runs or runs).records, cell_b, other_runs or runs)
    con = _console()
    con.print(f"{a.get('task')}/{a.get('backend')} ({a.get('cell_id', '')[:10]}) vs "
              f"{b.get('task')}/{b.get('backend')} ({b.get('cell_id', '')[:10]}):", soft_wrap=True, markup=False)
    for line in explain(a, b):
        con.print(line, soft_wrap=True, markup=False)
    sys.exit(1 if any(d.changes_math for d in compare_cells(a, b)) else 0)


# ----------------------------------------------------------------- merge


@main.command("merge")
@click.argument("out", type=click.Path(file_okay=False))
@click.argument("sources", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--allow-mixed-environments", is_flag=True,
              help="Merge sets from different machines or library versions anyway.")
def merge_cmd(out, sources, allow_mixed_environments):
    """Join result sets (e.g. the shards of one grid) into OUT, each record once."""
    summary = merge_result_sets(out, list(sources), allow_mixed_environments=allow_mixed_environments)
    con = _console()
    for w in summary.warnings:
        _console(stderr=True).print(f"[yellow]warning:[/] {w}", soft_wrap=True)
    for src, n in summary.sources.items():
        con.print(f"{src}: {n} record(s), {summary.versions.get(src, 'no records')}")
    extra = f" ({summary.duplicates} identical duplicate(s) kept once)" if summary.duplicates else ""
    con.print(f"merged {summary.written} record(s) into {out}/results.jsonl{extra}")


# ------------------------------------------------------------------ sink


@main.command("sink")
@click.argument("result_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--to", "sinks", multiple=True, required=True, metavar="NAME[:key=value]",
              help="Sink to replay the records into, e.g. mlflow:uri=http://127.0.0.1:5000 (repeatable).")
def sink_cmd(result_dir, sinks):
    """Replay a result set's records into record sinks (MLflow, TensorBoard, W&B): a sink that was down
    during the run, or a tracker added afterwards. Exit status 1 when a sink failed."""
    from ftbench.harness.results.sinkhub import replay  # loads torch: see the note above CLI_AXES

    err = _console(stderr=True)
    hub, total = replay(Registry.load(), list(sinks), result_dir,
                        warn=lambda m: err.print(f"[yellow]warning:[/] {escape(m)}", soft_wrap=True))
    con = _console()
    for spec, n in hub.delivered.items():
        state = f"failed: {hub.failed[spec]}" if spec in hub.failed else "ok"
        con.print(f"{spec}: {n} of {total} record(s) ({state})", soft_wrap=True)
    sys.exit(1 if hub.failed else 0)


# -------------------------------------------------------------------- ab


def _count_cells(run_args: list[str]) -> int:
    """How many cells (repeats not counted) ``ftbench run RUN_ARGS`` makes, checked as run checks them."""
    ctx = run_cmd.make_context("run", list(run_args))
    run_only = {"out", "force", "fail_fast", "dry_run", "sinks", "order", "profile_steps", "launcher_kind",
                "slurm_partition", "slurm_time", "slurm_gpus_per_node", "slurm_nodes", "slurm_flags"}
    cell = {k: v for k, v in ctx.params.items() if k not in run_only}
    request = grid_request(cell)
    cells, _ = checked_cells(Registry.load(), build_grid(request), request,
                             confirmed=bool(cell.get("confirm_large")))
    return len({c.cell_id for c in cells})


@main.command("ab", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--base", required=True, help="The git ref of version A (the baseline), e.g. main.")
@click.option("--new", "new_ref", default=None, help="The git ref of version B (default: the working tree).")
@click.option("--rounds", type=int, default=4, show_default=True,
              help="Runs of each cell per version, in the order A B B A A B ...")
@click.option("--out", default=None, help="Where the two result sets (A/, B/) and the log go (default runs/ab-<time>).")
@click.option("--threshold", "thresholds", multiple=True, metavar="FIGURE=VALUE",
              help="Smallest relative change that counts, as for compare (repeatable).")
@click.option("--markdown", "markdown_file", type=click.Path(dir_okay=False), help="Also write Markdown here.")
@click.argument("run_args", nargs=-1, type=click.UNPROCESSED)
def ab_cmd(base, new_ref, rounds, out, thresholds, markdown_file, run_args):
    """Two code versions, one grid, interleaved in one run; exit status 1 when B regressed against A.

    RUN_ARGS are ftbench run's options for the cells (after --), e.g.
    ftbench ab --base main -- --task generation --backend eager --steps 30.
    Each cell runs --rounds times per version in ABBA order, each run a fresh
    process; its speed is judged on the per-round ratio of the two versions'
    step times. Versions are built once and reused (docs/comparisons.md).
    """
    refuse_record_files(markdown_file, "--markdown", "Markdown")
    th = dict(parse_threshold(t) for t in thresholds) or None
    out = Path(out or _default_out().replace("runs" + os.sep, "runs" + os.sep + "ab-", 1))
    con = _console()
    ab = run_ab(checkout_root(Path.cwd()), list(run_args), _count_cells, base=base, new=new_ref, rounds=rounds,
                out=out, thresholds=th, say=lambda m: con.print(m, soft_wrap=True, highlight=False))
    label_a, label_b = f"A {base}", f"B {new_ref or 'working tree'}"
    print_comparison(ab.comparison, con, label_a, label_b)
    text = ab.comparison.markdown(f"{label_a}: {ab.base.how}", f"{label_b}: {ab.new.how}")
    (out / "ab.md").write_text(text)
    if markdown_file:
        Path(markdown_file).write_text(text)
    con.print(f"wrote {out / 'A'}, {out / 'B'}, {out / 'ab.md'}")
    sys.exit(EXIT_REGRESSION if ab.comparison.regressions else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
