"""PEFT-U: raw converters, PEFT-U's split protocol, prepare command, loader, cache, errors."""

from __future__ import annotations

import csv
import json
import random
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from fedpeft.config import Config, ConfigError
from fedpeft.data import peft_u
from fedpeft.data.__main__ import main as data_main
from fedpeft.data.common import DataFormatError, UserCache
from fedpeft.data.peft_u import PeftUBenchmark, split_user, split_users

# ----------------------------------------------------------------------------- fixtures


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def tweeteval_raw(tmp_path: Path, n_tweets: int = 15) -> Path:
    """3 annotators: M_1 labels all, F_2 labels all (mostly the opposite), M_3 only 8 tweets."""
    raw = tmp_path / "raw_tweeteval"
    rows = []
    for i in range(n_tweets):
        a = "Hateful" if i % 3 else "Non-hateful"
        b = "Non-hateful" if a == "Hateful" else "Hateful"
        c = a if i < 8 else ""
        rows.append([100 + i, f"tweet number {i}, with a comma", a, b, c])
    write_csv(raw / "annotations_g3.csv", ["id", "text", "label_M_1", "label_F_2", "label_M_3"], rows)
    return raw


def studemo_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw_studemo"
    labels = list(peft_u.STUDEMO_LABELS)
    write_csv(raw / "text_data.csv", ["text_id", "text"], [[i, f"review text {i}\nsecond line"] for i in range(14)])
    rows = []
    for i in range(12):  # annotator 7: 12 texts
        v = [0.0] * len(labels)
        v[labels.index("joy")] = 2.0 if i % 2 else 0.0
        v[labels.index("trust")] = 1.0 if i % 3 == 0 else 0.5
        v[labels.index("valence")] = -2.0 if i % 2 else 1.0
        v[labels.index("arousal")] = 3.0 if i == 5 else 0.0
        rows.append([i, 7, *v])
    rows.append([0, 7, *([3.0] * len(labels))])  # second annotation of (7, text 0): ignored, first one kept
    rows.append([13, 8, *([0.0] * len(labels))])  # annotator 8: one annotation without any label
    write_csv(raw / "annotation_data.csv", ["text_id", "annotator_id", *labels], rows)
    return raw


def sd_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "raw_sd"
    header = ["", "qa_index", "q_speaker_detail", "q_text", "r_speaker_detail", "r_text", "gold_workers",
              "gold_coarse_labels", "gold_sentiments", "gold_q_sentiments"]
    resp = peft_u.SD_RESPONSE_LABELS
    sent = list(peft_u.SD_SENTIMENTS)
    rows = []
    for i in range(40):
        workers = ("worker_1", "worker_22") if i < 39 else ("worker_1",)
        rows.append([i, f"hearing_{i}", "Chairman X", f"question {i}?", "Witness Y", f"answer {i}.", repr(workers),
                     repr(tuple(resp[(i + j) % len(resp)] for j in range(len(workers)))),
                     repr(tuple(sent[(i + j) % len(sent)] for j in range(len(workers)))),
                     repr(tuple(sent[(i + 2 * j + 1) % len(sent)] for j in range(len(workers))))])
    write_csv(raw / peft_u.SUBJECTIVE_DISCOURSE_FILE, header, rows, delimiter="\t")
    return raw


def prepared(users: dict) -> dict:
    """{uid: {split: [(sid, text, labels)]}} -> PEFT-U's prepared form."""
    return {uid: {s: {sid: {"text": t, "label": lb} for sid, t, lb in rows} for s, rows in splits.items()}
            for uid, splits in users.items()}


def write_prepared(tmp_path: Path, data: dict, name: str = "user_data_leaked.json") -> Path:
    path = tmp_path / "prep" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def config(path, tmp_path: Path, task: str = "fixture-task", **data) -> Config:
    """A task name PEFT-U does not have (the default) keeps the fixtures' labels x, y, z. The
    file's own splits (data.split=leaked) unless ``split`` is given: these tests read files."""
    return Config.from_dict({"data": {"benchmark": f"peft-u/{task}", "path": str(path), "split": "leaked",
                                      "cache_dir": str(tmp_path / "cache"), **data}})


