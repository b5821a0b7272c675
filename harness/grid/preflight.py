"""Checks of a whole grid before its first cell runs.

A typo must cost the user seconds, not a grid of failed cells: whatever can
be known without training (settings of the right type, splits present, the
rows the cells will read parsing and fitting the task, a sequence length the
model can hold, a batch the data can fill) is checked here, in the driver, and reported as one
:class:`~ftbench.harness.contract.api.FtbenchError` (exit status 2, nothing written).  The
cell repeats its own checks as a backstop; hub data (``hf:``) is left to the
cell, as loading it needs the network.

Example::

    check_cells(Registry.load(), grid.cells(registry))
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ftbench.harness.contract.api import FtbenchError
from ftbench.harness.contract.format import shown
from ftbench.harness.cell.hostalloc import MODES as CPU_MEMORY_MODES
from ftbench.harness.grid.expand import MAX_NPROC
from ftbench.harness.grid.finetune_checks import check_finetuning
from ftbench.harness.contract.resolve import check_seq_len, resolve_cell
from ftbench.harness.grid.memplan import check_memory_limits
from ftbench.harness.cell.modeling import ModelSource, check_model_name, choose_kind, resolve_model
from ftbench.harness.cell.rowsource import load_run_data

DEVICES = ("auto", "cpu", "cuda")
#: Held-out examples per evaluation, far past real use (a typo costs an error line, not a machine).
MAX_EVAL_EXAMPLES = 10**6


def check_cells(reg, cells, describe_only: bool = False) -> None:
    """Raise :class:`FtbenchError` on the first cell that cannot run as configured.

    ``describe_only`` (``ftbench plan``): a model needs only what describes it (a config), not its
    weights or tokenizer."""
    n_train: dict = {}
    positions: dict = {}
    skeletons: dict = {}
    for cell in cells:
        resolved = resolve_cell(reg, cell)  # names, options, ranks, batch split: the worker's own rules
        _check_settings(cell, describe_only)
        recipe = resolved.recipe
        _check_model(reg, cell.model, resolved.task, positions, cell.trust_remote_code, describe_only)
        check_finetuning(reg, cell, resolved, skeletons)  # packing fits, LoRA options and targets
        check_seq_len(recipe.seq_len, positions.get(cell.model), cell.model)
        key = (cell.task, cell.data, cell.columns, recipe.seed, recipe.steps, recipe.batch_size, cell.eval_examples)
        if key not in n_train:
            n_train[key] = _check_data(resolved.task, resolved.task_options, cell)
        n = n_train[key]
        if n is not None and recipe.batch_size > n:
            raise FtbenchError(f"batch size {recipe.batch_size} is larger than the {n} training examples of "
                               f"--data {cell.data}; pass --batch-size {n} or less, or add training data")

    check_memory_limits(reg, cells)


def _check_settings(cell, describe_only: bool = False) -> None:
    def bad(key, value, want):
        raise FtbenchError(f"invalid {key}={shown(value)} (a grid file setting or its command-line flag): {want}")

    for key in ("time_limit_s", "memory_limit_mb"):
        v = getattr(cell, key)
        if v is not None and (not _is_number(v) or not v > 0):
            bad(key, v, "must be a number > 0, or left out for no limit")
    if not _is_int(cell.eval_examples) or not 1 <= cell.eval_examples <= MAX_EVAL_EXAMPLES:
        bad("eval_examples", cell.eval_examples, f"must be an integer from 1 to {MAX_EVAL_EXAMPLES:,}")
    if not _is_int(cell.eval_every) or cell.eval_every < 0:
        bad("eval_every", cell.eval_every, "must be an integer >= 0 (0: evaluate only after training)")
    if cell.stop_at_target and not cell.target:
        bad("stop_at_target", cell.stop_at_target, f"needs a target for task {str(cell.task)!r}: add "
            "--target METRIC=VALUE (e.g. --target perplexity=20)")
    if not _is_int(cell.nproc) or not 1 <= cell.nproc <= MAX_NPROC:
        bad("nproc", cell.nproc, f"must be an integer from 1 to {MAX_NPROC} (ranks per node)")
    if cell.device not in DEVICES:
        bad("device", cell.device, f"choose one of {', '.join(DEVICES)}")
    # Planning names the GPU it plans for (plan --gpu) and runs nothing on this machine's devices.
    if cell.device == "cuda" and not describe_only and not torch.cuda.is_available():
        built = f"torch {torch.__version__} is built without CUDA" if torch.version.cuda is None else \
            "no CUDA device is visible (driver, CUDA_VISIBLE_DEVICES?)"
        bad("device", cell.device, f"{built}; use --device auto or cpu here, or run on a GPU machine with a CUDA "
            "build of torch (docs/gpu.md)")
    if cell.cpu_memory not in CPU_MEMORY_MODES:
        bad("cpu_memory", cell.cpu_memory, f"choose {' or '.join(CPU_MEMORY_MODES)} (docs/memory.md)")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_model(reg, name: str, task, positions: dict, trusted: bool = False, describe_only: bool = False) -> None:
    if name in positions:
        return
    if name in reg.models:
        preset = reg.model(name)
        kind, positions[name] = preset.kind, getattr(preset, "max_positions", None)
    elif os.path.isdir(name):
        kind = resolve_model(name, reg, task, trusted, describe_only).kind  # checks config, weights, tokenizer, code
        positions[name] = _config_positions(Path(name) / "config.json")
    else:
        check_model_name(name, reg, describe_only)  # an unknown preset fails here; a hub id passes (or is cached)
        positions[name] = None  # a hub id: only the cell can look at it
        return

    choose_kind(ModelSource(name, kind), task)


def _config_positions(path: Path) -> int | None:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FtbenchError(f"{path} is not a readable JSON model config ({e}); save the model again with "
                           "save_pretrained()") from None
    for key in ("n_positions", "max_position_embeddings"):
        v = cfg.get(key)
        if _is_int(v) and v > 0:
            return v
    return None


def _check_data(task, options: dict, cell) -> int | None:
    """Read and validate the rows the cell will read (its batches, tokenizer sample and evaluation
    examples, found through a cached line index, never the whole file); the number of training rows."""
    if isinstance(cell.data, str) and cell.data.startswith("hf:"):
        return None

    options = dict(options)
    try:
        run = load_run_data(task, cell.data, options, cell.recipe.validate(), cell.eval_examples, 1,
                            dict(cell.columns))
        task.prepare(run.splits, options)  # e.g. a label outside the label set
    except FtbenchError:
        raise
    except Exception:  # noqa: BLE001 - a plugin's own bug is that cell's recorded error, not a bad grid
        return None
    return run.n_train
