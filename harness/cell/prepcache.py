"""A disk cache of encoded (tokenized, truncated) splits, shared by the cells of a grid.

Encoding thousands of examples costs more than a short cell's training on a
small CPU, and every cell of a grid over backends encodes the same data the
same way.  Entries are keyed by everything that changes the encoding: task
and options, the data's identity (file sizes and modification times for
local data), the tokenizer, the model kind and the sequence length.

Arrays are stored with ``numpy.savez`` and read with ``allow_pickle=False``,
so a cache file can never run code; writes go to a temporary file that is
renamed into place, so concurrent cells at worst both compute the entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ftbench.harness.contract.api import Encoded
from ftbench.harness.cell.tokenization import cache_dir


def data_identity(data: str, splits: dict | None = None) -> object:
    """What identifies a data source's content cheaply.

    Built-in data is hashed in full (it is small, and the code that makes it
    may change); local files by name, size and modification time.
    """
    if data in ("builtin", "", None):
        blob = json.dumps(splits, sort_keys=True, default=str).encode()
        return ["builtin", hashlib.sha256(blob).hexdigest()]
    if str(data).startswith("hf:"):
        return data
    root = Path(data)
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in root.iterdir() if p.is_file())


def _path(key: dict) -> Path:
    h = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return cache_dir() / "encoded" / f"{h}.npz"


def _save(path: Path, splits: dict[str, list[Encoded]]) -> None:
    arrays = {}
    for name, items in splits.items():
        arrays[f"{name}.ids"] = np.fromiter((t for e in items for t in e.input_ids), dtype=np.int64)
        arrays[f"{name}.ids_len"] = np.array([len(e.input_ids) for e in items], dtype=np.int64)
        arrays[f"{name}.labels"] = np.fromiter((t for e in items for t in e.labels), dtype=np.int64)
        arrays[f"{name}.labels_len"] = np.array([len(e.labels) for e in items], dtype=np.int64)
        arrays[f"{name}.truncated"] = np.array([e.truncated for e in items], dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
    with os.fdopen(fd, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _split(values: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    return [chunk.tolist() for chunk in np.split(values, np.cumsum(lengths)[:-1])] if len(lengths) else []


def _load(path: Path) -> dict[str, list[Encoded]]:
    with np.load(path, allow_pickle=False) as z:
        names = {k.split(".")[0] for k in z.files}
        out = {}
        for name in names:
            ids = _split(z[f"{name}.ids"], z[f"{name}.ids_len"])
            labels = _split(z[f"{name}.labels"], z[f"{name}.labels_len"])
            out[name] = [Encoded(i, l, int(t)) for i, l, t in zip(ids, labels, z[f"{name}.truncated"])]
        return out


def cached_encode(key: dict, compute: Callable[[], dict[str, list[Encoded]]]) -> dict[str, list[Encoded]]:
    """``compute()`` once per key; later calls read the stored arrays.

    Example::

        enc = cached_encode({"task": "generation", "seq_len": 64, ...}, lambda: encode_all())
    """
    if os.environ.get("FTBENCH_NO_CACHE"):
        return compute()
    path = _path(key)
    if path.exists():
        try:
            return _load(path)
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry is recomputed and replaced
    result = compute()
    try:
        _save(path, result)
    except OSError:
        pass  # a read-only cache only costs speed
    return result
