"""A comparison's tables (fedpeft/compare.py): comparison.md (trained users, new users, by activity),
the csv files, per_user.csv."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.compare_runs import UserSet


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` as a csv, columns in the order they first appear (none: no file)."""
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def read_csv(path: Path) -> list[dict[str, Any]]:
    """A csv :func:`write_csv` wrote, numbers as floats (nan, inf included), text as text; no file: []."""
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: _number_or_text(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _number_or_text(text: str) -> Any:
    try:
        return float(text)
    except ValueError:
        return text


def write_per_user(path: Path, scores: dict[str, list[dict[str, float]]],
                   as_is: dict[str, list[dict[str, float]]] | None = None) -> None:
    """One row per user, one column per strategy: the user's score averaged over the seeds that
    scored it (empty: none did); ``as_is``: more columns ``<strategy> as is``."""
    columns = {**scores, **{f"{n} as is": s for n, s in (as_is or {}).items()}}
    means = {name: mean_over_seeds(seeds) for name, seeds in columns.items()}
    users = sorted(set().union(*[set(m) for m in means.values()]))
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", *columns])
        for u in users:
            writer.writerow([u, *[means[n].get(u, "") for n in columns]])


def mean_over_seeds(scores: list[dict[str, float]]) -> dict[str, float]:
    """Each user's score averaged over the seeds that scored it."""
    users = sorted(set().union(*[set(s) for s in scores]))
    return {u: float(np.mean([s[u] for s in scores if u in s])) for u in users}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:+.4f}" if value < 0 else f"{value:.4f}"
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k"
    return str(value)


def _md(text: str) -> str:
    return str(text).replace("|", "\\|")


def _with_interval(row: dict[str, Any], key: str, sign: str = "") -> str:
    if key not in row or math.isnan(row[key]):
        return "n/a"
    low, high = row[f"{key}_ci95_low"], row[f"{key}_ci95_high"]
    value = f"{row[key]:{sign}.3f}"
    return f"{value} [{low:{sign}.3f}, {high:{sign}.3f}]" if not math.isnan(low) else f"{value} (one seed: n/a)"


def _paired_cells(row: dict[str, Any], baseline: str, prefix: str = "") -> list[str]:
    """vs baseline (with its interval over seeds), wins/ties/losses, Wilcoxon p, hurt."""
    gain = f"{prefix}gain_vs_{baseline}"
    if math.isnan(row[gain]):
        return ["n/a"] * 4
    interval = _with_interval(row, gain, "+").replace(" (one seed: n/a)", "")
    return [interval, f"{row[f'{prefix}wins']}/{row[f'{prefix}ties']}/{row[f'{prefix}losses']}",
            f"{row[f'{prefix}wilcoxon_p']:.3g}", f"{row[f'{prefix}hurt_vs_{baseline}']:.0%}"]


def _table(cols: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols), *["| " + " | ".join(r) + " |" for r in rows]]


def _users_line(users: UserSet, what: str, but: str = "") -> str:
    text = (f"**{what}: {len(users.common)} of {len(users.everyone)}**, those scored in every seed of every strategy; "
            f"every headline and paired statistic below is over them{but}.")
    left = sorted({u for why in users.left_out.values() for u in why})
    if left:
        who = [f"{u} ({'; '.join(f'{n}: {why[u]}' for n, why in users.left_out.items() if u in why)})" for u in left[:10]]
        text += " Left out: " + _md(", ".join(who)) + (f" and {len(left) - 10} more" if len(left) > 10 else "") + "."
    return text


def _epsilon_cell(epsilon: float) -> str:
    """User-level epsilon spent on the shared part: ∞ without DP, 0 when nothing is shared."""
    if math.isnan(epsilon):
        return "n/a"
    return "∞" if math.isinf(epsilon) else f"{epsilon:.3g}"


