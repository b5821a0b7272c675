"""Reading grid files (YAML or TOML) and merging command-line overrides.

A grid file::

    task: [generation, classification]
    backend: [eager, "compile:mode=default"]
    model: [auto]
    settings: {steps: 50, batch_size: 8}
    exclude:
      - {task: classification, backend: compile}
    repeat: 1

Command-line axes replace the file's axes; command-line settings override
the file's settings.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

from .api import FtbenchError
from .grid import AXES, Grid

DEFAULT_GRID = "default_grid.yaml"
TOP_KEYS = set(AXES) | {"settings", "exclude", "repeat"}


def load_grid_text(text: str, name: str) -> dict:
    if name.endswith(".toml"):
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise FtbenchError(f"grid file {name}: invalid TOML: {e}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)  # safe: a grid file can never run code
        except yaml.YAMLError as e:
            raise FtbenchError(f"grid file {name}: invalid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FtbenchError(f"grid file {name}: expected a mapping with keys {sorted(TOP_KEYS)}")
    return data


def grid_from_dict(data: dict, name: str) -> Grid:
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise FtbenchError(f"grid file {name}: unknown key(s) {sorted(unknown)}; allowed: {sorted(TOP_KEYS)}")
    axes = {}
    for a in AXES:
        v = data.get(a)
        if v is None:
            continue
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise FtbenchError(f"grid file {name}: {a} must be a list of strings, got {v!r}")
        if not v:
            raise FtbenchError(f"grid file {name}: {a} is an empty list; list at least one {a}")
        axes[a] = v
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise FtbenchError(f"grid file {name}: settings must be a mapping, got {settings!r}")
    exclude = data.get("exclude") or []
    if not isinstance(exclude, list) or not all(isinstance(e, dict) for e in exclude):
        raise FtbenchError(f"grid file {name}: exclude must be a list of mappings like {{task: X, backend: Y}}")
    repeat = data.get("repeat", 1)
    if not isinstance(repeat, int) or repeat < 1:
        raise FtbenchError(f"grid file {name}: repeat must be an integer >= 1, got {repeat!r}")
    return Grid(axes=axes, settings=dict(settings), exclude=exclude, repeat=repeat)


def build_grid(grid_file: str | None, cli_axes: dict, overrides: dict) -> Grid:
    """The grid to run: a file (or the embedded default when nothing is given), then CLI overrides."""
    given_axes = {a: v for a, v in cli_axes.items() if v}
    if grid_file:
        path = Path(grid_file)
        if not path.exists():
            raise FtbenchError(f"grid file {grid_file} does not exist")
        grid = grid_from_dict(load_grid_text(path.read_text(), str(path)), str(path))
    elif not given_axes.get("task") and not given_axes.get("backend"):
        text = resources.files("harness").joinpath(DEFAULT_GRID).read_text()
        grid = grid_from_dict(load_grid_text(text, DEFAULT_GRID), DEFAULT_GRID)
    else:
        grid = Grid(axes={"task": ["generation"], "backend": ["eager"]})
    grid.axes.update(given_axes)
    repeat = overrides.pop("repeat", None)
    if repeat is not None:
        if repeat < 1:
            raise FtbenchError(f"invalid --repeat {repeat}: must be >= 1")
        grid.repeat = repeat
    grid.settings.update(overrides)
    return grid


def select_shard(cells: list, shard: str) -> list:
    """Shard ``i/N`` (1-based): a deterministic subset by hash of the cell id, so
    shards are disjoint, cover the grid, and repeats of a cell stay together."""
    try:
        i, n = (int(x) for x in shard.split("/"))
    except ValueError:
        i = n = 0
    if not (n >= 1 and 1 <= i <= n):
        raise FtbenchError(f"invalid --shard {shard!r}: write i/N with 1 <= i <= N, e.g. --shard 1/4")
    return [c for c in cells if int(hashlib.sha256(c.cell_id.encode()).hexdigest(), 16) % n == i - 1]
