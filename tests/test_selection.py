"""Choosing the round on validation, never on test (fedpeft.federation.selection), on hand-made score
sequences, then through a run driven in process (FederatedRun, the real ClientApp)."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

from fedpeft.federation.selection import (
    NO_PANEL,
    NO_VAL,
    NOT_SCORED,
    select_rounds,
    selected_rows,
    selected_validation,
)
from tests.inprocess_grid import run_in_process
from tests.test_run_outputs import tiny_config

# validation accuracy of three users over rounds 1..5; "c" has no validation examples (NaN)
VAL = {
    "a": {1: 0.50, 2: 0.75, 3: 0.75, 4: 0.60, 5: 0.55},  # best at 2 and 3: the earliest, 2
    "b": {1: 0.40, 2: 0.45, 3: 0.50, 4: 0.70, 5: 0.65},  # best at 4
    "c": {1: math.nan, 2: math.nan, 3: math.nan, 4: math.nan, 5: math.nan},
}
# the panel for best_val is a and b (c has no scores): means 0.45, 0.60, 0.625, 0.65, 0.60 -> round 4


def rows_of(val: dict[str, dict[int, float]], test: dict[str, dict[int, float]]) -> list[dict]:
    """rounds_per_user.jsonl rows for the given validation and test accuracies."""
    return [{"round": r, "user_id": u, "partition_id": i, "n_val": 0 if math.isnan(v) else 8, "n_test": 10,
             "val": {} if math.isnan(v) else {"accuracy": v}, "test": {"accuracy": test[u][r]}}
            for i, u in enumerate(sorted(val)) for r, v in sorted(val[u].items())]


def test_each_rule_picks_the_documented_round():
    assert select_rounds(VAL, "final", False, 5).rounds == {"a": 5, "b": 5, "c": 5}
    per_user = select_rounds(VAL, "best_val_per_user", False, 5)
    assert per_user.rounds == {"a": 2, "b": 4, "c": 5}  # ties -> earliest; no validation -> final
    assert per_user.fallback == {"c": NO_VAL}
    best = select_rounds(VAL, "best_val", False, 5)
    assert best.round == 4 and best.rounds == {"a": 4, "b": 4, "c": 4} and best.fallback == {}


def test_lower_is_better_metrics_pick_the_smallest_validation_score():
    mae = {"a": {1: 1.0, 2: 0.5, 3: 0.5, 4: 0.9}, "b": {1: 0.8, 2: 0.9, 3: 0.3, 4: 0.2}}
    assert select_rounds(mae, "best_val_per_user", True, 4).rounds == {"a": 2, "b": 4}
    assert select_rounds(mae, "best_val", True, 4).round == 3  # means 0.9, 0.7, 0.4, 0.55
    assert select_rounds(mae, "best_val_per_user", False, 4).rounds == {"a": 1, "b": 2}  # the other direction


def test_best_val_ties_go_to_the_earliest_round_and_are_exact():
    # the same values in another order of users: fsum makes the two means exactly equal
    val = {"a": {1: 0.1, 2: 0.7}, "b": {1: 0.2, 2: 0.2}, "c": {1: 0.7, 2: 0.1}}
    assert select_rounds(val, "best_val", False, 2).round == 1


def test_best_val_uses_the_panel_scored_every_round_and_users_outside_report_the_final_round():
    # "s" is outside the intermediate sample (scored at the last round only); "f" failed round 2's evaluation
    val = {"a": {1: 0.2, 2: 0.9, 3: 0.5}, "b": {1: 0.4, 2: 0.8, 3: 0.6}, "s": {3: 1.0}, "f": {1: 1.0, 3: 0.0}}
    best = select_rounds(val, "best_val", False, 3)
    assert best.round == 2  # panel a, b: means 0.3, 0.85, 0.55 (s and f would have pulled it to round 3 or 1)
    assert best.rounds == {"a": 2, "b": 2, "s": 3, "f": 3}
    assert best.fallback == {"s": NOT_SCORED, "f": NOT_SCORED}
    assert select_rounds(val, "best_val_per_user", False, 3).rounds == {"a": 2, "b": 2, "s": 3, "f": 1}


def test_without_any_validation_scores_every_rule_reports_the_final_round():
    val = {"a": {1: math.nan, 2: math.nan}, "b": {1: math.nan, 2: math.nan}}
    for rule in ("best_val", "best_val_per_user"):
        selection = select_rounds(val, rule, False, 2)
        assert selection.rounds == {"a": 2, "b": 2} and set(selection.fallback) == {"a", "b"}
    assert select_rounds(val, "best_val", False, 2).fallback["a"] == NO_PANEL


def test_unknown_rule_is_refused_with_the_allowed_ones():
    with pytest.raises(ValueError, match="best_val_per_user"):
        select_rounds(VAL, "best_test", False, 5)


@pytest.mark.parametrize("rule", ["final", "best_val", "best_val_per_user"])
def test_no_test_score_influences_the_choice(rule):
    """Test scores are only looked up: scrambled, reversed or made to favour another round, the
    chosen rounds stay; the reported scores are the test scores of those rounds."""
    rng = random.Random(0)
    tests = [{u: {r: rng.random() for r in VAL[u]} for u in VAL} for _ in range(20)]
    tests.append({u: {r: float(r == 1) for r in VAL[u]} for u in VAL})  # test says: round 1 for everyone
    tests.append({u: {r: float(r) for r in VAL[u]} for u in VAL})  # test says: the last round
    expected = select_rounds(VAL, rule, False, 5).rounds
    for test in tests:
        chosen, selection = selected_rows(rows_of(VAL, test), rule, "accuracy", False, 5)
        assert selection.rounds == expected
        assert {u: row["test"]["accuracy"] for u, row in chosen.items()} == {u: test[u][expected[u]] for u in VAL}
    if rule != "final":  # while the validation scores do decide
        moved = {**VAL, "a": {**VAL["a"], 5: 0.99}, "b": {**VAL["b"], 5: 0.99}}
        assert selected_rows(rows_of(moved, tests[0]), rule, "accuracy", False, 5)[1].rounds["a"] == 5


def two_metric_rows(val: dict[str, dict[int, float]]) -> list[dict]:
    """Rows with validation accuracy ``val`` and a second metric, macro_f1 = round / 10 (+ 0.01 for
    "b"), that no rule chooses by; test scores 1 - val (they never count)."""
    return [{"round": r, "user_id": u, "partition_id": i, "n_val": 0 if math.isnan(v) else 8, "n_test": 10,
             "val": {} if math.isnan(v) else {"accuracy": v, "macro_f1": r / 10 + 0.01 * (u == "b")},
             "test": {"accuracy": 1 - v, "macro_f1": 0.0}}
            for i, u in enumerate(sorted(val)) for r, v in sorted(val[u].items())]


@pytest.mark.parametrize("rule, accuracy, macro_f1", [
    ("final", (0.55 + 0.65) / 2, (0.5 + 0.51) / 2),  # a and b at round 5; c has no validation examples
    ("best_val", (0.60 + 0.70) / 2, (0.4 + 0.41) / 2),  # round 4's mean over the panel (a, b): what the rule maximised
    ("best_val_per_user", (0.75 + 0.70) / 2, (0.2 + 0.41) / 2),  # a at 2, b at 4; c (no validation) left out
])
def test_selected_validation_is_the_validation_score_the_rule_chose_by(rule, accuracy, macro_f1):
    got = selected_validation(two_metric_rows(VAL), rule, ["accuracy", "macro_f1"], False, 5)
    assert got == {"selected_val_accuracy": pytest.approx(accuracy), "selected_val_macro_f1": pytest.approx(macro_f1)}


def test_selected_validation_leaves_out_the_users_that_fell_back_and_is_nan_without_validation():
    # s: outside the intermediate sample; f: failed round 2 (see the panel test above)
    val = {"a": {1: 0.2, 2: 0.9, 3: 0.5}, "b": {1: 0.4, 2: 0.8, 3: 0.6}, "s": {3: 1.0}, "f": {1: 1.0, 3: 0.0}}
    rows = two_metric_rows(val)
    assert selected_validation(rows, "best_val", ["accuracy"], False, 3) == {"selected_val_accuracy": pytest.approx(0.85)}
    assert selected_validation(rows, "best_val_per_user", ["accuracy"], False, 3)["selected_val_accuracy"] == \
        pytest.approx((0.9 + 0.8 + 1.0 + 1.0) / 4)
    assert selected_validation(rows, "final", ["accuracy"], False, 3)["selected_val_accuracy"] == \
        pytest.approx((0.5 + 0.6 + 1.0 + 0.0) / 4)
    mae = {"a": {1: 1.0, 2: 0.5, 3: 0.5, 4: 0.9}, "b": {1: 0.8, 2: 0.9, 3: 0.3, 4: 0.2}}
    assert selected_validation(two_metric_rows(mae), "best_val", ["accuracy"], True, 4)["selected_val_accuracy"] == \
        pytest.approx(0.4)  # lower is better: round 3
    none = {"a": {1: math.nan, 2: math.nan}, "b": {1: math.nan, 2: math.nan}}
    for rule in ("final", "best_val", "best_val_per_user"):
        assert math.isnan(selected_validation(two_metric_rows(none), rule, ["accuracy"], False, 2)["selected_val_accuracy"])


# ---- through a run --------------------------------------------------------------------------

def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def learning_config(tiny_bert: Path, tmp_path: Path, name: str, rule: str):
    """local_only on the tiny model with a learning rate that moves the scores from round to round."""
    cfg = tiny_config(tiny_bert, tmp_path, name, "local_only")
    cfg.federation.rounds, cfg.federation.select = 4, rule
    cfg.train.lr, cfg.data.val_per_user = 0.3, 6
    return cfg


def test_a_run_scores_validation_every_round_and_reports_each_user_at_its_chosen_round(tiny_bert, tmp_path):
    """Before: validation was never scored, and every rule reported the final round."""
    results = {}
    for rule in ("final", "best_val", "best_val_per_user"):
        results[rule], run = run_in_process(learning_config(tiny_bert, tmp_path, rule, rule))
        rows = [json.loads(line) for line in (run / "rounds_per_user.jsonl").read_text().splitlines()]
        assert sorted((r["round"], r["user_id"]) for r in rows) == [(k, f"user{u:04d}") for k in range(1, 5) for u in range(4)]
        assert all(r["n_val"] == 6 and set(r["val"]) == set(r["test"]) == {"accuracy", "macro_f1"} for r in rows)
        assert results[rule]["selection"]["rule"] == rule
        per_user = {r["user_id"]: r for r in _csv(run / "per_user.csv")}
        val = {(r["user_id"], r["round"]): r["val"]["accuracy"] for r in rows}
        test = {(r["user_id"], r["round"]): r["test"]["accuracy"] for r in rows}
        users = sorted(per_user)
        if rule == "final":
            picked = {u: 4 for u in users}
            assert "selected_round" not in _csv(run / "per_user.csv")[0]  # today's columns, today's numbers
        elif rule == "best_val_per_user":  # a plain argmax, earliest on ties
            picked = {u: max(range(1, 5), key=lambda k, u=u: (val[(u, k)], -k)) for u in users}
        else:
            means = {k: sum(val[(u, k)] for u in users) / len(users) for k in range(1, 5)}
            best = max(range(1, 5), key=lambda k: (round(means[k], 12), -k))
            picked = {u: best for u in users}
            assert results[rule]["selection"]["round"] == best
        for u in users:
            assert float(per_user[u]["accuracy"]) == test[(u, picked[u])], (rule, u)
            if rule != "final":
                assert int(per_user[u]["selected_round"]) == picked[u]
        assert results[rule]["summary"]["accuracy"] == pytest.approx(sum(test[(u, picked[u])] for u in users) / len(users))
    per_user_rounds = {int(r["selected_round"]) for r in _csv(tmp_path / "best_val_per_user" / "per_user.csv")}
    assert per_user_rounds != {4}, "the fixture should make some user's best validation round an earlier one"


def test_lamp_takes_final_only_and_says_why(tmp_path):
    """LaMP's headline is corpus-level over the final model and its users have no validation split."""
    from fedpeft.config import Config, ConfigError
    from fedpeft.federation.selection import check_selection
    from tests.test_lamp import simple_questions, write_lamp

    cfg = Config()
    cfg.data.benchmark, cfg.data.path = "lamp/LaMP-2", str(write_lamp(tmp_path, 2, simple_questions(2)))
    cfg.data.cache_dir = str(tmp_path / "cache")
    check_selection(cfg)  # final
    cfg.federation.select = "best_val_per_user"
    with pytest.raises(ConfigError, match="no validation split.*Use federation.select=final"):
        check_selection(cfg)
