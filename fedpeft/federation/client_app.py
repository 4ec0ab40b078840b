"""The ClientApp: one Flower virtual node = one user of the benchmark.

A call reads its user from the message (each user is one node for the whole run), takes the backbone from the per-process cache,
loads the adapter (common init, then the shared part from the message, then the user's private
part from the adapter store), trains or evaluates, writes the private part back and replies
with the shared part only. An exception marks this user failed in the reply; the run goes on.
The work of a call for its users, one at a time or packed, is :mod:`fedpeft.federation.client_calls`;
here are the app's handlers, a worker's checks and warm-up, a call's deadline and its reply.
"""

from __future__ import annotations

import contextlib
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
from fedpeft.federation.client_calls import (
    Outcome,
    run_evaluate,
    run_evaluate_packed,
    run_train,
    run_train_packed,
    user_id_of,
    worker_model,
)
from fedpeft.federation.messages import (
    Request,
    config_from_json,
    make_bundle_reply,
    make_reply,
    read_request,
)
from fedpeft.federation.store import OWNER_FILE, StoreError, store_owner, timeout_note
from fedpeft.files import storage_failure
from fedpeft.learning import models

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
    if storage:  # the storage's fault, not the user's: the server stops the run (fedpeft.federation.server_calls.StorageFailure)
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
