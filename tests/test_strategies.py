import numpy as np
import pytest
import torch

from fedpeft.config import Config, ConfigError
from strategies import STRATEGIES, get_strategy_class, make_strategy
from strategies.base import Strategy

KEYS = ["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight",
        "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight",
        "base_model.model.classifier.weight"]


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        get_strategy_class("fedmagic")
    assert "fedmagic" in str(err.value)
    for name in STRATEGIES:
        assert name in str(err.value)


def test_local_only_shares_nothing():
    strategy = make_strategy(Config())
    shared, private = strategy.split({k: torch.zeros(1) for k in KEYS})
    assert shared == {} and list(private) == KEYS
    assert not strategy.shares_anything


def test_fedavg_aggregation_is_example_weighted_mean():
    rng = np.random.default_rng(0)
    clients = [{k: rng.normal(size=(3, 2)) for k in ("w", "b")} for _ in range(3)]
    counts = [5, 1, 14]
    reference = {k: sum(c[k] * n for c, n in zip(clients, counts)) / sum(counts) for k in ("w", "b")}
    shared = {"w": torch.zeros(3, 2), "b": torch.zeros(3, 2)}
    results = [({k: torch.tensor(v, dtype=torch.float32) for k, v in c.items()}, n) for c, n in zip(clients, counts)]
    out = Strategy(Config()).aggregate(shared, results)
    for k in reference:
        np.testing.assert_allclose(out[k].numpy(), reference[k], rtol=1e-6, atol=1e-6)


def test_cohort_sampling_is_deterministic_and_sized():
    cfg = Config()
    cfg.federation.cohort_fraction = 0.3
    s = Strategy(cfg)
    users = list(range(20))
    first = s.sample_cohort(users, 1)
    assert len(first) == 6 and first == s.sample_cohort(users, 1)
    assert set(first) <= set(users)
    cfg.federation.cohort_size = 4
    assert len(s.sample_cohort(users, 2)) == 4
