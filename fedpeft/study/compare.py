"""Run several strategies on the same users, once per model seed; compare them side by side.

    python sims/compare.py --strategies local_only,fedavg,fedsa [--seeds 0,1,2] [--config FILE] [KEY=VALUE ...]
    python sims/compare.py --resume STUDY_DIR        (or --report-only STUDY_DIR)

Every run is checked before the first starts, and the study's arguments are recorded in
``study.json``: ``--resume`` keeps finished runs, continues interrupted ones and runs missing
ones; ``--report-only`` rebuilds the tables and plots from what is there (fedpeft.study.resume).

Each strategy runs once per seed of ``compare.seeds`` (the model seed ``seed``; ``data.seed`` stays
fixed, so the users are the same). Every number is computed over ONE common set of users, those
scored in every seed of every strategy without a failed run (fedpeft.study.runs); who was left
out, and which strategy lost them, is in the table. Each run's status (results.json: ok, degraded,
failed; fedpeft.study.status) is shown: a run that raises is recorded as failed and the others go
on, a strategy with a failed run has no number (``failed (k/n seeds)``), a degraded one or one that
lost users is flagged. Writes into one folder: ``comparison.md`` / ``comparison.csv`` (per
strategy: its status, the headline, the mean over users of per-user test scores, under
``best_val`` and ``final`` (fedpeft.federation.selection), as the mean over seeds with its 95% t-interval, and
beside it the mean over all users each run scored, its lost users counted beside it; the 10th
percentile over users; per user against the baseline, under ``compare.select``, the paired
difference averaged over seeds with the 95% t-interval of the per-seed gains, wins, ties and
losses, the Wilcoxon signed-rank p across users and the share of users hurt by more than one test
example (fedpeft.study.stats); local compute as examples processed per user (forward +
backward passes, every pass of every round: fedrep's head epochs and feddpa's two passes count)
and centrally before the simulation (pooled oppu), bytes communicated, wall time, parameters, ε
with its δ and n; the same for new users, ``data.new_users``, with their own common set, and "as
is" before their fine-tune where the run has it; and a ``majority`` row, each user's own most
frequent training label over the same users, fedpeft.study.majority_row), ``runs.csv`` (every
run's status), ``by_activity.csv`` and ``activity.png`` (users binned by training examples,
fedpeft.data.activity), ``per_user.csv`` (one score column per strategy, averaged over seeds;
``per_user_new.csv`` for new users), ``scatter.png`` (each common user against the baseline, one
panel per strategy), ``rounds.png``, ``distribution.png``, and each run's own folder
(``<strategy>``, or ``<strategy>-seed<s>`` with several seeds).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpeft.cli import config_from_args
from fedpeft.config import Config
from fedpeft.data.activity import activity_bins, bin_means
from fedpeft.learning.metrics import gain
from fedpeft.strategies import STRATEGIES, get_strategy_class
from fedpeft.study.runs import NEW, TRAINED, SeedRun, UserSet, metric_of, reference_run, user_set
from fedpeft.study.stats import mean_interval, paired_differences, paired_stats
from fedpeft.study.status import privacy_columns, run_one, run_rows, status_columns

if TYPE_CHECKING:
    from fedpeft.study.resume import StudySpec

HEADLINE_RULES = ("best_val", "final")  # the table gives the headline under both
Runner = Callable[[Config], dict[str, Any]]


def add_arguments(parser: argparse.ArgumentParser,
                  out_help: str = "comparison folder [compare.out] (default: <output.dir>/compare-<time>)") -> None:
    """The options that stand for the ``compare.*`` keys (``--compare-out``: compare.out)."""
    parser.add_argument("--strategies", help=f"comma list or 'all' [compare.strategies] ({', '.join(sorted(STRATEGIES))})")
    parser.add_argument("--baseline", help="strategy the gains are measured against [compare.baseline] (default: local_only)")
    parser.add_argument("--compare-out", help=out_help)
    parser.add_argument("--seeds", help="model seeds, comma list [compare.seeds] (default: the run's seed)")
    parser.add_argument("--resume", metavar="STUDY_DIR",
                        help="continue the study in STUDY_DIR with its own arguments (its study.json): finished runs "
                             "are kept, interrupted ones resumed, missing ones run, and the report is rebuilt")
    parser.add_argument("--report-only", metavar="STUDY_DIR",
                        help="rebuild the tables and plots of STUDY_DIR from the runs it holds; runs missing or "
                             "unfinished are listed as such; nothing runs")


def from_arguments(args: argparse.Namespace, rest: list[str]) -> tuple[list[str], str, Path | None, Config]:
    """The strategies (the baseline first if it was not named), the baseline, the folder and the
    config, from :func:`add_arguments`' options and the sim arguments ``rest``."""
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


