"""Each user's majority label: the constant prediction that personalization must beat.

A user predicts, for every test example, its most frequent label in its own training split (ties:
the label seen first), and is scored by :func:`fedpeft.learning.scoring.score`, the runs' own scoring, so
the numbers compare with theirs. The training split is the one the runs train on:
:func:`fedpeft.data.get_benchmark` applies ``data.max_train_per_user``'s seeded cap and any user
selection of the benchmark's ``data.*`` keys. Multi-label tasks: every label of every training
example counts once, and the single most frequent label is scored by the same top-1 headline as a
model's most confident label. Generation tasks have no label to count: no majority. A corpus-level
benchmark (LaMP) is scored on the pooled predictions (:func:`fedpeft.learning.scoring.corpus_scores`), as
its runs are. Used by the comparison (fedpeft/study/majority_row.py) and by
``sims/majority_baseline.py``: one computation.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from fedpeft.config import Config
from fedpeft.data import Example, TaskSpec, get_benchmark
from fedpeft.learning.scoring import corpus_scores, score


class NoMajority(ValueError):
    """The majority baseline cannot be computed here (the message says why)."""


def majority_guess(train: list[Example], task: TaskSpec, top_k: int | None = 1) -> list[str]:
    """A user's constant prediction: its ``top_k`` most frequent training labels, most frequent
    first (ties: first seen); ``None``: those, then the task's other labels in the task's order."""
    ranked = [label for label, _ in Counter(label for ex in train for label in ex.labels).most_common()]
    if top_k is None:
        return ranked + [label for label in task.labels if label not in ranked]
    return ranked[:top_k]


@dataclass
class Majority:
    """Per user: its scores (metric -> value), and its predictions and golds (for corpus scores)."""

    task: TaskSpec
    per_user: dict[str, dict[str, float]] = field(default_factory=dict)
    predictions: dict[str, list[list[str]]] = field(default_factory=dict)
    golds: dict[str, list[list[str]]] = field(default_factory=dict)
    n_train: dict[str, int] = field(default_factory=dict)

    def headline(self, users: Iterable[str], metric: str) -> float:
        """Over ``users``: the mean of per-user scores, or the corpus score of their pooled
        predictions where the task's headline is corpus-level; NaN for no users."""
        users = list(users)
        if not users:
            return math.nan
        if self.task.corpus_metrics:
            preds = [p for u in users for p in self.predictions[u]]
            return float(corpus_scores(self.task, preds, [g for u in users for g in self.golds[u]])[metric])
        return math.fsum(self.per_user[u][metric] for u in users) / len(users)


def majority(config: Config, users: Iterable[str] | None = None, top_k: int | None = 1) -> Majority:
    """Every user of ``users`` (default: all of the benchmark's) scored on its test split when it
    predicts :func:`majority_guess` of its own training split. Raises :class:`NoMajority` for a
    generation task or a user the benchmark does not have."""
    bench = get_benchmark(config)
    task = bench.task()
    if task.kind == "generation":
        raise NoMajority(f"{config.data.benchmark} is a generation task: there is no label to take the majority of")
    index = {user_id: i for i, user_id in enumerate(bench.user_ids())}
    wanted = list(index) if users is None else list(users)
    unknown = [u for u in wanted if u not in index]
    if unknown:
        raise NoMajority(f"{len(unknown)} user(s) ({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}) are not "
                         f"users of data.benchmark={config.data.benchmark} with this data config")
    out = Majority(task)
    for user_id in wanted:
        user = bench.load_user(index[user_id])
        if not user.test:
            raise NoMajority(f"user {user_id} has no test examples to score")
        guess = majority_guess(user.train, task, top_k)
        golds = [list(ex.labels) for ex in user.test]
        out.predictions[user_id], out.golds[user_id] = [guess] * len(golds), golds
        out.per_user[user_id] = score(task.kind, out.predictions[user_id], golds, labels=task.labels or None)
        out.n_train[user_id] = len(user.train)
    return out


def user_groups(config: Config) -> dict[str, str]:
    """Each user of the benchmark -> ``trained`` or ``new`` (``data.new_users``: the runs' own draw)."""
    from fedpeft.data.user_groups import new_user_indices

    ids = get_benchmark(config).user_ids()
    new = set(new_user_indices(config, len(ids)))
    return {u: "new" if i in new else "trained" for i, u in enumerate(ids)}
