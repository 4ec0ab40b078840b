"""Per-user scores for every task kind: :func:`score` (task kind, predictions, golds) -> metrics.

classification (PEFT-U single-label tasks, LaMP-1, LaMP-2)
    ``accuracy`` and ``macro_f1`` from :mod:`fedpeft.metrics`: a prediction is correct when it is
    in the gold set (PEFT-U's rule; LaMP has one gold, so it is exact match), macro-F1 averages
    over the labels present in the golds or predictions of this user. Predictions and golds are
    stripped of surrounding whitespace, as LaMP's ``postprocess_text_classification``.
    LaMP's own F1 is corpus-level over its full label list; :func:`lamp_macro_f1` computes it on
    pooled predictions.
multilabel (PEFT-U studemo, goemotion ...)
    A prediction is a set of labels (a list, or a string "a, b" split on commas as PEFT-U's
    ``GetPredId`` does). It is reduced to one label as PEFT-U does: predicted labels outside
    ``labels`` (when given) are dropped; the first remaining predicted label that is gold is the
    prediction (correct); else the first remaining predicted label (wrong); else '' (no valid
    label: wrong). ``accuracy`` = share of examples whose prediction set meets the gold set (any
    overlap counts, PEFT-U's rule). ``macro_f1`` is over PEFT-U's (prediction, truth) pairs: truth
    = the prediction when correct, else the first gold label.
rating (LaMP-3)
    ``mae`` and ``rmse``. A prediction that does not parse as a number (LaMP's
    ``create_metric_mae_rmse``: ``float(x.strip())`` fails) counts as the rating farthest from
    the gold: 1 if |1 - gold| > |5 - gold|, else 5 (so a gold of 3 gives 5). Parsable numbers are
    used as they are, also outside 1..5 (as LaMP); unlike LaMP, 'nan'/'inf' count as unparsable.
generation (LaMP-4..7)
    ``rouge1`` and ``rougeL``: the mean over examples of the ROUGE F-measure from ``rouge_score``
    (RougeScorer without stemming and with its default tokenizer, the settings of Hugging Face
    ``evaluate``'s "rouge" that LaMP calls; several golds per example -> the best, as
    ``score_multi``). ``evaluate`` aggregates with a bootstrap and reports its median ("mid");
    the plain mean here is what that bootstrap estimates, equal for one example.

Corpus-level scores (:func:`corpus_scores`): LaMP reports its metrics over all questions pooled
(accuracy and its full-label-list F1, MAE and RMSE over all errors, mean ROUGE over all
questions), not as a mean over users; ``TaskSpec.corpus_metrics`` says when these are the
benchmark's headline. With one question per user the mean over users of per-user "RMSE" is the
MAE, and the mean of per-user F1s is not LaMP's F1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedpeft import metrics as M

if TYPE_CHECKING:
    from fedpeft.data import TaskSpec

KIND_METRICS = {
    "classification": ("accuracy", "macro_f1"),
    "multilabel": ("accuracy", "macro_f1"),
    "rating": ("mae", "rmse"),
    "generation": ("rouge1", "rougeL"),
}

Prediction = str | Sequence[str]


def _golds(golds: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[g.strip()] if isinstance(g, str) else [x.strip() for x in g] for g in golds]


def prediction_set(prediction: Prediction, split_commas: bool) -> list[str]:
    """A prediction as a list of labels: a string is one label (or comma-separated labels)."""
    if isinstance(prediction, str):
        parts = prediction.split(",") if split_commas else [prediction]
        return [p.strip() for p in parts if p.strip()]
    return [p.strip() for p in prediction if p.strip()]


def reduce_prediction(predicted: Sequence[str], gold: Sequence[str], labels: Sequence[str] | None = None) -> tuple[str, str]:
    """PEFT-U's GetPredId: (prediction, truth) for one example from a set of predicted labels."""
    valid = [p for p in predicted if labels is None or p in labels]
    first_gold = gold[0] if gold else ""
    for p in valid:
        if p in gold:
            return p, p
    return (valid[0] if valid else ""), first_gold


def peft_u_parse(decoded: str, labels: Sequence[str]) -> list[str]:
    """PEFT-U's lenient decoding of generated text into labels (``_lenient_decoded``).

    Split on commas; strip; remove the suffixes '.', "'", 'ing', 'ed', '"', ')' in that order;
    a piece that is a substring of a label becomes the first such label. (PEFT-U maps an empty
    piece to the first label, as '' is in every string; here it is dropped.)
    """
    out = []
    for piece in decoded.split(","):
        ret = piece.strip()
        for suffix in (".", "'", "ing", "ed", '"', ")"):
            ret = ret.removesuffix(suffix)
        if not ret:
            continue
        out.append(next((lb for lb in labels if ret in lb), ret))
    return out


