import pytest
import torch

from fedpeft.federation.store import AdapterStore, StoreError
from fedpeft.learning.metrics import accuracy, macro_f1, summarize


def test_store_round_trip_and_atomic(tmp_path):
    store = AdapterStore(tmp_path, run_id="run-a")
    state = {"a.lora_A.weight": torch.randn(4, 3), "head.bias": torch.arange(3.0)}
    store.save("user/01", state, 1)
    back = store.load("user/01", 1)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert store.load("user/01", 0) is None  # round 0: the user has not trained yet
    assert [p.name for p in tmp_path.iterdir()] == [store.path("user/01", 1).name]  # no temp files left
    store.save("user/01", {"x": torch.zeros(2)}, 2, previous_round=1)
    assert list(store.load("user/01", 2)) == ["x"] and list(store.load("user/01", 1)) == list(state)


def test_a_user_keeps_the_file_it_started_from_and_the_new_one(tmp_path):
    """A round that never completes must not overwrite what the last completed round left."""
    store = AdapterStore(tmp_path, run_id="run-a")
    store.save("u", {"w": torch.full((2,), 2.0)}, 2)
    store.save("u", {"w": torch.full((2,), 5.0)}, 5, previous_round=2)
    store.save("u", {"w": torch.full((2,), 7.0)}, 7, previous_round=5)
    assert store.rounds("u") == [5, 7]  # round 2 went once round 5's file was the starting point
    assert store.load("u", 5)["w"][0].item() == 5.0
    store.keep_only({"u": 5})
    assert store.rounds("u") == [5]


def test_a_file_of_another_run_or_round_is_refused(tmp_path):
    AdapterStore(tmp_path, run_id="run-a").save("u", {"w": torch.zeros(2)}, 3)
    with pytest.raises(StoreError, match="written by run run-a, not by this run"):
        AdapterStore(tmp_path, run_id="run-b").load("u", 3)
    with pytest.raises(StoreError, match="round 4 is not in the store"):
        AdapterStore(tmp_path, run_id="run-a").load("u", 4)
    stale = AdapterStore(tmp_path, run_id="run-a")
    stale.path("u", 3).rename(stale.path("u", 6))  # a copied file under the name the server expects
    with pytest.raises(StoreError, match="holds round 3 of user 'u', not round 6"):
        stale.load("u", 6)


def test_distinct_users_get_distinct_files(tmp_path):
    """'a/b' and 'a_b' (and ids differing only in case) once mapped to one file: one user read the other's adapter."""
    store = AdapterStore(tmp_path)
    ids = ["a/b", "a_b", "a b", "A_b", "a:b", ".", "..", "ü/x", "x" * 300, "a*[b]?"]
    for i, user in enumerate(ids):
        store.save(user, {"w": torch.full((2,), float(i))}, 1)
    assert len({store.path(u, 1).name.lower() for u in ids}) == len(ids)
    for i, user in enumerate(ids):
        assert store.load(user, 1)["w"][0].item() == i, user
        assert store.rounds(user) == [1], user
    assert all(store.path(u, 1).parent == tmp_path for u in ids)


def test_accuracy_counts_prediction_in_gold_set():
    assert accuracy(["a", "b", "c", "a"], [["a"], ["a", "b"], ["a"], ["b"]]) == 0.5


def test_macro_f1_by_hand():
    # label a: tp=2 fp=1 fn=0 -> 4/5 ; label b: tp=1 fp=0 fn=1 -> 2/3 ; label c: tp=0 fp=0 fn=0? c only in preds
    preds = ["a", "a", "b", "a", "c"]
    golds = [["a"], ["a"], ["b"], ["b"], ["b"]]
    # a: tp2 fp1 fn0 -> 0.8 ; b: tp1 fp0 fn2 -> 0.5 ; c: tp0 fp1 fn0 -> 0
    assert macro_f1(preds, golds) == pytest.approx((0.8 + 0.5 + 0.0) / 3)


def test_summary_over_users():
    s = summarize([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 0.0], num_failed=2)
    assert s["mean"] == pytest.approx(0.5)
    assert s["median"] == pytest.approx(0.5)
    assert s["p10"] == pytest.approx(0.1)
    assert s["min"] == 0.0
    assert (s["n_evaluated"], s["n_failed"]) == (11, 2)


def test_empty_accuracy_is_an_error():
    with pytest.raises(ValueError):
        accuracy([], [])


def test_a_worker_checks_it_sees_the_store_and_the_driver_files(tmp_path):
    from fedpeft.config import Config
    from fedpeft.federation.client_app import check_worker_sees_run
    from fedpeft.federation.store import claim_store

    cfg = Config()
    cfg.output.store_dir = str(tmp_path / "store")
    with pytest.raises(StoreError, match=r"does not see this run's adapter store .*no \.fedpeft-run\.json there"):
        check_worker_sees_run(cfg, "run-a")
    assert not (tmp_path / "store").exists()  # the check never creates a store of its own
    cache_index = tmp_path / "cache" / "index.json"
    claim_store(cfg.output.store_dir, tmp_path / "run", "run-a", [str(cache_index)])
    with pytest.raises(StoreError, match="belongs to run run-a"):
        check_worker_sees_run(cfg, "run-b")
    with pytest.raises(StoreError, match=r"does not see the data the driver prepared: .*index\.json"):
        check_worker_sees_run(cfg, "run-a")
    cache_index.parent.mkdir()
    cache_index.write_text("{}")
    check_worker_sees_run(cfg, "run-a")
