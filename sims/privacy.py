"""The privacy–personalization trade-off: each strategy's headline as its privacy budget shrinks.

    python sims/privacy.py --strategies fedavg,fedsa,ffa,fedper,fedrep --epsilons inf,8,2,1 --seeds 0,1,2 \\
        [--mechanism central] [--compare-out DIR] [sim options, e.g. --benchmark peft-u/... --select best_val]
    python sims/privacy.py --resume STUDY_DIR        (or --report-only STUDY_DIR: see fedpeft/study/resume.py)

For each ε of ``--epsilons`` it runs the comparison of fedpeft/study/compare.py (every strategy once per
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

from fedpeft.config import FLAG_ALIASES, Config, ConfigError
from fedpeft.config_checks import CHOICES
from fedpeft.study.compare import add_arguments, compare, from_arguments, run_configs
from fedpeft.study.plots import interval_errors, pyplot, save_with_legend
from fedpeft.study.report import read_csv, write_csv

BASELINE = "local_only"
MAJORITY = "majority"
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
    """The config of one budget's comparison."""
    cfg = copy.deepcopy(config)
    cfg.compare.out = ""
    if math.isinf(epsilon):
        cfg.privacy.mechanism, cfg.privacy.target_epsilon = "none", 0.0
    else:
        cfg.privacy.mechanism, cfg.privacy.target_epsilon = mechanism, epsilon
    return cfg


def without_privacy(cfg: Config) -> Config:
    """The baseline's run: local_only shares nothing, so it runs without DP."""
    cfg.privacy.mechanism, cfg.privacy.target_epsilon, cfg.privacy.max_epsilon = "none", 0.0, 0.0
    return cfg


def baseline_once(runner: Callable[[Config], dict[str, Any]]) -> Callable[[Config], dict[str, Any]]:
    """A runner that runs local_only without DP, once per seed: a later budget's comparison gets
    a link to that run's folder (local_only releases nothing, so every budget's is the same; a
    resumed study finds its link there already)."""
    done: dict[int, tuple[Path, dict[str, Any]]] = {}

    def run(cfg: Config) -> dict[str, Any]:
        if cfg.federation.strategy != BASELINE:
            return runner(cfg)
        folder = Path(cfg.output.dir) / cfg.output.name
        if cfg.seed in done:
            first, results = done[cfg.seed]
            folder.parent.mkdir(parents=True, exist_ok=True)
            if not os.path.lexists(folder):
                os.symlink(os.path.relpath(first, folder.parent), folder)
            return results
        results = runner(without_privacy(cfg))
        done[cfg.seed] = (folder, results)
        return results

    return run


def _float(value: Any) -> float:
    return value if isinstance(value, float) else math.nan


def study_rows(epsilon: float, comparison: list[Row], rule: str) -> list[Row]:
    """The study's rows of one budget, from its comparison.csv (a strategy with a failed run: NaN
    scores, its status says why; δ and n: the runs' results.json ``privacy``, NaN without DP)."""
    rows = []
    for c in comparison:
        metric, gain = c["metric"], f"gain_vs_{BASELINE}"
        rows.append({"budget": label(epsilon), "strategy": c["strategy"], "seeds": int(c["seeds"]),
                     "status": c.get("status", "unknown"), "status_seeds": c.get("status_seeds", ""),
                     "status_reason": c.get("status_reason", ""), "users": int(c["users_common"]),
                     "users_lost": int(_float(c.get("users_lost"))) if not math.isnan(_float(c.get("users_lost"))) else 0,
                     "epsilon_spent": _float(c.get("epsilon")), "delta": c.get("delta", math.nan),
                     "population_size": c.get("population_size", math.nan),
                     "noise_multiplier": _float(c.get("noise_multiplier")),
                     **{key: _float(c.get(column)) for key, column in (
                         (metric, f"{metric}_{rule}"), (f"{metric}_ci95_low", f"{metric}_{rule}_ci95_low"),
                         (f"{metric}_ci95_high", f"{metric}_{rule}_ci95_high"), (gain, gain),
                         (f"{gain}_ci95_low", f"{gain}_ci95_low"), (f"{gain}_ci95_high", f"{gain}_ci95_high"),
                         ("wilcoxon_p", "wilcoxon_p"))}})
    return rows


