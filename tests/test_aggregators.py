"""Flower's other aggregators (federation.aggregator) and server optimizers (fedavgm, fedadagrad).

Each one, through fedpeft's aggregation path (Strategy.aggregate), equals Flower's own strategy
class driven as Flower drives it (configure_train, then aggregate_train) on the same updates;
median and trimmed mean also equal a plain numpy computation; the combinations that make no sense
are refused before start; and one in-process run with aggregator=median on fedsa goes end to end.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy

from fedpeft.config import Config, ConfigError
from fedpeft.config_load import build_config
from fedpeft.federation.aggregation import check_aggregator
from fedpeft.strategies.base import Strategy
from tests.inprocess_grid import InProcessGrid, run_in_process

SHAPES = {"layer.0.lora_A.weight": (3, 2), "bias": (4,), "cube": (2, 2, 2)}  # the order the replies carry
COUNTS = [5, 1, 14, 7, 3]
LOSSES = [0.9, 2.5, 0.3, 1.1, 1.7]


@pytest.fixture(autouse=True)
def flower_task_identity():
    """Messages built outside a running Flower app need a task identity, as run_simulation sets one."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0


def updates(seed: int, n: int = len(COUNTS)) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()} for _ in range(n)]


def fedpeft_reply(state: dict[str, np.ndarray], n: int, loss: float) -> Message:
    """A reply as fedpeft's client sends it (fedpeft.federation.messages.make_reply)."""
    content = RecordDict({"metrics": MetricRecord({"num-examples": float(n), "train_loss": loss, "steps": 2.0}),
                          "info": ConfigRecord({"user_id": "u"}),
                          "shared": ArrayRecord(torch_state_dict={k: torch.from_numpy(v.copy()) for k, v in state.items()})})
    return Message(content=content, dst_node_id=1, message_type="train")


def flower_reply(state: dict[str, np.ndarray], n: int, loss: float) -> Message:
    """The same update as a plain Flower client would reply it."""
    content = RecordDict({"arrays": ArrayRecord({k: Array(v.copy()) for k, v in state.items()}),
                          "metrics": MetricRecord({"num-examples": float(n), "train_loss": loss})})
    return Message(content=content, dst_node_id=1, message_type="train")


def config_for(**federation) -> Config:
    cfg = Config()
    cfg.train.lr = 0.05
    for key, value in federation.items():
        setattr(cfg.federation, key, value)
    return cfg


def flower_strategy(cfg: Config) -> flwr_strategy.FedAvg:
    """Flower's class for the config, built here from Flower's own arguments (not fedpeft's factory)."""
    fed = cfg.federation
    return {
        "median": lambda: flwr_strategy.FedMedian(),
        "trimmed_mean": lambda: flwr_strategy.FedTrimmedAvg(beta=fed.trim_beta),
        "krum": lambda: flwr_strategy.Krum(num_malicious_nodes=fed.byzantine_users),
        "multikrum": lambda: flwr_strategy.MultiKrum(num_malicious_nodes=fed.byzantine_users,
                                                     num_nodes_to_select=fed.multikrum_keep),
        "qfedavg": lambda: flwr_strategy.QFedAvg(client_learning_rate=cfg.train.lr, q=fed.qffl_q),
        "fedavgm": lambda: flwr_strategy.FedAvgM(server_learning_rate=fed.server_lr, server_momentum=fed.server_beta1),
        "fedadagrad": lambda: flwr_strategy.FedAdagrad(eta=fed.server_lr, eta_l=cfg.train.lr, tau=fed.server_tau),
    }[fed.aggregator if fed.aggregator != "mean" else fed.server_optimizer]()


