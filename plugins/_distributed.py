"""Process-group helpers shared by the data-parallel backend plugins.

Not a plugin itself (it is not listed in ``DEFAULT_PLUGINS``): ``ddp``,
``fsdp`` and ``deepspeed`` import it.
"""

from __future__ import annotations

import os


def ensure_process_group(device) -> None:
    """Make sure a process group exists, also for a one-rank cell.

    Under torchrun the runner has already initialised it.  A one-process
    cell of a data-parallel backend (``--backend ddp`` without ``--nproc``)
    gets a world of one over an in-memory store: no port is opened, so
    cells of engineers sharing a machine can never collide on one.
    """
    # Imported here, not at the top: 'ftbench list' imports every plugin.
    import torch.distributed as dist

    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
