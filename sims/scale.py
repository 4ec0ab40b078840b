"""fedpeft's own cost per user and per message, at many users (issue 10).

    python sims/scale.py --users 1000,5000,15000

For each N: one ``python -m fedpeft.sim`` in a subprocess, on N synthetic users and a tiny random
BERT (model compute is small, so what is measured is mostly fedpeft + Flower + Ray): fedavg,
3 rounds, cohort 100, intermediate evaluation on 1% of users, final evaluation of everyone, one
step per call. Prints a markdown table of the whole run (and per message sent), the time before
round 1 (Ray and setup, then discovery: every worker's first call, which builds its model), the
wall time per message in a round and its overhead (beyond the message's share of the client
calls' own time, which run on several worker processes at once: Flower, Ray and the driver), the
final evaluation and the driver's peak RSS, from the run's results.json "timings"; ``--json``
writes the rows too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedpeft.testing import save_tiny_bert

ROOT = Path(__file__).resolve().parents[1]


def run_one(users: int, model: Path, out: Path, extra: list[str]) -> dict:
    name = f"scale-{users}"
    args = [sys.executable, "-m", "fedpeft.sim", "--model", str(model), "--out", str(out), "--name", name,
            "--strategy", "fedavg", "--rounds", "3", f"data.num_users={users}", "data.train_per_user=4", "data.val_per_user=1",
            "data.test_per_user=4", "train.steps=1", "train.batch_size=4",
            "federation.cohort_size=100", "federation.eval_fraction=0.01", "federation.eval_every=1",
            "output.progress=false", "wandb.mode=disabled", *(e.replace("{users}", str(users)) for e in extra)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    launched = time.time()
    proc = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True)
    whole = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"N={users} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results = json.loads((out / name / "results.json").read_text())
    t = results["timings"]
    rounds = t["rounds_s"]
    # the last round's evaluation is everyone: per message costs from rounds 1..R-1 (train + 1% eval).
    # Overhead: the wall time a message costs beyond its share of the client calls' own time
    # (calls run on `workers` processes at once): Flower, Ray and fedpeft's driver.
    inner = list(zip(rounds, t["messages"], t["call_s"]))[:-1] or list(zip(rounds, t["messages"], t["call_s"]))
    wall, sent, inside = (sum(x[i] for x in inner) for i in range(3))
    return {"users": users, "whole_run_s": whole,
            "before_round1_s": t["run_started_at"] + t["discovery_s"] - launched,
            "ray_and_setup_s": t["run_started_at"] - launched, "discovery_s": t["discovery_s"],
            "rounds_s": rounds, "messages": t["messages"],
            "ms_per_message": 1000 * wall / sent, "call_ms_per_message": 1000 * inside / sent,
            "overhead_ms_per_message": 1000 * (wall - inside / t["workers"]) / sent, "workers": t["workers"],
            "messages_total": sum(t["messages"]),
            "whole_run_ms_per_message": 1000 * whole / sum(t["messages"]),
            "final_eval_s": t["final_eval_s"], "final_eval_ms_per_message": 1000 * t["final_eval_s"] / users,
            "driver_peak_rss_mb": t["driver_peak_rss_mb"], "n_evaluated": results["summary"]["n_evaluated"]}


def table(rows: list[dict]) -> str:
    lines = ["| users | whole run (per message sent) | before round 1 (Ray + setup, discovery) | per message in a round: "
             "wall (overhead) | final evaluation | driver peak RSS |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['users']:,} | {r['whole_run_s']:.0f} s ({r['whole_run_ms_per_message']:.1f} ms) | "
                     f"{r['before_round1_s']:.1f} s ({r['ray_and_setup_s']:.1f} + {r['discovery_s']:.1f}) | "
                     f"{r['ms_per_message']:.1f} ms ({r['overhead_ms_per_message']:.1f} ms) | {r['final_eval_s']:.1f} s "
                     f"({r['final_eval_ms_per_message']:.1f} ms per message) | {r['driver_peak_rss_mb']:.0f} MB |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="1000,5000,15000", help="comma-separated numbers of users")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run; {users} stands for N "
                        "(e.g. federation.num_nodes={users}: one Flower node per user)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedpeft-scale-") as tmp:
        model = save_tiny_bert(Path(tmp) / "tiny-bert")
        for users in [int(u) for u in args.users.split(",")]:
            rows.append(run_one(users, model, Path(tmp) / "runs", args.overrides))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
