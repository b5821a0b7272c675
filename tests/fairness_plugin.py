"""Test-only backends that each plant one difference for the fairness check.

Loaded with ``FTBENCH_PLUGINS_EXTRA=fairness_plugin`` and ``tests/`` on ``PYTHONPATH``:

``permicro``   the recipe's step, but each micro-batch's loss is its own mean divided by the
               number of micro-batches (the pre-2024 gradient-accumulation normalisation);
               it says so in ``facts()``, and its losses really differ when micro-batches hold
               different numbers of loss tokens
``eagerattn``  the recipe's step with the model switched to the eager attention kernel
"""

from __future__ import annotations

from ftbench import IGNORE_INDEX, BackendSpec, StandardEngine, hookimpl


class PerMicroMeanEngine(StandardEngine):
    OPTIONS = ()

    def forward_backward(self, batch: dict, boundary: bool):
        units = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        per_micro = dict(batch, loss_scale=1.0 / max(1, units) / self.ctx.recipe.grad_accum)
        return super().forward_backward(per_micro, boundary)

    def facts(self) -> dict:
        return {**super().facts(), "loss_normalisation": "mean per micro-batch / accumulation steps"}


class EagerAttentionEngine(StandardEngine):
    OPTIONS = ()

    def wrap(self, model):
        model.config._attn_implementation = "eager"
        return model


@hookimpl
def register_backends(register):
    register(BackendSpec("permicro", engine=PerMicroMeanEngine, description="test: per-micro-batch mean loss"))
    register(BackendSpec("eagerattn", engine=EagerAttentionEngine, description="test: eager attention kernel"))
