"""Predicted step time of a planned cell: its FLOPs over the GPU's peak at an MFU.

The MFU is the user's (``--mfu``, default 0.4) or the median MFU of the
measured records of the same backend on the same GPU model
(``--calibrate-from RUNS``); the plan says which.  FLOPs per optimizer step
are the cell's micro-batch FLOPs (``ftbench.harness.cell.mfu.flop_model``,
padded tokens) times its gradient accumulation, per rank.

Example::

    st = step_time(reg, cp, mfu=0.4, source="--mfu 0.4")
    st.step_s, st.seconds_per(1e9)
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ftbench.harness.cell.modeling import resolve_model
from ftbench.harness.contract.api import ENCODER_DECODER, FtbenchError
from ftbench.harness.contract.gpus import gpu_model
from ftbench.harness.grid.memplan import model_flops
from ftbench.harness.results.store import read_records

#: The matmul dtype of a recipe precision on a GPU (fp32 recipes: plain fp32, the most conservative peak).
MATMUL_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass
class StepTime:
    """A predicted optimizer step: seconds, tokens it trains (all ranks), and where the MFU comes from."""

    step_s: float
    tokens: int
    mfu: float
    mfu_source: str
    peak_flops: float

    def seconds_per(self, tokens: float) -> float:
        return self.step_s * tokens / self.tokens


def step_time(reg, cp, mfu: float, source: str) -> StepTime | None:
    """None when the cell has no GPU (its peak is unknown) or no FLOP model."""
    gpu = cp.gpu
    flops = model_flops(reg, cp.cell) if cp.prediction is not None else None
    if gpu is None or flops is None:
        return None
    r = cp.cell.recipe
    peak = gpu.peak(MATMUL_DTYPE.get(r.precision, "fp32"))
    if not peak:
        return None
    m = cp.cell.micro_batch
    target = r.seq_len if _is_seq2seq(reg, cp.cell) else 0
    per_rank = flops((m, r.seq_len, target)) * r.grad_accum
    return StepTime(per_rank / (peak * mfu), r.batch_size * r.seq_len, mfu, source, peak)


def _is_seq2seq(reg, cell) -> bool:
    task = reg.task(cell.task.name)
    return resolve_model(cell.model, reg, task, cell.trust_remote_code, describe_only=True).kind == ENCODER_DECODER


def calibrated_mfu(runs: str, gpu_name: str, backend: str) -> tuple[float, str] | None:
    """Median MFU of the ok records in result set ``runs`` of ``backend`` on GPUs of model ``gpu_name``."""
    want = gpu_model(gpu_name) or gpu_name
    values = []
    for rec in read_records(runs).records:
        device = (rec.get("environment") or {}).get("device") or {}
        if rec.get("status") != "ok" or not rec.get("mfu") or rec.get("backend") != backend:
            continue
        if (gpu_model(device.get("name") or "") or device.get("name")) == want:
            values.append(float(rec["mfu"]))
    if not values:
        return None
    return statistics.median(values), f"median of {len(values)} record(s) in {runs}"


def check_mfu(mfu: float) -> None:
    if not 0 < mfu <= 1:
        raise FtbenchError(f"--mfu {mfu:g} is not a fraction of the peak; pass a number in (0, 1], e.g. --mfu 0.4")
