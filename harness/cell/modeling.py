"""Models, encodings, the loss and greedy decoding, for every model kind.

Model kinds (``ftbench.harness.contract.api.MODEL_KINDS``):

* ``decoder``: causal LM; a prompt/target pair becomes
  ``<s> prompt <sep> target </s>`` with the loss on the target only;
  classification uses a sequence-classification head.
* ``encoder-decoder``: T5/BART style; prompt -> encoder, target -> labels.
* ``encoder``: BERT style, classification only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ftbench.harness.contract.api import (DECODER, ENCODER, ENCODER_DECODER, IGNORE_INDEX, Encoded, FtbenchError, ModelPreset,
                  Task)
from ftbench.harness.contract.format import shorten
from ftbench.harness.cell.remote_code import as_user_error, hf_kwargs, refuse_remote_code
from ftbench.harness.contract.engine import model_inputs
from ftbench.harness.cell.tokenization import train_tokenizer
from ftbench.harness.cell.weights import load_kwargs


@dataclass
class ModelSource:
    """Where a model comes from: a registered preset, a local directory or a hub id."""

    name: str
    kind: str
    preset: ModelPreset | None = None
    path: str | None = None
    #: Whether the model's own Python code may run (``--trust-remote-code``); see remote_code.py.
    trust_remote_code: bool = False


def resolve_model(name: str, registry, task: Task, trust_remote_code: bool = False,
                  describe_only: bool = False) -> ModelSource:
    """Find ``--model NAME``: preset name, then local directory, then hub id.

    A directory whose ``auto_map`` names its own Python code is refused
    unless ``trust_remote_code`` (before any of it is read by transformers).
    ``describe_only`` (planning): a directory needs only its ``config.json``, and a hub id is read
    from the local Hugging Face cache, never downloaded; weights and a tokenizer are needed to train.
    """
    if name in registry.models:
        preset = registry.model(name)
        return ModelSource(name, preset.kind, preset=preset)
    if os.path.isdir(name):
        _check_model_dir(name, describe_only)
        refuse_remote_code(name, trust_remote_code)
        return ModelSource(name, _kind_from_config(name, trust_remote_code), path=name,
                           trust_remote_code=trust_remote_code)
    if "/" in name and not name.startswith((".", "/")):
        path = cached_hub_config_dir(name) if describe_only else name
        return ModelSource(name, _kind_from_config(path, trust_remote_code), path=path,
                           trust_remote_code=trust_remote_code)
    registry.model(name)  # raises the "unknown model preset ... did you mean" error
    raise AssertionError("unreachable")


def check_model_name(name: str, registry, describe_only: bool = False) -> None:
    """Fail fast (before any cell runs) on a model that cannot be found."""
    if name in registry.models:
        return
    if os.path.isdir(name):
        _check_model_dir(name, describe_only)
    elif "/" not in name or name.startswith((".", "/")):
        registry.model(name)  # raises "unknown model preset ... did you mean"
    elif describe_only:
        cached_hub_config_dir(name)


def cached_hub_config_dir(repo_id: str) -> str:
    """The snapshot directory holding ``repo_id``'s ``config.json`` in the local Hugging Face cache.

    Never downloads: planning must work offline.  Example: ``cached_hub_config_dir("meta-llama/Llama-3.1-8B")``.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(found, str):
        raise FtbenchError(
            f"hub model {repo_id!r}: its config.json is not in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}), and ftbench plan never downloads. Fetch it once with "
            f"`hf download {repo_id} config.json` (or huggingface-cli download), or pass a directory holding "
            "only its config.json, or a preset name (ftbench list)")
    return str(Path(found).parent)


def _check_model_dir(path: str, describe_only: bool = False) -> None:
    p = Path(path)
    if not (p / "config.json").exists():
        raise FtbenchError(f"model directory {path} has no config.json; pass a directory saved with "
                           "save_pretrained(), a hub id, or a preset name (ftbench list)")
    if describe_only:
        return  # planning builds the model on the meta device from the config alone
    weights = list(p.glob("*.safetensors")) + list(p.glob("*.bin"))
    if not weights:
        raise FtbenchError(f"model directory {path} has no weights (*.safetensors or *.bin); save the model "
                           "with model.save_pretrained(DIR) (ftbench plan needs only its config.json)")
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                          "spiece.model")):
        raise FtbenchError(f"model directory {path} has no tokenizer files; save one there with "
                           "tokenizer.save_pretrained(DIR)")


def _kind_from_config(name: str, trust_remote_code: bool = False) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, **hf_kwargs(trust_remote_code))
    except Exception as e:  # noqa: BLE001 - report any loading problem as user input
        refused = as_user_error(name, e)
        if refused is not None:
            raise refused from None
        raise FtbenchError(f"cannot load model config {shorten(name)!r}: {shorten(str(e), 300)}. Pass a local model directory, a hub id "
                           "(needs network), or a preset name (ftbench list)") from None
    if getattr(config, "is_encoder_decoder", False):
        return ENCODER_DECODER
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHead" in archs or config.model_type in {"gpt2", "llama", "mistral", "qwen2",
                                                                         "gpt_neox", "opt", "phi", "gemma"}:
        return DECODER
    return ENCODER


