"""The comparison's ``majority`` row: each user's majority label (fedpeft.study.majority), over the
comparison's own users.

Computed by the comparison itself, from the data config its runs share, over exactly the users
of each of its rows: the common users of each group (trained users; new users, ``data.new_users``,
their own group) for the headline and the paired statistics against the baseline, and every user
of the group for the all-users headline (the majority label loses nobody). No model, no seed: the
interval over seeds is n/a, and the paired interval is the baseline's seed-to-seed one. Before
it is shown, the data are checked against the runs: every user is in the benchmark, in the same
group, with the same number of training examples the runs report (``n_train``); where that does
not hold, the row is left out and the report says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedpeft.config import Config
from fedpeft.study.compare import HEADLINE_RULES, paired_or_nan
from fedpeft.study.majority import Majority, NoMajority, majority, user_groups
from fedpeft.study.runs import TRAINED, SeedRun, UserSet, metric_of, reference_run
from fedpeft.study.status import BASELINE_STATUS

MAJORITY = "majority"


@dataclass
class MajorityRows:
    """The row (comparison.csv columns) and new users' columns; ``note``: why there is no row."""

    row: dict[str, Any] = field(default_factory=dict)
    new_row: dict[str, Any] = field(default_factory=dict)
    note: str = ""


def check_against_runs(config: Config, found: Majority, runs: dict[str, list[SeedRun]], users: list[str]) -> None:
    """The majority's data are the runs' data: same groups, same training examples per user."""
    groups = user_groups(config)
    for seeds in runs.values():
        for run in seeds:
            for user in users:
                if user in run.groups and run.groups[user] != groups[user]:
                    raise NoMajority(f"user {user} is {run.groups[user]} in the runs but {groups[user]} in the data config "
                                     "(data.new_users draws differ)")
                if user in run.n_train and run.n_train[user] != found.n_train[user]:
                    raise NoMajority(f"user {user} trained on {run.n_train[user]} examples in the runs but has "
                                     f"{found.n_train[user]} in the data config (the runs used other data.* settings)")


def _group_columns(found: Majority, metric: str, users: UserSet, runs: dict[str, list[SeedRun]], baseline: str,
                   rule: str, prefix: str) -> dict[str, Any]:
    """The majority's headline over the common users (and over all the group's users), its p10
    and its paired statistics against the baseline (``prefix`` '' trained users, 'new_' new)."""
    common = users.common
    value = found.headline(common, metric)
    scores = {u: found.per_user[u][metric] for u in users.everyone}
    ref = reference_run(runs, baseline, users)
    n_train = ref.n_train if ref else {}
    out: dict[str, Any] = {}
    keys = dict.fromkeys((*HEADLINE_RULES, rule)) if not prefix else [""]
    for key in keys:
        head = f"{prefix}{metric}_{key}" if key else f"{prefix}{metric}"
        out.update({head: value, f"{head}_ci95_low": math.nan, f"{head}_ci95_high": math.nan})
    for key in (HEADLINE_RULES if not prefix else [""]):
        out[f"{prefix}{metric}_{key}_all_users" if key else f"{prefix}{metric}_all_users"] = found.headline(users.everyone, metric)
    if not prefix:
        out[f"{metric}_p10"] = float(np.percentile([scores[u] for u in common], 10)) if common else math.nan
    seeds = len(runs[baseline]) or 1
    pick = (lambda r: r.scores[rule]) if users.group == TRAINED else (lambda r: r.new)
    out.update(paired_or_nan(metric, [scores] * seeds, runs, baseline, users, pick,
                             {u: len(found.golds[u]) for u in users.everyone}, prefix))
    n_key = f"{prefix}n_train_mean" if prefix else "n_train_mean"
    out[n_key] = float(np.mean([n_train[u] for u in common])) if common and all(u in n_train for u in common) else math.nan
    return out


def majority_rows(config: Config | None, runs: dict[str, list[SeedRun]], baseline: str, rule: str, trained: UserSet,
                  new: UserSet) -> MajorityRows:
    """The ``majority`` row of the comparison of ``runs`` (see the module's docstring)."""
    if config is None:
        return MajorityRows(note="no data config was given to the comparison")
    users = [*trained.everyone, *new.everyone]
    if not users:
        return MajorityRows(note="no run scored any user")
    try:
        found = majority(config, users)
        check_against_runs(config, found, runs, users)
    except NoMajority as err:
        return MajorityRows(note=str(err))
    metric = metric_of(runs)
    row: dict[str, Any] = {"strategy": MAJORITY, "metric": metric, "seeds": 0, "users_common": len(trained.common),
                           "users_all": len(trained.everyone), "status": BASELINE_STATUS, "status_seeds": "",
                           "status_reason": "each user's most frequent training label (no model)",
                           "users_lost": 0, "lost_why": "0"}
    row.update(_group_columns(found, metric, trained, runs, baseline, rule, ""))
    row.update({"examples_per_user": 0.0, "pretrain_examples": 0, "bytes_total": 0, "trainable_params_per_user": 0,
                "shared_params": 0, "users_failed": 0, "epsilon": 0.0})
    new_row: dict[str, Any] = {}
    if new.everyone:
        new_row = {"new_users_common": len(new.common), "new_users_all": len(new.everyone), "new_users_lost": 0,
                   "new_lost_why": "0", **_group_columns(found, metric, new, runs, baseline, rule, "new_")}
    return MajorityRows(row, new_row)

