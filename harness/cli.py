"""The ``ftbench`` command line (click for parsing, rich for output).

Errors caused by the user's input (:class:`ftbench.harness.contract.api.FtbenchError`) print
one paragraph naming the problem and the fix, and exit with status 2.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import click

from ftbench.harness.contract.api import FtbenchError

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
            from rich.markup import escape

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
    """Tasks, backends and model presets, which plugin gave each, and availability."""
    from ftbench.harness.contract.registry import Registry

    reg = Registry.load()
    data = {
        "tasks": [{"name": e.name, "plugin": e.plugin, "metric": e.obj.metric,
                   "higher_is_better": e.obj.higher_is_better, "model_kinds": list(e.obj.model_kinds),
                   "description": e.obj.description} for e in reg.tasks.values()],
        "backends": [],
        "models": [{"name": e.name, "plugin": e.plugin, "kind": e.obj.kind, "default": e.obj.default,
                    "description": e.obj.description} for e in reg.models.values()],
    }
    for e in reg.backends.values():
        why = reg.backend_availability(e.name)
        data["backends"].append({"name": e.name, "plugin": e.plugin, "available": why is None,
                                 "unavailable_because": why, "preset_of": e.obj.preset_of,
                                 "options": dict(e.obj.defaults), "data_parallel": e.obj.data_parallel,
                                 "description": e.obj.description})
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
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
    t = Table(title="model presets")
    for col in ("name", "kind", "plugin", "description"):
        t.add_column(col)
    for d in data["models"]:
        t.add_row(d["name"] + (" (default)" if d["default"] else ""), d["kind"], d["plugin"], d["description"])
    con.print(t)
    con.print("Any local Hugging Face model directory or hub id also works as --model.")


# ------------------------------------------------------------------- run


_CELL_OPTIONS = (
    click.option("--grid", "grid_file", type=click.Path(dir_okay=False), help="Grid file (YAML or TOML)."),
    click.option("--task", "tasks", multiple=True, help="Task, NAME or NAME:key=value (repeatable)."),
    click.option("--backend", "backends", multiple=True, help="Backend, NAME or NAME:key=value (repeatable)."),
    click.option("--model", "models", multiple=True, help="Preset name, local model dir or hub id (repeatable)."),
    click.option("--data", "datas", multiple=True, help="'builtin', a directory, or hf:NAME[/CONFIG] (repeatable)."),
    click.option("--column", "columns", multiple=True, help="Map a data column onto a task field: FIELD=COLUMN."),
    click.option("--steps", type=int, help="Optimizer steps per cell (warmup included)."),
    click.option("--warmup", type=int, help="First steps excluded from timing."),
    click.option("--batch-size", type=int, help="Global batch: examples per optimizer step over all ranks."),
    click.option("--grad-accum", type=int, help="Micro-batches accumulated per optimizer step."),
    click.option("--micro-batch", "micro_batch", default=None, metavar="N|auto",
                 help="Examples per rank per forward pass (sets --grad-accum; the global batch stays); "
                      "'auto': the largest that fits, per backend, found by probe cells."),
    click.option("--seq-len", type=int, help="Maximum tokens per example (longer ones are truncated and counted)."),
    click.option("--lr", type=float, help="Peak learning rate of AdamW."),
    click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"]), help="Mixed precision (GPU)."),
    click.option("--tuning", help="full | freeze-embeddings | freeze-lower:N | lora[:r=8,alpha=16,dropout=0,targets=A+B]"),
    click.option("--packing/--no-packing", default=None,
                 help="Concatenate decoder examples (EOS-separated) into full --seq-len rows."),
    click.option("--recipe-defaults", type=click.Choice(["scratch", "pretrained"]),
                 help="Defaults for unset recipe settings (default: pretrained for a checkpoint, else scratch)."),
    click.option("--grad-checkpointing/--no-grad-checkpointing", default=None, help="Activation checkpointing."),
    click.option("--seed", type=int, help="Seed for data order and initialisation."),
    click.option("--repeat", type=int, help="Run each cell K times, each in a fresh process."),
    click.option("--nproc", type=int, help="Ranks for data-parallel backends (others use 1)."),
    click.option("--nnodes", type=int, help="Nodes for multi-node runs (passed to torchrun)."),
    click.option("--node-rank", type=int, help="This node's rank (multi-node)."),
    click.option("--master-addr", help="Rendezvous address (multi-node)."),
    click.option("--master-port", type=int, help="Rendezvous port (multi-node)."),
    click.option("--time-limit", "time_limit_s", type=float, help="Seconds before a cell is killed (status timeout)."),
    click.option("--memory-limit-mb", type=float, help="Host memory per cell before it is killed (status oom)."),
    click.option("--eval-examples", type=int, help="Held-out examples evaluated per cell (and per evaluation)."),
    click.option("--eval-every", type=int, help="Evaluate every N optimizer steps during training (time to quality)."),
    click.option("--target", "targets", multiple=True,
                 help="Quality target [TASK:]METRIC=VALUE, e.g. perplexity=20 or accuracy>=0.85 (repeatable)."),
    click.option("--stop-at-target", is_flag=True, default=None, help="End a cell once its target is reached."),
    click.option("--seeds", callback=lambda ctx, p, v: _parse_seeds(v),
                 help="Run every cell under each seed: 1,2,3 (time to quality varies with the seed)."),
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Where to train (default auto)."),
    click.option("--cpu-memory", type=click.Choice(["resident", "live"]),
                 help="CPU memory peak: resident (glibc defaults, default) or live (freed tensors leave the resident "
                      "set at once; about 0.6x the tokens/s; for memory studies)."),
    click.option("--shard", help="Run shard i of N of the cells: i/N (1-based)."),
)


def cell_options(f):
    """The options that define a grid's cells, shared by ``run`` and ``plan``."""
    for option in reversed(_CELL_OPTIONS):
        f = option(f)
    return f


