"""A run's preparation before its simulation starts: the run folder claimed, the adapter store
checked and claimed, and the adapter built once in the driver (the initial shared part and the
parameter accounting), in a thread of its own while Ray starts (:class:`Preparation`)."""

from __future__ import annotations

import re
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fedpeft.config import Config
from fedpeft.data import get_benchmark
from fedpeft.federation.checkpoint import (
    Checkpoint,
    RunIdentity,
    check_resume_folder,
    claim_run_dir,
    release_run_dir,
)
from fedpeft.federation.run_folder import own_store
from fedpeft.federation.selection import check_selection
from fedpeft.federation.store import check_store_is_free, check_store_writable, claim_store
from fedpeft.files import json_value
from fedpeft.launch.preflight import check_cohort, check_participation
from fedpeft.launch.run_checks import check_fits
from fedpeft.learning.model_files import check_model
from fedpeft.learning.models import adapter_state, build_model, fit_size_knob
from fedpeft.strategies import make_strategy


def run_dir_path(config: Config) -> Path:
    strategy = re.sub(r"[^\w.-]+", "_", config.federation.strategy)  # a plug-in's module:Class
    name = config.output.name or f"{strategy}-{datetime.now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:4]}"
    return (Path(config.output.dir) / name).resolve()


def prepare_adapter(config: Config) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Build the adapter once in the driver: check the strategy fits it, take the initial shared
    part, and count parameters (what each user trains, shares and keeps private)."""
    strategy = make_strategy(config)
    bench = get_benchmark(config)
    num_labels = len(bench.task().labels)
    if config.peft.target_params:
        knob, value, count = fit_size_knob(config, num_labels)
        print(f"peft.target_params={config.peft.target_params}: peft.{knob}={value} gives {count:,} trainable parameters")
    loaded = build_model(config, num_labels, strategy.extra_adapters)
    # strategy x method x backbone x packing x privacy (also what a study checks for all its runs first)
    keys, held_out = check_fits(config, strategy, bench, loaded)
    stats = strategy.pretrain(loaded, lambda: [bench.load_user(i) for i in range(len(bench.user_ids())) if i not in held_out],
                              bench.task())
    if stats is not None:
        print(f"{strategy.name}: trained centrally in the driver before the simulation: {stats}")
    state = adapter_state(loaded)
    phases = [p.name for p in strategy.phases()]
    shared = strategy.shared_keys(keys)
    trainable = [k for k in keys if not all(strategy.is_frozen(k, p) for p in phases)]
    # private: trained in some phase that does not send it (a frozen key is never private)
    private = [k for k in keys if any(not strategy.is_frozen(k, p) and not strategy.is_shared(k, p) for p in phases)]

    def numel(subset: list[str]) -> int:
        return int(sum(state[k].numel() for k in subset))

    new_user = strategy.new_user_keys(keys)  # what a new user trains on top of the final shared part
    accounting = {"adapter_params": numel(keys), "trainable_params_per_user": numel(trainable),
                  "shared_params": numel(shared), "private_params": numel(private), "new_user_params": numel(new_user),
                  # the final shared part alone is a new user's whole model (fedavg): scored before its fine-tune too
                  "new_users_as_is": int(set(new_user) <= set(shared)),
                  "pretrain_examples": int(stats["examples"]) if stats else 0}
    return {k: state[k] for k in shared}, accounting


@dataclass
class PreparedRun:
    """What the simulation starts from: the run folder, the initial shared part, the parameter
    accounting, the run's identity and, when resuming, the checkpoint to continue from."""

    run_dir: Path
    initial_shared: dict[str, torch.Tensor]
    accounting: dict[str, int]
    identity: RunIdentity
    resume: Checkpoint | None = None


@dataclass
class ClaimedRun:
    """The quick first part of a run's preparation (:func:`claim_run`): the run folder, claimed
    for this process, and what the checks of the folder and the adapter store found."""

    run_dir: Path
    created: bool  # this process made the folder: it goes again if the preparation fails
    store_dir: Path
    identity: RunIdentity
    resume: Checkpoint | None


