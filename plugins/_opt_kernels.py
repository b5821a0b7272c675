"""The torch side of the built-in optimizations (``ftbench.plugins.optimizations``).

Imported only by a cell that applies one of them: it imports torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ftbench import IGNORE_INDEX, model_inputs


class ChunkedLossHead(torch.nn.Module):
    """Stands in for a causal LM's output layer.

    With ``targets`` set (by the loss function, for one forward pass) it
    returns the summed cross-entropy of the shifted targets instead of the
    logits, computing the logits of one of ``chunks`` slices of the tokens at
    a time (torchtune's chunked cross-entropy splits the same way); each chunk is
    checkpointed, so backward recomputes its logits instead of keeping them,
    and the full ``tokens x vocabulary`` tensor never exists.  The loss is
    computed inside the model's forward, where a sharding backend has the
    output layer's weights gathered.  Without targets (generation) it is the
    output layer.
    """

    def __init__(self, linear: torch.nn.Module, chunks: int):
        super().__init__()
        self.linear = linear
        self.chunks = chunks
        self.targets: torch.Tensor | None = None

    @property
    def weight(self):
        return self.linear.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return self.linear(hidden)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        t = self.targets.reshape(-1)
        total = hidden.new_zeros((), dtype=torch.float32)
        size = -(-h.shape[0] // self.chunks)
        for start in range(0, h.shape[0], size):
            tc = t[start:start + size]
            if bool((tc != IGNORE_INDEX).any()):
                total = total + checkpoint(self._chunk_loss, h[start:start + size], tc, use_reentrant=False)
        return total

    def _chunk_loss(self, h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.linear(h).float(), t, ignore_index=IGNORE_INDEX, reduction="sum")


def install_chunked_head(model, chunks: int):
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("chunked-ce needs a model with an output layer (get_output_embeddings())")
    model.set_output_embeddings(ChunkedLossHead(head, chunks))
    return model


def chunked_loss_fn(model):
    """The summed loss through the :class:`ChunkedLossHead` of the model it is given: the training
    model (wrapped by the engine) or an evaluation copy of it."""

    def loss_fn(m, batch):
        # Looked up at each call (a walk over the modules): evaluation may get a fresh copy each time.
        head = next(x for x in m.modules() if isinstance(x, ChunkedLossHead))
        head.targets = batch["labels"][:, 1:]
        try:
            return m(**model_inputs(batch)).logits
        finally:
            head.targets = None

    return loss_fn


def labels_loss_fn():
    """The summed loss from a model that computes its own (mean) loss from ``labels`` (Liger's fused one)."""

    def loss_fn(m, batch):
        labels = batch["labels"]
        mean = m(**model_inputs(batch), labels=labels).loss
        return mean * (labels[:, 1:] != IGNORE_INDEX).sum()

    return loss_fn


def adamw(params, recipe, impl: str):
    return torch.optim.AdamW(params, lr=recipe.lr, betas=tuple(recipe.betas), eps=recipe.eps,
                             weight_decay=recipe.weight_decay, **{impl: True})


def adamw_8bit(params, recipe):
    kw = dict(lr=recipe.lr, betas=tuple(recipe.betas), eps=recipe.eps, weight_decay=recipe.weight_decay)
    try:
        from torchao.optim import AdamW8bit  # optional dependency (ftbench[opts])
    except ImportError:
        import bitsandbytes as bnb  # optional dependency, CUDA

        return bnb.optim.AdamW8bit(params, **kw)
    return AdamW8bit(params, **kw)


class InBackward(torch.optim.Optimizer):
    """Steps each parameter in its gradient hook, then frees that gradient.

    ``inner([p])`` builds one parameter's optimizer (the cell's AdamW or
    another optimization's).  ``step`` and ``zero_grad`` have nothing left to
    do; the learning-rate schedule sets this optimizer's ``lr``, which each
    per-parameter step copies first.
    """

    def __init__(self, params, inner):
        params = [p for p in params]
        self.inners = {p: inner([p]) for p in params}
        first = next(iter(self.inners.values()))
        super().__init__(params, dict(first.defaults))
        for p in params:
            p.register_post_accumulate_grad_hook(self._step_param)

    @torch.no_grad()
    def _step_param(self, p) -> None:
        inner = self.inners[p]
        for group in inner.param_groups:
            group["lr"] = self.param_groups[0]["lr"]
        inner.step()
        inner.zero_grad(set_to_none=True)

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None


def save_on_cpu():
    return torch.autograd.graph.save_on_cpu(pin_memory=True)
