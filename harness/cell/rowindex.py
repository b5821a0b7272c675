"""Random access to the rows of a large JSONL/CSV/TSV file without loading it.

A file is indexed once per version (path, size, modification time): the byte
offset and physical line number of every row, two ``int64`` columns kept in
``$FTBENCH_CACHE/index/`` and memory-mapped, so the cells of a grid (and
preflight) share one scan and a cell's memory does not grow with the file.
Reading row ``i`` is then one ``seek`` + ``read`` + parse.

JSON Lines are scanned with numpy (newlines found at memory speed; a blank
line is skipped but still counted, as an editor counts it).  CSV/TSV rows can
span lines inside quotes, so their index comes from one pass of Python's
``csv`` reader, which is what parses them afterwards too.

Example::

    idx = FileRows(Path("data/train.jsonl"))
    len(idx), idx.raw(41)     # (300000, ({"text": ...}, "data/train.jsonl line 42"))
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ftbench.harness.contract.api import DataError
from ftbench.harness.cell.tokenization import cache_dir

_CHUNK = 4 << 20  # bytes scanned at a time: bounds the scan's own memory
_INDEX_VERSION = 1


class FileRows:
    """The rows of one local data file, read on demand (not validated: see ``rowsource``)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.origin = str(path)
        self.csv = self.path.suffix in (".csv", ".tsv")
        self.delimiter = "\t" if self.path.suffix == ".tsv" else ","
        self.fieldnames: list[str] | None = None
        index = _cached_index(self.path, self._build)
        if self.csv:
            self.fieldnames = self._header(index)
            index = index[:, 1:]  # the header is record 0
        self.starts, self.lines = index[0], index[1]
        self.size = self.path.stat().st_size
        self._file = None

    def __del__(self):
        if getattr(self, "_file", None) is not None:
            self._file.close()

    def __len__(self) -> int:
        return len(self.starts)

    def where(self, i: int) -> str:
        return f"{self.origin} line {int(self.lines[i])}"

    def raw(self, i: int) -> tuple[object, str]:
        """Row ``i`` as parsed from the file (a dict for CSV; whatever the JSON line holds), and where it is."""
        where = self.where(i)
        text = self._text(i, where)
        if self.csv:
            row = next(csv.DictReader(io.StringIO(text, newline=""), fieldnames=self.fieldnames,
                                      delimiter=self.delimiter), None)
            return (dict(row) if row is not None else {}), where
        try:
            return json.loads(text), where
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); "
                            "each line must be one JSON object") from None

    def _text(self, i: int, where: str) -> str:
        start = int(self.starts[i])
        end = int(self.starts[i + 1]) if i + 1 < len(self.starts) else self.size
        if self._file is None:  # one handle for all the rows a cell reads
            self._file = open(self.path, "rb")
        self._file.seek(start)
        data = self._file.read(end - start)
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the row); save the file as "
                            "UTF-8") from None

    def _header(self, index: np.ndarray) -> list[str] | None:
        if index.shape[1] == 0:
            return None
        end = int(index[0, 1]) if index.shape[1] > 1 else self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(end).decode("utf-8", "replace")
        return next(csv.reader(io.StringIO(head, newline=""), delimiter=self.delimiter), None)

    def _build(self) -> np.ndarray:
        return _csv_index(self.path, self.delimiter) if self.csv else _jsonl_index(self.path)


def _cached_index(path: Path, build) -> np.ndarray:
    st = path.stat()
    key = f"{_INDEX_VERSION}|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    if os.environ.get("FTBENCH_NO_CACHE"):
        return build()
    target = cache_dir() / "index" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"
    if target.exists():
        try:
            return np.load(target, mmap_mode="r")
        except (OSError, ValueError):
            pass  # a damaged entry is rebuilt
    index = build()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            np.save(f, index)
        os.replace(tmp, target)
    except OSError:
        pass  # a read-only or full cache only costs the next cell a scan
    return index


def _jsonl_index(path: Path) -> np.ndarray:
    """Offsets and 1-based line numbers of the non-blank lines, scanned a chunk at a time."""
    starts, lines, suspects = [], [], []
    space = np.frombuffer(b" \t\r\n\x0b\x0c", np.uint8)
    base, n_newlines, carry = 0, 0, 1  # carry: line number of a line starting at this chunk's first byte
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            arr = np.frombuffer(chunk, np.uint8)
            nl = np.flatnonzero(arr == 10)
            after = nl + 1
            inside = after < len(arr)
            local = after[inside]
            nums = n_newlines + 2 + np.flatnonzero(inside)
            if carry is not None:
                local, nums = np.concatenate([[0], local]), np.concatenate([[carry], nums])
            # Only a line that begins with whitespace can be blank; those few are checked afterwards.
            blank_maybe = np.isin(arr[local], space)
            starts.append(local.astype(np.int64) + base)
            lines.append(nums.astype(np.int64))
            suspects.append(blank_maybe)
            carry = n_newlines + len(nl) + 1 if len(nl) and after[-1] == len(arr) else None
            base += len(arr)
            n_newlines += len(nl)
    if not starts:
        return np.zeros((2, 0), np.int64)
    index = np.stack([np.concatenate(starts), np.concatenate(lines)])
    keep = np.ones(index.shape[1], bool)
    with open(path, "rb") as f:
        for k in np.flatnonzero(np.concatenate(suspects)).tolist():
            f.seek(int(index[0, k]))
            end = int(index[0, k + 1]) if k + 1 < index.shape[1] else base
            keep[k] = bool(f.read(end - int(index[0, k])).strip())
    return index[:, keep]


def _csv_index(path: Path, delimiter: str) -> np.ndarray:
    """Offsets and first physical lines of every CSV record (the header first), as ``csv`` splits them."""
    starts: list[int] = []
    lines: list[int] = []
    pending: list[tuple[int, int]] = []
    pos, lineno = 0, 0

    def physical_lines(f):
        nonlocal pos, lineno
        for raw in f:
            lineno += 1
            pending.append((pos, lineno))
            pos += len(raw)
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path} line {lineno}: not valid UTF-8 (byte {e.start + 1}); save the file as "
                                "UTF-8") from None

    with open(path, "rb") as f:
        # csv pulls exactly the lines of one record before returning it
        for row in csv.reader(physical_lines(f), delimiter=delimiter):
            first = pending[0]
            pending.clear()
            if row:  # csv skips an empty line; so does DictReader
                starts.append(first[0])
                lines.append(first[1])
    return np.array([starts, lines], dtype=np.int64).reshape(2, -1)