SMALL = prepared({
    "u2": {"train": [("a", "text a", ["x"]), ("b", "text b", ["y"])], "val": [("c", "text c", ["x"])],
           "test": [("d", "text d", ["y"])]},
    "u10": {"train": [("a", "text a", ["y"])], "val": [], "test": [("e", "text e", ["z"])]},
    "u1": {"train": [], "val": [("a", "text a", ["x"])], "test": [("b", "text b", ["x"])]},   # empty train
    "u3": {"train": [("a", "text a", ["x"])], "val": [], "test": []},                       # empty test
})


# ----------------------------------------------------------------------------- converters


def test_read_tweeteval_one_user_per_column(tmp_path):
    data = peft_u.read_tweeteval(tweeteval_raw(tmp_path))
    assert list(data) == ["label_M_1", "label_F_2", "label_M_3"]
    assert len(data["label_M_1"]) == 15 and len(data["label_M_3"]) == 8  # empty cells: not annotated
    assert data["label_M_1"]["100"] == {"text": "tweet number 0, with a comma", "label": ["Non-hateful"]}
    assert data["label_F_2"]["100"]["label"] == ["Hateful"]


def test_tweeteval_unknown_label_names_file_row_and_column(tmp_path):
    raw = tweeteval_raw(tmp_path)
    text = (raw / "annotations_g3.csv").read_text().replace("Non-hateful", "Maybe", 1)
    (raw / "annotations_g3.csv").write_text(text)
    with pytest.raises(DataFormatError) as err:
        peft_u.read_tweeteval(raw)
    msg = str(err.value)
    assert "annotations_g3.csv" in msg and "line 2 (id=100)" in msg and "label_M_1" in msg
    assert "'Maybe'" in msg and "Hateful, Non-hateful" in msg


def test_tweeteval_missing_column_and_missing_file(tmp_path):
    write_csv(tmp_path / "r" / "annotations_g3.csv", ["id", "tweet", "label_M_1"], [[1, "x", "Hateful"]])
    with pytest.raises(DataFormatError, match=r"annotations_g3.csv: line 1 \(header\), field 'text'"):
        peft_u.read_tweeteval(tmp_path / "r")
    with pytest.raises(ConfigError, match="does not exist"):
        peft_u.read_tweeteval(tmp_path / "nowhere")


def test_tweeteval_ragged_row(tmp_path):
    path = write_csv(tmp_path / "r" / "annotations_g3.csv", ["id", "text", "label_M_1"], [[1, "x", "Hateful"]])
    path.write_text(path.read_text() + "2,y\n")
    with pytest.raises(DataFormatError, match=r"line 3, field '<row>'.*2 cells.*3 cells"):
        peft_u.read_tweeteval(tmp_path / "r")


def test_read_studemo_labels_threshold_first_annotation_and_empty(tmp_path):
    data = peft_u.read_studemo(studemo_raw(tmp_path))
    user = data["7"]
    assert len(user) == 12
    assert user["0"]["label"] == ["trust", "valence"]       # trust 1.0 counts, valence 1.0 counts; repeat ignored
    assert user["1"]["label"] == ["joy"]                    # trust 0.5 no, valence -2 no
    assert user["5"]["label"] == ["joy", "arousal"]
    assert user["2"]["label"] == ["valence"]
    assert user["3"]["label"] == ["joy", "trust"]
    assert user["0"]["text"] == "review text 0\nsecond line"
    assert data["8"] == {}                                   # an annotation with no label gives no example


def test_studemo_errors_name_file_record_field(tmp_path):
    raw = studemo_raw(tmp_path)
    path = raw / "annotation_data.csv"
    rows = list(csv.reader(path.open(newline="")))
    rows[3][4] = "lots"   # anticipation of line 4
    write_csv(path, rows[0], rows[1:])
    with pytest.raises(DataFormatError) as err:
        peft_u.read_studemo(raw)
    assert all(s in str(err.value) for s in ("annotation_data.csv", "line 4", "text_id=2, annotator_id=7", "'anticipation'", "'lots'"))
    rows[3][4] = "0.0"
    rows[2][0] = "999"
    write_csv(path, rows[0], rows[1:])
    with pytest.raises(DataFormatError, match=r"line 3 \(text_id=999, annotator_id=7\), field 'text_id'.*text_data.csv"):
        peft_u.read_studemo(raw)
    write_csv(path, ["text_id", "annotator_id", "joy"], [[0, 7, 1.0]])
    with pytest.raises(DataFormatError, match="missing: trust"):
        peft_u.read_studemo(raw)


