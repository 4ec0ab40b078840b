"""Run several strategies on the same users, once per model seed; compare them side by side.

    python sims/compare.py --strategies local_only,fedavg,fedsa [--seeds 0,1,2] [--config FILE] [KEY=VALUE ...]

Each strategy runs once per seed of ``compare.seeds`` (the model seed ``seed``; ``data.seed`` stays
fixed, so the users are the same). Writes into one folder: ``comparison.md`` / ``comparison.csv``
(per strategy: the headline, the mean over users of per-user test scores, under ``best_val`` and
``final`` (fedpeft.selection), as the mean over seeds with its 95% t-interval; the 10th
percentile over users; per user against the baseline, under ``compare.select``, the paired
difference averaged over seeds, wins, ties and losses, the Wilcoxon signed-rank p across users
and the share of users hurt by more than one test example (fedpeft.compare_stats); local compute
as examples processed per user (forward + backward passes, every pass of every round: fedrep's
head epochs and feddpa's two passes count) and centrally before the simulation (pooled oppu),
bytes communicated, wall time, parameters), ``per_user.csv`` (one score column per strategy,
averaged over seeds), ``scatter.png`` (each user against the baseline, one panel per strategy),
``rounds.png``, ``distribution.png``, and each run's own folder (``<strategy>``, or
``<strategy>-seed<s>`` with several seeds).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.cli import config_from_args
from fedpeft.compare_stats import mean_interval, paired_differences, paired_stats
from fedpeft.config import Config, ConfigError
from fedpeft.metrics import LOWER_IS_BETTER
from fedpeft.selection import read_rounds, selected_rows
from fedpeft.strategies import STRATEGIES, get_strategy_class

HEADLINE_RULES = ("best_val", "final")  # the table gives the headline under both


def parse_args(argv: list[str]) -> tuple[list[str], str, Path | None, Config]:
    """``--strategies``, ``--baseline``, ``--compare-out`` and ``--seeds`` stand for the ``compare.*`` keys;
    everything else is an argument of ``python -m fedpeft.sim``."""
    parser = argparse.ArgumentParser(prog="python sims/compare.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Other arguments are those of python -m fedpeft.sim (flags, --config, KEY=VALUE).")
    parser.add_argument("--strategies", help=f"comma list or 'all' [compare.strategies] ({', '.join(sorted(STRATEGIES))})")
    parser.add_argument("--baseline", help="strategy the gains are measured against [compare.baseline] (default: local_only)")
    parser.add_argument("--compare-out", help="comparison folder [compare.out] (default: <output.dir>/compare-<time>)")
    parser.add_argument("--seeds", help="model seeds, comma list [compare.seeds] (default: the run's seed)")
    args, rest = parser.parse_known_args(argv)
    aliases = {"strategies": args.strategies if args.strategies != "all" else "", "baseline": args.baseline,
               "out": args.compare_out, "seeds": args.seeds}
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


@dataclass
class SeedRun:
    """One strategy's run with one seed: its results, and per rule each scored user's test score
    at the round the rule picks (from rounds_per_user.jsonl, chosen on validation only)."""

    seed: int
    results: dict[str, Any]
    scores: dict[str, dict[str, float]]  # rule -> user -> score
    n_test: dict[str, int]
    rounds: list[dict[str, Any]]

    @classmethod
    def read(cls, seed: int, run_dir: Path, results: dict[str, Any], rules: tuple[str, ...]) -> SeedRun:
        metric = results["metrics"][0]
        scored = _per_user(run_dir, metric)  # the users the run counts as scored
        rows = read_rounds(run_dir)
        scores, n_test = {}, {}
        for rule in rules:
            chosen, _ = selected_rows(rows, rule, metric, metric in LOWER_IS_BETTER, results["rounds"])
            scores[rule] = {u: float(row["test"][metric]) for u, row in chosen.items() if u in scored}
            n_test.update({u: int(row["n_test"]) for u, row in chosen.items()})
        return cls(seed, results, scores, n_test, _rounds(run_dir))

    def headline(self, rule: str) -> float:
        """The run's headline under ``rule``: the mean over users (LaMP: its corpus-level score,
        which is the final model's; no validation split, so no other rule)."""
        if self.results.get("headline") == "corpus":
            return float(self.results["summary"][self.results["metrics"][0]]) if rule == "final" else math.nan
        return float(np.mean(list(self.scores[rule].values()))) if self.scores[rule] else math.nan


