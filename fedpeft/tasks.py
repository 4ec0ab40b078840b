"""What a benchmark's examples ask for and how they are scored: the task kinds, :class:`TaskSpec`
and each kind's metrics.

The bottom layer of the data side: it imports nothing of fedpeft, so :mod:`fedpeft.learning.scoring`
and the benchmarks in :mod:`fedpeft.data` (which re-exports ``TaskSpec`` and ``TASK_KINDS``) both
build on it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TASK_KINDS = ("classification", "multilabel", "rating", "generation")

# Each kind's metrics, in the order a task lists them; the first is the headline.
KIND_METRICS = {
    "classification": ("accuracy", "macro_f1"),
    "multilabel": ("accuracy", "macro_f1", "example_f1", "jaccard", "accuracy_any"),
    "rating": ("mae", "rmse"),
    "generation": ("rouge1", "rougeL"),
}


@dataclass(frozen=True)
class TaskSpec:
    """What a user's examples ask for and how predictions are scored.

    kind: "classification" (one label), "multilabel" (a set of labels), "rating" (ordinal labels
    that parse as numbers, scored by MAE/RMSE), "generation" (free text, scored by ROUGE).
    corpus_metrics: whether the benchmark's headline scores are corpus-level, computed over all
    questions pooled (LaMP: :func:`fedpeft.learning.scoring.corpus_scores`), rather than the unweighted
    mean over users of per-user scores (PEFT-U, synthetic).
    """

    kind: str
    labels: tuple[str, ...]
    metrics: tuple[str, ...] = field(default=("accuracy", "macro_f1"))
    corpus_metrics: bool = False