@pytest.mark.parametrize("task, expected_w1_first", [
    ("subjectivediscourse_response", "answer"),
    ("subjectivediscourse_response_sentiment", "very-negative"),
    ("subjectivediscourse_question_sentiment", "somewhat-negative"),
])
def test_read_subjectivediscourse(tmp_path, task, expected_w1_first):
    data = peft_u.read_subjectivediscourse(sd_raw(tmp_path), task)
    assert set(data) == {"worker_1", "worker_22"}
    assert len(data["worker_1"]) == 40 and len(data["worker_22"]) == 39
    sample = data["worker_1"]["hearing_0"]
    assert sample["text"] == "Chairman X \n question 0? \n Witness Y \n answer 0."
    assert sample["label"] == [expected_w1_first]
    allowed = set(peft_u.SD_RESPONSE_LABELS) | set(peft_u.SD_SENTIMENTS.values())
    assert all(s["label"][0] in allowed for u in data.values() for s in u.values())  # camelCase respelled


def test_subjectivediscourse_errors(tmp_path):
    raw = sd_raw(tmp_path)
    path = raw / peft_u.SUBJECTIVE_DISCOURSE_FILE
    rows = list(csv.reader(path.open(newline=""), delimiter="\t"))
    good = [r[:] for r in rows]
    rows[1][7] = "('answer', 'maybe')"
    write_csv(path, rows[0], rows[1:], delimiter="\t")
    with pytest.raises(DataFormatError) as err:
        peft_u.read_subjectivediscourse(raw, "subjectivediscourse_response")
    assert all(s in str(err.value) for s in (peft_u.SUBJECTIVE_DISCOURSE_FILE, "qa_index=hearing_0", "gold_coarse_labels", "'maybe'"))
    rows = [r[:] for r in good]
    rows[2][6] = "worker_1, worker_22"
    write_csv(path, rows[0], rows[1:], delimiter="\t")
    with pytest.raises(DataFormatError, match=r"qa_index=hearing_1\), field 'gold_workers'.*tuple literal"):
        peft_u.read_subjectivediscourse(raw, "subjectivediscourse_response")
    rows = [r[:] for r in good]
    rows[1][9] = "('neutral',)"
    write_csv(path, rows[0], rows[1:], delimiter="\t")
    with pytest.raises(DataFormatError, match=r"field 'gold_q_sentiments'.*2 entries"):
        peft_u.read_subjectivediscourse(raw, "subjectivediscourse_question_sentiment")


# ----------------------------------------------------------------------------- split protocol


def peft_u_split2(samples_: list, seed: int = 42, ratio: float = 0.8) -> tuple[list, list, list]:
    """A literal port of PEFT-U's _split2train_val_test (module random, as its set_seed)."""
    random.seed(seed)
    random.shuffle(samples_)
    non_tr = max(2, round((1 - ratio) * len(samples_)))
    tr, rest = samples_[:-non_tr], samples_[-non_tr:]
    vl_sz = round(0.5 * non_tr)
    return tr, rest[:vl_sz], rest[vl_sz:]


def peft_u_reference_split(samples: dict, seed: int = 42, ratio: float = 0.8) -> dict:
    """A literal port of PEFT-U's data2dataset_splits(leakage=True) for one user (module random)."""
    def split2(samples_):
        return peft_u_split2(samples_, seed, ratio)

    u = defaultdict(dict)
    for label in sorted(set().union(*[v["label"] for v in samples.values()])):
        tr, vl, ts = split2([(sid, s) for sid, s in samples.items() if label in s["label"]])
        tr_, vl_, ts_ = u["train"], u["val"], u["test"]
        tr_.update({sid: s for sid, s in tr if sid not in vl_ and sid not in ts_})
        ts_.update({sid: s for sid, s in ts if sid not in tr_ and sid not in vl_})
        vl_.update({sid: s for sid, s in vl if sid not in tr_ and sid not in ts_})
    return dict(u)


