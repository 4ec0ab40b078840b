"""Federations as they behave: each strategy's headline as users come and go, and under deadlines.

    python sims/participation.py --strategies local_only,fedavg,fedper,fedrep,fedsa,ditto --seeds 0 \\
        [--availabilities "const:1;beta:2,2;beta:1,4"] [--deadlines none,median,p25] [--speed lognormal:0.5] \\
        [--stragglers drop,partial] [--deadline-strategies local_only,fedavg,fedsa] [--compare-out DIR] [sim options]
    python sims/participation.py --resume STUDY_DIR        (or --report-only STUDY_DIR)

For each availability of ``--availabilities`` (``;``-separated ``federation.availability``
values: ``const:1`` is everyone online, ``beta:2,2`` a mean of 0.5, ``beta:1,4`` a mean of 0.2)
it runs the comparison of fedpeft/study/compare.py (every strategy once per seed, on the same
users) into ``<out>/avail-<i>``. Then, with every user online and ``federation.speed`` from
``--speed``, one comparison of ``--deadline-strategies`` per deadline of ``--deadlines``
(``none``: wait for everyone; ``median``, ``p25``: the median and the 25th percentile of the
trained users' simulated time for one round's local work, so half or three quarters of the
users are too slow for it), once per ``--stragglers`` mode (``drop``: a late reply is dropped;
``partial``: a late user runs the steps that fit), into ``<out>/deadline-<name>[-<mode>]``. It
writes into ``<out>``:

- ``participation.md`` / ``participation.csv``: per condition and strategy, the headline under
  ``compare.select`` (mean over seeds, 95% t-interval), its paired gain over local_only, and the
  run's simulated time (mean over seeds); and the gains over local_only of the users binned by
  their availability (terciles), to read whether rarely-online users gain more from sharing;
- ``availability.png``: the headline against mean availability, one line per strategy;
- ``sim_time.png``: the headline against the simulated time the run took, per deadline.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fedpeft.config import FLAG_ALIASES, Config, ConfigError  # noqa: E402
from fedpeft.config_checks import parse_spec  # noqa: E402
from fedpeft.data.activity import activity_bins  # noqa: E402
from fedpeft.study.compare import add_arguments, compare, from_arguments, run_configs  # noqa: E402
from fedpeft.study.plots import pyplot, save_with_legend  # noqa: E402
from fedpeft.study.report import read_csv, write_csv  # noqa: E402

BASELINE = "local_only"
DEFAULT_AVAILABILITIES = "const:1;beta:2,2;beta:1,4"
DEFAULT_DEADLINES = "none,median,p25"
DEADLINE_QUANTILES = {"none": None, "median": 0.5, "p25": 0.25}
Row = dict[str, Any]


def build_parser() -> argparse.ArgumentParser:
    common = ", ".join(f"--{flag}" for flag in FLAG_ALIASES)
    parser = argparse.ArgumentParser(
        prog="python sims/participation.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog=f"Other arguments are those of python -m fedpeft.sim: --config FILE, KEY=VALUE and its flags ({common}). "
               "federation.availability, federation.speed and federation.deadline are set by this study.")
    add_arguments(parser, out_help="study folder [compare.out] (default: <output.dir>/participation-<time>)")
    parser.add_argument("--availabilities", default=DEFAULT_AVAILABILITIES,
                        help=f"federation.availability values, ';'-separated (default: {DEFAULT_AVAILABILITIES})")
    parser.add_argument("--deadlines", default=DEFAULT_DEADLINES,
                        help=f"deadlines: none, median, p25 (quantiles of the users' round times), comma list; '' for none "
                             f"(default: {DEFAULT_DEADLINES})")
    parser.add_argument("--stragglers", default="drop,partial",
                        help="federation.stragglers modes of the runs with a deadline, comma list (default: drop,partial)")
    parser.add_argument("--speed", default="lognormal:0.5", help="federation.speed of the deadline runs (default: lognormal:0.5)")
    parser.add_argument("--deadline-strategies", default="local_only,fedavg,fedsa",
                        help="the strategies of the deadline runs (default: local_only,fedavg,fedsa)")
    return parser


def parse_args(argv: list[str]) -> tuple[list[str], Path | None, Config, list[str], list[str], list[str], str, list[str]]:
    args, rest = build_parser().parse_known_args(argv)
    set_here = ("federation.availability", "federation.speed", "federation.deadline", "federation.stragglers")
    if any(a.split("=", 1)[0].lstrip("-") in set_here for a in rest):
        raise ConfigError(f"{', '.join(set_here)} are set by this study: give --availabilities, --speed and --deadlines")
    names, baseline, out, config = from_arguments(args, rest)
    if baseline != BASELINE:
        raise ConfigError(f"--baseline {baseline}: this study measures every strategy against {BASELINE}; leave --baseline out")
    availabilities = [a.strip() for a in args.availabilities.split(";") if a.strip()]
    for value in availabilities:
        parse_spec("federation.availability", value)
    deadlines = [d.strip() for d in args.deadlines.split(",") if d.strip()]
    unknown = [d for d in deadlines if d not in DEADLINE_QUANTILES]
    if unknown:
        raise ConfigError(f"--deadlines: {unknown[0]!r} is not one of {', '.join(DEADLINE_QUANTILES)}")
    parse_spec("federation.speed", args.speed)
    modes = [m.strip() for m in args.stragglers.split(",") if m.strip()]
    if not modes or any(m not in ("drop", "partial") for m in modes):
        raise ConfigError(f"--stragglers {args.stragglers!r}: give drop, partial or both (comma list)")
    deadline_names = [n.strip() for n in args.deadline_strategies.split(",") if n.strip()]
    if BASELINE not in deadline_names:
        deadline_names.insert(0, BASELINE)
    return names, out, config, availabilities, deadlines, modes, args.speed, deadline_names


def conditions(config: Config, availabilities: list[str], deadlines: list[str], modes: list[str],
               speed: str) -> list[tuple[str, Config]]:
    """(folder, config) of every comparison of the study, in the order they run."""
    out = []
    for i, availability in enumerate(availabilities):
        cfg = copy.deepcopy(config)
        cfg.compare.out, cfg.federation.availability = "", availability
        out.append((f"avail-{i}", cfg))
    for name in deadlines:
        for mode in modes if DEADLINE_QUANTILES[name] is not None else ["drop"]:
            cfg = copy.deepcopy(config)
            cfg.compare.out, cfg.federation.speed, cfg.federation.stragglers = "", speed, mode
            cfg.federation.deadline = deadline_of(cfg, name)  # the speeds drawn first
            out.append((f"deadline-{name}" + (f"-{mode}" if DEADLINE_QUANTILES[name] is not None else ""), cfg))
    return out


def deadline_of(config: Config, name: str) -> float:
    """The deadline ``name`` stands for: a quantile of the trained users' simulated round times
    (examples one local call processes over the user's speed, fedpeft.federation.participation)."""
    quantile = DEADLINE_QUANTILES[name]
    if quantile is None:
        return 0.0
    import numpy as np

    from fedpeft.data import get_benchmark
    from fedpeft.data.user_groups import new_user_indices
    from fedpeft.federation.participation import Participation
    from fedpeft.learning.schedule import examples_per_call

    bench = get_benchmark(config)
    users = bench.user_ids()
    held_out = set(new_user_indices(config, len(users)))
    timing = Participation(config, users, 1)
    seconds = [timing.work_seconds(u, examples_per_call(len(bench.load_user(u).train), config))
               for u in range(len(users)) if u not in held_out]
    return float(np.quantile(seconds, quantile))


def study_runs(names: list[str], deadline_names: list[str], config: Config, availabilities: list[str],
               deadlines: list[str], modes: list[str], speed: str, out: Path) -> list[Config]:
    runs = []
    for folder, cfg in conditions(config, availabilities, deadlines, modes, speed):
        runs += run_configs(deadline_names if folder.startswith("deadline-") else names, cfg, out / folder)
    return runs


def run_extras(folder: Path) -> dict[str, dict[str, Any]]:
    """Per run folder of a comparison: its simulated time and each user's availability and score."""
    out = {}
    for results_file in sorted(folder.glob("*/results.json")):
        results = json.loads(results_file.read_text())
        with (results_file.parent / "per_user.csv").open() as f:
            users = list(csv.DictReader(f))
        out[results_file.parent.name] = {"sim_time": results.get("participation", {}).get("sim_time", math.nan),
                                         "mean_availability": results.get("participation", {}).get("mean_availability", 1.0),
                                         "users": users, "metric": results["metrics"][0], "strategy": results["strategy"]}
    return out


def condition_rows(name: str, cfg: Config, table: list[Row], extras: dict[str, dict[str, Any]], rule: str) -> list[Row]:
    rows = []
    metric = next(k for k in table[0] if k.endswith(f"_{rule}") and not k.startswith("gain_vs_"))
    for row in table:
        runs = [e for e in extras.values() if e["strategy"] == row["strategy"]]
        times = [e["sim_time"] for e in runs]
        rows.append({"condition": name, "availability": cfg.federation.availability, "deadline": cfg.federation.deadline,
                     "stragglers": cfg.federation.stragglers,
                     "mean_availability": runs[0]["mean_availability"] if runs else math.nan,
                     "strategy": row["strategy"], metric: row[metric],
                     f"{metric}_ci95_low": row.get(f"{metric}_ci95_low", math.nan),
                     f"{metric}_ci95_high": row.get(f"{metric}_ci95_high", math.nan),
                     "gain_vs_local_only": row.get(f"gain_vs_{BASELINE}_{metric}", row.get(f"gain_vs_{BASELINE}", math.nan)),
                     "sim_time": sum(times) / len(times) if times else math.nan})
    return rows


def gains_by_availability(name: str, extras: dict[str, dict[str, Any]]) -> list[Row]:
    """Per strategy, its users' mean gain over local_only (mean over seeds) per availability tercile."""
    scores: dict[str, dict[str, list[float]]] = {}
    availability: dict[str, float] = {}
    for run in extras.values():
        metric = run["metric"]
        for u in run["users"]:
            if u["status"] == "ok" and u["group"] == "trained":
                scores.setdefault(run["strategy"], {}).setdefault(u["user_id"], []).append(float(u[metric]))
                availability[u["user_id"]] = float(u.get("availability") or 1.0)
    base = {u: sum(v) / len(v) for u, v in scores.get(BASELINE, {}).items()}
    ranks = {u: round(p * 1000) for u, p in availability.items() if u in base}
    rows = []
    for group in activity_bins(ranks):
        for strategy, per_user in scores.items():
            if strategy == BASELINE:
                continue
            gains = [sum(per_user[u]) / len(per_user[u]) - base[u] for u in group.users if u in per_user]
            rows.append({"condition": name, "bin": group.name, "users": len(group.users),
                         "availability_low": group.low / 1000, "availability_high": group.high / 1000, "strategy": strategy,
                         "gain_vs_local_only": sum(gains) / len(gains) if gains else math.nan})
    return rows


def study(names: list[str], deadline_names: list[str], config: Config, availabilities: list[str], deadlines: list[str],
          modes: list[str], speed: str, out: Path | None = None, runner: Callable[[Config], dict[str, Any]] | None = None) -> Path:
    if runner is None:
        from fedpeft.sim import run as runner
    out = (out or Path(config.output.dir) / f"participation-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    rule, rows, binned = config.compare.select, [], []
    for name, cfg in conditions(config, availabilities, deadlines, modes, speed):
        print(f"##### {name}: availability {cfg.federation.availability}, deadline {cfg.federation.deadline:g} #####", flush=True)
        strategies = deadline_names if name.startswith("deadline-") else names
        folder = compare(strategies, BASELINE, cfg, out / name, runner=runner)
        extras = run_extras(folder)
        rows += condition_rows(name, cfg, read_csv(folder / "comparison.csv"), extras, rule)
        if name.startswith("avail-"):
            binned += gains_by_availability(name, extras)
    write_csv(out / "participation.csv", rows)
    write_csv(out / "participation_by_availability.csv", binned)
    (out / "participation.md").write_text(report(rows, binned, config, rule))
    plots(out, rows)
    return out


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) and math.isfinite(value) else ("–" if isinstance(value, float) else str(value))


def report(rows: list[Row], binned: list[Row], config: Config, rule: str) -> str:
    seeds = list(config.compare.seeds) or [config.seed]
    metric = next(k for k in rows[0] if k.endswith(f"_{rule}") and not k.startswith("gain_vs_") and "ci95" not in k)
    lines = [f"# Participation study ({config.data.benchmark}, {config.model.name}, seeds {seeds}, select {rule})", "",
             f"| condition | availability | mean availability | deadline (sim s) | stragglers | strategy | {metric} [95% CI] "
             "| gain vs local_only | sim time (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['condition']} | {r['availability']} | {_fmt(r['mean_availability'])} | {_fmt(float(r['deadline']))} | "
                     f"{r['stragglers'] if float(r['deadline']) else '–'} | "
                     f"{r['strategy']} | {_fmt(r[metric])} [{_fmt(r[f'{metric}_ci95_low'])}, {_fmt(r[f'{metric}_ci95_high'])}] | "
                     f"{_fmt(r['gain_vs_local_only'])} | {_fmt(r['sim_time'])} |")
    if binned:
        lines += ["", "Users binned by their availability (terciles): mean gain over local_only per bin", "",
                  "| condition | bin | users | availability | strategy | gain vs local_only |", "|---|---|---|---|---|---|"]
        lines += [f"| {b['condition']} | {b['bin']} | {b['users']} | {b['availability_low']:.2f}–{b['availability_high']:.2f} | "
                  f"{b['strategy']} | {_fmt(b['gain_vs_local_only'])} |" for b in binned]
    return "\n".join(lines) + "\n"


def plots(out: Path, rows: list[Row]) -> None:
    """availability.png: the headline against mean availability, a line per strategy.
    sim_time.png: the headline against the run's simulated time under each deadline, a line per
    strategy and straggler mode (solid: drop, dashed: partial), from the no-deadline point.
    The majority row has neither axis: it is a horizontal line on both."""
    plt = pyplot()
    metric = next(k for k in rows[0] if "ci95" not in k and k.endswith(("_final", "_best_val", "_best_val_per_user")))
    majority = next((float(r[metric]) for r in rows if r["strategy"] == "majority"), math.nan)
    models = [r for r in rows if r["strategy"] != "majority"]
    strategies = list(dict.fromkeys(r["strategy"] for r in models))
    colors = {name: f"C{i}" for i, name in enumerate(strategies)}

    def finish(ax: Any, x_label: str, name: str) -> None:
        if math.isfinite(majority):
            ax.axhline(majority, color="grey", linestyle=":", label="majority")
        ax.set_xlabel(x_label)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against {x_label}", fontsize=10)
        save_with_legend(fig, ax, out / name, metadata={"Description": f"{metric} against {x_label}"})

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for strategy in strategies:
        points = sorted((float(r["mean_availability"]), float(r[metric])) for r in models
                        if r["strategy"] == strategy and r["condition"].startswith("avail-"))
        if points:
            ax.plot(*zip(*points), marker="o", color=colors[strategy], label=strategy)
    finish(ax, "mean availability", "availability.png")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    deadline_rows = [r for r in models if r["condition"].startswith("deadline-")]
    for strategy in dict.fromkeys(r["strategy"] for r in deadline_rows):
        mine = [r for r in deadline_rows if r["strategy"] == strategy]
        start = [(float(r["sim_time"]), float(r[metric])) for r in mine if not float(r["deadline"])]
        for mode, style in (("drop", "-"), ("partial", "--")):
            points = sorted(start + [(float(r["sim_time"]), float(r[metric])) for r in mine
                                     if float(r["deadline"]) and r["stragglers"] == mode])
            if len(points) > len(start):
                ax.plot(*zip(*points), marker="o", linestyle=style, color=colors[strategy], label=f"{strategy}, {mode}")
    finish(ax, "simulated time of the run (s)", "sim_time.png")


def main(argv: list[str] | None = None) -> int:
    from fedpeft.study.resume import StudyPlan, StudySpec, study_main

    def plan(args: list[str]) -> StudyPlan:
        names, out, config, availabilities, deadlines, modes, speed, deadline_names = parse_args(args)
        arguments = {"--availabilities": ";".join(availabilities), "--deadlines": ",".join(deadlines), "--speed": speed,
                     "--stragglers": ",".join(modes), "--deadline-strategies": ",".join(deadline_names)}
        return StudyPlan(config, out, arguments,
                         run=lambda folder, runner: study(names, deadline_names, config, availabilities, deadlines, modes,
                                                          speed, folder, runner),
                         runs=lambda folder: study_runs(names, deadline_names, config, availabilities, deadlines, modes, speed,
                                                        folder))

    return study_main(StudySpec("sims/participation.py", "participation.md", "study", "participation", plan),
                      sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
