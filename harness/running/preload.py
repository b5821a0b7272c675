"""Imported once by the fork server (see ``ftbench.harness.running.launch``) so that every cell
forked from it starts with torch, transformers and the plugins already loaded.

Nothing here may touch a device, start threads or seed anything: the server
must stay a clean template for the cells it forks.
"""

import importlib
import os

import torch  # noqa: F401
import torch.nn.functional  # noqa: F401
import transformers  # noqa: F401
from transformers import PreTrainedTokenizerFast  # noqa: F401
from transformers.generation import GenerationMixin  # noqa: F401
from transformers.modeling_utils import PreTrainedModel  # noqa: F401

from ftbench.harness.cell import data, measure, modeling, tokenization, worker  # noqa: F401
from ftbench.harness.contract import engine  # noqa: F401
from ftbench.harness.contract.registry import Registry

# Importing every plugin module (and whatever its top level imports), and the
# modules each model preset and each backend names, warms what the cells (and
# the ranks of multi-process cells) will use without the core naming any plugin.
# Backends: only those of the grid that started the server, when the driver says which
# (a backend's library can take seconds to import).
_registry = Registry.load()
_wanted = os.environ.get("FTBENCH_PRELOAD_BACKENDS")
_backends = [e for name, e in _registry.backends.items() if _wanted is None or name in _wanted.split(",")]
for _entry in [*_registry.models.values(), *_backends]:
    for _module in getattr(_entry.obj, "preload", ()):
        try:
            importlib.import_module(_module)
        except Exception:  # noqa: BLE001 - a stale name or a broken library must not break the server
            pass
