"""sims/privacy.py end to end on the tiny model (in-process runs): local_only once per seed, the
budgets' calibrated runs, the table read back from each budget's comparison, and its plot."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from fedpeft.config import ConfigError
from tests.conftest import load_sim, tiny_args
from tests.inprocess_grid import run_in_process

ROOT = Path(__file__).resolve().parents[1]


def load_study():
    return load_sim("privacy")


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
    assert set(rows) == {(b, n) for b in ("inf", "4") for n in ("local_only", "fedavg", "majority")}
    assert rows[("4", "majority")]["accuracy"] == rows[("inf", "majority")]["accuracy"]  # no model: the same at every budget
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


def png_text(path: Path) -> dict[str, str]:
    """The tEXt chunks of a PNG (keyword -> text), read from the bytes."""
    import struct
    import zlib

    data, chunks, i = path.read_bytes(), {}, 8
    while i < len(data):
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        body = data[i + 8:i + 8 + length]
        if kind == b"tEXt":
            key, _, text = body.partition(b"\0")
            chunks[key.decode("latin-1")] = text.decode("latin-1")
        elif kind == b"iTXt":
            key, _, rest = body.partition(b"\0")
            flag, rest = rest[0], rest[2:]
            _, _, rest = rest.partition(b"\0")  # language tag
            _, _, text = rest.partition(b"\0")  # translated keyword
            chunks[key.decode("latin-1")] = (zlib.decompress(text) if flag else text).decode("utf-8")
        i += 12 + length
    return chunks


def test_privacy_tables_and_plot_state_delta_and_n_and_a_failed_budget_has_no_number(tmp_path):
    """Before: no table said which δ the ε were at, nor over how many users; a run that failed at
    one budget was an ordinary point."""
    from tests.test_compare import write_run

    study = load_study()
    names, out, config, epsilons, mechanism = study.parse_args(
        ["--strategies", "fedavg,fedsa", "--epsilons", "4,inf", "--compare-out", str(tmp_path / "study"), "seed=0"])
    users = {"u1": 4, "u2": 4, "u3": 4}

    def runner(cfg):
        name, dp = cfg.federation.strategy, cfg.privacy.mechanism != "none"
        privacy = ({"mechanism": "central", "epsilon": 3.99, "delta": 1e-5, "population_size": 3, "noise_multiplier": 1.5}
                   if dp else {"mechanism": "none", "epsilon": 0.0 if name == "local_only" else None})
        lift = {"local_only": 0.0, "fedavg": 0.1, "fedsa": 0.05}[name] - (0.05 if dp else 0.0)
        failed = name == "fedsa" and dp
        return write_run(Path(cfg.output.dir) / cfg.output.name, name,
                         {u: {1: (.5, .5 + lift), 2: (.5, .5 + lift)} for u in users}, users, privacy=privacy,
                         status="failed" if failed else "ok", status_reason="every call diverged" if failed else "")

    folder = study.study(names, config, epsilons, mechanism, out, runner=runner)
    table = (folder / "privacy.md").read_text()
    assert "**Every ε below is at δ = 1e-05, n = 3 users**" in table
    assert "| 4 | fedavg | ok | 3 | 3.990 | 1e-05 | 3 | 1.500 | 0.550 | +0.050 (Wilcoxon p=0.25) |" in table
    assert "| inf | fedavg | ok | 3 | ∞ | – | – |" in table
    fedsa = next(line for line in table.splitlines() if line.startswith("| 4 | fedsa"))
    assert "**failed (1/1 seeds)**" in fedsa and "0.5" not in fedsa.split("|", 9)[-1], fedsa
    with (folder / "privacy.csv").open() as f:
        rows = {(r["budget"], r["strategy"]): r for r in csv.DictReader(f)}
    assert (float(rows[("4", "fedavg")]["delta"]), float(rows[("4", "fedavg")]["population_size"])) == (1e-5, 3)
    assert rows[("4", "fedsa")]["status"] == "failed" and rows[("4", "fedsa")]["accuracy"] == "nan"
    assert "δ = 1e-05, n = 3 users" in png_text(folder / "privacy.png")["Description"]
    assert "3.99 (δ=1e-05, n=3)" in (folder / "eps4" / "comparison.md").read_text()