CASES = {
    "median": {"aggregator": "median"},
    "trimmed_mean": {"aggregator": "trimmed_mean", "trim_beta": 0.2},
    "krum": {"aggregator": "krum", "byzantine_users": 1},
    "multikrum": {"aggregator": "multikrum", "byzantine_users": 1, "multikrum_keep": 3},
    "qfedavg": {"aggregator": "qfedavg", "qffl_q": 2.0},
    "fedavgm": {"server_optimizer": "fedavgm", "server_lr": 0.7, "server_beta1": 0.9},
    "fedadagrad": {"server_optimizer": "fedadagrad", "server_lr": 0.05, "server_tau": 1e-3},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_aggregator_equals_flowers_own_strategy(case):
    """Three rounds (the stateful ones carry momentum / moments), a key the replies do not carry
    in fedpeft's shared part (shared in another phase: left as it is), and the shared part's keys
    in another order than the replies' (FedAvgM and q-FedAvg pair arrays by position)."""
    cfg = config_for(**CASES[case])
    rng = np.random.default_rng(7)
    start = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    other = torch.arange(3, dtype=torch.float32)
    shared = {"other.phase.key": other, **{k: torch.from_numpy(start[k]) for k in reversed(SHAPES)}}
    ours = Strategy(cfg)
    theirs = flower_strategy(cfg)
    grid = InProcessGrid(len(COUNTS))
    current = ArrayRecord({k: Array(v) for k, v in start.items()})
    for server_round in (1, 2, 3):
        sent = updates(server_round)
        replies = [fedpeft_reply(s, n, loss) for s, n, loss in zip(sent, COUNTS, LOSSES)]
        shared = ours.aggregate(server_round, shared, replies)
        theirs.configure_train(server_round, current, ConfigRecord(), grid)  # as Flower runs a round
        current, _ = theirs.aggregate_train(server_round, [flower_reply(s, n, loss) for s, n, loss in zip(sent, COUNTS, LOSSES)])
        expected = current.to_numpy_ndarrays()
        for key, value in zip(current.keys(), expected):
            np.testing.assert_allclose(shared[key].numpy(), value, rtol=1e-5, atol=1e-6, err_msg=f"{case} {key}")
        assert torch.equal(shared["other.phase.key"], other)
        assert all(len(r.content.array_records["shared"]) == len(SHAPES) for r in replies)  # replies left whole


def test_the_aggregators_are_not_the_mean():
    """The comparison above would pass for a factory that built FedAvg every time: it does not."""
    sent = updates(1)
    mean = {k: sum(s[k] * n for s, n in zip(sent, COUNTS)) / sum(COUNTS) for k in SHAPES}
    for case in CASES:
        shared = {k: torch.zeros(s) for k, s in SHAPES.items()}
        out = Strategy(config_for(**CASES[case])).aggregate(1, shared, [fedpeft_reply(s, n, x) for s, n, x in zip(sent, COUNTS, LOSSES)])
        assert not np.allclose(out["bias"].numpy(), mean["bias"], atol=1e-4), case


def sorted_stack(sent: list[dict[str, np.ndarray]], key: str) -> np.ndarray:
    values = [s[key].astype(np.float64).ravel() for s in sent]
    return np.array([sorted(column) for column in zip(*values)]).T  # per coordinate, ascending


@pytest.mark.parametrize("users", [5, 6])
def test_median_and_trimmed_mean_equal_a_plain_computation(users):
    """Per coordinate: the middle value (the mean of the two middle ones for an even count), and the
    mean after cutting floor(beta x users) values at each end; example counts play no part."""
    sent = updates(3, users)
    for aggregator, beta in (("median", 0.0), ("trimmed_mean", 0.2), ("trimmed_mean", 0.34)):
        cfg = config_for(aggregator=aggregator, trim_beta=beta)
        shared = {k: torch.zeros(s) for k, s in SHAPES.items()}
        out = Strategy(cfg).aggregate(1, shared, [fedpeft_reply(s, n, 1.0) for s, n in zip(sent, [1, 50, 2, 9, 4, 3][:users])])
        for key in SHAPES:
            column = sorted_stack(sent, key)
            if aggregator == "median":
                mid = users // 2
                want = column[mid] if users % 2 else (column[mid - 1] + column[mid]) / 2
            else:
                cut = int(beta * users)
                want = column[cut:users - cut].sum(axis=0) / (users - 2 * cut)
            np.testing.assert_allclose(out[key].numpy().ravel(), want, rtol=1e-5, atol=1e-6, err_msg=f"{aggregator} {key}")


def test_fedavgm_momentum_survives_a_checkpoint():
    """server_state / load_server_state carry FedAvgM's momentum: a resumed strategy steps as the
    uninterrupted one."""
    cfg = config_for(server_optimizer="fedavgm", server_lr=1.0, server_beta1=0.9)
    shared = {k: torch.zeros(s) for k, s in SHAPES.items()}
    replies = lambda r: [fedpeft_reply(s, n, 1.0) for s, n in zip(updates(r), COUNTS)]  # noqa: E731
    whole = Strategy(cfg)
    after_one = whole.aggregate(1, shared, replies(1))
    resumed = Strategy(cfg)
    resumed.load_server_state(whole.server_state())
    assert set(whole.server_state()) == {f"momentum/{k}" for k in SHAPES}
    want, got = whole.aggregate(2, after_one, replies(2)), resumed.aggregate(2, after_one, replies(2))
    fresh = Strategy(cfg).aggregate(2, after_one, replies(2))  # no momentum: a different step
    for key in SHAPES:
        np.testing.assert_array_equal(got[key].numpy(), want[key].numpy())
    assert not np.allclose(fresh["bias"].numpy(), want["bias"].numpy())


# ---- refusals, before start -----------------------------------------------------------------

@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean", "krum", "multikrum", "qfedavg"])
def test_privacy_with_a_non_mean_aggregator_is_refused(aggregator):
    cfg = config_for(aggregator=aggregator)
    cfg.privacy.mechanism = "central"
    with pytest.raises(ConfigError, match=rf"aggregator={aggregator} does not fit privacy.*Use federation.aggregator=mean"):
        check_aggregator(cfg, 10)


@pytest.mark.parametrize("optimizer", ["fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_a_server_optimizer_with_a_non_mean_aggregator_is_refused(optimizer):
    with pytest.raises(ConfigError, match=rf"server_optimizer={optimizer} does not fit.*aggregator=mean with.*server_optimizer=fedavg with aggregator=median"):
        check_aggregator(config_for(server_optimizer=optimizer, aggregator="median"), 10)


def test_krum_with_fewer_users_per_round_than_2f_plus_3_is_refused():
    with pytest.raises(ConfigError, match=r"byzantine_users=2 needs at least 2f \+ 3 = 7 users per round, but this run samples 6.*at most 1"):
        check_aggregator(config_for(aggregator="krum", byzantine_users=2), 6)
    check_aggregator(config_for(aggregator="krum", byzantine_users=2), 7)  # fits


def test_multikrum_keeping_more_than_users_less_f_is_refused():
    with pytest.raises(ConfigError, match=r"multikrum_keep=6 is more than .* \(7 - 2 = 5\)"):
        check_aggregator(config_for(aggregator="multikrum", byzantine_users=2, multikrum_keep=6), 7)


def test_what_fits_is_not_refused():
    check_aggregator(config_for(aggregator="median"), 1)
    check_aggregator(config_for(server_optimizer="fedadagrad"), 1)
    cfg = config_for(server_optimizer="fedavgm")
    cfg.privacy.mechanism = "central"
    check_aggregator(cfg, 2)


@pytest.mark.parametrize("override, allowed", [("federation.aggregator=mode", "mean, median, trimmed_mean"),
                                               ("federation.trim_beta=0.5", "in [0, 0.5)"),
                                               ("federation.byzantine_users=-1", ">= 0")])
def test_bad_values_are_refused_by_config_validation(override, allowed):
    with pytest.raises(ConfigError, match=f"got .*allowed: .*{allowed.replace('[', '[[]').replace('(', '[(]').replace(')', '[)]')}"):
        build_config(overrides=[tuple(override.split("="))])


# ---- one run, end to end ---------------------------------------------------------------------

def run_config(tiny_bert, tmp_path, **federation) -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_bert)
    cfg.federation.strategy, cfg.federation.rounds = "fedsa", 2
    for key, value in federation.items():
        setattr(cfg.federation, key, value)
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.test_per_user = 3, 8, 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = 2, 4, 0.05
    cfg.output.dir, cfg.output.name, cfg.output.progress = str(tmp_path), "median", False
    return cfg


def test_a_fedsa_run_with_the_median_runs_end_to_end(tiny_bert, tmp_path):
    results, run = run_in_process(run_config(tiny_bert, tmp_path, aggregator="median"))
    assert results["status"] == "ok"
    rounds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"trained"' in line]
    assert [r["trained"] for r in rounds] == [3, 3] and all(r["failed"] == 0 for r in rounds)
    assert "aggregator: median" in (run / "config.yaml").read_text()


def test_a_run_with_krum_and_too_few_users_is_refused_before_start(tiny_bert, tmp_path):
    with pytest.raises(ConfigError, match=r"needs at least 2f \+ 3 = 5 users per round, but this run samples 3"):
        run_in_process(run_config(tiny_bert, tmp_path, aggregator="krum", byzantine_users=1))
    assert not (tmp_path / "median" / "metrics.jsonl").exists()
