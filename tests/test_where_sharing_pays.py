"""sims/where_sharing_pays.py on hand-made run folders (a fake runner, no model): its table against
a plain computation, its arguments and its plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from fedpeft.config import ConfigError
from tests.conftest import load_sim
from tests.test_compare import T_975, fake_runner, png_size

ROOT = Path(__file__).resolve().parents[1]
FULL = {"a": 4, "b": 12, "c": 30, "n1": 6, "n2": 20}  # training examples before the cap; n1, n2 are new users
TRAINED, NEW = ("a", "b", "c"), ("n1", "n2")
KS = (4, 16, "all")


def load_study():
    return load_sim("where_sharing_pays")


def n_train(k, user: str) -> int:
    return FULL[user] if k == "all" else min(k, FULL[user])


def score(name: str, seed: int, n: int) -> float:
    """A user's round-1 test score: local_only grows with its data, fedavg starts higher and grows less."""
    return 0.3 + 0.02 * n + 0.01 * seed if name == "local_only" else 0.45 + 0.002 * n + 0.02 * seed


def runs_at(k) -> dict:
    counts = {u: n_train(k, u) for u in FULL}
    return {(name, seed): {"trained": {u: {1: (.5, score(name, seed, counts[u])), 2: (.5, score(name, seed, counts[u]) + .05)}
                                       for u in TRAINED},
                           "n_train": counts, "new": {u: (score(name, seed, counts[u]) - .1, None) for u in NEW}}
            for name in ("local_only", "fedavg") for seed in (0, 1)}


def k_runner():
    """Writes the run of the K in the config (data.max_train_per_user; 0 = all)."""
    def runner(cfg) -> dict:
        k = cfg.data.max_train_per_user or "all"
        return fake_runner(runs_at(k))(cfg)
    return runner


def test_the_study_table_against_a_plain_computation(tmp_path):
    study = load_study()
    names, baseline, out, config, ks = study.parse_args(
        ["--strategies", "fedavg", "--seeds", "0,1", "--ks", "4,16,all", "--compare-out", str(tmp_path / "study"),
         "data.new_users=2"])
    assert (names, baseline, ks, config.data.new_users) == (["local_only", "fedavg"], "local_only", list(KS), "2")
    folder = study.study(names, baseline, config, ks, out, runner=k_runner())
    with (folder / "where_sharing_pays.csv").open() as f:
        table = {(r["K"], r["strategy"]): r for r in csv.DictReader(f)}
    assert set(table) == {(str(k), n) for k in KS for n in names}
    for k in KS:
        for group, users, prefix in (("trained", TRAINED, ""), ("new", NEW, "new_")):
            offset = 0.0 if group == "trained" else -0.1
            heads = {n: [sum(score(n, s, n_train(k, u)) + offset for u in users) / len(users) for s in (0, 1)]
                     for n in names}
            gains = [f - b for f, b in zip(heads["fedavg"], heads["local_only"])]  # per seed, same users
            for name in names:
                row = table[(str(k), name)]
                assert int(row[f"{prefix}users"]) == len(users) == int(row[f"{prefix}users_all"])
                assert float(row[f"{prefix}n_train_mean"]) == pytest.approx(sum(n_train(k, u) for u in users) / len(users))
                mean, half = sum(heads[name]) / 2, T_975[1] * abs(heads[name][0] - heads[name][1]) / 2
                assert float(row[f"{prefix}accuracy"]) == pytest.approx(mean), (k, name, group)
                assert float(row[f"{prefix}accuracy_ci95_low"]) == pytest.approx(mean - half)
            row = table[(str(k), "fedavg")]
            mean, half = sum(gains) / 2, T_975[1] * abs(gains[0] - gains[1]) / 2
            assert float(row[f"{prefix}gain_vs_local_only"]) == pytest.approx(mean), (k, group)
            assert (float(row[f"{prefix}gain_vs_local_only_ci95_low"]), float(row[f"{prefix}gain_vs_local_only_ci95_high"])) \
                == pytest.approx((mean - half, mean + half))
            assert float(table[(str(k), "local_only")][f"{prefix}gain_vs_local_only"]) == 0.0
    # sharing pays at K=4 (every user capped at 4 or fewer) and costs at K=all for the trained users
    assert float(table[("4", "fedavg")]["gain_vs_local_only"]) > 0 > float(table[("all", "fedavg")]["gain_vs_local_only"])
    report = (folder / "where_sharing_pays.md").read_text()
    gain_4 = float(table[("4", "fedavg")]["gain_vs_local_only"])
    assert "| 4 | fedavg | ok | 3 of 3 | 4.0 |" in report and f"{gain_4:+.3f} [" in report and "new vs local_only" in report
    for k in KS:
        assert (folder / f"K{k}" / "comparison.md").is_file()
    for png in ("gain_by_k.png", "gain_by_activity.png"):
        width, height = png_size(folder / png)
        assert width > 300 and height > 300


def test_one_seed_gives_the_wilcoxon_p_instead_of_an_interval(tmp_path):
    study = load_study()
    names, baseline, out, config, ks = study.parse_args(["--strategies", "local_only,fedavg", "--ks", "all", "seed=0",
                                                         "--compare-out", str(tmp_path / "one")])
    folder = study.study(names, baseline, config, ks, out, runner=k_runner())
    with (folder / "where_sharing_pays.csv").open() as f:
        row = {r["strategy"]: r for r in csv.DictReader(f)}["fedavg"]
    assert math.isnan(float(row["gain_vs_local_only_ci95_low"]))
    assert f"(Wilcoxon p={float(row['wilcoxon_p']):.2g})" in (folder / "where_sharing_pays.md").read_text()


def test_arguments_are_checked_and_listed(capsys):
    study = load_study()
    for bad, message in ((["--ks", "4,x"], "'x' is not a count"), (["--ks", "4,4"], "4 is given twice"),
                         (["--ks", "0"], "'0' is not a count"),
                         (["data.max_train_per_user=8"], "sets it for each K")):
        with pytest.raises(ConfigError, match=message):
            study.parse_args(bad)
    with pytest.raises(SystemExit):
        study.parse_args(["--help"])
    text = capsys.readouterr().out
    for option in ("--strategies", "--baseline", "--seeds", "--ks", "--compare-out", "KEY=VALUE", "--rounds"):
        assert option in text, option
