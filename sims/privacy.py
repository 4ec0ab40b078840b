"""The privacy–personalization trade-off: each strategy's headline as its privacy budget shrinks.

    python sims/privacy.py --strategies fedavg,fedsa,ffa,fedper,fedrep --epsilons inf,8,2,1 --seeds 0,1,2 \\
        [--mechanism central] [--compare-out DIR] [sim options, e.g. --benchmark peft-u/... --select best_val]

For each ε of ``--epsilons`` it runs the comparison of fedpeft/compare.py (every strategy once per
seed, on the same users) into ``<out>/eps<ε>``: ``inf`` without differential privacy
(``privacy.mechanism=none``), a number with user-level DP on the shared part
(``privacy.mechanism``, default central; ``privacy.target_epsilon=ε``: the noise multiplier is
calibrated before each run from the accountant, for its rounds, cohort sampling and δ).
local_only, which shares nothing (ε = 0), runs once per seed, without DP, and is every
comparison's baseline. Then it writes into ``<out>``:

- ``privacy.md`` / ``privacy.csv``: per ε and strategy, the ε the run spent and the noise
  multiplier it used (mean over seeds), the headline under ``compare.select`` (mean over seeds,
  95% t-interval) and its paired gain over local_only;
- ``privacy.png``: the headline against ε, one line per strategy, local_only as a horizontal
  line (its interval shaded), with the intervals over seeds.

Every number is read back from the ε folders' ``comparison.csv``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from fedpeft.compare import add_arguments, compare, from_arguments, study_main
from fedpeft.compare_plots import interval_errors, pyplot, save_with_legend
from fedpeft.compare_report import read_csv, write_csv
from fedpeft.config import CHOICES, FLAG_ALIASES, Config, ConfigError

BASELINE = "local_only"
DEFAULT_EPSILONS = "inf,8,2,1"
Row = dict[str, Any]


def parse_epsilons(text: str) -> list[float]:
    """``inf,8,2,1`` -> [inf, 8.0, 2.0, 1.0]; each 'inf' or a number > 0, no repeats."""
    out: list[float] = []
    for item in (part.strip() for part in text.split(",")):
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if math.isnan(value) or value <= 0:
            raise ConfigError(f"--epsilons: {item!r} is not a privacy budget; give 'inf' (no DP) or numbers > 0, comma "
                              f"separated, e.g. --epsilons {DEFAULT_EPSILONS}")
        if value in out:
            raise ConfigError(f"--epsilons: {item} is given twice ({text}); give each budget once")
        out.append(value)
    return out


def label(epsilon: float) -> str:
    return "inf" if math.isinf(epsilon) else f"{epsilon:g}"


def build_parser() -> argparse.ArgumentParser:
    common = ", ".join(f"--{flag}" for flag in FLAG_ALIASES)
    mechanisms = [m for m in CHOICES["privacy.mechanism"] if m != "none"]
    parser = argparse.ArgumentParser(
        prog="python sims/privacy.py", description=__doc__.split("\n\n")[0], allow_abbrev=False,
        epilog=f"Other arguments are those of python -m fedpeft.sim: --config FILE, KEY=VALUE (e.g. "
               f"privacy.clipping_norm=0.5, privacy.delta=1e-5) and its flags ({common}); see python -m fedpeft.sim "
               "--help. privacy.target_epsilon and privacy.mechanism are set by --epsilons and --mechanism.")
    add_arguments(parser, out_help="study folder [compare.out]: one comparison per budget in <folder>/eps<ε>, the "
                                   "study's table and plot beside them (default: <output.dir>/privacy-<time>)")
    parser.add_argument("--epsilons", default=DEFAULT_EPSILONS,
                        help=f"privacy budgets, comma list; 'inf' = no differential privacy (default: {DEFAULT_EPSILONS})")
    parser.add_argument("--mechanism", default="central", choices=mechanisms,
                        help="privacy.mechanism of the runs with a finite budget (default: central)")
    return parser


def parse_args(argv: list[str]) -> tuple[list[str], Path | None, Config, list[float], str]:
    args, rest = build_parser().parse_known_args(argv)
    if any(a.split("=", 1)[0].lstrip("-") in ("privacy.target_epsilon", "privacy.mechanism") for a in rest):
        raise ConfigError("privacy.target_epsilon and privacy.mechanism are set by this study: give --epsilons and "
                          "--mechanism instead")
    names, baseline, out, config = from_arguments(args, rest)
    if baseline != BASELINE:
        raise ConfigError(f"--baseline {baseline}: this study measures every strategy against {BASELINE} (which shares "
                          "nothing, so DP does not change it); leave --baseline out")
    return names, out, config, parse_epsilons(args.epsilons), args.mechanism


def private_config(config: Config, epsilon: float, mechanism: str) -> Config:
    cfg = copy.deepcopy(config)
    if math.isinf(epsilon):
        cfg.privacy.mechanism, cfg.privacy.target_epsilon = "none", 0.0
    else:
        cfg.privacy.mechanism, cfg.privacy.target_epsilon = mechanism, epsilon
    return cfg


def baseline_once(runner: Callable[[Config], dict[str, Any]]) -> Callable[[Config], dict[str, Any]]:
    """A runner that runs local_only without DP, once per seed: a later budget's comparison gets
    a link to that run's folder (local_only releases nothing, so every budget's is the same)."""
    done: dict[int, tuple[Path, dict[str, Any]]] = {}

    def run(cfg: Config) -> dict[str, Any]:
        if cfg.federation.strategy != BASELINE:
            return runner(cfg)
        folder = Path(cfg.output.dir) / cfg.output.name
        if cfg.seed in done:
            first, results = done[cfg.seed]
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.path.relpath(first, folder.parent), folder)
            return results
        cfg.privacy.mechanism, cfg.privacy.target_epsilon, cfg.privacy.max_epsilon = "none", 0.0, 0.0
        results = runner(cfg)
        done[cfg.seed] = (folder, results)
        return results

    return run


def study_rows(epsilon: float, comparison: list[Row], rule: str) -> list[Row]:
    rows = []
    for c in comparison:
        metric, gain = c["metric"], f"gain_vs_{BASELINE}"
        rows.append({"budget": label(epsilon), "strategy": c["strategy"], "seeds": int(c["seeds"]),
                     "users": int(c["users_common"]), "epsilon_spent": c.get("epsilon", math.nan),
                     "noise_multiplier": c.get("noise_multiplier", math.nan),
                     metric: c[f"{metric}_{rule}"], f"{metric}_ci95_low": c[f"{metric}_{rule}_ci95_low"],
                     f"{metric}_ci95_high": c[f"{metric}_{rule}_ci95_high"], gain: c[gain],
                     f"{gain}_ci95_low": c[f"{gain}_ci95_low"], f"{gain}_ci95_high": c[f"{gain}_ci95_high"],
                     "wilcoxon_p": c["wilcoxon_p"]})
    return rows


def _number(value: Any, sign: str = "") -> str:
    if not isinstance(value, float) or math.isnan(value):
        return "n/a"
    return "∞" if math.isinf(value) else f"{value:{sign}.3f}"


def _interval(row: Row, key: str, sign: str = "") -> str:
    low, high = row[f"{key}_ci95_low"], row[f"{key}_ci95_high"]
    cell = _number(row[key], sign)
    if isinstance(low, float) and not math.isnan(low):
        cell += f" [{low:{sign}.3f}, {high:{sign}.3f}]"
    return cell


def report(rows: list[Row], metric: str, rule: str, seeds: list[int], mechanism: str, names: list[str]) -> str:
    lines = ["# Privacy and personalization", "",
             f"Strategies {', '.join(names)}, seeds {', '.join(map(str, seeds))}; budget: the target ε of the runs "
             f"(`privacy.target_epsilon`, mechanism `{mechanism}`, user-level: one user is the unit of privacy); inf = "
             "no differential privacy. ε spent: what the accountant reports at the end of the run (δ in each run's "
             "results.json `privacy`); σ: the noise multiplier the run calibrated to it. "
             f"`{metric}`: the headline under `{rule}` (mean over users, mean over seeds, 95% t-interval over seeds); "
             f"vs {BASELINE}: the paired gain over {BASELINE} (which shares nothing: ε = 0), 95% t-interval of the "
             "per-seed gains (one seed: Wilcoxon p across users). Each budget's own comparison is in `eps<ε>/comparison.md`.",
             "", "| budget | strategy | users | ε spent | σ | " + f"{metric} | vs {BASELINE} |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = "–" if r["strategy"] == BASELINE else _interval(r, f"gain_vs_{BASELINE}", "+")
        if r["strategy"] != BASELINE and math.isnan(r[f"gain_vs_{BASELINE}_ci95_low"]) and not math.isnan(r["wilcoxon_p"]):
            gain += f" (Wilcoxon p={r['wilcoxon_p']:.2g})"
        lines.append(f"| {r['budget']} | {r['strategy']} | {r['users']} | {_number(r['epsilon_spent'])} | "
                     f"{_number(r['noise_multiplier'])} | {_interval(r, metric)} | {gain} |")
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[Row], budgets: list[str], metric: str, rule: str) -> None:
    """The headline against the budget (categorical, from no DP to the smallest ε), one line per
    strategy with its interval over seeds; local_only a horizontal line with its interval shaded."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    base = next(r for r in rows if r["strategy"] == BASELINE)
    ax.axhline(base[metric], color="black", linewidth=1.2, label=f"{BASELINE} (shares nothing, ε = 0)")
    if not math.isnan(base[f"{metric}_ci95_low"]):
        ax.axhspan(base[f"{metric}_ci95_low"], base[f"{metric}_ci95_high"], color="black", alpha=0.08)
    names = list(dict.fromkeys(r["strategy"] for r in rows if r["strategy"] != BASELINE))
    for i, name in enumerate(names):
        points = [(budgets.index(r["budget"]), r[metric], r[f"{metric}_ci95_low"], r[f"{metric}_ci95_high"])
                  for r in rows if r["strategy"] == name]
        x, y, low, high = zip(*points)
        ax.errorbar(x, y, yerr=interval_errors(y, low, high), marker="o", capsize=3, color=plt.cm.tab10(i % 10), label=name)
    ax.set_xticks(range(len(budgets)), ["no DP" if b == "inf" else f"ε = {b}" for b in budgets])
    ax.set_xlabel("privacy budget of the shared part (user-level, whole run)")
    ax.set_ylabel(f"test {metric} ({rule})")
    ax.set_title("Privacy–personalization trade-off (bars: 95% interval over seeds)", fontsize=10)
    save_with_legend(fig, ax, path)


