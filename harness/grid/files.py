"""Reading grid files (YAML or TOML) and merging command-line overrides.

A grid file::

    task: [generation, classification]
    backend: [eager, "compile:mode=default"]
    model: [auto]
    sweep: {lr: [1.0e-3, 3.0e-3]}       # any recipe setting (or nproc) as an extra axis
    settings: {steps: 50, batch_size: 8}
    time_limit: 15m                     # per cell; also settings.time_limit_s
    exclude:
      - {task: classification, backend: compile}
    per_cell:                           # cell settings for matching cells only
      - {match: {backend: compile}, time_limit: 30m}
    repeat: 1
    order: interleaved                  # repeats round-robin (default), or sequential

Command-line axes replace the file's axes; command-line settings override
the file's settings, its sweeps and its ``per_cell`` rules for that key.
"""

from __future__ import annotations

import difflib
import hashlib
import tomllib
import typing
from importlib import resources
from pathlib import Path

import yaml

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.format import parse_duration  # noqa: F401 (grid files' durations; cli imports it here)
from ftbench.harness.grid.slurm_options import options_from
from ftbench.harness.contract.format import shorten, shown
from ftbench.harness.contract.config import RECIPE_FIELDS, Recipe
from ftbench.harness.grid.expand import (AXES, CELL_SETTINGS, INTERLEAVED, ORDERS, PER_CELL_SETTINGS, SWEEPABLE,
                                        Grid)
from ftbench.harness.grid.request import GridRequest

DEFAULT_GRID = "default_grid.yaml"
TOP_KEYS = set(AXES) | {"settings", "exclude", "repeat", "sweep", "time_limit", "per_cell", "target", "order",
                        "launcher", "slurm", "max_cells", "sink", "ladder", "ablation"}
LAUNCHERS = ("local", "slurm")
SETTING_KEYS = set(RECIPE_FIELDS) | set(CELL_SETTINGS)
_RECIPE_TYPES = typing.get_type_hints(Recipe)
_CELL_TYPES = {"nproc": int, "time_limit_s": float, "memory_limit_mb": float, "eval_examples": int, "device": str,
               "eval_every": int, "stop_at_target": bool, "profile_steps": int,
               "cpu_memory": str, "trust_remote_code": bool}


#: The most a grid file may hold: its bytes, and its YAML values once aliases are expanded.  A grid of
#: a thousand cells is a few kilobytes; these bounds keep a hostile file's cost to milliseconds.
MAX_GRID_BYTES = 1 << 20
MAX_GRID_NODES = 100_000
#: Repeats of one cell: enough for any noise study.
MAX_REPEAT = 1000


def read_grid_file(path: Path) -> str:
    """A grid file's text: refused when too large or not UTF-8, before any parsing."""
    size = path.stat().st_size
    if size > MAX_GRID_BYTES:
        raise FtbenchError(f"grid file {path} is {size:,} bytes, over the {MAX_GRID_BYTES:,} a grid file may "
                           "have; a grid lists axes and settings (see grids/), not data")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise FtbenchError(f"grid file {path} is not UTF-8 text (byte {e.start}, line {line}: "
                           f"{raw[e.start:e.start + 4]!r}); save it as UTF-8") from None


def load_grid_text(text: str, name: str) -> dict:
    if len(text) > MAX_GRID_BYTES:
        raise FtbenchError(f"grid file {name} is {len(text):,} characters, over the {MAX_GRID_BYTES:,} a grid "
                           "file may have")
    if name.endswith(".toml"):
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise FtbenchError(f"grid file {name}: invalid TOML: {e}") from None
    else:
        data = _safe_yaml(text, name)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FtbenchError(f"grid file {name}: expected a mapping with keys {sorted(TOP_KEYS)}")
    return data


def _safe_yaml(text: str, name: str):
    """``yaml.safe_load`` (a grid file can never run code), refusing a document whose aliases expand
    past :data:`MAX_GRID_NODES` values (a few hundred bytes of nested aliases can stand for billions)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            size = _expanded_size(node, {})
            if size > MAX_GRID_NODES:
                raise FtbenchError(f"grid file {name}: its YAML expands to {size:,} values (aliases repeat "
                                   f"what they point to), over the {MAX_GRID_NODES:,} a grid may have; write "
                                   "the grid without nested aliases")
        return loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        raise FtbenchError(f"grid file {name}: invalid YAML: {shorten(str(e), 400)}") from None
    finally:
        loader.dispose()


def _expanded_size(node, memo: dict) -> int:
    """Values the node stands for once every alias is expanded; each distinct node is visited once."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once here; the constructor handles recursion itself
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, memo) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[key] = size
    return size


