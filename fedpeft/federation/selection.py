"""Which round's test score each user reports: chosen on validation scores, never on test.

Rules (``federation.select``; ``compare.select`` for the comparison's per-user statistics):

final
    the last round (everyone is scored there).
best_val
    one round for everyone: the evaluated round with the best mean validation score over the
    *panel*, the users with a validation score at every evaluated round (the intermediate
    evaluation sample, which is fixed across rounds; at default settings everyone). A user not
    scored at that round (outside the sample, or its evaluation call failed) reports the final
    round. No panel (no user has validation examples): the final round for everyone.
best_val_per_user
    each user its own best validation round among the rounds it was scored at (personalised early
    stopping). A user without validation examples reports the final round.

Ties go to the earliest round. Means are exact sums (``math.fsum``), so they do not depend on the
order of users. :func:`select_rounds` sees validation scores only; :func:`selected_rows` looks up
the test scores of the rounds it chose; :func:`selected_validation` gives the validation score the
rule chose by (``selected_val_<metric>`` in the run's summary: the number to tune a sweep on).

A row of ``rounds_per_user.jsonl`` (one per user and evaluated round, written by the server):
``{"round", "user_id", "partition_id", "n_val", "n_test", "val": {metric: score}, "test": {metric: score}}``
(``val`` is empty for a user without validation examples).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.config_checks import CHOICES
from fedpeft.files import json_value

RULES = CHOICES["federation.select"]  # final, best_val, best_val_per_user
ROUNDS_FILE = "rounds_per_user.jsonl"
NO_VAL = "no validation examples"
NOT_SCORED = "not scored at the chosen round"
NO_PANEL = "no user has a validation score at every evaluated round"
SELECTED_VAL = "selected_val_{}"  # the summary key of selected_validation's score of a metric


@dataclass(frozen=True)
class Selection:
    """Each user's chosen round; ``round`` is best_val's one round (None for the other rules or
    with no panel) and ``panel`` the users whose mean validation score chose it; ``fallback``
    names the users that report the final round instead, and why."""

    rule: str
    rounds: dict[str, int]
    round: int | None = None
    fallback: dict[str, str] = field(default_factory=dict)
    panel: tuple[str, ...] = ()

    def counts(self) -> dict[str, int]:
        """How many users fell back to the final round, per reason."""
        out: dict[str, int] = {}
        for reason in self.fallback.values():
            out[reason] = out.get(reason, 0) + 1
        return out


def _better(a: float, b: float, lower_is_better: bool) -> bool:
    return a < b if lower_is_better else a > b


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def select_rounds(val: Mapping[str, Mapping[int, float]], rule: str, lower_is_better: bool, final_round: int) -> Selection:
    """Each user's round under ``rule``, from validation scores only.

    ``val[user][round]`` is the user's validation headline score at an evaluated round; a pair is
    present iff the user was scored at that round, and the score is NaN for a user without
    validation examples."""
    if rule not in RULES:
        raise ValueError(f"unknown selection rule {rule!r}; allowed: {', '.join(RULES)}")
    users = sorted(val)
    if rule == "final":
        return Selection(rule, {u: final_round for u in users})
    if rule == "best_val_per_user":
        rounds, fallback = {}, {}
        for u in users:
            best: int | None = None
            for r in sorted(val[u]):
                if _finite(val[u][r]) and (best is None or _better(val[u][r], val[u][best], lower_is_better)):
                    best = r
            if best is None:
                rounds[u], fallback[u] = final_round, NO_VAL
            else:
                rounds[u] = best
        return Selection(rule, rounds, fallback=fallback)
    candidates = sorted({r for u in users for r in val[u]})
    panel = [u for u in users if all(_finite(val[u].get(r)) for r in candidates)]
    if not panel:
        return Selection(rule, {u: final_round for u in users}, fallback={u: NO_PANEL for u in users})
    chosen, best_mean = candidates[0], -math.inf
    for r in candidates:
        mean = math.fsum(val[u][r] for u in panel) / len(panel)
        if r == candidates[0] or _better(mean, best_mean, lower_is_better):
            chosen, best_mean = r, mean
    rounds = {u: chosen if chosen in val[u] else final_round for u in users}
    return Selection(rule, rounds, round=chosen, fallback={u: NOT_SCORED for u in users if chosen not in val[u]},
                     panel=tuple(panel))


def selected_rows(rows: list[dict[str, Any]], rule: str, metric: str, lower_is_better: bool,
                  final_round: int) -> tuple[dict[str, dict[str, Any]], Selection]:
    """Each user's row of ``rounds_per_user.jsonl`` at the round ``rule`` picks (chosen on the
    ``metric`` validation scores; the rows' test scores are only looked up afterwards). A user
    with no row at its chosen round (its final evaluation failed) is left out."""
    val: dict[str, dict[int, float]] = {}
    for row in rows:
        val.setdefault(row["user_id"], {})[int(row["round"])] = float(row["val"].get(metric, math.nan))
    selection = select_rounds(val, rule, lower_is_better, final_round)
    by_key = {(row["user_id"], int(row["round"])): row for row in rows}
    chosen = {u: by_key[(u, r)] for u, r in selection.rounds.items() if (u, r) in by_key}
    return chosen, selection


def selected_validation(rows: list[dict[str, Any]], rule: str, metric_names: list[str], lower_is_better: bool,
                        final_round: int) -> dict[str, float]:
    """``selected_val_<metric>`` for each metric: the mean validation score, at the rounds ``rule``
    picks (on the headline, ``metric_names[0]``), of the users the rule chose by. final: every
    user scored at the last round; best_val: the panel at the chosen round (for the headline, the
    mean the rule optimised); best_val_per_user: each user at its own best round. Users without
    validation examples, and those that fell back to the final round, are left out of the mean;
    NaN when no user is left (e.g. no validation split at all). This one number is what a sweep
    tunes on (offline or through a W&B agent), never a test score."""
    chosen, selection = selected_rows(rows, rule, metric_names[0], lower_is_better, final_round)
    users = selection.panel if selection.round is not None else [u for u in chosen if u not in selection.fallback]
    out = {}
    for metric in metric_names:
        values = [float(chosen[u]["val"][metric]) for u in users if u in chosen and _finite(chosen[u]["val"].get(metric))]
        out[SELECTED_VAL.format(metric)] = math.fsum(values) / len(values) if values else math.nan
    return out


def read_rounds(run_dir: Path, up_to: int | None = None) -> list[dict[str, Any]]:
    """The rows of a run's ``rounds_per_user.jsonl`` (of rounds <= ``up_to``; a torn last line, as
    a killed run may leave, is dropped)."""
    path = Path(run_dir) / ROUNDS_FILE
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json_value(line)  # a null score is NaN again
        except ValueError:
            continue
        if isinstance(row, dict) and "round" in row and (up_to is None or row["round"] <= up_to):
            rows.append(row)
    return rows


def round_row(server_round: int, user_id: str, partition_id: int, metrics: Mapping[str, float],
              metric_names: list[str]) -> dict[str, Any]:
    """One user's scores at one evaluated round, from its evaluate reply's metrics (test metrics
    under their plain names, validation ones as ``val_<metric>``)."""
    return {"round": server_round, "user_id": user_id, "partition_id": partition_id,
            "n_val": int(metrics.get("n_val", 0)), "n_test": int(metrics["n_test"]),
            "val": {m: float(metrics[f"val_{m}"]) for m in metric_names if f"val_{m}" in metrics},
            "test": {m: float(metrics[m]) for m in metric_names}}


def apply_selection(per_user: list[dict[str, Any]], rows: list[dict[str, Any]], rule: str, metric_names: list[str],
                    lower_is_better: bool, final_round: int) -> Selection:
    """Put into every scored row of ``per_user`` (status ok) the test scores of the round ``rule``
    picks for that user, with the round (``selected_round``) and its validation headline
    (``val_<metric>``, empty without validation examples)."""
    headline = metric_names[0]
    chosen, selection = selected_rows(rows, rule, headline, lower_is_better, final_round)
    for row in per_user:
        pick = chosen.get(row["user_id"])
        if row["status"] != "ok" or pick is None:
            continue
        row.update({m: pick["test"][m] for m in metric_names})
        row["selected_round"] = int(pick["round"])
        row[f"val_{headline}"] = pick["val"].get(headline, "")
    return selection


def describe(selection: Selection, final_round: int) -> str:
    """One line for the summary: the rule, the round it chose and the users that fell back."""
    text = selection.rule
    if selection.round is not None:
        text += f" (round {selection.round} of {final_round})"
    elif selection.rule == "best_val_per_user":
        picked = sorted(r for u, r in selection.rounds.items() if u not in selection.fallback)
        if picked:
            text += f" (rounds {picked[0]}..{picked[-1]}, median {picked[len(picked) // 2]})"
    fallbacks = "; ".join(f"{n} user(s) {reason}: final round" for reason, n in sorted(selection.counts().items()))
    return f"{text}; {fallbacks}" if fallbacks else text


def check_selection(config: Any) -> None:
    """Before anything starts: a corpus-level headline (LaMP) is computed over all questions of the
    final model's predictions, and LaMP users have no validation split; only ``final`` fits."""
    from fedpeft.config import ConfigError
    from fedpeft.data import get_benchmark

    if config.federation.select != "final" and get_benchmark(config).task().corpus_metrics:
        raise ConfigError(f"federation.select={config.federation.select} chooses rounds on validation scores, but "
                          f"'{config.data.benchmark}' scores its headline over all questions of the final model and its "
                          "users have no validation split (all history trains the adapter, as in OPPU). "
                          "Use federation.select=final.")