def study(names: list[str], config: Config, epsilons: list[float], mechanism: str = "central", out: Path | None = None,
          runner: Callable[[Config], dict[str, Any]] | None = None) -> Path:
    """One comparison per budget into ``<out>/eps<ε>``, then the study's table and plot into ``out``."""
    if runner is None:
        from fedpeft.sim import run as runner
    out = (out or Path(config.output.dir) / f"privacy-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    rule = config.compare.select
    ordered = sorted(epsilons, reverse=True)  # no DP first, then ever smaller budgets
    run_once = baseline_once(runner)
    rows: list[Row] = []
    for epsilon in ordered:
        cfg = private_config(config, epsilon, mechanism)
        cfg.compare.out = ""
        print(f"##### privacy budget {label(epsilon)} #####", flush=True)
        folder = compare(names, BASELINE, cfg, out / f"eps{label(epsilon)}", runner=run_once)
        rows += study_rows(epsilon, read_csv(folder / "comparison.csv"), rule)
    metric = next(key for key in rows[0] if f"{key}_ci95_low" in rows[0] and not key.startswith("gain_vs_"))
    write_csv(out / "privacy.csv", rows)
    seeds = list(config.compare.seeds) or [config.seed]
    (out / "privacy.md").write_text(report(rows, metric, rule, seeds, mechanism, names))
    plot(out / "privacy.png", rows, [label(e) for e in ordered], metric, rule)
    return out


def main(argv: list[str] | None = None) -> int:
    def work() -> Path:
        names, out, config, epsilons, mechanism = parse_args(sys.argv[1:] if argv is None else argv)
        return study(names, config, epsilons, mechanism, out)

    return study_main(work, "privacy.md", "study")


if __name__ == "__main__":
    sys.exit(main())
