"""The standard PyTorch training step, shared by every backend that can use it.

The recipe's optimizer (AdamW), schedule, clipping, precision policy and loss
normalisation live here once, so that ``eager``, ``compile``, ``ddp`` and
``fsdp`` cannot drift apart: they differ only in :meth:`StandardEngine.wrap`.

Loss normalisation: the runner gives every micro-batch ``loss_scale`` =
1 / (loss-bearing units in the whole *global* optimizer step).  Summing
``loss_sum * loss_scale`` over micro-batches and ranks gives exactly the mean
loss of the global batch, however the batch is split.  Engines whose
gradient reduction *averages* over ranks (DDP, FSDP) multiply by the world
size to undo that average (``grad_average_world = True``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # annotations only; see the note below on importing torch
    import torch

# torch is imported inside the functions that need it: every plugin imports
# this module, and 'ftbench list' must not pay for torch.
from ftbench.harness.contract.api import Engine
from ftbench.harness.contract.config import Recipe


@dataclass
class EngineContext:
    """What the runner tells an engine.

    ``loss_fn(model, batch)`` returns the *summed* loss of a micro-batch
    (a 0-d tensor); ``device`` is a ``torch.device``.

    Example: ``EngineContext(recipe, torch.device("cpu"), loss_fn, 0, 1)``.
    """

    recipe: Recipe
    device: torch.device
    loss_fn: Callable[[Any, dict], torch.Tensor]
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: The cell's optimizations (``AppliedOpt`` list); the engine's optimizer comes from
    #: :meth:`build_optimizer`, which lets one of them build it.
    optimizations: tuple = ()

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        """The optimizer over ``params``: an optimization's (``--opt adamw-8bit``...) or the recipe's AdamW."""
        def make(params, rest: tuple):
            # The first optimization that builds one wins; one that wraps another gets the rest as ``inner``.
            for i, a in enumerate(rest):
                built = a.opt.build_optimizer(params, self.recipe, a.options,
                                              lambda ps, after=rest[i + 1:]: make(ps, after))
                if built is not None:
                    return built
            return build_optimizer(params, self.recipe)

        return make(params, tuple(self.optimizations))


def lr_lambda(recipe: Recipe) -> Callable[[int], float]:
    """Learning-rate multiplier by optimizer step: linear warmup, then the schedule."""
    total, warm = recipe.steps, recipe.lr_warmup_steps

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if recipe.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if recipe.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def build_optimizer(params, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's AdamW over the given (trainable) parameters."""
    import torch

    return torch.optim.AdamW(params, lr=recipe.lr, betas=tuple(recipe.betas), eps=recipe.eps,
                             weight_decay=recipe.weight_decay)


def build_scheduler(optimizer, recipe: Recipe):
    """The recipe's learning-rate schedule over ``optimizer`` (a ``LambdaLR``).

    Example: ``sched = build_scheduler(build_optimizer(params, recipe), recipe)``.
    """
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe))