def report(rows: list[dict[str, Any]], metric: str, baseline: str, rule: str, seeds: list[int], trained: UserSet,
           new: UserSet, activity: list[dict[str, Any]]) -> str:
    """comparison.md: what was compared and how, then one line per strategy (trained users), the
    new users, and both by activity."""
    head = [f"Seeds {', '.join(map(str, seeds))} (model seed; the data seed is fixed, so the users are the same).",
            _users_line(trained, "Trained users", " (but `all scored users`)"),
            f"`{metric} best_val` / `{metric} final`: the headline (mean over users of the per-user test {metric} at "
            "the round chosen on validation / at the last round), mean over seeds with its 95% t-interval over seeds; "
            "`all scored users`: the same mean over each run's own scored users instead (not paired).",
            f"Per user against {baseline}, under `{rule}`: the paired difference (positive = better) averaged over "
            f"seeds, with the 95% t-interval of the per-seed mean differences; wins/ties/losses over users; the "
            f"Wilcoxon signed-rank p across users; hurt = users worse by more than one test example (1/n_test). "
            f"p10: 10th percentile over users under `{rule}`, mean over seeds. left out: users this strategy did not "
            "score in every seed, and why. ε: the user-level privacy budget each run spent on its shared part "
            "(privacy.*; mean over seeds; ∞ = shared without differential privacy, 0 = shares nothing).", ""]
    cols = ["strategy", f"{metric} best_val", f"{metric} final", "p10", f"vs {baseline}", "wins/ties/losses",
            "Wilcoxon p", "hurt", "left out", f"{metric} best_val, all scored users", "examples/user", "bytes communicated", "ε"]
    cells = []
    for row in rows:
        paired = ["–"] * 4 if row["strategy"] == baseline else _paired_cells(row, baseline)
        all_scored = row[f"{metric}_best_val_all_scored"]
        cells.append([row["strategy"], _with_interval(row, f"{metric}_best_val"), _with_interval(row, f"{metric}_final"),
                      f"{row[f'{metric}_p10']:.3f}", *paired, _md(row["left_out_why"]),
                      "n/a" if math.isnan(all_scored) else f"{all_scored:.3f}",
                      f"{row['examples_per_user']:.0f}", _cell(row["bytes_total"]) if row["bytes_total"] else "0",
                      _epsilon_cell(row.get("epsilon", math.nan))])
    lines = head + _table(cols, cells)
    if new.everyone:
        lines += ["", "## New users", "", _users_line(new, "New users (data.new_users)"),
                  "They never trained in rounds: at the end each took the final shared part, fine-tuned its private part "
                  f"on its own training split and was scored once (the same under every rule). `{metric}`: mean over "
                  f"users, mean over seeds with its 95% t-interval; vs {baseline}: against {baseline}'s new users, as "
                  "above. `as is`: the global model before the fine-tune (strategies with nothing private).", ""]
        new_cells = []
        for row in rows:
            for label, prefix in ((row["strategy"], "new_"), (f"{row['strategy']}, as is", "new_as_is_")):
                if f"{prefix}{metric}" not in row or (prefix == "new_as_is_" and math.isnan(row[f"{prefix}{metric}"])):
                    continue
                paired = ["–"] * 4 if label == baseline else _paired_cells(row, baseline, prefix)
                new_cells.append([label, _with_interval(row, f"{prefix}{metric}"), *paired,
                                  _md(row["new_left_out_why"]) if prefix == "new_" else "–"])
        lines += _table(["strategy", metric, f"vs {baseline}", "wins/ties/losses", "Wilcoxon p", "hurt", "left out"],
                        new_cells)
    lines += ["", "## By activity", ""]
    if activity:
        lines += [f"Users binned by their training examples (`n_train`), once, over the common users of each group, from "
                  f"{baseline}'s runs: cut into thirds by count, users with the same `n_train` in the same bin "
                  f"(fedpeft.activity). `{metric}`: mean over the bin's users of their score under `{rule}` (new "
                  f"users: their one score) averaged over seeds; vs {baseline}: the mean paired difference.", ""]
        lines += _table(["group", "bin", "users", "examples", "strategy", metric, f"vs {baseline}"],
                        [[r["group"], r["bin"], str(r["users"]), f"{r['min_examples']}–{r['max_examples']}", r["strategy"],
                          f"{r[metric]:.3f}", "–" if r["strategy"] == baseline else f"{r[f'gain_vs_{baseline}']:+.3f}"]
                         for r in activity])
    else:
        lines.append("No activity bins: the run folders' per_user.csv has no `n_train` column for the common users "
                     "(written by runs that report it), or no user is common.")
    return "\n".join(lines) + "\n"