def parse_args(argv: list[str]) -> tuple[list[str], str, Path | None, Config]:
    """``--strategies``, ``--baseline``, ``--compare-out`` and ``--seeds`` stand for the ``compare.*`` keys;
    everything else is an argument of ``python -m fedpeft.sim``."""
    parser = argparse.ArgumentParser(prog="python sims/compare.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Other arguments are those of python -m fedpeft.sim (flags, --config, KEY=VALUE).")
    add_arguments(parser)
    args, rest = parser.parse_known_args(argv)
    return from_arguments(args, rest)


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if len(values) else math.nan


def headline(run: SeedRun, rule: str, users: Sequence[str] | None = None) -> float:
    """The run's headline under ``rule``: the mean over ``users`` (default: every user it scored);
    LaMP: its corpus-level score over all questions, which is the final model's (no validation
    split, so no other rule), whoever ``users`` are."""
    if run.results.get("headline") == "corpus":
        return float(run.results["summary"][run.results["metrics"][0]]) if rule == "final" else math.nan
    scores = run.scores[rule]
    return _mean([scores[u] for u in (scores if users is None else users)])


def paired_columns(metric: str, scores: list[dict[str, float]], base: list[dict[str, float]], users: Sequence[str],
                   n_test: dict[str, int], baseline: str, prefix: str = "") -> dict[str, Any]:
    """Against ``baseline`` over ``users`` (scored in every seed of both): the per-user difference
    averaged over seeds (its mean, with the 95% t-interval of the per-seed mean differences, seed
    i against the baseline's seed i), wins/ties/losses, Wilcoxon's p, the share hurt and worse."""
    ours = [{u: s[u] for u in users} for s in scores]
    theirs = [{u: b[u] for u in users} for b in base]
    paired = paired_stats(paired_differences(metric, ours, theirs), n_test)
    per_seed = [_mean([gain(metric, s[u], b[u]) for u in users]) for s, b in zip(ours, theirs, strict=True)]
    _, low, high = mean_interval(per_seed) if users else (math.nan, math.nan, math.nan)
    key = f"{prefix}gain_vs_{baseline}"
    return {key: paired["mean_diff"], f"{key}_ci95_low": low, f"{key}_ci95_high": high, f"{prefix}wins": paired["wins"],
            f"{prefix}ties": paired["ties"], f"{prefix}losses": paired["losses"], f"{prefix}wilcoxon_p": paired["wilcoxon_p"],
            f"{prefix}hurt_vs_{baseline}": paired["hurt_share"],
            f"{prefix}worse_than_{baseline}": paired["losses"] / paired["users"] if paired["users"] else math.nan}


def _interval(key: str, values: list[float]) -> dict[str, float]:
    mean, low, high = mean_interval(values)
    return {key: mean, f"{key}_ci95_low": low, f"{key}_ci95_high": high}


def spent_epsilon(results: dict[str, Any]) -> float:
    """The user-level epsilon a run spent on its shared part (results.json ``privacy``; None, or
    null read back from results.json (fedpeft.files.json_value: NaN), which is how it stores ∞:
    unbounded, a run that shared without DP or without noise); NaN for a run from before privacy."""
    privacy = results.get("privacy")
    if not isinstance(privacy, dict):
        return math.nan
    epsilon = privacy.get("epsilon")
    return float(epsilon) if epsilon is not None and math.isfinite(epsilon) else math.inf


