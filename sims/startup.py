"""Start-up of the default run, side by side: how long from launch to round 1, and to the end.

    HF_HUB_OFFLINE=1 python sims/startup.py --trees OLD_CHECKOUT,. --repeat 3 [sim options]

Runs ``python -m fedpeft.sim`` (the default run unless sim options are given) from each source
tree in turn (``PYTHONPATH`` and the working directory set to it, so the driver and the Ray
workers import that tree's fedpeft), interleaved ``--repeat`` times so that a busy spell of a
shared machine hits every tree, and prints the median of each phase from the run's own
``results.json`` timings: launch to the run's start (imports, the driver's preparation, Ray),
discovery (every worker importing and building its model), launch to round 1, and the whole
process; and whether every run's ``per_user.csv`` is byte-identical. To compare a change, give a checkout of the commit before it (``git worktree add``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def tree_env(tree: Path) -> dict[str, str]:
    """The environment of a process that runs ``tree``'s fedpeft (its workers import it too)."""
    return {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
            "WANDB_MODE": "disabled"}


def alternate(trees: list[Path], repeat: int, prefix: str, one: Callable[[Path, Path, str], dict[str, Any]]) -> dict[Path, list[dict[str, Any]]]:
    """``one(tree, folder, name)`` for each tree in turn, ``repeat`` times, so that a busy spell of
    a shared machine hits every tree; each row is also printed to stderr as it comes."""
    rows: dict[Path, list[dict[str, Any]]] = {t: [] for t in trees}
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for r in range(repeat):
            for i, tree in enumerate(trees):
                row = one(tree, Path(tmp), f"t{i}-r{r}")
                rows[tree].append(row)
                print(json.dumps({"tree": str(tree), "repeat": r, **row}), file=sys.stderr, flush=True)
    return rows


def one_run(tree: Path, out: Path, name: str, sim_args: list[str]) -> dict[str, float]:
    env = tree_env(tree)
    cmd = [sys.executable, "-m", "fedpeft.sim", "--out", str(out), "--name", name, "output.progress=false", *sim_args]
    launched = time.time()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    whole = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    timings = json.loads((out / name / "results.json").read_text())["timings"]
    to_run = timings["run_started_at"] - launched
    return {"to_run_start_s": to_run, "discovery_s": timings["discovery_s"],
            "to_round1_s": to_run + timings["discovery_s"], "whole_s": whole,
            "per_user_sha256": hashlib.sha256((out / name / "per_user.csv").read_bytes()).hexdigest()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", required=True, help="comma list of source trees (checkouts of fedpeft) to compare")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tree, interleaved; medians are reported")
    args, sim_args = ap.parse_known_args(argv)
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    rows = alternate(trees, args.repeat, "fedpeft-startup-", lambda tree, out, name: one_run(tree, out, name, sim_args))
    keys = ("to_run_start_s", "discovery_s", "to_round1_s", "whole_s")
    print(f"medians of {args.repeat} interleaved runs; load average at the end {os.getloadavg()[0]:.1f}")
    print("| tree | launch to run start | discovery | launch to round 1 | whole process |")
    print("|---|---|---|---|---|")
    for tree in trees:
        med = {k: float(np.median([r[k] for r in rows[tree]])) for k in keys}
        print(f"| {tree} | " + " | ".join(f"{med[k]:.1f} s" for k in keys) + " |")
    hashes = {r["per_user_sha256"] for tree_rows in rows.values() for r in tree_rows}
    print(f"per_user.csv byte-identical across all runs: {'yes' if len(hashes) == 1 else 'NO'} ({len(hashes)} distinct)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
