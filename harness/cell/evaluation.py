"""After training: the held-out loss and the task's own metrics.

Example::

    metrics = evaluate(cell, engine.eval_model(), make_batch)
"""

from __future__ import annotations

from ftbench.harness.contract.api import EvalContext
from ftbench.harness.contract.engine import autocast_for, move

EVAL_BATCH = 16


def eval_loss(model, loss_fn, batches, device, recipe) -> float:
    """Mean loss per loss-bearing unit over ``batches`` (collated, with ``counts``)."""
    import torch

    total = torch.zeros((), device=device)
    units = 0
    with torch.no_grad():
        for b in batches:
            units += b["counts"]["loss"]
            b = move({k: v for k, v in b.items() if k != "counts"}, device)
            with autocast_for(recipe, device):
                total += loss_fn(model, b).float()
    return float(total) / max(1, units)


def chunks(encoded: list, make_batch) -> list[dict]:
    """``encoded`` examples collated in evaluation-sized batches."""
    return [make_batch(list(range(i, min(i + EVAL_BATCH, len(encoded)))), encoded)
            for i in range(0, len(encoded), EVAL_BATCH)]


def evaluate(model, *, task, tokenizer, kind, device, recipe, options, rows, encoded, loss_fn, make_batch,
             encode) -> dict:
    """The task's metrics on ``rows`` (and their ``encoded`` forms), ``eval_loss`` always among them."""
    from ftbench.harness.cell.modeling import class_probabilities, greedy_generate

    model.eval()
    loss = eval_loss(model, loss_fn, chunks(encoded, make_batch), device, recipe)
    max_new = options.get("max_new_tokens", 32)

    def generate(prompts: list[str]) -> list[str]:
        with autocast_for(recipe, device):
            return greedy_generate(model, tokenizer, kind, prompts, device, recipe.seq_len, max_new)

    def classify(batch_rows: list[dict]) -> list[list[float]]:
        with autocast_for(recipe, device):
            return class_probabilities(model, chunks([encode(ex) for ex in batch_rows], make_batch), device)

    ectx = EvalContext(model=model, tokenizer=tokenizer, model_kind=kind, device=device, examples=rows,
                       eval_loss=loss, options=options, generate=generate, max_new_tokens=max_new,
                       classify=classify if task.head == "classification" else None)
    metrics = task.evaluate(ectx)
    metrics.setdefault("eval_loss", loss)
    return metrics
