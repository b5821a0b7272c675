"""The packing contamination probe: does a packed row change what each document's loss is?

Each document that lies whole inside one of the first packed rows is scored
twice with the trained model, in fp32 and without gradients: inside its packed
row (per-token cross-entropy summed over the document's own positions), and
alone, unpacked.  Document-masked packing (``--packing documents``) should
give the same loss up to rounding; packing that lets attention cross documents
(``--packing``) departs by how much the earlier documents of the row leak in.

Example::

    probe = contamination_probe(model, encoded_train, seq_len=64, documents=True, device=cpu)
    probe["max_rel_dev"]      # 3e-7 with document masks
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ftbench.harness.contract.api import IGNORE_INDEX, Encoded
from ftbench.harness.contract.engine import model_inputs
from ftbench.harness.cell.packing import pack

#: Packed rows the probe scores (it runs after training, outside every clock).
ROWS = 4


@torch.no_grad()
def contamination_probe(model, docs: list[Encoded], seq_len: int, documents: bool, device, rows: int = ROWS) -> dict:
    """Per-document loss in packed rows against the same documents unpacked."""
    was_training = model.training
    model.eval()
    packed = pack(docs, seq_len, documents=documents)[:rows]
    devs: list[float] = []
    start = 0  # token offset of the current document in the concatenated stream
    bounds = []
    for d in docs:
        bounds.append((start, start + len(d.input_ids), d))
        start += len(d.input_ids)
    for r, row in enumerate(packed):
        row_start, row_end = r * seq_len, (r + 1) * seq_len
        inside = [(s - row_start, e - row_start, d) for s, e, d in bounds if s >= row_start and e <= row_end]
        if not inside:
            continue
        token_loss = _token_losses(model, [row], device)[0]
        for s, e, d in inside:
            alone = _token_losses(model, [d], device)[0]
            packed_sum = float(token_loss[s:e].sum())
            alone_sum = float(alone.sum())
            if alone_sum:
                devs.append(abs(packed_sum - alone_sum) / abs(alone_sum))
    model.train(was_training)
    return {"mode": "documents" if documents else "rows", "documents": len(devs), "rows": len(packed),
            "max_rel_dev": max(devs) if devs else None, "mean_rel_dev": sum(devs) / len(devs) if devs else None}


def _token_losses(model, items: list[Encoded], device) -> torch.Tensor:
    """Cross-entropy of each position's label (0 where none), aligned with the input positions."""
    ids = torch.tensor([e.input_ids for e in items], device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if items[0].position_ids is not None:
        batch["position_ids"] = torch.tensor([e.position_ids for e in items], device=device)
    labels = torch.tensor([e.labels for e in items], device=device)
    logits = model(**model_inputs(batch)).logits.float()
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(len(items), -1)
    return F.pad(loss, (1, 0))
