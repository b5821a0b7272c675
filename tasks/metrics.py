"""Metric helpers shared by the task plugins.

Each helper imports its library when called, so a missing optional package
(``pip install 'ftbench[metrics]'``) fails only the cell that needs it, with
an install hint, and never the import of the other tasks.

Scores follow the scale their field reports: BLEU and chrF in 0-100
(sacrebleu), ROUGE and classification scores in 0-1.
"""

from __future__ import annotations

import importlib
import math
from typing import Sequence

from ftbench import FtbenchError


def _need(module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise FtbenchError(f"this task's metrics need {package}: pip install {package} "
                           "(or pip install 'ftbench[metrics]')") from None


def perplexity(loss: float) -> float:
    """``exp(loss)``, infinite rather than an overflow for a diverged model."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenization, exp smoothing), 0-100."""
    sacrebleu = _need("sacrebleu", "sacrebleu")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def chrf(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus chrF (sacrebleu defaults: character 6-grams, beta 2), 0-100."""
    sacrebleu = _need("sacrebleu", "sacrebleu")
    return float(sacrebleu.corpus_chrf(list(predictions), [list(references)]).score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (rouge-score, Porter stemming), 0-1.

    Example: ``rouge(["the cat sat"], ["the cat sat"])["rougeL"] == 1.0``.
    """
    rouge_scorer = _need("rouge_score.rouge_scorer", "rouge-score")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        for name, score in scorer.score(ref, pred).items():
            totals[name] += score.fmeasure
    n = max(1, len(predictions))
    return {name: total / n for name, total in totals.items()}


def classification(y_true: Sequence[int], y_pred: Sequence[int], num_labels: int,
                   probs: Sequence[Sequence[float]] | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 over all ``num_labels`` classes; ROC-AUC too when
    the task is binary, probabilities are given and both classes occur.

    Example: ``classification([0, 1], [0, 1], 2)["accuracy"] == 1.0``.
    """
    skm = _need("sklearn.metrics", "scikit-learn")
    labels = list(range(num_labels))
    out = {"accuracy": float(skm.accuracy_score(y_true, y_pred)),
           # zero_division=0: a class never predicted nor present scores 0, not a warning.
           "macro_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))}
    if num_labels == 2 and probs is not None and len(set(y_true)) == 2:
        out["roc_auc"] = float(skm.roc_auc_score(y_true, [p[1] for p in probs]))
    return out