def random_user(rng: random.Random, n: int, labels: list[str], multi: bool) -> dict:
    return {f"s{i}": {"text": f"t{i}", "label": rng.sample(labels, rng.randint(1, 3) if multi else 1)} for i in range(n)}


@pytest.mark.parametrize("multi", [False, True])
def test_split_equals_peft_u_code(multi):
    rng = random.Random(7)
    for n in (1, 2, 3, 7, 10, 23, 64):
        samples = random_user(rng, n, ["a", "b", "c", "d"], multi)
        assert {k: list(v) for k, v in split_user(samples).items()} == \
               {k: list(v) for k, v in peft_u_reference_split(samples).items()}


def test_split_sizes_per_label():
    # label A: 20 examples, label B: 10, label C: 3 -> held out max(2, round(0.2 n)), halved (val first)
    samples = {f"a{i}": {"text": "", "label": ["A"]} for i in range(20)}
    samples |= {f"b{i}": {"text": "", "label": ["B"]} for i in range(10)}
    samples |= {f"c{i}": {"text": "", "label": ["C"]} for i in range(3)}
    out = split_user(samples)
    per = {lab: [sum(1 for s in out[sp].values() if s["label"] == [lab]) for sp in ("train", "val", "test")] for lab in "ABC"}
    assert per == {"A": [16, 2, 2], "B": [8, 1, 1], "C": [1, 1, 1]}
    samples = {f"d{i}": {"text": "", "label": ["D"]} for i in range(13)}  # 0.2 * 13 = 2.6 -> 3 held: round(1.5) = 2 val
    out = split_user(samples)
    assert [len(out[s]) for s in ("train", "val", "test")] == [10, 2, 1]


def test_every_label_has_at_least_two_held_out_examples():
    rng = random.Random(3)
    for _ in range(20):
        samples = random_user(rng, rng.randint(10, 60), list("abcdef"), multi=False)
        out = split_user(samples)
        for label in {s["label"][0] for s in samples.values()}:
            n = sum(s["label"] == [label] for s in samples.values())
            held = sum(s["label"] == [label] for sp in ("val", "test") for s in out[sp].values())
            assert held == min(n, max(2, round(0.2 * n)))


def test_multilabel_example_lands_in_one_split_only():
    samples = random_user(random.Random(1), 40, list("abcde"), multi=True)
    out = split_user(samples)
    ids = [sid for sp in ("train", "val", "test") for sid in out[sp]]
    assert sorted(ids) == sorted(samples) and len(ids) == len(set(ids))


def test_split_users_drops_small_users_and_lists_empty_splits():
    rng = random.Random(0)
    data = {"big": random_user(rng, 30, ["x", "y"], False), "small": random_user(rng, 9, ["x"], False),
            "none": {}, "one_label_each": {f"s{i}": {"text": "", "label": [f"l{i}"]} for i in range(10)}}
    prep, dropped, empty = split_users(data)
    assert set(prep) == {"big", "one_label_each"}
    assert dropped == {"small": "9 examples (< 10)", "none": "0 examples (< 10)"}
    assert empty == {"one_label_each": {"train": 0, "val": 10, "test": 0}}  # one example per label -> all in val


def test_prepare_writes_files_and_is_deterministic(tmp_path):
    raw = tweeteval_raw(tmp_path)
    a = peft_u.prepare("tweeteval", raw, tmp_path / "a")
    peft_u.prepare("tweeteval", raw, tmp_path / "b")
    assert (tmp_path / "a" / "user_data_leaked.json").read_bytes() == (tmp_path / "b" / "user_data_leaked.json").read_bytes()
    data = json.loads((tmp_path / "a" / "user_data_leaked.json").read_text())
    assert list(data) == ["label_M_1", "label_F_2"]
    assert json.loads((tmp_path / "a" / "dropped_users.json").read_text()) == {"label_M_3": "8 examples (< 10)"}
    assert json.loads((tmp_path / "a" / "users-with-empty-dataset-splits.json").read_text()) == {"leaked": {}}
    # 15 tweets: 10 Hateful (held 2) + 5 Non-hateful (held 2) -> 11 / 2 / 2
    assert {s: len(data["label_M_1"][s]) for s in ("train", "val", "test")} == {"train": 11, "val": 2, "test": 2}
    assert a["users_kept"] == 2 and a["labels"] == ["Hateful", "Non-hateful"] and a["kind"] == "classification"