def _unknown(name: str, where: str, keys, allowed) -> None:
    """Raise naming the first unknown key, the closest allowed one and all allowed ones."""
    bad = sorted(set(keys) - set(allowed), key=str)
    if not bad:
        return
    close = difflib.get_close_matches(str(bad[0])[:100], [str(a) for a in allowed], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    if where == "" and str(bad[0]) in SETTING_KEYS:
        hint = f" (a setting: put it under 'settings:', or under 'sweep:' to vary it)"
    place = f" in {where}" if where else ""
    raise FtbenchError(f"grid file {name}: unknown key {shown(bad[0])}{place}{hint}; allowed: "
                       f"{', '.join(sorted(map(str, allowed)))}")


def coerce_setting(key: str, value, where: str):
    """Check one setting's type (YAML reads ``1e-3`` as a string; accept it as a number)."""
    if key in ("time_limit_s",) and isinstance(value, str):
        return parse_duration(value, f"{where}{key}")
    if key == "columns":
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise FtbenchError(f"{where}columns must be a mapping of task field to data column, e.g. "
                               f"{{text: review, label: stars}}; got {shown(value)}")
        return value
    want = _RECIPE_TYPES.get(key) or _CELL_TYPES.get(key)
    if want is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FtbenchError(f"{where}{key} must be an integer, got {shown(value)}")
    elif want is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise FtbenchError(f"{where}{key} must be a number, got {shown(value)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FtbenchError(f"{where}{key} must be a number, got {shown(value)}")
        value = float(value)
    elif want is str and not isinstance(value, str):
        raise FtbenchError(f"{where}{key} must be a string, got {shown(value)}")
    elif want is bool and not isinstance(value, bool):
        raise FtbenchError(f"{where}{key} must be true or false, got {shown(value)}")
    return value


def grid_from_dict(data: dict, name: str) -> Grid:
    """Validate a parsed grid file; every error names the file, the key and what is allowed.

    Example: ``grid_from_dict({"task": ["generation"], "backend": ["eager"]}, "g.yaml")``.
    """
    _unknown(name, "", data, TOP_KEYS)
    axes = _axes(data, name)
    settings = _settings(data, name)
    sweep = _sweep(data, name, settings)
    match_keys = set(AXES) | set(sweep)
    exclude = _exclude(data, name, sweep, match_keys)
    rules = _per_cell(data, name, match_keys)
    repeat = data.get("repeat", 1)
    if not isinstance(repeat, int) or isinstance(repeat, bool) or not 1 <= repeat <= MAX_REPEAT:
        raise FtbenchError(f"grid file {name}: repeat must be an integer >= 1 and at most {MAX_REPEAT}, got {shown(repeat)}")
    order = data.get("order", INTERLEAVED)
    if order not in ORDERS:
        raise FtbenchError(f"grid file {name}: order must be one of {', '.join(ORDERS)}, got {shown(order)}")
    launcher, slurm = _launcher(data, name)
    max_cells = data.get("max_cells")
    if max_cells is not None and (not isinstance(max_cells, int) or isinstance(max_cells, bool) or max_cells < 1):
        raise FtbenchError(f"grid file {name}: max_cells must be an integer >= 1 (the most cells this grid may "
                           f"expand to), got {shown(max_cells)}")
    sinks = data.get("sink") or []
    sinks = [sinks] if isinstance(sinks, str) else sinks
    if not isinstance(sinks, list) or not all(isinstance(x, str) for x in sinks):
        raise FtbenchError(f"grid file {name}: sink must be a sink spec or a list of them, e.g. "
                           f"[\"mlflow:uri=http://127.0.0.1:5000\", tensorboard], got {shown(data.get('sink'))}")
    return Grid(axes=axes, settings=settings, exclude=exclude, repeat=repeat, sweep=sweep, per_cell=rules,
                order=order, source=f"grid file {name}", targets=_targets(data, name), launcher=launcher,
                slurm=slurm, max_cells=max_cells, sinks=sinks, ladder=_opt_list(data, name, "ladder"),
                ablation=_opt_list(data, name, "ablation"))


def _opt_list(data: dict, name: str, key: str) -> list[str]:
    """``ladder:`` / ``ablation:``: a list of optimizations (or one comma-separated string)."""
    v = data.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        v = split_opt_list(v)
    if not isinstance(v, list) or not v or not all(isinstance(x, str) and x for x in v):
        raise FtbenchError(f"grid file {name}: {key} must be a list of optimizations like "
                           f"[attn:impl=sdpa, chunked-ce], got {v!r}")
    return v


def split_opt_list(text: str) -> list[str]:
    """``"attn:impl=sdpa,chunked-ce:chunks=8,adamw:impl=fused"`` -> one optimization per rung.

    A comma separates rungs, except before a ``key=value`` that continues the
    options of the rung before it (``adamw-8bit:block=256,impl=x``).
    """
    rungs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if rungs and "=" in part and ":" not in part.split("=", 1)[0] and ":" in rungs[-1].split("+")[-1]:
            rungs[-1] += "," + part
        else:
            rungs.append(part)
    return rungs


def _targets(data: dict, name: str) -> list[str]:
    """``target:`` as one string, a list, or a mapping task -> target (e.g. {generation: perplexity=20})."""
    v = data.get("target")
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return list(v)
    if isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items()):
        return [f"{task}:{target}" for task, target in v.items()]
    raise FtbenchError(f"grid file {name}: target must be a string like perplexity=20, a list of them, or a "
                       f"mapping of task to target like {{generation: perplexity=20}}, got {shown(v)}")


def _axes(data: dict, name: str) -> dict:
    axes = {}
    for a in AXES:
        v = data.get(a)
        if v is None:
            continue
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise FtbenchError(f"grid file {name}: {a} must be a list of strings, got {shown(v)}")
        if not v:
            raise FtbenchError(f"grid file {name}: {a} is an empty list; list at least one {a}")
        axes[a] = v
    return axes


def _settings(data: dict, name: str) -> dict:
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise FtbenchError(f"grid file {name}: settings must be a mapping, got {shown(settings)}")
    _unknown(name, "settings", settings, SETTING_KEYS)
    settings = {k: coerce_setting(k, v, f"grid file {name}: settings.") for k, v in settings.items()}
    if "time_limit" in data:
        settings["time_limit_s"] = parse_duration(data["time_limit"], f"grid file {name}: time_limit")
    return settings


def _sweep(data: dict, name: str, settings: dict) -> dict:
    sweep = data.get("sweep") or {}
    if not isinstance(sweep, dict):
        raise FtbenchError(f"grid file {name}: sweep must be a mapping of setting -> list of values, "
                           f"e.g. sweep: {{lr: [1.0e-3, 3.0e-3]}}")
    _unknown(name, "sweep", sweep, SWEEPABLE)
    for k, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise FtbenchError(f"grid file {name}: sweep.{k} must be a non-empty list of values, got {shown(values)}")
        sweep[k] = [coerce_setting(k, v, f"grid file {name}: sweep.") for v in values]
        if k in settings:
            raise FtbenchError(f"grid file {name}: {k} is both in settings and in sweep; keep one")
    return sweep


def _exclude(data: dict, name: str, sweep: dict, match_keys: set) -> list:
    exclude = data.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, dict) and e for e in exclude):
        raise FtbenchError(f"grid file {name}: exclude must be a list of mappings like {{task: X, backend: Y}}")
    for ex in exclude:
        _unknown(name, "exclude", ex, match_keys)
        for k in ex:
            if k in sweep:
                ex[k] = [coerce_setting(k, v, f"grid file {name}: exclude.") for v in
                         (ex[k] if isinstance(ex[k], list) else [ex[k]])]
    return exclude


