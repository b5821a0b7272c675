"""``--micro-batch auto``: the largest micro-batch of a cell that fits, confirmed by probe cells.

The search starts at the largest micro-batch the memory model predicts to
fit (:mod:`ftbench.harness.grid.memplan`) and confirms it with *probe
cells*: short runs of the same cell (a few steps, a few evaluation
examples), each a fresh process tree through the ordinary cell runner,
under the same memory limit.  A probe that fits moves the search up to the
next divisor of the per-rank batch, one that runs out of memory moves it
down; an out-of-memory probe is an expected result.  The micro-batch found
sets ``grad_accum``; the global batch and the recipe fingerprint stay the
user's.  On CPU without ``--memory-limit-mb`` the probes run under 90% of
the memory available when the search starts, so that a probe is stopped by
ftbench, not by the kernel.

Example::

    found = search_micro_batch(registry, cell)
    found.micro_batch, [p["status"] for p in found.probes]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ftbench.harness.grid.memplan import device_type, divisors, largest_fitting_micro_batch, plan_cell
from ftbench.harness.grid.microbatch import per_rank_batch, with_micro_batch
from ftbench.harness.contract.memory_model import MiB
from ftbench.harness.running.cellproc import run_cell_process

PROBE_STEPS = 3
PROBE_EVAL_EXAMPLES = 8
#: A probe must stay this far below the limit to count as fitting: the full run has more steps and
#: evaluation examples, and its peak on CPU grows a little with them (allocator fragmentation), so a
#: probe that only just fit was seen to fail at full length (docs/memory.md).
HEADROOM = 0.05


@dataclass
class FitResult:
    """The micro-batch chosen (None: not even 1 fits), the prediction it started from, the probes run."""

    micro_batch: int | None
    predicted: int | None
    limit_bytes: int | None
    probes: list[dict] = field(default_factory=list)
    note: str = ""
    #: The id of the cell as planned, before the micro-batch found changed its grad_accum (and id):
    #: a resumed grid knows that cell by it.
    cell_id: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict) -> "FitResult | None":
        """The search an earlier record holds (``micro_batch_search``), if it names its planned cell."""
        found = record.get("micro_batch_search") or {}
        if not found.get("cell_id"):
            return None
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in found.items() if k in known})


def probe_spec(cell, micro: int, limit_mb: float | None):
    """A short run of ``cell`` at micro-batch ``micro``: same recipe split, a few steps."""
    r = cell.recipe
    steps = min(r.steps, PROBE_STEPS)
    recipe = dataclasses.replace(with_micro_batch(cell, micro).recipe, steps=steps, warmup=min(r.warmup, steps - 1))
    return cell.with_(recipe=recipe, eval_examples=min(cell.eval_examples, PROBE_EVAL_EXAMPLES), repeat=0,
                      memory_limit_mb=limit_mb)


def _limit_mb(cell) -> float | None:
    if cell.memory_limit_mb:
        return cell.memory_limit_mb
    if device_type(cell) == "cpu":
        import psutil

        return 0.9 * psutil.virtual_memory().available / MiB
    return None  # a GPU's own out-of-memory error ends a probe


def search_micro_batch(reg, cell, run=None, on_probe=None) -> FitResult:
    """Probe ``cell`` at divisors of its per-rank batch; the largest that fits.

    ``run(spec) -> CellOutcome`` runs one probe (default: the cell runner);
    ``on_probe(probe_dict)`` is told about each probe as it ends.
    """
    run = run or run_cell_process
    limit_mb = _limit_mb(cell)
    candidates = divisors(per_rank_batch(cell))
    predicted = None
    if limit_mb:
        cp = plan_cell(reg, cell.with_(memory_limit_mb=limit_mb), suggest=False)
        if cp.prediction is not None:
            predicted = largest_fitting_micro_batch(reg, cell, int(limit_mb * MiB), cp.compared)
    i = candidates.index(predicted) if predicted in candidates else 0
    result = FitResult(None, predicted, int(limit_mb * MiB) if limit_mb else None, cell_id=cell.cell_id)
    tried: dict[int, str] = {}
    while 0 <= i < len(candidates) and candidates[i] not in tried:
        m = candidates[i]
        outcome = run(probe_spec(cell, m, limit_mb))
        probe = {"micro_batch": m, "grad_accum": per_rank_batch(cell) // m, "status": outcome.status,
                 "peak_memory_bytes": _peak(outcome), "memory_tree_peak_bytes": outcome.tree_peak_bytes or None,
                 "wall_s": round(outcome.wall_s, 2), "error": outcome.error}
        status = outcome.status
        if status == "ok" and limit_mb and device_type(cell) == "cpu" and \
                _tree_bound(outcome) > (1 - HEADROOM) * limit_mb * MiB:
            status = probe["status"] = "oom"
            probe["error"] = f"fitted with less than {HEADROOM:.0%} headroom under the limit; counted as not fitting"
        result.probes.append(probe)
        tried[m] = status
        if on_probe:
            on_probe(probe)
        if status == "ok":
            result.micro_batch = max(m, result.micro_batch or 0)
            i += 1
        elif status == "oom":
            if result.micro_batch is not None:
                break  # the one below fitted: this is the boundary
            i -= 1
        else:
            result.note = f"probe at micro-batch {m} ended {outcome.status}; search stopped there"
            break
    if result.micro_batch is None and not result.note:
        result.note = "no micro-batch fits, not even 1"
    return result


def _tree_bound(outcome) -> int:
    """The probe's tree peak for the fit decision: the sampled tree, or the ranks' own peaks if larger.

    The tree is sampled every few milliseconds and can miss a short spike that
    each rank's kernel-kept peak (VmHWM) does not; the ranks' peaks added up
    bound the tree from above (they need not coincide), so a micro-batch that
    passes this check fits.
    """
    peaks = [(r.get("memory") or {}).get("host_peak_rss_bytes") or 0 for r in outcome.ranks]
    return max(outcome.tree_peak_bytes or 0, sum(peaks))


def _peak(outcome) -> int | None:
    peaks = [(r.get("memory") or {}).get("cuda_peak_allocated_bytes") or (r.get("memory") or {}).get(
        "host_peak_rss_bytes") for r in outcome.ranks]
    peaks = [p for p in peaks if p]
    return max(peaks) if peaks else None

