"""Every strategy x server optimiser agrees with the plain reference in tests/round_reference.py.

The simulation (FederatedRun on the in-process grid, replies handed back scrambled, the real
ClientApp) and the reference run the same config and seeds: 6 users, 3 rounds, half of them per
round. The final shared state, every user's stored private state and every user's scores agree.
"""

from __future__ import annotations

import csv

import pytest
import torch
from safetensors.torch import load_file

from fedpeft.config import Config
from fedpeft.federation.checkpoint import final_adapter
from fedpeft.strategies import STRATEGIES
from tests.inprocess_grid import run_in_process
from tests.round_reference import run_reference

OPTIMIZERS = ("fedavg", "fedprox", "fedadam")


def config(tiny_bert, tmp_path, strategy: str, optimizer: str) -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_bert)
    cfg.federation.strategy, cfg.federation.rounds, cfg.federation.cohort_fraction = strategy, 3, 0.5
    cfg.federation.server_optimizer, cfg.federation.proximal_mu, cfg.federation.server_lr = optimizer, 1.0, 0.05
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.test_per_user = 6, 8, 8
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = 3, 4, 0.05  # 3 steps != 1 epoch (2 batches)
    cfg.strategy.fedper_layers, cfg.strategy.oppu_task_rounds, cfg.strategy.finetune_epochs = 1, 1, 1
    cfg.strategy.feddpa_mix = 0.3  # a mix other than the plain sum
    cfg.output.dir, cfg.output.name, cfg.output.progress = str(tmp_path), f"{strategy}-{optimizer}", False
    return cfg


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_simulation_equals_the_reference(strategy, optimizer, tiny_bert, tmp_path):
    cfg = config(tiny_bert, tmp_path, strategy, optimizer)
    _, run = run_in_process(cfg, reply_order_seed=7)
    expected = run_reference(config(tiny_bert, tmp_path, strategy, optimizer))

    shared_file = run / "shared_final.safetensors"
    shared = load_file(shared_file) if shared_file.is_file() else {}
    assert shared.keys() == expected.shared.keys()
    for key, value in expected.shared.items():
        torch.testing.assert_close(shared[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"shared {k}: {m}")

    for user, state in expected.private.items():
        stored = final_adapter(run, user) or {}
        assert stored.keys() == state.keys(), user
        for key, value in state.items():
            torch.testing.assert_close(stored[key], value, rtol=1e-5, atol=1e-6, msg=lambda m, k=key, u=user: f"{u} {k}: {m}")

    with (run / "per_user.csv").open() as f:
        rows = {r["user_id"]: r for r in csv.DictReader(f)}
    for user, scores in expected.scores.items():
        assert rows[user]["status"] == "ok"
        for metric, value in scores.items():
            assert float(rows[user][metric]) == pytest.approx(value, abs=1e-9), (user, metric)


def test_the_comparison_can_fail(tiny_bert, tmp_path):
    """The reference is sensitive: the server optimiser and the split change what it computes."""
    runs = {opt: run_reference(config(tiny_bert, tmp_path, "fedsa", opt)) for opt in OPTIMIZERS}
    key = next(iter(runs["fedavg"].shared))
    assert not torch.equal(runs["fedavg"].shared[key], runs["fedadam"].shared[key])
    assert not torch.equal(runs["fedavg"].shared[key], runs["fedprox"].shared[key])
    other = run_reference(config(tiny_bert, tmp_path, "ffa", "fedavg"))
    assert runs["fedavg"].shared.keys() != other.shared.keys()
