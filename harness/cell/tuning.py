"""The recipe's tuning scope on a freshly built model: what trains.

``full`` trains everything; ``freeze-embeddings`` and ``freeze-lower:N``
freeze parameters in place (:func:`ftbench.harness.cell.modeling.apply_tuning`);
``lora[:options]`` injects peft LoRA adapters (:mod:`ftbench.harness.cell.lora`).
The worker and ``ftbench plan`` (on the meta device) both call :func:`tune`, so
the planned trainable count is the trained one.

Example::

    model = tune(model, "lora:r=4", head="lm", kind="decoder")
"""

from __future__ import annotations
from ftbench.harness.cell.modeling import apply_tuning
from ftbench.harness.contract.config import parse_tuning
from ftbench.harness.contract.lora_options import parse_lora
from ftbench.harness.cell.lora import apply_lora


def tune(model, tuning: str, head: str, kind: str):
    """``model`` ready for the tuning scope (the same module, or the one with adapters injected)."""
    mode, n_frozen = parse_tuning(tuning)
    if mode == "lora":
        return apply_lora(model, parse_lora(tuning), head, kind)
    apply_tuning(model, mode, n_frozen)
    return model
