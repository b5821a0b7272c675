"""Task metrics against known values on hand-made predictions."""

from __future__ import annotations

import math

import pytest

from ftbench.harness.contract.api import EvalContext, FtbenchError
from ftbench.tasks import metrics


def test_bleu_and_chrf_perfect_and_disjoint():
    refs = ["die kleine katze sieht einen apfel .", "der hund frisst das brot ."]
    assert metrics.bleu(refs, refs) == pytest.approx(100.0)
    assert metrics.chrf(refs, refs) == pytest.approx(100.0)
    assert metrics.bleu(["xx yy zz qq", "vv ww uu tt"], refs) == pytest.approx(0.0, abs=1e-6)


def test_bleu_matches_a_hand_computation():
    # One 4-token hypothesis against a 4-token reference, 3 of 4 unigrams, 2 of 3
    # bigrams, 1 of 2 trigrams, 0 of 1 four-grams (smoothed to 1/2 by sacrebleu's
    # "exp" method): BLEU = exp(mean(log p_n)) with no brevity penalty.
    score = metrics.bleu(["a b c x"], ["a b c d"])
    expected = 100 * math.exp((math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 2)) / 4)
    assert score == pytest.approx(expected, rel=1e-6)


def test_rouge_perfect_partial_and_stemmed():
    assert metrics.rouge(["anna bought apples"], ["anna bought apples"]) == pytest.approx(
        {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0})
    # 2 of 3 words in common: precision 2/2, recall 2/3 -> F = 0.8.
    r = metrics.rouge(["anna apples"], ["anna bought apples"])
    assert r["rouge1"] == pytest.approx(0.8)
    assert r["rouge2"] == pytest.approx(0.0)
    assert r["rougeL"] == pytest.approx(0.8)
    assert metrics.rouge(["cats running"], ["cat runs"])["rouge1"] == pytest.approx(1.0)  # Porter stemming


def test_rouge_is_a_mean_over_examples():
    r = metrics.rouge(["a b", "x y"], ["a b", "c d"])
    assert r["rougeL"] == pytest.approx(0.5)


def test_classification_metrics():
    perfect = metrics.classification([0, 1, 1, 0], [0, 1, 1, 0], 2, probs=[[.9, .1], [.2, .8], [.4, .6], [.7, .3]])
    assert perfect == pytest.approx({"accuracy": 1.0, "macro_f1": 1.0, "roc_auc": 1.0})
    # Always predicting class 0 on [0, 0, 0, 1]: accuracy 3/4; F1 is 6/7 for class 0, 0 for class 1.
    maj = metrics.classification([0, 0, 0, 1], [0, 0, 0, 0], 2, probs=[[.6, .4]] * 4)
    assert maj["accuracy"] == pytest.approx(0.75)
    assert maj["macro_f1"] == pytest.approx((6 / 7) / 2)
    assert maj["roc_auc"] == pytest.approx(0.5)  # constant scores rank nothing


def test_classification_macro_f1_counts_absent_classes_and_skips_auc_when_not_binary():
    m = metrics.classification([0, 1, 2], [0, 1, 1], 4, probs=[[.25] * 4] * 3)
    assert m["accuracy"] == pytest.approx(2 / 3)
    # per-class F1: 1, 2/3, 0, 0 over 4 labels
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3) / 4)
    assert "roc_auc" not in m
    assert "roc_auc" not in metrics.classification([1, 1], [1, 1], 2, probs=[[.1, .9]] * 2)


def test_perplexity():
    assert metrics.perplexity(0.0) == 1.0
    assert metrics.perplexity(math.log(7)) == pytest.approx(7.0)
    assert metrics.perplexity(1e6) == float("inf")


def test_missing_metric_library_names_the_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # makes `import sacrebleu` raise ImportError
    with pytest.raises(FtbenchError, match="pip install sacrebleu"):
        metrics.bleu(["a"], ["a"])


def _ctx(examples, generated=None, probs=None, options=None, eval_loss=0.5):
    return EvalContext(model=None, tokenizer=None, model_kind="decoder", device="cpu", examples=examples,
                       eval_loss=eval_loss, options=options or {}, generate=lambda prompts: list(generated),
                       classify=(lambda rows: probs) if probs is not None else None)


def test_tasks_evaluate_perfect_predictions():
    """Each task's evaluate() on a context whose model answers perfectly."""
    from ftbench.tasks.classification import ClassificationTask
    from ftbench.tasks.dialogue import DialogueTask
    from ftbench.tasks.summarization import SummarizationTask
    from ftbench.tasks.translation import TranslationTask

    tr = [{"translation": {"en": "the small cat sees an apple .", "de": "die kleine katze sieht einen apfel ."}}]
    m = TranslationTask().evaluate(_ctx(tr, ["die kleine katze sieht einen apfel ."],
                                        options={"source": "en", "target": "de"}))
    assert m["bleu"] == pytest.approx(100) and m["chrf"] == pytest.approx(100)

    sm = [{"document": "it rained . anna bought apples .", "summary": "anna bought apples"}]
    assert SummarizationTask().evaluate(_ctx(sm, ["anna bought apples"]))["rougeL"] == pytest.approx(1.0)

    dl = [{"dialogue": ["thank you .", "you are welcome ."]}]
    m = DialogueTask().evaluate(_ctx(dl, ["you are welcome ."], options={"turn_sep": "\n"}, eval_loss=math.log(3)))
    assert m["chrf"] == pytest.approx(100) and m["perplexity"] == pytest.approx(3.0)

    task = ClassificationTask()
    cl = [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"}]
    opts = task.prepare({"train": cl, "validation": cl}, {})
    m = task.evaluate(_ctx(cl, probs=[[0.8, 0.2], [0.1, 0.9]], options=opts))
    assert m["accuracy"] == 1.0 and m["macro_f1"] == 1.0 and m["roc_auc"] == 1.0


def test_every_task_declares_its_metric_and_direction():
    from ftbench.harness.contract.registry import Registry

    want = {"generation": ("perplexity", False), "translation": ("bleu", True),
            "classification": ("accuracy", True), "summarization": ("rougeL", True),
            "dialogue": ("perplexity", False)}
    reg = Registry.load()
    for name, (metric, higher) in want.items():
        task = reg.task(name)
        assert (task.metric, task.higher_is_better) == (metric, higher)
