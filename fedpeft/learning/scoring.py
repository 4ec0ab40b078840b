"""Per-user scores for every task kind: :func:`score` (task kind, predictions, golds) -> metrics.

classification (PEFT-U single-label tasks, LaMP-1, LaMP-2)
    ``accuracy`` and ``macro_f1`` from :mod:`fedpeft.learning.metrics`: a prediction is correct when it is
    in the gold set (PEFT-U's rule; LaMP has one gold, so it is exact match), macro-F1 averages
    over the labels present in the golds or predictions of this user. Predictions and golds are
    stripped of surrounding whitespace, as LaMP's ``postprocess_text_classification``. A
    prediction given as a list of labels is read as its top label (:func:`top_label`).
    LaMP's own F1 is corpus-level over its full label list; :func:`lamp_macro_f1` computes it on
    pooled predictions.
multilabel (PEFT-U studemo, goemotion ...)
    A prediction is an ordered list of labels, most confident first (a list, or a string "a, b"
    split on commas as PEFT-U's ``GetPredId`` does): the encoder lists its labels by decreasing
    logit, a text-to-text model in the order it generated them. Predicted labels outside
    ``labels`` (when given) are dropped, and repeats; what is left is the *valid* prediction P
    (possibly empty); G is the gold set. Per user, averaged over its examples:

    - ``accuracy`` (the headline): the *top label* (the first valid predicted label) is in G. An
      example without a valid label is wrong. Adding labels after the top one never raises it.
    - ``macro_f1``: :func:`fedpeft.learning.metrics.macro_f1` over (top label, truth) pairs, truth = the
      top label when it is gold, else the first gold label; '' (no valid label) is a wrong
      prediction of its own label ''. Only the top label counts, so extra labels do not raise it.
    - ``example_f1``: 2|P ∩ G| / (|P| + |G|); 0 when P is empty.
    - ``jaccard``: |P ∩ G| / |P ∪ G|; 0 when P is empty.
      (Each predicted label that is not gold lowers these two; each gold one found raises them,
      so where gold sets are large a constant set of frequent labels beats one label on them.)
    - ``accuracy_any``: PEFT-U's lenient rule, correct when any label of P is in G (so predicting
      every label scores 1.0; reported for comparison with PEFT-U, never the headline).
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

from fedpeft.learning import metrics as M
from fedpeft.tasks import KIND_METRICS, TaskSpec

Prediction = str | Sequence[str]


def _golds(golds: Sequence[str | Sequence[str]]) -> list[list[str]]:
    return [[g.strip()] if isinstance(g, str) else [x.strip() for x in g] for g in golds]


def prediction_set(prediction: Prediction, split_commas: bool) -> list[str]:
    """A prediction as a list of labels: a string is one label (or comma-separated labels)."""
    if isinstance(prediction, str):
        parts = prediction.split(",") if split_commas else [prediction]
        return [p.strip() for p in parts if p.strip()]
    return [p.strip() for p in prediction if p.strip()]


def valid_labels(predicted: Sequence[str], labels: Sequence[str] | None = None) -> list[str]:
    """The predicted labels that are in ``labels`` (all of them when ``labels`` is None), in
    predicted order, each once."""
    known = None if labels is None else set(labels)
    return list(dict.fromkeys(p for p in predicted if known is None or p in known))


def top_label(predicted: Sequence[str], labels: Sequence[str] | None = None) -> str:
    """The most confident valid label of a prediction list (its first valid one), '' when none."""
    valid = valid_labels(predicted, labels)
    return valid[0] if valid else ""


def multilabel_scores(predicted: Sequence[Sequence[str]], golds: Sequence[Sequence[str]],
                      labels: Sequence[str] | None = None) -> dict[str, float]:
    """The multilabel metrics (see the module doc) of one user's prediction lists, most
    confident label first, against its gold label lists."""
    valid = [valid_labels(p, labels) for p in predicted]
    top = [v[0] if v else "" for v in valid]
    example_f1, jaccard, any_hit = [], [], []
    for v, g in zip(valid, golds, strict=True):
        p_set, g_set = set(v), set(g)
        hits = len(p_set & g_set)
        example_f1.append(2 * hits / (len(p_set) + len(g_set)) if p_set else 0.0)
        jaccard.append(hits / len(p_set | g_set) if p_set else 0.0)
        any_hit.append(hits > 0)
    truths = [[t] if t in g else list(g[:1]) for t, g in zip(top, golds)]
    n = len(valid)
    return {"accuracy": M.accuracy(top, golds), "macro_f1": M.macro_f1(top, truths),
            "example_f1": sum(example_f1) / n, "jaccard": sum(jaccard) / n, "accuracy_any": sum(any_hit) / n}


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
    the task's label list, used to drop predicted labels outside it from a prediction list
    (multilabel, or a classification prediction given as a list). The keys are
    ``KIND_METRICS[kind]``, in that order.
    """
    if kind not in KIND_METRICS:
        raise ValueError(f"unknown task kind {kind!r}; known: {', '.join(KIND_METRICS)}")
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds")
    if not predictions:
        raise ValueError("scores of zero examples are undefined")
    gold_lists = _golds(golds)
    if kind == "multilabel":
        return multilabel_scores([prediction_set(p, split_commas=True) for p in predictions], gold_lists, labels)
    if kind == "classification":
        preds = [p.strip() if isinstance(p, str) else top_label(prediction_set(p, split_commas=False), labels)
                 for p in predictions]
        return {"accuracy": M.accuracy(preds, gold_lists), "macro_f1": M.macro_f1(preds, gold_lists)}
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
    against the first gold; rating: MAE and RMSE over all errors; generation: the per-example
    scores of :func:`score` averaged over all examples; multilabel: :func:`multilabel_scores` of
    all examples pooled (its per-example scores averaged over all examples, macro-F1 over the
    pooled (top label, truth) pairs).
    """
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} golds; pass one gold list per "
                         "prediction, pooled over users in the same order")
    if not predictions:
        raise ValueError("corpus scores of zero questions are undefined; pass every evaluated user's predictions")
    pooled = score(task.kind, predictions, golds, labels=task.labels or None)
    if task.kind == "classification" and task.labels:
        flat = [p if isinstance(p, str) else top_label(prediction_set(p, split_commas=False), task.labels)
                for p in predictions]
        pooled["macro_f1"] = lamp_macro_f1(flat, [g[0] for g in _golds(golds)], task.labels)
    missing = [m for m in task.metrics if m not in pooled]
    if missing:
        raise ValueError(f"task metrics {missing} have no corpus-level form; known for kind '{task.kind}': {sorted(pooled)}")
    return {m: float(pooled[m]) for m in task.metrics}
