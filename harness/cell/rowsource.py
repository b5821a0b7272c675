"""The rows a cell needs, and only those: its batches, a tokenizer sample, its evaluation examples.

The batch plan (:func:`ftbench.harness.cell.batches.batch_plan`) needs only
the number of training rows; the rows it draws, the bounded tokenizer
sample and the first ``eval_examples`` validation rows are then read,
column-mapped and validated, each exactly once, in the same order for every
backend and world size (all ranks read the global batches).  A bad row among
them fails the cell (and preflight, which reads the same rows) before any
training, naming file, line and field; a bad row the run does not use is
never read.  docs/data.md says what is checked up front and what per row.

Sources (see :func:`open_sources`):

* built-in data: the task's in-memory rows;
* a local directory: :class:`~ftbench.harness.cell.rowindex.FileRows`, a
  cached byte-offset index of each file;
* ``hf:NAME``: ``datasets`` with ``streaming=True``; the training split is
  the first ``steps x batch_size`` rows of the stream (the examples a run
  consumes, in the hub's own order), never the whole dataset.

Example::

    data = load_run_data(task, spec.data, options, recipe, spec.eval_examples, world_size=2)
    data.n_train, data.rows_read, data.splits["train"]   # Rows, in first-use order
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ftbench.harness.contract.api import DataError, Task
from ftbench.harness.cell.data import Rows, map_columns, split_files
from ftbench.harness.cell.rowindex import FileRows
from ftbench.harness.cell.data import open_hub
from ftbench.harness.cell.batches import batch_plan

#: Rows the preset tokenizer is trained on, at most: a seeded sample of the training split.
TOKENIZER_SAMPLE_ROWS = 2048
#: ... and at most this much text, whichever comes first.
TOKENIZER_SAMPLE_BYTES = 2 << 20
#: Fixed seed of the tokenizer sample: the tokenizer belongs to the data, not to a run's --seed.
SAMPLE_SEED = 20240601


class ListRows:
    """In-memory rows (built-in data, a streamed prefix) with the same interface as ``FileRows``."""

    def __init__(self, rows: list, origin: str, numbered: bool = False):
        self.rows, self.origin, self.numbered = rows, origin, numbered

    def __len__(self) -> int:
        return len(self.rows)

    def raw(self, i: int):
        return self.rows[i], (f"{self.origin} row {i + 1}" if self.numbered else self.origin)

    def where(self, i: int) -> str:
        return self.raw(i)[1]


@dataclass
class RunData:
    """What a cell reads: validated rows, the sizes the plan needs, and the count for the record."""

    n_train: int
    #: ``train``: the rows read from the training split, first-use order; ``validation``: the first eval rows.
    splits: dict[str, Rows]
    #: training-split index of each row in ``splits["train"]``
    train_indices: list[int]
    #: training-split indices the batch plan draws, first-use order
    plan_indices: list[int]
    #: training-split indices of the tokenizer sample
    sample_indices: list[int]
    rows_read: dict[str, int] = field(default_factory=dict)

    def rows_key(self) -> str:
        """Identifies which rows were read (for the encoded-data cache key)."""
        return f"{self.n_train}|{_digest(self.plan_indices, len(self.splits['validation']))}"

    def train_row(self, i: int) -> dict:
        return self.splits["train"][self._pos[i]]

    def __post_init__(self):
        self._pos = {ix: k for k, ix in enumerate(self.train_indices)}


def open_sources(task: Task, data, options: dict, seed: int, stream_rows: int | None = None) -> dict:
    """``{"train": source, "validation": source}`` (lazy; ``test`` only checked to exist)."""
    if data in ("builtin", "", None):
        splits = task.builtin_data(seed, options)
        sources = {s: ListRows(rows, f"built-in {task.name} data ({s})") for s, rows in splits.items()}
    elif str(data).startswith("hf:"):
        sources = _open_stream(str(data)[3:], stream_rows)
    else:
        sources = _open_dir(Path(data))
    for split in ("train", "validation"):
        if split not in sources or not len(sources[split]):
            origin = sources[split].origin if split in sources else data
            raise DataError(f"{origin}: the {split} split is empty or missing; {task.name!r} needs at least one "
                            f"{split} example")
    return sources


def _open_dir(root: Path) -> dict:
    return {split: FileRows(path) for split, path in split_files(root).items() if split != "test"}


def _open_stream(spec: str, stream_rows: int | None) -> dict:
    ds = open_hub(spec, streaming=True)
    return stream_sources(ds, f"hf:{spec}", stream_rows)


def stream_sources(ds, origin: str, stream_rows: int | None) -> dict:
    """The first ``stream_rows`` rows of each split of a streaming ``IterableDatasetDict``, in stream order."""
    from itertools import islice

    sources = {}
    for split in ("train", "validation"):
        key = split if split in ds else next((k for k in ("valid", "dev", "val") if k in ds), None)
        if key is None:
            continue
        rows = [dict(r) for r in islice(ds[key], stream_rows)]
        sources[split] = ListRows(rows, f"{origin}[{key}]", numbered=True)
    return sources


def plan_indices(n_train: int, recipe, world_size: int) -> list[int]:
    """Training rows the batch plan draws, each once, in first-use order (the same for every rank)."""
    return batch_plan(n_train, recipe, world_size, 0, recipe.seed).first_use()


def sample_indices(n_train: int) -> list[int]:
    """The tokenizer sample: every row of a small split, else a fixed-seed sample in file order."""
    if n_train <= TOKENIZER_SAMPLE_ROWS:
        return list(range(n_train))
    import numpy as np

    pick = np.random.default_rng(SAMPLE_SEED).choice(n_train, TOKENIZER_SAMPLE_ROWS, replace=False)
    return sorted(int(i) for i in pick)


def read_rows(source, indices, task: Task, options: dict, columns: dict) -> Rows:
    """Rows ``indices`` of ``source``, column-mapped and validated, with where each came from."""
    rows = Rows(origin=source.origin, lines=[])
    wheres = []
    for i in indices:
        row, where = source.raw(i)
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        row = map_columns(row, columns)
        task.validate(row, where, options)
        rows.append(row)
        wheres.append(where)
    rows.where = lambda k, _w=wheres: _w[k]  # exact file/line (or stream row) of each row read
    return rows


def load_run_data(task: Task, data, options: dict, recipe, eval_examples: int, world_size: int = 1,
                  columns: dict | None = None) -> RunData:
    """Open the cell's data, plan its batches and read (validated) just the rows the cell uses."""
    columns = columns or {}
    stream = recipe.steps * recipe.batch_size if str(data).startswith("hf:") else None
    sources = open_sources(task, data, options, recipe.seed, max(stream or 0, eval_examples) or None)
    n_train = len(sources["train"])
    plan = plan_indices(n_train, recipe, world_size)
    sample = sample_indices(n_train)
    wanted = list(dict.fromkeys(sample + plan))  # the sample in file order, then the plan's other rows
    splits = {"train": read_rows(sources["train"], wanted, task, options, columns),
              "validation": read_rows(sources["validation"], range(min(eval_examples, len(sources["validation"]))),
                                      task, options, columns)}
    return RunData(n_train=n_train, splits=splits, train_indices=wanted, plan_indices=plan,
                   sample_indices=sample,
                   rows_read={"train": len(wanted), "validation": len(splits["validation"]),
                              "order": _digest(wanted, len(splits["validation"]))})


def _digest(train_indices: list[int], n_validation: int) -> str:
    # The same digest in two records means the same rows were read in the same order.
    import hashlib

    return hashlib.sha256(f"{train_indices}|{n_validation}".encode()).hexdigest()[:16]


def sample_texts(run: RunData, task: Task, options: dict):
    """Texts of the tokenizer sample, stopping at :data:`TOKENIZER_SAMPLE_BYTES`."""
    total = 0
    for i in run.sample_indices:
        for text in task.texts(run.train_row(i), options):
            total += len(text)
            if total > TOKENIZER_SAMPLE_BYTES:
                return
            yield text
