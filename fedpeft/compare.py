"""Run several strategies on the same users, data seed and model seed; compare them side by side.

    python sims/compare.py --strategies local_only,fedavg,fedsa [--config FILE] [KEY=VALUE ...]

Writes into one folder: ``comparison.csv`` / ``comparison.md`` (per strategy: mean, median and
10th-percentile per-user score of the task's headline metric — accuracy for classification —,
share of users worse than under the baseline, mean per-user gain over it, local compute as
examples processed per user (forward + backward passes, every pass of every round: fedrep's head
epochs and feddpa's two passes count) and examples processed centrally before the simulation
(pooled oppu), bytes communicated, wall time, parameters), ``per_user.csv`` (one score column per strategy), ``rounds.png`` and
``distribution.png``, and each strategy's own run folder.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.cli import config_from_args
from fedpeft.config import Config, ConfigError
from fedpeft.metrics import LOWER_IS_BETTER, gain
from fedpeft.strategies import STRATEGIES, get_strategy_class


def parse_args(argv: list[str]) -> tuple[list[str], str, Path | None, Config]:
    """``--strategies``, ``--baseline`` and ``--compare-out`` stand for the ``compare.*`` keys;
    everything else is an argument of ``python -m fedpeft.sim``."""
    parser = argparse.ArgumentParser(prog="python sims/compare.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Other arguments are those of python -m fedpeft.sim (flags, --config, KEY=VALUE).")
    parser.add_argument("--strategies", help=f"comma list or 'all' [compare.strategies] ({', '.join(sorted(STRATEGIES))})")
    parser.add_argument("--baseline", help="strategy the gains are measured against [compare.baseline] (default: local_only)")
    parser.add_argument("--compare-out", help="comparison folder [compare.out] (default: <output.dir>/compare-<time>)")
    args, rest = parser.parse_known_args(argv)
    aliases = {"strategies": args.strategies if args.strategies != "all" else "", "baseline": args.baseline, "out": args.compare_out}
    config = config_from_args(rest + [f"compare.{k}={v}" for k, v in aliases.items() if v is not None])
    names = list(config.compare.strategies) or sorted(STRATEGIES)
    baseline = config.compare.baseline
    for name in names + [baseline]:
        get_strategy_class(name)  # unknown names: an error listing the known ones
    if baseline not in names:
        names.insert(0, baseline)
    return names, baseline, Path(config.compare.out) if config.compare.out else None, config


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _per_user(run_dir: Path, metric: str) -> dict[str, float]:
    with (run_dir / "per_user.csv").open() as f:
        return {row["user_id"]: float(row[metric]) for row in csv.DictReader(f) if row["status"] == "ok"}


def comparison_rows(results: dict[str, dict[str, Any]], per_user: dict[str, dict[str, float]], baseline: str) -> list[dict[str, Any]]:
    base = per_user[baseline]
    rows = []
    for name, res in results.items():
        metric = res["metrics"][0]
        common = [u for u in per_user[name] if u in base]
        gains = np.array([gain(metric, per_user[name][u], base[u]) for u in common])
        s = res["summary"]
        rows.append({
            "strategy": name, metric: s[metric], **{f"{metric}_{k}": s[f"{metric}_{k}"] for k in ("median", "p10")},
            **{m: s[m] for m in res["metrics"][1:]},
            f"worse_than_{baseline}": float(np.mean(gains < 0)) if len(gains) else float("nan"),
            f"gain_vs_{baseline}": float(gains.mean()) if len(gains) else float("nan"),
            "examples_per_user": res["compute"]["examples_processed_per_user_mean"],
            "pretrain_examples": res["compute"]["driver_pretrain_examples"],
            "bytes_total": res["communication"]["bytes_total"], "wall_seconds": res["wall_seconds"],
            "trainable_params_per_user": res["parameters"]["trainable_params_per_user"],
            "shared_params": res["parameters"]["shared_params"], "users_failed": s["n_failed"],
        })
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:+.4f}" if value < 0 else f"{value:.4f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in cols) + " |" for row in rows]
    return "\n".join(lines)


def plot(out: Path, rounds: dict[str, list[dict[str, Any]]], per_user: dict[str, dict[str, float]], baseline: str,
         metric: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sign = -1 if metric in LOWER_IS_BETTER else 1
    order = sorted(per_user, key=lambda n: -sign * np.mean(list(per_user[n].values()) or [0]))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(sorted(per_user))}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name in order:
        pts = [(r["round"], r[metric]) for r in rounds[name] if metric in r]
        style = {"linewidth": 3, "color": "black"} if name == baseline else {"linewidth": 1.8, "color": colors[name]}
        ax.plot(*zip(*pts), marker="o", markersize=4, label=f"{name} (final {pts[-1][1]:.3f})" if pts else name, **style)
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {metric} (mean over users; LaMP: over all questions)")
    ax.set_title("Score per round (each user scored with its own personalised model)\n"
                 "rounds run on through a strategy's phases, e.g. oppu's task then personal rounds", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(order) + 2), 5.5))
    data = [list(per_user[n].values()) for n in order]
    box = ax.boxplot(data, patch_artist=True, widths=0.55, showmeans=True,
                     meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black"})
    for patch, name in zip(box["boxes"], order):
        patch.set_facecolor(colors[name])
        patch.set_alpha(0.35)
    rng = np.random.default_rng(0)
    for i, values in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=14, color="black", alpha=0.6, zorder=3)
    ax.set_xticks(range(1, len(order) + 1), order, rotation=20, ha="right")
    ax.axhline(np.mean(list(per_user[baseline].values())), color="black", linestyle="--", linewidth=1, label=f"{baseline} mean")
    ax.set_ylabel(f"per-user test {metric}")
    ax.set_title("Per-user score distribution (box: quartiles, diamond: mean, dots: users)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "distribution.png", dpi=130)
    plt.close(fig)


def compare(names: list[str], baseline: str, config: Config, out: Path | None = None) -> Path:
    """Run ``names`` one after the other with the same config and seeds; write the comparison."""
    from fedpeft.sim import run

    out = (out or Path(config.output.dir) / f"compare-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        cfg = copy.deepcopy(config)
        cfg.federation.strategy = name
        cfg.output.dir, cfg.output.name, cfg.output.store_dir = str(out), name, ""
        cfg.wandb.group = cfg.wandb.group or out.name
        print(f"=== {name} ===", flush=True)
        results[name] = run(cfg)
    metric = results[baseline]["metrics"][0]
    per_user = {n: _per_user(out / n, metric) for n in names}
    rounds = {n: _rounds(out / n) for n in names}
    rows = comparison_rows(results, per_user, baseline)
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "comparison.md").write_text(markdown_table(rows) + "\n")
    users = sorted(set().union(*[set(p) for p in per_user.values()]))
    with (out / "per_user.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", *names])
        for u in users:
            writer.writerow([u, *[per_user[n].get(u, "") for n in names]])
    plot(out, rounds, per_user, baseline, metric)
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        names, baseline, out, config = parse_args(sys.argv[1:] if argv is None else argv)
        folder = compare(names, baseline, config, out)
    except ConfigError as err:
        print(f"fedpeft: error: {err}", file=sys.stderr)
        return 2
    print((folder / "comparison.md").read_text())
    print(f"comparison written to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
