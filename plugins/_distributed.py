"""Process-group helpers shared by the data-parallel backend plugins.

Not a plugin itself (it is not listed in ``DEFAULT_PLUGINS``): ``ddp``,
``fsdp`` and ``deepspeed`` import it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def ensure_process_group(device: torch.device) -> None:
    """Make sure a process group exists, also for a one-rank cell.

    Under torchrun the runner has already initialised it.  A one-process
    cell of a data-parallel backend (``--backend ddp`` without ``--nproc``)
    gets a world of one over an in-memory store: no port is opened, so
    cells of engineers sharing a machine can never collide on one.
    """
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def block_stacks(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The model's stacks of transformer blocks (``h``, ``layers``, ``layer``, ``block``)."""
    return [m for name, m in model.named_modules()
            if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in {"h", "layers", "layer", "block"}]
