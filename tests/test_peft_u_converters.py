"""PEFT-U converters for hatexplain, measuringhatespeech, gabhate, unhealthyconversations, wikidetox,
goemotion, cockamamie and epic: tiny fixtures in each task's raw format, the real ``prepare`` (or the
CLI), and per-user labels worked out by hand from the fixture."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fedpeft.config import Config, ConfigError
from fedpeft.data import peft_u
from fedpeft.data.__main__ import main as data_main
from fedpeft.data.common import DataFormatError
from fedpeft.data.peft_u import PeftUBenchmark

SPLITS = ("train", "val", "test")


def write_csv(path: Path, header: list[str], rows: list[list], delimiter: str = ",", encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding=encoding) as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")
    return path


def run(task: str, raw, out: Path) -> dict:
    """prepare -> {user: {sample_id: sample}} over all splits (+ the summary and dropped users)."""
    summary = peft_u.prepare(task, raw, out)
    return read_out(out) | {"_summary": summary}


def read_out(out: Path) -> dict:
    data = json.loads((out / "user_data_leaked.json").read_text(encoding="utf-8"))
    assert all(set(splits) == set(SPLITS) for splits in data.values())
    merged = {uid: {sid: s for split in SPLITS for sid, s in splits[split].items()} for uid, splits in data.items()}
    return merged | {"_dropped": json.loads((out / "dropped_users.json").read_text())}


def users(result: dict) -> set[str]:
    return {k for k in result if not k.startswith("_")}


def labels(result: dict, uid: str) -> dict[str, list[str]]:
    return {sid: s["label"] for sid, s in result[uid].items()}


# ----------------------------------------------------------------------------- fixtures (exact raw formats)

HX = ["hatespeech", "normal", "offensive"]


def hatexplain_raw(tmp_path: Path) -> Path:
    """dataset.json: 12 posts; annotators 203 (cycles the labels), 204 ('normal', posts 0-10),
    205 (hatespeech for posts 0-5, offensive after), 999 (posts 0-2 only). Post 5: undecided."""
    raw = tmp_path / "hatexplain"
    posts = {}
    for i in reversed(range(12)):  # keys out of order: PEFT-U iterates them sorted
        anns = [{"label": HX[i % 3], "annotator_id": 203, "target": ["None"]}]
        if i <= 10:
            anns.append({"label": "normal", "annotator_id": 204, "target": ["None"]})
        anns.append({"label": "hatespeech" if i < 6 else "offensive", "annotator_id": 205, "target": ["African", "Women"]})
        if i < 3:
            anns.append({"label": "offensive", "annotator_id": 999, "target": ["Other"]})
        tokens = ["<user>", "post", str(i), "café", "😂"]
        rationales = [] if i % 2 else [[0, 1, 0, 0, 1], [1, 1, 0, 0, 0]]
        posts[f"{1000 + i}_gab"] = {"post_id": f"{1000 + i}_gab", "annotators": anns, "rationales": rationales,
                                    "post_tokens": tokens}
    write_json(raw / "dataset.json", posts)
    write_json(raw / "post_id_divisions.json", {"train": ["1000_gab"], "val": ["1001_gab"], "test": ["1002_gab"]})
    return raw


GAB_HEADER = ["ID", "Annotator", "Text", "Hate", "HD", "CV", "VO", "REL", "RAE", "SXO", "GEN", "IDL", "NAT", "POL", "MPH",
              "EX", "IM"]


def gab_row(pid: int, annotator: str, text: str, hate: int) -> list:
    return [pid, annotator, text, hate, hate, 0, 0, 0, hate, 0, 0, 0, 0, 0, 0, "1" if hate else "", "0" if hate else ""]


def gabhate_raw(tmp_path: Path) -> Path:
    """Annotator 4: posts 27000-27011, hateful where i % 4 == 0; annotator 13: 27000-27009, hateful
    for i in (1, 2), 27003 repeated at the end as hateful; annotator 20: two posts."""
    rows = [gab_row(27000 + i, "4", f'post {i}, said "hi"\nsecond line' if i == 1 else f"post {i}", int(i % 4 == 0))
            for i in range(12)]
    rows += [gab_row(27000 + i, "13", f"post {i}", int(i in (1, 2))) for i in range(10)]
    rows += [gab_row(27000 + i, "20", f"post {i}", 1) for i in range(2)]
    rows.append(gab_row(27003, "13", "post 3", 1))
    write_csv(tmp_path / "gabhate" / "GabHateCorpus_annotations.tsv", GAB_HEADER, rows, delimiter="\t")
    return tmp_path / "gabhate"


def mhs_dataset(rows=None, drop: str | None = None):
    """Annotator 10001: comments 47777-47788, hatespeech i % 3; 10002: 47777-47786, 2 for i < 3 else 0,
    (47777, 10002) repeated last with 1; 10003: 4 comments. hate_speech_score disagrees on purpose."""
    import datasets

    if rows is None:
        rows = [(47777 + i, 10001, float(i % 3)) for i in range(12)]
        rows += [(47777 + i, 10002, 2.0 if i < 3 else 0.0) for i in range(10)]
        rows += [(47777 + i, 10003, 1.0) for i in range(4)]
        rows.append((47777, 10002, 1.0))
    cols = {
        "comment_id": [r[0] for r in rows], "annotator_id": [r[1] for r in rows], "platform": [2] * len(rows),
        "sentiment": [3.0] * len(rows), "respect": [2.0] * len(rows), "insult": [1.0] * len(rows),
        "hatespeech": [r[2] for r in rows], "hate_speech_score": [1.7 - r[2] * 1.3 for r in rows],
        "text": [f"comment {r[0]} ✓" for r in rows], "infitms": [0.9] * len(rows), "std_err": [0.3] * len(rows),
        "annotator_severity": [0.2] * len(rows), "target_race_asian": [False] * len(rows),
    }
    if drop:
        del cols[drop]
    return datasets.Dataset.from_dict(cols)


UC_HEADER = ["_unit_id", "comment", "_trust", "_worker_id", "antagonize", "condescending", "dismissive", "generalisation",
             "generalisation_unfair", "healthy", "hostile", "sarcastic"]


def unhealthy_raw(tmp_path: Path) -> Path:
    """Worker 45136546: units 2319000-2319011, unhealthy where i % 3 == 0; 44577732: 2319000-2319009,
    unhealthy for i == 4, (2319004, 44577732) repeated later as healthy; 20109169: three units."""
    def row(i, worker, healthy):
        bad = "0" if healthy == "1" else "1"
        return [2319000 + i, f'Well, "that" is rich, comment {i}.', "0.8571", worker, bad, "0", bad, "0", "0", healthy,
                "0", "0"]
    rows = [row(i, "45136546", "0" if i % 3 == 0 else "1") for i in range(12)]
    rows += [row(i, "44577732", "0" if i == 4 else "1") for i in range(10)]
    rows += [row(i, "20109169", "1") for i in range(3)]
    rows.append(row(4, "44577732", "1"))
    write_csv(tmp_path / "uc" / "unhealthy_full.csv", UC_HEADER, rows)
    return tmp_path / "uc"


def wikidetox_raw(tmp_path: Path) -> Path:
    """13 comments rev_id 37675 + 100 i; worker 1362: i 0-11, aggressive for i in (0, 5, 7); 2408: i 1-11,
    aggressive where i is odd, (i=3, 2408) repeated later as 0.0; 77: two comments."""
    raw = tmp_path / "wikidetox"
    write_csv(raw / "aggression_annotated_comments.tsv", ["rev_id", "comment", "year", "logged_in", "ns", "sample", "split"],
              [[37675 + 100 * i, f"NEWLINE_TOKENThis is ``creative`` {i}.TAB_TOKENok", 2002, "False", "article", "random",
                "train"] for i in range(13)], delimiter="\t")
    ann = [[37675 + 100 * i, 1362, "1.0" if i in (0, 5, 7) else "0.0", "-1.0" if i in (0, 5, 7) else "0.0"] for i in range(12)]
    ann += [[37675 + 100 * i, 2408, "1.0" if i % 2 else "0.0", "1.0"] for i in range(1, 12)]
    ann += [[37675 + 100 * i, 77, "0.0", "0.0"] for i in range(2)]
    ann.append([37675 + 300, 2408, "0.0", "0.0"])
    write_csv(raw / "aggression_annotations.tsv", ["rev_id", "worker_id", "aggression", "aggression_score"], ann, delimiter="\t")
    return raw


GO_EMOTIONS = ["admiration", "amusement", "anger", "annoyance", "approval", "caring", "confusion", "curiosity", "desire",
               "disappointment", "disapproval", "disgust", "embarrassment", "excitement", "fear", "gratitude", "grief",
               "joy", "love", "nervousness", "optimism", "pride", "realization", "relief", "remorse", "sadness",
               "surprise", "neutral"]
GO_HEADER = ["text", "id", "author", "subreddit", "link_id", "parent_id", "created_utc", "rater_id", "example_very_unclear",
             *GO_EMOTIONS]
EKMAN = {  # GoEmotions' data/ekman_mapping.json
    "anger": ["anger", "annoyance", "disapproval"], "disgust": ["disgust"], "fear": ["fear", "nervousness"],
    "joy": ["joy", "amusement", "approval", "excitement", "gratitude", "love", "optimism", "relief", "pride", "admiration",
            "desire", "caring"],
    "sadness": ["sadness", "disappointment", "embarrassment", "grief", "remorse"],
    "surprise": ["surprise", "realization", "confusion", "curiosity"],
}


def go_row(pid: str, rater: str, emotions: list[str]) -> list:
    return [f'That\'s "{pid}", so funny 😂', pid, "some_author", "funny", "t3_abc", "t1_def", "1548381039.0", rater,
            "False" if emotions else "True", *["1" if e in emotions else "0" for e in GO_EMOTIONS]]


def goemotion_raw(tmp_path: Path) -> Path:
    raw = tmp_path / "goemotion"
    write_json(raw / "ekman_mapping.json", EKMAN)
    f1 = [("e0", ["admiration", "amusement"]), ("e1", ["grief", "anger", "disgust"]), ("e2", ["joy", "neutral"]),
          ("e3", []), ("e4", ["curiosity"]), ("e5", ["nervousness", "fear"])]
    f2 = [("e2", ["realization"]), ("e0", ["anger"]), ("e6", ["annoyance"]), ("e7", ["disapproval", "remorse"]),
          ("e8", ["embarrassment"])]
    f3 = [("e9", ["caring", "confusion"]), ("e10", ["disgust"]), ("e11", ["gratitude"]), ("e12", ["love"])]
    rows1 = [go_row(p, "37", e) for p, e in f1]
    rows1 += [go_row(f"e{i}", "61", ["neutral"] if i == 3 else ["sadness"] if i % 2 == 0 else ["surprise"]) for i in range(11)]
    rows1 += [go_row("e0", "5", ["neutral"]), go_row("e1", "5", ["neutral", "joy"])]
    rows3 = [go_row(p, "37", e) for p, e in f3] + [go_row("e0", "8", ["fear"]), go_row("e1", "8", ["fear"])]
    write_csv(raw / "goemotions_1.csv", GO_HEADER, rows1)
    write_csv(raw / "goemotions_2.csv", GO_HEADER, [go_row(p, "37", e) for p, e in f2])
    write_csv(raw / "goemotions_3.csv", GO_HEADER, rows3)
    return raw


def cockamamie_raw(tmp_path: Path) -> Path:
    votes = [
        {"gobbledegook": {"no_votes": ["W2"], "yes_votes": ["W1"]}},
        {"unvoted": {"no_votes": [], "yes_votes": []}},
        {"cockamamie": {"no_votes": ["W1", "W2"], "yes_votes": ["W2"]}},
        {"nincompoop": {"no_votes": ["W3"], "yes_votes": ["W1", "W2"]},
         "table": {"no_votes": ["W1", "W2", "W3"], "yes_votes": []}},
        *[{f"word{i}": {"no_votes": (["W1"] if i % 2 else []) + (["W2"] if i <= 9 else []),
                        "yes_votes": [] if i % 2 else ["W1"]}} for i in range(4, 12)],
        {"gobbledegook": {"no_votes": ["W1"], "yes_votes": []}},
    ]
    write_json(tmp_path / "cockamamie" / "cockamamie.json", {"word_ratings": {"votes": votes}})
    return tmp_path / "cockamamie"


EPIC_HEADER = ["id_original", "text", "parent_id_original", "parent_text", "language_instance", "language_variety", "user",
               "label", "Sex", "Age", "Ethnicity simplified", "Country of birth", "Country of residence", "Nationality",
               "Student status", "Employment status"]


def epic_raw(tmp_path: Path, encoding: str = "utf-8") -> Path:
    """ANN_A: 12 texts, ironic where i % 4 == 0; ANN_B: 10 texts, not ironic, text 2 repeated last as
    ironic; ANN_C: three texts."""
    def row(i, user, label):
        return [f"11237572634271866{i:02d}", f'Oh great, "another" Monday {i}\nreally', f"11237572634271800{i:02d}",
                f"Parent post {i}, with a comma", "twitter", "us", user, label, "Female", "34", "White",
                "United States", "United States", "United States", "No", "Full-Time"]
    rows = [row(i, "ANN_A", "iro" if i % 4 == 0 else "not") for i in range(12)]
    rows += [row(i, "ANN_B", "not") for i in range(10)]
    rows += [row(i, "ANN_C", "iro") for i in range(3)]
    rows.append(row(2, "ANN_B", "iro"))
    write_csv(tmp_path / "epic" / "EPICorpus.csv", EPIC_HEADER, rows, encoding=encoding)
    return tmp_path / "epic"


# ----------------------------------------------------------------------------- per task


def test_hatexplain(tmp_path):
    r = run("hatexplain", hatexplain_raw(tmp_path), tmp_path / "out")
    assert users(r) == {"203", "204", "205"} and r["_dropped"] == {"999": "3 examples (< 10)"}
    assert set(r["203"]) == {f"{1000 + i}_gab" for i in range(12)} and len(r["204"]) == 11 and "1011_gab" not in r["204"]
    assert r["203"]["1005_gab"] == {"text": "<user> post 5 café 😂", "label": ["offensive"]}  # undecided post: kept
    assert labels(r, "203")["1004_gab"] == ["normal"] and labels(r, "203")["1009_gab"] == ["hatespeech"]
    assert labels(r, "205")["1005_gab"] == ["hatespeech"] and labels(r, "205")["1006_gab"] == ["offensive"]
    assert set(sum(labels(r, "204").values(), [])) == {"normal"}
    assert r["_summary"]["labels"] == ["hatespeech", "normal", "offensive"] and r["_summary"]["kind"] == "classification"


def test_gabhate_last_row_wins(tmp_path):
    r = run("gabhate", gabhate_raw(tmp_path), tmp_path / "out")
    assert users(r) == {"4", "13"} and r["_dropped"] == {"20": "2 examples (< 10)"}
    assert len(r["4"]) == 12 and len(r["13"]) == 10
    assert labels(r, "4")["27000"] == ["Hateful"] and labels(r, "4")["27008"] == ["Hateful"]
    assert labels(r, "4")["27001"] == ["Non-hateful"]
    assert r["4"]["27001"]["text"] == 'post 1, said "hi"\nsecond line'
    assert labels(r, "13")["27003"] == ["Hateful"]       # repeated row: the last one counts (PEFT-U overwrites)
    assert labels(r, "13")["27001"] == ["Hateful"] and labels(r, "13")["27005"] == ["Non-hateful"]


def test_gabhate_bad_label(tmp_path):
    raw = tmp_path / "g"
    write_csv(raw / "GabHateCorpus_annotations.tsv", GAB_HEADER, [gab_row(1, "4", "x", 2)], delimiter="\t")
    with pytest.raises(DataFormatError, match=r"line 2 \(ID=1, Annotator=4\), field 'Hate': got '2'"):
        peft_u.read_gabhate(raw)


def _mhs_expectations(r: dict) -> None:
    assert users(r) == {"10001", "10002"} and r["_dropped"] == {"10003": "4 examples (< 10)"}
    assert set(r["10001"]) == {str(47777 + i) for i in range(12)} and len(r["10002"]) == 10
    assert labels(r, "10001")["47781"] == ["1"] and labels(r, "10001")["47782"] == ["2"]
    assert labels(r, "10001")["47779"] == ["2"] and labels(r, "10001")["47780"] == ["0"]
    assert labels(r, "10002")["47777"] == ["1"]          # repeated (comment, annotator): the last row counts
    assert labels(r, "10002")["47778"] == ["2"] and labels(r, "10002")["47783"] == ["0"]
    assert r["10001"]["47777"]["text"] == "comment 47777 ✓"


def test_measuringhatespeech_from_save_to_disk_via_cli(tmp_path, capsys):
    mhs_dataset().save_to_disk(str(tmp_path / "mhs"))
    assert data_main(["prepare", "peft-u", "--task", "measuringhatespeech", "--raw", str(tmp_path / "mhs"),
                      "--out", str(tmp_path / "out")]) == 0
    assert "3 users read, 2 kept, 1 dropped" in capsys.readouterr().out
    _mhs_expectations(read_out(tmp_path / "out"))


def test_measuringhatespeech_other_copies_give_the_same_file(tmp_path, monkeypatch):
    import datasets

    ds = mhs_dataset()
    ds.save_to_disk(str(tmp_path / "ref"))
    peft_u.prepare("measuringhatespeech", tmp_path / "ref", tmp_path / "o_ref")
    expected = (tmp_path / "o_ref" / "user_data_leaked.json").read_bytes()
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    (tmp_path / "snap" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "snap" / "data" / "train-00000-of-00001.parquet"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    calls, real = [], datasets.load_dataset

    def load_dataset(path, *args, **kwargs):  # the Hub cache holds the dataset; packaged builders stay real
        calls.append(path)
        return ds if path == "ucberkeley-dlab/measuring-hate-speech" and kwargs == {"split": "train"} else real(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for raw, name in ((tmp_path / "dict", "o_dict"), (tmp_path / "snap", "o_snap"), (None, "o_hub")):
        peft_u.prepare("measuringhatespeech", raw, tmp_path / name)
        assert (tmp_path / name / "user_data_leaked.json").read_bytes() == expected, name
    assert calls == ["parquet", "ucberkeley-dlab/measuring-hate-speech"]  # --raw first, the Hub cache last
    _mhs_expectations(read_out(tmp_path / "o_hub"))


def test_measuringhatespeech_nowhere_and_bad_columns(tmp_path, monkeypatch):
    import datasets

    def offline(*_a, **_k):
        raise ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    (tmp_path / "empty").mkdir()
    with pytest.warns(UserWarning, match="trying the Hugging Face cache"), pytest.raises(ConfigError) as err:
        peft_u.prepare("measuringhatespeech", tmp_path / "empty", tmp_path / "out")
    msg = str(err.value)
    for part in ("ucberkeley-dlab/measuring-hate-speech", str(tmp_path / "empty"), "save_to_disk", "*.parquet",
                 "OfflineModeIsEnabled", "HF_HUB_OFFLINE", "huggingface.co/datasets/ucberkeley-dlab/measuring-hate-speech"):
        assert part in msg, part
    mhs_dataset(drop="hatespeech").save_to_disk(str(tmp_path / "nohs"))
    with pytest.raises(DataFormatError, match=r"field 'hatespeech'.*missing: hatespeech"):
        peft_u.prepare("measuringhatespeech", tmp_path / "nohs", tmp_path / "out")
    mhs_dataset(rows=[(1, 2, 1.5)]).save_to_disk(str(tmp_path / "half"))
    with pytest.raises(DataFormatError, match=r"row 0 \(comment_id=1, annotator_id=2\), field 'hatespeech': got 1.5"):
        peft_u.prepare("measuringhatespeech", tmp_path / "half", tmp_path / "out")


def test_unhealthyconversations_first_row_wins(tmp_path):
    r = run("unhealthyconversations", unhealthy_raw(tmp_path), tmp_path / "out")
    assert users(r) == {"45136546", "44577732"} and r["_dropped"] == {"20109169": "3 examples (< 10)"}
    assert len(r["45136546"]) == 12 and len(r["44577732"]) == 10
    assert labels(r, "45136546")["2319000"] == ["unhealthy"] and labels(r, "45136546")["2319009"] == ["unhealthy"]
    assert labels(r, "45136546")["2319001"] == ["healthy"]
    assert labels(r, "44577732")["2319004"] == ["unhealthy"]  # repeated (unit, worker): the first row counts
    assert r["44577732"]["2319005"] == {"text": 'Well, "that" is rich, comment 5.', "label": ["healthy"]}


def test_wikidetox(tmp_path):
    r = run("wikidetox", wikidetox_raw(tmp_path), tmp_path / "out")
    assert users(r) == {"1362", "2408"} and r["_dropped"] == {"77": "2 examples (< 10)"}
    assert len(r["1362"]) == 12 and len(r["2408"]) == 11 and "37675" not in r["2408"]
    assert labels(r, "1362")["37675"] == ["Aggressive"] and labels(r, "1362")["38175"] == ["Aggressive"]
    assert labels(r, "1362")["37775"] == ["Normal"]
    assert labels(r, "2408")["37975"] == ["Aggressive"]   # repeated (rev_id, worker): the first annotation counts
    assert labels(r, "2408")["38075"] == ["Normal"]
    assert r["1362"]["37775"]["text"] == "NEWLINE_TOKENThis is ``creative`` 1.TAB_TOKENok"  # as distributed


def test_wikidetox_unknown_rev_id(tmp_path):
    raw = wikidetox_raw(tmp_path)
    with (raw / "aggression_annotations.tsv").open("a", encoding="utf-8") as f:
        f.write("999\t1362\t0.0\t0.0\n")
    with pytest.raises(DataFormatError, match=r"rev_id=999, worker_id=1362.*aggression_annotated_comments.tsv"):
        peft_u.read_wikidetox(raw)


def test_goemotion_ekman_mapping_neutral_and_first_kept(tmp_path, capsys):
    raw = goemotion_raw(tmp_path)
    assert data_main(["prepare", "peft-u", "--task", "goemotion", "--raw", str(raw), "--out", str(tmp_path / "out")]) == 0
    assert "3 users read, 2 kept, 1 dropped (fewer than 10 examples): 8" in capsys.readouterr().out  # rater 5: none
    r = read_out(tmp_path / "out")
    assert users(r) == {"37", "61"} and r["_dropped"] == {"8": "2 examples (< 10)"}
    assert set(r["37"]) == {f"e{i}" for i in range(13)} - {"e3"} and set(r["61"]) == {f"e{i}" for i in range(11)} - {"e3"}
    got = labels(r, "37")
    assert got["e0"] == ["joy"]                            # admiration + amusement, merged; the later 'anger' row ignored
    assert got["e1"] == ["anger", "disgust", "sadness"]     # grief -> sadness, sorted
    assert got["e2"] == ["surprise"]                        # the neutral row skipped, the later one kept
    assert got["e7"] == ["anger", "sadness"] and got["e9"] == ["joy", "surprise"] and got["e5"] == ["fear"]
    assert labels(r, "61")["e4"] == ["sadness"] and labels(r, "61")["e5"] == ["surprise"]
    assert r["37"]["e4"]["text"] == 'That\'s "e4", so funny 😂'
    b = PeftUBenchmark(_config(tmp_path / "out", tmp_path, "goemotion"))
    assert b.task().kind == "multilabel" and b.task().labels == ("anger", "disgust", "fear", "joy", "sadness", "surprise")


def test_cockamamie_word_ids_and_overwrites(tmp_path):
    r = run("cockamamie", cockamamie_raw(tmp_path), tmp_path / "out")
    assert users(r) == {"W1", "W2"} and r["_dropped"] == {"W3": "2 examples (< 10)"}
    assert set(r["W1"]) == {str(i) for i in range(12)} and set(r["W2"]) == {str(i) for i in range(10)}
    assert r["W1"]["0"] == {"text": "gobbledegook", "label": ["no"]}  # listed again later: the later vote counts
    assert r["W2"]["1"] == {"text": "cockamamie", "label": ["yes"]}   # in both lists: yes (read after no)
    assert labels(r, "W1")["1"] == ["no"] and r["W1"]["3"] == {"text": "table", "label": ["no"]}
    assert r["W1"]["2"]["text"] == "nincompoop" and labels(r, "W1")["4"] == ["yes"] and labels(r, "W1")["5"] == ["no"]
    assert r["W1"]["11"]["text"] == "word11" and labels(r, "W2")["9"] == ["no"]


def test_epic_text_pair_and_last_row_wins(tmp_path):
    r = run("epic", epic_raw(tmp_path), tmp_path / "out")
    assert users(r) == {"ANN_A", "ANN_B"} and r["_dropped"] == {"ANN_C": "3 examples (< 10)"}
    assert len(r["ANN_A"]) == 12 and len(r["ANN_B"]) == 10
    assert r["ANN_A"]["1123757263427186604"] == {
        "text": 'message: "Parent post 4, with a comma"\n\nreply: "Oh great, "another" Monday 4\nreally"', "label": ["Ironic"]}
    assert labels(r, "ANN_A")["1123757263427186605"] == ["Non-ironic"]
    assert labels(r, "ANN_B")["1123757263427186602"] == ["Ironic"]   # repeated: the last row counts
    assert labels(r, "ANN_B")["1123757263427186603"] == ["Non-ironic"]
    bom = epic_raw(tmp_path / "bom", encoding="utf-8-sig")   # a byte-order mark (pandas ignores it) changes nothing
    peft_u.prepare("epic", bom, tmp_path / "out_bom")
    assert (tmp_path / "out_bom" / "user_data_leaked.json").read_bytes() == (tmp_path / "out" / "user_data_leaked.json").read_bytes()


@pytest.mark.parametrize("task, build, missing, source", [
    ("hatexplain", hatexplain_raw, "dataset.json", "github.com/hate-alert/HateXplain"),
    ("gabhate", gabhate_raw, "GabHateCorpus_annotations.tsv", "osf.io/edua3"),
    ("unhealthyconversations", unhealthy_raw, "unhealthy_full.csv", "github.com/conversationai/unhealthy-conversations"),
    ("wikidetox", wikidetox_raw, "aggression_annotations.tsv", "Wikipedia_Talk_Labels_Aggression"),
    ("wikidetox", wikidetox_raw, "aggression_annotated_comments.tsv", "figshare"),
    ("goemotion", goemotion_raw, "ekman_mapping.json", "goemotions/data/ekman_mapping.json"),
    ("goemotion", goemotion_raw, "goemotions_2.csv", "storage.googleapis.com/gresearch/goemotions"),
    ("cockamamie", cockamamie_raw, "cockamamie.json", "github.com/limorigu/Cockamamie-Gobbledegook"),
    ("epic", epic_raw, "EPICorpus.csv", "Multilingual-Perspectivist-NLU/EPIC"),
])
def test_missing_raw_file_names_it_and_its_source(tmp_path, capsys, task, build, missing, source):
    raw = build(tmp_path)
    (raw / missing).unlink()
    with pytest.raises(ConfigError) as err:
        peft_u.prepare(task, raw, tmp_path / "out")
    assert str(raw / missing) in str(err.value) and "does not exist" in str(err.value) and source in str(err.value)
    assert data_main(["prepare", "peft-u", "--task", task, "--raw", str(raw), "--out", str(tmp_path / "out")]) == 2
    assert missing in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_registry_lists_13_tasks_with_config_labels():
    expected = {
        "hatexplain": ("hatespeech", "normal", "offensive"), "gabhate": ("Hateful", "Non-hateful"),
        "measuringhatespeech": ("0", "1", "2"), "tweeteval": ("Hateful", "Non-hateful"),
        "unhealthyconversations": ("healthy", "unhealthy"), "wikidetox": ("Aggressive", "Normal"),
        "goemotion": ("anger", "disgust", "fear", "joy", "sadness", "surprise"),
        "studemo": ("anger", "anticipation", "arousal", "disgust", "fear", "joy", "sadness", "surprise", "trust", "valence"),
        "cockamamie": ("no", "yes"), "epic": ("Ironic", "Non-ironic"),
        "subjectivediscourse_response": ("answer", "answer_overans-sway", "cant-answer-lying", "cant-answer-sincere",
                                         "shift-correct", "shift-dodge"),
        "subjectivediscourse_question_sentiment": ("negative", "neutral", "positive", "somewhat-negative",
                                                   "somewhat-positive", "very-negative", "very-positive"),
        "subjectivediscourse_response_sentiment": ("negative", "neutral", "positive", "somewhat-negative",
                                                   "somewhat-positive", "very-negative", "very-positive"),
    }
    assert PeftUBenchmark.tasks == expected and set(peft_u.PREPARE_TASKS) == set(expected)
    assert {t for t, spec in peft_u.TASKS.items() if spec.multi_label} == {"goemotion", "studemo"}
    assert set(peft_u.INSTRUCTIONS) == set(expected) and all(len(v) > 60 for v in peft_u.INSTRUCTIONS.values())
    assert peft_u.INSTRUCTIONS["epic"].startswith("Irony is a figurative language device")
    with pytest.raises(ConfigError, match=r"needs a task.*cockamamie \(one label: no, yes\)"):
        PeftUBenchmark(Config.from_dict({"data": {"benchmark": "peft-u"}}))
    with pytest.raises(SystemExit):  # the CLI accepts exactly these tasks
        data_main(["prepare", "peft-u", "--task", "interpersonal", "--out", "x"])


def _config(path, tmp_path: Path, task: str) -> Config:
    return Config.from_dict({"data": {"benchmark": f"peft-u/{task}", "path": str(path), "cache_dir": str(tmp_path / "cache")}})
