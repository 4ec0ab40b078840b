"""Activity bins (users by number of training examples) on hand-made users, bins written by hand."""

from __future__ import annotations

import math

import pytest

from fedpeft.data.activity import ActivityBin, activity_bins, by_activity


def ranges(bins: list[ActivityBin]) -> list[tuple[str, int, int, list[str]]]:
    return [(b.name, b.low, b.high, b.users) for b in bins]


def test_nine_users_one_to_nine_are_three_terciles():
    n_train = {f"u{i}": i for i in range(1, 10)}
    assert ranges(activity_bins(n_train)) == [("low", 1, 3, ["u1", "u2", "u3"]), ("mid", 4, 6, ["u4", "u5", "u6"]),
                                              ("high", 7, 9, ["u7", "u8", "u9"])]


def test_users_with_the_same_count_never_straddle_a_cut():
    # sorted: 1 2 3 3 3 6 7 8 9; the first cut (after 3 users) falls inside the 3s: the nearest change
    # is after 2 users (distance 1; after 5 is distance 2); the second cut (after 6) is a change already
    n_train = {"a": 3, "b": 1, "c": 3, "d": 2, "e": 3, "f": 6, "g": 7, "h": 8, "i": 9}
    assert ranges(activity_bins(n_train)) == [("low", 1, 2, ["b", "d"]), ("mid", 3, 6, ["a", "c", "e", "f"]),
                                              ("high", 7, 9, ["g", "h", "i"])]
    # equally near changes go to the lower one: 1 1 2 2 3 3 4 4 4, the first cut (after 3 users) is 1 from
    # the changes after 2 and after 4: after 2; the second (after 6) is a change already
    n_train = {f"u{i}": v for i, v in enumerate([1, 1, 2, 2, 3, 3, 4, 4, 4])}
    assert [(b.name, b.low, b.high, len(b.users)) for b in activity_bins(n_train)] == [
        ("low", 1, 1, 2), ("mid", 2, 3, 4), ("high", 4, 4, 3)]


def test_all_equal_is_one_bin_and_two_values_are_two_bins():
    assert ranges(activity_bins({"a": 4, "b": 4, "c": 4})) == [("bin1", 4, 4, ["a", "b", "c"])]
    assert ranges(activity_bins({"a": 5, "b": 9, "c": 5, "d": 9, "e": 9, "f": 5})) == [
        ("bin1", 5, 5, ["a", "c", "f"]), ("bin2", 9, 9, ["b", "d", "e"])]
    assert ranges(activity_bins({"a": 5, "b": 9, "c": 9, "d": 9, "e": 9, "f": 9})) == [
        ("bin1", 5, 5, ["a"]), ("bin2", 9, 9, ["b", "c", "d", "e", "f"])]
    assert activity_bins({}) == []


def test_other_numbers_of_bins_and_bad_input():
    n_train = {f"u{i}": i for i in range(1, 9)}  # 8 users, quartiles: cut after 2, 4, 6
    assert [(b.name, b.low, b.high) for b in activity_bins(n_train, bins=4)] == [
        ("bin1", 1, 2), ("bin2", 3, 4), ("bin3", 5, 6), ("bin4", 7, 8)]
    assert [(b.name, b.low, b.high) for b in activity_bins(n_train, bins=1)] == [("bin1", 1, 8)]
    with pytest.raises(ValueError, match="bins=0.*whole number >= 1"):
        activity_bins(n_train, bins=0)


def test_by_activity_means_per_bin_over_the_scored_users_with_a_count():
    n_train = {f"u{i}": i for i in range(1, 10)} | {"x": 100}  # x has a count but no score: not binned
    scores = {f"u{i}": {"accuracy": i / 10, "macro_f1": 1 - i / 10} for i in range(1, 10)}
    scores["nobody"] = {"accuracy": 1.0}  # no n_train: not binned
    rows = by_activity(scores, n_train, ["accuracy", "macro_f1"])
    assert [r["bin"] for r in rows] == ["low", "mid", "high"]
    assert [(r["users"], r["min_examples"], r["max_examples"], r["mean_examples"]) for r in rows] == [
        (3, 1, 3, 2.0), (3, 4, 6, 5.0), (3, 7, 9, 8.0)]
    assert [r["accuracy"] for r in rows] == pytest.approx([0.2, 0.5, 0.8])
    assert [r["macro_f1"] for r in rows] == pytest.approx([0.8, 0.5, 0.2])
    missing = by_activity({"a": {"accuracy": 0.5}}, {"a": 3}, ["accuracy", "mae"])
    assert missing[0]["accuracy"] == 0.5 and math.isnan(missing[0]["mae"])