def _cells_from_options(reg, grid_file, tasks, backends, models, datas, columns, shard, micro_batch, settings,
                        on_grid=None):
    """The checked cells of the grid the options describe, whether micro-batches are searched, and the grid.

    ``on_grid(grid)`` may adjust the grid before its cells are expanded (``run``'s launcher settings).
    """
    from ftbench.harness.grid.files import build_grid
    from ftbench.harness.grid.microbatch import apply_micro_batch, parse_micro_batch

    launcher = {k: settings.pop(k) for k in ("nnodes", "node_rank", "master_addr", "master_port")
                if settings.get(k) is not None}
    for k in ("nnodes", "node_rank", "master_addr", "master_port"):
        settings.pop(k, None)
    overrides = {k: v for k, v in settings.items() if v is not None and v != ()}
    if columns:
        overrides["columns"] = _parse_columns(columns)
    if launcher:
        overrides["launcher"] = launcher
    micro = parse_micro_batch(micro_batch, overrides)
    axes = {"task": list(tasks), "backend": list(backends), "model": list(models), "data": list(datas)}
    grid = build_grid(grid_file, axes, overrides)
    if on_grid:
        on_grid(grid)
    cells = grid.cells(reg)
    if shard:
        from ftbench.harness.grid.files import select_shard

        cells = select_shard(cells, shard)
    cells = apply_micro_batch(cells, micro)
    from ftbench.harness.grid.preflight import check_cells

    check_cells(reg, cells)  # names, options, settings, data, seq_len, batch: before anything is written
    return cells, micro == "auto", grid


@main.command("run")
@cell_options
@click.option("--order", type=click.Choice(["interleaved", "sequential"]),
              help="Repeats round-robin over the cells (interleaved, default) or back to back (sequential).")
@click.option("--profile", "profile_steps", flag_value=3, default=None, type=int,
              help="After each cell's training and evaluation, trace 3 more steps with torch.profiler: a Chrome "
                   "trace per rank in OUT/traces and a per-phase breakdown in the record.")
@click.option("--launcher", "launcher_kind", type=click.Choice(["local", "slurm"]), default=None,
              help="Where cells run: here (local, default) or as Slurm jobs (slurm).")
@click.option("--slurm-partition", help="Slurm partition for the jobs (--launcher slurm).")
@click.option("--slurm-time", help="Slurm time limit per job: 30m, 2h or seconds (default: the cell's limit + 5 min).")
@click.option("--slurm-gpus-per-node", type=int, help="GPUs per node of each job (--launcher slurm).")
@click.option("--slurm-nodes", type=int, help="Nodes per data-parallel cell, each running --nproc ranks.")
@click.option("--slurm-option", "slurm_flags", multiple=True, metavar="NAME=VALUE",
              help="Any other sbatch option, long name without dashes (repeatable), e.g. account=perf.")
