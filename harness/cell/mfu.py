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

The peak comes from a table of known GPUs for the precision in use, or on
CPU from a short fp32 matmul measurement, cached per CPU model, torch
version and thread count.  Where no peak is known, MFU is ``None``: never a
guess.
"""

from __future__ import annotations

import json
import os
import time

import torch

#: Dense peak FLOP/s by (GPU name fragment, precision): vendor datasheets,
#: without sparsity.  fp32 means TF32 off (plain FP32 CUDA cores).
GPU_PEAKS = {
    ("H200", "bf16"): 989e12, ("H200", "fp16"): 989e12, ("H200", "fp32"): 67e12,
    ("H100", "bf16"): 989e12, ("H100", "fp16"): 989e12, ("H100", "fp32"): 67e12,
    ("A100", "bf16"): 312e12, ("A100", "fp16"): 312e12, ("A100", "fp32"): 19.5e12,
    ("L4", "bf16"): 121e12, ("L4", "fp16"): 121e12, ("L4", "fp32"): 30.3e12,
    ("A10G", "bf16"): 70e12, ("A10G", "fp16"): 70e12, ("A10G", "fp32"): 31.2e12,
    ("V100", "fp16"): 125e12, ("V100", "fp32"): 15.7e12,
}


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


def measured_cpu_peak(seconds: float = 0.5) -> float:
    """Best fp32 matmul FLOP/s of this CPU with the current thread count (cached)."""
    from ftbench.harness.results.environment import cpu_model

    key = f"{cpu_model()}|{torch.__version__}|{torch.get_num_threads()}"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
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


def device_peak(device: torch.device, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for (frag, prec), peak in GPU_PEAKS.items():
            if frag in name and prec == precision:
                return peak, f"datasheet {frag} {prec}"
        return None, f"unknown GPU {name!r} for {precision}"
    if device.type == "cpu" and precision == "fp32":
        return measured_cpu_peak(), "measured fp32 matmul on this CPU"
    return None, f"no peak known for {device.type} {precision}"
