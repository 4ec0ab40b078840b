"""Where sharing pays: each strategy against local_only as users have fewer training examples.

    python sims/where_sharing_pays.py --strategies local_only,fedavg,fedsa --ks 4,8,16,all --seeds 0,1,2 \\
        [--compare-out DIR] [sim options, e.g. data.new_users=0.2 --benchmark peft-u/...]
    python sims/where_sharing_pays.py --resume STUDY_DIR        (or --report-only STUDY_DIR: see fedpeft/study/resume.py)

For each K of ``--ks`` it runs the comparison of fedpeft/study/compare.py (every strategy once per seed, on
the same users) with ``data.max_train_per_user=K`` (``all``: 0, every example) into ``<out>/K<k>``,
then writes into ``<out>``:

- ``where_sharing_pays.md`` / ``.csv``: per K and strategy, the common trained users (scored in
  every seed of every strategy) and their training examples per user, the trained users' headline
  under ``compare.select`` (mean over seeds, 95% t-interval) and its paired gain over the baseline
  (95% t-interval of the per-seed gains; with one seed, the Wilcoxon p across users instead), and
  the same for new users (``data.new_users``) when the runs have them;
- ``gain_by_k.png``: the gain over the baseline against K, one line per strategy, trained users
  solid, new users dashed, with the zero line;
- ``gain_by_activity.png``: the gain by activity bin (users binned by training examples,
  fedpeft.data.activity), at K = all (or the largest K when ``all`` is not among ``--ks``).

Every number is read back from the K folders' ``comparison.csv`` and ``by_activity.csv``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from fedpeft.config import FLAG_ALIASES, Config, ConfigError
from fedpeft.study.compare import add_arguments, compare, from_arguments, run_configs
from fedpeft.study.plots import interval_errors, pyplot, save_with_legend
from fedpeft.study.report import read_csv, write_csv

DEFAULT_KS = ",".join(Config().compare.train_caps)  # the schema's default
Row = dict[str, Any]


def parse_ks(text: str) -> list[int | str]:
    """``4,8,16,all`` -> [4, 8, 16, 'all']; each a whole number >= 1 or 'all', no repeats."""
    ks: list[int | str] = []
    for item in (part.strip() for part in text.split(",")):
        if item == "all":
            ks.append(item)
        elif item.isdigit() and int(item) >= 1:
            ks.append(int(item))
        else:
            raise ConfigError(f"--ks: {item!r} is not a count of training examples; give whole numbers >= 1 or 'all' "
                              f"(every example), comma separated, e.g. --ks {DEFAULT_KS}")
        if ks.count(ks[-1]) > 1:
            raise ConfigError(f"--ks: {item} is given twice ({text}); give each K once, e.g. --ks {DEFAULT_KS}")
    return ks


def build_parser() -> argparse.ArgumentParser:
    common = ", ".join(f"--{flag}" for flag in FLAG_ALIASES)
    parser = argparse.ArgumentParser(
        prog="python sims/where_sharing_pays.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog=f"Other arguments are those of python -m fedpeft.sim: --config FILE, KEY=VALUE (e.g. data.new_users=0.2, "
               f"compare.select=final) and its flags ({common}); see python -m fedpeft.sim --help. "
               "data.max_train_per_user is set by --ks.")
    add_arguments(parser, out_help="study folder [compare.out]: one comparison per K in <folder>/K<k>, the study's "
                                   "table and plots beside them (default: <output.dir>/where-sharing-pays-<time>)")
    parser.add_argument("--ks", help=f"training examples per user, comma list; 'all' = every example "
                                     f"(data.max_train_per_user=0) [compare.train_caps] (default: {DEFAULT_KS})")
    return parser


def parse_args(argv: list[str]) -> tuple[list[str], str, Path | None, Config, list[int | str]]:
    args, rest = build_parser().parse_known_args(argv)
    names, baseline, out, config = from_arguments(args, rest + ([f"compare.train_caps={args.ks}"] if args.ks else []))
    ks = parse_ks(",".join(config.compare.train_caps))
    if config.data.max_train_per_user:
        raise ConfigError(f"data.max_train_per_user={config.data.max_train_per_user}: this study sets it for each K of "
                          f"--ks; leave it out and give the Ks instead, e.g. --ks {config.data.max_train_per_user},all")
    return names, baseline, out, config, ks


def _nan(value: Any) -> float:
    return value if isinstance(value, float) else math.nan


def _count(value: Any) -> int:
    """A count read back from a csv; empty or NaN (a folder from before the column): 0."""
    return 0 if math.isnan(_nan(value)) else int(value)


def study_rows(k: int | str, comparison: list[Row], baseline: str, rule: str) -> list[Row]:
    """The study's rows of one K, from its comparison.csv (a strategy with a failed run: NaN
    scores, its status says why; ``majority``: each user's majority label, no model)."""
    rows = []
    for c in comparison:
        metric, gain = c["metric"], f"gain_vs_{baseline}"
        row: Row = {"K": k, "strategy": c["strategy"], "seeds": int(c["seeds"]), "status": c.get("status", "unknown"),
                    "status_seeds": c.get("status_seeds", ""), "status_reason": c.get("status_reason", ""),
                    "users": int(c["users_common"]), "users_all": int(c["users_all"]),
                    "users_lost": _count(c.get("users_lost")), "n_train_mean": _nan(c.get("n_train_mean")), metric: _nan(c.get(f"{metric}_{rule}")),
                    f"{metric}_ci95_low": _nan(c.get(f"{metric}_{rule}_ci95_low")),
                    f"{metric}_ci95_high": _nan(c.get(f"{metric}_{rule}_ci95_high")), gain: _nan(c.get(gain)),
                    f"{gain}_ci95_low": _nan(c.get(f"{gain}_ci95_low")), f"{gain}_ci95_high": _nan(c.get(f"{gain}_ci95_high")),
                    "wilcoxon_p": _nan(c.get("wilcoxon_p"))}
        if "new_users_common" in c and c["new_users_common"] != "":
            row.update({"new_users": int(c["new_users_common"]), "new_users_all": int(c["new_users_all"]),
                        "new_n_train_mean": _nan(c.get("new_n_train_mean")),
                        **{f"new_{key}": _nan(c.get(f"new_{key}")) for key in
                           (metric, f"{metric}_ci95_low", f"{metric}_ci95_high", gain, f"{gain}_ci95_low",
                            f"{gain}_ci95_high", "wilcoxon_p")}})
        rows.append(row)
    return rows