def claim_run(config: Config, resume: bool = False) -> ClaimedRun:
    """Check the model and the selection, claim the run folder for this process
    (:func:`fedpeft.federation.checkpoint.claim_run_dir`; given up again if anything here fails), and check
    the adapter store, which a fresh run must find free and a resumed run must own."""
    check_model(config)
    check_selection(config)
    check_cohort(config)
    check_participation(config)
    run_dir = run_dir_path(config)
    created = claim_run_dir(run_dir, exist_ok=bool(config.output.name) or resume)
    try:
        store_dir = Path(config.output.store_dir or run_dir / "adapters").resolve()
        if resume:
            identity = check_resume_folder(run_dir)
            identity = own_store(run_dir, store_dir, identity)
            checkpoint = Checkpoint.load(run_dir)
        else:
            check_store_is_free(store_dir)
            identity, checkpoint = RunIdentity.new(), None
        check_store_writable(store_dir)
    except BaseException:
        release_run_dir(run_dir, remove_folder=created)
        raise
    return ClaimedRun(run_dir, created, store_dir, identity, checkpoint)


def finish_preparation(config: Config, claimed: ClaimedRun) -> PreparedRun:
    """The slow second part: the adapter (initial shared part and parameter accounting: the
    driver builds the model), then the run's identity and the adapter store's claim. Sets
    ``output.store_dir``. Gives up the run folder's claim if anything here fails."""
    try:
        initial_shared, accounting = prepare_adapter(config)
        config.output.store_dir = str(claimed.store_dir)
        if claimed.resume is None or claimed.identity.copied_from:
            claimed.identity.write(claimed.run_dir)
        claim_store(claimed.store_dir, claimed.run_dir, claimed.identity.run_id, get_benchmark(config).driver_files())
    except BaseException:
        release_run_dir(claimed.run_dir, remove_folder=claimed.created)
        raise
    return PreparedRun(claimed.run_dir, initial_shared, accounting, claimed.identity, claimed.resume)


def prepare_run(config: Config, resume: bool = False) -> PreparedRun:
    """Everything before the simulation starts (:func:`claim_run`, then
    :func:`finish_preparation`). The caller gives up the run folder's claim when the run ends
    (:func:`release_run_dir`)."""
    return finish_preparation(config, claim_run(config, resume))


class Preparation:
    """:func:`finish_preparation` in a thread of its own, started at once: the driver builds its
    model while Ray starts and while the simulation's workers start and import theirs (Ray's
    ``worker_process_setup_hook``, :data:`WORKER_SETUP_HOOK`), instead of before them.
    :meth:`result` waits for it (the ServerApp's first step); a failure is raised there."""

    def __init__(self, config: Config, claimed: ClaimedRun) -> None:
        self.future: Future[PreparedRun] = Future()
        threading.Thread(target=self._prepare, args=(config, claimed), name="fedpeft-prepare", daemon=True).start()

    def _prepare(self, config: Config, claimed: ClaimedRun) -> None:
        try:
            self.future.set_result(finish_preparation(config, claimed))
        except BaseException as err:  # noqa: BLE001 - raised in the thread that asks for the result
            self.future.set_exception(err)

    def failed(self) -> bool:
        """Whether it has already ended with a failure (a refusal found while Ray started)."""
        return self.future.done() and self.future.exception() is not None

    def result(self) -> PreparedRun:
        return self.future.result()


def finished_results(config: Config) -> dict[str, Any] | None:
    """The results of the run folder ``config`` names when that run is complete (every round
    checkpointed and its results.json written), else None."""
    run_dir = run_dir_path(config)
    rounds = sum(p.rounds for p in make_strategy(config).phases())
    if not (run_dir / "results.json").is_file() or Checkpoint.saved_round(run_dir) < rounds:
        return None
    try:
        return json_value((run_dir / "results.json").read_text())
    except (OSError, ValueError):  # unreadable: finish the run again
        return None
