"""The comparison's statistics against plain hand computations, and the multi-seed comparison
end to end on the tiny synthetic benchmark (runs driven in process)."""

from __future__ import annotations

import csv
import itertools
import json
import math
import struct
from pathlib import Path

import pytest

from fedpeft.study.stats import mean_interval, paired_differences, paired_stats
from tests.inprocess_grid import run_in_process
from tests.test_run_outputs import tiny_config

T_975 = {1: 12.706204736174707, 2: 4.302652729749464}  # Student's t quantiles from a table, by degrees of freedom


def test_mean_interval_is_the_t_interval_over_seeds():
    mean, low, high = mean_interval([0.60, 0.64, 0.62])
    half = T_975[2] * 0.02 / math.sqrt(3)  # sample sd of 0.60, 0.64, 0.62 is 0.02
    assert (mean, low, high) == pytest.approx((0.62, 0.62 - half, 0.62 + half))
    assert mean_interval([0.5, 0.7])[1:] == pytest.approx((0.6 - T_975[1] * math.sqrt(0.02) / math.sqrt(2),
                                                           0.6 + T_975[1] * math.sqrt(0.02) / math.sqrt(2)))
    one = mean_interval([0.55])
    assert one[0] == 0.55 and math.isnan(one[1]) and math.isnan(one[2])  # one seed: no interval


def exact_wilcoxon_p(d: list[float]) -> float:
    """Two-sided exact signed-rank p by enumerating every sign pattern (distinct |d|, no zeros)."""
    ranks = {abs(x): i + 1 for i, x in enumerate(sorted(d, key=abs))}
    w_plus = sum(ranks[abs(x)] for x in d if x > 0)
    t = min(w_plus, sum(ranks.values()) - w_plus)
    n = len(d)
    at_most = sum(1 for signs in itertools.product((0, 1), repeat=n) if sum(r for r, s in zip(range(1, n + 1), signs) if s) <= t)
    return min(1.0, 2 * at_most / 2 ** n)


# per-user accuracies of two seeds, 10 test examples per user (one example = 0.1)
STRATEGY = [{"u1": 0.8, "u2": 0.5, "u3": 0.6, "u4": 0.9, "u5": 0.3, "u6": 0.7, "u7": 0.4},
            {"u1": 0.6, "u2": 0.5, "u3": 0.8, "u4": 0.9, "u5": 0.2, "u6": 0.7, "u7": 0.6}]
BASELINE = [{"u1": 0.5, "u2": 0.5, "u3": 0.5, "u4": 0.6, "u5": 0.6, "u6": 0.6, "u7": 0.5},
            {"u1": 0.5, "u2": 0.5, "u3": 0.4, "u4": 0.6, "u5": 0.6, "u6": 0.5, "u7": 0.6}]
# differences per seed -> mean: u1 .3,.1 -> .2; u2 0,0 -> 0; u3 .1,.4 -> .25; u4 .3,.3 -> .3;
# u5 -.3,-.4 -> -.35 (hurt: worse by more than .1); u6 .1,.2 -> .15; u7 -.1,0 -> -.05 (worse, not hurt)
EXPECTED = {"u1": 0.2, "u2": 0.0, "u3": 0.25, "u4": 0.3, "u5": -0.35, "u6": 0.15, "u7": -0.05}


def test_paired_statistics_against_a_plain_computation():
    diffs = paired_differences("accuracy", STRATEGY, BASELINE)
    assert diffs == pytest.approx(EXPECTED)
    stats = paired_stats(diffs, {u: 10 for u in diffs})
    assert (stats["wins"], stats["ties"], stats["losses"], stats["users"]) == (4, 1, 2, 7)
    assert stats["mean_diff"] == pytest.approx(sum(EXPECTED.values()) / 7)
    assert stats["hurt_share"] == pytest.approx(1 / 7)
    nonzero = [d for d in EXPECTED.values() if d != 0]  # zero differences are dropped, as scipy's default
    assert stats["wilcoxon_p"] == pytest.approx(exact_wilcoxon_p(nonzero))
    # exactly one example worse (u7 in a seed where it is .1 worse) is not "hurt"; more is
    assert paired_stats({"a": 0.6 - 0.7, "b": 0.5 - 0.7}, {"a": 10, "b": 10})["hurt_share"] == 0.5