def _value_cell(row: Row, key: str, sign: str = "") -> str:
    if row.get("status") == "failed":
        return f"failed ({row['status_seeds']} seeds)"
    value = row.get(key, math.nan)
    if math.isnan(value):
        return "n/a"
    low, high = row[f"{key}_ci95_low"], row[f"{key}_ci95_high"]
    return f"{value:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]" if not math.isnan(low) else f"{value:{sign}.3f}"


def _gain_cell(row: Row, prefix: str, baseline: str) -> str:
    if row["strategy"] == baseline:
        return "–"
    key = f"{prefix}gain_vs_{baseline}"
    cell = _value_cell(row, key, "+")
    if row.get("status") != "failed" and cell != "n/a" and math.isnan(row[f"{key}_ci95_low"]) and not math.isnan(row[f"{prefix}wilcoxon_p"]):
        cell += f" (Wilcoxon p={row[f'{prefix}wilcoxon_p']:.2g})"
    return cell


def status_cell(row: Row) -> str:
    """A study row's status: ok, unknown (a run from before statuses), no model (majority),
    ``failed (k/n seeds)`` or ``degraded (k/n seeds)``."""
    status = row.get("status", "unknown")
    if status == "baseline":
        return "no model"
    return f"**{status} ({row['status_seeds']} seeds)**" if status in ("failed", "degraded") else status


