"""Imported once by the fork server (see ``ftbench.harness.running.launch``) so that every cell
forked from it starts with torch, transformers and the plugins already loaded.

Nothing here may touch a device, start threads or seed anything: the server
must stay a clean template for the cells it forks.
"""

import importlib

import torch  # noqa: F401
import torch.nn.functional  # noqa: F401
import transformers  # noqa: F401
from transformers import PreTrainedTokenizerFast  # noqa: F401
from transformers.generation import GenerationMixin  # noqa: F401
from transformers.modeling_utils import PreTrainedModel  # noqa: F401

from ftbench.harness.cell import data, measure, modeling, tokenization, worker  # noqa: F401
from ftbench.harness import engine  # noqa: F401
from ftbench.harness.registry import Registry

# Importing every plugin module (and whatever its top level imports), and the
# modules each model preset names, warms what the cells will use without the
# core naming any plugin.
for _entry in Registry.load().models.values():
    for _module in _entry.obj.preload:
        try:
            importlib.import_module(_module)
        except ImportError:  # a stale name must not break the server
            pass
