"""LoRA adapters on a model, through ``peft``, inside the cell.

The adapters are injected in place (``get_peft_model`` then its base model),
so every backend trains the same ``transformers`` module it trains in full
fine-tuning, now with only the adapter weights (and, for a classification
head, the head) requiring gradients.  Default target modules per model
family are peft's own table (GPT-2 ``c_attn``, Llama ``q_proj``/``v_proj``,
T5 ``q``/``v``, BERT ``query``/``value``, ...).

Example::

    model = apply_lora(model, parse_lora("lora:r=4"), head="lm", kind="decoder")
"""

from __future__ import annotations

from ftbench.harness.contract.api import ENCODER_DECODER, FtbenchError


def default_targets(model) -> list[str] | None:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TABLE

    mtype = getattr(getattr(model, "config", None), "model_type", None)
    return list(TABLE[mtype]) if mtype in TABLE else None


def leaf_names(model) -> list[str]:
    """The distinct last parts of the names of the model's linear-like modules (what targets match)."""
    names = set()
    for name, module in model.named_modules():
        if name and not list(module.children()) and any(p.dim() == 2 for p in module.parameters(recurse=False)):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


def check_targets(model, targets: list[str]) -> None:
    """FtbenchError naming the model's module names when no target matches any of them."""
    if targets == ["all-linear"]:
        return
    have = leaf_names(model)
    if not set(targets) & set(have):
        mtype = getattr(getattr(model, "config", None), "model_type", "?")
        raise FtbenchError(f"tuning=lora: targets {'+'.join(targets)} match no module of this {mtype} model; its "
                           f"weight-bearing modules are {', '.join(have)}. Pass e.g. "
                           f"--tuning lora:targets={'+'.join(have[:2])}")


def resolve_targets(model, opts: dict) -> list[str] | str:
    targets = opts.get("targets") or default_targets(model)
    if not targets:
        mtype = getattr(getattr(model, "config", None), "model_type", "?")
        raise FtbenchError(f"tuning=lora: no default LoRA target modules are known for {mtype} models; name them "
                           f"with --tuning lora:targets=NAME+NAME (modules: {', '.join(leaf_names(model))})")
    check_targets(model, targets)
    return "all-linear" if targets == ["all-linear"] else targets


def apply_lora(model, opts: dict, head: str, kind: str):
    """``model`` with LoRA adapters injected; only adapters (and a classification head) train."""
    from peft import LoraConfig, TaskType, get_peft_model

    task_type = (TaskType.SEQ_CLS if head == "classification" else
                 TaskType.SEQ_2_SEQ_LM if kind == ENCODER_DECODER else TaskType.CAUSAL_LM)
    config = LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], lora_dropout=opts["dropout"],
                        target_modules=resolve_targets(model, opts), task_type=task_type)
    return get_peft_model(model, config).get_base_model()
