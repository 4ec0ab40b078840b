"""Strategies without Ray: the split, aggregation, and the real client code on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedpeft.config import Config, ConfigError
from fedpeft.federation.client_calls import run_train, user_model
from fedpeft.federation.messages import Request
from fedpeft.federation.store import AdapterStore
from fedpeft.learning.models import adapter_state, get_model
from fedpeft.learning.schedule import round_lr
from fedpeft.strategies import STRATEGIES, get_strategy_class, make_strategy
from fedpeft.strategies.base import Strategy, flower_aggregator


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Messages built outside a running Flower app need a task identity, as run_simulation sets one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def reply(state: dict[str, np.ndarray], n: int) -> Message:
    content = RecordDict({"shared": ArrayRecord(torch_state_dict={k: torch.tensor(v, dtype=torch.float32) for k, v in state.items()}),
                          "metrics": MetricRecord({"num-examples": float(n)})})
    return Message(content=content, dst_node_id=1, message_type="train")


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(ConfigError) as err:
        get_strategy_class("fedmagic")
    for name in ["fedmagic", *STRATEGIES]:
        assert name in str(err.value)


def test_all_design_strategies_are_registered():
    assert set(STRATEGIES) >= {"local_only", "oppu", "fedavg", "fedavg_ft", "fedper", "fedrep", "fedsa", "ffa", "feddpa"}


def test_fedavg_aggregation_is_example_weighted_mean():
    rng = np.random.default_rng(0)
    clients = [{k: rng.normal(size=(3, 2)) for k in ("w", "b")} for _ in range(3)]
    counts = [5, 1, 14]
    reference = {k: sum(c[k] * n for c, n in zip(clients, counts)) / sum(counts) for k in ("w", "b")}
    shared = {"w": torch.zeros(3, 2), "b": torch.zeros(3, 2)}
    out = Strategy(Config()).aggregate(1, shared, [reply(c, n) for c, n in zip(clients, counts)])
    for k in reference:
        np.testing.assert_allclose(out[k].numpy(), reference[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["fedadam", "fedyogi"])
def test_server_optimizers_come_from_flower_and_move_towards_the_mean(optimizer):
    cfg = Config()
    cfg.federation.server_optimizer = optimizer
    assert type(flower_aggregator(cfg)).__name__.lower() == optimizer
    shared = {"w": torch.zeros(4)}
    out = Strategy(cfg).aggregate(1, shared, [reply({"w": np.ones(4)}, 3), reply({"w": 3 * np.ones(4)}, 1)])
    step = out["w"].numpy()
    assert np.all(step > 0) and np.all(step < 1.5)  # an adaptive step towards the mean (1.5), not the mean itself
    assert not np.allclose(step, 1.5)


def test_cohort_sampling_is_deterministic_and_sized():
    cfg = Config()
    cfg.federation.cohort_fraction = 0.3
    s = Strategy(cfg)
    users = list(range(20))
    first = s.sample_cohort(users, 1)
    assert len(first) == 6 and first == s.sample_cohort(users, 1)
    assert first != s.sample_cohort(users, 2) or first != s.sample_cohort(users, 3)
    cfg.federation.cohort_size = 4
    assert len(s.sample_cohort(users, 2)) == 4


def test_lr_schedules():
    cfg = Config()
    cfg.train.lr, cfg.train.lr_min_factor = 1.0, 0.1
    assert round_lr(cfg, 3, 5) == 1.0
    cfg.train.lr_schedule = "linear"
    assert [round(round_lr(cfg, r, 3), 6) for r in (1, 2, 3)] == [1.0, 0.55, 0.1]
    cfg.train.lr_schedule = "cosine"
    assert round_lr(cfg, 1, 5) == pytest.approx(1.0) and round_lr(cfg, 5, 5) == pytest.approx(0.1)


# ---- the real client code, in process, on a tiny random BERT ---------------------------------

def tiny_config(tiny_bert, tmp_path, strategy: str, **strategy_opts) -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_bert)
    cfg.federation.strategy = strategy
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.test_per_user = 4, 8, 4
    cfg.train.steps, cfg.train.batch_size = 2, 4
    cfg.output.store_dir = str(tmp_path / strategy)
    cfg.strategy.fedper_layers = 1
    for k, v in strategy_opts.items():
        setattr(cfg.strategy, k, v)
    return cfg


def initial_shared(cfg: Config) -> dict[str, torch.Tensor]:
    strategy = make_strategy(cfg)
    loaded = get_model(cfg, 3, strategy.extra_adapters)
    return {k: loaded.init_state[k] for k in strategy.shared_keys(loaded.adapter_keys)}


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_server_receives_only_shared_keys(name, tiny_bert, tmp_path):
    """The privacy invariant, for every strategy and each of its phases, on real client calls."""
    cfg = tiny_config(tiny_bert, tmp_path, name)
    strategy = make_strategy(cfg)
    shared = initial_shared(cfg)
    keys = get_model(cfg, 3, strategy.extra_adapters).adapter_keys
    for server_round, phase in enumerate(strategy.phases(), start=1):
        sent, stats, _ = run_train(Request(cfg, server_round, phase.name, shared), user_index=0)
        expected = {k for k in keys if strategy.is_shared(k, phase.name)}
        assert set(sent) == expected, phase.name
        assert stats["num-examples"] == 8
        stored = set(AdapterStore(cfg.output.store_dir).latest("user0000")[1])
        assert not stored & expected  # private store and message never overlap


def test_local_only_shares_nothing_and_fedavg_everything(tiny_bert, tmp_path):
    for name, share_all in (("local_only", False), ("fedavg", True)):
        cfg = tiny_config(tiny_bert, tmp_path, name)
        keys = get_model(cfg, 3).adapter_keys
        assert bool(make_strategy(cfg).shared_keys(keys)) == share_all
        assert len(make_strategy(cfg).shared_keys(keys)) == (len(keys) if share_all else 0)


def test_ffa_keeps_lora_a_identical_across_users_and_unchanged(tiny_bert, tmp_path):
    from fedpeft.learning.models import build_model

    cfg = tiny_config(tiny_bert, tmp_path, "ffa")
    shared = initial_shared(cfg)
    init = dict(get_model(cfg, 3).init_state)
    a_keys = [k for k in init if ".lora_A." in k]
    rebuilt = build_model(cfg, 3).init_state  # a second, separate build (another user's process builds its own)
    assert all(torch.equal(rebuilt[k], init[k]) for k in a_keys)
    other_seed = Config.from_dict({**cfg.to_dict(), "seed": cfg.seed + 1})
    assert not all(torch.equal(build_model(other_seed, 3).init_state[k], init[k]) for k in a_keys)  # not vacuous
    assert a_keys and not set(a_keys) & set(shared)
    for user in (0, 1):
        sent, _, _ = run_train(Request(cfg, 1, "federated", shared), user)
        assert not set(a_keys) & set(sent)
        after = adapter_state(get_model(cfg, 3))
        for k in a_keys:
            assert torch.equal(after[k], init[k]), k
        b = next(k for k in sent if ".lora_B." in k)
        assert not torch.equal(sent[b], shared[b])  # B did train


def test_fedsa_round_makes_a_identical_and_keeps_b_personal(tiny_bert, tmp_path):
    cfg = tiny_config(tiny_bert, tmp_path, "fedsa")
    strategy = make_strategy(cfg)
    shared = initial_shared(cfg)
    replies = []
    for user in (0, 1, 2):
        sent, stats, _ = run_train(Request(cfg, 1, "federated", shared), user)
        replies.append(reply({k: v.numpy() for k, v in sent.items()}, int(stats["num-examples"])))
    new_shared = strategy.aggregate(1, shared, replies)
    states = []
    for user in (0, 1, 2):
        loaded, _ = user_model(Request(cfg, 2, "federated", new_shared, private_round=1), user)
        states.append(adapter_state(loaded))
    a = [k for k in states[0] if ".lora_A." in k]
    b = [k for k in states[0] if ".lora_B." in k]
    for k in a:
        assert torch.equal(states[0][k], states[1][k]) and torch.equal(states[1][k], states[2][k])
    assert any(not torch.equal(states[0][k], states[1][k]) for k in b)


def test_fedrep_trains_head_then_body(tiny_bert, tmp_path):
    cfg = tiny_config(tiny_bert, tmp_path, "fedrep")
    shared = initial_shared(cfg)
    assert shared and not any("classifier" in k for k in shared)
    _, stats, _ = run_train(Request(cfg, 1, "federated", shared), 0)
    assert stats["steps"] == 4 and "head_loss" in stats  # 2 head steps + 2 body steps


def test_incompatible_split_is_refused_with_the_strategies_that_fit(tiny_bert, tmp_path):
    cfg = tiny_config(tiny_bert, tmp_path, "fedper")
    keys = get_model(cfg, 3).adapter_keys
    cfg.strategy.fedper_layers = 0
    with pytest.raises(ConfigError) as err:
        make_strategy(cfg).check_compatible(keys)
    assert "fedper" in str(err.value) and "fedsa" in str(err.value) and "local_only" in str(err.value)
    cfg.strategy.fedper_layers = 99
    with pytest.raises(ConfigError, match="every adapter layer"):
        make_strategy(cfg).check_compatible(keys)
    no_lora = [k for k in keys if "classifier" in k]
    for name in ("fedsa", "ffa", "feddpa", "oppu"):
        cfg.federation.strategy = name
        with pytest.raises(ConfigError, match="LoRA") as err:
            make_strategy(cfg).check_compatible(no_lora)
        assert "local_only" in str(err.value)


def test_fedprox_term_keeps_the_update_closer_to_the_global_state(tiny_bert, tmp_path):
    from fedpeft.data import get_benchmark
    from fedpeft.learning.models import build_model, load_adapter_state
    from fedpeft.learning.training import train_user

    cfg = tiny_config(tiny_bert, tmp_path, "fedavg")
    cfg.train.steps, cfg.train.lr = 6, 0.05
    bench = get_benchmark(cfg)
    loaded = build_model(cfg, 3)
    anchor = dict(loaded.init_state)

    def distance(mu: float) -> float:
        load_adapter_state(loaded, anchor)
        train_user(loaded, bench.load_user(0).train, bench.task(), cfg, seed=1, anchor=anchor, mu=mu)
        state = adapter_state(loaded)
        return float(sum(((state[k] - anchor[k]) ** 2).sum() for k in anchor))

    assert distance(mu=50.0) < distance(mu=0.0)