@click.option("--out", default=None, help="Result set directory (default runs/<timestamp>).")
@click.option("--force", is_flag=True, help="Rerun cells already in the result set.")
@click.option("--fail-fast", is_flag=True, help="Stop at the first failed cell.")
def run_cmd(grid_file, tasks, backends, models, datas, columns, out, force, fail_fast, shard, micro_batch,
            **settings):
    """Run a grid of cells and append their records to OUT/results.jsonl.

    With no arguments, runs the embedded default grid.  Exit status: 0 done;
    1 a cell failed under --fail-fast; 2 bad input, nothing run; 3 a finished
    record could not be written to OUT (kept elsewhere, the message says
    where); 128+N stopped by signal N.
    """
    from ftbench.harness.contract.registry import Registry
    from ftbench.harness.running.progress import RunView

    reg = Registry.load()
    slurm_cli = {k: settings.pop(k) for k in ("launcher_kind", "slurm_partition", "slurm_time",
                                               "slurm_gpus_per_node", "slurm_nodes", "slurm_flags")}
    where: dict = {}

    def on_grid(grid):
        where["slurm"] = _slurm_options(grid, slurm_cli)

    cells, search, grid = _cells_from_options(reg, grid_file, tasks, backends, models, datas, columns, shard,
                                              micro_batch, settings, on_grid)
    slurm, nodes = where["slurm"], grid.settings.get("launcher") or {}
    if slurm is not None:
        from ftbench.harness.running.slurm import check_slurm

        if search:
            raise FtbenchError("--micro-batch auto searches with probe cells on this machine, which --launcher "
                               "slurm does not run; pass a number (--micro-batch 4), or run the search locally")
        check_slurm(slurm)
    follower = int(nodes.get("nnodes", 1) or 1) > 1 and int(nodes.get("node_rank", 0) or 0) > 0
    out = out or _default_out()
    from ftbench.harness.results.recovery import check_free_space

    if not follower:
        check_free_space(out, cells)
    view = RunView(_console(), len(cells), out, follower=follower)
    _install_sigterm()
    summary = _execute(reg, cells, out, view, (slurm, nodes, grid.order, search), force, fail_fast)
    view.finish(summary)
    bad = [r for r in summary.records if r["status"] not in ("ok", "skipped")]
    sys.exit(1 if bad and fail_fast else 0)


def _execute(reg, cells, out, view, how, force, fail_fast):
    """Run the checked cells here (one node of several, maybe) or through Slurm; exit on an interruption.

    ``how`` is (Slurm options or None, multi-node settings, repeat order, micro-batch search).
    """
    from ftbench.harness.running.driver import run_cells
    from ftbench.harness.running.nodes import NodeLost
    from ftbench.harness.contract.environment import collect
    from ftbench.harness.results.parity import annotate_parity
    from ftbench.harness.results.recovery import EXIT_RESULTS_NOT_WRITTEN, ResultsNotWritten
    from rich.markup import escape

    slurm, nodes, order, search = how
    try:
        if slurm is not None:
            from ftbench.harness.running.slurm import run_cells_slurm

            return run_cells_slurm(cells, out, collect(reg.pm), slurm, force=force, fail_fast=fail_fast,
                                   progress=view.event, annotate=annotate_parity)
        return run_cells(cells, out, collect(reg.pm), force=force, fail_fast=fail_fast, progress=view.event,
                         annotate=annotate_parity, registry=reg, search_micro_batch=search, order=order, nodes=nodes)
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


# ------------------------------------------------------------------ plan


@main.command("plan")
@cell_options
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan_cmd(grid_file, tasks, backends, models, datas, columns, shard, micro_batch, as_json, **settings):
    """Predicted peak memory per rank of every cell, and whether it fits; trains nothing.

    Takes the same cell arguments as run. A cell that does not fit lists what
    would: a smaller micro-batch, checkpointing, another backend (a ZeRO stage,
    offload) or more ranks.
    """
    from ftbench.harness.grid.memplan import plan_cell
    from ftbench.harness.contract.registry import Registry
    from ftbench.harness.analysis.plan_view import plan_json, print_plans

    reg = Registry.load()
    cells, search, _ = _cells_from_options(reg, grid_file, tasks, backends, models, datas, columns, shard,
                                           micro_batch, settings)
    seen, plans = set(), []
    for cell in cells:
        if (cell.cell_id) in seen:
            continue  # repeats share one prediction
        seen.add(cell.cell_id)
        plans.append(plan_cell(reg, cell))
    if as_json:
        click.echo(json.dumps(plan_json(reg, plans, search), indent=2))
    else:
        print_plans(reg, plans, _console(), search)
    sys.exit(0)


