"""The ClientApp: one Flower virtual node = one user of the benchmark.

A call reads its user from the message (each user is one node for the whole run), takes the backbone from the per-process cache,
loads the adapter (common init, then the shared part from the message, then the user's private
part from the adapter store), trains or evaluates, writes the private part back and replies
with the shared part only. An exception marks this user failed in the reply; the run goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft import models
from fedpeft.config import Config
from fedpeft.data import Benchmark, get_benchmark
from fedpeft.files import storage_failure
from fedpeft.messages import Request, make_reply, read_request
from fedpeft.privacy import clip_shared_update
from fedpeft.scoring import score
from fedpeft.store import OWNER_FILE, AdapterStore, StoreError, store_owner, timeout_note
from fedpeft.strategies import make_strategy
from fedpeft.strategies.base import NEW_USERS
from fedpeft.training import call_seed, round_lr, train_user

app = ClientApp()
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("flwr").setLevel(logging.ERROR)  # actor start/stop chatter
_THREADS_SET = False
_RUNS_SEEN: set[str] = set()  # runs whose store and data this worker process has seen


def _setup_threads(config: Config) -> None:
    global _THREADS_SET
    if not _THREADS_SET:
        torch.set_num_threads(max(1, int(config.ray.client_cpus)))
        _THREADS_SET = True


def check_worker_sees_run(config: Config, run_id: str) -> None:
    """At a worker's first call of a run: it must see the driver's adapter store (the store's
    owner file names this run) and the files the driver prepared (the processed-data cache)."""
    if run_id in _RUNS_SEEN:
        return
    where = f"this worker ({socket.gethostname()}, pid {os.getpid()})"
    owner = store_owner(config.output.store_dir)
    if owner is None or owner.get("run_id") != run_id:
        why = f"no {OWNER_FILE} there" if owner is None else f"it belongs to run {owner.get('run_id')}"
        raise StoreError(f"{where} does not see this run's adapter store {config.output.store_dir} ({why}). "
                         "output.store_dir must be on a file system every Ray node mounts, at the same path.")
    missing = [f for f in owner.get("driver_files", []) if not os.path.exists(f)]
    if missing:
        raise StoreError(f"{where} does not see the data the driver prepared: {', '.join(missing)}. data.cache_dir "
                         "(and data.path) must be on a file system every Ray node mounts, at the same path.")
    _RUNS_SEEN.add(run_id)


@functools.lru_cache(maxsize=8)
def _user_ids(bench: Benchmark) -> tuple[str, ...]:
    """The benchmark's user ids, read once per worker process (benchmarks are cached objects)."""
    return tuple(bench.user_ids())


def user_id_of(config: Config, user_index: int) -> str:
    return _user_ids(get_benchmark(config))[user_index]


def worker_model(config: Config) -> models.LoadedModel:
    """This worker process's cached backbone with the run's adapters (built on first use)."""
    return models.get_model(config, len(get_benchmark(config).task().labels), make_strategy(config).extra_adapters)


def user_model(request: Request, user_index: int) -> tuple[models.LoadedModel, str]:
    """The cached model holding this user's adapter: common init < shared part < private part
    (the private part of exactly the round the server expects)."""
    config = request.config
    loaded = worker_model(config)
    user_id = _user_ids(get_benchmark(config))[user_index]
    private = AdapterStore(config.output.store_dir, request.run_id).load(user_id, request.private_round)
    models.compose_user_model(loaded, request.shared, private)
    return loaded, user_id


def run_train(request: Request, user_index: int) -> tuple[dict[str, torch.Tensor], dict[str, float], str]:
    """Train one user for one round; the private part goes to the store, the shared part is returned."""
    if request.phase == NEW_USERS:
        return run_new_user(request, user_index)
    config, shared = request.config, request.shared
    strategy = make_strategy(config)
    phases = strategy.phases()
    phase = next(p for p in phases if p.name == request.phase)
    loaded, user_id = user_model(request, user_index)
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
    if config.privacy.mechanism == "client" and new_shared:  # the update from what the server sent, bounded here
        new_shared = clip_shared_update(new_shared, request.shared, config.privacy.clipping_norm)
    stats.update(store_private(request, user_id, private, phase.name, len(user.train)))
    return new_shared, stats, user_id


def store_private(request: Request, user_id: str, private: dict[str, torch.Tensor], phase: str, n_train: int) -> dict[str, float]:
    """Write the user's private part of this round to the store; returns the reply's size stats."""
    store = AdapterStore(request.config.output.store_dir, request.run_id)
    store.save(user_id, private, request.server_round, phase, previous_round=request.private_round)
    return {"num-examples": float(n_train), "private_bytes": float(store.bytes_stored(user_id, request.server_round))}


