"""Per-user and corpus-level metrics of every task kind, against hand-computed values."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from fedpeft.data import TaskSpec
from fedpeft.learning.scoring import (
    KIND_METRICS,
    corpus_scores,
    lamp_macro_f1,
    lamp_rating,
    peft_u_parse,
    score,
    top_label,
    valid_labels,
)

STUDEMO = ("anger", "anticipation", "arousal", "disgust", "fear", "joy", "sadness", "surprise", "trust", "valence")


def test_classification_accuracy_and_macro_f1():
    out = score("classification", [" a ", "b", "a", "c"], [("a",), ("a",), ["a"], "c"])
    # a: tp 2, fn 1 -> F1 0.8; b: fp 1 -> 0; c: tp 1 -> 1  => macro 0.6
    assert out == pytest.approx({"accuracy": 0.75, "macro_f1": 0.6})


def test_classification_gold_set_rule():
    # PEFT-U: a prediction is correct when it is one of the gold labels
    assert score("classification", ["x", "y"], [("x", "z"), ("z",)])["accuracy"] == 0.5


def test_multilabel_metrics_by_hand():
    preds = [["joy", "fear"], "sadness, joy", ["anger"], [], ["bogus", "trust", "trust"], ["fear", "joy"]]
    golds = [("fear",), ("joy",), ("joy", "trust"), ("joy",), ("trust",), ("joy", "fear")]
    out = score("multilabel", preds, golds, labels=STUDEMO)
    # valid P (bogus dropped, repeat dropped) | top | top gold? | any | 2|P&G|/(|P|+|G|) | |P&G|/|P|G|
    # 1 {joy, fear}      vs {fear}        joy      no   yes   2/3   1/2
    # 2 {sadness, joy}   vs {joy}         sadness  no   yes   2/3   1/2
    # 3 {anger}          vs {joy, trust}  anger    no   no    0     0
    # 4 {}               vs {joy}         ''       no   no    0     0   (no valid label: wrong, 0)
    # 5 {trust}          vs {trust}       trust    yes  yes   1     1
    # 6 {fear, joy}      vs {joy, fear}   fear     yes  yes   1     1
    # macro-F1 pairs (top, truth = top if gold else first gold):
    # (joy, fear) (sadness, joy) (anger, joy) ('', joy) (trust, trust) (fear, fear)
    # '' 0, anger 0, sadness 0; fear tp 1 fn 1 -> 2/3; joy fp 1 fn 3 -> 0; trust 1  => (2/3 + 1) / 6
    expected = {"accuracy": 2 / 6, "macro_f1": (2 / 3 + 1) / 6, "example_f1": (2 / 3 + 2 / 3 + 1 + 1) / 6,
                "jaccard": (1 / 2 + 1 / 2 + 1 + 1) / 6, "accuracy_any": 4 / 6}
    assert out == pytest.approx(expected)
    assert list(out) == list(KIND_METRICS["multilabel"])


def test_multilabel_metric_list_puts_the_top_label_accuracy_first():
    assert KIND_METRICS["multilabel"] == ("accuracy", "macro_f1", "example_f1", "jaccard", "accuracy_any")


def test_multilabel_without_a_label_list_keeps_every_predicted_label():
    out = score("multilabel", ["bogus, joy"], [("joy",)])
    # top 'bogus' (wrong); P {bogus, joy}: example-F1 2/3, Jaccard 1/2, any overlap
    assert out == pytest.approx({"accuracy": 0.0, "macro_f1": 0.0, "example_f1": 2 / 3, "jaccard": 0.5, "accuracy_any": 1.0})


def test_top_label_is_the_first_valid_predicted_label():
    assert top_label(["a", "b"]) == "a"                                    # order is confidence, not gold
    assert top_label(["zz", "d", "b"], labels=["b", "d"]) == "d"           # labels outside the list dropped
    assert top_label(["zz"], labels=["b", "d"]) == "" and top_label([]) == ""
    assert valid_labels(["d", "zz", "b", "d"], labels=["b", "d"]) == ["d", "b"]  # order kept, repeats dropped
    # a classification prediction given as a list is its top label too, never "any of them"
    assert score("classification", [["b", "a"]], [("a",)], labels=["a", "b"])["accuracy"] == 0.0


# A hand-made multi-label user: its training gold sets rank a (5) > b (3) > c (2) > d (1) > e (0);
# its test gold sets are mostly single labels. (With large gold sets, as studemo's 3.7 of 10, a
# constant top-k does raise example-F1 and Jaccard; the headline and macro-F1 never rise.)
LABELS5 = ("a", "b", "c", "d", "e")
TRAIN_GOLDS = [("a",), ("a", "b"), ("a",), ("a", "c"), ("a",), ("b",), ("b", "c"), ("d",)]
TEST_GOLDS = [("a",), ("a",), ("a", "b"), ("b",), ("c",), ("a",), ("d",), ("a", "c")]


def _constant(prediction: list[str]) -> dict[str, float]:
    return score("multilabel", [prediction] * len(TEST_GOLDS), TEST_GOLDS, labels=LABELS5)


def test_predicting_more_labels_never_beats_the_top_label():
    ranked = [label for label, _ in Counter(x for g in TRAIN_GOLDS for x in g).most_common()]
    assert ranked == ["a", "b", "c", "d"]
    top1 = _constant(ranked[:1])
    assert top1["accuracy"] == pytest.approx(5 / 8)  # top-1 'a': gold in 5 of 8 test examples
    guesses = {"top-2": ranked[:2], "top-3": ranked[:3], "all, by frequency": [*ranked, "e"],
               "all, in label order": list(LABELS5), "all, reversed": list(reversed(LABELS5))}
    for name, guess in guesses.items():
        out = _constant(guess)
        for metric in ("accuracy", "macro_f1", "example_f1", "jaccard"):
            assert out[metric] <= top1[metric] + 1e-12, (name, metric, out[metric], top1[metric])
        assert out["accuracy_any"] >= top1["accuracy_any"], name
    for name in ("top-2", "top-3", "all, by frequency"):  # the same top label: the same headline and macro-F1
        out = _constant(guesses[name])
        assert (out["accuracy"], out["macro_f1"]) == pytest.approx((top1["accuracy"], top1["macro_f1"])), name
    assert top1["accuracy_any"] == pytest.approx(5 / 8)  # one label: the lenient rule is the headline
    everything = _constant(list(LABELS5))
    assert everything["accuracy_any"] == 1.0  # PEFT-U's rule: every label predicted, every example "right"
    assert everything["accuracy"] == pytest.approx(5 / 8)  # top label 'a' again
    assert _constant(list(reversed(LABELS5)))["accuracy"] == 0.0  # top label 'e' is never gold
    # all five labels: example-F1 per example 2|G| / (5 + |G|), Jaccard |G| / 5
    assert everything["example_f1"] == pytest.approx((6 * 2 / 6 + 2 * 4 / 7) / 8)
    assert everything["jaccard"] == pytest.approx((6 * 1 / 5 + 2 * 2 / 5) / 8)


def test_corpus_scores_of_a_multilabel_task_pool_every_example():
    task = TaskSpec("multilabel", LABELS5, KIND_METRICS["multilabel"])
    users = [([["a", "b"], ["c"]], [("b",), ("c", "d")]), ([["e", "a"]], [("a",)])]
    preds = [p for ps, _ in users for p in ps]
    golds = [g for _, gs in users for g in gs]
    out = corpus_scores(task, preds, golds)
    assert list(out) == list(KIND_METRICS["multilabel"])
    # tops a (wrong), c (right), e (wrong); pairs (a, b) (c, c) (e, a): a 0, b 0, c 1, e 0 -> 1/4
    # P {a,b} vs {b}: F1 2/3, J 1/2; {c} vs {c,d}: 2/3, 1/2; {e,a} vs {a}: 2/3, 1/2
    assert out == pytest.approx({"accuracy": 1 / 3, "macro_f1": 1 / 4, "example_f1": 2 / 3,
                                 "jaccard": 1 / 2, "accuracy_any": 1.0})


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
