"""A comparison that cannot flatter: the majority label over exactly its common users, run statuses
(a failed run has no number, and the comparison goes on), and lost users flagged and counted.

Run folders are written by hand (tests/test_compare.py's write_run) on the synthetic benchmark's
real users, so the majority row is checked against a plain count over the data the runs trained on.
"""

from __future__ import annotations

import csv
import re

import pytest

from fedpeft.config import Config
from tests.conftest import load_sim
from tests.test_compare import FAILING, fake_runner, hand_config

CAP, SEEDS = 5, (0, 1)


def synthetic_config() -> Config:
    config = Config()
    config.data.num_users, config.data.new_users, config.data.max_train_per_user = 10, 3, CAP
    config.data.train_per_user, config.data.train_per_user_min, config.data.test_per_user = 12, 2, 9
    config.data.noise = 0.3
    config.compare.seeds = list(SEEDS)
    return config


def plain_majority(train: list[tuple[str, ...]], test: list[tuple[str, ...]]) -> float:
    """The most frequent training label (ties: the first seen), and the share of test examples
    whose gold labels hold it: a count by hand, no fedpeft code."""
    counts: dict[str, int] = {}
    for labels in train:
        for label in labels:
            counts[label] = counts.get(label, 0) + 1
    best = max(counts.values())
    guess = next(label for label in counts if counts[label] == best)  # dicts keep first-seen order
    return sum(guess in gold for gold in test) / len(test)


def synthetic_users(config: Config) -> tuple[dict[str, dict], set[str]]:
    """Each user's training and test labels as a run of ``config`` sees them, and the new users."""
    from fedpeft.data import get_benchmark
    from fedpeft.data.user_groups import new_user_indices

    bench = get_benchmark(config)
    ids = bench.user_ids()
    users = {}
    for i, user_id in enumerate(ids):
        user = bench.load_user(i)
        users[user_id] = {"train": [ex.labels for ex in user.train], "test": [ex.labels for ex in user.test]}
    return users, {ids[i] for i in new_user_indices(config, len(ids))}


def test_majority_row_is_over_the_common_users_of_each_group_from_the_capped_training_splits(tmp_path):
    """Before: no majority row at all; sims/majority_baseline.py scored every user, new ones among
    them, outside the comparison."""
    from fedpeft.study.compare import compare

    config = synthetic_config()
    users, new_ids = synthetic_users(config)
    trained_ids = sorted(set(users) - new_ids)
    assert len(new_ids) == 3 and all(len(u["train"]) <= CAP for u in users.values())
    lost_trained, lost_new = trained_ids[0], sorted(new_ids)[0]  # fedavg fails on them in seed 1
    n_train = {u: len(users[u]["train"]) for u in users}
    base = {u: 0.3 + 0.05 * i for i, u in enumerate(sorted(users))}

    def spec(name: str, seed: int) -> dict:
        lift = 0.1 if name == "fedavg" else 0.0
        return {"trained": {u: {1: (.5, base[u] + lift + .01 * seed), 2: (.4, 0.0)} for u in trained_ids},
                "new": {u: (base[u] + lift, None) for u in new_ids}, "n_train": n_train,
                "failed": {lost_trained: "diverged", lost_new: "diverged"} if (name, seed) == ("fedavg", 1) else {}}

    runs = {(name, seed): spec(name, seed) for name in ("local_only", "fedavg") for seed in SEEDS}
    out = compare(["local_only", "fedavg"], "local_only", config, tmp_path / "cmp", runner=fake_runner(runs))
    with (out / "comparison.csv").open() as f:
        table = {r["strategy"]: r for r in csv.DictReader(f)}
    row = table["majority"]
    majority = {u: plain_majority(users[u]["train"], users[u]["test"]) for u in users}
    common = [u for u in trained_ids if u != lost_trained]
    expected = sum(majority[u] for u in common) / len(common)
    assert float(row["accuracy_best_val"]) == pytest.approx(expected)
    assert float(row["accuracy_final"]) == pytest.approx(expected)
    assert row["users_common"] == str(len(common))
    everyone = sum(majority[u] for u in trained_ids) / len(trained_ids)
    assert expected != pytest.approx(everyone)  # the lost user matters here: over all users is another number
    assert float(row["accuracy_best_val_all_users"]) == pytest.approx(everyone)
    # paired against local_only over the common users: local_only's score (best_val picks round 1) averaged over seeds
    gain = sum(majority[u] - (base[u] + base[u] + .01) / 2 for u in common) / len(common)
    assert float(row["gain_vs_local_only"]) == pytest.approx(gain)
    # new users: their own group, their own common set
    common_new = sorted(new_ids - {lost_new})
    assert float(row["new_accuracy"]) == pytest.approx(sum(majority[u] for u in common_new) / len(common_new))
    assert row["new_users_common"] == "2"
    # the cap matters: on the uncapped training splits the same users' majority scores otherwise
    uncapped = synthetic_config()
    uncapped.data.max_train_per_user = 0
    full, _ = synthetic_users(uncapped)
    assert any(len(full[u]["train"]) > CAP for u in common)
    assert sum(plain_majority(full[u]["train"], full[u]["test"]) for u in common) / len(common) != pytest.approx(expected)
    report = (out / "comparison.md").read_text()
    assert re.search(rf"\| majority \| no model \| {expected:.3f} \| {everyone:.3f} \| {expected:.3f} \|", report), report


