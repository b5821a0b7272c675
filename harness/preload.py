"""Imported once by the fork server (see ``harness.launch``) so that every cell
forked from it starts with torch, transformers and the plugins already loaded.

Nothing here may touch a device, start threads or seed anything: the server
must stay a clean template for the cells it forks.
"""

import torch  # noqa: F401
import torch.nn.functional  # noqa: F401
import transformers  # noqa: F401
from transformers import PreTrainedTokenizerFast  # noqa: F401
from transformers.generation import GenerationMixin  # noqa: F401
from transformers.modeling_utils import PreTrainedModel  # noqa: F401

from harness import data, engine, measure, modeling, tokenization, worker  # noqa: F401
from harness.registry import Registry

# Importing every plugin module (and whatever its top level imports) is the
# plugin-agnostic way to warm what the cells will use.
Registry.load()
