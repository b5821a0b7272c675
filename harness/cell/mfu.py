"""Model FLOPs utilisation: a FLOP model per model kind and the device's peak.

Training FLOPs of one step, counted on the *padded* tokens the model really
computes (PaLM appendix B / nanoGPT ``estimate_mfu``):

* every weight used in a matrix product costs 6 FLOPs per token it touches
  (2 forward, 4 backward): ``6 * N_matmul * tokens``, where ``N_matmul``
  counts the weights of linear layers (including an LM head tied to the
  embedding) and not embedding lookups;
* attention scores and the weighted sum cost ``12 * layers * d_model * T``
  per token for context length ``T`` (self-attention; encoder-decoder models
  add cross-attention over the source length in each decoder layer).

Encoder-decoder models apply encoder weights to source tokens and decoder
weights (and the LM head) to target tokens.

The peak is that of the dtype the matmuls actually ran in (autocast's, else
the weights'; TF32 when CUDA allows it for fp32): a datasheet table of known
GPUs matched by exact model name, or on CPU a short matmul measurement in
that dtype, cached per CPU model, torch version and thread count.  Where no
peak is known, MFU is ``None``: never a guess; nor is a figure above 1 (the
record drops it and says why, see ``ftbench.harness.results.record``).
"""

from __future__ import annotations

import json
import os
import time

import torch

#: Dense peak FLOP/s (no sparsity) by GPU model and matmul dtype, from the
#: vendor datasheets.  ``fp32`` is plain FP32 on CUDA cores; ``tf32`` is fp32
#: matmuls on tensor cores (TF32 allowed).  Keys are exact model names as
#: :func:`gpu_model` derives them from ``torch.cuda.get_device_name``.
GPU_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},          # SXM
    "H200 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "H100 SXM": {"bf16": 989e12, "fp16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "tf32": 378e12, "fp32": 51e12},
    "H100 NVL": {"bf16": 835.5e12, "fp16": 835.5e12, "tf32": 417.5e12, "fp32": 60e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
    "L40": {"bf16": 181e12, "fp16": 181e12, "tf32": 90.5e12, "fp32": 90.5e12},
    "L4": {"bf16": 121e12, "fp16": 121e12, "tf32": 60e12, "fp32": 30.3e12},
    "A10G": {"bf16": 70e12, "fp16": 70e12, "tf32": 35e12, "fp32": 31.2e12},
    "A10": {"bf16": 125e12, "fp16": 125e12, "tf32": 62.5e12, "fp32": 31.2e12},
    "V100 SXM2": {"fp16": 125e12, "fp32": 15.7e12},
    "V100 PCIe": {"fp16": 112e12, "fp32": 14e12},
}

#: (pattern over the normalised device name, table key); first match wins, so
#: a more specific variant precedes its base name.  ``\b`` and ``$`` keep
#: "L4" from matching "L40S" and "H200" from matching "H200 NVL".
_GPU_PATTERNS = (
    (r"^H200 NVL\b", "H200 NVL"),
    (r"^H200\b", "H200"),
    (r"^H100 NVL\b", "H100 NVL"),
    (r"^H100 PCIE\b", "H100 PCIe"),
    (r"^H100\b(?!.*\b(PCIE|NVL)\b)", "H100 SXM"),     # "H100 80GB HBM3", "H100 SXM5 80GB"
    (r"^A100\b", "A100"),                               # SXM4 and PCIe share the dense peaks
    (r"^L40S\b", "L40S"),
    (r"^L40\b", "L40"),
    (r"^L4\b", "L4"),
    (r"^A10G\b", "A10G"),
    (r"^A10\b", "A10"),
    (r"^V100\b.*\bSXM2\b", "V100 SXM2"),
    (r"^V100\b.*\bPCIE\b", "V100 PCIe"),
)