def test_no_majority_row_when_the_runs_trained_on_other_data(tmp_path):
    """The majority is only shown for the data the runs saw: runs that report another n_train
    (another data config) get no row, and the report says why."""
    from fedpeft.study.compare import compare

    config = synthetic_config()
    users, new_ids = synthetic_users(config)
    trained_ids = sorted(set(users) - new_ids)
    spec = {"trained": {u: {1: (.5, .5), 2: (.5, .5)} for u in trained_ids}, "new": {u: (.5, None) for u in new_ids},
            "n_train": {u: len(users[u]["train"]) + 1 for u in users}}
    config.compare.seeds = [0]
    out = compare(["local_only"], "local_only", config, tmp_path / "cmp", runner=fake_runner({("local_only", 0): spec}))
    with (out / "comparison.csv").open() as f:
        assert [r["strategy"] for r in csv.DictReader(f)] == ["local_only"]
    assert "No `majority` row: user" in (out / "comparison.md").read_text()
    assert "examples in the runs but has" in (out / "comparison.md").read_text()


N3 = {"u1": 5, "u2": 5, "u3": 5}


def scored(seed: int, lift: float = 0.0) -> dict:
    return {"trained": {u: {1: (.5, .5 + lift + .1 * i), 2: (.5, .6 + lift + .1 * i + .01 * seed)}
                        for i, u in enumerate(N3)}, "n_train": N3}


