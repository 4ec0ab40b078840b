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

from fedpeft.compare_stats import mean_interval, paired_differences, paired_stats
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
    from fedpeft.compare import compare

    config = tiny_config(tiny_bert, tmp_path, "unused", "local_only")
    config.train.lr, config.data.val_per_user = 0.3, 6
    config.compare.seeds = [0, 1]
    out = compare(["local_only", "fedsa"], "local_only", config, tmp_path / "cmp", runner=lambda cfg: run_in_process(cfg)[0])

    table = {r["strategy"]: r for r in _rows(out / "comparison.csv")}
    assert set(table) == {"local_only", "fedsa"}
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
