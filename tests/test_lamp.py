"""LaMP: users, OPPU-style examples, BM25 retrieval from earlier items, cache, errors, download."""

from __future__ import annotations

import functools
import http.server
import json
import re
import socket
import threading
from pathlib import Path

import pytest

from fedpeft.config import Config, ConfigError
from fedpeft.data import lamp, lamp_download, lamp_tasks
from fedpeft.data.__main__ import main as data_main
from fedpeft.data.common import DataFormatError, UserCache
from fedpeft.data.lamp import LampBenchmark

TAGS = "[" + ", ".join(lamp_tasks.LAMP2_TAGS) + "]"
INPUTS = {
    1: lambda t: (f'For an author who has written the paper with the title "{t}", which reference is related? Just answer '
                  f'with [1] or [2] without explanation. [1]: "Reference {t}" [2]: "Unrelated paper"'),
    2: lambda t: ("Which tag does this movie relate to among the following tags? Just answer with the tag name without "
                  f"further explanation. tags: {TAGS} description: {t}"),
    3: lambda t: ("What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 "
                  f"without further explanation. review: {t}"),
    4: lambda t: f"Generate a headline for the following article: {t}",
    5: lambda t: f"Generate a title for the following abstract of a paper: {t}",
    6: lambda t: f"Generate a subject for the following email: {t}",
    7: lambda t: f"Paraphrase the following tweet without any explanation before or after it: {t}",
}
GOLDS = {1: "[1]", 2: "comedy", 3: "4", 4: "Big news today", 5: "A paper title", 6: "Meeting moved", 7: "my tweet"}


def item(task: int, j: int, date: str | None = "2020-01-01", words: str = "") -> dict:
    body = f"common words token{j} {words}".strip()
    fields = {
        1: {"title": f"title{j} {words}", "abstract": body},
        2: {"description": body, "tag": lamp_tasks.LAMP2_TAGS[j % 15]},
        3: {"text": body, "score": str(j % 5 + 1)},
        4: {"title": f"head{j}", "text": body},
        5: {"title": f"paper{j}", "abstract": body},
        6: {"text": body, "title": f"subject{j}"},
        7: {"text": body},
    }[task]
    out = {"id": f"p{j}", **fields}
    if date is not None:
        out["date"] = date
    return out


def write_lamp(tmp_path: Path, task: int, questions: list[dict], golds: dict[str, str] | None = None,
               which: str = "dev", gold_task: str | None = None) -> Path:
    folder = tmp_path / f"lamp{task}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{which}_questions.json").write_text(json.dumps(questions))
    golds = golds if golds is not None else {q["id"]: GOLDS[task] for q in questions}
    (folder / f"{which}_outputs.json").write_text(json.dumps(
        {"task": gold_task or f"LaMP_{task}", "golds": [{"id": k, "output": v} for k, v in golds.items()]}))
    return folder


def config(folder: Path, tmp_path: Path, task: int, **data) -> Config:
    return Config.from_dict({"data": {"benchmark": f"lamp/LaMP-{task}", "path": str(folder),
                                      "cache_dir": str(tmp_path / "cache"), **data}})


def simple_questions(task: int, n_users: int = 2, n_items: int = 4) -> list[dict]:
    return [{"id": f"q{u}", "input": INPUTS[task](f"query text {u} token1"),
             "profile": [item(task, j, f"2020-01-{j + 1:02d}") for j in range(n_items)]} for u in range(n_users)]


# ----------------------------------------------------------------------------- tasks and examples