def _slurm_options(grid, cli: dict):
    """The Slurm settings (grid file's ``slurm:``, then the flags), or None for the local launcher."""
    kind = cli["launcher_kind"] or grid.launcher or "local"
    flags = {k: v for k, v in cli.items() if k != "launcher_kind" and v not in (None, ())}
    if kind != "slurm":
        if flags:
            names = ", ".join("--" + k.replace("_", "-").replace("flags", "option") for k in sorted(flags))
            raise FtbenchError(f"{names} only apply with --launcher slurm; add --launcher slurm, or drop them to "
                               "run here")
        return None
    from ftbench.harness.grid.files import parse_duration
    from ftbench.harness.running.slurm import options_from, parse_option_flags

    opts = options_from(grid.slurm or {}, grid.source or "grid")
    if cli["slurm_partition"]:
        opts.partition = cli["slurm_partition"]
    if cli["slurm_time"]:
        opts.time_s = parse_duration(cli["slurm_time"], "--slurm-time")
    if cli["slurm_gpus_per_node"] is not None:
        opts.gpus_per_node = cli["slurm_gpus_per_node"]
    if cli["slurm_nodes"] is not None:
        opts.nodes = cli["slurm_nodes"]
    opts.options.update(parse_option_flags(cli["slurm_flags"] or ()))
    if (grid.settings.get("launcher") or {}).get("node_rank") is not None:
        raise FtbenchError("--node-rank starts one node of a grid by hand; with --launcher slurm, Slurm starts "
                           "the nodes: drop --nnodes/--node-rank/--master-addr/--master-port and pass "
                           "--slurm-nodes N instead")
    if isinstance(opts.nodes, int) and opts.nodes > 1:
        # Data-parallel cells span the job's nodes; single-process cells still run on one.
        grid.settings["launcher"] = {"nnodes": opts.nodes}
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
    from ftbench.harness.analysis.report import print_table, write_report

    rep, display = write_report(result_dir, out, loss_x=loss_x)
    con = _console()
    from rich.markup import escape

    for p in rep.problems:
        _console(stderr=True).print(f"[yellow]warning:[/] {escape(p)}", soft_wrap=True)
    if not quiet:
        print_table(display, con, f"ftbench report: {result_dir}")
        if rep.time_to_target is not None:
            print_table(rep.time_to_target, con, "time to target (median over seeds; not reached = infinitely slow)")
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
def compare_cmd(base_dir, new_dir, thresholds, calibration, calibrate, output, alpha, markdown_file):
    """Regressions between two result sets; exit status 1 when something regressed.

    With --calibrate, BASE and NEW are the same grid run twice on one machine,
    and the noise they show becomes per-figure thresholds written to -o FILE.
    """
    from ftbench.harness.analysis.compare import DEFAULT_ALPHA, compare_sets, parse_threshold, print_comparison

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
    print_comparison(cmp, _console(), base_dir, new_dir)
    if markdown_file:
        with open(markdown_file, "a" if markdown_file == os.environ.get("GITHUB_STEP_SUMMARY") else "w") as f:
            f.write(cmp.markdown(base_dir, new_dir))
    sys.exit(EXIT_REGRESSION if cmp.regressions else 0)


def _calibrate(a1, a2, output):
    from ftbench.harness.analysis.calibrate import calibrate, write_calibration

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
    from ftbench.harness.analysis.compare import parse_threshold
    from ftbench.harness.analysis.historyreport import print_history, write_history

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
    from ftbench.harness.analysis.fairness import compare_cells, explain, select_cell
    from ftbench.harness.analysis.resultset import load_result_set

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
    from ftbench.harness.analysis.resultset import merge_result_sets

    summary = merge_result_sets(out, list(sources), allow_mixed_environments=allow_mixed_environments)
    con = _console()
    for w in summary.warnings:
        _console(stderr=True).print(f"[yellow]warning:[/] {w}", soft_wrap=True)
    for src, n in summary.sources.items():
        con.print(f"{src}: {n} record(s)")
    extra = f" ({summary.duplicates} identical duplicate(s) kept once)" if summary.duplicates else ""
    con.print(f"merged {summary.written} record(s) into {out}/results.jsonl{extra}")


if __name__ == "__main__":  # pragma: no cover
    main()
