"""Pre-run checks of the fine-tuning settings: optimizations, packing and LoRA.

Run by :func:`ftbench.harness.grid.preflight.check_cells` before any cell,
so that packing on a task or model that cannot pack, an unknown LoRA option,
LoRA target modules that match nothing, or a missing ``peft`` cost seconds
(exit 2) instead of a grid of failed cells.  Hub models are left to the cell
(their config needs the network); the cell repeats every check.

Example::

    check_finetuning(reg, cell, resolve_cell(reg, cell))
"""

from __future__ import annotations

import os

from ftbench.harness.cell.remote_code import hf_kwargs
from ftbench.harness.contract.lora_options import is_lora, parse_lora, require_peft
from ftbench.harness.contract.optimization import check_combination
from ftbench.harness.cell.packing import check_can_pack
from ftbench.harness.cell.lora import resolve_targets
from ftbench.harness.cell.modeling import resolve_model
from ftbench.harness.contract.api import ENCODER_DECODER


class _ShapeTokenizer:
    """Enough of a tokenizer for a preset to build its modules (their names do not depend on the vocabulary)."""

    pad_token_id, bos_token_id, eos_token_id = 0, 1, 2

    def __len__(self) -> int:
        return 64


def check_finetuning(reg, cell, resolved, skeletons: dict) -> None:
    """Raise FtbenchError when the cell's packing or LoRA settings cannot work."""
    recipe, task = resolved.recipe, resolved.task
    if resolved.opts:
        kind = _model_kind(reg, cell.model, task)
        check_combination(resolved.opts, backend_name=resolved.backend_name,
                          engine_hooks=resolved.backend.engine.optimization_hooks, kind=kind, head=task.head,
                          recipe=recipe, opt_text=cell.opt)
    if recipe.packing:
        kind = _model_kind(reg, cell.model, task, cell.trust_remote_code)
        if kind is not None:
            check_can_pack(task.head, kind, resolved.task_name, cell.model)
    if is_lora(recipe.tuning):
        require_peft()
        opts = parse_lora(recipe.tuning)
        key = (cell.model, task.head)
        if key not in skeletons:
            skeletons[key] = _skeleton(reg, cell.model, task, cell.trust_remote_code)
        if skeletons[key] is not None:
            resolve_targets(skeletons[key], opts)


def _model_kind(reg, name: str, task, trusted: bool = False) -> str | None:
    if name in reg.models:
        return reg.model(name).kind
    if os.path.isdir(name):
        return resolve_model(name, reg, task, trusted).kind
    return None


def _skeleton(reg, name: str, task, trusted: bool = False):
    """The model's modules on the meta device (no memory, no weights read); None for a hub id."""
    import torch


    with torch.device("meta"):
        if name in reg.models:
            return reg.model(name).build(tokenizer=_ShapeTokenizer(), head=task.head, num_labels=2)
        if not os.path.isdir(name):
            return None
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, \
            AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(name, **hf_kwargs(trusted))
        kind = _model_kind(reg, name, task, trusted)
        cls = (AutoModelForSequenceClassification if task.head == "classification" else
               AutoModelForSeq2SeqLM if kind == ENCODER_DECODER else AutoModelForCausalLM)
        return cls.from_config(config, **hf_kwargs(trusted))
