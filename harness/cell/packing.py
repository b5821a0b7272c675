"""Packing: decoder examples concatenated into full ``seq_len`` rows.

What run_clm's ``group_texts`` and TRL's ``packing=True`` feed a causal LM:
the training examples, each encoded as without packing (``<s> prompt <sep>
target </s>``, so an EOS ends every example), are concatenated in dataset
order and cut into rows of exactly ``seq_len`` tokens; the last, partial row
is dropped (as ``group_texts`` does).  Labels travel with their tokens, so a
prompt's positions still carry no loss.

Attention crosses document boundaries inside a row (a plain causal mask, no
per-document block mask), as in run_clm and TRL's default packing: the EOS
between examples tells the model where one ends, and the throughput figures
stay those of the backend's standard attention kernel.  Only the training
split is packed; evaluation runs on the unpacked held-out examples, so
quality with and without packing is judged on the same rows.

``--packing documents`` packs the same way but gives each token its
position inside its own document (:func:`pack_documents`); with those
position ids and no attention mask, transformers builds a block-diagonal
causal mask, so attention stays inside each document (as
``DataCollatorWithFlattening`` does).  A document cut by a row's end keeps
its true positions in the next row, where it lacks its beginning.
:mod:`ftbench.harness.cell.packing_probe` measures both against unpacked
documents.

Example::

    rows = pack(encoded_train, seq_len=128)     # list[Encoded], every row 128 tokens
"""

from __future__ import annotations

from ftbench.harness.contract.api import DECODER, Encoded, FtbenchError


def check_can_pack(head: str, kind: str, task: str, model: str) -> None:
    """FtbenchError unless the task and model kind can be packed (decoder language modelling)."""
    if head != "lm":
        raise FtbenchError(f"packing needs a task that trains a language-model head; task {task!r} classifies "
                           "whole examples, so there is nothing to pack. Drop --packing for this task.")
    if kind != DECODER:
        raise FtbenchError(f"packing concatenates examples for decoder (causal LM) models; {model!r} is an "
                           f"{kind} model. Drop --packing for it, or pick a decoder model (e.g. --model tiny-gpt2).")


def pack(rows: list[Encoded], seq_len: int, documents: bool = False) -> list[Encoded]:
    """``rows`` concatenated in order and cut into full ``seq_len`` rows (the remainder dropped);
    with ``documents``, each token carries its position inside its own document."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    for e in rows:
        ids.extend(e.input_ids)
        labels.extend(e.labels)
        positions.extend(range(len(e.input_ids)))
    n = len(ids) // seq_len
    if n == 0:
        raise FtbenchError(f"packing: the {len(rows)} training examples hold {len(ids)} tokens, less than one "
                           f"row of --seq-len {seq_len}; use a shorter --seq-len or more data")
    return [Encoded(ids[i * seq_len:(i + 1) * seq_len], labels[i * seq_len:(i + 1) * seq_len], 0,
                    positions[i * seq_len:(i + 1) * seq_len] if documents else None)
            for i in range(n)]


def pack_documents(rows: list[Encoded], seq_len: int) -> list[Encoded]:
    """:func:`pack` with per-document position ids (``--packing documents``)."""
    return pack(rows, seq_len, documents=True)
