"""The ServerApp: discovers users, runs rounds of sampled cohorts, evaluates every user.

The server only ever handles the strategy's shared keys; private state stays in the clients'
adapter store. A reply that reports a failure marks its user failed; the run goes on.
:class:`FederatedRun` is the round loop; its collaborators each do one job: the calls to the
clients (fedpeft.federation.server_calls), the per-user bookkeeping a checkpoint keeps
(fedpeft.federation.progress), the privacy budget (fedpeft.federation.budget), scoring
(fedpeft.federation.evaluation), the new users (fedpeft.federation.new_users) and the results
(fedpeft.federation.results).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from tqdm.auto import tqdm

from fedpeft.config import Config
from fedpeft.data import get_benchmark
from fedpeft.data.user_groups import new_user_indices
from fedpeft.federation.budget import PrivacyBudget
from fedpeft.federation.checkpoint import Checkpoint, RunIdentity
from fedpeft.federation.evaluation import Scoring, eval_users, evaluated
from fedpeft.federation.messages import EVALUATE, TRAIN, array_bytes
from fedpeft.federation.new_users import fine_tune_new_users
from fedpeft.federation.participation import Participation
from fedpeft.federation.progress import RunProgress, partition_id
from fedpeft.federation.reporting import RunReporter
from fedpeft.federation.results import finish_run
from fedpeft.federation.selection import read_rounds
from fedpeft.federation.server_calls import ClientCalls, StorageFailure
from fedpeft.files import storage_failure
from fedpeft.strategies import make_strategy
from fedpeft.strategies.base import Phase

STOPPING = threading.Event()  # set by the entry point on SIGINT/SIGTERM: no checkpoint is written after it
UNAVAILABLE_RETRIES, UNAVAILABLE_WAIT = 60, 1.0  # a worker Ray restarts takes calls again within a minute


@dataclass
class Cohort:
    """A round's users: ``sampled`` (from those online), who of them ``dropped`` out, who is
    ``too_slow`` for even one step before the deadline, the ``stragglers``' own configs
    (``stragglers=partial``), and who is ``called``."""

    sampled: list[int]
    dropped: list[int]
    too_slow: list[int]
    stragglers: dict[int, str]
    called: list[int]


class FederatedRun:
    """One simulation run, driven from the ServerApp's main function; with ``resume``, it
    continues from that checkpoint exactly as the uninterrupted run would have gone on."""

    def __init__(self, config: Config, run_dir: Path, grid: Grid, initial_shared: dict[str, torch.Tensor],
                 accounting: dict[str, Any], identity: RunIdentity, resume: Checkpoint | None = None) -> None:
        self.config = config
        self.accounting = accounting
        self.identity = identity
        self.timings: dict[str, Any] = {}  # wall times of the run's phases (run_rounds)
        self.run_dir = run_dir
        self.strategy = make_strategy(config)
        user_ids = get_benchmark(config).user_ids()
        task = get_benchmark(config).task()
        # new users are held out of every cohort; trained and scored at the end
        self.progress = RunProgress(user_ids, new_user_indices(config, len(user_ids)))
        self.shared = dict(initial_shared)
        self.done_rounds, self.wall_before = 0, 0.0
        self.budget = PrivacyBudget(config, len(self.progress.trained_users))
        round_scores: list[dict[str, Any]] = []  # per user and evaluated round: val and test scores
        if resume is not None:
            self.restore(resume)
            round_scores = read_rounds(run_dir, up_to=self.done_rounds)
        self.reporter = RunReporter(config, run_dir, identity.wandb_id, resume_after=self.done_rounds if resume else None)
        self.scoring = Scoring(task, user_ids, self.reporter, round_scores)
        self.total_rounds = sum(p.rounds for p in self.strategy.phases())
        self.participation = Participation(config, user_ids, self.total_rounds, get_benchmark(config))
        self.bar = tqdm(total=0, unit="user", disable=not config.output.progress, dynamic_ncols=True)
        self.calls = ClientCalls(config, grid, identity.run_id, self.progress, self.bar, UNAVAILABLE_RETRIES, UNAVAILABLE_WAIT)

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        progress = self.progress.state(self.wall_before + time.time() - self.started)
        if (privacy := self.budget.state()) is not None:
            progress["privacy"] = privacy
        return Checkpoint(self.done_rounds, self.shared, self.strategy.server_state(), progress)

    def restore(self, ckpt: Checkpoint) -> None:
        p = ckpt.progress
        self.done_rounds, self.shared = ckpt.round, {**self.shared, **ckpt.shared}
        self.strategy.load_server_state(ckpt.server)
        self.progress.restore(p)
        self.wall_before = float(p["wall_seconds"])
        self.budget.restore(p)

    # ---- calls -------------------------------------------------------------------------------
    def call(self, users: list[int], kind: str, server_round: int, shared: dict[str, torch.Tensor],
             phase: str, config_for: dict[int, str] | None = None) -> tuple[list[Message], int]:
        """One call to ``users`` (:meth:`fedpeft.federation.server_calls.ClientCalls.call`), named on the progress bar."""
        self.bar.set_description(f"round {server_round}/{self.total_rounds} {phase} {kind}")
        self.bar.refresh()
        return self.calls.call(users, kind, server_round, shared, phase, config_for)

    def evaluate(self, server_round: int, users: list[int], phase: str) -> list[Message]:
        """Score ``users``; evaluation messages carry the shared part too (``bytes_down_eval``)."""
        replies, down = self.call(users, EVALUATE, server_round, self.shared, phase)
        self.progress.totals["bytes_down_eval"] += down
        return replies

    # ---- the run ------------------------------------------------------------------------
    def cohort(self, server_round: int, phase: Phase) -> Cohort:
        """The round's cohort, sampled from the users online in ``server_round``, and who of it
        is called (fedpeft.federation.participation)."""
        online = self.participation.online(self.progress.trained_users, server_round)
        cohort = self.strategy.sample_cohort(online, server_round, phase)
        dropped = self.participation.dropped_out(cohort, server_round)
        too_slow, stragglers = self.participation.stragglers(cohort, self.config)
        left_out = set(dropped) | set(too_slow)
        return Cohort(cohort, dropped, too_slow, stragglers, [u for u in cohort if u not in left_out])

    def train_round(self, server_round: int, phase: Phase) -> dict[str, Any]:
        """Train a cohort and aggregate into ``self.shared``; returns the round's record. The
        users who drop out and the replies past the deadline are left out, as zero updates under
        privacy (the mean divides by the cohort sampled)."""
        progress = self.progress
        round_users = self.cohort(server_round, phase)
        cohort, dropped, called = round_users.sampled, round_users.dropped, round_users.called
        replies, down = self.call(called, TRAIN, server_round, self.shared, phase.name, round_users.stragglers)
        ok, late, clock = self.participation.settle(replies, partition_id, missed=bool(round_users.too_slow))
        late = sorted(late + round_users.too_slow)
        missed = set(late)
        progress.rounds_scheduled[[u for u in called if u not in missed]] += 1
        for reply in ok:
            user = progress.record_training(reply, server_round)
            progress.rounds_trained[user] += 1
            sent = set(reply.content.array_records["shared"].keys())
            private = {k for k in sent if not self.strategy.is_shared(k, phase.name)}
            if private:  # the privacy invariant: refuse loudly rather than aggregate a private key
                raise RuntimeError(f"a client sent keys that are private in phase '{phase.name}': {sorted(private)[:3]}")
        self.shared = self.strategy.aggregate(server_round, self.shared, ok, sampled=len(cohort), phase=phase.name)
        self.budget.compose(self.strategy)
        metric = lambda key: [r.content.metric_records["metrics"][key] for r in ok]  # noqa: E731
        losses = [v for v in metric("train_loss") if not np.isnan(v)]
        progress.note_dropped(dropped, late, clock)
        return {
            "phase": phase.name, "cohort_size": len(cohort), "trained": len(ok),
            "failed": len(called) - len(ok) - len(late),
            **self.participation.round_record(server_round, progress.trained_users, len(dropped), len(late), clock,
                                              progress.sim_time),
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "bytes_down": down, "bytes_up": sum(array_bytes(r.content) for r in ok),
            "private_bytes_mean": float(np.mean(metric("private_bytes"))) if ok else 0.0,
            **self.budget.round_record(),
        }

    def schedule(self) -> list[tuple[int, Phase]]:
        """(global round number, phase) for every round of every phase."""
        rounds = [phase for phase in self.strategy.phases() for _ in range(phase.rounds)]
        return list(enumerate(rounds, start=1))

    def run(self) -> dict[str, Any]:
        """The whole run (:meth:`run_rounds`); a write that fails because of the storage, in a
        worker or here, stops it as a :class:`StorageFailure` that says where and what to do."""
        try:
            return self.run_rounds()
        except Exception as err:
            self.reporter.keep_rounds(Checkpoint.saved_round(self.run_dir))  # the files hold only checkpointed rounds
            found = (err.code, str(err)) if isinstance(err, StorageFailure) else storage_failure(err, self.run_dir)
            if not found:
                raise
            code, what = found
            self.bar.close()
            raise StorageFailure(
                f"the run stopped: {what}. Nothing of the round in progress was kept; the checkpoint holds the last "
                f"complete round ({Checkpoint.saved_round(self.run_dir)}/{self.total_rounds}). Free space (or fix the file system) and "
                f"continue with `python -m fedpeft.sim --resume {self.run_dir}`", code) from err

    def run_rounds(self) -> dict[str, Any]:
        config, progress, totals = self.config, self.progress, self.progress.totals
        self.started = time.time()
        # simulation_workers is looked up here at call time (tests replace it), and asked again after each wave
        self.calls.discover(simulated_nodes(config, len(progress.user_ids)), lambda: simulation_workers(config))
        self.timings = {"run_started_at": self.started, "discovery_s": time.time() - self.started,
                        "rounds_s": [], "messages": [], "call_s": [], "final_eval_s": 0.0}
        self.timings["workers"] = simulation_workers(config)
        progress.bundle_workers = progress.bundle_workers or self.timings["workers"]
        final: list[Message] = []
        users = progress.trained_users
        calls = {}  # per round, the train calls sent and the users scored
        for r, phase in self.schedule():
            calls[r] = len(self.cohort(r, phase).called)
            calls[r] += len(eval_users(config, users, r, self.total_rounds)) if evaluated(config, r, self.total_rounds) else 0
        self.bar.total = sum(calls.values()) + len(progress.new_users) * (3 if self.accounting.get("new_users_as_is") else 2)
        self.bar.update(sum(n for r, n in calls.items() if r <= self.done_rounds))
        if self.done_rounds:
            self.bar.write(f"resuming {self.run_dir.name} after round {self.done_rounds}/{self.total_rounds}")
        for server_round, phase in self.schedule():
            if server_round <= self.done_rounds:
                continue
            if self.budget.would_stop(self.strategy, self.shared, server_round, phase, users):
                final = self.stop_for_budget(server_round)
                break
            round_start, self.calls.call_seconds = time.time(), 0.0
            eval_bytes_before = totals["bytes_down_eval"]
            record = self.train_round(server_round, phase)
            totals["bytes_down"] += record["bytes_down"]
            totals["bytes_up"] += record["bytes_up"]
            messages = record["cohort_size"]
            if evaluated(config, server_round, self.total_rounds):
                eval_start, scored = time.time(), eval_users(config, users, server_round, self.total_rounds)
                final = self.evaluate(server_round, scored, phase.name)
                messages += len(scored)
                record.update(self.scoring.scores(final))
                record.update(self.scoring.log_round(server_round, final))
                record["n_evaluated"] = len(final)
                if server_round == self.total_rounds:
                    self.timings["final_eval_s"] = time.time() - eval_start
            record["bytes_down_eval"] = totals["bytes_down_eval"] - eval_bytes_before
            self.timings["rounds_s"].append(time.time() - round_start)
            self.timings["messages"].append(messages)
            self.timings["call_s"].append(self.calls.call_seconds)
            record.update({"round": server_round, "seconds": time.time() - round_start,
                           "failed_calls_total": len(progress.failures),
                           "bytes_down_total": totals["bytes_down"], "bytes_up_total": totals["bytes_up"],
                           "bytes_down_eval_total": totals["bytes_down_eval"]})
            self.reporter.log_round(record)
            if STOPPING.is_set():  # interrupted: the entry point is shutting Ray down; the round may hold failures it caused
                raise RuntimeError("interrupted (SIGINT or SIGTERM)")
            self.done_rounds = server_round
            self.checkpoint().save(self.run_dir)  # the round is complete
            headline = self.scoring.metric_names[0]
            self.bar.write(f"round {server_round} ({phase.name}): trained {record['trained']}/{record['cohort_size']}, "
                           f"loss {record['train_loss']:.4f}, {headline} {record.get(headline, float('nan')):.4f}")
        if not final:  # resumed after the last round completed: score everyone again (reads only)
            eval_start = time.time()
            final = self.evaluate(self.total_rounds, users, self.schedule()[-1][1].name)
            self.timings["final_eval_s"] = time.time() - eval_start
        new_start = time.time()
        new = self.run_new_users()
        self.timings["new_users_s"] = time.time() - new_start
        self.bar.close()
        return finish_run(config=config, run_dir=self.run_dir, run_id=self.identity.run_id, progress=progress,
                          scoring=self.scoring, budget=self.budget, accounting=self.accounting, reporter=self.reporter,
                          shared=self.shared, total_rounds=self.total_rounds, timings=self.timings,
                          final=final, new=new, wall=self.wall_before + time.time() - self.started,
                          participation=self.participation)

    def stop_for_budget(self, server_round: int) -> list[Message]:
        """``privacy.max_epsilon`` stops training before ``server_round``: the last completed round
        becomes the run's last, and every trained user is scored at it (its scores replace that
        round's, which may have been a sample)."""
        spent = self.budget.spent()
        self.budget.stopped_before, last = server_round, self.done_rounds
        self.bar.write(f"privacy.max_epsilon={self.config.privacy.max_epsilon:g}: round {server_round} would take epsilon "
                       f"past it (spent {spent:.3f} after round {last}); training stops here, every user is scored at round {last}")
        self.total_rounds = last
        if not last:
            return []
        phase = self.schedule()[last - 1][1].name
        final = self.evaluate(last, self.progress.trained_users, phase)
        self.scoring.forget_round(last)
        self.scoring.log_round(last, final)
        return final

    def run_new_users(self) -> dict[str, list[Message]]:
        """The new users (``data.new_users``), after the last round, with the final shared part
        (:func:`fedpeft.federation.new_users.fine_tune_new_users`)."""
        return fine_tune_new_users(
            self.progress, self.total_rounds, self.schedule()[-1][1].name, bool(self.accounting.get("new_users_as_is")),
            call=lambda users, kind, server_round, phase: self.call(users, kind, server_round, self.shared, phase),
            evaluate=self.evaluate, save=lambda: self.checkpoint().save(self.run_dir), note=self.bar.write,
            headline=self.scoring.metric_names[0])


