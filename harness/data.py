"""Loading a task's splits: built-in, a local directory, or the Hugging Face hub.

``--data builtin`` (the default) asks the task for its offline data;
``--data DIR`` reads ``train`` / ``validation`` (/``test``) as ``.jsonl``,
``.json`` (JSON Lines), ``.csv`` or ``.tsv``; ``--data hf:NAME[/CONFIG]``
loads through ``datasets`` (needs network).  ``--column FIELD=COLUMN`` maps a
column of the files onto a field the task expects.

Every bad line is reported with its file, line number and field.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .api import DataError, FtbenchError, Task

SPLITS = ("train", "validation", "test")
EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")


def load_splits(task: Task, data: str, options: dict, seed: int,
                columns: dict[str, str] | None = None) -> dict[str, list[dict]]:
    """``{"train": [...], "validation": [...]}`` (``test`` when present), validated."""
    columns = columns or {}
    if data in ("builtin", "", None):
        splits = task.builtin_data(seed, options)
        origin = {s: f"built-in {task.name} data ({s})" for s in splits}
    elif data.startswith("hf:"):
        splits, origin = _load_hub(data[3:])
    else:
        splits, origin = _load_dir(Path(data))
    for split in ("train", "validation"):
        if not splits.get(split):
            raise DataError(f"{origin.get(split, data)}: the {split} split is empty or missing; "
                            f"{task.name!r} needs at least one {split} example")
    for split, rows in splits.items():
        mapped = []
        for i, row in enumerate(rows):
            where = origin[split] if data in ("builtin", "", None) else f"{origin[split]} line {i + 1}"
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
            row = _map_columns(row, columns)
            task.validate(row, where, options)
            mapped.append(row)
        splits[split] = mapped
    return splits


def _map_columns(row: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return row
    row = dict(row)
    for field, column in columns.items():
        if column in row:
            row[field] = row.pop(column)
    return row


def _find_split(root: Path, split: str) -> Path | None:
    names = [split] + (["valid", "dev", "val"] if split == "validation" else [])
    for name in names:
        for ext in EXTENSIONS:
            p = root / f"{name}{ext}"
            if p.exists():
                return p
    return None


def _load_dir(root: Path):
    if not root.exists():
        raise FtbenchError(f"data directory {root} does not exist; pass --data DIR with train.jsonl and "
                           "validation.jsonl, --data hf:NAME, or leave --data out for built-in data")
    if not root.is_dir():
        raise FtbenchError(f"--data {root} is not a directory; it should contain train.jsonl and validation.jsonl")
    splits, origin = {}, {}
    for split in SPLITS:
        path = _find_split(root, split)
        if path is None:
            if split == "test":
                continue
            raise DataError(f"{root}: no {split} split; add {split}.jsonl (or .csv/.tsv) to the directory")
        splits[split] = _read_file(path)
        origin[split] = str(path)
    return splits, origin


def _read_file(path: Path) -> list[dict]:
    if path.suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
            if reader.fieldnames is None:
                return []
            return [dict(r) for r in reader]
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                                "each line must be one JSON object") from None
    return rows


def _load_hub(spec: str):
    try:
        import datasets
    except ImportError:
        raise FtbenchError("--data hf:... needs the datasets library: pip install 'ftbench[hub]'") from None
    name, _, config = spec.partition("/")
    if "/" in config:  # owner/name/config
        owner_name, config = spec.rsplit("/", 1)
        name = owner_name
    try:
        ds = datasets.load_dataset(name, config or None)
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's to fix
        raise FtbenchError(f"cannot load hf:{spec} through datasets: {e}") from None
    splits, origin = {}, {}
    for split, key in (("train", "train"), ("validation", "validation"), ("test", "test")):
        if key not in ds and split == "validation":
            key = next((k for k in ("valid", "dev", "val") if k in ds), key)
        if key in ds:
            splits[split] = [dict(r) for r in ds[key]]
            origin[split] = f"hf:{spec}[{key}]"
    return splits, origin