def _per_cell(data: dict, name: str, match_keys: set) -> list:
    per_cell = data.get("per_cell") or []
    if not isinstance(per_cell, list) or not all(isinstance(r, dict) for r in per_cell):
        raise FtbenchError(f"grid file {name}: per_cell must be a list of mappings like "
                           f"{{match: {{backend: compile}}, time_limit: 30m}}")
    rules = []
    for rule in per_cell:
        _unknown(name, "per_cell", rule, {"match", "time_limit", *PER_CELL_SETTINGS})
        match = rule.get("match") or {}
        if not isinstance(match, dict):
            raise FtbenchError(f"grid file {name}: per_cell.match must be a mapping like {{backend: compile}}")
        _unknown(name, "per_cell.match", match, match_keys)
        out = {"match": match}
        for k, v in rule.items():
            if k == "time_limit":
                out["time_limit_s"] = parse_duration(v, f"grid file {name}: per_cell.time_limit")
            elif k != "match":
                out[k] = coerce_setting(k, v, f"grid file {name}: per_cell.")
        rules.append(out)
    return rules


def _launcher(data: dict, name: str) -> tuple[str | None, dict | None]:
    """``launcher: local|slurm`` and the ``slurm:`` mapping (checked now, used with the slurm launcher)."""
    launcher = data.get("launcher")
    if launcher is not None and launcher not in LAUNCHERS:
        raise FtbenchError(f"grid file {name}: launcher must be one of {', '.join(LAUNCHERS)}, got {shown(launcher)} "
                           "(multi-node settings such as nnodes go under settings.launcher)")
    slurm = data.get("slurm")
    if slurm is not None:

        options_from(slurm, f"grid file {name}")
    return launcher, slurm


