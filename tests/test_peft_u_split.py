"""data.split for PEFT-U: ``by_text`` puts each text in one split for every user (PEFT-U's
no-leak variant), ``leaked`` keeps the prepared file's per-user splits. The guarantee (no user's
val or test text is in anyone's training split) is checked here with a plain reference that
shares no code with the loader, on fixtures and on the real tweeteval / studemo files."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import pytest
import yaml

from fedpeft.cli import sim_args
from fedpeft.config import Config, ConfigError
from fedpeft.data import UserData, peft_u
from fedpeft.data.peft_u import PeftUBenchmark
from fedpeft.federation.checkpoint import load_run_config, resume_config
from fedpeft.federation.run_folder import RunIdentity
from fedpeft.federation.store import claim_store
from tests.test_peft_u import peft_u_split2, tweeteval_raw

SHARED_PEFT_U = Path(__file__).resolve().parents[2] / "shared" / "data" / "peft-u"


def config(path: Path, tmp_path: Path, split: str, task: str = "tweeteval", seed: int = 0) -> Config:
    return Config.from_dict({"data": {"benchmark": f"peft-u/{task}", "path": str(path), "split": split, "seed": seed,
                                      "cache_dir": str(tmp_path / "cache")}})


def load_all(bench: PeftUBenchmark) -> dict[str, UserData]:
    """Every user the benchmark keeps (users skipped for an empty split warn; not the point here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {uid: bench.load_user(i) for i, uid in enumerate(bench.user_ids())}


def same_text(text: str) -> str:
    """The reference's own notion of one text: case and runs of whitespace do not count."""
    return " ".join(text.lower().split())


def held_out_in_train(users: dict[str, UserData]) -> tuple[int, int]:
    """(val/test examples whose text is in some user's training split, val/test examples), by brute force."""
    train_texts = [{same_text(e.text) for e in u.train} for u in users.values()]
    held = [e for u in users.values() for e in u.val + u.test]
    return sum(any(same_text(e.text) in texts for texts in train_texts) for e in held), len(held)


def peft_u_no_leak(data: dict, seed: int = 42, ratio: float = 0.8, drop_threshold: int = 10) -> dict:
    """A literal port of PEFT-U's latest data2dataset_splits(leakage=False) (module random, as its
    set_seed): sample ids sorted, shuffled, then split by _split2train_val_test (which shuffles again)."""
    def split2(samples):
        return peft_u_split2(samples, seed, ratio)

    ids = sorted({sid for samples in data.values() for sid in samples})
    random.seed(seed)
    random.shuffle(ids)
    tr, vl, ts = (set(part) for part in split2(ids))
    out = {}
    for uid, samples in data.items():
        if len(samples) < drop_threshold:
            continue
        out[uid] = {"train": {s for s in samples if s in tr}, "val": {s for s in samples if s in vl},
                    "test": {s for s in samples if s in ts}}
    return out


def shared_texts_fixture(tmp_path: Path) -> Path:
    """8 users label random subsets (27) of 30 texts; users 0-3 name them by the text's number, users
    4-7 by ids of their own and spell some with other case and spacing; each user's file splits
    are random (leaky: the same text in one user's train and another's test)."""
    rng = random.Random(5)
    texts = [f"Tweet number {i} about Something" for i in range(30)]
    users = {}
    for u in range(8):
        picked = rng.sample(range(30), 27)
        rows = []
        for i in picked:
            text = texts[i] if u < 4 or i % 2 else "  " + texts[i].upper().replace(" ", "   ") + "\n"
            rows.append((str(i) if u < 4 else f"u{u}-{i}", text, [rng.choice(["Hateful", "Non-hateful"])]))
        rng.shuffle(rows)
        users[f"user{u}"] = {"train": rows[:20], "val": rows[20:23], "test": rows[23:]}
    data = {uid: {s: {sid: {"text": t, "label": lb} for sid, t, lb in rows} for s, rows in splits.items()}
            for uid, splits in users.items()}
    path = tmp_path / "prep" / "user_data_leaked.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


def test_by_text_leaves_no_held_out_text_in_any_training_split(tmp_path):
    path = shared_texts_fixture(tmp_path)
    leaked = load_all(PeftUBenchmark(config(path, tmp_path, "leaked")))
    found, held = held_out_in_train(leaked)
    assert found > held / 2  # the fixture leaks: the check can fail
    for seed in (0, 1, 7):
        users = load_all(PeftUBenchmark(config(path, tmp_path, "by_text", seed=seed)))
        assert held_out_in_train(users)[0] == 0
        assert sorted(users) == sorted(leaked)  # every user kept, with all its examples
        for uid, user in users.items():
            ids = sorted(e.id for e in user.train + user.val + user.test)
            assert ids == sorted(e.id for e in leaked[uid].train + leaked[uid].val + leaked[uid].test)


def test_by_text_splits_texts_80_10_10_and_the_seed_picks_them(tmp_path):
    path = shared_texts_fixture(tmp_path)
    splits = {}
    for seed in (0, 1):
        users = load_all(PeftUBenchmark(config(path, tmp_path, "by_text", seed=seed)))
        splits[seed] = {s: {same_text(e.text) for u in users.values() for e in getattr(u, s)} for s in ("train", "val", "test")}
        assert [len(splits[seed][s]) for s in ("train", "val", "test")] == [24, 3, 3]  # 30 texts: max(2, 6) held, 3 val
    assert splits[0]["test"] != splits[1]["test"]


def test_split_and_its_seed_are_in_the_cache_key(tmp_path):
    path = shared_texts_fixture(tmp_path)
    folder = {(split, seed): PeftUBenchmark(config(path, tmp_path, split, seed=seed)).cache.dir
              for split in ("leaked", "by_text") for seed in (0, 1)}
    assert folder["leaked", 0] == folder["leaked", 1]  # the file's splits do not depend on data.seed
    assert len({folder["leaked", 0], folder["by_text", 0], folder["by_text", 1]}) == 3
    bench = PeftUBenchmark(config(path, tmp_path, "by_text", seed=1))
    assert bench.index()["split"] == "by_text" and bench.index()["cache_key"]["split_seed"] == 1


def test_by_text_with_seed_42_is_peft_u_no_leak_split(tmp_path):
    raw = tweeteval_raw(tmp_path, n_tweets=40)
    peft_u.prepare("tweeteval", raw, tmp_path / "prep")  # writes PEFT-U's leaked file; annotator M_3 dropped
    users = load_all(PeftUBenchmark(config(tmp_path / "prep", tmp_path, "by_text", seed=42)))
    expected = peft_u_no_leak(peft_u.read_tweeteval(raw))
    assert {u: {s: {e.id for e in getattr(d, s)} for s in ("train", "val", "test")} for u, d in users.items()} == expected


def test_data_split_is_a_peft_u_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data.split='leaked' applies to the peft-u/<task> benchmark only"):
        sim_args(["data.split=leaked"])


def _old_run_folder(tmp_path: Path, benchmark: str, path: str = "") -> Path:
    """A run folder written before data.split existed: its config.yaml has no data.split."""
    cfg = Config()
    cfg.data.benchmark, cfg.data.path = benchmark, path
    saved = cfg.to_dict()
    del saved["data"]["split"]
    run = tmp_path / "runs" / "old"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"fedpeft_version": "0", **saved}, sort_keys=False))
    identity = RunIdentity.new()  # a run that started (run.json, its store), killed before its first round
    identity.write(run)
    claim_store(run / "adapters", run, identity.run_id, [])
    return run


