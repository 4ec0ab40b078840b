"""Data that used to be accepted silently: labels outside the task's, ids given twice, keys a
benchmark ignores; and the data a run used, recorded in results.json. Every bad file is written
here, in the benchmark's real format, and read by the real loader or command."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from fedpeft import data as fedpeft_data
from fedpeft.cli import sim_args
from fedpeft.config import Config, ConfigError
from fedpeft.config_load import build_config
from fedpeft.data import get_benchmark
from fedpeft.data import peft_u as pu
from fedpeft.data import peft_u_raw as raw_files
from fedpeft.data.__main__ import main as data_main
from fedpeft.data.common import DataFormatError
from fedpeft.data.lamp import LampBenchmark
from fedpeft.data.peft_u import PeftUBenchmark
from fedpeft.sim import main as sim_main
from tests.conftest import tiny_args
from tests.inprocess_grid import run_in_process
from tests.test_lamp import config as lamp_config
from tests.test_lamp import simple_questions, write_lamp

HATE = ("Hateful", "Non-hateful")


def sample(i: int, label: str) -> str:
    return json.dumps({"text": f"tweet {i}", "label": [label]})


def user_json(uid: str, labels: list[str]) -> str:
    """One user of PEFT-U's prepared form, as JSON text: 2 train, 1 val, 1 test sample."""
    s = [f'"{uid}-{i}": {sample(i, lb)}' for i, lb in enumerate(labels)]
    return f'"{uid}": {{"train": {{{s[0]}, {s[1]}}}, "val": {{{s[2]}}}, "test": {{{s[3]}}}}}'


def write_prepared(tmp_path: Path, users: list[str]) -> Path:
    """The users' JSON texts joined into one file, written as they are (a repeated key stays)."""
    path = tmp_path / "prep" / "user_data_leaked.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{" + ", ".join(users) + "}", encoding="utf-8")
    return path


def peft_u_config(path: Path, tmp_path: Path, task: str = "tweeteval", split: str = "leaked") -> Config:
    """The file's own splits unless ``split`` says otherwise."""
    return Config.from_dict({"data": {"benchmark": f"peft-u/{task}", "path": str(path), "split": split,
                                      "cache_dir": str(tmp_path / "cache")}})


GOOD = ["Hateful", "Non-hateful", "Hateful", "Non-hateful"]


# ----------------------------------------------------------------------------- labels outside the task's


def test_prepared_label_outside_the_task_is_refused_naming_user_sample_label_and_closest(tmp_path):
    path = write_prepared(tmp_path, [user_json("u1", GOOD), user_json("u2", ["Hateful", "Non-hateful", "Hateful", "Hatefull"])])
    with pytest.raises(DataFormatError) as err:
        PeftUBenchmark(peft_u_config(path, tmp_path)).user_ids()
    msg = str(err.value)
    for part in (str(path), "user 'u2', test sample 'u2-3'", "'Hatefull'", "Hateful, Non-hateful", "closest is 'Hateful'"):
        assert part in msg, (part, msg)
    # a task name of one's own keeps the file's labels (the union): 3 of them here
    own = PeftUBenchmark(peft_u_config(path, tmp_path, task="my-hate"))
    assert own.task().labels == ("Hateful", "Hatefull", "Non-hateful")


class RayStarted(AssertionError):
    """Raised by a stand-in for fedpeft.launch.ray_start.start_ray: the run got past its checks."""


def refuse_ray(monkeypatch) -> None:
    from fedpeft.launch import ray_start

    def started(*_args, **_kwargs):
        raise RayStarted("Ray was started: the refusal came too late (or never)")

    monkeypatch.setattr(ray_start, "start_ray", started)


def test_tweeteval_data_with_one_label_is_refused_before_start(tiny_bert, tmp_path, capsys, monkeypatch):
    """Before: a one-class head, loss 0.0000 and accuracy 1.0000, exit 0, without a word."""
    path = write_prepared(tmp_path, [user_json(f"u{i}", ["Hateful"] * 4) for i in range(3)])
    refuse_ray(monkeypatch)
    args = tiny_args(tiny_bert, tmp_path, "one-label", "--benchmark", "peft-u/tweeteval", f"data.path={path}",
                     f"data.cache_dir={tmp_path / 'cache'}", "data.split=leaked")
    assert sim_main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "carry only 1 label(s) ('Hateful')" in err and "the task's labels are Hateful, Non-hateful" in err, err
    assert not (tmp_path / "one-label").exists()


def test_the_label_set_is_the_tasks_whatever_the_data_holds(tmp_path):
    users = [user_json("u1", ["joy", "fear", "joy", "fear"]), user_json("u2", ["fear", "anger", "joy", "anger"])]
    bench = PeftUBenchmark(peft_u_config(write_prepared(tmp_path, users), tmp_path, task="studemo"))
    assert bench.task().labels == tuple(sorted(raw_files.STUDEMO_LABELS))  # all 10 of PEFT-U's, not the 3 found
    own = tmp_path / "own"
    own.mkdir()
    path = write_prepared(own, [user_json("u1", ["a"] * 4)])
    with pytest.raises(ConfigError, match=r"carry only 1 label\(s\) \('a'\); a task of your own takes its labels from the data"):
        PeftUBenchmark(peft_u_config(path, own, task="my-task")).task()


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])
    return path


