"""``deepspeed``: DeepSpeed's engine with ZeRO stage 0-3 and CPU offload.

The DeepSpeed config is *built from the ftbench recipe*, never from a
DeepSpeed default: global batch, micro-batch and accumulation, clipping,
AdamW with the recipe's hyper-parameters (``torch.optim.AdamW``, or
``DeepSpeedCPUAdam(adamw_mode=True)`` when the optimizer is offloaded), and
the recipe's schedule (``ftbench.build_scheduler``) as a client scheduler.
Mixed precision uses DeepSpeed's ``torch_autocast`` section with fp32
weights and fp32 gradient reduction: the same policy as the other backends'
``torch.autocast``, not DeepSpeed's bf16/fp16 weight modes.

Loss scaling: ``engine.backward`` divides the loss by the accumulation
steps and ZeRO's reduction averages over ranks, while the runner's
``loss_scale`` already normalises by the whole global batch; the loss is
multiplied by ``grad_accum * world_size`` so that those two cancel.

DeepSpeed's own settings pass through for what the recipe does not own:
``config=PATH.json`` (or inline JSON) and dotted keys such as
``ds.zero_optimization.overlap_comm=false``.  A pass-through that would
change the recipe (batch, optimizer, scheduler, clipping, precision) is
rejected with the ftbench flag to use instead.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

from ftbench import hookimpl, BackendSpec, Engine, EngineContext, FtbenchError, MemoryPlan, Unavailable, autocast_for, build_optimizer, build_scheduler, move
from ftbench import GLOBAL_MEAN, optimizer_name, precision_policy, weight_decay_scope

from ftbench.plugins._distributed import ensure_process_group

INSTALL_HINT = "needs deepspeed: pip install 'ftbench[deepspeed]' (or pip install deepspeed)"
#: Releases before this have ZeRO bf16 and tied-parameter bugs that change results.
MIN_VERSION = (0, 17, 6)
OFFLOAD = ("none", "cpu")
#: Host memory DeepSpeed's process group, CPU accelerator and shared-memory communication add
#: to a rank on CPU beyond the harness (the fork server has imported DeepSpeed already):
#: measured under --cpu-memory live on 3.3M- and 57M-parameter GPT-2s (docs/memory.md).
RUNTIME_BYTES = 40 * 2**20

#: DeepSpeed keys the recipe owns, and the flag that sets each instead.
RECIPE_KEYS = {
    "train_batch_size": "--batch-size",
    "train_micro_batch_size_per_gpu": "--batch-size, --grad-accum and --nproc",
    "gradient_accumulation_steps": "--grad-accum",
    "gradient_clipping": "the recipe's max_grad_norm",
    "optimizer": "--lr and the recipe's betas/eps/weight_decay (AdamW)",
    "scheduler": "the recipe's schedule and lr_warmup_steps",
    "fp16": "--precision",
    "bf16": "--precision",
    "torch_autocast": "--precision",
    "amp": "--precision",
}


class DeepSpeedEngine(Engine):
    """DeepSpeed ZeRO with the ftbench recipe.

    Options: ``stage`` (0-3), ``offload`` (``none`` | ``cpu``: optimizer
    state and step on the CPU with DeepSpeedCPUAdam), ``offload_param``
    (``none`` | ``cpu``, stage 3 only), ``config`` (a JSON file or inline
    JSON merged into the generated config) and ``ds.<dotted.key>=value``.

    Example::

        ftbench run --backend deepspeed:stage=3,offload=cpu --nproc 2
        ftbench run --backend zero2:ds.zero_optimization.overlap_comm=false
    """

    @classmethod
    def check_available(cls, options: dict) -> None:
        # find_spec, not an import: listing backends must stay fast, and DeepSpeed takes seconds to import.
        try:
            found = importlib.util.find_spec("deepspeed") is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise Unavailable(INSTALL_HINT)
        from ftbench import version_tuple

        version = _installed_version()
        if version and version_tuple(version) < MIN_VERSION:
            floor = ".".join(map(str, MIN_VERSION))
            raise Unavailable(f"needs deepspeed>={floor} (installed: {version}; older releases have ZeRO bf16 and "
                              f"tied-parameter bugs): pip install -U 'deepspeed>={floor}'")

    @classmethod
    def validate_options(cls, options: dict) -> dict:
        opts = dict(options)
        known = {"stage", "offload", "offload_param", "config"}
        unknown = {k for k in opts if k not in known and not k.startswith("ds.")}
        if unknown:
            raise FtbenchError(f"unknown deepspeed option(s) {sorted(unknown)}; allowed: {sorted(known)} and "
                               "ds.<dotted.key>=value (e.g. deepspeed:stage=3,offload=cpu)")
        stage = opts.get("stage", 0)
        if stage not in (0, 1, 2, 3) or isinstance(stage, bool):
            raise FtbenchError(f"invalid deepspeed stage={stage!r}; choose 0, 1, 2 or 3")
        for key in ("offload", "offload_param"):
            if opts.get(key, "none") not in OFFLOAD:
                raise FtbenchError(f"invalid deepspeed {key}={opts[key]!r}; choose none or cpu")
        if opts.get("offload", "none") != "none" and stage == 0:
            raise FtbenchError("deepspeed offload=cpu needs ZeRO stage 1, 2 or 3 (e.g. deepspeed:stage=2,offload=cpu)")
        if opts.get("offload_param", "none") != "none" and stage != 3:
            raise FtbenchError("deepspeed offload_param=cpu needs stage=3 (e.g. deepspeed:stage=3,offload_param=cpu)")
        extra = _passthrough(opts)
        for key in extra:
            if key in RECIPE_KEYS:
                raise FtbenchError(f"deepspeed setting {key!r} comes from the ftbench recipe so that every backend "
                                   f"computes the same step; set it with {RECIPE_KEYS[key]} instead")
        if "stage" in (extra.get("zero_optimization") or {}):
            raise FtbenchError("set the ZeRO stage with the stage option (deepspeed:stage=N), not in the config")
        return opts

    @classmethod
    def prepare_once(cls, options: list, device: str) -> None:
        """Build (first run) or load DeepSpeed's JIT-compiled ops once for the grid, so that no
        cell's clock pays for them.

        On the CPU accelerator every DeepSpeed process loads its shared-memory
        communication op when its process group starts; offload cells load
        CPU Adam on CPU and on CUDA alike (a host-side C++/OpenMP op, 30-60 s
        to build).  Both are compiled on first use.
        """
        names = []
        if device != "cuda":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            names.append("ShareMemCommBuilder")
        if any(o.get("offload", "none") != "none" for o in options):
            names.append("CPUAdamBuilder")
        if not names:
            return
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        for name in names:
            builder = get_accelerator().create_op_builder(name)
            # The condition DeepSpeed's own loader applies (deepspeed.comm.torch.build_shm_op).
            if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
                builder.load()

    @classmethod
    def memory_plan(cls, options: dict, world_size: int) -> MemoryPlan:
        """The ZeRO paper's partitioning (stage 1 the optimizer states, 2 also the gradients,
        3 also the weights) with an fp32 copy of each rank's weight partition for the optimizer,
        plus what DeepSpeed's own buffers add, measured step by step on CPU/gloo
        (docs/memory.md):

        * a gradient bucket of ``reduce_bucket_size`` elements (hidden², or a ``ds.`` option) fills in backward and is
          copied to be reduced: two bucket-sized buffers at the end of backward; stage 3 keeps
          its bucket for the whole run;
        * the optimizer step over the flat fp32 partition makes three partition-sized
          temporaries (the flattened gradient, ``sqrt`` and its quotient);
        * stage 3 prefetches and, while ``stage3_max_reuse_distance`` lets it, keeps gathered
          up to ``stage3_max_live_parameters`` weights through the forward pass;
        * with offload, two host staging copies of the partition.

        Stage 1 holds the same gradient partition as stage 2 here (DeepSpeed runs both through
        one optimizer class; measured at one micro-batch per step).
        """
        stage = int(options.get("stage", 0))
        n = world_size
        zero = _passthrough(options).get("zero_optimization") or {}
        offload = options.get("offload", "none") == "cpu"
        offload_param = options.get("offload_param", "none") == "cpu"
        if stage == 0:
            return MemoryPlan(runtime_bytes=RUNTIME_BYTES, note="ZeRO stage 0")
        # Buffers follow the model's width (hf_auto_sizing) unless a ds.* option sets them.
        bucket = _zero_int(zero, "reduce_bucket_size", 0)
        keeps_gathered = stage == 3 and _zero_int(zero, "stage3_prefetch_bucket_size", 1) > 0 \
            and _zero_int(zero, "stage3_max_reuse_distance", 1_000_000_000) > 0
        return MemoryPlan(weights_shards=n if stage == 3 else 1, grads_shards=n, optimizer_shards=n,
                          master_weights=True, offload_optimizer=offload, offload_weights=offload_param,
                          bucket_params=bucket, bucket_hidden_sq=0.0 if bucket else 1.0,
                          persistent_buckets=1 if stage == 3 else 0, reduce_copies=2,
                          step_copies=0 if offload else 3, host_buffers=2 if offload else 0,
                          gathered_params=_zero_int(zero, "stage3_max_live_parameters", 1_000_000_000)
                          if keeps_gathered else 0, gather_copies=2 if offload_param else 1,
                          gathered_layers=1 if stage == 3 and not keeps_gathered else 0,
                          runtime_bytes=RUNTIME_BYTES, note=f"ZeRO stage {stage}")

    # ------------------------------------------------------------ config

    def build_config(self, hidden: int | None = None) -> dict:
        """The DeepSpeed config of this cell: the recipe, the options, buffers sized from the model's
        width ``hidden`` as Hugging Face's integration sizes them (:func:`hf_auto_sizing`), then
        the pass-through (``ds.zero_optimization.reduce_bucket_size=5e8`` restores DeepSpeed's own)."""
        ctx: EngineContext = self.ctx
        recipe = ctx.recipe
        stage = int(self.options.get("stage", 0))
        zero: dict = {"stage": stage, **hf_auto_sizing(hidden, stage)}
        pin = ctx.device.type == "cuda"
        if self.options.get("offload", "none") == "cpu":
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
        if self.options.get("offload_param", "none") == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
        cfg = {
            "train_batch_size": recipe.batch_size,
            "train_micro_batch_size_per_gpu": recipe.micro_batch(ctx.world_size),
            "gradient_accumulation_steps": recipe.grad_accum,
            "gradient_clipping": float(recipe.max_grad_norm or 0.0),
            "zero_optimization": zero,
            # torch.optim.AdamW is exact but not on DeepSpeed's list of "tested" ZeRO optimizers.
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        if recipe.precision != "fp32":
            # Same policy as torch.autocast elsewhere: fp32 weights, fp32 gradient reduction
            # (an empty list keeps DeepSpeed from reducing Linear gradients in low precision).
            cfg["torch_autocast"] = {"enabled": True,
                                     "dtype": "bfloat16" if recipe.precision == "bf16" else "float16",
                                     "lower_precision_safe_modules": []}
        return _merge(cfg, _passthrough(self.options))

    # ------------------------------------------------------------- engine

    def setup(self, model) -> None:
        ctx: EngineContext = self.ctx
        if ctx.device.type != "cuda":
            # Must precede the first deepspeed import, which picks its accelerator once.
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        ensure_process_group(ctx.device)
        import deepspeed
        import torch

        self.hidden = model_hidden_size(model)
        self.config = self.build_config(self.hidden)
        zero = self.config.get("zero_optimization") or {}
        self.stage = int(zero.get("stage", 0))
        self.offload = (zero.get("offload_optimizer") or {}).get("device", "none") in ("cpu", "nvme")
        self.skeleton = _meta_copy(model) if self.stage == 3 else None
        if self.stage == 3:
            _partition_from_host(model, self.config, ctx.device)
        else:
            model = model.to(ctx.device)
        params = [p for p in model.parameters() if p.requires_grad]
        recipe = ctx.recipe
        if self.offload:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            # The recipe's AdamW, stepped on the CPU by DeepSpeed's kernel.
            reference = build_optimizer([torch.nn.Parameter(torch.zeros(1))], recipe).defaults
            optimizer = DeepSpeedCPUAdam(params, adamw_mode=True, lr=reference["lr"], betas=reference["betas"],
                                         eps=reference["eps"], weight_decay=reference["weight_decay"])
        else:
            optimizer = build_optimizer(params, recipe)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config,
            lr_scheduler=lambda opt: build_scheduler(opt, recipe))
        self.loss_multiplier = float(recipe.grad_accum * ctx.world_size)

    def forward_backward(self, batch: dict, boundary: bool):
        ctx: EngineContext = self.ctx
        batch = move(batch, ctx.device)
        with autocast_for(ctx.recipe, ctx.device):
            loss = ctx.loss_fn(self.ds, batch) * batch["loss_scale"]
        self.ds.backward(loss * self.loss_multiplier)
        # DeepSpeed counts micro-steps through step(); off the boundary it only advances the counter.
        if not boundary:
            self.ds.step()
        return loss.detach()

    def step(self) -> None:
        self.ds.step()

    def eval_model(self):
        if self.stage != 3:
            return self.ds.module
        import deepspeed

        module = self.ds.module
        params = dict(module.named_parameters(remove_duplicate=False))
        unique = list({id(p): p for p in params.values()}.values())
        with deepspeed.zero.GatheredParameters(unique, modifier_rank=None):
            full = {name: p.detach().clone() for name, p in params.items()}
        return _materialize(self.skeleton, self.ctx.device, full, dict(module.named_buffers()))

    def stats(self) -> dict:
        return {"zero_stage": self.stage, "offload_optimizer": self.offload,
                "offload_param": (self.config.get("zero_optimization", {}).get("offload_param") or {})
                .get("device", "none"),
                "optimizer": type(self.optimizer.optimizer if hasattr(self.optimizer, "optimizer")
                                  else self.optimizer).__name__,
                "deepspeed_config": self.config,
                "buffer_sizing": f"Hugging Face auto from hidden={self.hidden}" if self.hidden and self.stage
                else "DeepSpeed defaults"}

    def facts(self) -> dict:
        return {"loss_normalisation": GLOBAL_MEAN, "precision_policy": precision_policy(self.ctx.recipe),
                "optimizer": optimizer_name(self.optimizer), "weight_decay": weight_decay_scope(self.optimizer)}


def model_hidden_size(model) -> int | None:
    """The width Hugging Face's DeepSpeed integration sizes its "auto" buckets from."""
    config = getattr(model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    sizes = getattr(config, "hidden_sizes", None)
    return max(sizes) if sizes else None


def hf_auto_sizing(hidden: int | None, stage: int) -> dict:
    """ZeRO buffer sizes as Hugging Face's integration fills its ``"auto"`` values
    (transformers ``integrations/deepspeed.py``): a reduction bucket of hidden² elements and, at
    stage 3, a prefetch bucket of 0.9·hidden² and a persistence threshold of 10·hidden.
    DeepSpeed's own defaults (5e8, 5e7, 1e5) are sized for billion-parameter models.

    Example: ``hf_auto_sizing(576, 3)`` -> ``{"reduce_bucket_size": 331776, ...}``.
    """
    if not hidden or stage == 0:
        return {}
    out = {"reduce_bucket_size": hidden * hidden}
    if stage == 3:
        out.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                   stage3_param_persistence_threshold=10 * hidden)
    return out


def _partition_from_host(model, config: dict, device) -> None:
    """ZeRO-3: partition the host-built model one parameter at a time (``zero.Init`` over the
    module), so the whole model never sits on one GPU; with ``offload_param`` the shards stay on
    the CPU.  Without this, ``deepspeed.initialize`` would move the unsharded model to the GPU
    before partitioning it, and a model larger than one GPU could not train."""
    import deepspeed
    import torch

    offload = (config.get("zero_optimization", {}).get("offload_param") or {}).get("device", "none")
    # zero.Init reads the world size from DeepSpeed's communication layer: attach it to the process group.
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    deepspeed.zero.Init(module=model, config_dict_or_path=config, dtype=torch.float32,
                        remote_device=offload if offload != "none" else None,
                        pin_memory=device.type == "cuda")
    # zero.Init converts parameters only; buffers (position ids, masks) go to the device whole.
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)


