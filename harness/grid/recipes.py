"""Recipe defaults by model origin: training from scratch or fine-tuning.

The built-in presets are randomly initialised and tiny: they learn in 50
steps only with a large learning rate (``Recipe``'s own defaults: 3e-3,
cosine).  The same rate wrecks a pretrained checkpoint within a few steps, so
a model given as a local directory or a hub id gets the fine-tuning recipe
of Hugging Face ``Trainer``'s defaults (``TrainingArguments``): AdamW at
5e-5, linear decay to zero, no warmup, no weight decay, clipping at 1.0.
Adapters train a few fresh, zero-initialised parameters and need a larger
rate: a LoRA cell on a checkpoint starts from 2e-4, the QLoRA paper's rate
and the one peft's and TRL's LoRA examples use (docs/fine-tuning.md says
why this one).

Only settings the user left unset take these defaults; a flag, a grid
``settings:`` entry or a swept value always wins.  The recipe's
``recipe_defaults`` field says which table applied and is part of the
fingerprint, as are the values themselves.

Example::

    recipe = defaults_for_model(Recipe(), explicit={"steps"}, pretrained=True)
    recipe.lr, recipe.schedule, recipe.recipe_defaults   # 5e-05, 'linear', 'pretrained'
"""

from __future__ import annotations

from dataclasses import replace

from ftbench.harness.contract.lora_options import is_lora

#: Hugging Face TrainingArguments' defaults for the settings that differ from ours.
PRETRAINED_DEFAULTS = {"lr": 5e-5, "schedule": "linear", "lr_warmup_steps": 0, "weight_decay": 0.0}
#: The learning rate of adapter scopes (LoRA) on a checkpoint; docs/fine-tuning.md.
ADAPTER_LR = 2e-4


def defaults_for_model(recipe, explicit, pretrained: bool):
    """``recipe`` with the defaults of the model's origin in every setting not in ``explicit``."""
    if "recipe_defaults" not in explicit:
        recipe = replace(recipe, recipe_defaults="pretrained" if pretrained else "scratch")
    if recipe.recipe_defaults != "pretrained":
        return recipe
    table = {**PRETRAINED_DEFAULTS, "lr": ADAPTER_LR} if is_lora(recipe.tuning) else PRETRAINED_DEFAULTS
    return replace(recipe, **{k: v for k, v in table.items() if k not in explicit})


def is_pretrained(model: str, registry) -> bool:
    """A model that is not a registered preset is a checkpoint (local directory or hub id)."""
    return model not in registry.models