def comparison_rows(runs: dict[str, list[SeedRun]], baseline: str, rule: str, trained: UserSet) -> list[dict[str, Any]]:
    """One row per strategy, over the common trained users: the headline under best_val and final
    (and ``rule``; mean over seeds, 95% interval), each beside its mean over all users the
    strategy's runs scored (``_all_users``: the users it lost are excluded, and counted beside it in
    ``users_lost``: an untrained model's score is not measured by the runs, and any stand-in for it
    would be a number nobody measured), the 10th percentile over users, the paired statistics
    against ``baseline`` under ``rule``, its status and lost users, compute and bytes. A strategy
    with a failed run has no score columns at all."""
    rows = []
    common = trained.common
    ref = reference_run(runs, baseline, trained)
    n_train = ref.n_train if ref else {}
    for name, seeds in runs.items():
        res = seeds[0].results
        metric = metric_of(runs)
        row: dict[str, Any] = {"strategy": name, "metric": metric, "seeds": len(seeds), "users_common": len(common),
                               "users_all": len(trained.everyone), **status_columns(name, seeds, trained),
                               **privacy_columns(seeds)}
        if name in trained.failed:
            rows.append(row)
            continue
        for headline_rule in dict.fromkeys((*HEADLINE_RULES, rule)):
            row.update(_interval(f"{metric}_{headline_rule}", [headline(run, headline_rule, common) for run in seeds]))
        for headline_rule in HEADLINE_RULES:
            row[f"{metric}_{headline_rule}_all_users"] = _mean([headline(run, headline_rule) for run in seeds])
        row[f"{metric}_p10"] = _mean([float(np.percentile([r.scores[rule][u] for u in common], 10)) for r in seeds]) \
            if common else math.nan
        row.update(paired_or_nan(metric, [r.scores[rule] for r in seeds], runs, baseline, trained,
                                 lambda r: r.scores[rule], seeds[0].n_test))
        row["n_train_mean"] = _mean([n_train[u] for u in common]) if all(u in n_train for u in common) else math.nan

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
            "epsilon": mean_of(spent_epsilon),
            "noise_multiplier": mean_of(lambda r: (r.get("privacy") or {}).get("noise_multiplier", math.nan)),
        })
        rows.append(row)
    return rows


def paired_or_nan(metric: str, scores: list[dict[str, float]], runs: dict[str, list[SeedRun]], baseline: str,
                  users: UserSet, pick: Callable[[SeedRun], dict[str, float]], n_test: dict[str, int],
                  prefix: str = "") -> dict[str, Any]:
    """:func:`paired_columns` against the baseline's runs (``pick``: their scores) over the common
    users; NaN columns when the baseline failed (nothing to pair with)."""
    if baseline in users.failed:
        key = f"{prefix}gain_vs_{baseline}"
        return {k: math.nan for k in (key, f"{key}_ci95_low", f"{key}_ci95_high", f"{prefix}wins", f"{prefix}ties",
                                      f"{prefix}losses", f"{prefix}wilcoxon_p", f"{prefix}hurt_vs_{baseline}",
                                      f"{prefix}worse_than_{baseline}")}
    base = runs[baseline]
    return paired_columns(metric, scores, [pick(r) for r in base], users.common, {**n_test, **base[0].n_test}, baseline,
                          prefix)


def new_user_rows(runs: dict[str, list[SeedRun]], baseline: str, new: UserSet) -> dict[str, dict[str, Any]]:
    """Per strategy, over the common new users (none in the runs: {}): their headline (mean over
    seeds, 95% interval), the paired statistics against the baseline's new users, the users it
    lost; and, where every seed has it for every common new user, the same "as is" (the global
    model before the fine-tune) against the baseline's (fine-tuned) new users. A strategy with a
    failed run: its lost users only."""
    if not new.everyone:
        return {}
    common = new.common
    ref = reference_run(runs, baseline, new)
    n_train = ref.n_train if ref else {}
    metric = metric_of(runs)
    out = {}
    for name, seeds in runs.items():
        row: dict[str, Any] = {"new_users_common": len(common), "new_users_all": len(new.everyone),
                               **status_columns(name, seeds, new, "new_"),
                               "new_n_train_mean": _mean([n_train[u] for u in common]) if all(u in n_train for u in common) else math.nan}
        out[name] = row
        if name in new.failed:
            continue
        row.update(_interval(f"new_{metric}", [_mean([r.new[u] for u in common]) for r in seeds]))
        row[f"new_{metric}_all_users"] = _mean([_mean(list(r.new.values())) for r in seeds])
        row.update(paired_or_nan(metric, [r.new for r in seeds], runs, baseline, new, lambda r: r.new, seeds[0].n_test, "new_"))
        if common and all(u in r.new_as_is for r in seeds for u in common):
            row.update(_interval(f"new_as_is_{metric}", [_mean([r.new_as_is[u] for u in common]) for r in seeds]))
            row.update(paired_or_nan(metric, [r.new_as_is for r in seeds], runs, baseline, new, lambda r: r.new,
                                     seeds[0].n_test, "new_as_is_"))
    return out


