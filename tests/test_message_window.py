"""The message window (how many messages are in flight at once) never changes a run's results:
per_user.csv and shared_final.safetensors are byte-identical with one message at a time, a small
window and a whole round at once, replies handed back scrambled (the real ClientApp, in process)."""

from __future__ import annotations

import pytest
from flwr.app import ArrayRecord

from fedpeft.config import Config
from fedpeft.federation.messages import array_bytes, make_content, record_bytes, shared_record
from tests.inprocess_grid import run_in_process


def config(tiny_bert, tmp_path, window: int, nodes: int = 0) -> Config:
    cfg = Config()
    cfg.model.name = str(tiny_bert)
    cfg.federation.strategy, cfg.federation.rounds, cfg.federation.cohort_size = "fedsa", 3, 4
    cfg.federation.eval_fraction, cfg.federation.message_window, cfg.federation.num_nodes = 0.5, window, nodes
    cfg.data.num_users, cfg.data.train_per_user, cfg.data.test_per_user = 7, 8, 4
    cfg.train.steps, cfg.train.batch_size = 2, 4
    cfg.output.dir, cfg.output.name, cfg.output.progress = str(tmp_path), f"window-{window}-nodes-{nodes}", False
    return cfg


@pytest.mark.parametrize("window, nodes", [(1, 0), (3, 0), (0, 2)])
def test_results_do_not_depend_on_the_message_window_or_the_nodes(window, nodes, tiny_bert, tmp_path):
    """7 users: one node each with the whole round at once; 2 nodes (window 1), 6 (window 3) or
    2 (set) carry them otherwise."""
    _, whole = run_in_process(config(tiny_bert, tmp_path, 0), reply_order_seed=3)
    _, windowed = run_in_process(config(tiny_bert, tmp_path, window, nodes), reply_order_seed=5)
    for name in ("per_user.csv", "shared_final.safetensors"):
        assert (windowed / name).read_bytes() == (whole / name).read_bytes(), name


def test_bytes_are_counted_without_deserialising(tiny_bert, tmp_path):
    import torch

    shared = {"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.bfloat16), "c": torch.arange(4)}
    record = shared_record(shared)
    content = make_content("{}", 1, record)
    assert record_bytes(record) == sum(a.numpy().nbytes for a in record.values()) == 15 * 4 + 7 * 4 + 4 * 8
    assert array_bytes(content) == record_bytes(record) and record_bytes(ArrayRecord()) == 0


@pytest.mark.slow
def test_a_ray_run_with_a_small_window_equals_the_in_process_run(tiny_bert, tmp_path, ray_shutdown):
    from fedpeft.cli import sim_args
    from fedpeft.sim import main
    from tests.conftest import tiny_args

    args = tiny_args(tiny_bert, tmp_path, "ray", "--strategy", "fedavg", "federation.cohort_size=4",
                     "federation.message_window=2")
    assert main(args) == 0
    cfg, _ = sim_args(tiny_args(tiny_bert, tmp_path, "inprocess", "--strategy", "fedavg", "federation.cohort_size=4",
                                "federation.message_window=0"))
    _, inprocess = run_in_process(cfg, reply_order_seed=1)
    for name in ("per_user.csv", "shared_final.safetensors"):
        assert (tmp_path / "ray" / name).read_bytes() == (inprocess / name).read_bytes(), name


def test_nodes_are_one_per_user_up_to_twice_the_window():
    from fedpeft.federation.server_app import simulated_nodes

    cfg = Config()
    assert cfg.federation.message_window == 64 and cfg.federation.num_nodes == 0
    assert [simulated_nodes(cfg, n) for n in (1, 20, 128, 15000)] == [1, 20, 128, 128]
    cfg.federation.message_window = 0  # a whole round at once: one node per user
    assert simulated_nodes(cfg, 15000) == 15000
    cfg.federation.num_nodes = 300
    assert [simulated_nodes(cfg, n) for n in (20, 15000)] == [20, 300]