def choose_kind(source: ModelSource, task: Task) -> str:
    if source.kind not in task.model_kinds:
        raise FtbenchError(
            f"task {task.name!r} cannot train {source.kind} models such as {source.name!r}; it accepts "
            f"{', '.join(task.model_kinds)} models. Pick a preset of a fitting kind (ftbench list).")
    return source.kind


def load_tokenizer(source: ModelSource, texts):
    if source.preset is not None:
        return train_tokenizer(texts, source.preset.vocab_size)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.path, **hf_kwargs(source.trust_remote_code))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build_model(source: ModelSource, tokenizer, head: str, num_labels: int | None, kind: str):
    """A fresh model; preset weights are random, seeded by the caller.

    Pretrained weights load as fp32 whatever dtype they were stored in: the
    recipe trains fp32 weights (low precision is autocast over them).
    """
    if source.preset is not None:
        return source.preset.build(tokenizer=tokenizer, head=head, num_labels=num_labels)
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification


    fp32 = load_kwargs()
    if head == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(source.path, num_labels=num_labels, **fp32,
                                                                   **hf_kwargs(source.trust_remote_code))
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        return model
    cls = AutoModelForSeq2SeqLM if kind == ENCODER_DECODER else AutoModelForCausalLM
    return cls.from_pretrained(source.path, **fp32, **hf_kwargs(source.trust_remote_code))


# ---------------------------------------------------------------- encoding


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _special(tokenizer, *names) -> int | None:
    for n in names:
        v = getattr(tokenizer, f"{n}_token_id", None)
        if v is not None:
            return v
    return None


def encode_example(task: Task, example: dict, tokenizer, kind: str, seq_len: int, options: dict) -> Encoded:
    """Tokenize one example for ``kind``, truncating to ``seq_len`` and counting what was cut."""
    eos = _special(tokenizer, "eos", "sep")
    if task.head == "classification":
        text, _ = task.prompt_and_target(example, options)
        body = _ids(tokenizer, text)
        if kind == ENCODER:
            pre, post = [_special(tokenizer, "cls", "bos")], [_special(tokenizer, "sep", "eos")]
        else:
            pre, post = [], [eos]
        pre, post = [t for t in pre if t is not None], [t for t in post if t is not None]
        room = seq_len - len(pre) - len(post)
        cut = max(0, len(body) - room)
        body = body[:room] if cut else body
        return Encoded(pre + body + post, [task.label(example, options)], cut)

    prompt, target = task.prompt_and_target(example, options)
    p, t = _ids(tokenizer, prompt), _ids(tokenizer, target)
    if kind == ENCODER_DECODER:
        cut = max(0, len(p) + 1 - seq_len) + max(0, len(t) + 1 - seq_len)
        p, t = p[: seq_len - 1], t[: seq_len - 1]
        return Encoded(p + [eos], t + [eos], cut)
    bos = _special(tokenizer, "bos", "eos")
    sep = _special(tokenizer, "sep", "eos")
    head_ids = ([bos] if bos is not None else []) + (p + [sep] if prompt else [])
    tail_ids = t + [eos]
    over = len(head_ids) + len(tail_ids) - seq_len
    cut = max(0, over)
    if over > 0:
        # Keep the end of the prompt (closest to the target), then cut the target's end.
        keep_prompt = max(0, len(p) - over)
        over -= len(p) - keep_prompt
        p = p[len(p) - keep_prompt:]
        head_ids = ([bos] if bos is not None else []) + (p + [sep] if prompt else [])
        if over > 0:
            tail_ids = tail_ids[: len(tail_ids) - over]
    ids = (head_ids + tail_ids)[:seq_len]
    labels = ([IGNORE_INDEX] * len(head_ids) + tail_ids)[:seq_len]
    return Encoded(ids, labels, cut)


