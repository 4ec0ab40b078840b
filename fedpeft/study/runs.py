"""A comparison's run folders read back (fedpeft/study/compare.py): each run's per-user scores, by group
and round rule, and the one common set of users every number of the comparison is computed over.

A run folder's ``per_user.csv`` says who was scored (``status`` ok) and why not (``error``); its
``group`` column is ``trained`` (the default, also for folders without the column) or ``new``
(``data.new_users``: never in a training cohort, scored once at the end after fine-tuning on the
final shared part; ``as_is_<metric>``: the global model's score before that fine-tune, for a
strategy with nothing private); ``n_train`` is the user's training examples. Trained users'
scores at the round each rule picks come from ``rounds_per_user.jsonl`` (fedpeft.federation.selection).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedpeft.federation.selection import NOT_SCORED, read_rounds, selected_rows
from fedpeft.files import json_value
from fedpeft.learning.metrics import LOWER_IS_BETTER

TRAINED, NEW = "trained", "new"
GROUPS = (TRAINED, NEW)


def _number(value: Any) -> float | None:
    """A finite float from a csv cell, else None (empty, 'nan', text)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _one_line(text: str, limit: int = 100) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class SeedRun:
    """One strategy's run with one seed. ``scores[rule]``: each scored trained user's test score at
    the round ``rule`` picks (chosen on validation only); ``new`` / ``new_as_is``: new users'
    scores after / before their fine-tune; ``missing``: why a user of the run has no score, as
    (what, detail), e.g. ("failed", the error) or (NOT_SCORED, the rule)."""

    seed: int
    results: dict[str, Any]
    scores: dict[str, dict[str, float]]
    new: dict[str, float] = field(default_factory=dict)
    new_as_is: dict[str, float] = field(default_factory=dict)
    n_test: dict[str, int] = field(default_factory=dict)
    n_train: dict[str, int] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    missing: dict[str, tuple[str, str]] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    status: str = "ok"  # fedpeft.study.status: ok, degraded, failed or unknown (a run from before statuses)
    status_reason: str = ""
    status_counts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, seed: int, run_dir: Path, results: dict[str, Any], rules: tuple[str, ...]) -> SeedRun:
        metric = results["metrics"][0]
        with (run_dir / "per_user.csv").open() as f:
            table = list(csv.DictReader(f))
        from fedpeft.study.status import run_status

        run = cls(seed, results, {rule: {} for rule in rules})
        run.status, run.status_reason = run_status(results)
        run.status_counts = dict(results.get("status_counts") or {})
        metrics_path = run_dir / "metrics.jsonl"
        run.rounds = [json_value(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        ok_trained = set()
        for row in table:
            user, group = row["user_id"], row.get("group") or TRAINED
            if group not in GROUPS:
                raise ValueError(f"{run_dir / 'per_user.csv'}: user {user} has group {group!r}; allowed: "
                                 f"{', '.join(GROUPS)} (empty = {TRAINED})")
            run.groups[user] = group
            for column, into in (("n_train", run.n_train), ("n_test", run.n_test)):
                if _number(row.get(column)) is not None:
                    into[user] = int(float(row[column]))
            if row["status"] != "ok":
                run.missing[user] = ("failed", _one_line(row.get("error") or f"status {row['status']}"))
            elif group == TRAINED:
                ok_trained.add(user)
            elif (score := _number(row.get(metric))) is None:
                run.missing[user] = ("no score", f"{metric} is {row.get(metric)!r}")
            else:
                run.new[user] = score
                if (as_is := _number(row.get(f"as_is_{metric}"))) is not None:
                    run.new_as_is[user] = as_is
        rows = read_rounds(run_dir)
        for rule in rules:
            chosen, _ = selected_rows(rows, rule, metric, metric in LOWER_IS_BETTER, results["rounds"])
            for user in sorted(ok_trained):
                score = _number(chosen[user]["test"].get(metric)) if user in chosen else None
                if score is None:
                    run.missing.setdefault(user, (NOT_SCORED, rule))
                else:
                    run.scores[rule][user] = score
                    run.n_test.setdefault(user, int(chosen[user]["n_test"]))
        return run

    def scored(self, group: str) -> set[str]:
        """The users of ``group`` this run scored (trained: under every rule it was read with)."""
        if group == NEW:
            return set(self.new)
        return set.intersection(*(set(s) for s in self.scores.values())) if self.scores else set()

    def why_not(self, user: str) -> str:
        """Why this run has no score for ``user``, e.g. 'failed in seed 1: CUDA out of memory'."""
        if user not in self.groups:
            return f"not in the run of seed {self.seed}"
        what, detail = self.missing.get(user, ("not scored", ""))
        if what == NOT_SCORED:
            return f"{what} ({detail}) in seed {self.seed}"
        return f"{what} in seed {self.seed}" + (f": {detail}" if detail else "")


@dataclass(frozen=True)
class UserSet:
    """One group's users across a comparison: ``common``, those scored in every run (every seed) of
    every strategy without a failed run, which every headline and paired statistic is computed
    over; ``everyone``, the group's users in those runs; ``left_out[strategy][user]``: why that
    strategy's runs did not score a user of ``everyone`` (the users it *lost*; each one is out of
    every strategy's common set); ``failed``: the strategies with a failed run (no headline; kept
    out of the common set, so that a run that did not train cannot empty it)."""

    group: str
    common: list[str]
    everyone: list[str]
    left_out: dict[str, dict[str, str]]
    failed: tuple[str, ...] = ()


def user_set(runs: dict[str, list[SeedRun]], group: str) -> UserSet:
    from fedpeft.study.status import FAILED

    failed = tuple(name for name, seeds in runs.items() if any(run.status == FAILED for run in seeds))
    usable = {name: seeds for name, seeds in runs.items() if name not in failed}
    everyone = sorted({u for seeds in (usable or runs).values() for run in seeds for u, g in run.groups.items() if g == group})
    scored = {name: [run.scored(group) for run in seeds] for name, seeds in usable.items()}
    common = [u for u in everyone if all(u in s for sets in scored.values() for s in sets)] if usable else []
    left_out = {name: {u: ", ".join(run.why_not(u) for run, s in zip(seeds, scored[name]) if u not in s)
                       for u in everyone if any(u not in s for s in scored[name])} if name in usable else {}
                for name, seeds in runs.items()}
    return UserSet(group, common, everyone, left_out, failed)


def left_out_text(left_out: dict[str, str], names: int = 3) -> str:
    """'0', or the count and why, users with the same reason together:
    '1 (u2 failed in seed 1: boom)', '4 (u1, u2, u3 and 1 more failed in seed 0: boom)'."""
    if not left_out:
        return "0"
    by_reason: dict[str, list[str]] = {}
    for user, reason in sorted(left_out.items()):
        by_reason.setdefault(reason, []).append(user)
    parts = []
    for reason, users in by_reason.items():
        who = ", ".join(users[:names]) + (f" and {len(users) - names} more" if len(users) > names else "")
        parts.append(f"{who} {reason}")
    return f"{len(left_out)} ({'; '.join(parts)})"


def metric_of(runs: dict[str, list[SeedRun]]) -> str:
    """The headline metric: the first of any run's results.json ``metrics`` (a run that failed
    before writing results has none)."""
    for seeds in runs.values():
        for run in seeds:
            if run.results.get("metrics"):
                return run.results["metrics"][0]
    raise ValueError("no run of the comparison wrote its results.json metrics: every run failed before scoring; "
                     "see each run's folder and runs.csv")


def reference_run(runs: dict[str, list[SeedRun]], baseline: str, users: UserSet) -> SeedRun | None:
    """The run whose ``n_train`` the activity bins and examples/user use: the baseline's first,
    or the first strategy's without a failed run when the baseline failed; None if all failed."""
    usable = [baseline] + [n for n in runs if n != baseline]
    return next((runs[n][0] for n in usable if n not in users.failed), None)