def test_paired_statistics_of_lower_is_better_metrics_and_of_no_difference():
    mae = paired_differences("mae", [{"a": 0.5, "b": 1.5}], [{"a": 1.0, "b": 1.0}])
    assert mae == pytest.approx({"a": 0.5, "b": -0.5})  # a smaller error is a gain
    same = paired_stats(paired_differences("accuracy", BASELINE, BASELINE), {u: 10 for u in BASELINE[0]})
    assert (same["wins"], same["ties"], same["losses"], same["wilcoxon_p"], same["hurt_share"]) == (0, 7, 0, 1.0, 0.0)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_multi_seed_comparison_writes_intervals_paired_statistics_and_a_scatter(tiny_bert, tmp_path):
    """Before: one seed, final-round scores only, no interval, no paired test, no scatter."""
    from fedpeft.study.compare import compare

    config = tiny_config(tiny_bert, tmp_path, "unused", "local_only")
    config.train.lr, config.data.val_per_user = 0.3, 6
    config.compare.seeds = [0, 1]
    out = compare(["local_only", "fedsa"], "local_only", config, tmp_path / "cmp", runner=lambda cfg: run_in_process(cfg)[0])

    table = {r["strategy"]: r for r in _rows(out / "comparison.csv")}
    assert set(table) == {"local_only", "fedsa", "majority"}  # each user's majority label: tests/test_compare_honest.py
    for name in ("local_only", "fedsa"):
        finals, best_vals, per_user = [], [], []
        for seed in (0, 1):
            run = out / f"{name}-seed{seed}"
            assert f"\nseed: {seed}\n" in (run / "config.yaml").read_text()
            rows = [json.loads(line) for line in (run / "rounds_per_user.jsonl").read_text().splitlines()]
            last = {r["user_id"]: r["test"]["accuracy"] for r in rows if r["round"] == 2}
            finals.append(sum(last.values()) / len(last))
            assert finals[-1] == pytest.approx(json.loads((run / "results.json").read_text())["summary"]["accuracy"])
            val_mean = {k: sum(r["val"]["accuracy"] for r in rows if r["round"] == k) / len(last) for k in (1, 2)}
            best = 1 if round(val_mean[1], 12) >= round(val_mean[2], 12) else 2  # earliest on ties
            at_best = {r["user_id"]: r["test"]["accuracy"] for r in rows if r["round"] == best}
            best_vals.append(sum(at_best.values()) / len(at_best))
            per_user.append(at_best)
        for key, values in (("accuracy_final", finals), ("accuracy_best_val", best_vals)):
            mean = sum(values) / 2
            half = T_975[1] * abs(values[0] - values[1]) / math.sqrt(2) / math.sqrt(2)  # sd of two values: |a - b| / sqrt 2
            assert float(table[name][key]) == pytest.approx(mean)
            assert float(table[name][f"{key}_ci95_low"]) == pytest.approx(mean - half)
            assert float(table[name][f"{key}_ci95_high"]) == pytest.approx(mean + half)
        table[name]["per_user"] = {u: (per_user[0][u] + per_user[1][u]) / 2 for u in per_user[0]}
    assert float(table["local_only"]["gain_vs_local_only"]) == 0.0 and table["local_only"]["ties"] == "4"
    diffs = {u: table["fedsa"]["per_user"][u] - table["local_only"]["per_user"][u] for u in table["fedsa"]["per_user"]}
    assert float(table["fedsa"]["gain_vs_local_only"]) == pytest.approx(sum(diffs.values()) / 4)
    wins = sum(d > 1e-12 for d in diffs.values())
    losses = sum(d < -1e-12 for d in diffs.values())
    assert (int(table["fedsa"]["wins"]), int(table["fedsa"]["losses"])) == (wins, losses)
    assert 0 <= float(table["fedsa"]["wilcoxon_p"]) <= 1
    assert float(table["fedsa"]["hurt_vs_local_only"]) == pytest.approx(sum(d < -1 / 8 - 1e-12 for d in diffs.values()) / 4)
    assert int(table["fedsa"]["bytes_total"]) > 0 == int(table["local_only"]["bytes_total"])

    per_user_csv = {r["user_id"]: r for r in _rows(out / "per_user.csv")}
    assert {u: float(r["fedsa"]) for u, r in per_user_csv.items()} == pytest.approx(table["fedsa"]["per_user"])
    report = (out / "comparison.md").read_text()
    assert "Seeds 0, 1" in report and "Wilcoxon" in report and "best_val" in report
    assert f"{wins}/{4 - wins - losses}/{losses}" in report
    width, height = png_size(out / "scatter.png")
    assert width > 300 and height > 300
    for png in ("rounds.png", "distribution.png"):
        png_size(out / png)


