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
from collections.abc import Callable, Iterator

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedpeft.config import Config
from fedpeft.data import Benchmark, TaskSpec, UserData, get_benchmark
from fedpeft.federation.messages import (
    Request,
    config_from_json,
    make_bundle_reply,
    make_reply,
    read_request,
)
from fedpeft.federation.privacy import clip_shared_update
from fedpeft.federation.store import OWNER_FILE, AdapterStore, StoreError, store_owner, timeout_note
from fedpeft.files import storage_failure
from fedpeft.learning import models
from fedpeft.learning.packing import predict_packed, train_strategy_packed
from fedpeft.learning.scoring import score
from fedpeft.learning.training import call_seed, round_lr, train_user
from fedpeft.strategies import Strategy, make_strategy
from fedpeft.strategies.base import NEW_USERS

app = ClientApp()
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("flwr").setLevel(logging.ERROR)  # actor start/stop chatter
_THREADS_SET = False
_RUNS_SEEN: set[str] = set()  # runs whose store and data this worker process has seen
# one user's result of a call: (metrics, info, shared part or None); a failure is its exception
Outcome = tuple[dict[str, float], dict[str, "str | list[str]"], "dict[str, torch.Tensor] | None"]


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


def warm_up() -> None:
    """Ray's ``worker_process_setup_hook`` (:data:`fedpeft.launch.ray_start.WORKER_SETUP_HOOK`): a worker
    process, as it starts, imports this module and the model libraries its first call needs and,
    when the driver named it (:data:`fedpeft.learning.models.WARM_MODEL_ENV`), builds the run's model into
    the worker's cache, so that this overlaps the driver's preparation instead of following it.
    It never fails the worker: what does not import or build fails the worker's first call,
    which says why."""
    with contextlib.suppress(Exception):
        models.import_libraries()
        if spec := os.environ.get(models.WARM_MODEL_ENV):
            wanted = json.loads(spec)
            config = config_from_json(wanted["config"])
            _setup_threads(config)
            models.get_model(config, int(wanted["num_labels"]), tuple(wanted["extra_adapters"]))


@functools.lru_cache(maxsize=8)
def _user_ids(bench: Benchmark) -> tuple[str, ...]:
    """The benchmark's user ids, read once per worker process (benchmarks are cached objects)."""
    return tuple(bench.user_ids())


def user_id_of(config: Config, user_index: int) -> str:
    return _user_ids(get_benchmark(config))[user_index]


def worker_model(config: Config) -> models.LoadedModel:
    """This worker process's cached backbone with the run's adapters (built on first use)."""
    return models.get_model(config, len(get_benchmark(config).task().labels), make_strategy(config).extra_adapters)


def stored_private(request: Request, user_id: str, private_round: int) -> dict[str, torch.Tensor] | None:
    """The user's private part of exactly the round the server expects (None before its first)."""
    return AdapterStore(request.config.output.store_dir, request.run_id).load(user_id, private_round)


def user_model(request: Request, user_index: int) -> tuple[models.LoadedModel, str]:
    """The cached model holding this user's adapter: common init < shared part < private part."""
    loaded = worker_model(request.config)
    user_id = user_id_of(request.config, user_index)
    models.compose_user_model(loaded, request.shared, stored_private(request, user_id, request.private_round))
    return loaded, user_id