def collate(items: list[Encoded], kind: str, head: str, pad_id: int, seq_len: int, padding: str,
            decoder_start: int | None = None) -> dict:
    """Pad a micro-batch into CPU tensors and count its tokens three ways."""
    width = seq_len if padding == "max_length" else max(len(e.input_ids) for e in items)
    n = len(items)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, e in enumerate(items):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if any(e.position_ids is not None for e in items):
        positions = torch.zeros((n, width), dtype=torch.long)
        for i, e in enumerate(items):
            positions[i, : len(e.position_ids)] = torch.tensor(e.position_ids)
        batch["position_ids"] = positions
    if head == "classification":
        batch["labels"] = torch.tensor([e.labels[0] for e in items], dtype=torch.long)
        loss_units = n
    elif kind == ENCODER_DECODER:
        twidth = seq_len if padding == "max_length" else max(len(e.labels) for e in items)
        labels = torch.full((n, twidth), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(items):
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
        dec = torch.full_like(labels, pad_id)
        dec[:, 0] = decoder_start if decoder_start is not None else pad_id
        dec[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == IGNORE_INDEX, pad_id)
        batch["labels"] = labels
        batch["decoder_input_ids"] = dec
        loss_units = int((labels != IGNORE_INDEX).sum())
    else:
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(items):
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
        # Position 0 never carries loss after the causal shift.
        loss_units = int((labels[:, 1:] != IGNORE_INDEX).sum())
    batch["counts"] = {"padded": int(input_ids.numel()), "nonpad": int(mask.sum()), "loss": loss_units,
                       "samples": n}
    return batch


def make_loss_fn(kind: str, head: str):
    """``loss_fn(model, batch)`` -> summed loss over the micro-batch's loss units."""

    if head == "classification":
        def loss_fn(model, batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    elif kind == ENCODER_DECODER:
        def loss_fn(model, batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           decoder_input_ids=batch["decoder_input_ids"]).logits
            return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
    else:
        def loss_fn(model, batch):
            logits = model(**model_inputs(batch)).logits
            return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_fn


# ---------------------------------------------------------------- decoding


@torch.no_grad()
def greedy_generate(model, tokenizer, kind: str, prompts: list[str], device, seq_len: int,
                    max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """Greedy continuations of ``prompts`` (decoder: after ``<sep>``)."""
    model.eval()
    out: list[str] = []
    eos = _special(tokenizer, "eos", "sep")
    pad = tokenizer.pad_token_id
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        if kind == ENCODER_DECODER:
            rows = [(_ids(tokenizer, p)[: seq_len - 1] + [eos]) for p in chunk]
            width = max(map(len, rows))
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
            mask = (torch.arange(width, device=device)[None] < torch.tensor([len(r) for r in rows],
                                                                             device=device)[:, None]).long()
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad)
            seqs = gen.tolist()
        else:
            bos = _special(tokenizer, "bos", "eos")
            sep = _special(tokenizer, "sep", "eos")
            budget = max(1, seq_len - max_new_tokens)
            rows = [(([bos] if bos is not None else []) + _ids(tokenizer, p) + [sep])[-budget:] for p in chunk]
            width = max(map(len, rows))
            # Left padding so every row's continuation starts at the same column.
            ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=pad)
            seqs = [row[width:] for row in gen.tolist()]
        for seq in seqs:
            if eos in seq[1 if kind == ENCODER_DECODER else 0:]:
                first = 1 if kind == ENCODER_DECODER else 0
                seq = seq[: first + seq[first:].index(eos)]
            out.append(tokenizer.decode([t for t in seq if t not in (pad, eos)], skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def class_probabilities(model, batches: list[dict], device) -> list[list[float]]:
    """Softmax over the classification head, one row per example, in order."""
    model.eval()
    out: list[list[float]] = []
    for b in batches:
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        out.extend(torch.softmax(logits.float(), dim=-1).cpu().tolist())
    return out


# ---------------------------------------------------------------- tuning


def block_stacks(model: torch.nn.Module) -> list[torch.nn.ModuleList]:
    """The model's stacks of transformer blocks (``h``, ``layers``, ``layer``, ``block``),
    encoder and decoder alike; outermost only (a T5 block keeps its sub-layers in
    a ``layer`` list, which is part of the block, not a stack of blocks)."""
    stacks: dict[str, torch.nn.ModuleList] = {}
    for name, m in model.named_modules():
        if (isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in {"h", "layers", "layer", "block"}
                and not any(name.startswith(outer + ".") for outer in stacks)):
            stacks[name] = m
    return list(stacks.values())


def apply_tuning(model: torch.nn.Module, mode: str, n: int) -> None:
    """Freeze parameters for partial fine-tuning (``full`` trains everything); called through
    :func:`ftbench.harness.cell.tuning.tune`, the one entry point the worker and the planner share.

    ``freeze-embeddings`` freezes the input embeddings (and an output layer
    tied to them); ``freeze-lower:N`` freezes the N lowest blocks of every
    block stack (encoder and decoder alike).
    """
    if mode == "full":
        return
    if mode == "freeze-embeddings":
        for p in model.get_input_embeddings().parameters():
            p.requires_grad_(False)
        return
    stacks = block_stacks(model)
    if not stacks:
        raise FtbenchError("tuning=freeze-lower:N found no block stack (h/layers/layer/block) in this model")
    for stack in stacks:
        if n > len(stack):
            raise FtbenchError(f"tuning=freeze-lower:{n} but the model has only {len(stack)} blocks")
        for block in list(stack)[:n]:
            for p in block.parameters():
                p.requires_grad_(False)


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def max_positions(model) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


def decoder_start_id(model) -> int | None:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "decoder_start_token_id", None)


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())