def build_grid(request: GridRequest) -> Grid:
    """The grid to run: a file (or the embedded default when nothing is given), then the command line's
    axes, settings and sweeps.

    A command-line value is final: it replaces the file's setting, its sweep
    and any per-cell rule for that key.  Example:
    ``build_grid(GridRequest(axes={"task": ("generation",)}, sweep={"lr": (1e-3, 3e-3)}))``.
    """
    given_axes = {a: list(v) for a, v in request.axes.items() if v}
    if request.grid_file:
        path = Path(request.grid_file)
        if not path.exists():
            raise FtbenchError(f"grid file {request.grid_file} does not exist")
        if not path.is_file():
            raise FtbenchError(f"grid file {request.grid_file} is not a file; pass a YAML or TOML grid file")
        grid = grid_from_dict(load_grid_text(read_grid_file(path), str(path)), str(path))
    elif not given_axes.get("task") and not given_axes.get("backend"):
        text = resources.files("ftbench.harness.grid").joinpath(DEFAULT_GRID).read_text()
        grid = grid_from_dict(load_grid_text(text, DEFAULT_GRID), DEFAULT_GRID)
    else:
        grid = Grid(axes={"task": ["generation"], "backend": ["eager"]})
    grid.axes.update(given_axes)
    if request.targets:
        grid.targets = list(request.targets)  # the command line replaces the file's targets
    if request.repeat is not None:
        if not 1 <= request.repeat <= MAX_REPEAT:
            raise FtbenchError(f"invalid --repeat {shown(request.repeat)}: must be >= 1 and at most {MAX_REPEAT}")
        grid.repeat = request.repeat
    if request.order is not None:
        grid.order = request.order
    settings = dict(request.settings)
    for key in ("ladder", "ablation"):
        rungs = settings.pop(key, None)
        if rungs:
            setattr(grid, key, split_opt_list(rungs))
    if request.launch.to_dict():
        settings["launcher"] = request.launch
    sweep = {}
    for key, values in request.sweep.items():
        if key not in SWEEPABLE:
            close = difflib.get_close_matches(key, SWEEPABLE, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FtbenchError(f"--sweep {key}: not a setting a grid can sweep{hint}; sweepable: "
                               f"{', '.join(SWEEPABLE)}")
        if key in settings:
            raise FtbenchError(f"{key} is given one value and swept as well; keep one")
        sweep[key] = [coerce_setting(key, v, "--sweep ") for v in values]
    for key in (*settings, *sweep):
        grid.sweep.pop(key, None)
        grid.settings.pop(key, None)
        for rule in grid.per_cell:
            rule.pop(key, None)
    grid.settings.update(settings)
    grid.sweep.update(sweep)
    return grid


def select_shard(cells: list, shard: str) -> list:
    """Shard ``i/N`` (1-based) of the cells: disjoint, covering, balanced, deterministic.

    Distinct cell ids are ordered by a hash and dealt round-robin, so every
    machine that expands the same grid agrees on the split whatever the
    order of the axes, shard sizes differ by at most one cell, and all
    repeats of a cell land in the same shard (resume keeps working per shard).

    Example: ``select_shard(cells, "2/4")``.
    """
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        i = n = 0
    if not (n >= 1 and 1 <= i <= n):
        raise FtbenchError(f"invalid --shard {shown(shard)}: write i/N with 1 <= i <= N, e.g. --shard 1/4")
    ids = sorted({c.cell_id for c in cells}, key=lambda cid: (hashlib.sha256(cid.encode()).hexdigest(), cid))
    mine = {cid for k, cid in enumerate(ids) if k % n == i - 1}
    return [c for c in cells if c.cell_id in mine]