def per_user_means(runs: dict[str, list[SeedRun]], rule: str, users: UserSet) -> dict[str, dict[str, float]]:
    """Per strategy without a failed run, each common user's score averaged over seeds (trained:
    under ``rule``)."""
    pick = (lambda r: r.scores[rule]) if users.group == TRAINED else (lambda r: r.new)
    return {name: {u: _mean([pick(r)[u] for r in seeds]) for u in users.common}
            for name, seeds in runs.items() if name not in users.failed}


def activity_rows(runs: dict[str, list[SeedRun]], baseline: str, rule: str, users: UserSet) -> list[dict[str, Any]]:
    """Per strategy without a failed run and activity bin (fedpeft.data.activity, computed once from the
    baseline's ``n_train`` over the common users; none without ``n_train`` or when the baseline
    failed): users, their range of training examples, the headline (mean over the bin's users of
    their score averaged over seeds) and the mean paired difference against the baseline."""
    if baseline in users.failed:
        return []
    n_train = runs[baseline][0].n_train
    if not users.common or not all(u in n_train for u in users.common):
        return []
    metric = metric_of(runs)
    bins = activity_bins({u: n_train[u] for u in users.common})
    means = per_user_means(runs, rule, users)
    per_strategy = {}
    for name in means:
        diffs = {u: gain(metric, means[name][u], means[baseline][u]) for u in users.common}
        scores = {u: {metric: means[name][u], "gain": diffs[u]} for u in users.common}
        per_strategy[name] = bin_means(bins, scores, [metric, "gain"], n_train)
    return [{"group": users.group, "strategy": name, **{k: v for k, v in rows[i].items() if k != "gain"},
             f"gain_vs_{baseline}": rows[i]["gain"]} for i in range(len(bins)) for name, rows in per_strategy.items()]


def run_configs(names: list[str], config: Config, out: Path) -> list[Config]:
    """Every run of the comparison, in the order they run: each strategy once per seed of
    ``compare.seeds`` (default: the config's seed), each into its folder of ``out``."""
    seeds = list(config.compare.seeds) or [config.seed]
    configs = []
    for seed in seeds:
        for name in names:
            cfg = copy.deepcopy(config)
            cfg.federation.strategy, cfg.seed = name, seed
            folder = name if len(seeds) == 1 else f"{name}-seed{seed}"
            cfg.output.dir, cfg.output.name, cfg.output.store_dir = str(out), folder, ""
            cfg.wandb.group = cfg.wandb.group or out.name
            configs.append(cfg)
    return configs


def run_all(names: list[str], config: Config, out: Path, runner: Runner) -> dict[str, list[SeedRun]]:
    """Each run of :func:`run_configs`; a run that fails is recorded as failed and the others go
    on (fedpeft.study.status)."""
    rules = tuple(dict.fromkeys((*HEADLINE_RULES, config.compare.select)))
    runs: dict[str, list[SeedRun]] = {name: [] for name in names}
    for cfg in run_configs(names, config, out):
        name, seed = cfg.federation.strategy, cfg.seed
        print(f"=== {name}, seed {seed} ===", flush=True)
        runs[name].append(run_one(runner, cfg, out / cfg.output.name, seed, rules))
    return runs