# ---- comparisons of hand-made run folders (a fake runner writes them; no model runs) ----

def write_run(run: Path, strategy: str, trained: dict[str, dict[int, tuple[float, float]]], n_train: dict[str, int],
              new: dict[str, tuple[float, float | None]] | None = None, failed: dict[str, str] | None = None,
              rounds: int = 2, n_test: int = 10, groups: bool = True, status: str | None = "ok", status_reason: str = "",
              privacy: dict | None = None) -> dict:
    """A run folder as fedpeft.sim writes it. ``trained[u][r] = (val, test)`` at each round ``u`` was
    evaluated; ``new[u] = (score, as_is or None)``; ``failed[u] = error``: that user has no final score
    (a trained one keeps its earlier rounds). ``groups=False``: per_user.csv without the group and
    n_train columns (folders of before new users). ``status``: results.json's run status (None: a
    results.json from before statuses); ``privacy``: its ``privacy``."""
    new, failed = new or {}, failed or {}
    run.mkdir(parents=True, exist_ok=True)
    rows = [{"round": r, "user_id": u, "partition_id": i, "n_val": 4, "n_test": n_test,
             "val": {"accuracy": val}, "test": {"accuracy": test}}
            for i, (u, by_round) in enumerate(sorted(trained.items())) for r, (val, test) in sorted(by_round.items())
            if not (u in failed and r == rounds)]
    (run / "rounds_per_user.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"round": r, "accuracy": sum(x["test"]["accuracy"] for x in rows if x["round"] == r)
                    / max(1, sum(x["round"] == r for x in rows))}) + "\n" for r in range(1, rounds + 1)))
    as_is = any(a is not None for _, a in new.values())
    columns = ["user_id", "partition_id", *(["group"] if groups else []), "status", "accuracy", "n_test",
               *(["n_train"] if groups else []), "rounds_trained", "examples_processed", "failed_calls", "error",
               *(["as_is_accuracy"] if as_is else [])]
    table = []
    for i, u in enumerate([*sorted(trained), *sorted(new)]):
        group = "new" if u in new else "trained"
        row = {"user_id": u, "partition_id": i, "group": group, "n_test": n_test, "n_train": n_train[u],
               "rounds_trained": 0 if group == "new" else rounds, "examples_processed": 8, "failed_calls": 0}
        if u in failed:
            row.update(status="failed", accuracy="", error=failed[u], n_test="", failed_calls=1)
        elif group == "new":
            row.update(status="ok", accuracy=new[u][0], error="", as_is_accuracy="" if new[u][1] is None else new[u][1])
        else:
            row.update(status="ok", accuracy=trained[u][rounds][1], error="")
        table.append(row)
    with (run / "per_user.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    ok = [r for r in table if r["status"] == "ok"]
    results = {"metrics": ["accuracy"], "headline": "mean over users", "strategy": strategy, "rounds": rounds,
               "num_users": len(table), "run_dir": str(run), "wall_seconds": 1.0,
               "summary": {"n_evaluated": len(ok), "n_failed": len(table) - len(ok),
                           "accuracy": sum(float(r["accuracy"]) for r in ok) / len(ok) if ok else None},
               "compute": {"examples_processed_per_user_mean": 8.0, "driver_pretrain_examples": 0},
               "communication": {"bytes_total": 0 if strategy == "local_only" else 1000},
               "parameters": {"trainable_params_per_user": 10, "shared_params": 0 if strategy == "local_only" else 4}}
    if status is not None:
        results.update(status=status, status_reason=status_reason,
                       status_counts={"users": len(table), "failed": len(table) - len(ok), "diverged": 0, "undertrained": 0,
                                      "affected": len(table) - len(ok), "max_failed_fraction": 0.1})
    if privacy is not None:
        results["privacy"] = privacy
    (run / "results.json").write_text(json.dumps(results))
    return results


def fake_runner(runs: dict[tuple[str, int], dict]):
    """A runner that writes ``runs[(strategy, seed)]`` (write_run's keyword arguments) as the run folder."""
    def runner(cfg) -> dict:
        spec = runs[(cfg.federation.strategy, cfg.seed)]
        return write_run(Path(cfg.output.dir) / cfg.output.name, cfg.federation.strategy, **spec)
    return runner


def hand_config(seeds: list[int]):
    from fedpeft.config import Config

    config = Config()
    config.compare.seeds = seeds
    return config


N3 = {"u1": 5, "u2": 5, "u3": 5}
# (val, test) at rounds 1 and 2; the val scores make the best_val round plain: s0 round 2 / s1 round 1 for local_only;
# fedavg s0 round 2; fedavg s1: u2 fails at the end (its round 1 row only), the panel u1, u3 is best at round 1
FAILING = {
    ("local_only", 0): {"trained": {"u1": {1: (.4, .5), 2: (.5, .6)}, "u2": {1: (.4, .8), 2: (.5, .9)},
                                    "u3": {1: (.4, .6), 2: (.5, .6)}}, "n_train": N3},
    ("local_only", 1): {"trained": {"u1": {1: (.6, .6), 2: (.5, .6)}, "u2": {1: (.6, .9), 2: (.5, .8)},
                                    "u3": {1: (.6, .5), 2: (.5, .7)}}, "n_train": N3},
    ("fedavg", 0): {"trained": {"u1": {1: (.5, .7), 2: (.6, .8)}, "u2": {1: (.5, .5), 2: (.6, .4)},
                                "u3": {1: (.5, .7), 2: (.6, .7)}}, "n_train": N3},
    ("fedavg", 1): {"trained": {"u1": {1: (.6, .8), 2: (.5, .7)}, "u2": {1: (.6, .5), 2: (.5, .5)},
                                "u3": {1: (.6, .9), 2: (.5, .9)}}, "n_train": N3, "failed": {"u2": "CUDA out of memory"}},
}
BEST = {("local_only", 0): 2, ("local_only", 1): 1, ("fedavg", 0): 2, ("fedavg", 1): 1}


def test_a_user_who_fails_in_one_seed_is_left_out_of_every_strategy_and_said_so(tmp_path):
    """Before: each headline was over its own run's scored users (fedavg's seed 1 without u2, on
    which fedavg is worse), and nothing said that u2 was missing."""
    from fedpeft.study.compare import compare

    out = compare(["local_only", "fedavg"], "local_only", hand_config([0, 1]), tmp_path / "cmp", runner=fake_runner(FAILING))
    table = {r["strategy"]: r for r in _rows(out / "comparison.csv")}
    common = ["u1", "u3"]  # scored in every seed of every strategy

    def test_score(key, rule, u):
        return FAILING[key]["trained"][u][BEST[key] if rule == "best_val" else 2][1]

    for name in ("local_only", "fedavg"):
        for rule in ("best_val", "final"):
            per_seed = [sum(test_score((name, s), rule, u) for u in common) / 2 for s in (0, 1)]
            assert float(table[name][f"accuracy_{rule}"]) == pytest.approx(sum(per_seed) / 2), (name, rule)
            half = T_975[1] * abs(per_seed[0] - per_seed[1]) / 2  # sd of two values |a - b| / sqrt 2, over sqrt 2
            assert float(table[name][f"accuracy_{rule}_ci95_low"]) == pytest.approx(sum(per_seed) / 2 - half)
        assert (table[name]["users_common"], table[name]["users_all"]) == ("2", "3")
    # beside it, labelled, the old number: each run's own scored users (fedavg seed 1 without u2)
    own = [(.8 + .4 + .7) / 3, (.8 + .9) / 2]
    assert float(table["fedavg"]["accuracy_best_val_all_users"]) == pytest.approx(sum(own) / 2)
    assert table["fedavg"]["users_lost"] == "1" and table["local_only"]["users_lost"] == "0"
    assert table["fedavg"]["lost_why"] == "1 (u2 failed in seed 1: CUDA out of memory)"

    # paired, under compare.select=best_val, over u1 and u3 only
    diffs = {u: sum(test_score(("fedavg", s), "best_val", u) - test_score(("local_only", s), "best_val", u)
                    for s in (0, 1)) / 2 for u in common}
    assert diffs == pytest.approx({"u1": 0.2, "u3": 0.25})
    row = table["fedavg"]
    assert float(row["gain_vs_local_only"]) == pytest.approx(0.225)
    assert (row["wins"], row["ties"], row["losses"]) == ("2", "0", "0")
    assert float(row["wilcoxon_p"]) == pytest.approx(exact_wilcoxon_p(list(diffs.values())))
    assert float(row["hurt_vs_local_only"]) == 0.0
    per_seed_gain = [(0.2 + 0.1) / 2, (0.2 + 0.4) / 2]  # seed i against the baseline's seed i
    half = T_975[1] * abs(per_seed_gain[0] - per_seed_gain[1]) / 2
    assert (float(row["gain_vs_local_only_ci95_low"]), float(row["gain_vs_local_only_ci95_high"])) == pytest.approx(
        (0.225 - half, 0.225 + half))

    report = (out / "comparison.md").read_text()
    assert "Trained users: 2 of 3" in report
    assert "u2 (fedavg: failed in seed 1: CUDA out of memory)" in report
    assert "accuracy best_val, all users" in report and "lost users" in report
    assert "## New users" not in report  # these runs have none
    per_user = {r["user_id"]: r for r in _rows(out / "per_user.csv")}
    assert set(per_user["u2"]) == {"user_id", "local_only", "fedavg"}
    assert float(per_user["u2"]["fedavg"]) == pytest.approx(0.4)  # the one seed that scored it
    for png in ("scatter.png", "distribution.png", "rounds.png", "activity.png"):
        png_size(out / png)


def test_folders_without_group_and_n_train_are_all_trained_users_and_have_no_activity_bins(tmp_path):
    from fedpeft.study.compare import compare

    runs = {key: {**spec, "groups": False} for key, spec in FAILING.items() if key[1] == 0}
    out = compare(["local_only", "fedavg"], "local_only", hand_config([0]), tmp_path / "cmp", runner=fake_runner(runs))
    table = {r["strategy"]: r for r in _rows(out / "comparison.csv")}
    assert table["fedavg"]["users_common"] == "3" and table["fedavg"]["lost_why"] == "0"
    assert float(table["fedavg"]["accuracy_final"]) == pytest.approx((.8 + .4 + .7) / 3)
    assert not (out / "by_activity.csv").exists() and not (out / "activity.png").exists()
    assert "No activity bins" in (out / "comparison.md").read_text()


TRAINED_N = {"t1": 2, "t2": 2, "t3": 4, "t4": 4, "t5": 8, "t6": 8}
NEW_N = {"n1": 3, "n2": 5, "n3": 9}
ROUND1 = {  # trained users' test scores at round 1 (val is flat, so best_val picks round 1); round 2 adds .1
    ("local_only", 0): {"t1": .2, "t2": .3, "t3": .5, "t4": .5, "t5": .8, "t6": .9},
    ("local_only", 1): {"t1": .3, "t2": .3, "t3": .4, "t4": .6, "t5": .8, "t6": .8},
    ("fedavg", 0): {"t1": .6, "t2": .5, "t3": .6, "t4": .6, "t5": .7, "t6": .8},
    ("fedavg", 1): {"t1": .5, "t2": .6, "t3": .6, "t4": .5, "t5": .8, "t6": .7},
}
NEW = {  # new users' (score, as is); n3 fails in local_only's seed 1
    ("local_only", 0): {"n1": (.4, None), "n2": (.6, None), "n3": (.8, None)},
    ("local_only", 1): {"n1": (.5, None), "n2": (.6, None), "n3": (.8, None)},
    ("fedavg", 0): {"n1": (.7, .5), "n2": (.6, .6), "n3": (.9, .7)},
    ("fedavg", 1): {"n1": (.6, .5), "n2": (.8, .6), "n3": (.9, .8)},
}
WITH_NEW = {key: {"trained": {u: {1: (.5, s), 2: (.5, s + .1)} for u, s in ROUND1[key].items()},
                  "n_train": TRAINED_N | NEW_N, "new": NEW[key],
                  "failed": {"n3": "out of memory"} if key == ("local_only", 1) else {}} for key in ROUND1}


def test_new_users_and_activity_bins_against_a_plain_computation(tmp_path):
    """Before: new users and activity levels were not in the comparison at all."""
    from fedpeft.study.compare import compare

    out = compare(["local_only", "fedavg"], "local_only", hand_config([0, 1]), tmp_path / "cmp", runner=fake_runner(WITH_NEW))
    table = {r["strategy"]: r for r in _rows(out / "comparison.csv")}
    common = ["n1", "n2"]  # n3 failed in one run
    new_mean = {name: [sum(NEW[(name, s)][u][0] for u in common) / 2 for s in (0, 1)] for name in ("local_only", "fedavg")}
    assert new_mean == {"local_only": pytest.approx([.5, .55]), "fedavg": pytest.approx([.65, .7])}
    for name, per_seed in new_mean.items():
        row = table[name]
        half = T_975[1] * abs(per_seed[0] - per_seed[1]) / 2
        assert (float(row["new_accuracy"]), float(row["new_accuracy_ci95_low"]), float(row["new_accuracy_ci95_high"])) \
            == pytest.approx((sum(per_seed) / 2, sum(per_seed) / 2 - half, sum(per_seed) / 2 + half))
        assert (row["new_users_common"], row["new_users_all"]) == ("2", "3")
    assert table["local_only"]["new_lost_why"] == "1 (n3 failed in seed 1: out of memory)"
    assert table["fedavg"]["new_lost_why"] == "0"
    # fedavg's new users against local_only's: n1 (.3 + .1) / 2, n2 (0 + .2) / 2
    fed = table["fedavg"]
    assert float(fed["new_gain_vs_local_only"]) == pytest.approx(0.15)
    assert (fed["new_wins"], fed["new_ties"], fed["new_losses"]) == ("2", "0", "0")
    # as is (before the fine-tune) against local_only's new users: n1 (.1 + 0) / 2, n2 0
    assert float(fed["new_as_is_accuracy"]) == pytest.approx(0.55)
    assert float(fed["new_as_is_gain_vs_local_only"]) == pytest.approx(0.025)
    assert (fed["new_as_is_wins"], fed["new_as_is_ties"], fed["new_as_is_losses"]) == ("1", "1", "0")
    assert table["local_only"]["new_as_is_accuracy"] == ""  # nothing "as is" for a strategy without it
    # the trained users' columns are as before: all six, at round 1 (best_val)
    assert float(table["fedavg"]["accuracy_best_val"]) == pytest.approx(
        sum(sum(ROUND1[("fedavg", s)].values()) / 6 for s in (0, 1)) / 2)

    bins = {"trained": {"low": ["t1", "t2"], "mid": ["t3", "t4"], "high": ["t5", "t6"]},
            "new": {"bin1": ["n1"], "bin2": ["n2"]}}  # new users: two values of n_train over the common ones

    def score(group, name, u):
        return sum(ROUND1[(name, s)][u] if group == "trained" else NEW[(name, s)][u][0] for s in (0, 1)) / 2

    activity = _rows(out / "by_activity.csv")
    assert [(r["group"], r["strategy"], r["bin"]) for r in activity] == [
        (g, name, b) for g in ("trained", "new") for b in bins[g] for name in ("local_only", "fedavg")]
    for r in activity:
        users = bins[r["group"]][r["bin"]]
        n_train = [(TRAINED_N | NEW_N)[u] for u in users]
        assert (int(r["users"]), int(r["min_examples"]), int(r["max_examples"])) == (len(users), min(n_train), max(n_train))
        expected = sum(score(r["group"], r["strategy"], u) for u in users) / len(users)
        baseline = sum(score(r["group"], "local_only", u) for u in users) / len(users)
        assert float(r["accuracy"]) == pytest.approx(expected), r
        assert float(r["gain_vs_local_only"]) == pytest.approx(expected - baseline), r

    report = (out / "comparison.md").read_text()
    assert "## New users" in report and "New users (data.new_users): 2 of 3" in report
    assert "| fedavg, as is | 0.550 [0.550, 0.550] | – | +0.025" in report
    assert "n3 (local_only: failed in seed 1: out of memory)" in report
    assert "## By activity" in report and "| trained | low | 2 | 2–2 | fedavg |" in report
    new_per_user = {r["user_id"]: r for r in _rows(out / "per_user_new.csv")}
    assert float(new_per_user["n2"]["fedavg"]) == pytest.approx(0.7)
    assert float(new_per_user["n2"]["fedavg as is"]) == pytest.approx(0.6)
    assert float(new_per_user["n3"]["local_only"]) == pytest.approx(0.8)  # the one seed that scored it
    assert set(_rows(out / "per_user.csv")[0]) == {"user_id", "local_only", "fedavg"}  # trained users only
    width, height = png_size(out / "activity.png")
    assert width > 300 and height > 300
