"""The GPUs ftbench knows: memory and dense peak FLOP/s per matmul dtype.

One table serves both ``ftbench plan --gpu NAME`` (memory to compare each
rank with, peak to predict step time) and the MFU of a measured record
(``ftbench.harness.cell.mfu``, matched from ``torch.cuda.get_device_name``).

Figures are the vendors' datasheets, dense (no 2:4 sparsity), per GPU:
NVIDIA A100 Tensor Core GPU datasheet (2021), H100 Tensor Core GPU datasheet
(SXM / PCIe / NVL columns, 2023), H200 Tensor Core GPU datasheet (SXM / NVL),
HGX B200 (per GPU: the 8-GPU board's figures / 8), L4, L40 and L40S product
briefs, A10 and A10G (AWS) datasheets, V100 datasheet, AMD Instinct MI300X
datasheet (matrix FP32/TF32/BF16).  ``fp32`` is plain FP32 on CUDA cores;
``tf32`` fp32 matmuls on tensor cores.  Memory is the datasheet capacity in
GiB; the device shows a little less to CUDA (ECC and firmware), and the CUDA
context takes a few hundred MiB more, so :data:`CUDA_CONTEXT_BYTES` is held
back when a plan compares a rank with its GPU.

Example::

    gpu = lookup("h100-sxm")
    gpu.memory_bytes, gpu.peak("bf16")          # (85899345920, 989e12)
    parse_gpu("a100-40gbx8")                     # (lookup("a100-40gb"), 8)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ftbench.harness.contract.api import FtbenchError

GiB = 2**30
#: What the CUDA context and the caching allocator's own bookkeeping take outside the tensors (about 0.5-1 GiB).
CUDA_CONTEXT_BYTES = 1 * GiB


@dataclass(frozen=True)
class Gpu:
    """One GPU model of the catalog.

    ``name`` is what ``--gpu`` takes; ``model`` the device model as
    :func:`gpu_model` reads it from a CUDA device name (two memory sizes of
    one chip share it and its peaks).

    Example: ``Gpu("l4", "L4", 24, {"bf16": 121e12, "fp32": 30.3e12}).peak("bf16") == 121e12``
    """

    name: str
    model: str
    memory_gib: float
    peaks: dict[str, float] = field(default_factory=dict)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)

    def peak(self, dtype: str) -> float | None:
        return self.peaks.get(dtype)


def _hopper(bf16, tf32, fp32):
    return {"bf16": bf16, "fp16": bf16, "tf32": tf32, "fp32": fp32}


CATALOG: tuple[Gpu, ...] = (
    Gpu("a100-40gb", "A100", 40, _hopper(312e12, 156e12, 19.5e12)),
    Gpu("a100-80gb", "A100", 80, _hopper(312e12, 156e12, 19.5e12)),
    Gpu("h100-sxm", "H100 SXM", 80, _hopper(989e12, 494.5e12, 67e12)),
    Gpu("h100-pcie", "H100 PCIe", 80, _hopper(756e12, 378e12, 51e12)),
    Gpu("h100-nvl", "H100 NVL", 94, _hopper(835.5e12, 417.5e12, 60e12)),
    Gpu("h200", "H200", 141, _hopper(989e12, 494.5e12, 67e12)),
    Gpu("h200-nvl", "H200 NVL", 141, _hopper(835.5e12, 417.5e12, 60e12)),
    Gpu("b200", "B200", 180, _hopper(2250e12, 1100e12, 75e12)),
    Gpu("l4", "L4", 24, _hopper(121e12, 60e12, 30.3e12)),
    Gpu("l40s", "L40S", 48, _hopper(362e12, 183e12, 91.6e12)),
    Gpu("l40", "L40", 48, _hopper(181e12, 90.5e12, 90.5e12)),
    Gpu("a10g", "A10G", 24, _hopper(70e12, 35e12, 31.2e12)),
    Gpu("a10", "A10", 24, _hopper(125e12, 62.5e12, 31.2e12)),
    Gpu("v100-sxm2", "V100 SXM2", 32, {"fp16": 125e12, "fp32": 15.7e12}),
    Gpu("v100-pcie", "V100 PCIe", 32, {"fp16": 112e12, "fp32": 14e12}),
    Gpu("mi300x", "MI300X", 192, _hopper(1307.4e12, 653.7e12, 163.4e12)),
)
BY_NAME = {g.name: g for g in CATALOG}
#: Names people also write for a catalog entry.
ALIASES = {"h100": "h100-sxm", "h100-80gb": "h100-sxm", "a100": "a100-80gb", "h200-sxm": "h200",
           "b200-sxm": "b200", "a100-sxm-80gb": "a100-80gb", "a100-sxm-40gb": "a100-40gb"}
#: Dense peak FLOP/s by device model and matmul dtype (the MFU's peaks).
GPU_PEAKS: dict[str, dict[str, float]] = {g.model: g.peaks for g in CATALOG}

#: (pattern over the normalised device name, device model); first match wins, so a more specific
#: variant precedes its base name.  ``\b`` and ``$`` keep "L4" from matching "L40S".
_GPU_PATTERNS = (
    (r"^H200 NVL\b", "H200 NVL"),
    (r"^H200\b", "H200"),
    (r"^H100 NVL\b", "H100 NVL"),
    (r"^H100 PCIE\b", "H100 PCIe"),
    (r"^H100\b(?!.*\b(PCIE|NVL)\b)", "H100 SXM"),     # "H100 80GB HBM3", "H100 SXM5 80GB"
    (r"^B200\b", "B200"),
    (r"^A100\b", "A100"),                               # SXM4 and PCIe share the dense peaks
    (r"^L40S\b", "L40S"),
    (r"^L40\b", "L40"),
    (r"^L4\b", "L4"),
    (r"^A10G\b", "A10G"),
    (r"^A10\b", "A10"),
    (r"^V100\b.*\bSXM2\b", "V100 SXM2"),
    (r"^V100\b.*\bPCIE\b", "V100 PCIe"),
    (r"^(AMD )?INSTINCT MI300X\b", "MI300X"),
)


def gpu_model(device_name: str) -> str | None:
    """The device model of a CUDA device name, or None when unknown.

    Example: ``gpu_model("NVIDIA H100 80GB HBM3") == "H100 SXM"``,
    ``gpu_model("NVIDIA L40S") == "L40S"``, ``gpu_model("NVIDIA L4") == "L4"``.
    """
    name = re.sub(r"^(NVIDIA|TESLA)\s+", "", device_name.strip().upper().replace("-", " "))
    name = re.sub(r"^(NVIDIA|TESLA)\s+", "", name)
    for pattern, key in _GPU_PATTERNS:
        if re.search(pattern, name):
            return key
    return None


def gpu_peak(device_name: str, dtype: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s, source) of a CUDA device for matmuls in ``dtype``."""
    key = gpu_model(device_name)
    if key is None:
        return None, f"unknown GPU {device_name!r}"
    peak = GPU_PEAKS[key].get(dtype)
    if peak is None:
        return None, f"no {dtype} peak for {key}"
    return peak, f"datasheet {key} {dtype} dense"