@pytest.mark.parametrize("task", [1, 2, 3, 4, 5, 6, 7])
def test_each_task_builds_train_and_test_in_task_format(tmp_path, task):
    b = LampBenchmark(config(write_lamp(tmp_path, task, simple_questions(task)), tmp_path, task))
    spec = b.task()
    assert b.user_ids() == ["q0", "q1"] and b.skipped_users() == {}
    assert spec.kind == {1: "classification", 2: "classification", 3: "rating"}.get(task, "generation")
    assert spec.labels == {1: ("[1]", "[2]"), 2: lamp_tasks.LAMP2_TAGS, 3: ("1", "2", "3", "4", "5")}.get(task, ())
    assert spec.metrics == {1: ("accuracy", "macro_f1"), 2: ("accuracy", "macro_f1"), 3: ("mae", "rmse")}.get(task, ("rouge1", "rougeL"))
    assert spec.corpus_metrics is True  # LaMP scores all questions pooled
    u = b.load_user(1)
    assert u.user_id == "q1" and u.val == []
    assert [(e.id, e.labels) for e in u.test] == [("q1", (GOLDS[task],))]
    assert "query text 1 token1" in u.test[0].text
    assert len(u.train) == (2 if task == 1 else 4)
    t0 = u.train[0]
    if task == 1:
        assert t0.labels[0] in ("[1]", "[2]") and t0.text.startswith('For an author who has written the paper with the title "title2')
        assert u.test[0].text == INPUTS[1]("query text 1 token1")  # same format as LaMP's question
    elif task == 7:
        assert (t0.text, t0.labels) == ("tweet:", ("common words token0",))  # OPPU: LM on the user's tweets
        assert u.test[0].text.startswith("Paraphrase the following text into tweet")
    else:
        target = {2: "tag", 3: "score", 4: "title", 5: "title", 6: "title"}[task]
        assert t0.labels == (item(task, 0)[target],) and "common words token0" in t0.text
        assert t0.text == lamp_tasks.TASKS[task].train_template.format(**item(task, 0))
        assert u.test[0].text == lamp_tasks.TASKS[task].test_template.format(**{lamp_tasks.TASKS[task].article_field: "query text 1 token1"})
        assert u.test[0].text.split("query text")[0] == t0.text.split("common words")[0]  # one template for both


def test_lamp2_template_matches_oppu():
    t = lamp_tasks.TASKS[2].train_template.format(description="A film.")
    assert t == ("Which tag does this movie relate to among the following tags? Just answer with the tag name without "
                 "further explanation. tags: [sci-fi, based on a book, comedy, action, twist ending, dystopia, dark comedy, "
                 "classic, psychology, fantasy, romance, thought-provoking, social commentary, violence, true story]\n "
                 "description: A film. tag:")
    assert len(lamp_tasks.LAMP2_TAGS) == 15


def test_history_fields_are_cut_to_768_words(tmp_path):
    q = simple_questions(5, 1, 2)
    q[0]["profile"][0]["abstract"] = " ".join(f"w{i}" for i in range(1000))
    u = LampBenchmark(config(write_lamp(tmp_path, 5, q), tmp_path, 5)).load_user(0)
    assert "w767 " in u.train[0].text and "w768" not in u.train[0].text


def test_lamp1_examples_come_from_earlier_items_deterministically(tmp_path):
    # p3 shares rare words with p1 only: its related reference must be p1; p0..p2 are its only candidates
    items = [item(1, 0, "2001", "apple"), item(1, 1, "2002", "zebra quantum"), item(1, 2, "2003", "banana"),
             item(1, 3, "2004", "zebra quantum"), item(1, 4, "2005", "cherry")]
    qs = [{"id": "q0", "input": INPUTS[1]("t"), "profile": items[::-1]}]  # listed newest first: order comes from dates
    b1 = LampBenchmark(config(write_lamp(tmp_path, 1, qs), tmp_path, 1, seed=5))
    train = b1.load_user(0).train
    assert [e.id for e in train] == ["p2", "p3", "p4"]
    ex = next(e for e in train if e.id == "p3")
    refs = re.findall(r'\[(\d)\]: "([^"]*)"', ex.text)
    related = dict(refs)[ex.labels[0][1]]
    assert related == "title1 zebra quantum"
    assert all(r in {"title0 apple", "title1 zebra quantum", "title2 banana"} for _, r in refs)
    again = LampBenchmark(config(write_lamp(tmp_path / "again", 1, qs), tmp_path / "again", 1, seed=5)).load_user(0).train
    assert again == train
    golds = {LampBenchmark(config(write_lamp(tmp_path / f"s{s}", 1, qs), tmp_path / f"s{s}", 1, seed=s)).load_user(0).train[1].labels
             for s in range(12)}
    assert golds == {("[1]",), ("[2]",)}  # the option order depends on the seed