def autocast_for(recipe: Recipe, device: torch.device):
    """The mixed-precision context of the recipe (a no-op for fp32)."""
    if recipe.precision == "fp32":
        return contextlib.nullcontext()
    import torch

    dtype = torch.bfloat16 if recipe.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def move(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on ``device`` (asynchronously from pinned memory on CUDA)."""
    import torch

    non_blocking = device.type == "cuda"
    return {k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v) for k, v in batch.items()}


def model_inputs(batch: dict) -> dict:
    """What a causal or masked model's forward takes from a batch.

    A document-packed batch (``--packing documents``) carries ``position_ids``
    that restart at each document and no attention mask: transformers then
    builds a mask that keeps attention inside each document (only without a
    key/value cache, hence ``use_cache=False``).

    Example: ``logits = model(**model_inputs(batch)).logits``.
    """
    if batch.get("position_ids") is not None:
        # transformers builds the per-document mask only without a key/value cache.
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
#: How the recipe combines losses: what :class:`StandardEngine` computes (see the module's docstring).
GLOBAL_MEAN = "sum over micro-batches and ranks / loss units of the global step"


def precision_policy(recipe: Recipe, weights: str = "fp32", grad_reduce: str = "fp32",
                     optimizer_states: str = "fp32") -> str:
    """The recipe's precision policy in words, for the fairness check.

    Example: ``precision_policy(recipe)`` -> ``"weights fp32, autocast bf16, reduce fp32, optimizer fp32"``.
    """
    autocast = recipe.precision if recipe.precision != "fp32" else "off"
    return f"weights {weights}, autocast {autocast}, reduce {grad_reduce}, optimizer {optimizer_states}"


def innermost_optimizer(optimizer):
    """The optimizer that steps, under its wrappers (Accelerate's, DeepSpeed's ZeRO optimizer)."""
    while hasattr(getattr(optimizer, "optimizer", None), "param_groups"):
        optimizer = optimizer.optimizer
    return optimizer


def weight_decay_scope(optimizer) -> str | None:
    """Which share of the trainable weights the optimizer decays, and by how much: ``"0.01 on 100%"``.

    The ``Trainer`` exempts biases and norm weights; the recipe's AdamW decays every weight.
    """
    opt = innermost_optimizer(optimizer)
    groups = getattr(opt, "param_groups", None)
    if not groups:
        return None
    total = sum(p.numel() for g in groups for p in g["params"])
    decays = {float(g.get("weight_decay", 0.0)) for g in groups if g.get("weight_decay")}
    decayed = sum(p.numel() for g in groups if g.get("weight_decay") for p in g["params"])
    if not decays:
        return "none"
    return f"{'/'.join(f'{d:g}' for d in sorted(decays))} on {100 * decayed / max(1, total):.1f}%"


def optimizer_name(optimizer) -> str | None:
    """The optimizer class that steps and its kernel: ``"torch.optim.AdamW (foreach)"``."""
    opt = innermost_optimizer(optimizer)
    if opt is None:
        return None
    cls = type(opt)
    module = cls.__module__.replace("torch.optim.adamw", "torch.optim")
    group = (getattr(opt, "param_groups", None) or [{}])[0]
    kernel = "fused" if group.get("fused") else "foreach" if group.get("foreach") else "default"
    return f"{module}.{cls.__name__} ({kernel})"


def rows_fingerprint(batch: dict) -> int:
    """An order-free fingerprint of a micro-batch's rows: the sum (mod 2**64) of a hash of each row's
    real tokens (``input_ids`` where ``attention_mask`` is 1).  Summed over a step's micro-batches
    and ranks it names the rows of the global step however they were split or padded; the
    sequence of those sums is the record's data order (``as_run.data_order_digest``).

    Example: ``sum(rows_fingerprint(mb) for mb in micro_batches) % 2**64``.
    """
    import hashlib

    ids, mask = batch.get("input_ids"), batch.get("attention_mask")
    if ids is None:
        return 0
    ids = ids.detach().cpu()
    mask = mask.detach().cpu().bool() if mask is not None else None
    total = 0
    for i in range(ids.shape[0]):
        row = ids[i][mask[i]] if mask is not None else ids[i]
        total += int.from_bytes(hashlib.sha256(row.numpy().tobytes()).digest()[:8], "little")
    return total % 2**64


class StandardEngine(Engine):
    """Plain PyTorch: autocast forward, backward, clip, AdamW, schedule.

    Subclasses override :meth:`wrap` (e.g. ``torch.compile(model)``) and set
    ``grad_average_world`` when their gradient reduction averages ranks::

        class CompiledEngine(StandardEngine):
            compiles = True
            def wrap(self, model):
                return torch.compile(model)
    """

    grad_average_world: bool = False
    optimization_hooks = frozenset({"optimizer", "backward-step"})

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def setup(self, model: torch.nn.Module) -> None:
        import torch

        ctx: EngineContext = self.ctx
        self.model = model.to(ctx.device)
        self.raw_model = self.model
        self.model = self.wrap(self.model)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = ctx.build_optimizer(params)
        self.scheduler = build_scheduler(self.optimizer, ctx.recipe)
        self.scaler = torch.amp.GradScaler(ctx.device.type) if ctx.recipe.precision == "fp16" else None
        self.loss_multiplier = float(ctx.world_size) if self.grad_average_world else 1.0

    def forward_backward(self, batch: dict, boundary: bool) -> torch.Tensor:
        ctx: EngineContext = self.ctx
        batch = move(batch, ctx.device)
        with autocast_for(ctx.recipe, ctx.device):
            loss = ctx.loss_fn(self.model, batch) * batch["loss_scale"]
        scaled = loss * self.loss_multiplier
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        scaled.backward()
        return loss.detach()

    def step(self) -> None:
        recipe = self.ctx.recipe
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if recipe.max_grad_norm and recipe.max_grad_norm > 0:
            self.clip(recipe.max_grad_norm)
        stepped = True
        if self.scaler is not None:
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            # The scaler skips the optimizer step on inf/nan gradients and then lowers its scale;
            # the schedule must not advance over a step that did not happen.
            stepped = self.scaler.get_scale() >= scale
        else:
            self.optimizer.step()
        if stepped:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def facts(self) -> dict:
        return {"loss_normalisation": GLOBAL_MEAN, "precision_policy": precision_policy(self.ctx.recipe),
                "optimizer": optimizer_name(self.optimizer), "weight_decay": weight_decay_scope(self.optimizer)}

    def clip(self, max_norm: float) -> None:
        import torch

        params = [p for p in self.model.parameters() if p.grad is not None]
        # foreach keeps clipping free of a per-parameter host round trip.
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def eval_model(self) -> torch.nn.Module:
        return self.raw_model
