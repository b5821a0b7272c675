"""``--micro-batch N|auto``: choose the micro-batch, keep the global batch.

The global batch is the recipe's; a micro-batch only sets how it is split
(``grad_accum = batch_size / (nproc * micro_batch)``), which the recipe
fingerprint leaves out, so parity and comparisons are unchanged.  ``auto``
leaves the split to the driver's search (:mod:`ftbench.harness.running.fit`).

Example::

    cells = apply_micro_batch(cells, parse_micro_batch("4", {}))
"""

from __future__ import annotations

import dataclasses

from ftbench.harness.contract.api import FtbenchError

AUTO = "auto"


def parse_micro_batch(value, overrides: dict):
    """``None``, ``"auto"`` or a positive int; ``--grad-accum`` cannot be given as well."""
    if value is None:
        return None
    if "grad_accum" in overrides:
        raise FtbenchError("--micro-batch and --grad-accum both set how the global batch is split; pass one of "
                           "them (--micro-batch N sets grad_accum = batch / (nproc x N))")
    if str(value).strip().lower() == AUTO:
        return AUTO
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise FtbenchError(f"invalid --micro-batch {value!r}: pass a positive integer or 'auto'")
    return n


def per_rank_batch(cell) -> int:
    return cell.recipe.batch_size // cell.nproc


def apply_micro_batch(cells, micro):
    """Cells with ``grad_accum`` set from a fixed micro-batch; ``auto`` only checks the batch splits."""
    if micro is None:
        return cells
    out = []
    for cell in cells:
        g, n = cell.recipe.batch_size, cell.nproc
        if g % n:
            raise FtbenchError(
                f"--micro-batch {micro}: the global batch {g} cannot be split evenly over nproc {n}, so no "
                f"micro-batch divides it (backend {str(cell.backend)!r}); pass a --batch-size that is a multiple "
                f"of {n}, e.g. {g - g % n or n}")
        if micro == AUTO:
            out.append(cell)
            continue
        if (g // n) % micro:
            options = [d for d in range(1, g // n + 1) if (g // n) % d == 0]
            raise FtbenchError(
                f"--micro-batch {micro} does not divide the {g // n} examples each of {n} rank(s) gets of the "
                f"global batch {g} (backend {str(cell.backend)!r}); pick one of {options} or 'auto'")
        out.append(with_micro_batch(cell, micro))
    return out


def with_micro_batch(cell, micro: int):
    """``cell`` whose global batch is split into micro-batches of ``micro`` per rank."""
    recipe = dataclasses.replace(cell.recipe, grad_accum=per_rank_batch(cell) // micro)
    return cell.with_(recipe=recipe)
