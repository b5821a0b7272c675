"""A result set as a whole: loading it for reports and comparisons, labelling
its cells, and merging shards.

``--force`` appends a fresh record for a (cell, repeat) that already has
one, so readers keep the *last* record of each (cell_id, repeat): the file
stays an append-only log and the newest measurement wins.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.config import FINGERPRINT_FIELDS, CellSpec, Recipe
from ftbench.harness.contract.environment import comparable_view
from ftbench.harness.grid.labels import varying_labels
from ftbench.harness.results.store import RESULTS_FILE, append_record, describe_versions, read_records

#: Parts of a cell's configuration that identify it in a table, besides the recipe.
SLOT_KEYS = ("task", "backend", "model", "data", "nproc", "opt")


@dataclass
class ResultSet:
    """The usable records of one result set (last record per cell and repeat)
    and the problems met while reading it.

    Example::

        rs = load_result_set("runs/today")
        ok = [r for r in rs.records if r["status"] == "ok"]
    """

    path: Path
    records: list[dict] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    replaced: int = 0
    #: schema version -> records read (see ftbench.harness.contract.schema)
    versions: Counter = field(default_factory=Counter)

    def versions_read(self) -> str:
        """What was read, for a command to say: ``"12 record(s) of schema version 1"``."""
        return f"{len(self.records)} record(s) of {describe_versions(self.versions)}"

    def environments(self) -> list[dict]:
        """Distinct comparable environments of the records, most common first."""
        counts = Counter(json.dumps(comparable_view(r.get("environment") or {}), sort_keys=True, default=str)
                         for r in self.records)
        return [json.loads(k) for k, _ in counts.most_common()]


def repeat_of(record: dict) -> int:
    return int(record.get("repeat", (record.get("config") or {}).get("repeat", 0)) or 0)


def latest_per_repeat(records: list[dict]) -> tuple[list[dict], int]:
    """The last record of each (cell_id, repeat), in first-seen order, and how many were replaced."""
    last: dict[tuple, dict] = {}
    for r in records:
        last[(r["cell_id"], repeat_of(r))] = r
    return list(last.values()), len(records) - len(last)


def load_result_set(path: str | os.PathLike) -> ResultSet:
    """Read ``PATH/results.jsonl``; unreadable lines become ``problems`` (with line numbers).

    Example: ``load_result_set("results/baseline-cpu").problems  # [] when clean``.
    """
    rr = read_records(path)
    records, replaced = latest_per_repeat(rr.records)
    return ResultSet(path=Path(path), records=records, problems=list(rr.problems), replaced=replaced,
                     versions=rr.versions)


def as_float(value) -> float | None:
    """A record's number (non-finite floats are stored as strings such as ``"inf"``)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def recipe_of(record: dict) -> dict:
    return dict((record.get("config") or {}).get("recipe") or {})


def slot_of(record: dict) -> tuple:
    cfg = record.get("config") or {}
    return tuple(opt_of(record) if k == "opt" else record.get(k, cfg.get(k)) for k in SLOT_KEYS)


def opt_of(record: dict) -> str:
    """The cell's optimizations (``--opt``), ``""`` for none (and for records from before them)."""
    return str((record.get("config") or {}).get("opt") or "")


def config_diff(a: dict, b: dict) -> list[str]:
    """Human-readable differences between two records' configurations: the settings that define the
    math (the recipe fingerprint's) first, then the rest.  Only real differences: a setting a record
    lacks or holds as null reads as its default (records from before a setting existed, ``packing
    None`` against ``False``), and ``2`` equals ``2.0``.

    Example: ``config_diff(r1, r2) == ["steps 12 -> 20"]``.
    """
    ra, rb = recipe_of(a), recipe_of(b)
    ca, cb = a.get("config") or {}, b.get("config") or {}
    math_keys, other = [], []
    for k in sorted(set(ra) | set(rb)):
        va, vb = _setting(ra, k, RECIPE_DEFAULTS), _setting(rb, k, RECIPE_DEFAULTS)
        if va != vb:
            (math_keys if k in FINGERPRINT_FIELDS else other).append(f"{k} {va!r} -> {vb!r}")
    for k in sorted((set(ca) | set(cb)) - {"recipe"} - NOT_IDENTITY):
        va, vb = _setting(ca, k, CELL_DEFAULTS), _setting(cb, k, CELL_DEFAULTS)
        if va != vb:
            (math_keys if k in ("task", "model", "data", "columns") else other).append(f"{k} {va!r} -> {vb!r}")
    return math_keys + other


def _defaults(cls) -> dict:
    return {f.name: (f.default_factory() if f.default_factory is not MISSING else
                     None if f.default is MISSING else f.default) for f in fields(cls)}


#: What a setting a record lacks, or holds as null, stands for.
RECIPE_DEFAULTS = _defaults(Recipe)
CELL_DEFAULTS = {k: v for k, v in _defaults(CellSpec).items() if k != "recipe"}
#: Cell settings that do not define a cell (limits, where it ran, permissions): never a difference.
NOT_IDENTITY = frozenset({"repeat", "time_limit_s", "memory_limit_mb", "launcher", "profile_steps", "profile_dir",
                          "trust_remote_code"})


def _setting(config: dict, key: str, defaults: dict):
    value = config.get(key)
    if value is None:
        value = defaults.get(key)
    return list(value) if isinstance(value, tuple) else value