def compare(names: list[str], baseline: str, config: Config, out: Path | None = None, runner: Runner | None = None) -> Path:
    """Run ``names`` one after the other, once per seed of ``compare.seeds`` (default: the
    config's seed), with the same users; write the comparison, with each user's majority label
    (fedpeft.study.majority_row) from ``config``'s data. ``runner`` runs one config (default:
    :func:`fedpeft.sim.run`) and returns its results."""
    if runner is None:
        from fedpeft.sim import run as runner

    out = (out or Path(config.output.dir) / f"compare-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    write_comparison(out, run_all(names, config, out, runner), baseline, config.compare.select, config)
    return out


def write_comparison(out: Path, runs: dict[str, list[SeedRun]], baseline: str, rule: str, config: Config | None = None) -> None:
    """The comparison's files from its runs (see the module's docstring); the majority row from
    ``config``'s data (None: no majority row, and the report says so)."""
    from fedpeft.study import majority_row as compare_majority
    from fedpeft.study import plots as compare_plots
    from fedpeft.study import report as compare_report

    metric = metric_of(runs)
    trained, new = user_set(runs, TRAINED), user_set(runs, NEW)
    rows = comparison_rows(runs, baseline, rule, trained)
    new_rows = new_user_rows(runs, baseline, new)
    majority = compare_majority.majority_rows(config, runs, baseline, rule, trained, new)
    if majority.row:
        rows.append(majority.row)
        new_rows[compare_majority.MAJORITY] = majority.new_row
    for row in rows:
        row.update(new_rows.get(row["strategy"], {}))
    activity = activity_rows(runs, baseline, rule, trained) + activity_rows(runs, baseline, rule, new)
    status_rows = run_rows(runs)
    compare_report.write_csv(out / "comparison.csv", rows)
    compare_report.write_csv(out / "by_activity.csv", activity)
    compare_report.write_csv(out / "runs.csv", status_rows)
    seeds = [run.seed for run in runs[baseline]]
    (out / "comparison.md").write_text(compare_report.report(rows, metric, baseline, rule, seeds, trained, new, activity,
                                                             majority.note, status_rows))
    compare_report.write_per_user(out / "per_user.csv", {n: [r.scores[rule] for r in s] for n, s in runs.items()})
    if new.everyone:
        compare_report.write_per_user(out / "per_user_new.csv", {n: [r.new for r in s] for n, s in runs.items()},
                                      {n: [r.new_as_is for r in s] for n, s in runs.items() if any(r.new_as_is for r in s)})
    common = per_user_means(runs, rule, trained)
    if not common:  # every strategy has a failed run: nothing to plot
        return warn_failed(out, runs)
    compare_plots.plot(out, {n: compare_plots.mean_rounds([r.rounds for r in runs[n]], metric) for n in common}, common,
                       baseline, metric)
    if baseline in common:
        compare_plots.scatter(out, common, rows, baseline, metric, rule)
    means = {group.group: per_user_means(runs, rule, group) for group in (trained, new) if group.common}
    ref = reference_run(runs, baseline, trained)
    compare_plots.activity_plot(out, means, ref.n_train if ref else {}, baseline, metric, rule)
    warn_failed(out, runs)


def warn_failed(out: Path, runs: dict[str, list[SeedRun]]) -> None:
    """One line on stderr when runs failed: the comparison was written, without their strategies."""
    failed = [f"{n} seed {r.seed}" for n, s in runs.items() for r in s if r.status == "failed"]
    if failed:
        print(f"fedpeft: warning: {len(failed)} run(s) failed ({', '.join(failed)}): their strategies have no headline "
              f"in the comparison; why is in {out / 'runs.csv'}", file=sys.stderr)


def study_spec() -> StudySpec:
    """The study of ``sims/compare.py`` (fedpeft.study.resume): its main, and ``fedpeft.study.compare``."""
    from fedpeft.study.resume import StudyPlan, StudySpec

    def plan(args: list[str]) -> StudyPlan:
        names, baseline, out, config = parse_args(args)
        return StudyPlan(config, out, {}, run=lambda folder, runner: compare(names, baseline, config, folder, runner),
                         runs=lambda folder: run_configs(names, config, folder))

    return StudySpec("sims/compare.py", "comparison.md", "comparison", "compare", plan)


def main(argv: list[str] | None = None) -> int:
    from fedpeft.study.resume import study_main

    return study_main(study_spec(), sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