def test_lamp1_user_with_too_few_items_is_skipped(tmp_path):
    qs = simple_questions(1, 2, 4)
    qs[0]["profile"] = qs[0]["profile"][:2]
    with pytest.warns(UserWarning, match="skipped 1 user"):
        b = LampBenchmark(config(write_lamp(tmp_path, 1, qs), tmp_path, 1))
        assert b.user_ids() == ["q1"]
    assert "LaMP-1 needs 3" in b.skipped_users()["q0"]


def test_user_with_empty_profile_is_skipped_and_listed(tmp_path):
    qs = simple_questions(2, 3)
    qs[1]["profile"] = []
    with pytest.warns(UserWarning, match=r"q1 \(no profile items"):
        b = LampBenchmark(config(write_lamp(tmp_path, 2, qs), tmp_path, 2))
        assert b.user_ids() == ["q0", "q2"]
    assert b.skipped_users() == {"q1": "no profile items: nothing to train on"}


def test_time_split_groups_questions_by_user(tmp_path):
    a = [item(2, j, f"2020-01-{j + 1:02d}") for j in range(4)]
    qs = [
        {"id": "t1", "user_id": "U7", "input": INPUTS[2]("first question"), "profile": a[:2]},
        {"id": "t2", "user_id": "U3", "input": INPUTS[2]("other user"), "profile": a[1:3]},
        {"id": "t3", "user_id": "U7", "input": INPUTS[2]("second question"), "profile": a[1:]},
    ]
    b = LampBenchmark(config(write_lamp(tmp_path, 2, qs), tmp_path, 2, lamp_split="time"))
    assert b.user_ids() == ["U7", "U3"]
    u = b.load_user(0)
    assert [e.id for e in u.train] == ["p0", "p1", "p2", "p3"]          # union of the profiles by id
    assert [e.id for e in u.test] == ["t1", "t3"]
    with pytest.raises(DataFormatError, match=r"question id 't1', field 'user_id'.*lamp_split=user"):
        qs2 = [{k: v for k, v in q.items() if k != "user_id"} for q in qs]
        LampBenchmark(config(write_lamp(tmp_path / "x", 2, qs2), tmp_path / "x", 2, lamp_split="time")).user_ids()


def test_train_questions_are_selected_by_config(tmp_path):
    folder = write_lamp(tmp_path, 3, simple_questions(3, 1), which="dev")
    write_lamp(tmp_path, 3, [dict(q, id="tq" + q["id"]) for q in simple_questions(3, 3)], which="train")
    assert LampBenchmark(config(folder, tmp_path, 3)).user_ids() == ["q0"]
    assert LampBenchmark(config(folder, tmp_path, 3, lamp_questions="train")).user_ids() == ["tqq0", "tqq1", "tqq2"]


# ----------------------------------------------------------------------------- retrieval


def test_training_examples_retrieve_only_earlier_items(tmp_path):
    # every item looks alike; listed in reverse time order, so "earlier" must come from the dates
    items = [item(2, j, f"2021-03-{10 - j:02d}", "shared movie plot") for j in range(6)]  # p5 oldest ... p0 newest
    qs = [{"id": "q0", "input": INPUTS[2]("shared movie plot token2"), "profile": items}]
    u = LampBenchmark(config(write_lamp(tmp_path, 2, qs), tmp_path, 2, retrieval_k=3)).load_user(0)
    chrono = [f"p{j}" for j in range(5, -1, -1)]
    assert [e.id for e in u.train] == chrono
    for pos, ex in enumerate(u.train):
        assert ex.text.startswith("Which tag does")              # the input alone; history apart
        seen = set(re.findall(r"token(\d)", "".join(ex.history)))
        earlier = {c[1:] for c in chrono[:pos]}
        assert seen <= earlier, (ex.id, seen, earlier)           # never itself or a later item
        assert len(seen) == len(ex.history) == min(3, pos)       # and it does retrieve when it may
        assert all(h.startswith("description: ") and h.endswith("\n") for h in ex.history)
    # the test question retrieves from the whole profile, best match first
    assert u.test[0].text.startswith("Which tag does")
    assert u.test[0].history[0].startswith("description: common words token2 ")


def test_undated_items_use_list_order(tmp_path):
    items = [item(4, j, None) for j in range(3)]
    items[1]["date"] = "2020-01-01"  # one date is not enough: list order
    qs = [{"id": "q0", "input": INPUTS[4]("common words"), "profile": [items[2], items[0], items[1]]}]
    u = LampBenchmark(config(write_lamp(tmp_path, 4, qs), tmp_path, 4, retrieval_k=5)).load_user(0)
    assert [e.id for e in u.train] == ["p2", "p0", "p1"]
    assert set(re.findall(r"token(\d)", "".join(u.train[1].history))) == {"2"}


