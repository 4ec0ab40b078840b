"""The Python API, for notebooks: ``fedpeft.run``, ``fedpeft.load_run`` and ``fedpeft.study.compare``.

    import fedpeft
    local = fedpeft.run(strategy="local_only", overrides={"train.lr": 1e-3})
    fedavg = fedpeft.run(strategy="fedavg", overrides={"train.lr": 1e-3})
    local.per_user.head(); local.plot_rounds(); fedavg.plot_users(local)
    table = fedpeft.compare(["local_only", "fedavg"], seeds=[0, 1])

A run goes through what ``python -m fedpeft.sim`` runs (:func:`fedpeft.sim.run`) after the same
checks (a bad key or value raises the same :class:`fedpeft.config.ConfigError`); a comparison
through what ``python sims/compare.py`` runs (:func:`fedpeft.study.resume.run_study`). Every
table is read from the run folder, so a finished folder loads back as the same :class:`Run`.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpeft.config import Config, ConfigError

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

ConfigSource = Config | str | Path | Sequence[str | Path] | None
TEXT_COLUMNS = ("user_id", "group", "status", "error")  # per_user.csv: text, "" where empty


@dataclass
class Run:
    """A finished run: its results (results.json), config and tables. ``per_user``: per_user.csv;
    ``rounds``: one row per round (metrics.jsonl); ``rounds_per_user``: one row per user and
    evaluated round, its validation and test scores as ``val_<metric>`` / ``test_<metric>``
    (rounds_per_user.jsonl); ``failures``: every failed call (failures.json)."""

    run_dir: Path
    results: dict[str, Any]
    config: Config
    per_user: pd.DataFrame
    rounds: pd.DataFrame
    rounds_per_user: pd.DataFrame
    failures: pd.DataFrame

    @property
    def summary(self) -> dict[str, Any]:
        """The summary over users: each metric's mean, median, p10 and min, users scored and failed."""
        return self.results["summary"]

    @property
    def status(self) -> str:
        """``ok``, ``degraded`` or ``failed`` (fedpeft.federation.verdict); why in :attr:`status_reason`."""
        return self.results["status"]

    @property
    def status_reason(self) -> str:
        return self.results["status_reason"]

    @property
    def privacy(self) -> dict[str, Any]:
        """The privacy report (results.json): the mechanism and the user-level epsilon spent (under
        DP at its delta); inf where the run released its shared part unbounded (without DP, or DP
        without noise), 0 for a strategy that shares nothing."""
        report = dict(self.results["privacy"])
        if report.get("epsilon") is None or math.isnan(report["epsilon"]):  # results.json's null
            report["epsilon"] = math.inf
        return report

    @property
    def strategy(self) -> str:
        return self.results["strategy"]

    @property
    def metric(self) -> str:
        """The headline metric (the benchmark's first)."""
        return self.results["metrics"][0]

    def __repr__(self) -> str:
        return f"Run({self.strategy}, {self.status}, {self.metric} {self.summary.get(f'{self.metric}_mean')}, {self.run_dir})"

    def __str__(self) -> str:
        from fedpeft.federation.reporting import summary_table

        return summary_table(self.results)

    def scores(self, metric: str | None = None) -> dict[str, float]:
        """Each scored trained user's final test ``metric`` (default: the headline), by user id."""
        metric = metric or self.metric
        if metric not in self.per_user.columns:
            raise ValueError(f"{self.run_dir.name} has no per-user metric '{metric}'; it has {', '.join(self.results['metrics'])}.")
        ok = self.per_user[(self.per_user["status"] == "ok") & (self.per_user["group"] == "trained")]
        return dict(zip(ok["user_id"], ok[metric].astype(float)))

    def plot_rounds(self, metric: str | None = None) -> Figure:
        """The per-round curves: the test ``metric`` (mean over users; LaMP: over all questions)
        and, where the run scored it, the validation one; beside them the training loss."""
        from matplotlib.ticker import MaxNLocator

        from fedpeft.study.plots import mean_rounds

        metric = metric or self.metric
        records = self.rounds.to_dict("records")
        plt = _pyplot()
        fig, (score_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
        for key, label in ((metric, f"test {metric}"), (f"val_{metric}", f"validation {metric}")):
            points = [(r["round"], r[key]) for r in mean_rounds([records], key)]
            if points:
                score_ax.plot(*zip(*points), marker="o", markersize=4, label=label)
        loss = [(r["round"], r["train_loss"]) for r in mean_rounds([records], "train_loss")]
        if loss:
            loss_ax.plot(*zip(*loss), marker="o", markersize=4, color="tab:red", label="training loss")
        for ax, ylabel in ((score_ax, metric), (loss_ax, "mean training loss of the cohort")):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("round")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{self.strategy}: {self.run_dir.name}", fontsize=10)
        fig.tight_layout()
        plt.close(fig)  # returned, not also shown by pyplot (a notebook shows the returned figure once)
        return fig

    def plot_users(self, other: Run, metric: str | None = None) -> Figure:
        """Each user both runs scored: this run's test ``metric`` against ``other``'s, with the
        diagonal; the title counts the users this run does better, worse and the same for."""
        from fedpeft.learning.metrics import LOWER_IS_BETTER, gain

        metric = metric or self.metric
        mine, theirs = self.scores(metric), other.scores(metric)
        users = [u for u in mine if u in theirs]
        if not users:
            raise ValueError(f"{self.run_dir} and {other.run_dir} have no scored user in common: compare runs of the same "
                             "benchmark and data.seed.")
        xs, ys = [theirs[u] for u in users], [mine[u] for u in users]
        gains = [gain(metric, mine[u], theirs[u]) for u in users]
        better, worse = sum(g > 0 for g in gains), sum(g < 0 for g in gains)
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(5, 5))
        low, high = min(xs + ys), max(xs + ys)
        pad = 0.05 * (high - low or 1.0)
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="grey", linestyle="--", linewidth=1)
        ax.scatter(xs, ys, s=22, alpha=0.7)
        ax.set(xlim=(low - pad, high + pad), ylim=(low - pad, high + pad), aspect="equal",
               xlabel=f"{other.strategy} {metric} ({other.run_dir.name})", ylabel=f"{self.strategy} {metric} ({self.run_dir.name})")
        side = "below" if metric in LOWER_IS_BETTER else "above"
        ax.set_title(f"{self.strategy} against {other.strategy}, {len(users)} users: {better} better, {worse} worse, "
                     f"{len(users) - better - worse} same\n(mean difference {sum(gains) / len(gains):+.3f}; {side} the diagonal = better)", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        plt.close(fig)
        return fig


def _pyplot() -> Any:
    import matplotlib.pyplot as plt

    return plt


# ---- running and loading ---------------------------------------------------------------------------
def settings(strategy: str | None = None, benchmark: str | None = None, model: str | None = None,
             rounds: int | None = None, overrides: Mapping[str, Any] | None = None) -> list[tuple[str, Any]]:
    """(dotted key, value) pairs as the command line gives them: the common flags, then
    ``overrides``, each value written as on the command line (so it is read, and refused, alike)."""
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must be a mapping of dotted keys to values, e.g. {{'train.lr': 1e-3}}; "
                          f"got {type(overrides).__name__}.")
    flags = {"strategy": strategy, "benchmark": benchmark, "model": model, "rounds": rounds}
    pairs = [(k, v) for k, v in flags.items() if v is not None] + list((overrides or {}).items())
    return [(str(key), _text(value)) for key, value in pairs]


