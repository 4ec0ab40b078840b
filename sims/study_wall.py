"""A whole study's wall time, side by side in two source trees: what starting Ray once per study
(fedpeft.launch.ray_start.SharedRay) saves.

    HF_HUB_OFFLINE=1 python sims/study_wall.py --trees OLD_CHECKOUT,. [sims/compare.py options]

Runs ``python sims/compare.py`` with the same options from each tree in turn (``PYTHONPATH``
and the working directory set to it, so the driver and the Ray workers import that tree's
fedpeft), alternating ``--repeat`` times, and prints each study's wall time from launch to exit,
the mean time per run, what each run spent before its round 1 (launch or the previous run's end
to its first round: Ray, the workers' imports and model builds, the driver's preparation), and
whether every study's runs wrote byte-identical ``per_user.csv`` files. Give a checkout of the
commit before a change (``git worktree add /tmp/old 1e376d3``) as the first tree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sims.startup import alternate, tree_env  # noqa: E402


def one_study(tree: Path, out: Path, compare_args: list[str]) -> dict[str, object]:
    env = tree_env(tree)
    cmd = [sys.executable, "sims/compare.py", "--compare-out", str(out), "output.progress=false", *compare_args]
    launched = time.time()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    whole = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} in {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    runs = sorted((json.loads(p.read_text()) for p in out.glob("*/results.json")), key=lambda r: r["timings"]["run_started_at"])
    before_round1, previous_end = [], launched
    for results in runs:
        timings = results["timings"]
        before_round1.append(timings["run_started_at"] + timings["discovery_s"] - previous_end)
        previous_end = timings["run_started_at"] + results["wall_seconds"]
    digest = hashlib.sha256()
    for path in sorted(out.glob("*/per_user.csv")):
        digest.update(path.parent.name.encode() + path.read_bytes())
    return {"whole_s": whole, "runs": len(runs), "per_run_s": whole / max(1, len(runs)),
            "before_round1_s": before_round1, "per_user_sha256": digest.hexdigest()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", required=True, help="comma list of source trees (checkouts of fedpeft) to compare")
    ap.add_argument("--repeat", type=int, default=1, help="studies per tree, alternating")
    args, compare_args = ap.parse_known_args(argv)
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    rows = alternate(trees, args.repeat, "fedpeft-study-wall-", lambda tree, tmp, name: one_study(tree, tmp / name, compare_args))
    print(f"sims/compare.py {' '.join(compare_args)}; {args.repeat} study(ies) per tree, alternating; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print("| tree | runs | study wall time | per run | before round 1: first run | later runs (mean) |")
    print("|---|---|---|---|---|---|")
    for tree in trees:
        for row in rows[tree]:
            first, *later = row["before_round1_s"]  # type: ignore[misc]
            later_mean = sum(later) / len(later) if later else float("nan")
            print(f"| {tree} | {row['runs']} | {row['whole_s']:.0f} s | {row['per_run_s']:.1f} s | {first:.1f} s | {later_mean:.1f} s |")
    hashes = {r["per_user_sha256"] for tree_rows in rows.values() for r in tree_rows}
    print(f"every run's per_user.csv byte-identical across the studies: {'yes' if len(hashes) == 1 else 'NO'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