def test_retrieval_off_and_lamp7_training_without_retrieval(tmp_path):
    u = LampBenchmark(config(write_lamp(tmp_path, 4, simple_questions(4, 1)), tmp_path, 4)).load_user(0)
    assert all(e.text.startswith("Generate a headline") and e.history == () for e in u.train + u.test)
    u7 = LampBenchmark(config(write_lamp(tmp_path, 7, simple_questions(7, 1)), tmp_path, 7, retrieval_k=2)).load_user(0)
    assert all(e.text == "tweet:" and e.history == () for e in u7.train)
    assert u7.test[0].text.startswith("Paraphrase the following text into tweet")
    assert [h.startswith("tweet: common words") for h in u7.test[0].history] == [True, True]


def test_prefix_bm25_equals_a_fresh_bm25okapi_on_each_prefix():
    import random

    import numpy as np
    from rank_bm25 import BM25Okapi

    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(40)]
    docs = [rng.choices(vocab, k=rng.randint(0, 10)) for _ in range(50)]
    docs[0] = []  # a leading empty document: no model until some token is seen
    index = lamp.PrefixBM25(docs)
    assert index.model(1) is None
    for p in range(2, 51):
        model, fresh = index.model(p), BM25Okapi(docs[:p])
        query = rng.choices(vocab + ["unseen"], k=6)
        assert model.idf == fresh.idf and np.array_equal(model.get_scores(query), fresh.get_scores(query))
        assert model.get_top_n(query, list(range(p)), n=3) == fresh.get_top_n(query, list(range(p)), n=3)
    assert index.model(10).idf == BM25Okapi(docs[:10]).idf  # going back rebuilds


def test_bm25_top_is_rank_bm25():
    docs = ["red apple pie", "green pear", "apple apple tart", "blue sky"]
    assert lamp.bm25_top("pear", docs, 1) == ["green pear"]
    assert set(lamp.bm25_top("pear sky", docs, 2)) == {"green pear", "blue sky"}
    assert lamp.bm25_top("apple", [], 2) == [] and lamp.bm25_top("apple", docs, 0) == []


# ----------------------------------------------------------------------------- what the model reads


def test_fit_prompt_cuts_history_first_and_never_the_question():
    from fedpeft.data.retrieval import fit_prompt, middle_cut

    def count(text: str) -> int:  # one token per whitespace word
        return len(text.split())

    q = "q1 q2 q3 q4"
    items = ["a1 a2 a3\n", "b1 b2 b3 b4 b5 b6 b7 b8 b9 b10\n", "c1\n"]
    assert fit_prompt(q, items, count, 100) == "a1 a2 a3\nb1 b2 b3 b4 b5 b6 b7 b8 b9 b10\nc1\n\nq1 q2 q3 q4"
    # 4 question words + 3 of a leave 5 for b: 4 of its words and the elision mark; c dropped
    assert fit_prompt(q, items, count, 12) == "a1 a2 a3\nb1 b2 ... b9 b10\n\nq1 q2 q3 q4"
    assert fit_prompt(q, items, count, 9) == "a1 a2 a3\nb1 ...\n\nq1 q2 q3 q4"
    assert fit_prompt(q, items, count, 8) == "a1 a2 a3\n\nq1 q2 q3 q4"          # no word of b fits
    assert fit_prompt(q, items, count, 4) == "q1 q2 q3 q4"                        # no history at all
    # the question alone over the budget: no history; its start and end are kept
    assert fit_prompt(q, items, count, 3) == "q1 ... q4"
    assert fit_prompt("q1 q2 q3 q4 q5 q6", [], count, 5) == "q1 q2 ... q5 q6"
    assert fit_prompt(q, items, count, 1) == q  # not even one word fits: left to the tokenizer's cap
    assert middle_cut("description: w1 w2 w3 w4 w5 tag: comedy\n", 5) == "description: w1 w2 ... tag: comedy\n"
    assert middle_cut("Say it.\n article: a b c d e f headline:", 6) == "Say it.\n article: ... e f headline:"  # kept as they were


