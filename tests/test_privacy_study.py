"""sims/privacy.py end to end on the tiny model (in-process runs): local_only once per seed, the
budgets' calibrated runs, the table read back from each budget's comparison, and its plot."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

from fedpeft.config import ConfigError
from tests.conftest import tiny_args
from tests.inprocess_grid import run_in_process

ROOT = Path(__file__).resolve().parents[1]


def load_study():
    spec = importlib.util.spec_from_file_location("sims_privacy", ROOT / "sims" / "privacy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_privacy_study_on_real_runs(tiny_bert, tmp_path):
    study = load_study()
    args = tiny_args(tiny_bert, tmp_path, "unused")
    args = [a for i, a in enumerate(args) if a not in ("--name", "unused")]
    names, out, config, epsilons, mechanism = study.parse_args(
        ["--strategies", "fedavg", "--epsilons", "4,inf", "--compare-out", str(tmp_path / "study"), *args,
         "federation.cohort_fraction=0.5"])
    assert names == ["local_only", "fedavg"] and epsilons == [4.0, math.inf] and mechanism == "central"
    ran: list[tuple[str, str]] = []

    def runner(cfg):
        ran.append((cfg.federation.strategy, cfg.privacy.mechanism))
        return run_in_process(cfg)[0]

    folder = study.study(names, config, epsilons, mechanism, out, runner=runner)
    assert ran == [("local_only", "none"), ("fedavg", "none"), ("fedavg", "central")]  # local_only once, no DP first
    assert (folder / "epsinf" / "local_only").is_dir() and (folder / "eps4" / "local_only").is_symlink()
    private = json.loads((folder / "eps4" / "fedavg" / "results.json").read_text())["privacy"]
    assert private["epsilon"] == pytest.approx(4.0, rel=0.01) and private["mechanism"] == "central"
    with (folder / "privacy.csv").open() as f:
        rows = {(r["budget"], r["strategy"]): r for r in csv.DictReader(f)}
    assert set(rows) == {("inf", "local_only"), ("inf", "fedavg"), ("4", "local_only"), ("4", "fedavg")}
    assert float(rows[("4", "fedavg")]["epsilon_spent"]) == pytest.approx(4.0, rel=0.01)
    assert float(rows[("4", "fedavg")]["noise_multiplier"]) == pytest.approx(private["noise_multiplier"])
    assert math.isinf(float(rows[("inf", "fedavg")]["epsilon_spent"])) and float(rows[("inf", "local_only")]["epsilon_spent"]) == 0
    for budget in ("inf", "4"):  # the headline is each budget's comparison's, read back
        with (folder / f"eps{budget}" / "comparison.csv").open() as f:
            comparison = {r["strategy"]: r for r in csv.DictReader(f)}
        for name in names:
            assert float(rows[(budget, name)]["accuracy"]) == pytest.approx(float(comparison[name][f"accuracy_{config.compare.select}"]))
    assert rows[("4", "local_only")]["accuracy"] == rows[("inf", "local_only")]["accuracy"]  # the same local_only runs
    table = (folder / "privacy.md").read_text()
    assert "| 4 | fedavg |" in table and "| inf | fedavg |" in table and "| ∞ |" in table
    assert (folder / "privacy.png").stat().st_size > 10_000
    assert "| ε |" in (folder / "eps4" / "comparison.md").read_text().replace("bytes communicated | ε |", "| ε |")


@pytest.mark.parametrize("argv, match", [
    (["--epsilons", "2,0"], r"--epsilons: '0'"),
    (["--epsilons", "2,2"], r"given twice"),
    (["privacy.target_epsilon=2"], r"set by this study"),
    (["--baseline", "fedavg"], r"--baseline fedavg"),
])
def test_bad_arguments_are_refused(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_study().parse_args(argv)
