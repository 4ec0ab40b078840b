"""Single-label scores of one user, and their summary over users.

:func:`accuracy` and :func:`macro_f1` score one predicted label per example against a gold label
set; :mod:`fedpeft.learning.scoring` reduces each task kind's predictions to that (a multi-label
prediction to its most confident valid label) and adds the multi-label set metrics.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LOWER_IS_BETTER = frozenset({"mae", "rmse"})


def gain(metric: str, value: float, baseline: float) -> float:
    """How much better ``value`` is than ``baseline`` (positive = better) for ``metric``."""
    return baseline - value if metric in LOWER_IS_BETTER else value - baseline


def accuracy(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    """Share of examples whose (single) predicted label is in the gold label set (PEFT-U's rule
    for one predicted label)."""
    if not predictions:
        raise ValueError("accuracy of zero examples is undefined")
    return float(np.mean([p in set(g) for p, g in zip(predictions, golds, strict=True)]))


def macro_f1(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
    """Unweighted mean F1 over the labels that occur in the golds or the predictions.

    A prediction counts as a true positive for its label when that label is in the gold set.
    """
    labels = sorted({p for p in predictions} | {label for g in golds for label in g})
    scores = []
    for label in labels:
        tp = sum(p == label and label in g for p, g in zip(predictions, golds, strict=True))
        fp = sum(p == label and label not in g for p, g in zip(predictions, golds, strict=True))
        fn = sum(p != label and label in g for p, g in zip(predictions, golds, strict=True))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores)) if scores else 0.0


def summarize(values: Sequence[float], num_failed: int = 0) -> dict[str, float]:
    """Mean, median, 10th percentile and minimum over users, with counts."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return {"mean": float("nan"), "median": float("nan"), "p10": float("nan"), "min": float("nan"),
                "n_evaluated": 0, "n_failed": num_failed}
    return {
        "mean": float(arr.mean()),
        "median": float(np.median(arr)),
        "p10": float(np.percentile(arr, 10)),
        "min": float(arr.min()),
        "n_evaluated": int(arr.size),
        "n_failed": int(num_failed),
    }
