"""A test-only model preset whose build has a large, short-lived allocation.

Loaded with ``FTBENCH_PLUGINS_EXTRA=transient_plugin`` and ``tests/`` on
``PYTHONPATH``.  ``tiny-gpt2-transient`` touches ``TRANSIENT_MB`` of memory
and frees it before returning the ``tiny-gpt2`` model, the way a checkpoint
loader holds a state dict next to the model it fills: the setup window's
peak must show it and the training window's must not.
"""

from __future__ import annotations

from ftbench import hookimpl, DECODER, ModelPreset

TRANSIENT_MB = 400


def build(tokenizer, head="lm", num_labels=None):
    import numpy as np

    from ftbench.plugins.presets import build_gpt2

    transient = np.ones(TRANSIENT_MB * 2**20 // 8)  # every page written, so resident
    del transient  # a large array is its own mapping: freeing it returns the pages to the kernel
    return build_gpt2(tokenizer, head, num_labels)


@hookimpl
def register_models(register):
    register(ModelPreset("tiny-gpt2-transient", DECODER, build, preload=(),
                         description="tiny-gpt2 after a 400 MiB load transient (tests only)"))