def _number(value: Any, sign: str = "") -> str:
    if not isinstance(value, float) or math.isnan(value):
        return "n/a"
    return "∞" if math.isinf(value) else f"{value:{sign}.3f}"


def _interval(row: Row, key: str, sign: str = "") -> str:
    if row.get("status") == "failed":
        return f"failed ({row['status_seeds']} seeds)"
    low, high = row[f"{key}_ci95_low"], row[f"{key}_ci95_high"]
    cell = _number(row[key], sign)
    if isinstance(low, float) and not math.isnan(low):
        cell += f" [{low:{sign}.3f}, {high:{sign}.3f}]"
    return cell


def _given(value: Any) -> bool:
    return value != "" and not (isinstance(value, float) and math.isnan(value))


def delta_text(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def accounting_text(rows: list[Row]) -> str:
    """'δ = 0.005, n = 20 users' over the rows with DP (each distinct pair, when they differ);
    'no run used differential privacy' when none did."""
    pairs = list(dict.fromkeys((delta_text(r["delta"]), _n(r)) for r in rows if _given(r.get("delta"))))
    if not pairs:
        return "no run used differential privacy (no δ)"
    return "; ".join(f"δ = {d}, n = {n} users" for d, n in pairs)


def _n(row: Row) -> str:
    n = row["population_size"]
    return f"{n:.0f}" if isinstance(n, float) else str(n)


def _status(row: Row) -> str:
    status = row.get("status", "unknown")
    if status == "baseline":
        return "no model"
    return f"**{status} ({row['status_seeds']} seeds)**" if status in ("failed", "degraded") else status


def report(rows: list[Row], metric: str, rule: str, seeds: list[int], mechanism: str, names: list[str],
           runs: list[str] | None = None) -> str:
    lines = ["# Privacy and personalization", "",
             f"**Every ε below is at {accounting_text(rows)}** (each run's results.json `privacy.delta` and "
             "`privacy.population_size`: the population the accountant counts).", "",
             f"Strategies {', '.join(names)}, seeds {', '.join(map(str, seeds))}; budget: the target ε of the runs "
             f"(`privacy.target_epsilon`, mechanism `{mechanism}`, user-level: one user is the unit of privacy); inf = "
             "no differential privacy. ε spent: what the accountant reports at the end of the run, at the δ and over "
             "the n users of its row; σ: the noise multiplier the run calibrated to it. status: the runs' "
             "(results.json; a strategy with a failed run has no number). `majority`: each user's own most frequent "
             f"training label, no model, nothing released. `{metric}`: the headline under `{rule}` (mean over users, "
             f"mean over seeds, 95% t-interval over seeds); vs {BASELINE}: the paired gain over {BASELINE} (which shares "
             "nothing: ε = 0), 95% t-interval of the per-seed gains (one seed: Wilcoxon p across users). Each budget's "
             "own comparison is in `eps<ε>/comparison.md`.",
             "", f"| budget | strategy | status | users | ε spent | δ | n | σ | {metric} | vs {BASELINE} |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        gain = "–" if r["strategy"] == BASELINE else _interval(r, f"gain_vs_{BASELINE}", "+")
        if (r["strategy"] != BASELINE and r.get("status") != "failed" and math.isnan(r[f"gain_vs_{BASELINE}_ci95_low"])
                and not math.isnan(r["wilcoxon_p"])):
            gain += f" (Wilcoxon p={r['wilcoxon_p']:.2g})"
        dp = _given(r.get("delta"))
        users = f"{r['users']}" + (f" ⚠ lost {r['users_lost']}" if r.get("users_lost") else "")
        lines.append(f"| {r['budget']} | {r['strategy']} | {_status(r)} | {users} | {_number(r['epsilon_spent'])} | "
                     f"{delta_text(r['delta']) if dp else '–'} | "
                     f"{_n(r) if dp else '–'} | "
                     f"{_number(r['noise_multiplier'])} | {_interval(r, metric)} | {gain} |")
    if runs:
        lines += ["", "Runs not plainly ok:", *runs]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: list[Row], budgets: list[str], metric: str, rule: str) -> None:
    """The headline against the budget (categorical, from no DP to the smallest ε), one line per
    strategy with its interval over seeds (a budget where it failed: no point, said in the legend);
    local_only a horizontal line with its interval shaded, the majority label a dashed one. The
    title states δ and n (also the PNG's Description)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, style in ((BASELINE, {"color": "black", "linewidth": 1.2}), (MAJORITY, {"color": "grey", "linestyle": "--"})):
        line = next((r for r in rows if r["strategy"] == name and not math.isnan(r[metric])), None)
        if line is None:
            continue
        what = "shares nothing, ε = 0" if name == BASELINE else "each user's most frequent training label"
        ax.axhline(line[metric], label=f"{name} ({what})", **style)
        if not math.isnan(line[f"{metric}_ci95_low"]):
            ax.axhspan(line[f"{metric}_ci95_low"], line[f"{metric}_ci95_high"], color="black", alpha=0.08)
    names = list(dict.fromkeys(r["strategy"] for r in rows if r["strategy"] not in (BASELINE, MAJORITY)))
    for i, name in enumerate(names):
        mine = [r for r in rows if r["strategy"] == name]
        failed = [r["budget"] for r in mine if r.get("status") == "failed"]
        points = [(budgets.index(r["budget"]), r[metric], r[f"{metric}_ci95_low"], r[f"{metric}_ci95_high"])
                  for r in mine if not math.isnan(r[metric])]
        text = name + (f" (failed at {', '.join(failed)})" if failed else "")
        if not points:
            ax.plot([], [], marker="x", linestyle="", color=plt.cm.tab10(i % 10), label=text)
            continue
        x, y, low, high = zip(*points)
        ax.errorbar(x, y, yerr=interval_errors(y, low, high), marker="o", capsize=3, color=plt.cm.tab10(i % 10), label=text)
    ax.set_xticks(range(len(budgets)), ["no DP" if b == "inf" else f"ε = {b}" for b in budgets])
    ax.set_xlabel("privacy budget of the shared part (user-level, whole run)")
    ax.set_ylabel(f"test {metric} ({rule})")
    title = f"Privacy–personalization trade-off (bars: 95% interval over seeds)\nε at {accounting_text(rows)}"
    ax.set_title(title, fontsize=10)
    save_with_legend(fig, ax, path, metadata={"Description": title})


def study_runs(names: list[str], config: Config, epsilons: list[float], mechanism: str, out: Path) -> list[Config]:
    """Every run of the study as it runs it (local_only without DP; later budgets link to the first's)."""
    runs = []
    for epsilon in sorted(epsilons, reverse=True):
        for cfg in run_configs(names, private_config(config, epsilon, mechanism), out / f"eps{label(epsilon)}"):
            runs.append(without_privacy(cfg) if cfg.federation.strategy == BASELINE else cfg)
    return runs


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
    not_ok: list[str] = []
    for epsilon in ordered:
        print(f"##### privacy budget {label(epsilon)} #####", flush=True)
        folder = compare(names, BASELINE, private_config(config, epsilon, mechanism), out / f"eps{label(epsilon)}",
                         runner=run_once)
        rows += study_rows(epsilon, read_csv(folder / "comparison.csv"), rule)
        not_ok += [f"- eps{label(epsilon)}/{r['folder'] or r['strategy']}: **{r['status']}**"
                   + (f": {r['status_reason']}" if r["status_reason"] else "")
                   for r in read_csv(folder / "runs.csv") if r["status"] != "ok"]
    metric = next(key for key in rows[0] if f"{key}_ci95_low" in rows[0] and not key.startswith("gain_vs_"))
    write_csv(out / "privacy.csv", rows)
    seeds = list(config.compare.seeds) or [config.seed]
    (out / "privacy.md").write_text(report(rows, metric, rule, seeds, mechanism, names, not_ok))
    plot(out / "privacy.png", rows, [label(e) for e in ordered], metric, rule)
    return out


def main(argv: list[str] | None = None) -> int:
    from fedpeft.study.resume import StudyPlan, StudySpec, study_main

    def plan(args: list[str]) -> StudyPlan:
        names, out, config, epsilons, mechanism = parse_args(args)
        arguments = {"--epsilons": ",".join(map(str, epsilons)), "--mechanism": mechanism}
        return StudyPlan(config, out, arguments,
                         run=lambda folder, runner: study(names, config, epsilons, mechanism, folder, runner),
                         runs=lambda folder: study_runs(names, config, epsilons, mechanism, folder))

    spec = StudySpec("sims/privacy.py", "privacy.md", "study", "privacy", plan)
    return study_main(spec, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
