"""Majority-label-per-user baseline: each user predicts its own most frequent training label.

    python sims/majority_baseline.py --benchmark peft-u/tweeteval data.path=DIR [--top-k K] [KEY=VALUE ...]

Prints mean / median / 10th-percentile per-user scores of every metric of the task (the same
scoring as a simulation, :func:`fedpeft.learning.scoring.score`) and writes them to --json-out. No model,
no training: what personalization must beat. The computation is :mod:`fedpeft.study.majority`, the one
every comparison (sims/compare.py) uses for its own ``majority`` row over its own common users:
quote that row beside a comparison, not this script's numbers. Here the users are every user of
the data config (``data.max_train_per_user`` caps their training splits as in a run), by group:
with ``data.new_users`` the trained and the new users are summarised apart.

``--top-k K`` makes every user predict, for every test example, its K most frequent training
labels, most frequent first (ties: the label seen first in its training split); ``--top-k all``
predicts every label of the task (the user's labels by frequency, then the rest in the task's
order). On a multi-label task this checks that predicting more labels does not pay on the
headline: ``accuracy`` and ``macro_f1`` score the first label only, so they stay at the top-1
values, while PEFT-U's lenient ``accuracy_any`` rises (to 1.0 for ``all``). ``example_f1`` and
``jaccard`` are set overlaps: each extra label that is not gold lowers them, but where gold sets
are large they rise with K (studemo, 3.7 gold labels of 10 on average: example_f1 0.35 at K = 1,
0.53 for ``all``), so the constant baseline to beat on them is the best K, not K = 1. On a
single-label task a list of labels is scored as its first label, so every K scores as K = 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedpeft.cli import config_from_args
from fedpeft.config import Config
from fedpeft.learning.metrics import summarize
from fedpeft.study.majority import majority, user_groups


def parse_top_k(value: str) -> int | None:
    """``--top-k``: a positive number of labels, or 'all' (None)."""
    if value == "all":
        return None
    try:
        k = int(value)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"--top-k must be a positive whole number or 'all', got {value!r}; "
                                         "e.g. --top-k 1 (the majority label) or --top-k all (every label of the task)")
    return k


def majority_scores(config: Config, top_k: int | None = 1) -> dict[str, Any]:
    """Every user's scores when it predicts its ``top_k`` most frequent training labels
    (:func:`fedpeft.study.majority.majority`), summarised over all users and per group."""
    found = majority(config, top_k=top_k)
    per_user = found.per_user
    metrics = list(found.task.metrics)
    groups = user_groups(config)
    by_group = {g: {m: summarize([per_user[u][m] for u in per_user if groups[u] == g]) for m in metrics}
                for g in dict.fromkeys(groups.values())}
    return {"benchmark": config.data.benchmark, "top_k": "all" if top_k is None else top_k,
            "metric": metrics[0], "metrics": metrics, "users": len(per_user),
            "summary": {m: summarize([s[m] for s in per_user.values()]) for m in metrics},
            "groups": {g: sum(1 for u in per_user if groups[u] == g) for g in by_group}, "by_group": by_group,
            "per_user": per_user, "group_of": groups}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python sims/majority_baseline.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-out", default=None, help="write the scores to this JSON file")
    parser.add_argument("--top-k", type=parse_top_k, default=1, metavar="K",
                        help="predict each user's K most frequent training labels, or 'all' the task's labels (default 1)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    result = majority_scores(config_from_args(rest), args.top_k)
    print(f"majority labels per user (top-{result['top_k']}) on {result['benchmark']} ({result['users']} users); "
          f"headline {result['metric']}")
    for metric in result["metrics"]:
        s = result["summary"][metric]
        print(f"  {metric:<13} mean {s['mean']:.4f}, median {s['median']:.4f}, p10 {s['p10']:.4f}")
    if len(result["by_group"]) > 1:  # data.new_users: the trained and the new users apart
        for group, summary in result["by_group"].items():
            s = summary[result["metric"]]
            print(f"  {group} users ({result['groups'][group]}): {result['metric']} mean {s['mean']:.4f}, "
                  f"median {s['median']:.4f}, p10 {s['p10']:.4f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