LONG_TEXT = " ".join(f"long{i}" for i in range(400))


def _long_history_user(tmp_path: Path, backbone: Path) -> tuple[Config, object]:
    """LaMP-3 user whose oldest item (p0) is far longer than data.max_length=64 tokens; the
    question names words of p0 only, so BM25 retrieves p0 for it; so does p1 (p0 is all it has)."""
    items = [item(3, 0, "2020-01-01", LONG_TEXT), item(3, 1, "2020-01-02"), item(3, 2, "2020-01-03")]
    qs = [{"id": "q0", "input": INPUTS[3]("long5 long6 a great blender"), "profile": items}]
    cfg = config(write_lamp(tmp_path, 3, qs), tmp_path, 3, retrieval_k=1, max_length=64)
    cfg.model.name, cfg.model.max_new_tokens, cfg.train.eval_batch_size = str(backbone), 3, 1
    return cfg, LampBenchmark(cfg).load_user(0)


def _first_input_ids(loaded, run) -> list[int]:
    """Token ids the input embedding receives first while ``run()`` runs: the encoder's input
    (seq2seq), the whole prompt (a generation's first step), the batch (training)."""
    seen: list[list[int]] = []

    def record(module, args):
        if not seen:
            seen.append(args[0][0].tolist())

    base = loaded.model.get_base_model()
    embedding = base.get_encoder().get_input_embeddings() if loaded.kind == "seq2seq" else base.get_input_embeddings()
    handle = embedding.register_forward_pre_hook(record)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def _contains(ids: list[int], part: list[int]) -> bool:
    return any(ids[i : i + len(part)] == part for i in range(len(ids) - len(part) + 1))


@pytest.mark.parametrize("backbone", ["tiny_bert", "tiny_t5", "tiny_gpt2"])
def test_long_history_never_pushes_the_question_out_and_training_reads_what_prediction_reads(backbone, request, tmp_path):
    from fedpeft.learning.models import build_model
    from fedpeft.learning.training import encoder_loss, predict, text_to_text_loss

    cfg, user = _long_history_user(tmp_path, request.getfixturevalue(backbone))
    task = LampBenchmark(cfg).task()
    loaded = build_model(cfg, len(task.labels))
    tok = loaded.tokenizer
    loss = encoder_loss if loaded.kind == "encoder" else text_to_text_loss
    spec = lamp_tasks.TASKS[3]
    cases = {  # the example and its question, rebuilt from the fixture
        "training example p1": (user.train[1], spec.train_template.format(**item(3, 1, "2020-01-02"))),
        "test question": (user.test[0], spec.test_template.format(text="long5 long6 a great blender")),
    }
    for name, (ex, question) in cases.items():
        assert "long0 long1 long2" in ex.text + "".join(getattr(ex, "history", ())), name  # p0 retrieved
        trained = _first_input_ids(loaded, lambda ex=ex: loss(loaded, [ex], task, cfg))
        predicted = _first_input_ids(loaded, lambda ex=ex: predict(loaded, [ex], task, cfg))
        q_ids = tok(question, add_special_tokens=False)["input_ids"]
        assert _contains(predicted, q_ids), (name, "prediction lost question tokens", tok.decode(predicted))
        assert _contains(trained, q_ids), (name, "training lost question tokens", tok.decode(trained))
        if loaded.kind == "causal":  # training reads the prompt, then the answer
            assert trained[: len(predicted)] == predicted, name
            assert tok.decode(trained[len(predicted):], skip_special_tokens=True).strip() == ex.labels[0]
        else:
            assert trained == predicted, name
        assert len(predicted) <= 64
        # the long item was cut to fit, not dropped: its start and its target field are there
        assert _contains(predicted, tok("review: common words token0", add_special_tokens=False)["input_ids"]), name
        assert _contains(predicted, tok("score: 1", add_special_tokens=False)["input_ids"]), name


# ----------------------------------------------------------------------------- malformed input


def _qs(task=2):
    return simple_questions(task, 2)