def build(config: ConfigSource = None, pairs: Sequence[tuple[str, Any]] = ()) -> Config:
    """The checked config of ``python -m fedpeft.sim --config FILE ... KEY=VALUE ...`` (``config``:
    YAML file(s) layered on configs/default.yaml as ``--config`` does, or a Config to start from
    instead), with the same checks and errors."""
    from fedpeft.config import set_key
    from fedpeft.config_checks import validate
    from fedpeft.config_load import build_config
    from fedpeft.launch.assemble import apply_sweep_parameters, check_names

    if isinstance(config, Config):
        built = copy.deepcopy(config)
        for key, value in pairs:
            set_key(built, key, value)
        validate(built)
    else:
        files = [] if config is None else [config] if isinstance(config, (str, Path)) else list(config)
        built = build_config([str(f) for f in files], list(pairs))
    return check_names(apply_sweep_parameters(built))


def run(strategy: str | None = None, benchmark: str | None = None, model: str | None = None, rounds: int | None = None,
        overrides: Mapping[str, Any] | None = None, config: ConfigSource = None) -> Run:
    """Run one simulation, as ``python -m fedpeft.sim --strategy S --benchmark B --model M
    --rounds R [--config FILE] KEY=VALUE ...`` does (``overrides``: {dotted key: value}), and
    return it as a :class:`Run`. Raises ConfigError for what the command line refuses, and
    :class:`fedpeft.sim.RunFailed` when the simulation stops; a run whose verdict is failed is
    returned (its :attr:`Run.status` says so) after the one line the command line prints."""
    import sys

    from fedpeft import sim
    from fedpeft.federation.verdict import failed_run_line

    cfg = build(config, settings(strategy, benchmark, model, rounds, overrides))
    results = _interruptible(lambda: sim.run(cfg))
    if results.get("status") == "failed":
        print(failed_run_line(results), file=sys.stderr)
    return load_run(results["run_dir"])


