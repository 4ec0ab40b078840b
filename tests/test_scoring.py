"""Per-user metrics of every task kind, against hand-computed values."""

from __future__ import annotations

import math

import pytest

from fedpeft.scoring import lamp_macro_f1, lamp_rating, peft_u_parse, reduce_prediction, score

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