def gpu_model(device_name: str) -> str | None:
    """The peak table's key for a CUDA device name, or None when unknown.

    Example: ``gpu_model("NVIDIA H100 80GB HBM3") == "H100 SXM"``,
    ``gpu_model("NVIDIA L40S") == "L40S"``, ``gpu_model("NVIDIA L4") == "L4"``.
    """
    import re

    name = re.sub(r"^(NVIDIA|TESLA)\s+", "", device_name.strip().upper().replace("-", " "))
    name = re.sub(r"^(NVIDIA|TESLA)\s+", "", name)
    for pattern, key in _GPU_PATTERNS:
        if re.search(pattern, name):
            return key
    return None


def gpu_peak(device_name: str, dtype: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s, source) of a named GPU for matmuls in ``dtype``."""
    key = gpu_model(device_name)
    if key is None:
        return None, f"unknown GPU {device_name!r}"
    peak = GPU_PEAKS[key].get(dtype)
    if peak is None:
        return None, f"no {dtype} peak for {key}"
    return peak, f"datasheet {key} {dtype} dense"


def _is_matmul_module(m: torch.nn.Module) -> bool:
    if isinstance(m, torch.nn.Linear):
        return True
    # transformers' GPT-2 uses a transposed linear called Conv1D.
    return type(m).__name__ == "Conv1D" and hasattr(m, "weight")


def _attn_dims(config) -> tuple[int, int, int]:
    """(encoder-or-decoder layers, decoder layers of an enc-dec model, d_model)."""
    get = lambda *names: next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), 0)  # noqa: E731
    d = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers", "encoder_layers")
    dec = get("num_decoder_layers", "decoder_layers") if getattr(config, "is_encoder_decoder", False) else 0
    return layers, dec, d


def flop_model(model: torch.nn.Module, kind: str):
    """A function ``(batch_shape) -> training FLOPs`` for one micro-batch.

    ``batch_shape`` is ``(batch, source_len, target_len)``; ``target_len`` is
    0 except for encoder-decoder models.

    Example::

        flops = flop_model(model, "decoder")((8, 64, 0))
    """
    enc_params = dec_params = other = 0
    for name, m in model.named_modules():
        if not _is_matmul_module(m):
            continue
        n = m.weight.numel()
        if ".encoder." in f".{name}." or name.startswith("encoder"):
            enc_params += n
        elif ".decoder." in f".{name}." or name.startswith("decoder"):
            dec_params += n
        else:
            other += n
    layers, dec_layers, d = _attn_dims(getattr(model, "config", object()))

    def flops(shape) -> float:
        b, src, tgt = shape
        if kind == "encoder-decoder":
            matmul = 6 * (enc_params * src + (dec_params + other) * tgt)
            attn = 12 * d * (layers * src * src + dec_layers * (tgt * tgt + tgt * src))
        else:
            matmul = 6 * (enc_params + dec_params + other) * src
            attn = 12 * d * layers * src * src
        return float(b * (matmul + attn))

    return flops


def _cache_file():
    from ftbench.harness.cell.tokenization import cache_dir

    return cache_dir() / "cpu_peak.json"


CPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measured_cpu_peak(seconds: float = 0.5, dtype: str = "fp32") -> float:
    """Best matmul FLOP/s of this CPU in ``dtype`` with the current thread count (cached)."""
    from ftbench.harness.contract.environment import cpu_model

    key = f"{cpu_model()}|{torch.__version__}|{torch.get_num_threads()}"
    key = key if dtype == "fp32" else f"{key}|{dtype}"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    n = 1024
    a, b = torch.randn(n, n, dtype=CPU_DTYPES[dtype]), torch.randn(n, n, dtype=CPU_DTYPES[dtype])
    torch.mm(a, b)  # warm the BLAS
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    cache[key] = best
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: ranks measure at the same moment
    tmp.write_text(json.dumps(cache))
    tmp.replace(path)
    return best


def device_peak(device: torch.device, dtype: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device for matmuls in ``dtype``, where the figure comes from).

    ``dtype`` is what the matmuls ran in (``ftbench.harness.cell.weights.matmul_dtype``):
    fp32, tf32, bf16 or fp16.
    """
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device), dtype)
    if device.type == "cpu" and dtype in CPU_DTYPES:
        return measured_cpu_peak(dtype=dtype), f"measured {dtype} matmul on this CPU"
    return None, f"no peak known for {device.type} {dtype}"
