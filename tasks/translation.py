"""``translation``: source sentence -> target sentence; metric BLEU (sacrebleu).

Examples are ``{"translation": {"en": "...", "de": "..."}}``.  The language
pair is read from the data (the keys of the first training example, in
order); ``--task translation:source=de,target=en`` picks the direction.  A
CSV with one column per language maps them with
``--column translation.en=english --column translation.de=german``.

BLEU and chrF are corpus-level scores of greedy translations of the
validation split (``--eval-examples`` of them), 0-100.

Built-in data is synthetic: seeded English sentences from one template
(adjective, animal, verb, object, optional place) and their word-for-word
German rendering.  Word order is kept so that a tiny model learns the
dictionary within the default 50 steps; the German vocabulary is disjoint
from the English one, so copying the source (the trivial baseline) scores
almost nothing.
"""

from __future__ import annotations

import random

from ftbench import hookimpl, DECODER, ENCODER_DECODER, DataError, EvalContext, Task

_ADJ = {"small": "kleine", "old": "alte", "happy": "frohe", "brown": "braune", "young": "junge",
        "lazy": "faule"}
_ANIMAL = {"cat": "katze", "dog": "hund", "cow": "kuh", "duck": "ente", "horse": "pferd", "mouse": "maus",
           "bird": "vogel", "fox": "fuchs"}
_VERB = {"sees": "sieht", "eats": "frisst", "finds": "findet", "wants": "will", "likes": "mag", "hears": "hoert"}
_OBJECT = {"an apple": "einen apfel", "a bone": "einen knochen", "the ball": "den ball", "a fish": "einen fisch",
           "the bread": "das brot", "the hat": "den hut", "a stick": "einen stock", "the cheese": "den kaese"}
_PLACE = {"": "", "today": "heute", "at home": "zu hause", "in the garden": "im garten"}
_SLOTS = (_ADJ, _ANIMAL, _VERB, _OBJECT, _PLACE)


def synthetic_pairs(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` distinct English-German pairs, none of whose English side is in ``exclude``."""
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        words = [rng.choice(list(d)) for d in _SLOTS]
        en = " ".join(w for w in ["the", *words] if w) + " ."
        if en in seen:
            continue
        seen.add(en)
        de = " ".join(w for w in ["die", *(d[w] for d, w in zip(_SLOTS, words))] if w) + " ."
        out.append({"translation": {"en": en, "de": de}})
    return out


class TranslationTask(Task):
    """Sentence translation scored with corpus BLEU and chrF.

    Example::

        ftbench run --task translation:source=de,target=en --data DIR --backend eager
    """

    name = "translation"
    description = "source -> target sentence; BLEU and chrF (sacrebleu) of greedy translations"
    metric = "bleu"
    higher_is_better = True
    other_metrics = {"chrf": True, "perplexity": False}
    # Encoder-decoder first: in the default 50 steps a tiny T5 learns the built-in
    # dictionary, a tiny GPT-2 barely gets past word frequencies (BLEU ~2 vs ~20).
    model_kinds = (ENCODER_DECODER, DECODER)
    fields = ("translation",)
    defaults = {"max_new_tokens": 24}

    def builtin_data(self, seed, options):
        train = synthetic_pairs(2000, seed)
        validation = synthetic_pairs(200, seed + 10_000, exclude={r["translation"]["en"] for r in train})
        return {"train": train, "validation": validation}

    def validate(self, example, where, options):
        super().validate(example, where, options)
        pair = example["translation"]
        if not isinstance(pair, dict):
            raise DataError(f"{where}: field 'translation' must be an object like "
                            f'{{"en": "...", "de": "..."}}, got {type(pair).__name__}')
        for lang in (options.get("source"), options.get("target")):
            if lang is not None and lang not in pair:
                raise DataError(f"{where}: missing field 'translation.{lang}' (languages here: {sorted(pair)})")
        for lang, text in pair.items():
            if not isinstance(text, str):
                raise DataError(f"{where}: field 'translation.{lang}' must be a string, got {type(text).__name__}")

    def prepare(self, splits, options):
        from ftbench import where

        train = splits["train"]
        langs = list(train[0]["translation"])
        source, target = options.get("source"), options.get("target")
        if source is None or target is None:
            given = source if source is not None else target
            others = [lang for lang in langs if lang != given]
            if len(others) != (1 if given is not None else 2):
                raise DataError(f"{where(train, 0)}: field 'translation' has languages {langs}; choose the "
                                "direction with --task translation:source=LANG,target=LANG")
            if given is None:
                source, target = others
            elif source is None:
                source = others[0]
            else:
                target = others[0]
        if source == target:
            raise DataError(f"{where(train, 0)}: source and target are both {source!r}; "
                            "set --task translation:source=LANG,target=LANG")
        for rows in splits.values():
            for i, row in enumerate(rows):
                for lang in (source, target):
                    if lang not in row["translation"]:
                        raise DataError(f"{where(rows, i)}: missing field 'translation.{lang}' "
                                        f"(translating {source} -> {target})")
        return {"source": source, "target": target}

    def prompt_and_target(self, example, options):
        pair = example["translation"]
        return pair[options["source"]], pair[options["target"]]

    def evaluate(self, ctx: EvalContext):
        from ftbench.tasks.metrics import bleu, chrf, perplexity

        sources, refs = zip(*(self.prompt_and_target(ex, ctx.options) for ex in ctx.examples))
        preds = ctx.generate(list(sources))
        return {"bleu": bleu(preds, refs), "chrf": chrf(preds, refs), "eval_loss": ctx.eval_loss,
                "perplexity": perplexity(ctx.eval_loss)}


@hookimpl
def register_tasks(register):
    register(TranslationTask())
