"""``accelerate``: the recipe's step through Hugging Face Accelerate, with its DDP, FSDP or DeepSpeed plugin.

``Accelerator.prepare`` wraps the model, the recipe's AdamW and its
schedule; each micro-batch's backward is ``accelerator.backward`` and
clipping ``accelerator.clip_grad_norm_``.  The runner keeps the loop, the
data order and the clock, as for every backend; gradient accumulation uses
the runner's boundary (Accelerate's ``sync_gradients`` is set from it, as
the ``Trainer`` does), so DDP skips the all-reduce and DeepSpeed the step
off the boundary.

Two things Accelerate does by design are undone so that the step computes
what the recipe says:

* its DDP, FSDP and ZeRO reductions *average* gradients over ranks (and
  DeepSpeed also divides by the accumulation steps) while the runner's
  ``loss_scale`` already divides by the global batch's loss units: the loss
  is multiplied by the world size (times the accumulation steps for
  DeepSpeed), as in the ``ddp``, ``fsdp`` and ``deepspeed`` backends;
* a prepared scheduler advances ``num_processes`` times per optimizer step
  (Accelerate assumes the schedule was sized for the un-sharded data
  loader): the schedule is built over ``world_size`` ticks per step, which is
  how Accelerate's documentation has users size it.

Options: ``dist`` = ``ddp`` (default), ``fsdp`` (FSDP2, each transformer
block wrapped; Accelerate applies it on GPUs only, so on a CPU machine the
cell is ``skipped``) or ``deepspeed`` with ``stage`` = 0, 1 or 2 (on CPU
through DeepSpeed's CPU accelerator).
"""

from __future__ import annotations

import contextlib
import os
import sys

from ftbench import (BackendSpec, FtbenchError, MemoryPlan, StandardEngine, Unavailable, autocast_for,
                     block_stacks, build_optimizer, build_scheduler, hookimpl, move, package_version)
from ftbench.plugins._distributed import ensure_process_group
from ftbench.plugins.data_parallel import RUNTIME_BYTES, materialize, meta_copy
from ftbench.plugins.deepspeed_zero import hf_auto_sizing, model_hidden_size

DIST = ("ddp", "fsdp", "deepspeed")
INSTALL_HINT = "needs accelerate: pip install 'ftbench[stacks]' (or pip install accelerate)"


