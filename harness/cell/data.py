"""Loading a task's splits: built-in, a local directory, or the Hugging Face hub.

``--data builtin`` (the default) asks the task for its offline data;
``--data DIR`` reads ``train`` / ``validation`` (/``test``) as ``.jsonl``,
``.json`` (JSON Lines), ``.csv`` or ``.tsv``; ``--data hf:NAME[/CONFIG]``
loads through ``datasets`` (needs network).  ``--column FIELD=COLUMN`` maps a
column of the files onto a field the task expects; a dotted field nests, so
``--column translation.en=english`` builds ``{"translation": {"en": ...}}``.

A cell reads only the rows its run uses through
:mod:`ftbench.harness.cell.rowsource`, which takes the column mapping, the
file-name rules and the hub access defined here.

Every bad line is reported with its file, line number and field.  The rows
read are :class:`Rows`, which remember where each row came from, so a task
that checks the data as a whole (``Task.prepare``) can still name the line.
"""

from __future__ import annotations

from pathlib import Path

from ftbench.harness.contract.api import DataError, FtbenchError

SPLITS = ("train", "validation", "test")
EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")


class Rows(list):
    """A split's examples plus where each came from.

    Example::

        rows = Rows([{"text": "hi"}], origin="data/train.csv", lines=[2])
        rows.where(0)   # 'data/train.csv line 2'
    """

    def __init__(self, items=(), origin: str = "", lines: list[int] | None = None):
        super().__init__(items)
        self.origin = origin
        self.lines = lines

    def where(self, i: int) -> str:
        if self.lines is None:
            return self.origin
        return f"{self.origin} line {self.lines[i] if i < len(self.lines) else i + 1}"


def where(rows: list, i: int) -> str:
    """Where row ``i`` of a split came from, for error messages.

    Example: ``raise DataError(f"{where(rows, i)}: field 'label' is missing")``
    gives ``.../train.jsonl line 12: field 'label' is missing``.
    """
    return rows.where(i) if isinstance(rows, Rows) else f"example {i + 1}"


def map_columns(row: dict, columns: dict[str, str]) -> dict:
    if not columns:
        return row
    row = dict(row)
    for field, column in columns.items():
        if column in row:
            value = row.pop(column)
            head, dot, leaf = field.partition(".")
            if dot:
                # Nested fields (translation.en) cannot be CSV columns; build the dict.
                inner = row.get(head)
                row[head] = {**(inner if isinstance(inner, dict) else {}), leaf: value}
            else:
                row[field] = value
    return row


def _find_split(root: Path, split: str) -> Path | None:
    names = [split] + (["valid", "dev", "val"] if split == "validation" else [])
    for name in names:
        for ext in EXTENSIONS:
            p = root / f"{name}{ext}"
            if p.exists():
                return p
    return None


def split_files(root: Path) -> dict[str, Path]:
    """The split files of a local data directory (``test`` optional), checked for presence."""
    if not root.exists():
        raise FtbenchError(f"data directory {root} does not exist; pass --data DIR with train.jsonl and "
                           "validation.jsonl, --data hf:NAME, or leave --data out for built-in data")
    if not root.is_dir():
        raise FtbenchError(f"--data {root} is not a directory; it should contain train.jsonl and validation.jsonl")
    files = {}
    for split in SPLITS:
        path = _find_split(root, split)
        if path is None:
            if split == "test":
                continue
            raise DataError(f"{root}: no {split} split; add {split}.jsonl (or .csv/.tsv) to the directory")
        files[split] = path
    return files


def open_hub(spec: str, streaming: bool = False):
    """``hf:NAME[/CONFIG]`` (or ``hf:OWNER/NAME[/CONFIG]``) through ``datasets.load_dataset``."""
    try:
        import datasets
    except ImportError:
        raise FtbenchError("--data hf:... needs the datasets library: pip install 'ftbench[hub]'") from None
    name, _, config = spec.partition("/")
    if "/" in config:  # owner/name/config
        name, config = spec.rsplit("/", 1)
    kw = {"streaming": True} if streaming else {}
    try:
        return datasets.load_dataset(name, config or None, **kw)
    except Exception as e:  # noqa: BLE001 - any hub failure is the user's to fix
        # NAME/CONFIG and OWNER/NAME look alike; try the whole spec as a repo id before giving up.
        try:
            ds = datasets.load_dataset(spec, **kw) if config and spec.count("/") == 1 else None
        except Exception:  # noqa: BLE001
            ds = None
        if ds is None:
            raise FtbenchError(f"cannot load hf:{spec} through datasets: {e}") from None
        return ds
