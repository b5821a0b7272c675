"""Which dtype the weights were stored in, trained in, and the matmuls ran in.

The recipe says fp32 weights for every backend, with ``--precision bf16|fp16``
as autocast over them.  A checkpoint stored in bf16 is therefore loaded as
fp32 (``build_model`` asks for it explicitly: transformers 5 otherwise keeps
the stored dtype), and the record says both what was stored and what trained.
MFU divides by the peak of the dtype the matrix products actually ran in,
which this module names.

Example::

    stored_dtype("models/gpt2-bf16")           # "bf16"
    matmul_dtype("fp32", "fp32", device)        # "fp32" (on CUDA "tf32" or "bf16" as the matmul precision allows)
"""

from __future__ import annotations

import collections
import json
from pathlib import Path
from ftbench.harness.contract.environment import package_version, version_tuple

#: torch / safetensors dtype names -> the names the recipe and the peak table use.
SHORT = {"float32": "fp32", "F32": "fp32", "bfloat16": "bf16", "BF16": "bf16", "float16": "fp16", "F16": "fp16",
         "float64": "fp64", "F64": "fp64"}


def short_name(dtype) -> str:
    text = str(dtype).replace("torch.", "")
    return SHORT.get(text, text)


def stored_dtype(path: str | None) -> str | None:
    """The dtype of a checkpoint's floating-point tensors as stored (most of them), or None (random init)."""
    if path is None:
        return None
    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if files:
        from safetensors import safe_open

        counts: collections.Counter = collections.Counter()
        for f in files:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    name = SHORT.get(st.get_slice(key).get_dtype())
                    if name:
                        counts[name] += 1
        if counts:
            return counts.most_common(1)[0][0]
    return _config_dtype(path)


def _config_dtype(path: str) -> str | None:
    try:
        if Path(path).is_dir():
            cfg = json.loads((Path(path) / "config.json").read_text())
        else:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(path, trust_remote_code=False).to_dict()  # information only: no code
    except Exception:  # noqa: BLE001 - the stored dtype is information, never a reason to fail
        return None
    value = cfg.get("dtype") or cfg.get("torch_dtype")
    return short_name(value) if value else None


def weights_dtype(model) -> str:
    """The dtype most trainable parameters hold (what the optimizer updates)."""
    counts: collections.Counter = collections.Counter(
        short_name(p.dtype) for p in model.parameters() if p.requires_grad and p.is_floating_point())
    return counts.most_common(1)[0][0] if counts else "fp32"


def fp32_matmul_dtype() -> str:
    """What CUDA fp32 matmuls may run in, from ``torch.get_float32_matmul_precision()``:
    ``"medium"`` allows bf16 inside (``bf16``), ``"high"`` TF32 (``tf32``; also set by
    ``torch.backends.cuda.matmul.allow_tf32 = True``), ``"highest"`` fp32.  MFU divides by the
    peak of the fastest dtype allowed, so that it is never overstated."""
    import torch

    mode = torch.get_float32_matmul_precision()
    if mode == "medium":
        return "bf16"
    if mode == "high" or bool(torch.backends.cuda.matmul.allow_tf32):
        return "tf32"
    return "fp32"


def matmul_dtype(precision: str, weights: str, device) -> str:
    """The dtype the model's matrix products run in: autocast's, else the weights'
    (fp32 on CUDA becomes what :func:`fp32_matmul_dtype` allows)."""
    if precision in ("bf16", "fp16"):
        return precision
    if weights != "fp32":
        return weights
    if device.type == "cuda":
        return fp32_matmul_dtype()
    return "fp32"


def load_kwargs() -> dict:
    """``from_pretrained`` keyword asking for fp32 weights (``dtype`` since transformers 4.56)."""
    import torch


    key = "dtype" if version_tuple(package_version("transformers")) >= (4, 56) else "torch_dtype"
    return {key: torch.float32}


def weight_dtypes(source, model, recipe, device) -> dict:
    """The record's dtype figures for a freshly built ``model`` from ``source``."""
    trained = weights_dtype(model)
    return {"weights_stored_dtype": stored_dtype(getattr(source, "path", None)), "weights_dtype": trained,
            "matmul_dtype": matmul_dtype(recipe.precision, trained, device)}