@pytest.mark.parametrize("mutate, where, parts", [
    (lambda q: q[1].pop("input"), "questions", ["question id 'q1'", "field 'input'", "<missing"]),
    (lambda q: q[0].pop("profile"), "questions", ["question id 'q0'", "field 'profile'"]),
    (lambda q: q[1]["profile"][2].pop("tag"), "questions", ["question id 'q1', profile item id 'p2'", "field 'tag'", "<missing"]),
    (lambda q: q[0]["profile"][0].pop("id"), "questions", ["question id 'q0', profile item 0", "field 'id'"]),
    (lambda q: q[0]["profile"][1].update(tag="horror"), "questions", ["profile item id 'p1'", "field 'tag'", "'horror'", "sci-fi"]),
    (lambda q: q[0]["profile"][1].update(tag="politics"), "questions", ["field 'tag'", "old LaMP-2", "LaMP_2/new"]),
    (lambda q: q[0].update(input="Tag this: a movie"), "questions", ["question id 'q0'", "field 'input'", "description"]),
])
def test_malformed_questions_name_file_record_field(tmp_path, mutate, where, parts):
    qs = _qs()
    mutate(qs)
    folder = write_lamp(tmp_path, 2, qs, golds={"q0": "comedy", "q1": "comedy"})
    with pytest.raises(DataFormatError) as err:
        LampBenchmark(config(folder, tmp_path, 2)).user_ids()
    msg = str(err.value)
    assert str(folder / f"dev_{where}.json") in msg
    for part in parts:
        assert part in msg, (part, msg)


def test_malformed_outputs_and_json(tmp_path):
    cases = [
        ({"q0": "comedy"}, None, ["dev_outputs.json", "question id 'q1'", "field 'golds'", "no gold output"]),
        ({"q0": "comedy", "q1": "western"}, None, ["dev_outputs.json", "gold id 'q1'", "field 'output'", "'western'"]),
        ({"q0": "comedy", "q1": "comedy"}, "LaMP_3", ["dev_outputs.json", "field 'task'", "'LaMP_3'", "'LaMP_2'"]),
    ]
    for n, (golds, gold_task, parts) in enumerate(cases):
        folder = write_lamp(tmp_path / str(n), 2, _qs(), golds=golds, gold_task=gold_task)
        with pytest.raises(DataFormatError) as err:
            LampBenchmark(config(folder, tmp_path / str(n), 2)).user_ids()
        assert all(p in str(err.value) for p in parts), str(err.value)
    folder = write_lamp(tmp_path / "bad", 2, _qs())
    (folder / "dev_questions.json").write_text('[{"id": "q0", "input": ')
    with pytest.raises(DataFormatError, match=r"dev_questions.json: not valid JSON \(.*line 1"):
        LampBenchmark(config(folder, tmp_path / "bad", 2)).user_ids()