def users_cell(row: Row) -> str:
    cell = f"{row['users']} of {row['users_all']}"
    return cell + f" ⚠ lost {row['users_lost']}" if row.get("users_lost") else cell


def report(rows: list[Row], metric: str, baseline: str, rule: str, seeds: list[int], names: list[str],
           runs: list[str] | None = None) -> str:
    has_new = any("new_users" in r for r in rows)
    lines = ["# Where sharing pays", "",
             f"Strategies {', '.join(names)} against {baseline}, seeds {', '.join(map(str, seeds))}; K = training examples "
             "per user (`data.max_train_per_user`, a seeded draw the same for every strategy; all = every example). "
             "Each K's own comparison is in `K<k>/comparison.md`.",
             f"users: the common trained users (scored in every seed of every strategy without a failed run), of all "
             f"the trained users (⚠ lost: users this strategy did not score, out of every strategy's common set); "
             f"examples/user: their mean training examples. status: the runs' (results.json; a strategy with a failed "
             f"run has no number). `majority`: each user's own most frequent training label, no model. `{metric}`: the "
             f"headline under `{rule}` (mean over users, mean over seeds, 95% t-interval over seeds); vs {baseline}: the "
             "paired gain (mean over the common users of each user's difference averaged over seeds, 95% t-interval "
             "of the per-seed gains; one seed: Wilcoxon p across users)."
             + (" new: the same for the new users (`data.new_users`), who never trained in rounds." if has_new else ""), ""]
    cols = ["K", "strategy", "status", "users", "examples/user", metric, f"vs {baseline}"]
    if has_new:
        cols += ["new users", "new examples/user", f"new {metric}", f"new vs {baseline}"]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [str(r["K"]), r["strategy"], status_cell(r), users_cell(r), f"{r['n_train_mean']:.1f}",
                 _value_cell(r, metric), _gain_cell(r, "", baseline)]
        if has_new:
            cells += ([f"{r['new_users']} of {r['new_users_all']}", f"{r['new_n_train_mean']:.1f}",
                       _value_cell(r, f"new_{metric}"), _gain_cell(r, "new_", baseline)] if "new_users" in r else ["–"] * 4)
        lines.append("| " + " | ".join(cells) + " |")
    if runs is not None:
        lines += ["", *(runs or ["Every run reports status ok (each K's runs.csv)."])]
    return "\n".join(lines) + "\n"


def runs_not_ok(folder: Path, label: str) -> list[str]:
    """One line per run of a comparison folder's runs.csv that is not plainly ok."""
    return [f"- {label}/{r['folder'] or r['strategy']}: **{r['status']}**" + (f": {r['status_reason']}" if r["status_reason"] else "")
            for r in read_csv(folder / "runs.csv") if r["status"] != "ok"]


def plot_gain_by_k(path: Path, rows: list[Row], ks: list[int | str], baseline: str, metric: str) -> None:
    plt = pyplot()
    names = list(dict.fromkeys(r["strategy"] for r in rows if r["strategy"] != baseline))
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(names):
        for prefix, style in (("", "-"), ("new_", "--")):
            key = f"{prefix}gain_vs_{baseline}"
            points = [(ks.index(r["K"]), r[key], r[f"{key}_ci95_low"], r[f"{key}_ci95_high"])
                      for r in rows if r["strategy"] == name and not math.isnan(r.get(key, math.nan))]
            if not points:
                continue
            x, y, low, high = zip(*points)
            ax.errorbar(x, y, yerr=interval_errors(y, low, high), linestyle=style, marker="s" if prefix else "o", capsize=3, color=plt.cm.tab10(i % 10),
                        label=f"{name} ({'new' if prefix else 'trained'} users)")
    ax.axhline(0, color="black", linewidth=1)
    ax.set_xticks(range(len(ks)), [str(k) for k in ks])
    ax.set_xlabel("training examples per user (K = data.max_train_per_user)")
    ax.set_ylabel(f"gain in test {metric} over {baseline}")
    ax.set_title(f"Where sharing pays: gain over {baseline} (bars: 95% interval over seeds)\n"
                 "solid = trained users, dashed = new users", fontsize=10)
    save_with_legend(fig, ax, path)