def test_a_strategy_with_a_failed_run_shows_failed_and_no_number_and_the_comparison_goes_on(tmp_path):
    """Before: a run that raised ended the whole comparison, and a run that did not train (status
    failed in its results.json) was an ordinary row with a headline."""
    from fedpeft.sim import RunFailed
    from fedpeft.study.compare import compare

    runs = {("local_only", s): scored(s) for s in SEEDS}
    runs[("local_only", 0)].update(status="degraded", status_reason="1 of 3 users diverged")
    runs[("fedavg", 0)] = scored(0, .2)
    runs[("fedavg", 1)] = {**scored(1, -.3), "status": "failed",
                           "status_reason": "3 of 3 users diverged (more than federation.max_failed_fraction 0.1); try a lower train.lr"}
    runs[("fedsa", 0)] = scored(0, .1)
    write = fake_runner(runs)
    ran = []

    def runner(cfg):
        ran.append((cfg.federation.strategy, cfg.seed))
        if (cfg.federation.strategy, cfg.seed) == ("fedsa", 1):
            raise RunFailed("every training call diverged (run folder x)")  # nothing written: no users at all
        return write(cfg)

    out = compare(["local_only", "fedavg", "fedsa"], "local_only", hand_config(list(SEEDS)), tmp_path / "cmp", runner=runner)
    assert ran == [(n, s) for s in SEEDS for n in ("local_only", "fedavg", "fedsa")]  # every run was tried
    with (out / "comparison.csv").open() as f:
        table = {r["strategy"]: r for r in csv.DictReader(f)}
    for name, reason in (("fedavg", "try a lower train.lr"), ("fedsa", "RunFailed: every training call diverged")):
        row = table[name]
        assert (row["status"], row["status_seeds"]) == ("failed", "1/2") and reason in row["status_reason"]
        assert all(row[k] == "" for k in ("accuracy_best_val", "accuracy_final", "accuracy_best_val_all_users",
                                          "gain_vs_local_only", "wins", "accuracy_p10")), row
    # the failed runs do not shrink the others' users: fedsa's seed 1 has none, local_only keeps all three
    assert table["local_only"]["users_common"] == "3" and table["local_only"]["status"] == "degraded"
    assert float(table["local_only"]["accuracy_final"]) == pytest.approx(sum(.6 + .1 * i + .005 for i in range(3)) / 3)
    report = (out / "comparison.md").read_text()
    for name in ("fedavg", "fedsa"):
        line = next(ln for ln in report.splitlines() if ln.startswith(f"| {name} "))
        assert "failed (1/2 seeds)" in line and not re.search(r"\d\.\d{3}", line), line
    local = next(ln for ln in report.splitlines() if ln.startswith("| local_only"))
    assert local.startswith("| local_only ⚠ | **degraded (1/2 seeds)**: seed 0: 1 of 3 users diverged") and "0.7" in local
    with (out / "runs.csv").open() as f:
        statuses = {(r["strategy"], r["seed"]): r["status"] for r in csv.DictReader(f)}
    assert statuses == {("local_only", "0"): "degraded", ("local_only", "1"): "ok", ("fedavg", "0"): "ok",
                        ("fedavg", "1"): "failed", ("fedsa", "0"): "ok", ("fedsa", "1"): "failed"}
    assert "- fedsa-seed1 (seed 1): **failed**: RunFailed" in report


def test_a_run_from_before_statuses_reads_as_unknown_and_one_that_scored_nobody_as_failed(tmp_path):
    from fedpeft.study.compare import compare

    runs = {("local_only", 0): {**scored(0), "status": None},
            ("fedavg", 0): {**scored(0), "status": None, "failed": {u: "boom" for u in N3}}}
    out = compare(["local_only", "fedavg"], "local_only", hand_config([0]), tmp_path / "cmp", runner=fake_runner(runs))
    with (out / "comparison.csv").open() as f:
        table = {r["strategy"]: r for r in csv.DictReader(f)}
    assert table["local_only"]["status"] == "unknown" and table["local_only"]["accuracy_final"] != ""
    assert table["fedavg"]["status"] == "failed" and "every user failed" in table["fedavg"]["status_reason"]
    assert table["local_only"]["users_common"] == "3"