def _rating(value: str) -> float | None:
    try:
        number = float(value.strip())
    except (ValueError, AttributeError):
        return None
    return number if math.isfinite(number) else None


def lamp_rating(prediction: str, gold: str) -> float:
    """LaMP-3's reading of a prediction; an unparsable one becomes the extreme farthest from gold."""
    number = _rating(prediction)
    if number is not None:
        return number
    y = float(gold)
    return 1.0 if abs(1 - y) > abs(5 - y) else 5.0


def score(kind: str, predictions: Sequence[Prediction], golds: Sequence[str | Sequence[str]],
          labels: Sequence[str] | None = None) -> dict[str, float]:
    """Metric name -> value for one user's predictions against its golds (see the module doc).

    ``golds`` are gold strings or sequences of gold strings (``Example.labels``); ``labels`` is
    the task's label list, used by multilabel scoring to drop predicted labels outside it.
    """
    if kind not in KIND_METRICS:
        raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(KIND_METRICS)}")
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds")
    if not predictions:
        raise ValueError("scores of zero examples are undefined")
    gold_lists = _golds(golds)
    if kind in ("classification", "multilabel"):
        if kind == "classification" and all(isinstance(p, str) for p in predictions):
            preds = [p.strip() for p in predictions]
            return {"accuracy": M.accuracy(preds, gold_lists), "macro_f1": M.macro_f1(preds, gold_lists)}
        pairs = [reduce_prediction(prediction_set(p, split_commas=kind == "multilabel"), g, labels) for p, g in zip(predictions, gold_lists)]
        preds = [p for p, _ in pairs]
        return {"accuracy": M.accuracy(preds, gold_lists), "macro_f1": M.macro_f1(preds, [[t] for _, t in pairs])}
    if kind == "rating":
        errors = []
        for p, g in zip(predictions, gold_lists):
            gold = float(g[0])
            errors.append(lamp_rating(p if isinstance(p, str) else ",".join(p), g[0]) - gold)
        return {"mae": float(sum(abs(e) for e in errors) / len(errors)),
                "rmse": float(math.sqrt(sum(e * e for e in errors) / len(errors)))}
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    r1 = rl = 0.0
    for p, g in zip(predictions, gold_lists):
        text = p.strip() if isinstance(p, str) else " ".join(p).strip()
        result = scorer.score_multi(g, text)
        r1 += result["rouge1"].fmeasure
        rl += result["rougeL"].fmeasure
    n = len(predictions)
    return {"rouge1": r1 / n, "rougeL": rl / n}


def lamp_macro_f1(predictions: Sequence[str], golds: Sequence[str], labels: Sequence[str]) -> float:
    """LaMP's corpus-level F1 for LaMP-1/2 (eval/evaluation.py): predictions outside ``labels``
    map to -1, and F1 is averaged over *every* label of the list (0 for a label never gold nor
    predicted), as ``evaluate``'s f1 with ``labels=range(len(labels)), average="macro"``."""
    index = {lb: i for i, lb in enumerate(labels)}
    p = [index.get(x.strip(), -1) for x in predictions]
    g = [index.get(x.strip(), -1) for x in golds]
    scores = []
    for i in range(len(labels)):
        tp = sum(a == i and b == i for a, b in zip(p, g))
        fp = sum(a == i and b != i for a, b in zip(p, g))
        fn = sum(a != i and b == i for a, b in zip(p, g))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def corpus_scores(task: TaskSpec, predictions: Sequence[Prediction], golds: Sequence[str | Sequence[str]]) -> dict[str, float]:
    """The task's metrics (``task.metrics``) over all questions pooled, as LaMP reports them.

    ``predictions`` and ``golds`` are every evaluated user's predictions and golds concatenated
    (users in any order; ``golds[i]`` is the gold list of ``predictions[i]``). Classification: accuracy (gold-set rule, exact
    match for LaMP's one gold) and :func:`lamp_macro_f1` over the full label list ``task.labels``
    against the first gold; rating: MAE and RMSE over all errors; generation (and multilabel): the
    per-example scores of :func:`score` averaged over all examples.
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds; pass one gold list per "
                         "prediction, pooled over users in the same order")
    if not predictions:
        raise ValueError("corpus scores of zero questions are undefined; pass every evaluated user's predictions")
    pooled = score(task.kind, predictions, golds, labels=task.labels or None)
    if task.kind == "classification" and task.labels:
        flat = [p if isinstance(p, str) else ",".join(p) for p in predictions]
        pooled["macro_f1"] = lamp_macro_f1(flat, [g[0] for g in _golds(golds)], task.labels)
    missing = [m for m in task.metrics if m not in pooled]
    if missing:
        raise ValueError(f"task metrics {missing} have no corpus-level form; known for kind '{task.kind}': {sorted(pooled)}")
    return {m: float(pooled[m]) for m in task.metrics}