def plot_gain_by_activity(path: Path, activity: list[Row], k: int | str, baseline: str, metric: str) -> None:
    plt = pyplot()
    names = list(dict.fromkeys(r["strategy"] for r in activity if r["strategy"] != baseline))
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, name in enumerate(names):
        for group, style in (("trained", "-"), ("new", "--")):
            points = [(r["mean_examples"], r[f"gain_vs_{baseline}"], r["bin"]) for r in activity
                      if r["strategy"] == name and r["group"] == group]
            if not points:
                continue
            x, y, labels = zip(*points)
            ax.plot(x, y, linestyle=style, marker="o" if group == "trained" else "s", color=plt.cm.tab10(i % 10), label=f"{name} ({group} users)")
            for xi, yi, label in zip(x, y, labels):
                ax.annotate(label, (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.axhline(0, color="black", linewidth=1)
    ax.set_xlabel("training examples per user (each activity bin at its users' mean)")
    ax.set_ylabel(f"gain in test {metric} over {baseline}")
    ax.set_title(f"Gain over {baseline} by activity bin, K = {k}: solid = trained users, dashed = new users", fontsize=10)
    save_with_legend(fig, ax, path)


def k_config(config: Config, k: int | str) -> Config:
    """The config of K's comparison: ``data.max_train_per_user=K`` (all: 0)."""
    cfg = copy.deepcopy(config)
    cfg.data.max_train_per_user = 0 if k == "all" else int(k)
    cfg.compare.out = ""
    return cfg


def study_runs(names: list[str], config: Config, ks: list[int | str], out: Path) -> list[Config]:
    """Every run of the study, in the order it runs them."""
    return [cfg for k in ks for cfg in run_configs(names, k_config(config, k), out / f"K{k}")]


def study(names: list[str], baseline: str, config: Config, ks: list[int | str], out: Path | None = None,
          runner: Callable[[Config], dict[str, Any]] | None = None) -> Path:
    """One comparison per K into ``<out>/K<k>``, then the study's table and plots into ``out``."""
    out = (out or Path(config.output.dir) / f"where-sharing-pays-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    rule = config.compare.select
    rows: list[Row] = []
    not_ok: list[str] = []
    for k in ks:
        print(f"##### K = {k} #####", flush=True)
        folder = compare(names, baseline, k_config(config, k), out / f"K{k}", runner=runner)
        rows += study_rows(k, read_csv(folder / "comparison.csv"), baseline, rule)
        not_ok += runs_not_ok(folder, f"K{k}")
    metric = next(r for r in read_csv(out / f"K{ks[0]}" / "comparison.csv"))["metric"]
    write_csv(out / "where_sharing_pays.csv", rows)
    seeds = list(config.compare.seeds) or [config.seed]
    (out / "where_sharing_pays.md").write_text(report(rows, metric, baseline, rule, seeds, names,
                                                      ["Runs not plainly ok:", *not_ok] if not_ok else []))
    plot_gain_by_k(out / "gain_by_k.png", rows, ks, baseline, metric)
    k_all = "all" if "all" in ks else max(k for k in ks if k != "all")
    activity = read_csv(out / f"K{k_all}" / "by_activity.csv")
    if activity:
        plot_gain_by_activity(out / "gain_by_activity.png", activity, k_all, baseline, metric)
    return out


def main(argv: list[str] | None = None) -> int:
    from fedpeft.study.resume import StudyPlan, StudySpec, study_main

    def plan(args: list[str]) -> StudyPlan:
        names, baseline, out, config, ks = parse_args(args)
        return StudyPlan(config, out, {}, run=lambda folder, runner: study(names, baseline, config, ks, folder, runner),
                         runs=lambda folder: study_runs(names, config, ks, folder))

    spec = StudySpec("sims/where_sharing_pays.py", "where_sharing_pays.md", "study", "where-sharing-pays", plan)
    return study_main(spec, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
