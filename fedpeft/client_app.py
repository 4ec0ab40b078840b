"""The ClientApp: one Flower virtual node = one user of the benchmark.

A call maps the node's partition id to a user, takes the backbone from the per-process cache,
loads the adapter (common init, then the shared part from the message, then the user's private
part from the adapter store), trains or evaluates, writes the private part back and replies
with the shared part only. An exception marks this user failed in the reply; the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
import warnings

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft import models
from fedpeft.config import Config
from fedpeft.data import get_benchmark
from fedpeft.messages import Request, make_reply, read_request
from fedpeft.scoring import score
from fedpeft.store import AdapterStore
from fedpeft.training import call_seed, round_lr, train_user
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


def user_model(config: Config, user_index: int, shared: dict[str, torch.Tensor]) -> tuple[models.LoadedModel, str]:
    """The cached model holding this user's adapter: common init < shared part < private part."""
    bench = get_benchmark(config)
    loaded = models.get_model(config, len(bench.task().labels), make_strategy(config).extra_adapters)
    user_id = bench.user_ids()[user_index]
    models.compose_user_model(loaded, shared, AdapterStore(config.output.store_dir).load(user_id))
    return loaded, user_id


def run_train(request: Request, user_index: int) -> tuple[dict[str, torch.Tensor], dict[str, float], str]:
    """Train one user for one round; the private part goes to the store, the shared part is returned."""
    config, shared = request.config, request.shared
    strategy = make_strategy(config)
    phases = strategy.phases()
    phase = next(p for p in phases if p.name == request.phase)
    loaded, user_id = user_model(config, user_index, shared)
    strategy.configure_model(loaded, phase.name)
    bench = get_benchmark(config)
    user = bench.load_user(user_index)
    lr = round_lr(config, request.server_round, sum(p.rounds for p in phases))
    # FedProx anchors the keys shared in this phase only: a private key is the user's own
    anchor = {k: v for k, v in shared.items() if strategy.is_shared(k, phase.name)}
    mu = config.federation.proximal_mu if config.federation.server_optimizer == "fedprox" else 0.0
    processed = 0.0

    def train(trainable=lambda key: True, epochs=None):
        nonlocal processed
        result = train_user(loaded, user.train, bench.task(), config,
                            call_seed(config, user_index, request.server_round), trainable=trainable, epochs=epochs,
                            lr=lr, anchor=anchor if mu > 0 else None, mu=mu)
        processed += result["examples"]
        return result

    stats = strategy.local_train(train, phase)
    stats["examples_processed"] = processed  # forward + backward passes over examples, all passes of the call
    new_shared, private = strategy.split(models.adapter_state(loaded), phase.name)
    store = AdapterStore(config.output.store_dir)
    store.save(user_id, private, metadata={"round": str(request.server_round), "phase": phase.name})
    stats.update({"num-examples": float(len(user.train)), "private_bytes": float(store.bytes_stored(user_id))})
    return new_shared, stats, user_id


def run_evaluate(request: Request, user_index: int) -> tuple[dict[str, float], dict[str, list[str] | str], str]:
    """Score one user's personalised model (private + current shared) on its own test split."""
    config = request.config
    strategy = make_strategy(config)
    loaded, user_id = user_model(config, user_index, request.shared)
    strategy.configure_model(loaded, request.phase)
    bench = get_benchmark(config)
    user = bench.load_user(user_index)
    if not user.test:
        raise ValueError(f"user '{user_id}' has an empty test split")
    task = bench.task()
    preds = strategy.predict(loaded, user, task)
    scores = score(task.kind, preds, [list(ex.labels) for ex in user.test], labels=task.labels or None)
    scores["n_test"] = float(len(user.test))
    outputs = {"sample_ids": [ex.id for ex in user.test], "predictions": preds,
               "golds": json.dumps([list(ex.labels) for ex in user.test])}
    return scores, outputs, user_id


def _handle(message: Message, context: Context, work) -> Message:
    """Run ``work`` for this node's user; any exception becomes a 'failed' reply."""
    started, index, user_id = time.time(), int(context.node_config["partition-id"]), ""
    worker = {"pid": float(os.getpid()), "partition_id": float(index)}
    try:
        request = read_request(message)
        _setup_threads(request.config)
        user_id = get_benchmark(request.config).user_ids()[index]
        metrics, info, shared = work(request, index)
        metrics = {**metrics, **worker, "failed": 0.0, "seconds": time.time() - started, "backbone_loads": float(models.BACKBONE_LOADS)}
        return make_reply(message, metrics, {"user_id": user_id, "error": "", **info}, shared=shared)
    except Exception:  # noqa: BLE001 - a failing user is reported, the run goes on
        metrics = {**worker, "failed": 1.0, "seconds": time.time() - started, "backbone_loads": float(models.BACKBONE_LOADS)}
        return make_reply(message, metrics, {"user_id": user_id, "error": traceback.format_exc(limit=4)}, shared={})


@app.query()
def query(message: Message, context: Context) -> Message:
    return _handle(message, context, lambda request, index: ({}, {}, None))


@app.train()
def train(message: Message, context: Context) -> Message:
    def work(request: Request, index: int):
        shared, stats, _ = run_train(request, index)
        return stats, {}, shared

    return _handle(message, context, work)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    def work(request: Request, index: int):
        scores, outputs, _ = run_evaluate(request, index)
        return scores, outputs, None

    return _handle(message, context, work)