def run_new_user(request: Request, user_index: int) -> tuple[dict[str, torch.Tensor], dict[str, float], str]:
    """A new user (``data.new_users``), once, after the last round: on top of the final shared part
    (the message's), train what :meth:`Strategy.new_user_keys` names on its own training split for
    ``federation.new_user_epochs`` epochs (0: the last phase's local budget of one round), and
    store all of it as the user's private part. Nothing goes up."""
    config = request.config
    strategy = make_strategy(config)
    last = strategy.phases()[-1]
    loaded, user_id = user_model(request, user_index)
    strategy.configure_model(loaded, last.name)
    bench = get_benchmark(config)
    user = bench.load_user(user_index)
    trained = set(strategy.new_user_keys(loaded.adapter_keys))
    epochs = config.federation.new_user_epochs or last.epochs
    result = train_user(loaded, user.train, bench.task(), config, call_seed(config, user_index, request.server_round),
                        trainable=trained.__contains__, epochs=epochs, lr=config.train.lr)
    private = {k: v for k, v in models.adapter_state(loaded).items() if k in trained}
    stats = {"train_loss": result["train_loss"], "steps": result["steps"], "examples_processed": result["examples"],
             **store_private(request, user_id, private, NEW_USERS, len(user.train))}
    return {}, stats, user_id


def run_evaluate(request: Request, user_index: int) -> tuple[dict[str, float], dict[str, list[str] | str], str]:
    """Score one user's personalised model (private + current shared) on its own test split and,
    in the same call, on its validation split: test metrics under their plain names, validation
    ones as ``val_<metric>`` (none for a user without validation examples, ``n_val`` 0). The
    predictions returned are the test split's."""
    config = request.config
    strategy = make_strategy(config)
    loaded, user_id = user_model(request, user_index)
    strategy.configure_model(loaded, request.phase)
    bench = get_benchmark(config)
    user = bench.load_user(user_index)
    if not user.test:
        raise ValueError(f"user '{user_id}' has an empty test split")
    task = bench.task()
    preds = strategy.predict(loaded, user, task)
    scores = score(task.kind, preds, [list(ex.labels) for ex in user.test], labels=task.labels or None)
    scores["n_test"] = float(len(user.test))
    scores["n_val"] = float(len(user.val))
    scores["n_train"] = float(len(user.train))
    if user.val:  # the same model: predict() reads a user's test split, so hand it the validation split as one
        val_preds = strategy.predict(loaded, dataclasses.replace(user, test=user.val), task)
        val_scores = score(task.kind, val_preds, [list(ex.labels) for ex in user.val], labels=task.labels or None)
        scores.update({f"val_{name}": value for name, value in val_scores.items()})
    outputs = {"sample_ids": [ex.id for ex in user.test], "predictions": preds,
               "golds": json.dumps([list(ex.labels) for ex in user.test])}
    return scores, outputs, user_id


@contextlib.contextmanager
def call_deadline(request: Request, user_index: int, kind: str) -> Iterator[None]:
    """Bound one call by ``federation.call_timeout``: past it, a watchdog leaves a note in the
    store (why this call failed) and ends the worker process, whose state a hung call may have
    left broken. Ray replaces the process (fedpeft starts actors with max_restarts), the server
    reads the note and records the user's failure for the round."""
    seconds = request.config.federation.call_timeout

    def end_process() -> None:
        with contextlib.suppress(OSError):
            timeout_note(request.config.output.store_dir, request.run_id, user_index, kind, request.server_round).write_text(
                f"the call ran longer than federation.call_timeout={seconds:g} s; its worker process was ended and replaced")
        print(f"fedpeft: a {kind} call of user {user_index} ran longer than federation.call_timeout={seconds:g} s; "
              "ending this worker process so that Ray replaces it", file=sys.stderr, flush=True)
        os._exit(70)

    watchdog = threading.Timer(seconds, end_process)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()


def _handle(message: Message, context: Context, work) -> Message:
    """Run ``work`` for this node's user; any exception becomes a 'failed' reply."""
    started, index, user_id, request = time.time(), -1, "", None
    worker = {"pid": float(os.getpid()), "partition_id": -1.0}
    try:
        request = read_request(message)
        index = request.user  # the server names the user; the node is that user's for the whole run
        worker["partition_id"] = float(index)
        _setup_threads(request.config)
        with call_deadline(request, index, message.metadata.message_type):
            check_worker_sees_run(request.config, request.run_id)
            user_id = user_id_of(request.config, index)
            metrics, info, shared = work(request, index)
        metrics = {**metrics, **worker, "failed": 0.0, "seconds": time.time() - started, "backbone_loads": float(models.BACKBONE_LOADS)}
        return make_reply(message, metrics, {"user_id": user_id, "error": "", **info}, shared=shared)
    except Exception as err:  # noqa: BLE001 - a failing user is reported, the run goes on
        metrics = {**worker, "failed": 1.0, "seconds": time.time() - started, "backbone_loads": float(models.BACKBONE_LOADS)}
        error = traceback.format_exc(limit=4)
        storage = storage_failure(err, request.config.output.store_dir if request else "the adapter store")
        if storage:  # the storage's fault, not the user's: the server stops the run (fedpeft.server_app.StorageFailure)
            metrics["storage_errno"] = float(storage[0])
            error += f"{socket.gethostname()}: {storage[1]}"
        return make_reply(message, metrics, {"user_id": user_id, "error": error}, shared={})


@app.query()
def query(message: Message, context: Context) -> Message:
    """Discovery: a worker's first call checks it sees the run (in ``_handle``) and builds its
    model now, so that a node that cannot load it stops the run before training, and the load
    is not counted in round 1."""
    def work(request: Request, index: int):
        worker_model(request.config)
        return {}, {}, None

    return _handle(message, context, work)


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