def test_a_strategy_that_lost_users_is_flagged_with_an_all_users_headline_beside(tmp_path):
    """Before: a user that one strategy failed on was silently dropped from every strategy's
    headline; the table said 'left out', nothing flagged the strategy that lost it."""
    from fedpeft.study.compare import compare

    out = compare(["local_only", "fedavg"], "local_only", hand_config(list(SEEDS)), tmp_path / "cmp",
                  runner=fake_runner(FAILING))
    with (out / "comparison.csv").open() as f:
        table = {r["strategy"]: r for r in csv.DictReader(f)}
    assert (table["fedavg"]["users_lost"], table["local_only"]["users_lost"]) == ("1", "0")
    own = [(.8 + .4 + .7) / 3, (.8 + .9) / 2]  # each seed over the users it scored (u2 lost in seed 1)
    assert float(table["fedavg"]["accuracy_best_val_all_users"]) == pytest.approx(sum(own) / 2)
    report = (out / "comparison.md").read_text()
    assert "**Lost users** (out of every strategy's common set because these strategies did not score them): fedavg 1." in report
    fedavg = next(ln for ln in report.splitlines() if ln.startswith("| fedavg"))
    cells = [c.strip() for c in fedavg.strip("|").split("|")]
    assert cells[0] == "fedavg ⚠" and cells[3] == f"{sum(own) / 2:.3f} (1 lost)"
    assert "⚠ 1 (u2 failed in seed 1: CUDA out of memory)" in cells
    local = next(ln for ln in report.splitlines() if ln.startswith("| local_only"))
    assert local.startswith("| local_only | ") and "lost)" not in local


def test_the_study_tables_show_failed_runs_and_go_on(tmp_path):
    """where_sharing_pays: a strategy that failed at one K has no number there, and a number at the others."""
    study = load_sim("where_sharing_pays")
    names, baseline, out, config, ks = study.parse_args(["--strategies", "fedavg", "--seeds", "0", "--ks", "4,all",
                                                        "--compare-out", str(tmp_path / "study")])

    def runner(cfg):
        k = cfg.data.max_train_per_user or "all"
        spec = {**scored(0, .1 if cfg.federation.strategy == "fedavg" else 0)}
        if (cfg.federation.strategy, k) == ("fedavg", 4):
            spec.update(status="failed", status_reason="diverged")
        return fake_runner({(cfg.federation.strategy, cfg.seed): spec})(cfg)

    folder = study.study(names, baseline, config, ks, out, runner=runner)
    report = (folder / "where_sharing_pays.md").read_text()
    line = next(ln for ln in report.splitlines() if ln.startswith("| 4 | fedavg"))
    assert "**failed (1/1 seeds)**" in line and not re.search(r"\d\.\d{3}", line), line
    assert re.search(r"\| all \| fedavg \| ok \| 3 of 3 \| 5\.0 \| 0\.\d{3} \| \+0\.100", report), report
    assert "- K4/fedavg: **failed**: diverged" in report


def test_real_runs_where_one_strategy_diverges_give_a_failed_row_and_a_majority_row(tiny_bert, tmp_path):
    """In-process runs of the tiny model: fedavg with train.lr=1e30 (every call diverges) is
    ``failed`` with no number; local_only keeps its row; the majority row is the plain count."""
    from fedpeft.study.compare import compare
    from tests.inprocess_grid import run_in_process
    from tests.test_run_outputs import tiny_config

    config = tiny_config(tiny_bert, tmp_path, "unused", "local_only")
    config.compare.seeds = [0]

    def runner(cfg):
        if cfg.federation.strategy == "fedavg":
            cfg.train.lr = 1e30
        return run_in_process(cfg)[0]

    out = compare(["local_only", "fedavg"], "local_only", config, tmp_path / "cmp", runner=runner)
    with (out / "comparison.csv").open() as f:
        table = {r["strategy"]: r for r in csv.DictReader(f)}
    assert table["fedavg"]["status"] == "failed" and "train.lr" in table["fedavg"]["status_reason"]
    assert table["fedavg"]["accuracy_best_val"] == "" and table["local_only"]["status"] == "ok"
    assert table["local_only"]["users_common"] == "4" and float(table["local_only"]["accuracy_final"]) >= 0
    users, _ = synthetic_users(config)
    expected = sum(plain_majority(u["train"], u["test"]) for u in users.values()) / len(users)
    assert float(table["majority"]["accuracy_best_val"]) == pytest.approx(expected)
    line = next(ln for ln in (out / "comparison.md").read_text().splitlines() if ln.startswith("| fedavg"))
    assert "failed (1/1 seeds)" in line and not re.search(r"\d\.\d{3}", line), line
