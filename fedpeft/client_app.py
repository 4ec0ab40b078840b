"""The ClientApp: one Flower virtual node = one user of the benchmark.

A call maps the node's partition id to a user, takes the backbone from the per-process cache,
loads the user's private state from the adapter store and the shared state from the message,
trains or evaluates, writes the private state back and replies with the shared part only.
An exception marks this user failed in the reply; it never stops the run.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import warnings

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft import metrics as M
from fedpeft import models
from fedpeft.config import Config
from fedpeft.data import get_benchmark
from fedpeft.messages import make_reply, read_request
from fedpeft.store import AdapterStore
from fedpeft.training import call_seed, predict, train_user
from strategies import make_strategy

app = ClientApp()
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("flwr").setLevel(logging.ERROR)  # actor start/stop chatter
_THREADS_SET = False


def _setup_threads(config: Config) -> None:
    global _THREADS_SET
    if not _THREADS_SET:
        torch.set_num_threads(max(1, int(config.ray.client_cpus)))
        _THREADS_SET = True


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def user_model(config: Config, user_index: int, shared: dict[str, torch.Tensor]):
    """The cached model with this user's state loaded: init, then private from store, then shared."""
    bench = get_benchmark(config)
    loaded = models.get_model(config, num_labels=len(bench.task().labels))
    user_id = bench.user_ids()[user_index]
    state = dict(loaded.init_state)
    stored = AdapterStore(config.output.store_dir).load(user_id)
    if stored:
        state.update(stored)
    state.update(shared)
    models.load_adapter_state(loaded, state)
    return loaded, user_id


def _worker_metrics() -> dict[str, float]:
    return {"pid": float(os.getpid()), "backbone_loads": float(models.BACKBONE_LOADS)}


def _failure(message: Message, user_index: int, user_id: str, started: float) -> Message:
    reason = traceback.format_exc(limit=3)
    metrics = {"failed": 1.0, "partition_id": float(user_index), "seconds": time.time() - started, **_worker_metrics()}
    return make_reply(message, metrics, {"user_id": user_id, "error": reason}, shared={})


@app.query()
def query(message: Message, context: Context) -> Message:
    config, _, _ = read_request(message)
    index = _partition(context)
    user_id = get_benchmark(config).user_ids()[index]
    return make_reply(message, {"partition_id": float(index)}, {"user_id": user_id})


def run_train(config: Config, user_index: int, server_round: int, shared: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float], str]:
    """Train one user for one round; the private part goes to the store, the shared part is returned."""
    strategy = make_strategy(config)
    loaded, user_id = user_model(config, user_index, shared)
    user = get_benchmark(config).load_user(user_index)
    stats = train_user(loaded, user.train, get_benchmark(config).task(), config, call_seed(config, user_index, server_round))
    new_shared, private = strategy.split(models.adapter_state(loaded))
    store = AdapterStore(config.output.store_dir)
    store.save(user_id, private, metadata={"round": str(server_round)})
    stats.update({"num-examples": float(len(user.train)), "private_bytes": float(store.bytes_stored(user_id))})
    return new_shared, stats, user_id


def run_evaluate(config: Config, user_index: int, shared: dict[str, torch.Tensor]) -> tuple[dict[str, float], dict[str, list[str]], str]:
    """Score one user's personalised model (private + current shared) on its own test split."""
    loaded, user_id = user_model(config, user_index, shared)
    bench = get_benchmark(config)
    user = bench.load_user(user_index)
    if not user.test:
        raise ValueError(f"user '{user_id}' has an empty test split")
    preds = predict(loaded, user.test, bench.task(), config)
    golds = [ex.labels for ex in user.test]
    scores = {"accuracy": M.accuracy(preds, golds), "macro_f1": M.macro_f1(preds, golds), "n_test": float(len(user.test))}
    return scores, {"sample_ids": [ex.id for ex in user.test], "predictions": preds}, user_id


@app.train()
def train(message: Message, context: Context) -> Message:
    started, index, user_id = time.time(), _partition(context), ""
    try:
        config, server_round, shared = read_request(message)
        _setup_threads(config)
        user_id = get_benchmark(config).user_ids()[index]
        new_shared, stats, user_id = run_train(config, index, server_round, shared)
        metrics = {**stats, "failed": 0.0, "partition_id": float(index), "seconds": time.time() - started, **_worker_metrics()}
        return make_reply(message, metrics, {"user_id": user_id, "error": ""}, shared=new_shared)
    except Exception:  # noqa: BLE001 - a failing user is reported, the run goes on
        return _failure(message, index, user_id, started)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    started, index, user_id = time.time(), _partition(context), ""
    try:
        config, _, shared = read_request(message)
        _setup_threads(config)
        user_id = get_benchmark(config).user_ids()[index]
        scores, outputs, user_id = run_evaluate(config, index, shared)
        metrics = {**scores, "failed": 0.0, "partition_id": float(index), "seconds": time.time() - started, **_worker_metrics()}
        return make_reply(message, metrics, {"user_id": user_id, "error": "", **outputs})
    except Exception:  # noqa: BLE001
        return _failure(message, index, user_id, started)