def comparison_rows(runs: dict[str, list[SeedRun]], baseline: str, rule: str) -> list[dict[str, Any]]:
    """One row per strategy: the headline under best_val and final (mean over seeds, 95% interval),
    the 10th percentile over users, the paired statistics against ``baseline`` under ``rule``,
    compute and bytes."""
    rows = []
    base = runs[baseline]
    for name, seeds in runs.items():
        res = seeds[0].results
        metric = res["metrics"][0]
        row: dict[str, Any] = {"strategy": name, "seeds": len(seeds)}
        for headline_rule in HEADLINE_RULES:
            mean, low, high = mean_interval([run.headline(headline_rule) for run in seeds])
            row.update({f"{metric}_{headline_rule}": mean, f"{metric}_{headline_rule}_ci95_low": low,
                        f"{metric}_{headline_rule}_ci95_high": high})
        row[f"{metric}_p10"] = float(np.mean([np.percentile(list(r.scores[rule].values()), 10) for r in seeds]))
        diffs = paired_differences(metric, [r.scores[rule] for r in seeds], [r.scores[rule] for r in base])
        paired = paired_stats(diffs, {**seeds[0].n_test, **base[0].n_test})
        row.update({f"gain_vs_{baseline}": paired["mean_diff"], "wins": paired["wins"], "ties": paired["ties"],
                    "losses": paired["losses"], "wilcoxon_p": paired["wilcoxon_p"],
                    f"hurt_vs_{baseline}": paired["hurt_share"],
                    f"worse_than_{baseline}": paired["losses"] / paired["users"] if paired["users"] else math.nan})
        def mean_of(get: Callable[[dict[str, Any]], float], seeds: list[SeedRun] = seeds) -> float:
            return float(np.mean([get(r.results) for r in seeds]))

        row.update({
            "examples_per_user": mean_of(lambda r: r["compute"]["examples_processed_per_user_mean"]),
            "pretrain_examples": int(mean_of(lambda r: r["compute"]["driver_pretrain_examples"])),
            "bytes_total": int(mean_of(lambda r: r["communication"]["bytes_total"])),
            "wall_seconds": mean_of(lambda r: r["wall_seconds"]),
            "trainable_params_per_user": res["parameters"]["trainable_params_per_user"],
            "shared_params": res["parameters"]["shared_params"],
            "users_failed": int(max(r.results["summary"]["n_failed"] for r in seeds)),
        })
        rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:+.4f}" if value < 0 else f"{value:.4f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"
    return str(value)


def _with_interval(row: dict[str, Any], key: str) -> str:
    if math.isnan(row[key]):
        return "n/a"
    low, high = row[f"{key}_ci95_low"], row[f"{key}_ci95_high"]
    return f"{row[key]:.3f} [{low:.3f}, {high:.3f}]" if not math.isnan(low) else f"{row[key]:.3f} (one seed: n/a)"


def report(rows: list[dict[str, Any]], metric: str, baseline: str, rule: str, seeds: list[int]) -> str:
    """comparison.md: what was compared and how, then one line per strategy."""
    head = [f"Seeds {', '.join(map(str, seeds))} (model seed; the data seed is fixed, so the users are the same).",
            f"`{metric} best_val` / `{metric} final`: the headline (mean over users of the per-user test {metric} at "
            "the round chosen on validation / at the last round), mean over seeds with its 95% t-interval over seeds.",
            f"Per user against {baseline}, under `{rule}`: the paired difference (positive = better) averaged over "
            f"seeds; wins/ties/losses over users; the Wilcoxon signed-rank p across users; hurt = users worse by more "
            f"than one test example (1/n_test). p10: 10th percentile over users under `{rule}`, mean over seeds.", ""]
    cols = ["strategy", f"{metric} best_val", f"{metric} final", "p10", f"vs {baseline}", "wins/ties/losses",
            "Wilcoxon p", "hurt", "examples/user", "bytes communicated"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        is_base = row["strategy"] == baseline
        cells = [row["strategy"], _with_interval(row, f"{metric}_best_val"), _with_interval(row, f"{metric}_final"),
                 f"{row[f'{metric}_p10']:.3f}",
                 "–" if is_base else f"{row[f'gain_vs_{baseline}']:+.3f}",
                 "–" if is_base else f"{row['wins']}/{row['ties']}/{row['losses']}",
                 "–" if is_base else f"{row['wilcoxon_p']:.3g}",
                 "–" if is_base else f"{row[f'hurt_vs_{baseline}']:.0%}",
                 f"{row['examples_per_user']:.0f}", _cell(row["bytes_total"]) if row["bytes_total"] else "0"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(head + lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(out: Path, rounds: dict[str, list[dict[str, Any]]], per_user: dict[str, dict[str, float]], baseline: str,
         metric: str) -> None:
    """``rounds.png`` (score per round, mean over seeds) and ``distribution.png`` (per-user scores)."""
    plt = _pyplot()
    sign = -1 if metric in LOWER_IS_BETTER else 1
    order = sorted(per_user, key=lambda n: -sign * np.mean(list(per_user[n].values()) or [0]))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(sorted(per_user))}
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for name in order:
        pts = [(r["round"], r[metric]) for r in rounds[name] if metric in r]
        style = {"linewidth": 3, "color": "black"} if name == baseline else {"linewidth": 1.8, "color": colors[name]}
        ax.plot(*zip(*pts), marker="o", markersize=4, label=f"{name} (final {pts[-1][1]:.3f})" if pts else name, **style)
    ax.set_xlabel("round")
    ax.set_ylabel(f"test {metric} (mean over users and seeds; LaMP: over all questions)")
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


def scatter(out: Path, per_user: dict[str, dict[str, float]], rows: list[dict[str, Any]], baseline: str, metric: str,
            rule: str) -> Path:
    """``scatter.png``: one panel per strategy, each dot a user, its score against its ``baseline``
    score (both averaged over seeds), with the diagonal: a dot on the better side of it is a user
    the strategy helps."""
    plt = _pyplot()
    names = [n for n in per_user if n != baseline] or [baseline]
    stats = {row["strategy"]: row for row in rows}
    cols = min(3, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 4.2 * nrows), squeeze=False)
    values = [v for scores in per_user.values() for v in scores.values()]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    pad = 0.05 * (high - low or 1.0)
    better = "below" if metric in LOWER_IS_BETTER else "above"
    for ax, name in zip(axes.flat, names):
        users = [u for u in per_user[name] if u in per_user[baseline]]
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="grey", linestyle="--", linewidth=1)
        ax.scatter([per_user[baseline][u] for u in users], [per_user[name][u] for u in users], s=22, alpha=0.7)
        row = stats[name]
        ax.set_title(f"{name}: {row['wins']} better, {row['losses']} worse, {row['ties']} same\n"
                     f"mean {row[f'gain_vs_{baseline}']:+.3f}, Wilcoxon p={row['wilcoxon_p']:.2g}", fontsize=9)
        ax.set_xlim(low - pad, high + pad)
        ax.set_ylim(low - pad, high + pad)
        ax.set_aspect("equal")
        ax.set_xlabel(f"{baseline} {metric}")
        ax.set_ylabel(f"{name} {metric}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Each user's test {metric} against {baseline} (rounds by {rule}, mean over seeds); "
                 f"{better} the diagonal = better", fontsize=10)
    fig.tight_layout()
    path = out / "scatter.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def mean_rounds(seed_rounds: list[list[dict[str, Any]]], metric: str) -> list[dict[str, Any]]:
    """Per round, the score averaged over the seeds that evaluated it."""
    by_round: dict[int, list[float]] = {}
    for rounds in seed_rounds:
        for r in rounds:
            if metric in r:
                by_round.setdefault(r["round"], []).append(r[metric])
    return [{"round": k, metric: float(np.mean(v))} for k, v in sorted(by_round.items())]


def compare(names: list[str], baseline: str, config: Config, out: Path | None = None,
            runner: Callable[[Config], dict[str, Any]] | None = None) -> Path:
    """Run ``names`` one after the other, once per seed of ``compare.seeds`` (default: the
    config's seed), with the same users; write the comparison. ``runner`` runs one config
    (default: :func:`fedpeft.sim.run`) and returns its results."""
    if runner is None:
        from fedpeft.sim import run as runner

    out = (out or Path(config.output.dir) / f"compare-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(config.compare.seeds) or [config.seed]
    rule = config.compare.select
    runs: dict[str, list[SeedRun]] = {name: [] for name in names}
    for seed in seeds:
        for name in names:
            cfg = copy.deepcopy(config)
            cfg.federation.strategy, cfg.seed = name, seed
            folder = name if len(seeds) == 1 else f"{name}-seed{seed}"
            cfg.output.dir, cfg.output.name, cfg.output.store_dir = str(out), folder, ""
            cfg.wandb.group = cfg.wandb.group or out.name
            print(f"=== {name}, seed {seed} ===", flush=True)
            results = runner(cfg)
            runs[name].append(SeedRun.read(seed, out / folder, results, tuple(dict.fromkeys((*HEADLINE_RULES, rule)))))
    metric = runs[baseline][0].results["metrics"][0]
    rows = comparison_rows(runs, baseline, rule)
    with (out / "comparison.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "comparison.md").write_text(report(rows, metric, baseline, rule, seeds))
    per_user = {n: mean_over_seeds([r.scores[rule] for r in runs[n]]) for n in names}
    users = sorted(set().union(*[set(p) for p in per_user.values()]))
    with (out / "per_user.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", *names])
        for u in users:
            writer.writerow([u, *[per_user[n].get(u, "") for n in names]])
    plot(out, {n: mean_rounds([r.rounds for r in runs[n]], metric) for n in names}, per_user, baseline, metric)
    scatter(out, per_user, rows, baseline, metric, rule)
    return out


def mean_over_seeds(scores: list[dict[str, float]]) -> dict[str, float]:
    """Each user's score averaged over the seeds that scored it."""
    users = sorted(set().union(*[set(s) for s in scores]))
    return {u: float(np.mean([s[u] for s in scores if u in s])) for u in users}


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
