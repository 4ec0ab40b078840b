"""A comparison's tables (fedpeft/study/compare.py): comparison.md (trained users, new users, by activity),
the csv files, per_user.csv."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.study.runs import UserSet
from fedpeft.study.status import BASELINE_STATUS, DEGRADED, FAILED, runs_section


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
    text = (f"**{what}: {len(users.common)} of {len(users.everyone)}**, those scored in every seed of every strategy "
            f"without a failed run; every headline and paired statistic below is over them{but}.")
    lost = {name: len(why) for name, why in users.left_out.items() if why}
    if lost:
        text += (" **Lost users** (out of every strategy's common set because these strategies did not score them): "
                 + ", ".join(f"{name} {count}" for name, count in lost.items()) + ".")
    left = sorted({u for why in users.left_out.values() for u in why})
    if left:
        who = [f"{u} ({'; '.join(f'{n}: {why[u]}' for n, why in users.left_out.items() if u in why)})" for u in left[:10]]
        text += " Left out: " + _md(", ".join(who)) + (f" and {len(left) - 10} more" if len(left) > 10 else "") + "."
    if users.failed:
        text += (f" Not in the common set: {', '.join(users.failed)}, with a failed run (no headline; a run that did not "
                 "train must not shrink the others' users).")
    return text


def _epsilon_cell(row: dict[str, Any]) -> str:
    """User-level epsilon spent on the shared part: ∞ without DP, 0 when nothing is shared; with
    DP, the δ and the population n it holds for (each run's results.json ``privacy``)."""
    epsilon = row.get("epsilon", math.nan)
    if not isinstance(epsilon, float) or math.isnan(epsilon):
        return "n/a"
    if math.isinf(epsilon):
        return "∞"
    cell = f"{epsilon:.3g}"
    delta, n = row.get("delta", math.nan), row.get("population_size", math.nan)
    if not (isinstance(delta, float) and math.isnan(delta)) and epsilon > 0:
        cell += f" (δ={delta:.2g}, n={n:.0f})" if isinstance(delta, float) and isinstance(n, (int, float)) else f" (δ={delta}, n={n})"
    return cell


def _number(value: Any, digits: str = ".3f") -> str:
    return "n/a" if not isinstance(value, (int, float)) or math.isnan(value) else f"{value:{digits}}"


def _strategy_cells(row: dict[str, Any], metric: str, baseline: str, prefix: str = "") -> list[str]:
    """A row's headline cells: common users (interval), all users (lost count beside), and for
    trained users final and p10; ``failed (k/n seeds)`` where the strategy has a failed run."""
    failed = row.get("status") == FAILED
    if failed:
        return [f"failed ({row['status_seeds']} seeds)"] * (4 if not prefix else 2)
    lost = row.get(f"{prefix}users_lost", 0) or 0
    all_users = _number(row.get(f"{prefix}{metric}_all_users" if prefix else f"{metric}_best_val_all_users"))
    all_users += f" ({lost:.0f} lost)" if lost else ""
    plain = row.get("status") == BASELINE_STATUS  # no seeds: no interval
    key = f"{prefix}{metric}" if prefix else f"{metric}_best_val"
    cells = [_number(row[key]) if plain else _with_interval(row, key), all_users]
    if not prefix:
        cells += [_number(row[f"{metric}_final"]) if plain else _with_interval(row, f"{metric}_final"),
                  _number(row[f"{metric}_p10"])]
    return cells


def _status_cell(row: dict[str, Any]) -> str:
    status = row.get("status", "")
    if status == BASELINE_STATUS:
        return "no model"
    if status in (FAILED, DEGRADED):
        return f"**{status} ({row['status_seeds']} seeds)**: " + _md(row["status_reason"])
    return status


def _name_cell(row: dict[str, Any], prefix: str = "") -> str:
    """The strategy, flagged ⚠ when it lost users or a run of it was degraded."""
    flagged = row.get(f"{prefix}users_lost", 0) or row.get("status") == DEGRADED
    return f"{row['strategy']} ⚠" if flagged else row["strategy"]


def _lost_cell(row: dict[str, Any], prefix: str = "") -> str:
    if row.get("status") == FAILED and not prefix:
        return "–"
    why = _md(row.get(f"{prefix}lost_why", "0"))
    return f"⚠ {why}" if row.get(f"{prefix}users_lost", 0) else why


def report(rows: list[dict[str, Any]], metric: str, baseline: str, rule: str, seeds: list[int], trained: UserSet,
           new: UserSet, activity: list[dict[str, Any]], majority_note: str = "",
           runs: list[dict[str, Any]] | None = None) -> str:
    """comparison.md: what was compared and how, then one line per strategy (trained users) and the
    majority label, the new users, both by activity, and the runs that are not plainly ok."""
    head = [f"Seeds {', '.join(map(str, seeds))} (model seed; the data seed is fixed, so the users are the same).",
            _users_line(trained, "Trained users", " (but `all users`)"),
            f"`{metric} best_val` / `{metric} final`: the headline (mean over users of the per-user test {metric} at "
            "the round chosen on validation / at the last round), mean over seeds with its 95% t-interval over seeds; "
            "`all users`: the same over every user each run scored; a strategy's lost users (users it did not score in "
            "every seed) are excluded there and counted beside it, not given an imputed score. status: the runs' "
            "(results.json); a strategy with a failed run has no number (`failed (k/n seeds)`); ⚠: it lost users or a "
            "run was degraded. `majority`: each user predicts its own most frequent training label (no model; "
            "fedpeft.study.majority), scored like the runs over the same users.",
            f"Per user against {baseline}, under `{rule}`: the paired difference (positive = better) averaged over "
            f"seeds, with the 95% t-interval of the per-seed mean differences; wins/ties/losses over users; the "
            f"Wilcoxon signed-rank p across users; hurt = users worse by more than one test example (1/n_test). "
            f"p10: 10th percentile over users under `{rule}`, mean over seeds. lost users: users this strategy did not "
            "score in every seed, and why. ε: the user-level privacy budget each run spent on its shared part, at "
            "δ over a population of n users (privacy.*; mean over seeds; ∞ = shared without differential privacy, "
            "0 = shares nothing).", ""]
    cols = ["strategy", "status", f"{metric} best_val", f"{metric} best_val, all users", f"{metric} final", "p10",
            f"vs {baseline}", "wins/ties/losses", "Wilcoxon p", "hurt", "lost users", "examples/user",
            "bytes communicated", "ε"]
    cells = []
    for row in rows:
        failed = row.get("status") == FAILED
        paired = ["–"] * 4 if row["strategy"] == baseline or failed else _paired_cells(row, baseline)
        costs = ["–"] * 3 if failed or row.get("status") == BASELINE_STATUS else [
            f"{row['examples_per_user']:.0f}", _cell(row["bytes_total"]) if row["bytes_total"] else "0", _epsilon_cell(row)]
        cells.append([_name_cell(row), _status_cell(row), *_strategy_cells(row, metric, baseline), *paired,
                      _lost_cell(row), *costs])
    lines = head + _table(cols, cells)
    if majority_note:
        lines += ["", f"No `majority` row: {_md(majority_note)}."]
    if new.everyone:
        lines += ["", "## New users", "", _users_line(new, "New users (data.new_users)"),
                  "They never trained in rounds: at the end each took the final shared part, fine-tuned its private part "
                  f"on its own training split and was scored once (the same under every rule). `{metric}`: mean over "
                  f"users, mean over seeds with its 95% t-interval; vs {baseline}: against {baseline}'s new users, as "
                  "above. `as is`: the global model before the fine-tune (strategies with nothing private). "
                  "`majority`: each new user's own most frequent training label.", ""]
        new_cells = []
        for row in rows:
            if row.get("status") == FAILED:
                new_cells.append([row["strategy"], *_strategy_cells(row, metric, baseline, "new_"), *["–"] * 4, "–"])
                continue
            for label, prefix in ((row["strategy"], "new_"), (f"{row['strategy']}, as is", "new_as_is_")):
                if f"{prefix}{metric}" not in row or (prefix == "new_as_is_" and math.isnan(row[f"{prefix}{metric}"])):
                    continue
                paired = ["–"] * 4 if label == baseline else _paired_cells(row, baseline, prefix)
                if prefix == "new_":
                    new_cells.append([_name_cell(row, prefix), *_strategy_cells(row, metric, baseline, prefix), *paired,
                                      _lost_cell(row, prefix)])
                else:
                    new_cells.append([label, _with_interval(row, f"{prefix}{metric}"), "–", *paired, "–"])
        lines += _table(["strategy", metric, f"{metric}, all users", f"vs {baseline}", "wins/ties/losses", "Wilcoxon p",
                         "hurt", "lost users"], new_cells)
    lines += ["", "## By activity", ""]
    if activity:
        lines += [f"Users binned by their training examples (`n_train`), once, over the common users of each group, from "
                  f"{baseline}'s runs: cut into thirds by count, users with the same `n_train` in the same bin "
                  f"(fedpeft.data.activity). `{metric}`: mean over the bin's users of their score under `{rule}` (new "
                  f"users: their one score) averaged over seeds; vs {baseline}: the mean paired difference.", ""]
        lines += _table(["group", "bin", "users", "examples", "strategy", metric, f"vs {baseline}"],
                        [[r["group"], r["bin"], str(r["users"]), f"{r['min_examples']}–{r['max_examples']}", r["strategy"],
                          f"{r[metric]:.3f}", "–" if r["strategy"] == baseline else f"{r[f'gain_vs_{baseline}']:+.3f}"]
                         for r in activity])
    else:
        lines.append("No activity bins: the run folders' per_user.csv has no `n_train` column for the common users "
                     "(written by runs that report it), no user is common, or the baseline failed.")
    if runs is not None:
        lines += ["", "## Runs", "", *runs_section(runs)]
    return "\n".join(lines) + "\n"