def test_raw_tweeteval_typo_is_refused_by_the_prepare_command(tmp_path, capsys):
    rows = [[100 + i, f"tweet {i}", HATE[i % 2], HATE[(i + 1) % 2]] for i in range(12)]
    rows[4][3] = "Hatefull"
    raw = tmp_path / "raw"
    write_csv(raw / pu.TWEETEVAL_FILE, ["id", "text", "label_M_1", "label_F_2"], rows)
    out = tmp_path / "out"
    assert data_main(["prepare", "peft-u", "--task", "tweeteval", "--raw", str(raw), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for part in ("annotations_g3.csv", "line 6 (id=104)", "label_F_2", "'Hatefull'", "Hateful, Non-hateful",
                 "closest is 'Hateful'"):
        assert part in err, (part, err)
    assert not (out / pu.PREPARED_FILE).exists()


def test_raw_studemo_with_an_extra_label_column_is_refused(tmp_path, capsys):
    """StudEmo's reader takes every column after text_id, annotator_id as a label; a misspelt
    extra column ('joyy') would be a new class. The prepare step checks every label of every task."""
    raw = tmp_path / "raw"
    labels = [*pu.STUDEMO_LABELS, "joyy"]
    write_csv(raw / raw_files.STUDEMO_TEXTS, ["text_id", "text"], [[i, f"text {i}"] for i in range(12)])
    write_csv(raw / raw_files.STUDEMO_ANNOTATIONS, ["text_id", "annotator_id", *labels],
              [[i, 7, *[2.0 if lb == ("joyy" if i == 3 else "joy") else 0.0 for lb in labels]] for i in range(12)])
    out = tmp_path / "out"
    assert data_main(["prepare", "peft-u", "--task", "studemo", "--raw", str(raw), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for part in ("annotation_data.csv", "user '7', sample '3'", "'joyy'", "anger, anticipation", "closest is 'joy'"):
        assert part in err, (part, err)
    assert not (out / pu.PREPARED_FILE).exists()


# ----------------------------------------------------------------------------- ids given twice


def test_prepared_user_id_given_twice_is_refused(tmp_path):
    users = [user_json(u, GOOD) for u in ("u1", "u2", "u3")] + [user_json("u2", GOOD[::-1])]  # 4 users, 3 ids
    path = write_prepared(tmp_path, users)
    with pytest.raises(DataFormatError) as err:
        PeftUBenchmark(peft_u_config(path, tmp_path)).user_ids()
    msg = str(err.value)
    assert str(path) in msg and "user id 'u2' appears 2 times" in msg, msg


def test_prepared_sample_id_given_twice_in_a_split_is_refused(tmp_path):
    twice = f'"u1": {{"train": {{"s": {sample(0, "Hateful")}, "s": {sample(1, "Non-hateful")}}}, "val": {{}}, ' \
            f'"test": {{"t": {sample(2, "Hateful")}}}}}'
    path = write_prepared(tmp_path, [twice, user_json("u2", GOOD)])
    with pytest.raises(DataFormatError) as err:
        PeftUBenchmark(peft_u_config(path, tmp_path)).user_ids()
    assert "sample id 's' appears 2 times in user id 'u1', split 'train'" in str(err.value), str(err.value)


def test_lamp_question_id_given_twice_is_refused(tmp_path):
    questions = simple_questions(2, n_users=4)
    questions[2]["id"] = "q1"  # 4 questions, 3 ids: q1's two would be merged into one user
    folder = write_lamp(tmp_path, 2, questions, golds={"q0": "comedy", "q1": "comedy", "q3": "comedy"})
    with pytest.raises(DataFormatError) as err:
        LampBenchmark(lamp_config(folder, tmp_path, 2)).user_ids()
    msg = str(err.value)
    for part in ("dev_questions.json", "question 2", "'q1'", "already the id of question 1"):
        assert part in msg, (part, msg)


def test_lamp_gold_id_given_twice_is_refused(tmp_path):
    folder = write_lamp(tmp_path, 2, simple_questions(2, n_users=2))
    outputs = folder / "dev_outputs.json"
    golds = json.loads(outputs.read_text())
    golds["golds"].append({"id": "q0", "output": "action"})  # a second gold for q0 would replace the first
    outputs.write_text(json.dumps(golds))
    with pytest.raises(DataFormatError) as err:
        LampBenchmark(lamp_config(folder, tmp_path, 2)).user_ids()
    msg = str(err.value)
    assert "dev_outputs.json" in msg and "gold 2" in msg and "'q0'" in msg and "already the id of gold 0" in msg, msg


# ----------------------------------------------------------------------------- keys a benchmark ignores


def test_synthetic_only_key_for_peft_u_is_refused_before_anything_starts(tmp_path, capsys):
    args = ["--benchmark", "peft-u/tweeteval", f"data.path={tmp_path / 'nowhere'}", "data.num_users=5",
            "--out", str(tmp_path)]
    import tests.test_run_outputs  # noqa: F401  (registers a benchmark that subclasses synthetic, as other tests do)

    assert sim_main(args) == 2
    err = capsys.readouterr().err
    # every family that reads the key is named, the built-in one first, whatever else is registered
    assert re.search(r"data.num_users=5 applies to the synthetic( / [\w-]+)* benchmark only", err), err
    assert "fail-once-test" in err and "peft-u/tweeteval" in err and "--benchmark synthetic." in err, err
    assert "Remove data.num_users (or set it back to 20)" in err, err


def test_keys_at_their_defaults_and_keys_of_the_benchmark_itself_are_accepted(tmp_path):
    # configs/default.yaml (read by build_config) has every synthetic key at its default
    from fedpeft.launch.assemble import check_names

    check_names(build_config([], [("data.benchmark", "peft-u/tweeteval")]))
    check_names(build_config([], [("data.benchmark", "lamp/LaMP-2"), ("data.retrieval_k", "1")]))
    check_names(build_config([], [("data.num_users", "5")]))
    with pytest.raises(ConfigError, match=r"data.retrieval_k=2 applies to the lamp/<task> benchmark only"):
        check_names(build_config([], [("data.retrieval_k", "2")]))
    # the small runs of tests/test_simulation.py on PEFT-U and LaMP pass the check
    config, _ = sim_args(tiny_args(tmp_path, tmp_path, "x", "--benchmark", "peft-u/studemo", "data.path=x"))
    assert config.data.num_users == 20


# ----------------------------------------------------------------------------- what a run used


def test_results_json_records_labels_users_and_examples_per_split(tiny_bert, tmp_path):
    cfg = Config()
    cfg.model.name = str(tiny_bert)
    cfg.federation.strategy, cfg.federation.rounds = "local_only", 1
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.train_per_user_min = 4, 8, 3
    cfg.data.val_per_user, cfg.data.test_per_user, cfg.data.max_train_per_user = 2, 5, 6
    cfg.train.steps, cfg.train.batch_size = 1, 4
    cfg.output.dir, cfg.output.name, cfg.output.progress = str(tmp_path), "run", False
    results, run = run_in_process(cfg)
    bench = get_benchmark(cfg)
    users = [bench.load_user(i) for i in range(4)]  # counted from the examples themselves
    expected = {"benchmark": "synthetic", "kind": "classification", "labels": ["L0", "L1", "L2"], "users": 4,
                "examples": {s: sum(len(getattr(u, s)) for u in users) for s in ("train", "val", "test")},
                "skipped_users": 0}
    assert expected["examples"]["val"] == 8 and expected["examples"]["train"] <= 24
    assert results["data"] == expected
    assert json.loads((run / "results.json").read_text())["data"] == expected


def test_data_summary_of_peft_u_and_lamp_comes_from_their_caches(tmp_path):
    skipped = '"u9": {"train": {}, "val": {}, "test": {"x": ' + sample(9, "Hateful") + "}}"
    path = write_prepared(tmp_path, [user_json("u1", GOOD), user_json("u2", GOOD), skipped])
    with pytest.warns(UserWarning, match="skipped 1 user"):
        bench = PeftUBenchmark(peft_u_config(path, tmp_path))
        summary = fedpeft_data.data_summary(bench)
    assert summary == {"benchmark": "peft-u/tweeteval", "kind": "classification", "labels": list(HATE), "users": 2,
                       "examples": {"train": 4, "val": 2, "test": 2}, "skipped_users": 1}
    lamp = LampBenchmark(lamp_config(write_lamp(tmp_path, 2, simple_questions(2, n_users=3, n_items=4)), tmp_path, 2))
    loaded = [lamp.load_user(i) for i in range(3)]
    assert fedpeft_data.data_summary(lamp)["examples"] == {s: sum(len(getattr(u, s)) for u in loaded) for s in ("train", "val", "test")}
    assert fedpeft_data.data_summary(lamp)["users"] == 3


def test_generation_task_with_an_encoder_is_refused_before_ray(tiny_bert, tmp_path, capsys, monkeypatch):
    from tests.test_lamp import simple_questions, write_lamp

    refuse_ray(monkeypatch)
    folder = write_lamp(tmp_path, 5, simple_questions(5))
    assert sim_main(tiny_args(tiny_bert, tmp_path, "l5", "--benchmark", "lamp/LaMP-5", f"data.path={folder}",
                              f"data.cache_dir={tmp_path / 'cache'}")) == 2
    assert "generative backbone" in capsys.readouterr().err
