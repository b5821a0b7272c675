"""``generation``: causal language modelling; metric perplexity (lower is better).

Built-in data is synthetic: sentences from a small seeded grammar with
agreement rules (a plural subject takes a plural verb, each animal its own
sound), so a tiny model's perplexity falls clearly within 50 steps.
"""

from __future__ import annotations

import random

from ftbench import hookimpl, DECODER, Task

_ANIMALS = {"cat": "meows", "dog": "barks", "cow": "moos", "duck": "quacks", "owl": "hoots", "lion": "roars"}
_ADJ = ["small", "old", "happy", "quiet", "brown", "clever", "lazy", "young"]
_PLACES = ["in the barn", "on the hill", "by the river", "at night", "near the house", "under the tree"]


def synthetic_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        animal = rng.choice(list(_ANIMALS))
        sound = _ANIMALS[animal]
        adj = rng.choice(_ADJ)
        place = rng.choice(_PLACES)
        if rng.random() < 0.5:
            out.append(f"the {adj} {animal} {sound} {place}.")
        else:
            out.append(f"the {adj} {animal}s {sound[:-1]} {place}.")
    return out


class GenerationTask(Task):
    """Causal language modelling on ``{"text": ...}`` examples."""

    name = "generation"
    description = "causal language modelling; perplexity on the validation split"
    metric = "perplexity"
    higher_is_better = False
    model_kinds = (DECODER,)
    fields = ("text",)

    def builtin_data(self, seed, options):
        return {"train": [{"text": t} for t in synthetic_sentences(2000, seed)],
                "validation": [{"text": t} for t in synthetic_sentences(200, seed + 10_000)]}

    def validate(self, example, where, options):
        super().validate(example, where, options)
        if not isinstance(example["text"], str):
            from ftbench import DataError

            raise DataError(f"{where}: field 'text' must be a string, got {type(example['text']).__name__}")

    def prompt_and_target(self, example, options):
        return "", example["text"]


@hookimpl
def register_tasks(register):
    register(GenerationTask())