def simulated_nodes(config: Config, num_users: int) -> int:
    """How many Flower nodes the simulation registers: ``federation.num_nodes``, or (0) one per
    user up to twice the message window. Flower's in-memory state scans every message in flight
    for every node every 0.1 s (``vce_api.add_messages_to_queue`` -> ``get_message_ins``), so
    one node per user would make each message cost grow with the number of users."""
    fed = config.federation
    wanted = fed.num_nodes or (2 * fed.message_window if fed.message_window else num_users)
    return max(1, min(num_users, wanted))


def simulation_workers(config: Config) -> int:
    """How many client worker processes the simulation runs: Flower's own count of the actors that
    fit the Ray cluster (1 without Ray: an in-process grid)."""
    import ray

    if not ray.is_initialized():
        return 1
    from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

    return max(1, pool_size_from_resources({"num_cpus": config.ray.client_cpus, "num_gpus": config.ray.client_gpus}))


def run_prepared(config: Config, prepared: Any, grid: Grid) -> dict[str, Any]:
    """Run one :class:`FederatedRun` on ``grid`` from what :func:`fedpeft.launch.prepare.prepare_run` made;
    the one code path of both entry points (``python -m fedpeft.sim`` and ``flwr run .``)."""
    from fedpeft.federation.flower_logs import quiet_lost_workers

    quiet_lost_workers()  # a worker lost mid-call is that user's failure, reported by fedpeft: not Flower's tracebacks
    return FederatedRun(config, prepared.run_dir, grid, prepared.initial_shared, prepared.accounting,
                        prepared.identity, prepared.resume).run()


def make_server_app(config: Config, prepared: Callable[[], Any], results: dict[str, Any]) -> ServerApp:
    """A ServerApp whose main waits for the run's preparation (``prepared()``: the
    :class:`fedpeft.launch.prepare.PreparedRun`, made while the simulation's workers start), then runs
    :func:`run_prepared` and puts its results in ``results``. A preparation that fails is put in
    ``results['_refused']`` as it is: the entry point reports it as a refusal before the run."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            ready = prepared()
        except Exception as err:  # noqa: BLE001 - the entry point raises it again
            results["_refused"] = err
            return
        try:
            results.update(run_prepared(config, ready, grid))
        except Exception as err:  # Flower only logs it: hand it to the entry point, which reports it
            results["_error"] = err
            raise

    return app
