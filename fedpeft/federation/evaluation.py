"""Evaluation: who is scored at which round, and how the replies' scores become the run's scores.

:func:`evaluated` and :func:`eval_users` say which rounds are evaluated and which users (a fixed
seeded sample at intermediate rounds, everyone at the last). :class:`Scoring` turns evaluate
replies into the headline scores and their per-user distribution, keeps every user's validation
and test scores of every evaluated round (``rounds_per_user.jsonl``), and, at the end, gives the
scores ``federation.select`` reports: the last round's, or those of the rounds chosen on
validation scores (fedpeft.federation.selection), never on test.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flwr.app import Message

from fedpeft.config import Config
from fedpeft.federation.progress import partition_id
from fedpeft.federation.reporting import RunReporter
from fedpeft.federation.selection import (
    ROUNDS_FILE,
    apply_selection,
    describe,
    round_row,
    selected_validation,
)
from fedpeft.learning import metrics as M
from fedpeft.learning.scoring import corpus_scores
from fedpeft.tasks import TaskSpec


def evaluated(config: Config, server_round: int, total_rounds: int) -> bool:
    """Whether ``server_round`` is evaluated: every ``federation.eval_every`` rounds, and the last."""
    return server_round % config.federation.eval_every == 0 or server_round == total_rounds


def eval_users(config: Config, users: list[int], server_round: int, total_rounds: int) -> list[int]:
    """Everyone at the last round; at an intermediate one a seeded sample, the same users every
    round (so that per-round scores, and the rounds chosen on validation, compare like with like).
    ``users``: the trained users (new users are scored once, after their fine-tune at the end)."""
    fed = config.federation
    size = max(1, round(fed.eval_fraction * len(users)))
    if fed.eval_max_users:
        size = min(size, fed.eval_max_users)
    if server_round == total_rounds or size >= len(users):
        return users
    return sorted(np.random.default_rng([config.seed, 30]).choice(users, size, replace=False).tolist())


class Scoring:
    """The task's metrics (the first one is the headline) and the per-user scores of every
    evaluated round so far (``round_scores``: rows of ``rounds_per_user.jsonl``)."""

    def __init__(self, task: TaskSpec, user_ids: list[str], reporter: RunReporter, round_scores: list[dict[str, Any]]) -> None:
        self.task = task
        self.metric_names = list(task.metrics)  # the first one is the headline
        self.user_ids = user_ids
        self.reporter = reporter
        self.round_scores = round_scores  # per user and evaluated round: val and test scores

    @property
    def lower_is_better(self) -> bool:
        return self.metric_names[0] in M.LOWER_IS_BETTER

    def scores(self, replies: list[Message]) -> dict[str, float]:
        """Each metric's headline value under its plain name (LaMP: the benchmark's own corpus-level
        score over all questions; PEFT-U and synthetic: the unweighted mean over users of per-user
        scores) and its per-user distribution (``_mean``, ``_median``, ``_p10``, ``_min``)."""
        out = self.distribution({name: [r.content.metric_records["metrics"][name] for r in replies] for name in self.metric_names})
        if self.task.corpus_metrics and replies:
            infos = [r.content.config_records["info"] for r in replies]
            predictions = [p for info in infos for p in info["predictions"]]
            golds = [g for info in infos for g in json.loads(str(info["golds"]))]
            out.update(corpus_scores(self.task, predictions, golds))
        return out

    def distribution(self, values: dict[str, list[float]]) -> dict[str, float]:
        """Per metric: the mean over users under its plain name, and ``_mean``, ``_median``, ``_p10``, ``_min``."""
        out: dict[str, float] = {}
        for name in self.metric_names:
            stats = M.summarize(values[name])
            out.update({f"{name}_{k}": stats[k] for k in ("mean", "median", "p10", "min")})
            out[name] = stats["mean"]
        return out

    def log_round(self, server_round: int, replies: list[Message]) -> dict[str, float]:
        """Keep (and append to ``rounds_per_user.jsonl``) each scored user's validation and test
        scores of this round; returns the mean validation scores (``val_<metric>``)."""
        rows = [round_row(server_round, self.user_ids[partition_id(r)], partition_id(r), r.content.metric_records["metrics"],
                          self.metric_names) for r in replies]
        self.round_scores += rows
        self.reporter.log_user_rounds(rows)
        out = {}
        for name in self.metric_names:
            values = [row["val"][name] for row in rows if name in row["val"]]
            out[f"val_{name}"] = float(np.mean(values)) if values else float("nan")
        return out

    def forget_round(self, server_round: int) -> None:
        """Drop the kept scores of ``server_round`` (scored again: the new scores replace them)."""
        self.round_scores = [row for row in self.round_scores if row["round"] != server_round]

    def selected(self, per_user: list[dict[str, Any]], ok: list[dict[str, Any]], replies: dict[int, Message],
                 rule: str, total_rounds: int) -> tuple[dict[str, float], dict[str, Any]]:
        """The trained users' scores ``rule`` (``federation.select``) reports, and results.json's
        ``selection``. ``ok``: the scored trained users' rows of ``per_user``; ``replies``: each
        scored user's last evaluate reply. A rule other than final puts the chosen round's test
        scores into the rows of ``per_user``."""
        info: dict[str, Any] = {"rule": rule, "metric": self.metric_names[0], "file": ROUNDS_FILE}
        if rule == "final":
            return self.scores([replies[row["partition_id"]] for row in ok]), info
        # corpus-level benchmarks are refused at start (fedpeft.federation.selection.check_selection)
        selection = apply_selection(per_user, self.round_scores, rule, self.metric_names, self.lower_is_better, total_rounds)
        chosen = self.distribution({name: [row[name] for row in ok] for name in self.metric_names})
        info.update(round=selection.round, fallback=selection.counts(), description=describe(selection, total_rounds))
        return chosen, info

    def selected_validation(self, rule: str, total_rounds: int) -> dict[str, float]:
        """The sweep metric: the validation score the rule chose by (never a test score)."""
        return selected_validation(self.round_scores, rule, self.metric_names, self.lower_is_better, total_rounds)