def test_prepare_command(tmp_path, capsys):
    assert data_main(["prepare", "peft-u", "--task", "studemo", "--raw", str(studemo_raw(tmp_path)),
                      "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "2 users read, 1 kept, 1 dropped" in out and "multilabel" in out
    assert json.loads((tmp_path / "out" / "dropped_users.json").read_text()) == {"8": "0 examples (< 10)"}
    assert data_main(["prepare", "peft-u", "--task", "tweeteval", "--raw", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "annotations_g3.csv" in capsys.readouterr().err


def test_prepared_output_loads(tmp_path):
    peft_u.prepare("subjectivediscourse_question_sentiment", sd_raw(tmp_path), tmp_path / "sd")
    b = PeftUBenchmark(config(tmp_path / "sd", tmp_path, task="subjectivediscourse_question_sentiment"))
    assert b.user_ids() == ["worker_1", "worker_22"]
    assert b.task().kind == "classification" and "very-positive" in b.task().labels
    u = b.load_user(1)
    assert u.user_id == "worker_22" and len(u.train) + len(u.val) + len(u.test) == 39 and len(u.train) > 20


# ----------------------------------------------------------------------------- loader


def test_loader_task_spec_users_and_skips(tmp_path):
    path = write_prepared(tmp_path, SMALL)
    with pytest.warns(UserWarning, match=r"skipped 2 user\(s\).*u1 \(empty train split\).*u3 \(empty test split\)"):
        b = PeftUBenchmark(config(path, tmp_path))
        ids = b.user_ids()
    assert ids == ["u2", "u10"]  # natural order of ids, skipped ones left out
    assert b.skipped_users() == {"u1": "empty train split", "u3": "empty test split"}
    assert b.task().kind == "classification" and b.task().labels == ("x", "y", "z")
    u = b.load_user(0)
    assert u.user_id == "u2" and [e.id for e in u.train] == ["a", "b"] and u.val[0].labels == ("x",)
    assert u.test[0].text == "text d"
    with pytest.raises(IndexError):
        b.load_user(2)


def test_loader_multilabel_kind_and_folder_paths(tmp_path):
    data = prepared({"7": {"train": [("a", "t", ["joy", "fear"])], "val": [], "test": [("b", "t2", ["joy"])]}})
    path = write_prepared(tmp_path, data)
    assert PeftUBenchmark(config(path.parent, tmp_path, task="studemo")).task().kind == "multilabel"
    nested = tmp_path / "root" / "studemo" / "user_data_leaked.json"
    nested.parent.mkdir(parents=True)
    nested.write_text(json.dumps(data))
    assert PeftUBenchmark(config(tmp_path / "root", tmp_path, task="studemo")).load_user(0).train[0].labels == ("joy", "fear")
    with pytest.raises(ConfigError, match="data.path is empty.*prepare peft-u"):
        PeftUBenchmark(config("", tmp_path))
    with pytest.raises(ConfigError, match="without user_data_leaked.json"):
        PeftUBenchmark(config(tmp_path / "root" / "studemo" / "..", tmp_path, task="other"))
    with pytest.raises(ConfigError, match="needs a task"):
        PeftUBenchmark(Config.from_dict({"data": {"benchmark": "peft-u", "path": str(path)}}))


@pytest.mark.parametrize("data, expected", [
    ("{not json", [r"user_data_leaked.json: not valid JSON", "line 1"]),
    ([1, 2], ["top level", "got 'list'"]),
    ({"u": {"train": {}, "test": {}}}, ["user 'u'", "field 'val'", "train, val and test"]),
    ({"u": {"train": {"s1": {"text": "x"}}, "val": {}, "test": {}}}, ["user 'u', train sample 's1'", "field 'label'", "<missing"]),
    ({"u": {"train": {"s1": {"text": "x", "label": "pos"}}, "val": {}, "test": {}}}, ["train sample 's1'", "field 'label'", "'pos'", "list"]),
    ({"u": {"train": {}, "val": {}, "test": {"s9": {"text": 3, "label": ["a"]}}}}, ["test sample 's9'", "field 'text'", "3", "a string"]),
])
def test_loader_malformed_input_names_file_record_field(tmp_path, data, expected):
    path = tmp_path / "prep" / "user_data_leaked.json"
    path.parent.mkdir()
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    with pytest.raises(DataFormatError) as err:
        PeftUBenchmark(config(path, tmp_path)).user_ids()
    assert str(path) in str(err.value)
    for part in expected:
        assert part in str(err.value), (part, str(err.value))


def test_user_with_sample_in_two_splits_is_skipped(tmp_path):
    data = prepared({"u": {"train": [("a", "t", ["x"])], "val": [], "test": [("a", "t", ["x"])]},
                     "v": {"train": [("a", "t", ["x"])], "val": [], "test": [("b", "t", ["y"])]}})  # two labels
    with pytest.warns(UserWarning):
        b = PeftUBenchmark(config(write_prepared(tmp_path, data), tmp_path))
        assert b.user_ids() == ["v"]
    assert b.skipped_users() == {"u": "sample 'a' is in both train and test"}


# ----------------------------------------------------------------------------- cache and laziness


def test_second_construction_reads_only_the_cache(tmp_path, monkeypatch):
    path = write_prepared(tmp_path, SMALL)
    with pytest.warns(UserWarning):
        first = PeftUBenchmark(config(path, tmp_path))
        expected = (first.user_ids(), first.load_user(1))

    def no_source(*_a, **_k):
        raise AssertionError("the source file was read again")

    monkeypatch.setattr(peft_u, "_read_prepared", no_source)
    second = PeftUBenchmark(config(path, tmp_path))
    assert (second.user_ids(), second.load_user(1)) == expected
    assert second.skipped_users() == {"u1": "empty train split", "u3": "empty test split"}


def test_changed_source_rebuilds_cache(tmp_path):
    path = write_prepared(tmp_path, SMALL)
    with pytest.warns(UserWarning):
        a = PeftUBenchmark(config(path, tmp_path))
        a.user_ids()
    changed = dict(SMALL)
    changed["u5"] = changed.pop("u3") | {"test": {"q": {"text": "t", "label": ["x"]}}}
    path.write_text(json.dumps(changed))
    with pytest.warns(UserWarning):
        b = PeftUBenchmark(config(path, tmp_path))
        assert b.user_ids() == ["u2", "u5", "u10"]
    assert a.cache.dir != b.cache.dir


def test_constructing_and_listing_users_reads_no_texts(tmp_path, monkeypatch):
    path = write_prepared(tmp_path, SMALL)
    monkeypatch.setattr(peft_u, "_read_prepared", lambda *_: (_ for _ in ()).throw(AssertionError("read")))
    PeftUBenchmark(config(path, tmp_path))  # construction alone reads nothing
    monkeypatch.undo()
    with pytest.warns(UserWarning):
        PeftUBenchmark(config(path, tmp_path)).user_ids()  # builds the cache
    reads: list[int] = []
    original = UserCache.read_user
    monkeypatch.setattr(UserCache, "read_user", lambda self, i, suffix="": reads.append(i) or original(self, i, suffix))
    b = PeftUBenchmark(config(path, tmp_path))
    assert b.user_ids() == ["u2", "u10"] and b.task().labels == ("x", "y", "z")
    assert reads == []
    b.load_user(1)
    assert reads == [1]


def test_concurrent_builders_agree(tmp_path):
    data = prepared({f"u{i}": {"train": [("a", f"t{i}", ["x"])], "val": [], "test": [("b", "t", ["y"])]} for i in range(50)})
    path = write_prepared(tmp_path, data)
    results, errors = [], []

    def build():
        try:
            b = PeftUBenchmark(config(path, tmp_path))
            results.append((b.user_ids(), [b.load_user(i).train[0].text for i in range(50)]))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 4 and all(r == results[0] for r in results)
    cache_dirs = list((tmp_path / "cache" / "peft-u").glob("fixture-task-*"))
    assert len(cache_dirs) == 1 and not list(cache_dirs[0].rglob("*.tmp"))
