"""``dialogue``: a multi-turn conversation -> its next response.

Examples are ``{"dialogue": ["turn 1", "turn 2", ...]}`` (DailyDialog's
layout): the last turn is the response, the turns before it the context,
joined one per line.  A CSV cell holds the turns as one string split on
``turn_sep`` (default: a newline; ``--task dialogue:turn_sep=__eou__`` for
DailyDialog's raw text).  The loss covers the response tokens only; for
decoder models the oldest turns are cut first when the context is too long.

Metrics: ``perplexity`` of the response tokens (primary, lower is better),
and chrF of greedy responses.

Built-in data is synthetic: seeded chats of one to three exchanges built
from a few intents (greeting with a name, favourite things, the weather in
a city, thanks); each answer is a fixed function of the last turn, e.g.
"what is your favourite fruit ?" -> "my favourite fruit is the mango .".
"""

from __future__ import annotations

import random

from ftbench import hookimpl, DECODER, ENCODER_DECODER, DataError, EvalContext, Task

_NAMES = ["anna", "ben", "carla", "david", "emma", "felix", "greta", "hugo"]
_FAVOURITES = {"fruit": "mango", "colour": "green", "animal": "otter", "season": "autumn", "sport": "rowing",
               "drink": "tea"}
_WEATHER = {"london": "rainy", "cairo": "hot", "oslo": "snowy", "lima": "cloudy", "rome": "sunny",
            "tokyo": "windy"}


def _exchange(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    if kind == 0:
        name = rng.choice(_NAMES)
        return f"hello , my name is {name} .", f"nice to meet you , {name} ."
    if kind == 1:
        thing = rng.choice(list(_FAVOURITES))
        return f"what is your favourite {thing} ?", f"my favourite {thing} is the {_FAVOURITES[thing]} ."
    if kind == 2:
        city = rng.choice(list(_WEATHER))
        return f"how is the weather in {city} ?", f"it is {_WEATHER[city]} in {city} today ."
    return rng.choice(["thank you .", "thanks a lot .", "thank you very much ."]), "you are welcome ."


def synthetic_dialogues(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns: list[str] = []
        for _ in range(rng.randint(1, 3)):
            turns.extend(_exchange(rng))
        out.append({"dialogue": turns})
    return out


class DialogueTask(Task):
    """Next-response generation in multi-turn chats.

    Example::

        ftbench run --task dialogue --data shared/data/dailydialog --seq-len 128
    """

    name = "dialogue"
    description = "multi-turn context -> next response; response perplexity and chrF"
    metric = "perplexity"
    higher_is_better = False
    other_metrics = {"chrf": True}
    model_kinds = (DECODER, ENCODER_DECODER)
    fields = ("dialogue",)
    defaults = {"max_new_tokens": 16, "turn_sep": "\n"}

    def builtin_data(self, seed, options):
        return {"train": synthetic_dialogues(2000, seed), "validation": synthetic_dialogues(200, seed + 10_000)}

    def turns(self, example: dict, options: dict) -> list[str]:
        turns = example["dialogue"]
        if isinstance(turns, str):
            turns = turns.split(options.get("turn_sep", "\n"))
        return [t.strip() for t in turns if t.strip()]

    def validate(self, example, where, options):
        super().validate(example, where, options)
        turns = example["dialogue"]
        if not isinstance(turns, (list, str)) or (isinstance(turns, list)
                                                   and not all(isinstance(t, str) for t in turns)):
            raise DataError(f"{where}: field 'dialogue' must be a list of turns (strings), "
                            f"got {type(turns).__name__}")
        if len(self.turns(example, options)) < 2:
            raise DataError(f"{where}: field 'dialogue' needs at least two non-empty turns (a context and a "
                            "response)")

    def prompt_and_target(self, example, options):
        turns = self.turns(example, options)
        return "\n".join(turns[:-1]), turns[-1]

    def evaluate(self, ctx: EvalContext):
        from ftbench.tasks.metrics import chrf, perplexity

        contexts, refs = zip(*(self.prompt_and_target(ex, ctx.options) for ex in ctx.examples))
        return {"perplexity": perplexity(ctx.eval_loss), "chrf": chrf(ctx.generate(list(contexts)), refs),
                "eval_loss": ctx.eval_loss}


@hookimpl
def register_tasks(register):
    register(DialogueTask())
