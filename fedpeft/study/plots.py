"""A comparison's plots (fedpeft/study/compare.py): rounds.png, distribution.png, scatter.png, activity.png."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.data.activity import ActivityBin, activity_bins, bin_means
from fedpeft.learning.metrics import LOWER_IS_BETTER

FEW_VALUES = 6  # activity.png: up to this many distinct n_train, one point each; more: the activity bins


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def interval_errors(values, lows, highs) -> list[list[float]]:
    """``errorbar``'s yerr for values with 95% intervals (a NaN bound: no bar on that side)."""
    return [[max(0.0, v - lo) if not math.isnan(lo) else 0.0 for v, lo in zip(values, lows)],
            [max(0.0, hi - v) if not math.isnan(hi) else 0.0 for v, hi in zip(values, highs)]]


def save_with_legend(fig: Any, ax: Any, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Grid, the legend outside on the right, then the file (the figure is closed; ``metadata``:
    text chunks of the PNG, e.g. its Description)."""
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130, metadata=metadata)
    pyplot().close(fig)
    return path


def plot(out: Path, rounds: dict[str, list[dict[str, Any]]], per_user: dict[str, dict[str, float]], baseline: str,
         metric: str) -> None:
    """``rounds.png`` (score per round, mean over seeds, over each run's own users) and
    ``distribution.png`` (``per_user``: the common users' scores averaged over seeds)."""
    plt = pyplot()
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
    if baseline in per_user:  # a baseline with a failed run has no scores
        ax.axhline(np.mean(list(per_user[baseline].values()) or [math.nan]), color="black", linestyle="--", linewidth=1,
                   label=f"{baseline} mean")
    ax.set_ylabel(f"per-user test {metric}")
    ax.set_title("Per-user score distribution (box: quartiles, diamond: mean, dots: users)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "distribution.png", dpi=130)
    plt.close(fig)


def scatter(out: Path, per_user: dict[str, dict[str, float]], rows: list[dict[str, Any]], baseline: str, metric: str,
            rule: str) -> Path:
    """``scatter.png``: one panel per strategy, each dot a common user, its score against its
    ``baseline`` score (both averaged over seeds), with the diagonal: a dot on the better side of it is a user
    the strategy helps."""
    plt = pyplot()
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


def activity_points(scores: dict[str, float], n_train: dict[str, int]) -> list[tuple[float, float]]:
    """(training examples, mean score) per point: each distinct ``n_train`` when there are at most
    FEW_VALUES of them, else per activity bin (x: the mean ``n_train`` of its users)."""
    users = {u: n_train[u] for u in scores if u in n_train}
    values = sorted(set(users.values()))
    groups = ([ActivityBin(str(v), v, v, [u for u in users if users[u] == v]) for v in values]
              if len(values) <= FEW_VALUES else activity_bins(users))
    rows = bin_means(groups, {u: {"score": s} for u, s in scores.items()}, ["score"], users)
    return [(row["mean_examples"], row["score"]) for row in rows]


def activity_plot(out: Path, means: dict[str, dict[str, dict[str, float]]], n_train: dict[str, int], baseline: str,
                  metric: str, rule: str) -> Path | None:
    """``activity.png``: the headline against training examples per user, one line per strategy
    (the baseline in black), trained users solid, new users dashed. ``means[group][strategy][user]``:
    the user's score averaged over seeds. None (no file) when no user has an ``n_train``."""
    if not any(u in n_train for group in means.values() for scores in group.values() for u in scores):
        return None
    plt = pyplot()
    names = sorted({name for group in means.values() for name in group})
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    for group, style in (("trained", "-"), ("new", "--")):
        for name, scores in means.get(group, {}).items():
            points = activity_points(scores, n_train)
            if not points:
                continue
            color, width = ("black", 2.6) if name == baseline else (colors[name], 1.6)
            ax.plot(*zip(*points), linestyle=style, marker="o" if group == "trained" else "s", markersize=4, color=color, linewidth=width,
                    label=f"{name} ({group} users)")
    xs = [x for line in ax.get_lines() for x in line.get_xdata()]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel("training examples per user (n_train; a point per value, or per activity bin: its mean)")
    ax.set_ylabel(f"test {metric} (mean over users, {rule}; mean over seeds)")
    ax.set_title("Score by user activity: solid = trained users, dashed = new users", fontsize=10)
    return save_with_legend(fig, ax, out / "activity.png")
