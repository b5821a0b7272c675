"""The built-in optimizations users choose between (``--opt``), registered like any plugin's.

Each says what it changes and whether it keeps the math; docs/optimizations.md
has the table, the ladder and what needs a GPU.  The torch code lives in
``_opt_kernels`` and is imported only by the cell that applies it, so that
``ftbench list`` stays free of torch.
"""

from __future__ import annotations

import dataclasses

from ftbench import (DECODER, EXACT, NUMERICS, TOLERANCE, FtbenchError, Optimization, Unavailable, hookimpl,
                     package_version, version_tuple)


def _kernels():
    # Imported on use: it imports torch, which 'ftbench list' must not pay for.
    from ftbench.plugins import _opt_kernels

    return _opt_kernels


class Attention(Optimization):
    name = "attn"
    description = "the model's attention kernel: eager, sdpa, flex (torch's flex_attention) or flash2"
    changes = ("model",)
    math = TOLERANCE
    defaults = {"impl": "sdpa"}
    choices = {"impl": ("eager", "sdpa", "flex", "flash2")}

    def check_available(self, options, device):
        impl = options.get("impl", "sdpa")
        if impl == "flash2":
            if device != "cuda":
                raise Unavailable("FlashAttention-2 runs on CUDA GPUs only")
            if package_version("flash-attn") is None:
                raise Unavailable("needs flash-attn: pip install flash-attn --no-build-isolation")
        if impl == "flex" and version_tuple(package_version("torch")) < (2, 5):
            raise Unavailable("flex attention needs torch>=2.5: pip install -U torch")
        if impl == "flex" and device != "cuda":
            # Measured with torch 2.13: "FlexAttention does not support backward on CPU".
            raise Unavailable("torch's flex_attention has no backward on CPU, so it cannot train here; it needs CUDA")

    def apply_model(self, model, options):
        impl = {"flash2": "flash_attention_2", "flex": "flex_attention"}.get(options["impl"], options["impl"])
        model.set_attn_implementation(impl)
        return model


class ChunkedCrossEntropy(Optimization):
    name = "chunked-ce"
    description = ("language-model loss over N chunks of the micro-batch's tokens, never the full tokens x "
                   "vocabulary logits (in torch, as torchtune's chunked CE)")
    changes = ("loss", "memory")
    math = TOLERANCE
    model_kinds = (DECODER,)
    heads = ("lm",)
    defaults = {"chunks": 8}

    def validate_options(self, options):
        options = super().validate_options(options)
        if not isinstance(options["chunks"], int) or options["chunks"] < 1:
            raise FtbenchError(f"invalid chunked-ce option chunks={options['chunks']!r}: how many chunks the "
                               "micro-batch's tokens are split into, an integer >= 1 (e.g. chunked-ce:chunks=8)")
        return options

    def apply_model(self, model, options):
        return _kernels().install_chunked_head(model, options["chunks"])

    def wrap_loss(self, loss_fn, model, options):
        return _kernels().chunked_loss_fn(model)

    def memory(self, effects, options):
        return dataclasses.replace(effects, logit_chunks=options["chunks"])


class Liger(Optimization):
    name = "liger"
    description = "Liger-Kernel's Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy)"
    changes = ("model", "loss", "memory")
    math = TOLERANCE
    devices = ("cuda",)
    model_kinds = (DECODER,)
    heads = ("lm",)

    def check_available(self, options, device):
        if package_version("liger-kernel") is None:
            raise Unavailable("needs Liger-Kernel (Triton, CUDA): pip install liger-kernel")
        super().check_available(options, device)

    def apply_model(self, model, options):
        from liger_kernel.transformers import _apply_liger_kernel_to_instance  # optional dependency, CUDA only

        _apply_liger_kernel_to_instance(model=model)
        return model

    def wrap_loss(self, loss_fn, model, options):
        return _kernels().labels_loss_fn()

    def memory(self, effects, options):
        # Liger's fused linear cross-entropy picks its chunk size from the vocabulary and width; about 16 chunks.
        return dataclasses.replace(effects, logit_chunks=16)


class AdamWImpl(Optimization):
    name = "adamw"
    description = "the recipe's AdamW with torch's multi-tensor (foreach) or fused kernel"
    changes = ("optimizer",)
    math = TOLERANCE
    needs = ("optimizer",)
    defaults = {"impl": "fused"}
    choices = {"impl": ("foreach", "fused")}

    def build_optimizer(self, params, recipe, options, inner):
        return _kernels().adamw(params, recipe, options["impl"])


class AdamW8bit(Optimization):
    name = "adamw-8bit"
    description = "AdamW with 8-bit block-quantised moments (torchao; bitsandbytes on CUDA)"
    changes = ("optimizer", "memory")
    math = NUMERICS
    tolerance = 0.05
    needs = ("optimizer",)

    def check_available(self, options, device):
        if package_version("torchao") is None and not (device == "cuda" and package_version("bitsandbytes")):
            raise Unavailable("needs torchao (CPU or CUDA) or bitsandbytes (CUDA): pip install 'ftbench[opts]'")

    def build_optimizer(self, params, recipe, options, inner):
        return _kernels().adamw_8bit(params, recipe)

    def memory(self, effects, options):
        return dataclasses.replace(effects, optimizer_bytes_per_param=2)


class OptimizerInBackward(Optimization):
    name = "optim-in-backward"
    description = ("each parameter's optimizer step in its gradient hook (register_post_accumulate_grad_hook): "
                   "gradients freed as backward goes; no global gradient clipping")
    changes = ("optimizer", "memory")
    # The step cannot wait for the global gradient norm, so clipping is off.
    math = NUMERICS
    tolerance = 0.05
    needs = ("optimizer", "backward-step")

    def check_cell(self, recipe, options):
        if recipe.grad_accum != 1:
            raise FtbenchError(f"optim-in-backward steps each parameter as its gradient arrives, so it cannot "
                               f"accumulate {recipe.grad_accum} micro-batches; use --grad-accum 1 (a larger "
                               "micro-batch) or drop optim-in-backward")

    def math_of(self, options):
        return NUMERICS

    def build_optimizer(self, params, recipe, options, inner):
        return _kernels().InBackward(params, inner)

    def memory(self, effects, options):
        return dataclasses.replace(effects, grads_freed_in_backward=True)


class ActivationOffload(Optimization):
    name = "act-offload"
    description = "activations saved for backward moved to host memory (torch.autograd.graph.save_on_cpu)"
    changes = ("memory",)
    math = EXACT
    devices = ("cuda",)

    def step_context(self, options):
        return _kernels().save_on_cpu()

    def memory(self, effects, options):
        return dataclasses.replace(effects, activations_on_host=True)


class DocumentPacking(Optimization):
    name = "doc-packing"
    description = ("packed rows with per-document position ids, so attention stays inside each document "
                   "(= --packing documents)")
    changes = ("data",)
    # More examples per row: another training run, judged on held-out quality.
    math = NUMERICS
    tolerance = 0.05
    model_kinds = (DECODER,)
    heads = ("lm",)

    def apply_recipe(self, recipe, options):
        return dataclasses.replace(recipe, packing="documents")


@hookimpl
def register_optimizations(register):
    for cls in (Attention, ChunkedCrossEntropy, Liger, AdamWImpl, AdamW8bit, OptimizerInBackward,
                ActivationOffload, DocumentPacking):
        register(cls())

