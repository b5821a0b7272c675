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
the weights'; TF32 when CUDA allows it for fp32): the datasheet catalog of
``ftbench.harness.contract.gpus`` (shared with ``ftbench plan --gpu``), matched by exact model name, or on CPU a short matmul measurement in
that dtype, cached per CPU model, torch version and thread count.  Where no
peak is known, MFU is ``None``: never a guess; nor is a figure above 1 (the
record drops it and says why, see ``ftbench.harness.results.record``).
"""

from __future__ import annotations

import json
import os
import time

import torch

from ftbench.harness.contract.gpus import GPU_PEAKS, gpu_model, gpu_peak  # noqa: F401 - the one GPU table
from ftbench.harness.cell.tokenization import cache_dir
from ftbench.harness.contract.environment import cpu_model

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
    return cache_dir() / "cpu_peak.json"


CPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def measured_cpu_peak(seconds: float = 0.5, dtype: str = "fp32") -> float:
    """Best matmul FLOP/s of this CPU in ``dtype`` with the current thread count (cached)."""
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