def _zero_int(zero: dict, key: str, default: int) -> int:
    """A numeric ``zero_optimization`` setting (JSON may write 5e8), or DeepSpeed's default."""
    try:
        return int(float(zero.get(key, default)))
    except (TypeError, ValueError):
        return default  # "auto" and the like: DeepSpeed resolves them itself


def _installed_version() -> str | None:
    from ftbench import package_version

    return package_version("deepspeed")


def _meta_copy(model):
    from ftbench.plugins.data_parallel import meta_copy

    return meta_copy(model)


def _materialize(skeleton, device, params, buffers):
    from ftbench.plugins.data_parallel import materialize

    return materialize(skeleton, device, params, buffers)


def _passthrough(options: dict) -> dict:
    """DeepSpeed settings given by the user: ``config`` first, then ``ds.`` keys."""
    extra: dict = {}
    raw = options.get("config")
    if raw:
        text = str(raw)
        path = Path(text)
        try:
            data = json.loads(path.read_text()) if not text.lstrip().startswith("{") else json.loads(text)
        except OSError as e:
            raise FtbenchError(f"deepspeed config={text!r}: cannot read the file ({e.strerror}); pass a JSON "
                               "file path or inline JSON") from None
        except ValueError as e:
            raise FtbenchError(f"deepspeed config={text!r}: invalid JSON ({e})") from None
        if not isinstance(data, dict):
            raise FtbenchError(f"deepspeed config={text!r}: expected a JSON object")
        extra = _merge(extra, data)
    for key, value in options.items():
        if key.startswith("ds."):
            parts = key[3:].split(".")
            if not all(parts):
                raise FtbenchError(f"malformed deepspeed option {key!r}; write ds.section.key=value")
            node: dict = {}
            leaf = node
            for p in parts[:-1]:
                leaf = leaf.setdefault(p, {})
            leaf[parts[-1]] = value
            extra = _merge(extra, node)
    return extra


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


@hookimpl
def register_backends(register):
    def spec(name, description, preset_of="deepspeed", **defaults):
        register(BackendSpec(name, engine=DeepSpeedEngine, defaults=defaults, description=description,
                             preset_of=preset_of, data_parallel=True,
                             preload=("ftbench.plugins._deepspeed_preload",)))

    spec("deepspeed", "DeepSpeed engine, ZeRO stage 0-3, optional CPU offload (options: stage, offload, "
         "offload_param, config, ds.KEY)", preset_of=None, stage=0, offload="none")
    for s in range(4):
        spec(f"zero{s}", f"DeepSpeed ZeRO stage {s}", stage=s, offload="none")
    spec("zero2-offload", "DeepSpeed ZeRO-2, optimizer offloaded to CPU (DeepSpeedCPUAdam)", stage=2, offload="cpu")
    spec("zero3-offload", "DeepSpeed ZeRO-3, optimizer and parameters offloaded to CPU", stage=3, offload="cpu",
         offload_param="cpu")

