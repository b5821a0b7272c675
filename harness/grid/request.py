"""What a command line asks of a grid, as one typed value.

The CLI turns its options into a :class:`GridRequest`; :func:`~ftbench.harness.grid.files.build_grid`
reads it (never popping keys out of a caller's dict) and lays it over the
grid file or the embedded default grid.  A setting given once is shared by
every cell; a setting given several times (a repeated option, ``--sweep
KEY=V1,V2``, ``--seeds``) is an extra axis of the product, exactly as the
grid file's ``sweep:`` makes one.

Example::

    GridRequest(axes={"backend": ("eager", "compile")}, settings={"steps": 20},
                sweep={"tuning": ("full", "lora")})    # 2 backends x 2 tunings = 4 cells
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.config import Launch


@dataclass(frozen=True)
class GridRequest:
    """The grid a command line describes, before the grid file's settings are merged in.

    ``axes`` holds the task/backend/model/data values given (an empty tuple:
    the file's or default); ``settings`` one value per setting; ``sweep``
    several values per swept setting; ``micro_batch`` the ``--micro-batch``
    values (``N`` or ``auto``; several: an axis).

    Example: ``GridRequest(grid_file="grids/cpu-smoke.yaml", settings={"steps": 10}, repeat=3)``.
    """

    grid_file: str | None = None
    axes: dict[str, tuple] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, tuple] = field(default_factory=dict)
    targets: tuple[str, ...] = ()
    repeat: int | None = None
    order: str | None = None
    launch: Launch = field(default_factory=Launch)
    micro_batch: tuple = ()
    shard: str | None = None


def parse_sweep(text: str) -> tuple[str, tuple]:
    """``--sweep KEY=V1,V2`` -> ``(KEY, (V1, V2))``, values read as JSON scalars where they are one.

    Example: ``parse_sweep("warmup=2,4") == ("warmup", (2, 4))``.
    """
    key, eq, rest = text.partition("=")
    key = key.strip().replace("-", "_")
    values = tuple(_scalar(v.strip()) for v in rest.split(",")) if eq else ()
    if not key or not values or any(v == "" for v in values):
        raise FtbenchError(f"malformed --sweep {text!r}: write KEY=V1,V2 (e.g. --sweep warmup=2,4); a value "
                           "holding commas (lora:r=8,alpha=16) goes in its own repeated option (--tuning)")
    return key, values


def distinct(values) -> tuple:
    """The values in order, each once (a setting given twice with one value is not an axis)."""
    out: list = []
    for v in values:
        if v not in out:
            out.append(v)
    return tuple(out)


def _scalar(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, (int, float, bool)) else text