@dataclasses.dataclass
class TrainPlan:
    """What a train call does for each of its users, whether it trains them one at a time or
    packed: the strategy's local work in the phase (``local_train(train)``), the learning rate,
    the FedProx anchor, and ``split``: the trained adapter state -> (shared part sent up,
    private part stored)."""

    strategy: Strategy
    phase: str  # the phase the model is configured for
    local_train: Callable[[Callable[..., dict[str, float]]], dict[str, float]]
    lr: float
    anchor: dict[str, torch.Tensor] | None
    mu: float
    split: Callable[[dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]


def train_plan(request: Request) -> TrainPlan:
    """A round's plan, or a new user's (``data.new_users``), once, after the last round: on top
    of the final shared part (the message's), train what :meth:`Strategy.new_user_keys` names on
    its own training split for ``federation.new_user_epochs`` epochs (0: the last phase's local
    budget of one round), and store all of it as the user's private part; nothing goes up."""
    config = request.config
    strategy = make_strategy(config)
    phases = strategy.phases()
    if request.phase == NEW_USERS:
        last = phases[-1]
        trained = set(strategy.new_user_keys(worker_model(config).adapter_keys))
        epochs = config.federation.new_user_epochs or last.epochs

        def new_user(train: Callable[..., dict[str, float]]) -> dict[str, float]:
            result = train(trainable=trained.__contains__, epochs=epochs)
            return {"train_loss": result["train_loss"], "steps": result["steps"]}
        return TrainPlan(strategy, last.name, new_user, config.train.lr, None, 0.0,
                         lambda state: ({}, {k: v for k, v in state.items() if k in trained}))
    phase = next(p for p in phases if p.name == request.phase)
    # FedProx anchors the keys shared in this phase only: a private key is the user's own
    mu = config.federation.proximal_mu if config.federation.server_optimizer == "fedprox" else 0.0
    anchor = {k: v for k, v in request.shared.items() if strategy.is_shared(k, phase.name)} if mu > 0 else None

    def split(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        new_shared, private = strategy.split(state, phase.name)
        if config.privacy.mechanism == "client" and new_shared:  # the update from what the server sent, bounded here
            new_shared = clip_shared_update(new_shared, request.shared, config.privacy.clipping_norm)
        return new_shared, private
    return TrainPlan(strategy, phase.name, lambda train: strategy.local_train(train, phase),
                     round_lr(config, request.server_round, sum(p.rounds for p in phases)), anchor, mu, split)


def run_train(request: Request, user_index: int) -> tuple[dict[str, torch.Tensor], dict[str, float], str]:
    """Train one user for one round; the private part goes to the store, the shared part is returned."""
    config, plan = request.config, train_plan(request)
    loaded, user_id = user_model(request, user_index)
    plan.strategy.configure_model(loaded, plan.phase)
    bench = get_benchmark(config)
    user = bench.load_user(user_index)
    processed = 0.0

    def train(trainable=lambda key: True, epochs=None, anchor=plan.anchor, mu=plan.mu):
        nonlocal processed  # anchor, mu: a strategy's own proximal term for this pass (ditto's personal update)
        result = train_user(loaded, user.train, bench.task(), config,
                            call_seed(config, user_index, request.server_round), trainable=trainable, epochs=epochs,
                            lr=plan.lr, anchor=anchor, mu=mu)
        processed += result["examples"]
        return result

    stats = plan.local_train(train)
    new_shared, stats = finish_training(request, plan, user_id, models.adapter_state(loaded), stats, processed, len(user.train))
    return new_shared, stats, user_id


def run_train_packed(request: Request) -> list[Outcome]:
    """Train a packed call's users together (:func:`fedpeft.learning.packing.train_strategy_packed`), each
    as :func:`run_train` would; one outcome per user, in the message's order: (stats, {}, shared)
    or the exception that failed that user alone."""
    config, plan = request.config, train_plan(request)
    loaded = worker_model(config)
    plan.strategy.configure_model(loaded, plan.phase)
    bench = get_benchmark(config)
    outcomes, ready = packed_users(request, loaded)
    packed = train_strategy_packed(plan.local_train, loaded, [r.state for r in ready], [r.user.train for r in ready],
                                   bench.task(), config, [call_seed(config, r.index, request.server_round) for r in ready],
                                   lrs=plan.lr, anchors=plan.anchor, mu=plan.mu)
    for r, out in zip(ready, packed):
        try:
            if out.error is not None:
                raise out.error
            new_shared, stats = finish_training(request, plan, r.user_id, out.state, out.result, out.processed, len(r.user.train))
            outcomes[r.slot] = (stats, {}, new_shared)
        except Exception as err:  # noqa: BLE001 - this user's failure only
            outcomes[r.slot] = err
    return outcomes


def finish_training(request: Request, plan: TrainPlan, user_id: str, state: dict[str, torch.Tensor],
                    stats: dict[str, float], processed: float, n_train: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """A trained user's tail: split its state, store the private part, count its work."""
    stats["examples_processed"] = processed  # forward + backward passes over examples, all passes of the call
    new_shared, private = plan.split(state)
    stats.update(store_private(request, user_id, private, request.phase, n_train))
    return new_shared, stats


def store_private(request: Request, user_id: str, private: dict[str, torch.Tensor], phase: str, n_train: int) -> dict[str, float]:
    """Write the user's private part of this round to the store; returns the reply's size stats."""
    store = AdapterStore(request.config.output.store_dir, request.run_id)
    store.save(user_id, private, request.server_round, phase, previous_round=request.private_round)
    return {"num-examples": float(n_train), "private_bytes": float(store.bytes_stored(user_id, request.server_round))}


@dataclasses.dataclass
class PackedUser:
    slot: int  # its place in the message
    index: int
    user_id: str
    user: UserData
    state: dict[str, torch.Tensor]  # its composed adapter state


def packed_users(request: Request, loaded: models.LoadedModel,
                 check: Callable[[str, UserData], None] | None = None) -> tuple[list[Outcome], list[PackedUser]]:
    """A packed call's users that can run (their data loads, ``check(user_id, user)`` passes, their
    stored private part reads), each with its composed state; the others' outcomes are their errors."""
    config = request.config
    bench = get_benchmark(config)
    outcomes: list[Outcome] = [RuntimeError("not run")] * len(request.users)
    ready = []
    for slot, (index, private_round) in enumerate(zip(request.users, request.private_rounds)):
        try:
            user_id, user = user_id_of(config, index), bench.load_user(index)
            if check is not None:
                check(user_id, user)
            private = stored_private(request, user_id, private_round)
            ready.append(PackedUser(slot, index, user_id, user, models.composed_state(loaded, request.shared, private)))
        except Exception as err:  # noqa: BLE001 - this user's failure only
            outcomes[slot] = err
    return outcomes, ready


def evaluation(task: TaskSpec, user: UserData, preds: list[str], val_preds: list[str] | None) -> Outcome:
    """A scored user's reply: test metrics under their plain names, validation ones as
    ``val_<metric>`` (none for a user without validation examples, ``n_val`` 0), the test
    split's predictions."""
    scores = score(task.kind, preds, [list(ex.labels) for ex in user.test], labels=task.labels or None)
    scores["n_test"] = float(len(user.test))
    scores["n_val"] = float(len(user.val))
    scores["n_train"] = float(len(user.train))
    if val_preds is not None:
        val_scores = score(task.kind, val_preds, [list(ex.labels) for ex in user.val], labels=task.labels or None)
        scores.update({f"val_{name}": value for name, value in val_scores.items()})
    outputs = {"sample_ids": [ex.id for ex in user.test], "predictions": preds,
               "golds": json.dumps([list(ex.labels) for ex in user.test])}
    return scores, outputs, None


def check_test_split(user_id: str, user: UserData) -> None:
    if not user.test:
        raise ValueError(f"user '{user_id}' has an empty test split")


def run_evaluate(request: Request, user_index: int) -> Outcome:
    """Score one user's personalised model (private + current shared) on its own test split and,
    in the same call, on its validation split (:func:`evaluation`)."""
    config = request.config
    strategy = make_strategy(config)
    loaded, user_id = user_model(request, user_index)
    strategy.configure_model(loaded, request.phase)
    bench = get_benchmark(config)
    user = bench.load_user(user_index)
    check_test_split(user_id, user)
    task = bench.task()
    preds = strategy.predict(loaded, user, task)
    # the same model: predict() reads a user's test split, so hand it the validation split as one
    val_preds = strategy.predict(loaded, dataclasses.replace(user, test=user.val), task) if user.val else None
    return evaluation(task, user, preds, val_preds)


def run_evaluate_packed(request: Request) -> list[Outcome]:
    """Score a packed call's users together (:func:`fedpeft.learning.packing.predict_packed`: their test
    splits, then their validation splits), each as :func:`run_evaluate` would."""
    config = request.config
    loaded = worker_model(config)
    make_strategy(config).configure_model(loaded, request.phase)
    task = get_benchmark(config).task()
    outcomes, ready = packed_users(request, loaded, check_test_split)
    states = [r.state for r in ready]
    test = predict_packed(loaded, states, [r.user.test for r in ready], task, config)
    val = predict_packed(loaded, states, [r.user.val for r in ready], task, config)
    for r, preds, val_preds in zip(ready, test, val):
        outcomes[r.slot] = evaluation(task, r.user, preds, val_preds if r.user.val else None)
    return outcomes


@contextlib.contextmanager
def call_deadline(request: Request, kind: str) -> Iterator[None]:
    """Bound one call by ``federation.call_timeout`` per user it carries: past it, a watchdog
    leaves a note in the store for each of its users (why this call failed) and ends the worker
    process, whose state a hung call may have left broken. Ray replaces the process (fedpeft
    starts actors with max_restarts), the server reads the notes and records the users' failures
    for the round."""
    seconds = request.config.federation.call_timeout * len(request.users)
    who = f"user {request.user}" if len(request.users) == 1 else f"users {', '.join(map(str, request.users))}"
    per_user = "" if len(request.users) == 1 else f" per user ({len(request.users)} users in the call: {seconds:g} s)"

    def end_process() -> None:
        for user in request.users:
            with contextlib.suppress(OSError):
                timeout_note(request.config.output.store_dir, request.run_id, user, kind, request.server_round).write_text(
                    f"the call ran longer than federation.call_timeout={request.config.federation.call_timeout:g} s{per_user}; "
                    "its worker process was ended and replaced")
        print(f"fedpeft: a {kind} call of {who} ran longer than federation.call_timeout="
              f"{request.config.federation.call_timeout:g} s{per_user}; ending this worker process so that Ray replaces it",
              file=sys.stderr, flush=True)
        os._exit(70)

    watchdog = threading.Timer(seconds, end_process)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        watchdog.cancel()


def _reply_part(index: int, user_id: str, outcome: Outcome | Exception, seconds: float,
                store_dir: str) -> tuple[dict[str, float], dict[str, str | list[str]], dict[str, torch.Tensor] | None]:
    """One user's (metrics, info, shared) in a reply: its outcome, or its failure."""
    worker = {"pid": float(os.getpid()), "partition_id": float(index)}
    loads = float(models.BACKBONE_LOADS)
    if not isinstance(outcome, Exception):
        metrics, info, shared = outcome
        return ({**metrics, **worker, "failed": 0.0, "seconds": seconds, "backbone_loads": loads},
                {"user_id": user_id, "error": "", **info}, shared)
    metrics = {**worker, "failed": 1.0, "seconds": seconds, "backbone_loads": loads}
    error = "".join(traceback.format_exception(outcome, limit=4))
    storage = storage_failure(outcome, store_dir)
    if storage:  # the storage's fault, not the user's: the server stops the run (fedpeft.federation.server_app.StorageFailure)
        metrics["storage_errno"] = float(storage[0])
        error += f"{socket.gethostname()}: {storage[1]}"
    return metrics, {"user_id": user_id, "error": error}, {}


def _handle(message: Message, context: Context, work: Callable[[Request, int], Outcome],
            work_packed: Callable[[Request], list[Outcome]] | None = None) -> Message:
    """Run ``work`` for the message's user, or ``work_packed`` for a packed call's users (one
    outcome each, an exception for a user that failed alone); an exception that escapes fails
    every user of the call. Each user's failure is reported in the reply; the run goes on."""
    started, request, users, user_ids = time.time(), None, (-1,), [""]
    try:
        request = read_request(message)
        users = request.users  # the server names the users; a node is only a transport
        user_ids = [""] * len(users)
        _setup_threads(request.config)
        with call_deadline(request, message.metadata.message_type):
            check_worker_sees_run(request.config, request.run_id)
            user_ids = [user_id_of(request.config, index) for index in users]
            if len(users) == 1:
                outcomes = [work(request, users[0])]
            elif work_packed is None:
                raise ValueError(f"a {message.metadata.message_type} call takes one user; this one names {len(users)}")
            else:
                outcomes = work_packed(request)
    except Exception as err:  # noqa: BLE001 - a failing user is reported, the run goes on
        outcomes = [err] * len(users)
    seconds = (time.time() - started) / len(users)
    store_dir = request.config.output.store_dir if request else "the adapter store"
    parts = [_reply_part(i, user_id, out, seconds, store_dir) for i, user_id, out in zip(users, user_ids, outcomes)]
    if request is None or "users" not in message.content.config_records["run"]:
        return make_reply(message, *parts[0])
    return make_bundle_reply(message, parts)


@app.query()
def query(message: Message, context: Context) -> Message:
    """Discovery: a worker's first call checks it sees the run (in ``_handle``) and builds its
    model now, so that a node that cannot load it stops the run before training, and the load
    is not counted in round 1."""
    def work(request: Request, index: int) -> Outcome:
        worker_model(request.config)
        return {}, {}, None

    return _handle(message, context, work)


@app.train()
def train(message: Message, context: Context) -> Message:
    def work(request: Request, index: int) -> Outcome:
        shared, stats, _ = run_train(request, index)
        return stats, {}, shared

    return _handle(message, context, work, run_train_packed)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    return _handle(message, context, run_evaluate, run_evaluate_packed)
