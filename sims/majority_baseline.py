"""Majority-label-per-user baseline: each user predicts its own most frequent training label.

    python sims/majority_baseline.py --benchmark peft-u/tweeteval data.path=DIR [KEY=VALUE ...]

Prints mean / median / 10th-percentile per-user scores (the same scoring as a simulation) and
writes them to --out (JSON). No model, no training: what personalization must beat.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from fedpeft.cli import config_from_args
from fedpeft.data import get_benchmark
from fedpeft.metrics import summarize
from fedpeft.scoring import score


def majority_scores(config) -> dict:
    bench = get_benchmark(config)
    task = bench.task()
    per_user = {}
    for index, user_id in enumerate(bench.user_ids()):
        user = bench.load_user(index)
        counts = Counter(label for ex in user.train for label in ex.labels)
        guess = counts.most_common(1)[0][0]
        per_user[user_id] = score(task.kind, [guess] * len(user.test), [list(ex.labels) for ex in user.test],
                                  labels=task.labels or None)
    metric = task.metrics[0]
    return {"benchmark": config.data.benchmark, "metric": metric, "users": len(per_user),
            "summary": summarize([s[metric] for s in per_user.values()]), "per_user": per_user}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python sims/majority_baseline.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json-out", default=None, help="write the scores to this JSON file")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    result = majority_scores(config_from_args(rest))
    s = result["summary"]
    print(f"majority label per user on {result['benchmark']} ({result['users']} users): "
          f"{result['metric']} mean {s['mean']:.4f}, median {s['median']:.4f}, p10 {s['p10']:.4f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
