"""After training: the held-out loss and the task's own metrics.

Example::

    metrics = evaluate(engine.eval_model(), held_out)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ftbench.harness.contract.api import EvalContext
from ftbench.harness.contract.engine import autocast_for, move
from ftbench.harness.cell.modeling import class_probabilities, greedy_generate

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


@dataclass(frozen=True)
class HeldOut:
    """Everything evaluating a model needs besides the model: the held-out rows and how the cell reads them.

    ``rows`` are the raw examples and ``encoded`` their tokenised forms;
    ``make_batch(indices, encoded)`` collates, ``encode(row)`` tokenises one
    more row, and ``loss_fn(model, batch)`` is the training loss.

    Example: ``evaluate(model, HeldOut(task, tok, "decoder", device, recipe, options, rows, enc, loss_fn,
    make_batch, encode))``.
    """

    task: Any
    tokenizer: Any
    kind: str
    device: Any
    recipe: Any
    options: dict
    rows: list
    encoded: list
    loss_fn: Callable
    make_batch: Callable
    encode: Callable


def evaluate(model, held: HeldOut) -> dict:
    """The task's metrics on the held-out rows, ``eval_loss`` always among them."""
    task, tokenizer, kind, device, recipe, options = (held.task, held.tokenizer, held.kind, held.device,
                                                      held.recipe, held.options)
    rows, encoded, make_batch, encode = held.rows, held.encoded, held.make_batch, held.encode
    model.eval()
    loss = eval_loss(model, held.loss_fn, chunks(encoded, make_batch), device, recipe)
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