def lookup(name: str) -> Gpu:
    """The catalog entry for ``--gpu NAME`` (case and ``_``/space insensitive), or an error listing them."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    key = ALIASES.get(key, key)
    if key in BY_NAME:
        return BY_NAME[key]
    raise FtbenchError(f"unknown GPU {name!r} for --gpu; known: {', '.join(BY_NAME)} "
                       f"(also {', '.join(sorted(ALIASES))}). Add a count as NAMExN, e.g. h100-sxmx8")


def parse_gpu(spec: str) -> tuple[Gpu, int | None]:
    """``NAME`` or ``NAMExN`` (``h100-sxm``, ``h100-sxmx8``, ``8xh100-sxm``): the GPU and the count, if given."""
    s = spec.strip()
    m = re.fullmatch(r"(\d+)\s*[x×*]\s*(.+)", s) or re.fullmatch(r"(.+?)\s*[x×*:]\s*(\d+)", s)
    if m and m.group(1).isdigit():
        return lookup(m.group(2)), int(m.group(1))
    if m:
        try:
            return lookup(m.group(1)), int(m.group(2))
        except FtbenchError:
            pass  # a name that itself ends in x + digits
    return lookup(s), None


def find(device_name: str, total_memory: int) -> Gpu:
    """The catalog entry of a present CUDA device, with the memory CUDA reports for it."""
    model = gpu_model(device_name)
    peaks = GPU_PEAKS.get(model, {}) if model else {}
    return Gpu(device_name, model or device_name, total_memory / GiB, peaks)
