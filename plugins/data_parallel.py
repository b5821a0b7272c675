"""``ddp`` and ``fsdp``: the recipe's step, data parallel across ``--nproc`` ranks.

Both reduce gradients by *averaging* over ranks, while the runner's loss
normalisation already divides by the loss units of the whole global batch;
``grad_average_world`` makes the shared engine multiply the loss by the
world size so that the two cancel and every rank ends with the gradient of
the global mean loss, exactly as one process would.

Evaluation after training runs on a plain, unsharded copy of the trained
model (``fsdp``) or on the unwrapped module (``ddp``), so the task's
evaluation and generation never enter a collective.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import sys

from ftbench import hookimpl, BackendSpec, FtbenchError, MemoryPlan, StandardEngine, Unavailable

from ftbench.plugins._distributed import ensure_process_group


#: Host memory torch.distributed and gloo add to a rank on CPU, beyond the harness (measured under
#: --cpu-memory live, docs/memory.md).
RUNTIME_BYTES = 30 * 2**20


def _check_bool(options: dict, key: str, backend: str) -> None:
    if key in options and not isinstance(options[key], bool):
        raise FtbenchError(f"invalid {backend} option {key}={options[key]!r}; write {key}=true or {key}=false")


def _check_known(options: dict, known: set, backend: str, example: str) -> None:
    unknown = set(options) - known
    if unknown:
        raise FtbenchError(f"unknown {backend} option(s) {sorted(unknown)}; allowed: {sorted(known)} "
                           f"(e.g. {example})")


class DDPEngine(StandardEngine):
    """``torch.nn.parallel.DistributedDataParallel`` over the cell's ranks.

    Options: ``bucket_cap_mb`` (gradient bucket size), ``find_unused_parameters``,
    ``gradient_as_bucket_view``, ``static_graph``.  With gradient accumulation
    the all-reduce runs only on the last micro-batch (``no_sync``).

    Example: ``ftbench run --backend ddp --nproc 2``.
    """

    grad_average_world = True
    # A gradient hook fires before DDP's all-reduce has averaged that gradient: no step in backward.
    optimization_hooks = frozenset({"optimizer"})
    OPTIONS = {"bucket_cap_mb", "find_unused_parameters", "gradient_as_bucket_view", "static_graph"}

    @classmethod
    def check_available(cls, options: dict) -> None:
        # Metadata, not an import, so 'ftbench list' stays fast; a torch build
        # without torch.distributed fails the cell with torch's own message.
        from ftbench import package_version

        if package_version("torch") is None:
            raise Unavailable("needs torch: pip install torch")

    @classmethod
    def validate_options(cls, options: dict) -> dict:
        _check_known(options, cls.OPTIONS, "ddp", "ddp:bucket_cap_mb=50")
        for key in ("find_unused_parameters", "gradient_as_bucket_view", "static_graph"):
            _check_bool(options, key, "ddp")
        if "bucket_cap_mb" in options and not (isinstance(options["bucket_cap_mb"], (int, float))
                                               and options["bucket_cap_mb"] > 0):
            raise FtbenchError(f"invalid ddp bucket_cap_mb={options['bucket_cap_mb']!r}; must be a number > 0")
        return options

    @classmethod
    def memory_plan(cls, options: dict, world_size: int) -> MemoryPlan:
        # Every rank holds the whole state; the reduction buckets are a second copy of the
        # gradients unless they are views into the buckets.
        buckets = 0.0 if options.get("gradient_as_bucket_view") else 1.0
        return MemoryPlan(grad_buffers=buckets, runtime_bytes=RUNTIME_BYTES,
                          note="replicated; gradient buckets" if buckets else "replicated")

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        ctx = self.ctx
        ensure_process_group(ctx.device)
        kwargs = {k: v for k, v in self.options.items() if k in self.OPTIONS}
        ids = [ctx.device.index if ctx.device.index is not None else ctx.local_rank] \
            if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, **kwargs)

    def forward_backward(self, batch: dict, boundary: bool):
        # Accumulating micro-batches need no all-reduce: only the step's last one syncs.
        with contextlib.nullcontext() if boundary else self.model.no_sync():
            return super().forward_backward(batch, boundary)


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            return None
    return fully_shard


class FSDPEngine(StandardEngine):
    """FSDP2: ``fully_shard`` on every transformer block, then on the whole model.

    Parameters stay fp32 and the recipe's autocast handles mixed precision,
    so the dtype policy is the same as eager's (no ``MixedPrecisionPolicy``).
    Options: ``reshard_after_forward`` (default true: free gathered weights
    after each block's forward, ZeRO-3 style; false keeps them, ZeRO-2 style).

    Example: ``ftbench run --backend fsdp:reshard_after_forward=false --nproc 2``.
    """

    grad_average_world = True
    OPTIONS = {"reshard_after_forward"}

    @classmethod
    def check_available(cls, options: dict) -> None:
        from ftbench import package_version, version_tuple

        version = package_version("torch")
        if version_tuple(version) < (2, 4):
            raise Unavailable(f"needs FSDP2 (fully_shard), in torch>=2.4 (installed: {version}); "
                              "pip install -U torch")

    @classmethod
    def validate_options(cls, options: dict) -> dict:
        _check_known(options, cls.OPTIONS, "fsdp", "fsdp:reshard_after_forward=false")
        _check_bool(options, "reshard_after_forward", "fsdp")
        return options

    @classmethod
    def memory_plan(cls, options: dict, world_size: int) -> MemoryPlan:
        # One block gathered at a time with its full gradients, the next one prefetched; without
        # resharding the gathered weights also stay until backward: all of them, beside the shards.
        keep = not options.get("reshard_after_forward", True)
        return MemoryPlan(weights_shards=world_size, grads_shards=world_size, optimizer_shards=world_size,
                          gathered_layers=2, gathered_params=sys.maxsize if keep else 0,
                          runtime_bytes=RUNTIME_BYTES,
                          note="sharded, weights kept gathered after forward" if keep else "fully sharded")

    def setup(self, model) -> None:
        super().setup(model)
        if self.scaler is not None:
            # Each rank sees only its gradient shard: the inf/nan verdict must be agreed on by all ranks.
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(self.ctx.device.type)

    def wrap(self, model):
        from torch.distributed.device_mesh import init_device_mesh

        ctx = self.ctx
        ensure_process_group(ctx.device)
        fully_shard = _fully_shard()
        self.skeleton = meta_copy(model)
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        reshard = bool(self.options.get("reshard_after_forward", True))
        from ftbench import block_stacks

        for stack in block_stacks(model):
            for block in stack:
                fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        return model

    def eval_model(self):
        from torch.distributed.tensor import DTensor

        full = {name: (p.full_tensor() if isinstance(p, DTensor) else p)
                for name, p in self.model.named_parameters(remove_duplicate=False)}
        return materialize(self.skeleton, self.ctx.device, full, dict(self.model.named_buffers()))


def meta_copy(model):
    """A structural copy of ``model`` whose tensors live on the meta device.

    Costs no memory; tied parameters stay tied (the deepcopy memo maps each
    tensor object once).  :func:`materialize` fills it after training.
    """
    import torch

    memo: dict = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) \
            if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def materialize(skeleton, device, params: dict, buffers: dict):
    """A copy of ``skeleton`` allocated on ``device``, filled with full tensors by name.

    Names include tied duplicates on both sides (``remove_duplicate=False``):
    a wrapper may keep one name of a tied pair and the skeleton another.
    The skeleton itself stays on the meta device: ``to_empty`` works in
    place, and a skeleton filled by one evaluation would keep a whole
    model's copy alive through the rest of training.
    """
    import torch

    model = copy.deepcopy(skeleton).to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters(remove_duplicate=False):
            p.copy_(params[name])
        for name, b in model.named_buffers():
            if name in buffers:
                b.copy_(buffers[name])
    return model


@hookimpl
def register_backends(register):
    # Usually imported with torch already; named so that the fork server keeps them warm if not.
    warm = ("torch.nn.parallel", "torch.distributed.fsdp")
    register(BackendSpec("ddp", engine=DDPEngine, data_parallel=True, preload=warm,
                         description="DistributedDataParallel across --nproc ranks (gloo on CPU, NCCL on CUDA)"))
    register(BackendSpec("fsdp", engine=FSDPEngine, defaults={"reshard_after_forward": True}, data_parallel=True,
                         preload=warm, description="FSDP2 fully_shard per block across --nproc ranks"))