def variant_labels(records: list[dict], without: tuple[str, ...] = ()) -> dict[str, str]:
    """A short label per cell_id naming what sets it apart from the other cells:
    the backend, then the model, data, ranks and recipe settings only where
    they vary (``without`` leaves settings out, e.g. the seed, to group a
    cell's seeds under one label); see :mod:`ftbench.harness.grid.labels`.

    Example: ``{"1c66…": "eager · lora · bf16 · seed 2"}``.
    """
    configs = {}
    for r in records:
        if r["cell_id"] not in configs:
            configs[r["cell_id"]] = {**(r.get("config") or {}), **dict(zip(SLOT_KEYS, slot_of(r))),
                                     "recipe": recipe_of(r)}
    return varying_labels(configs, without)


# ------------------------------------------------------------------- merge


@dataclass
class MergeSummary:
    """What :func:`merge_result_sets` wrote."""

    out: Path
    written: int = 0
    duplicates: int = 0
    sources: dict[str, int] = field(default_factory=dict)
    #: per source, the schema versions of its records (``"schema version 1"``)
    versions: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def merge_result_sets(out: str | os.PathLike, sources: list[str | os.PathLike], *,
                      allow_mixed_environments: bool = False) -> MergeSummary:
    """Join result sets (e.g. the shards of one grid) into ``out``, each record once.

    Refuses, saying why, when the sets cannot be one result set: the same
    cell and repeat measured twice with different results, the same cell
    under two recipe fingerprints, or (unless ``allow_mixed_environments``)
    different machines or library versions, whose figures would sit in one
    table as if comparable.

    Example: ``merge_result_sets("runs/all", ["runs/shard1", "runs/shard2"])``.
    """
    if len(sources) < 1:
        raise FtbenchError("merge needs at least one result set to read; e.g. ftbench merge OUT SHARD1 SHARD2")
    out = Path(out)
    if (out / RESULTS_FILE).exists():
        raise FtbenchError(f"{out} already holds a result set; merge into a new directory")
    summary = MergeSummary(out=out)
    sets = []
    for src in sources:
        rs = load_result_set(src)
        summary.warnings += rs.problems
        summary.versions[str(rs.path)] = describe_versions(rs.versions)
        if not rs.records:
            summary.warnings.append(f"{src}: no readable records")
        sets.append(rs)

    _check_environments(sets, summary, allow_mixed_environments)
    keep = _unique_records(sets, summary)
    out.mkdir(parents=True, exist_ok=True)
    for r in keep:
        append_record(out, r)
    summary.written = len(keep)
    first_env = next((Path(rs.path) / "environment.json" for rs in sets
                      if (Path(rs.path) / "environment.json").exists()), None)
    if first_env:
        (out / "environment.json").write_text(first_env.read_text())
    (out / "merge.json").write_text(json.dumps({"sources": summary.sources, "duplicates": summary.duplicates,
                                                "warnings": summary.warnings}, indent=2))
    return summary


def _check_environments(sets, summary: MergeSummary, allow_mixed: bool) -> None:
    envs = {}
    for rs in sets:
        for env in rs.environments():
            envs.setdefault(json.dumps(env, sort_keys=True, default=str), (str(rs.path), env))
    if len(envs) > 1:
        (pa, ea), (pb, eb) = list(envs.values())[:2]
        diff = "; ".join(environment_diff(ea, eb))
        msg = f"the result sets ran in different environments ({pa} vs {pb}: {diff})"
        if not allow_mixed:
            raise FtbenchError(msg + "; their figures are not comparable in one table. Merge shards of one machine "
                               "type, or pass --allow-mixed-environments to merge anyway")
        summary.warnings.append(msg)


def _unique_records(sets, summary: MergeSummary) -> list[dict]:
    """Every record once; refuses the same cell measured twice differently or under two recipes."""
    seen: dict[tuple, tuple[str, str]] = {}
    fingerprints: dict[str, tuple[str, str]] = {}
    keep = []
    for rs in sets:
        n = 0
        for r in rs.records:
            key = (r["cell_id"], repeat_of(r))
            blob = json.dumps(r, sort_keys=True, default=str)
            fp = r.get("recipe_fingerprint")
            if r["cell_id"] in fingerprints and fingerprints[r["cell_id"]][0] != fp:
                raise FtbenchError(f"cell {r['cell_id']} has recipe fingerprint {fingerprints[r['cell_id']][0]} in "
                                   f"{fingerprints[r['cell_id']][1]} but {fp} in {rs.path}: the sets were made by "
                                   "ftbench versions that define the recipe differently; rerun one of them")
            fingerprints[r["cell_id"]] = (fp, str(rs.path))
            if key in seen:
                if seen[key][0] == blob:
                    summary.duplicates += 1
                    continue
                raise FtbenchError(f"cell {r['cell_id']} ({r.get('task')} × {r.get('backend')}) repeat {key[1]} "
                                   f"was measured in both {seen[key][1]} and {rs.path}, with different results; "
                                   "shards of one grid never overlap. Remove it from one set, or run with "
                                   "--repeat to keep several measurements")
            seen[key] = (blob, str(rs.path))
            keep.append(r)
            n += 1
        summary.sources[str(rs.path)] = n
    return keep


def environment_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Flattened differences between two environment views.

    Example: ``environment_diff({"cpu": "A"}, {"cpu": "B"}) == ["cpu 'A' -> 'B'"]``.
    """
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += environment_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k} {va!r} -> {vb!r}")
    return out
