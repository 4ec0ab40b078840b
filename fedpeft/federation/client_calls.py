"""The work of one ClientApp call (:mod:`fedpeft.federation.client_app`) for its users.

A train call follows its :class:`TrainPlan` (the strategy's local work in the phase, the
learning rate, the FedProx anchor, and how the trained state splits into the shared part sent
up and the private part stored), for one user (:func:`run_train`) or for a packed call's users
together (:func:`run_train_packed`, :mod:`fedpeft.learning.packing`). An evaluate call scores a
user's personalised model on its test and validation splits (:func:`run_evaluate`,
:func:`run_evaluate_packed`). Each user's result is an :data:`Outcome`; in a packed call a user
that fails alone has its exception instead.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable

import torch

from fedpeft.config import Config
from fedpeft.data import Benchmark, TaskSpec, UserData, get_benchmark
from fedpeft.federation.messages import Request
from fedpeft.federation.privacy import clip_shared_update
from fedpeft.federation.store import AdapterStore
from fedpeft.learning import models
from fedpeft.learning.packing import predict_packed, train_strategy_packed
from fedpeft.learning.schedule import call_seed, round_lr
from fedpeft.learning.scoring import score
from fedpeft.learning.training import train_user
from fedpeft.strategies import Strategy, make_strategy
from fedpeft.strategies.base import NEW_USERS

# one user's result of a call: (metrics, info, shared part or None); a failure is its exception
Outcome = tuple[dict[str, float], dict[str, "str | list[str]"], "dict[str, torch.Tensor] | None"]


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