def test_lamp3_scores_are_checked(tmp_path):
    qs = simple_questions(3, 1)
    qs[0]["profile"][1]["score"] = "great"
    with pytest.raises(DataFormatError, match=r"profile item id 'p1', field 'score'.*'great'.*1, 2, 3, 4 or 5"):
        LampBenchmark(config(write_lamp(tmp_path, 3, qs), tmp_path, 3)).user_ids()
    qs = simple_questions(3, 1)
    qs[0]["profile"][1]["score"] = 5.0  # a number is fine and becomes "5"
    u = LampBenchmark(config(write_lamp(tmp_path / "ok", 3, qs), tmp_path / "ok", 3)).load_user(0)
    assert u.train[1].labels == ("5",)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.path is empty.*download lamp"):
        LampBenchmark(config("", tmp_path, 2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"dev_questions.json' does not exist.*download lamp"):
        LampBenchmark(config(tmp_path / "empty", tmp_path, 2))
    with pytest.raises(ConfigError, match="Unknown LaMP task 'LaMP-9'"):
        LampBenchmark(config(tmp_path, tmp_path, 9))
    with pytest.raises(ConfigError, match="retrieval_k"):
        LampBenchmark(config(write_lamp(tmp_path, 2, _qs()), tmp_path, 2, retrieval_k=-1))


# ----------------------------------------------------------------------------- cache and laziness


def test_second_construction_reads_only_the_cache(tmp_path, monkeypatch):
    folder = write_lamp(tmp_path, 2, simple_questions(2, 3))
    first = LampBenchmark(config(folder, tmp_path, 2, retrieval_k=1))
    expected = (first.user_ids(), first.load_user(2))
    boom = AssertionError("source read again")
    monkeypatch.setattr(lamp, "read_questions", lambda *a: (_ for _ in ()).throw(boom))
    monkeypatch.setattr(lamp, "read_outputs", lambda *a: (_ for _ in ()).throw(boom))
    monkeypatch.setattr(lamp, "build_user_examples", lambda *a: (_ for _ in ()).throw(boom))
    second = LampBenchmark(config(folder, tmp_path, 2, retrieval_k=1))
    assert (second.user_ids(), second.load_user(2)) == expected   # the formatted user file is cached too
    with pytest.raises(AssertionError):  # another retrieval_k formats anew (from the cached raw user)
        LampBenchmark(config(folder, tmp_path, 2, retrieval_k=2)).load_user(2)


def test_listing_users_reads_no_user_file(tmp_path, monkeypatch):
    folder = write_lamp(tmp_path, 5, simple_questions(5, 4))
    LampBenchmark(config(folder, tmp_path, 5)).user_ids()
    reads: list[int] = []
    original = UserCache.read_user
    monkeypatch.setattr(UserCache, "read_user", lambda self, i, suffix="": reads.append(i) or original(self, i, suffix))
    b = LampBenchmark(config(folder, tmp_path, 5))
    assert len(b.user_ids()) == 4 and b.task().kind == "generation" and reads == []
    b.load_user(3)
    assert reads == [3]


# ----------------------------------------------------------------------------- download


def test_official_urls():
    urls = lamp_download.lamp_urls("LaMP-2", "user")
    assert urls["dev_questions.json"] == "https://ciir.cs.umass.edu/downloads/LaMP/LaMP_2/new/dev/dev_questions.json"
    assert "test_outputs.json" not in urls and len(urls) == 5
    assert lamp_download.lamp_urls("LaMP-3", "time", ("train",))["train_outputs.json"] == \
        "https://ciir.cs.umass.edu/downloads/LaMP/time/LaMP_3/train/train_outputs.json"
    with pytest.raises(lamp_download.DownloadError, match="Avocado"):
        lamp_download.lamp_urls("LaMP-6", "user")


@pytest.fixture
def file_server(tmp_path):
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_from_local_server(tmp_path, file_server, capsys):
    root, url = file_server
    src = write_lamp(tmp_path / "src", 2, simple_questions(2, 2))
    served = root / "LaMP_2" / "new" / "dev"
    served.mkdir(parents=True)
    for name in ("dev_questions.json", "dev_outputs.json"):
        (served / name).write_bytes((src / name).read_bytes())
    out = tmp_path / "out"
    assert data_main(["download", "lamp", "--task", "LaMP-2", "--split", "user", "--out", str(out), "--base-url", url,
                      "--sets", "dev", "--no-progress"]) == 0
    for name in ("dev_questions.json", "dev_outputs.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes()
    assert "data.path=" in capsys.readouterr().out
    assert LampBenchmark(config(out, tmp_path, 2)).user_ids() == ["q0", "q1"]
    assert not list(out.glob(".*part"))


def test_download_errors(tmp_path, file_server, capsys):
    root, url = file_server
    (root / "time" / "LaMP_4" / "dev").mkdir(parents=True)
    (root / "time" / "LaMP_4" / "dev" / "dev_questions.json").write_text("<html><body>error</body></html>")
    with pytest.raises(lamp_download.DownloadError, match="not JSON"):
        lamp_download.download("LaMP-4", "time", tmp_path / "o", base_url=url, sets=("dev",), progress=False)
    assert not (tmp_path / "o" / "dev_questions.json").exists()
    with pytest.raises(lamp_download.DownloadError, match="HTTP 404"):
        lamp_download.download("LaMP-5", "user", tmp_path / "o", base_url=url, sets=("dev",), progress=False)
    with socket.socket() as s:  # a port on loopback that nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(lamp_download.DownloadError, match="could not reach .*offline"):
        lamp_download.download("LaMP-5", "user", tmp_path / "o", base_url=f"http://127.0.0.1:{closed}", sets=("dev",), progress=False,
                      timeout=5)
    assert data_main(["download", "lamp", "--task", "LaMP-5", "--out", str(tmp_path / "o"),
                      "--base-url", f"http://127.0.0.1:{closed}", "--no-progress"]) == 2
    assert "offline" in capsys.readouterr().err