def _interruptible(work: Any) -> Any:
    """``work()`` with fedpeft's handling of Ctrl-C (fedpeft.launch.signals.stop_on_signals: the run stops
    after its last checkpoint), raised here as a KeyboardInterrupt that says how to continue."""
    from fedpeft.launch.signals import Interrupted, stop_on_signals

    try:
        with stop_on_signals():
            return work()
    except Interrupted as stop:
        raise KeyboardInterrupt(stop.message()) from None


def load_run(path: str | Path) -> Run:
    """The :class:`Run` of a finished run folder (one with results.json), as :func:`run` returned it."""
    import pandas as pd

    from fedpeft.federation.checkpoint import Checkpoint, load_run_config
    from fedpeft.files import json_value

    run_dir = Path(path).expanduser().resolve()
    config = load_run_config(run_dir)  # refuses a folder that is no run folder, naming it
    if not (run_dir / "results.json").is_file():
        raise ConfigError(f"{run_dir} holds no finished run (no results.json; its last completed round is "
                          f"{Checkpoint.saved_round(run_dir)}). Finish it with `python -m fedpeft.sim --resume {run_dir}`.")
    results = json_value((run_dir / "results.json").read_text())
    per_user = pd.read_csv(run_dir / "per_user.csv", dtype={c: str for c in TEXT_COLUMNS}, keep_default_na=False,
                           na_values=[""])
    for column in set(TEXT_COLUMNS) & set(per_user.columns):
        per_user[column] = per_user[column].fillna("")
    rounds = pd.DataFrame(_json_lines(run_dir / "metrics.jsonl"))
    if "round" in rounds.columns:
        rounds = rounds[["round", *[c for c in rounds.columns if c != "round"]]]
    user_rounds = pd.json_normalize(_json_lines(run_dir / "rounds_per_user.jsonl"), sep="_")
    failures = pd.DataFrame(json.loads((run_dir / "failures.json").read_text()),
                            columns=["round", "phase", "call", "user_id", "partition_id", "error", "traceback"])
    return Run(run_dir, results, config, per_user, rounds, user_rounds, failures)


def _json_lines(path: Path) -> list[dict[str, Any]]:
    from fedpeft.files import json_value

    return [json_value(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


# ---- comparisons ----------------------------------------------------------------------------------
def compare(strategies: Sequence[str] | None = None, seeds: Sequence[int] | None = None, baseline: str | None = None,
            overrides: Mapping[str, Any] | None = None, config: ConfigSource = None,
            out: str | Path | None = None) -> pd.DataFrame:
    """Compare ``strategies`` on the same users, once per seed of ``seeds``, as ``python
    sims/compare.py --strategies ... --seeds ... --baseline ... --compare-out OUT KEY=VALUE ...``
    does, and return its table (comparison.csv; the folder in ``table.attrs["study_dir"]``).
    When ``out`` holds a study already (its study.json), it is continued as ``--resume OUT``
    does: finished runs are kept, missing ones run (none: the comparison is loaded), and anything
    given that would change its results is refused."""
    import pandas as pd

    from fedpeft import sim
    from fedpeft.study.compare import study_spec
    from fedpeft.study.resume import STUDY_FILE, run_study

    with tempfile.TemporaryDirectory(prefix="fedpeft-compare-") as tmp:
        argv = _study_arguments(strategies, seeds, baseline, overrides, config, Path(tmp))
        if out is not None and (Path(out).expanduser() / STUDY_FILE).is_file():
            argv = ["--resume", str(Path(out).expanduser()), *argv]
        elif out is not None:
            argv += ["--compare-out", str(Path(out).expanduser())]
        folder = _interruptible(lambda: run_study(study_spec(), argv, lambda *a: sim.run(*a)))
    table = pd.read_csv(folder / "comparison.csv")
    table.attrs["study_dir"] = str(folder)
    return table


def _study_arguments(strategies: Sequence[str] | None, seeds: Sequence[int] | None, baseline: str | None,
                     overrides: Mapping[str, Any] | None, config: ConfigSource, tmp: Path) -> list[str]:
    """sims/compare.py's arguments for :func:`compare` (a Config given goes as a YAML file in ``tmp``)."""
    if isinstance(strategies, str):
        raise ConfigError(f"strategies must be a list of names, e.g. ['local_only', 'fedavg']; got the string {strategies!r}.")
    argv = [*(["--strategies", ",".join(strategies)] if strategies else []),
            *(["--seeds", ",".join(str(s) for s in seeds)] if seeds else []),
            *(["--baseline", baseline] if baseline else [])]
    if isinstance(config, Config):
        import yaml

        (tmp / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
        config = tmp / "config.yaml"
    files = [] if config is None else [config] if isinstance(config, (str, Path)) else list(config)
    argv += [part for f in files for part in ("--config", str(f))]
    return argv + [f"{key}={value}" for key, value in settings(overrides=overrides)]


def _text(value: Any) -> str:
    """A value as the command line writes it (lists as comma lists, booleans as true/false)."""
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)