def test_an_old_peft_u_run_resumes_on_the_split_it_trained_on(tmp_path):
    run = _old_run_folder(tmp_path, "peft-u/tweeteval", str(tmp_path / "prep"))
    assert load_run_config(run).data.split == "leaked"
    assert resume_config(run, [], []).data.split == "leaked"
    synthetic = _old_run_folder(tmp_path / "s", "synthetic")  # no split to keep: the default, which check_data_keys accepts
    assert load_run_config(synthetic).data.split == "by_text"


@pytest.mark.skipif(not SHARED_PEFT_U.is_dir(), reason="the real PEFT-U files (../shared/data/peft-u) are absent")
@pytest.mark.parametrize("task", ["tweeteval", "studemo"])
def test_real_files_by_text_leak_nothing_and_are_peft_u_no_leak_split(task, tmp_path):
    raw = SHARED_PEFT_U / task
    peft_u.prepare(task, raw, tmp_path / "prep")
    leaked = load_all(PeftUBenchmark(config(tmp_path / "prep", tmp_path, "leaked", task=task)))
    found, held = held_out_in_train(leaked)
    assert found >= {"tweeteval": 1.0, "studemo": 0.4}[task] * held  # PEFT-U's own split: held-out texts others trained on
    for seed in (0, 42):
        users = load_all(PeftUBenchmark(config(tmp_path / "prep", tmp_path, "by_text", task=task, seed=seed)))
        assert held_out_in_train(users)[0] == 0 and len(users) == len(leaked)
    expected = peft_u_no_leak(peft_u.read_raw(task, raw))
    assert {u: {s: {e.id for e in getattr(d, s)} for s in ("train", "val", "test")} for u, d in users.items()} == expected
