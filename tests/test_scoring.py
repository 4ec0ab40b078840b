"""Per-user and corpus-level metrics of every task kind, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from fedpeft.data import TaskSpec
from fedpeft.scoring import (
    corpus_scores,
    lamp_macro_f1,
    lamp_rating,
    peft_u_parse,
    reduce_prediction,
    score,
)

STUDEMO = ("anger", "anticipation", "arousal", "disgust", "fear", "joy", "sadness", "surprise", "trust", "valence")


def test_classification_accuracy_and_macro_f1():
    out = score("classification", [" a ", "b", "a", "c"], [("a",), ("a",), ["a"], "c"])
    # a: tp 2, fn 1 -> F1 0.8; b: fp 1 -> 0; c: tp 1 -> 1  => macro 0.6
    assert out == pytest.approx({"accuracy": 0.75, "macro_f1": 0.6})


def test_classification_gold_set_rule():
    # PEFT-U: a prediction is correct when it is one of the gold labels
    assert score("classification", ["x", "y"], [("x", "z"), ("z",)])["accuracy"] == 0.5


def test_multilabel_any_overlap_and_peft_u_pairs():
    preds = [["joy", "fear"], "sadness, joy", ["anger"], [], ["bogus", "trust"]]
    golds = [("fear",), ("joy",), ("joy", "trust"), ("joy",), ("trust",)]
    out = score("multilabel", preds, golds, labels=STUDEMO)
    # reduced (pred, truth): (fear, fear) (joy, joy) (anger, joy) ('', joy) (trust, trust)
    # F1: fear 1, joy 2/(2+2)=0.5, anger 0, '' 0, trust 1 -> 2.5 / 5
    assert out == pytest.approx({"accuracy": 0.6, "macro_f1": 0.5})


def test_reduce_prediction_follows_get_pred_id():
    assert reduce_prediction(["a", "b"], ["b", "c"]) == ("b", "b")           # first predicted label that is gold
    assert reduce_prediction(["a", "d"], ["b", "c"]) == ("a", "b")           # wrong: first prediction vs first gold
    assert reduce_prediction(["zz", "d"], ["b"], labels=["b", "d"]) == ("d", "b")  # labels outside the list dropped
    assert reduce_prediction(["zz"], ["b"], labels=["b", "d"]) == ("", "b")


def test_peft_u_lenient_parse():
    assert peft_u_parse("Hateful.", ["Hateful", "Non-hateful"]) == ["Hateful"]
    assert peft_u_parse("ateful", ["Hateful", "Non-hateful"]) == ["Hateful"]      # substring -> first label holding it
    assert peft_u_parse("joy, surprised.", STUDEMO) == ["joy", "surprise"]        # suffixes '.', 'ed' removed
    assert peft_u_parse("joy, , rage", STUDEMO) == ["joy", "rage"]               # empty piece dropped, unknown kept


def test_rating_mae_rmse_with_lamp_unparsable_rule():
    preds = ["4", "abc", " 2 ", "nan", "x"]
    golds = ["4", "3", "1", "5", "1"]
    # errors: 0; 'abc' vs 3 -> 5 (|1-3| > |5-3| is false) -> 2; 1; 'nan' vs 5 -> 1 -> 4; 'x' vs 1 -> 5 -> 4
    out = score("rating", preds, golds)
    assert out["mae"] == pytest.approx(11 / 5)
    assert out["rmse"] == pytest.approx(math.sqrt(37 / 5))
    assert lamp_rating("oops", "2") == 5.0 and lamp_rating("oops", "4") == 1.0 and lamp_rating("6", "4") == 6.0


def test_generation_rouge_f_measure():
    preds = ["The cat sat", "dog barks", "a b c"]
    golds = [("the cat sat on the mat",), "cat", ("x y", "a b c d")]
    out = score("generation", preds, golds)
    # 1: P 3/3, R 3/6 -> 2/3 (LCS 3 too); 2: 0; 3: best gold 'a b c d': P 1, R 3/4 -> 6/7
    expected = (2 / 3 + 0 + 6 / 7) / 3
    assert out == pytest.approx({"rouge1": expected, "rougeL": expected})
    swapped = score("generation", ["cat the"], ["the cat"])
    assert swapped == pytest.approx({"rouge1": 1.0, "rougeL": 0.5})  # LCS 1 of 2


def test_lamp_corpus_macro_f1_over_full_label_list():
    preds, golds = ["a", "zzz", "b", "a"], ["a", "b", "b", "c"]
    # a: tp 1 fp 1 -> 2/3; b: tp 1 fn 1 -> 2/3; c: 0  (zzz -> -1, not a label)
    assert lamp_macro_f1(preds, golds, ["a", "b", "c"]) == pytest.approx(4 / 9)
    assert lamp_macro_f1(["a"], ["a"], ["a", "b", "c", "d"]) == pytest.approx(0.25)  # absent labels count as 0
    assert score("classification", preds, golds)["macro_f1"] == pytest.approx(1 / 3)  # per-user: present labels only


def test_errors():
    with pytest.raises(ValueError, match="unknown task kind"):
        score("ranking", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 predictions for 1 golds"):
        score("classification", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="zero examples"):
        score("generation", [], [])


# ----------------------------------------------------------------------------- corpus-level (LaMP)


def _per_user_mean(kind: str, users: list[tuple[list[str], list[str]]], metric: str) -> float:
    return sum(score(kind, p, g)[metric] for p, g in users) / len(users)


def _pool(users: list[tuple[list[str], list[str]]]) -> tuple[list[str], list[list[str]]]:
    return [p for preds, _ in users for p in preds], [[g] for _, golds in users for g in golds]


def test_corpus_rating_pools_errors_over_all_questions():
    task = TaskSpec("rating", ("1", "2", "3", "4", "5"), ("mae", "rmse"), corpus_metrics=True)
    users = [(["5", "1"], ["1", "1"]), (["3"], ["3"]), (["x"], ["4"])]
    # errors 4, 0 | 0 | 'x' vs 4 -> 1 (|1-4| > |5-4|) -> 3
    out = corpus_scores(task, *_pool(users))
    assert list(out) == ["mae", "rmse"]
    assert out["mae"] == pytest.approx(7 / 4) and out["rmse"] == pytest.approx(math.sqrt(25 / 4))
    # per-user RMSEs sqrt(8), 0, 3: their mean is not the corpus RMSE
    assert _per_user_mean("rating", users, "rmse") == pytest.approx((math.sqrt(8) + 3) / 3)
    one_each = [(["5"], ["1"]), (["3"], ["3"]), (["2"], ["4"])]  # the user split: one question per user
    assert corpus_scores(task, *_pool(one_each))["rmse"] == pytest.approx(math.sqrt(20 / 3))
    assert _per_user_mean("rating", one_each, "rmse") == pytest.approx(2.0) == corpus_scores(task, *_pool(one_each))["mae"]


def test_corpus_classification_f1_over_the_full_label_list():
    task = TaskSpec("classification", ("a", "b", "c", "d"), ("accuracy", "macro_f1"), corpus_metrics=True)
    users = [(["a", " b"], ["a", "a"]), (["c"], ["c"]), (["zzz"], ["b"])]
    # pooled: a tp1 fn1 -> 2/3; b fp1 fn1 -> 0; c tp1 -> 1; d never predicted nor gold -> 0
    out = corpus_scores(task, *_pool(users))
    assert out == pytest.approx({"accuracy": 0.5, "macro_f1": (2 / 3 + 1) / 4})
    assert _per_user_mean("classification", users, "macro_f1") == pytest.approx((1 / 3 + 1 + 0) / 3)


def test_corpus_generation_averages_over_questions_not_users():
    task = TaskSpec("generation", (), ("rouge1", "rougeL"), corpus_metrics=True)
    users = [(["a b", "x"], ["a b", "y"]), (["c d"], ["c d"])]
    assert corpus_scores(task, *_pool(users)) == pytest.approx({"rouge1": 2 / 3, "rougeL": 2 / 3})
    assert _per_user_mean("generation", users, "rouge1") == pytest.approx(0.75)


def test_corpus_scores_errors():
    task = TaskSpec("rating", ("1", "2"), ("mae", "rmse"))
    with pytest.raises(ValueError, match="2 predictions for 1 golds.*one gold list per prediction"):
        corpus_scores(task, ["1", "2"], [["1"]])
    with pytest.raises(ValueError, match="zero questions"):
        corpus_scores(task, [], [])
    with pytest.raises(ValueError, match=r"\['accuracy'\] have no corpus-level form.*'mae', 'rmse'"):
        corpus_scores(TaskSpec("rating", ("1",), ("mae", "accuracy")), ["1"], [["1"]])


def test_only_lamp_headlines_are_corpus_level():
    from fedpeft.config import Config
    from fedpeft.data import get_benchmark

    assert TaskSpec("classification", ("a",)).corpus_metrics is False
    assert get_benchmark(Config()).task().corpus_metrics is False  # the synthetic benchmark
