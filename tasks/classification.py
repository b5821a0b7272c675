"""``classification``: text -> label; metric accuracy (also macro-F1, ROC-AUC).

Examples are ``{"text": "...", "label": L}``.  Labels are integers (used as
class ids, so SST-2's 0/1 stay 0/1) or names (sorted, then numbered); digit
strings from a CSV count as integers.  The label set is read from the train
split, or given with ``--task classification:labels=neg|pos``; a label
outside it is a :class:`DataError` naming its file and line.

The model gets a sequence-classification head: the last token for decoder
models, ``[CLS]`` for encoder models.  ROC-AUC is reported for binary tasks
(positive class = id 1).

Built-in data is synthetic: seeded sentences about one of four topics, each
carrying one or two topic keywords among topic-neutral filler; the classes
are deliberately unbalanced so that the majority-class baseline is about
0.35, not 0.25.
"""

from __future__ import annotations

import random
import re

from ftbench import hookimpl, DECODER, ENCODER, DataError, EvalContext, Task

_TOPICS = {
    "sports": ["football", "goal", "match", "team", "coach", "score", "race", "tennis"],
    "food": ["soup", "bread", "cheese", "dinner", "recipe", "kitchen", "salad", "cake"],
    "weather": ["rain", "snow", "storm", "wind", "cloud", "sunshine", "fog", "thunder"],
    "music": ["guitar", "song", "concert", "piano", "drum", "singer", "band", "melody"],
}
_WEIGHTS = [0.35, 0.25, 0.2, 0.2]
_NAMES = ["anna", "ben", "carla", "david", "emma", "felix", "greta", "hugo"]
_FILLER = ["{name} talked about the {a} , the {b} and the {c} .", "the {a} , the {b} , the {c} !",
           "{name} : {a} {b} {c} .", "{a} and {b} and {c} , said {name} ."]


def synthetic_examples(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = list(_TOPICS)
    out = []
    for _ in range(n):
        topic = rng.choices(names, weights=_WEIGHTS)[0]
        a, b, c = rng.sample(_TOPICS[topic], 3)
        text = rng.choice(_FILLER).format(name=rng.choice(_NAMES), a=a, b=b, c=c)
        out.append({"text": text, "label": topic})
    return out


_INT = re.compile(r"-?\d+")
#: Integer labels are class ids, numbered from 0; a head of more classes than this is a data error
#: (a stray 10**12 would otherwise ask for a label set of a trillion entries).
MAX_CLASSES = 100_000


def label_value(value):
    """A label as given in the data: int, or a name; digit strings become ints."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip():
        v = value.strip()
        return int(v) if _INT.fullmatch(v) else v
    return None


class ClassificationTask(Task):
    """Single-label text classification with a sequence-classification head.

    Example::

        ftbench run --task classification --data shared/data/sst2 --model tiny-bert
    """

    name = "classification"
    description = "text -> label; accuracy, macro-F1 and (binary) ROC-AUC"
    metric = "accuracy"
    higher_is_better = True
    other_metrics = {"macro_f1": True, "roc_auc": True}
    model_kinds = (DECODER, ENCODER)
    head = "classification"
    fields = ("text", "label")

    def builtin_data(self, seed, options):
        return {"train": synthetic_examples(2000, seed), "validation": synthetic_examples(200, seed + 10_000)}

    def validate(self, example, where, options):
        super().validate(example, where, options)
        if not isinstance(example["text"], str):
            raise DataError(f"{where}: field 'text' must be a string, got {type(example['text']).__name__}")
        label = label_value(example["label"])
        if label is None or (isinstance(label, int) and label < 0):
            raise DataError(f"{where}: field 'label' must be a class id (integer >= 0) or a class name, "
                            f"got {example['label']!r}")

    def prepare(self, splits, options):
        from ftbench import where

        declared = options.get("labels")
        if declared is not None:
            names = [label_value(x) for x in str(declared).split("|")]
            label_set = names
        else:
            values = [label_value(r["label"]) for r in splits["train"]]
            ints = [v for v in values if isinstance(v, int)]
            if ints and len(ints) != len(values):
                i = next(i for i, v in enumerate(values) if not isinstance(v, int))
                raise DataError(f"{where(splits['train'], i)}: field 'label': {values[i]!r} is a name but other "
                                "labels are integer ids; use one or the other")
            if ints and max(ints) >= MAX_CLASSES:
                i = values.index(max(ints))
                raise DataError(f"{where(splits['train'], i)}: field 'label': {max(ints)} is not a usable class id; "
                                f"integer labels number the classes from 0 (at most {MAX_CLASSES:,} of them). Fix "
                                "the row, or give class names (--task classification:labels=A|B|...)")
            label_set = list(range(max(ints) + 1)) if ints else sorted(set(values))
        if all(isinstance(v, int) for v in label_set):
            ids = {v: v for v in label_set}  # integer labels are the class ids themselves
            n = int(options.get("num_labels") or max(label_set) + 1)
        else:
            ids = {v: i for i, v in enumerate(label_set)}
            n = int(options.get("num_labels") or len(label_set))
        for split, rows in splits.items():
            for i, row in enumerate(rows):
                v = label_value(row["label"])
                if v not in ids or ids[v] >= n:
                    shown = f"{label_set[:10]}"[:-1] + (", ...]" if len(label_set) > 10 else "]")
                    raise DataError(f"{where(rows, i)}: field 'label': {repr(row['label'])[:80]} is not in the "
                                    f"label set {shown} (read from the training rows the run reads, or "
                                    "set with --task classification:labels=A|B|...)")
        return {"num_labels": n, "label_ids": {str(k): v for k, v in ids.items()},
                "label_names": [str(x) for x in label_set]}

    def prompt_and_target(self, example, options):
        return example["text"], ""

    def label(self, example, options):
        return options["label_ids"][str(label_value(example["label"]))]

    def evaluate(self, ctx: EvalContext):
        from ftbench.tasks.metrics import classification

        probs = ctx.classify(ctx.examples)
        y_pred = [max(range(len(p)), key=p.__getitem__) for p in probs]
        y_true = [self.label(ex, ctx.options) for ex in ctx.examples]
        return {**classification(y_true, y_pred, ctx.options["num_labels"], probs), "eval_loss": ctx.eval_loss}


@hookimpl
def register_tasks(register):
    register(ClassificationTask())
