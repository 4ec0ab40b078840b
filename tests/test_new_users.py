"""New users (data.new_users), capped training splits (data.max_train_per_user) and evaluation bytes.

The new users' models are checked against tests/round_reference.py, which writes the protocol out
on its own: a new user never trains in a round, then takes the final shared part, trains the last
phase's private keys (fedavg: everything) with train_user from the common init, and is scored.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedpeft.config import Config, ConfigError
from fedpeft.data import get_benchmark
from fedpeft.federation.checkpoint import final_adapter
from fedpeft.strategies import STRATEGIES
from tests.inprocess_grid import run_in_process
from tests.round_reference import run_reference


def config(tiny_bert, tmp_path, strategy: str, name: str = "") -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_bert)
    cfg.federation.strategy, cfg.federation.rounds, cfg.federation.cohort_fraction = strategy, 2, 0.5
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.test_per_user, cfg.data.new_users = 6, 8, 8, 2
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = 3, 4, 0.05
    cfg.strategy.fedper_layers, cfg.strategy.oppu_task_rounds, cfg.strategy.finetune_epochs = 1, 1, 1
    cfg.output.dir, cfg.output.name, cfg.output.progress = str(tmp_path), name or strategy, False
    return cfg


def per_user(run) -> dict[str, dict[str, str]]:
    with (run / "per_user.csv").open() as f:
        return {r["user_id"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_new_users_equal_the_reference(strategy, tiny_bert, tmp_path):
    results, run = run_in_process(config(tiny_bert, tmp_path, strategy), reply_order_seed=3)
    expected = run_reference(config(tiny_bert, tmp_path, strategy))
    assert len(expected.new_users) == 2

    rows = per_user(run)
    assert sorted(u for u, r in rows.items() if r["group"] == "new") == expected.new_users
    for user in expected.new_users:
        assert rows[user]["rounds_trained"] == "0"  # never in a cohort
        assert int(rows[user]["examples_processed"]) == expected.new_examples[user] > 0  # the fine-tune counts
    shared_file = run / "shared_final.safetensors"
    shared = load_file(shared_file) if shared_file.is_file() else {}
    for key, value in expected.shared.items():
        torch.testing.assert_close(shared[key], value, rtol=1e-5, atol=1e-6)
    for user, state in expected.private.items():
        stored = final_adapter(run, user) or {}
        assert stored.keys() == state.keys(), user
        for key, value in state.items():
            torch.testing.assert_close(stored[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key, u=user: f"{u} {k}: {m}")
    for user, scores in expected.scores.items():
        assert rows[user]["status"] == "ok"
        for metric, value in scores.items():
            assert float(rows[user][metric]) == pytest.approx(value, abs=1e-9), (user, metric)

    groups = results["groups"]
    assert groups["new"]["n_evaluated"] == 2 and groups["trained"]["n_evaluated"] == 4
    assert groups["new"]["accuracy"] == pytest.approx(np.mean([expected.scores[u]["accuracy"] for u in expected.new_users]))
    assert results["summary"]["accuracy"] == pytest.approx(
        np.mean([s["accuracy"] for u, s in expected.scores.items() if u not in expected.new_users]))
    if expected.as_is:  # fedavg (and fedavg_ft): the global model as it is, beside the fine-tuned one
        for user, scores in expected.as_is.items():
            assert float(rows[user]["as_is_accuracy"]) == pytest.approx(scores["accuracy"], abs=1e-9)
        assert groups["new_as_is"]["n_evaluated"] == 2
    else:
        assert "new_as_is" not in groups and "as_is_accuracy" not in next(iter(rows.values()))
    assert strategy not in ("fedavg", "fedavg_ft") or expected.as_is


def test_new_users_are_the_same_for_every_strategy_and_refused_when_none_would_train(tiny_bert, tmp_path):
    from fedpeft.data.user_groups import new_user_indices

    a, b = config(tiny_bert, tmp_path, "fedavg"), config(tiny_bert, tmp_path, "fedsa")
    b.seed = 5  # the model seed does not move them
    assert new_user_indices(a, 6) == new_user_indices(b, 6)
    a.data.new_users = 0.5
    assert len(new_user_indices(a, 6)) == 3
    a.data.new_users = 6
    with pytest.raises(ConfigError, match="data.new_users=6 holds out 6 of the benchmark's 6 users"):
        new_user_indices(a, 6)


def test_training_cap_is_seeded_nested_and_the_same_for_every_strategy(tiny_bert, tmp_path):
    full = config(tiny_bert, tmp_path, "local_only")
    full.data.new_users = 0
    capped = {}
    for k, strategy, seed in ((6, "fedavg", 0), (6, "fedsa", 3), (3, "fedrep", 1)):
        cfg = config(tiny_bert, tmp_path, strategy)
        cfg.data.new_users, cfg.data.max_train_per_user, cfg.seed = 0, k, seed
        capped[(k, strategy)] = [get_benchmark(cfg).load_user(i) for i in range(6)]
    whole = [get_benchmark(full).load_user(i) for i in range(6)]
    for i in range(6):
        six_a, six_b, three = capped[(6, "fedavg")][i], capped[(6, "fedsa")][i], capped[(3, "fedrep")][i]
        assert [ex.id for ex in six_a.train] == [ex.id for ex in six_b.train]  # strategy and model seed: no effect
        assert len(six_a.train) == 6 and len(three.train) == 3
        ids = [ex.id for ex in whole[i].train]
        assert [ex.id for ex in six_a.train] == [x for x in ids if x in {ex.id for ex in six_a.train}]  # order kept
        assert {ex.id for ex in three.train} <= {ex.id for ex in six_a.train}  # a smaller cap is a subset
        assert six_a.test == whole[i].test and six_a.val == whole[i].val
    assert any([ex.id for ex in capped[(6, "fedavg")][i].train] != [ex.id for ex in whole[i].train][:6] for i in range(6))


def test_capped_run_reports_training_examples_and_activity(tiny_bert, tmp_path):
    cfg = config(tiny_bert, tmp_path, "local_only")
    cfg.data.max_train_per_user, cfg.data.new_users = 5, 0
    results, run = run_in_process(cfg)
    rows = per_user(run)
    assert {r["n_train"] for r in rows.values()} == {"5"} and {r["group"] for r in rows.values()} == {"trained"}
    (only,) = results["by_activity"]["trained"]  # every user has 5 examples: one bin
    assert (only["users"], only["min_examples"], only["max_examples"]) == (6, 5, 5)
    assert only["accuracy"] == pytest.approx(np.mean([float(r["accuracy"]) for r in rows.values()]))


def test_evaluation_messages_are_counted_in_bytes_down_eval(tiny_bert, tmp_path):
    cfg = config(tiny_bert, tmp_path, "fedavg")
    cfg.data.new_users, cfg.federation.rounds = 0, 3
    results, run = run_in_process(cfg)
    shared = load_file(run / "shared_final.safetensors")
    per_message = sum(v.numel() * v.element_size() for v in shared.values())
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rounds:  # eval_every=1: every round scores all 6 users, each message carrying the shared part
        assert r["bytes_down_eval"] == 6 * per_message
        assert r["bytes_down"] == r["cohort_size"] * per_message
    comm = results["communication"]
    assert comm["bytes_down_eval"] == 3 * 6 * per_message
    assert comm["bytes_total_with_eval"] == comm["bytes_total"] + comm["bytes_down_eval"]


def test_activity_bins_of_a_run_with_users_of_different_sizes(tiny_bert, tmp_path):
    cfg = config(tiny_bert, tmp_path, "local_only")
    cfg.data.new_users, cfg.data.num_users, cfg.data.train_per_user, cfg.data.train_per_user_min = 0, 9, 9, 1
    results, run = run_in_process(cfg)
    rows = per_user(run)
    sizes = {u: int(r["n_train"]) for u, r in rows.items()}
    assert len(set(sizes.values())) > 2  # the users differ in activity
    bins = results["by_activity"]["trained"]
    assert sum(b["users"] for b in bins) == 9
    for low, high in zip(bins, bins[1:]):
        assert low["max_examples"] < high["min_examples"]
    for b in bins:  # each bin's mean, by hand from per_user.csv
        inside = [float(r["accuracy"]) for u, r in rows.items() if b["min_examples"] <= sizes[u] <= b["max_examples"]]
        assert len(inside) == b["users"] and b["accuracy"] == pytest.approx(np.mean(inside))
