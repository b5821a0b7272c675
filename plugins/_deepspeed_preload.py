"""Imported once by the fork server (``BackendSpec.preload`` of the DeepSpeed backends), so that
DeepSpeed cells and their ranks start with the runtime already loaded.

Importing DeepSpeed picks its accelerator once, for the whole process and every fork of it.
That choice is safe to make before the fork only where it cannot depend on the cell and
cannot initialise a device: a torch built without CUDA or ROCm, where DeepSpeed picks the
CPU accelerator (as :class:`ftbench.plugins.deepspeed_zero.DeepSpeedEngine` would ask for).
Elsewhere this module imports nothing and each cell imports DeepSpeed itself.
"""

import importlib
import importlib.util
import os

import torch

if (torch.version.cuda is None and torch.version.hip is None and os.environ.get("DS_ACCELERATOR", "cpu") == "cpu"
        and importlib.util.find_spec("deepspeed") is not None):
    # DeepSpeed announces its accelerator choice on import; the cells' logs say it, the driver's terminal need not.
    _saved = [os.dup(1), os.dup(2)]
    _null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(_null, 1)
        os.dup2(_null, 2)
        import deepspeed  # noqa: F401
    finally:
        os.dup2(_saved[0], 1)
        os.dup2(_saved[1], 2)
        for _fd in (*_saved, _null):
            os.close(_fd)

    # ZeRO's optimizer check imports the muon module, whose top level runs torch.compile (and so
    # imports inductor): seconds per cell when it is not warm.  Loading a built op imports
    # torch's cpp_extension (and setuptools with it).
    for _name in ("deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.runtime.zero.stage_1_and_2",
                  "deepspeed.runtime.zero.stage3", "deepspeed.ops.adam", "torch.utils.cpp_extension"):
        try:
            importlib.import_module(_name)
        except ImportError:  # moved in another DeepSpeed release: that cell pays the import instead
            pass