class AccelerateEngine(StandardEngine):
    """The recipe's step under ``accelerate.Accelerator``.

    Example::

        ftbench run --backend accelerate --backend accelerate:dist=fsdp \\
            --backend accelerate:dist=deepspeed,stage=2 --nproc 2
    """

    OPTIONS = ("dist", "stage")

    @classmethod
    def check_available(cls, options: dict) -> None:
        if package_version("accelerate") is None:
            raise Unavailable(INSTALL_HINT)
        if options.get("dist") == "deepspeed" and package_version("deepspeed") is None:
            raise Unavailable("accelerate:dist=deepspeed needs deepspeed: pip install 'ftbench[deepspeed]'")
        # Inside a cell torch is loaded already; 'ftbench list' does not pay for importing it.
        torch = sys.modules.get("torch")
        if options.get("dist") == "fsdp" and torch is not None and not torch.cuda.is_available():
            raise Unavailable("accelerate:dist=fsdp needs GPUs: Accelerate applies its FSDP plugin to multi-GPU "
                              "runs only (on CPU, the fsdp backend runs FSDP2 over gloo)")

    @classmethod
    def validate_options(cls, options: dict) -> dict:
        super().validate_options(options)
        dist = options.get("dist", "ddp")
        if dist not in DIST:
            raise FtbenchError(f"invalid accelerate dist={dist!r}; choose {', '.join(DIST)} "
                               "(e.g. accelerate:dist=deepspeed,stage=2)")
        if "stage" in options and (dist != "deepspeed" or options["stage"] not in (0, 1, 2)):
            raise FtbenchError("accelerate stage=N needs dist=deepspeed and N in 0-2 "
                               "(e.g. accelerate:dist=deepspeed,stage=2)")
        return options

    @classmethod
    def memory_plan(cls, options: dict, world_size: int) -> MemoryPlan:
        dist, n = options.get("dist", "ddp"), world_size
        if dist == "fsdp":
            return MemoryPlan(weights_shards=n, grads_shards=n, optimizer_shards=n, gathered_layers=2,
                              runtime_bytes=RUNTIME_BYTES, note="accelerate FSDP2, fully sharded")
        if dist == "deepspeed" and int(options.get("stage", 0)) > 0:
            return MemoryPlan(grads_shards=n, optimizer_shards=n, master_weights=True, bucket_hidden_sq=1.0,
                              reduce_copies=2, step_copies=3, runtime_bytes=RUNTIME_BYTES,
                              note=f"accelerate DeepSpeed ZeRO stage {options['stage']}")
        return MemoryPlan(grad_buffers=1.0, runtime_bytes=RUNTIME_BYTES, note=f"accelerate {dist}, replicated")

    # ------------------------------------------------------------- setup

    def setup(self, model) -> None:
        ctx = self.ctx
        self.dist = self.options.get("dist", "ddp")
        if self.dist == "deepspeed" and ctx.device.type != "cuda":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before the first deepspeed import
        from accelerate import Accelerator  # optional, and 'ftbench list' must not pay for importing it

        ensure_process_group(ctx.device)
        recipe = ctx.recipe
        self.raw_model = model
        self.skeleton = meta_copy(model) if self.dist == "fsdp" else None
        # cpu=True would make Accelerate ignore its DeepSpeed plugin and fall back to plain DDP (its CPU
        # DeepSpeed path is DS_ACCELERATOR=cpu); FSDP on CPU needs it, to find the ranks' gloo group.
        self.accelerator = Accelerator(cpu=ctx.device.type != "cuda" and self.dist != "deepspeed",
                                       **self.plugin_kwargs(model))
        wanted = {"fsdp": "FSDP", "deepspeed": "DEEPSPEED"}.get(self.dist)
        if wanted and self.accelerator.distributed_type.name != wanted:
            hint = " (Accelerate applies FSDP across 2 or more processes only: use --nproc 2)" \
                if self.dist == "fsdp" and ctx.world_size == 1 else ""
            raise RuntimeError(f"Accelerate chose {self.accelerator.distributed_type} instead of {wanted} for "
                               f"accelerate:dist={self.dist} on {ctx.device}{hint}")
        model = model.to(ctx.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, recipe)
        scheduler = _scheduler_per_process(optimizer, recipe, self.accelerator.num_processes)
        self.model, self.optimizer, self.scheduler = self.accelerator.prepare(model, optimizer, scheduler)
        self.scaler = None  # Accelerate owns fp16 loss scaling
        accum = recipe.grad_accum if self.dist == "deepspeed" else 1
        self.loss_multiplier = float(ctx.world_size * accum)

    def plugin_kwargs(self, model) -> dict:
        ctx, recipe = self.ctx, self.ctx.recipe
        mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[recipe.precision]
        if self.dist == "fsdp":
            from accelerate.utils import FullyShardedDataParallelPlugin  # optional dependency

            blocks = sorted({type(b).__name__ for stack in block_stacks(model) for b in stack})
            return {"mixed_precision": mixed, "fsdp_plugin": FullyShardedDataParallelPlugin(
                fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=blocks)}
        if self.dist == "deepspeed":
            from accelerate.utils import DeepSpeedPlugin  # optional dependency

            self.ds_config = self.deepspeed_config(model)
            return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=self.ds_config)}
        return {"mixed_precision": mixed}

    def deepspeed_config(self, model) -> dict:
        """The recipe's DeepSpeed config, buckets sized from the model as Hugging Face's "auto" does."""
        ctx, recipe = self.ctx, self.ctx.recipe
        stage = int(self.options.get("stage", 0))
        zero = {"stage": stage, **(hf_auto_sizing(model_hidden_size(model), stage) if stage else {})}
        cfg = {"train_batch_size": recipe.batch_size,
               "train_micro_batch_size_per_gpu": recipe.batch_size // (ctx.world_size * recipe.grad_accum),
               "gradient_accumulation_steps": recipe.grad_accum,
               "gradient_clipping": float(recipe.max_grad_norm or 0.0), "zero_optimization": zero,
               "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        if recipe.precision != "fp32":
            cfg["torch_autocast"] = {"enabled": True, "lower_precision_safe_modules": [],
                                     "dtype": "bfloat16" if recipe.precision == "bf16" else "float16"}
        return cfg

    # -------------------------------------------------------------- step

    def forward_backward(self, batch: dict, boundary: bool):
        ctx, acc = self.ctx, self.accelerator
        # The runner's boundary, not Accelerate's own step counter, ends the accumulation.
        acc.gradient_state._set_sync_gradients(boundary)
        batch = move(batch, ctx.device)
        with acc.no_sync(self.model) if not boundary and self.dist != "deepspeed" else contextlib.nullcontext():
            with autocast_for(ctx.recipe, ctx.device):
                loss = ctx.loss_fn(self.model, batch) * batch["loss_scale"]
            acc.backward(loss * self.loss_multiplier)
        return loss.detach()

    def clip(self, max_norm: float) -> None:
        # DeepSpeed clips inside its own step (gradient_clipping in its config).
        if self.dist != "deepspeed":
            self.accelerator.clip_grad_norm_(self.model.parameters(), max_norm)

    def eval_model(self):
        if self.dist != "fsdp":
            return self.accelerator.unwrap_model(self.model)
        from torch.distributed.tensor import DTensor  # torch stays out of 'ftbench list'

        full = {name: (p.full_tensor() if isinstance(p, DTensor) else p)
                for name, p in self.model.named_parameters(remove_duplicate=False)}
        # Accelerate's FSDP2 preparation keeps one name of a tied pair (e.g. lm_head, not the embedding):
        # every name of a tied group in the skeleton takes the tensor of whichever name survived.
        groups: dict[int, list[str]] = {}
        for name, p in self.skeleton.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        for names in groups.values():
            have = next((full[n] for n in names if n in full), None)
            for n in names:
                full.setdefault(n, have)
        return materialize(self.skeleton, self.ctx.device, full, dict(self.model.named_buffers()))

    def facts(self) -> dict:
        return {**super().facts(), "stack": f"accelerate {self.accelerator.distributed_type.name}"}

    def stats(self) -> dict:
        out = {"distributed_type": str(self.accelerator.distributed_type)}
        if self.dist == "deepspeed":
            out["deepspeed_config"] = self.ds_config
        return out


def _scheduler_per_process(optimizer, recipe, processes: int):
    """The recipe's schedule, ticking ``processes`` times per optimizer step (Accelerate's stepping)."""
    import torch  # 'ftbench list' imports every plugin and must not pay for torch

    base = build_scheduler(optimizer, recipe).lr_lambdas[0]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda tick: base(tick // processes))


@hookimpl
def register_backends(register):
    register(BackendSpec("accelerate", engine=AccelerateEngine, defaults={"dist": "ddp"}, data_parallel=True,
                         description="Hugging Face Accelerate (dist=ddp|fsdp|deepspeed,stage=N) across --nproc ranks"))
