"""The ServerApp: discovers users, runs rounds of sampled cohorts, evaluates every user.

The server only ever handles the strategy's shared keys; private state stays in the clients'
adapter store. A reply that reports a failure marks its user failed; the run goes on.
"""

from __future__ import annotations

import json
import resource
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import save_file
from tqdm.auto import tqdm

from fedpeft.config import Config
from fedpeft.data import data_summary, get_benchmark
from fedpeft.data.activity import by_activity
from fedpeft.data.user_groups import new_user_indices
from fedpeft.federation import messages as wire
from fedpeft.federation.checkpoint import Checkpoint, RunIdentity
from fedpeft.federation.exchange import LazyMessages, exchange, worker_unavailable
from fedpeft.federation.messages import EVALUATE, QUERY, TRAIN, array_bytes, make_content
from fedpeft.federation.privacy import PrivacyAccountant
from fedpeft.federation.reporting import RunReporter
from fedpeft.federation.selection import (
    ROUNDS_FILE,
    apply_selection,
    describe,
    read_rounds,
    round_row,
    selected_validation,
)
from fedpeft.federation.store import AdapterStore, timeout_note
from fedpeft.federation.verdict import run_verdict
from fedpeft.files import atomic_write, storage_failure
from fedpeft.learning import metrics as M
from fedpeft.learning.scoring import corpus_scores
from fedpeft.learning.training import divergence_counts
from fedpeft.strategies import make_strategy
from fedpeft.strategies.base import NEW_USERS, Phase

NODE_WAIT_SECONDS = 120
STOPPING = threading.Event()  # set by the entry point on SIGINT/SIGTERM: no checkpoint is written after it
UNAVAILABLE_RETRIES, UNAVAILABLE_WAIT = 60, 1.0  # a worker Ray restarts takes calls again within a minute


class StorageFailure(RuntimeError):
    """A write failed because of the storage (a full disk, a read-only or failing file system),
    in a worker or in the driver: the run stops before it checkpoints the round, and continues
    with ``--resume`` from the last complete round once the storage is fixed. ``code``: the errno."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class FederatedRun:
    """One simulation run, driven from the ServerApp's main function; with ``resume``, it
    continues from that checkpoint exactly as the uninterrupted run would have gone on."""

    def __init__(self, config: Config, run_dir: Path, grid: Grid, initial_shared: dict[str, torch.Tensor],
                 accounting: dict[str, Any], identity: RunIdentity, resume: Checkpoint | None = None) -> None:
        self.config = config
        self.accounting = accounting
        self.identity = identity
        self.config_json = config.to_json()
        self.timings: dict[str, Any] = {}  # wall times of the run's phases (run_rounds)
        # the worker count that cuts packed calls into bundles (bundle_users): the client worker
        # processes at the run's start (simulation_workers), kept by its checkpoint, so that a run
        # resumed on more or fewer workers packs the same users together (with dropout on, a
        # bundle's draws depend on who is in it); 0: not known yet (set as the rounds start)
        self.bundle_workers = 0
        self.grid = grid
        self.run_dir = run_dir
        self.strategy = make_strategy(config)
        self.user_ids = get_benchmark(config).user_ids()
        self.task = get_benchmark(config).task()
        self.metric_names = list(self.task.metrics)  # the first one is the headline
        n = len(self.user_ids)
        self.new_users = new_user_indices(config, n)  # held out of every cohort; trained and scored at the end
        held_out = set(self.new_users)
        self.trained_users = [i for i in range(n) if i not in held_out]
        self.failures: list[dict[str, Any]] = []  # one record per failed call: round, call, user, reason
        self.rounds_trained = np.zeros(n, dtype=int)
        self.rounds_scheduled = np.zeros(n, dtype=int)  # rounds whose cohort held the user
        self.last_round = np.zeros(n, dtype=int)  # the round that wrote each user's stored adapter
        self.examples_processed = np.zeros(n, dtype=np.int64)
        self.worker_loads: dict[int, int] = {}
        self.totals = {"bytes_down": 0, "bytes_up": 0, "bytes_down_eval": 0}
        self.shared = dict(initial_shared)
        self.done_rounds, self.wall_before = 0, 0.0
        self.call_seconds = 0.0  # time spent inside client calls (the workers' side), for timings
        self.round_scores: list[dict[str, Any]] = []  # per user and evaluated round: val and test scores
        private = config.privacy.mechanism != "none"  # user-level DP on the shared part (fedpeft.federation.privacy)
        self.accountant = PrivacyAccountant(len(self.trained_users), config.privacy.delta) if private else None
        self.budget_stop = 0  # the round before which privacy.max_epsilon stopped training (0: it did not)
        if resume is not None:
            self.restore(resume)
            self.round_scores = read_rounds(run_dir, up_to=self.done_rounds)
        # a call has federation.call_timeout (then its worker ends itself); this is the backstop
        self.no_reply_timeout = 1.2 * config.federation.call_timeout + 120
        self.window = config.federation.message_window
        self.reporter = RunReporter(config, run_dir, identity.wandb_id, resume_after=self.done_rounds if resume else None)
        self.total_rounds = sum(p.rounds for p in self.strategy.phases())
        self.bar = tqdm(total=0, unit="user", disable=not config.output.progress, dynamic_ncols=True)

    # ---- checkpoints -----------------------------------------------------------------------
    def checkpoint(self) -> Checkpoint:
        progress = {"rounds_trained": self.rounds_trained.tolist(), "rounds_scheduled": self.rounds_scheduled.tolist(),
                    "last_round": self.last_round.tolist(),
                    "examples_processed": self.examples_processed.tolist(), "failures": self.failures,
                    "worker_loads": {str(k): v for k, v in self.worker_loads.items()}, "totals": self.totals,
                    "bundle_workers": self.bundle_workers,
                    "wall_seconds": self.wall_before + time.time() - self.started}
        if self.accountant is not None:
            progress["privacy"] = self.accountant.state()
        return Checkpoint(self.done_rounds, self.shared, self.strategy.server_state(), progress)

    def restore(self, ckpt: Checkpoint) -> None:
        p = ckpt.progress
        self.done_rounds, self.shared = ckpt.round, {**self.shared, **ckpt.shared}
        self.strategy.load_server_state(ckpt.server)
        self.rounds_trained[:] = p["rounds_trained"]
        self.rounds_scheduled[:] = p.get("rounds_scheduled", p["rounds_trained"])  # not recorded before: unknown
        self.last_round[:] = p["last_round"]
        self.examples_processed[:] = p["examples_processed"]
        self.failures = list(p["failures"])
        self.worker_loads = {int(k): int(v) for k, v in p["worker_loads"].items()}
        self.totals = {"bytes_down_eval": 0, **p["totals"]}
        self.wall_before = float(p["wall_seconds"])
        self.bundle_workers = int(p.get("bundle_workers", 0))  # not recorded before: the workers of this start
        if self.accountant is not None and "privacy" in p:  # the rounds composed so far: the same epsilon
            self.accountant = PrivacyAccountant.from_state(p["privacy"])

    # ---- plumbing ------------------------------------------------------------------------
    def discover(self) -> list[int]:
        """The simulated nodes' ids, in node-id order. A node is a transport, not a user: every
        message names its user, and the messages of a call go round-robin over the nodes
        (:func:`simulated_nodes` says how many there are), so no round trip is needed to learn a
        map, and results do not depend on the number of nodes.

        Before any training, query messages go to nodes, a few workers' worth at a time, until
        replies have come from as many worker processes as the simulation runs (or every node was
        asked): a worker's first call checks that it sees the run's store and data, and a worker
        that does not stops the run here, with the reason."""
        deadline, expected = time.time() + NODE_WAIT_SECONDS, simulated_nodes(self.config, len(self.user_ids))
        while len(nodes := sorted(self.grid.get_node_ids())) < expected:
            if time.time() > deadline:
                raise RuntimeError(f"only {len(nodes)} of {expected} simulated nodes came up")
            time.sleep(0.2)
        problems: list[str] = []  # failed first calls: not retried
        pids: set[int] = set()
        todo, wave = list(range(len(nodes))), 8
        while todo:
            asked, todo = todo[:wave], todo[wave:]
            for _attempt in range(3):  # a worker that died is replaced by Ray: ask its nodes again
                msgs = [Message(content=make_content(self.config_json, 0, run_id=self.identity.run_id, user=i % len(self.user_ids)),
                                dst_node_id=nodes[i], message_type=QUERY) for i in asked]
                lost: dict[int, str] = {}
                for node, reply in zip(asked, exchange(self.grid, msgs, self.no_reply_timeout, window=self.window)):
                    if reply is None or reply.has_error():
                        lost[node] = "no reply" if reply is None else reply.error.reason
                    elif reply.content.metric_records["metrics"]["failed"]:
                        problems.append(str(reply.content.config_records["info"]["error"]).strip().splitlines()[-1])
                    else:
                        pids.add(int(reply.content.metric_records["metrics"]["pid"]))
                asked = list(lost)
                if not asked:
                    break
            problems += list(lost.values())
            workers = simulation_workers(self.config)
            if problems or len(pids) >= workers:
                break
            wave = 4 * workers
        if problems:
            raise RuntimeError(f"{len(problems)} simulated node(s) failed their first call, before any training: "
                               + "; ".join(sorted(set(problems))[:3]))
        return nodes[:expected]

    def call(self, users: list[int], kind: str, server_round: int, shared: dict[str, torch.Tensor],
             phase: str) -> tuple[list[Message], int]:
        """Send the users their messages: one per user, or (``train.pack_users`` = k > 1) one per
        bundle of up to k consecutive users (:func:`bundle_users`), which a worker runs packed; returns each user's reply
        that succeeded (a packed reply split per user), in partition order (never arrival order, so
        that aggregation and every sum over replies is deterministic), and the bytes sent down (the
        shared part once per user: packing is the simulation's economy, not the protocol's). A
        failed call (the user's error, a worker process that died mid-call, no reply) is recorded
        as the failure of each of its users for this round."""
        down, ok, storage = 0, [], []
        pack = self.config.train.pack_users
        bundles = bundle_users(list(users), pack, self.bundle_workers)
        self.bar.set_description(f"round {server_round}/{self.total_rounds} {phase} {kind}")
        self.bar.refresh()
        record = wire.shared_record(shared)  # built once, carried by every message of the call
        for attempt in range(UNAVAILABLE_RETRIES + 1):
            def message(i: int, bundles=bundles) -> Message:  # built as the window reaches it: 15,000 at once weigh
                first = bundles[i][0]
                bundle = [(u, int(self.last_round[u])) for u in bundles[i]] if pack > 1 else None
                return Message(content=make_content(self.config_json, server_round, record, phase, self.identity.run_id,
                                                    int(self.last_round[first]), user=first, bundle=bundle),
                               dst_node_id=self.nodes[i % len(self.nodes)], message_type=kind)

            msgs = LazyMessages(len(bundles), message)
            if attempt == 0:  # resending to a restarted worker is the simulation's cost, not the protocol's
                down = len(users) * wire.record_bytes(record)
            replies = exchange(self.grid, msgs, self.no_reply_timeout * pack, window=self.window,
                               on_reply=lambda r: self.bar.update(replied_users(r)))
            retry = []
            for bundle, reply in zip(bundles, replies):
                if reply is not None and worker_unavailable(reply) and attempt < UNAVAILABLE_RETRIES:
                    # it reached a worker that Ray is restarting: the call is idempotent, send the same bundle again
                    retry.append(bundle)
                elif reply is None:
                    for user in bundle:
                        self.fail(user, kind, server_round, phase, f"no reply for {self.no_reply_timeout * pack:.0f} s: "
                                  "its worker or node was lost (federation.call_timeout bounds a call)")
                elif reply.has_error():
                    for user in bundle:
                        note = timeout_note(self.config.output.store_dir, self.identity.run_id, user, kind, server_round)
                        self.fail(user, kind, server_round, phase, note.read_text() if note.is_file() else
                                  "its worker process died mid-call (killed, out of memory, or a lost node); "
                                  f"Ray replaces it: {reply.error.reason}")
                        note.unlink(missing_ok=True)
                else:
                    for user, part in zip(bundle, wire.unbundle(reply)):
                        m = part.content.metric_records["metrics"]
                        self.call_seconds += float(m["seconds"])
                        self.worker_loads[int(m["pid"])] = max(self.worker_loads.get(int(m["pid"]), 0), int(m["backbone_loads"]))
                        if m["failed"] and m.get("storage_errno"):  # the storage's fault: never the user's failure
                            storage.append((int(m["storage_errno"]), str(part.content.config_records["info"]["error"]).strip().splitlines()[-1]))
                        elif m["failed"]:
                            self.fail(user, kind, server_round, phase, str(part.content.config_records["info"]["error"]).strip())
                        else:
                            ok.append(part)
            if not retry:
                break
            bundles = retry
            time.sleep(UNAVAILABLE_WAIT)
        if storage:
            raise StorageFailure(f"{len(storage)} {kind} call(s) of round {server_round} could not write: "
                                 + "; ".join(sorted({why for _, why in storage})[:3]), storage[0][0])
        return sorted(ok, key=partition_id), down

    def fail(self, user: int, kind: str, server_round: int, phase: str, reason: str) -> None:
        self.failures.append({"round": server_round, "phase": phase, "call": kind, "user_id": self.user_ids[user],
                              "partition_id": user, "error": reason.splitlines()[-1] if reason else "",
                              "traceback": reason})

    # ---- the run ------------------------------------------------------------------------
    def train_round(self, server_round: int, phase: Phase) -> dict[str, Any]:
        """Train a cohort and aggregate into ``self.shared``; returns the round's record."""
        cohort = self.strategy.sample_cohort(self.trained_users, server_round, phase)
        ok, down = self.call(cohort, TRAIN, server_round, self.shared, phase.name)
        self.rounds_scheduled[cohort] += 1
        for reply in ok:
            user = self.record_training(reply, server_round)
            self.rounds_trained[user] += 1
            sent = set(reply.content.array_records["shared"].keys())
            private = {k for k in sent if not self.strategy.is_shared(k, phase.name)}
            if private:  # the privacy invariant: refuse loudly rather than aggregate a private key
                raise RuntimeError(f"a client sent keys that are private in phase '{phase.name}': {sorted(private)[:3]}")
        self.shared = self.strategy.aggregate(server_round, self.shared, ok, sampled=len(cohort), phase=phase.name)
        if self.accountant is not None and self.strategy.privacy_release is not None:
            self.accountant.compose_release(self.strategy.privacy_release)
        metric = lambda key: [r.content.metric_records["metrics"][key] for r in ok]  # noqa: E731
        losses = [v for v in metric("train_loss") if not np.isnan(v)]
        return {
            "phase": phase.name, "cohort_size": len(cohort), "trained": len(ok), "failed": len(cohort) - len(ok),
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "bytes_down": down, "bytes_up": sum(array_bytes(r.content) for r in ok),
            "private_bytes_mean": float(np.mean(metric("private_bytes"))) if ok else 0.0,
            **({"epsilon": self.accountant.epsilon()} if self.accountant is not None else {}),
        }

    def over_budget(self, server_round: int, phase: Phase) -> bool:
        """Whether this round's release would take the spent epsilon past ``privacy.max_epsilon``
        (a phase that shares nothing releases nothing, and is never stopped). Exact: a round costs
        the same whoever fails in it (the mean divides by the users sampled, fedpeft.federation.privacy)."""
        pr = self.config.privacy
        if self.accountant is None or not pr.max_epsilon or not any(self.strategy.is_shared(k, phase.name) for k in self.shared):
            return False
        cohort = self.strategy.sample_cohort(self.trained_users, server_round, phase)
        return self.accountant.would_exceed(pr.max_epsilon, pr.noise_multiplier, len(cohort))

    def record_training(self, reply: Message, server_round: int) -> int:
        """A successful train reply: its user's stored adapter is now of ``server_round``, and its
        examples count. Returns the user."""
        user = partition_id(reply)
        self.last_round[user] = server_round
        self.examples_processed[user] += int(reply.content.metric_records["metrics"]["examples_processed"])
        return user

    def evaluate(self, server_round: int, users: list[int], phase: str) -> list[Message]:
        """Score ``users``; evaluation messages carry the shared part too (``bytes_down_eval``)."""
        replies, down = self.call(users, EVALUATE, server_round, self.shared, phase)
        self.totals["bytes_down_eval"] += down
        return replies

    def eval_users(self, server_round: int) -> list[int]:
        """Everyone at the last round; at an intermediate one a seeded sample, the same users every
        round (so that per-round scores, and the rounds chosen on validation, compare like with like)."""
        fed = self.config.federation
        everyone = self.trained_users  # new users are scored once, after their fine-tune at the end
        size = max(1, round(fed.eval_fraction * len(everyone)))
        if fed.eval_max_users:
            size = min(size, fed.eval_max_users)
        if server_round == self.total_rounds or size >= len(everyone):
            return everyone
        return sorted(np.random.default_rng([self.config.seed, 30]).choice(everyone, size, replace=False).tolist())

    def schedule(self) -> list[tuple[int, Phase]]:
        """(global round number, phase) for every round of every phase."""
        rounds = [phase for phase in self.strategy.phases() for _ in range(phase.rounds)]
        return list(enumerate(rounds, start=1))

    def evaluated(self, server_round: int) -> bool:
        return server_round % self.config.federation.eval_every == 0 or server_round == self.total_rounds

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
        self.started = time.time()
        self.nodes = self.discover()
        self.timings = {"run_started_at": self.started, "discovery_s": time.time() - self.started,
                        "rounds_s": [], "messages": [], "call_s": [], "final_eval_s": 0.0}
        self.timings["workers"] = simulation_workers(self.config)
        self.bundle_workers = self.bundle_workers or self.timings["workers"]
        final: list[Message] = []
        users = self.trained_users
        calls = {r: len(self.strategy.sample_cohort(users, r, phase)) + (len(self.eval_users(r)) if self.evaluated(r) else 0)
                 for r, phase in self.schedule()}
        self.bar.total = sum(calls.values()) + len(self.new_users) * (3 if self.accounting.get("new_users_as_is") else 2)
        self.bar.update(sum(n for r, n in calls.items() if r <= self.done_rounds))
        if self.done_rounds:
            self.bar.write(f"resuming {self.run_dir.name} after round {self.done_rounds}/{self.total_rounds}")
        for server_round, phase in self.schedule():
            if server_round <= self.done_rounds:
                continue
            if self.over_budget(server_round, phase):
                final = self.stop_for_budget(server_round)
                break
            round_start, self.call_seconds = time.time(), 0.0
            eval_bytes_before = self.totals["bytes_down_eval"]
            record = self.train_round(server_round, phase)
            self.totals["bytes_down"] += record["bytes_down"]
            self.totals["bytes_up"] += record["bytes_up"]
            messages = record["cohort_size"]
            if self.evaluated(server_round):
                eval_start, eval_users = time.time(), self.eval_users(server_round)
                final = self.evaluate(server_round, eval_users, phase.name)
                messages += len(eval_users)
                record.update(self.scores(final))
                record.update(self.log_round_scores(server_round, final))
                record["n_evaluated"] = len(final)
                if server_round == self.total_rounds:
                    self.timings["final_eval_s"] = time.time() - eval_start
            record["bytes_down_eval"] = self.totals["bytes_down_eval"] - eval_bytes_before
            self.timings["rounds_s"].append(time.time() - round_start)
            self.timings["messages"].append(messages)
            self.timings["call_s"].append(self.call_seconds)
            record.update({"round": server_round, "seconds": time.time() - round_start,
                           "failed_calls_total": len(self.failures),
                           "bytes_down_total": self.totals["bytes_down"], "bytes_up_total": self.totals["bytes_up"],
                           "bytes_down_eval_total": self.totals["bytes_down_eval"]})
            self.reporter.log_round(record)
            if STOPPING.is_set():  # interrupted: the entry point is shutting Ray down; the round may hold failures it caused
                raise RuntimeError("interrupted (SIGINT or SIGTERM)")
            self.done_rounds = server_round
            self.checkpoint().save(self.run_dir)  # the round is complete
            headline = self.metric_names[0]
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
        return self.finish(final, new, self.wall_before + time.time() - self.started)

    def stop_for_budget(self, server_round: int) -> list[Message]:
        """``privacy.max_epsilon`` stops training before ``server_round``: the last completed round
        becomes the run's last, and every trained user is scored at it (its scores replace that
        round's, which may have been a sample)."""
        spent = self.accountant.epsilon() if self.accountant is not None else 0.0
        self.budget_stop, last = server_round, self.done_rounds
        self.bar.write(f"privacy.max_epsilon={self.config.privacy.max_epsilon:g}: round {server_round} would take epsilon "
                       f"past it (spent {spent:.3f} after round {last}); training stops here, every user is scored at round {last}")
        self.total_rounds = last
        if not last:
            return []
        phase = self.schedule()[last - 1][1].name
        final = self.evaluate(last, self.trained_users, phase)
        self.round_scores = [row for row in self.round_scores if row["round"] != last]
        self.log_round_scores(last, final)
        return final

    def run_new_users(self) -> dict[str, list[Message]]:
        """The new users (``data.new_users``), after the last round: each takes the final shared
        part, trains what the strategy gives a new user (its private part; fedavg: the whole
        model) on its own training split, and is scored. Where the final shared part is a new
        user's whole model (fedavg), it is also scored before the fine-tune ("as_is"). The
        checkpoint then records each new user's adapter (for export); a resumed run does it all
        again from the start (the same final shared part and seeds: the same results)."""
        if not self.new_users:
            return {"new": [], "as_is": []}
        self.last_round[self.new_users] = 0  # they start from the common init, also when done before
        self.examples_processed[self.new_users] = 0
        last = self.schedule()[-1][1].name
        fine_tune_round = self.total_rounds + 1  # its seed and store file; never a round of the schedule
        as_is = self.evaluate(self.total_rounds, self.new_users, last) if self.accounting.get("new_users_as_is") else []
        trained, down = self.call(self.new_users, TRAIN, fine_tune_round, self.shared, NEW_USERS)
        self.totals["bytes_down"] += down
        for reply in trained:
            self.record_training(reply, fine_tune_round)
        self.checkpoint().save(self.run_dir)
        new = self.evaluate(fine_tune_round, [partition_id(r) for r in trained], last)
        headline = self.metric_names[0]
        values = [r.content.metric_records["metrics"][headline] for r in new]
        self.bar.write(f"new users: fine-tuned {len(trained)}/{len(self.new_users)}, {headline} "
                       f"{float(np.mean(values)) if values else float('nan'):.4f}")
        return {"new": new, "as_is": as_is}

    def log_round_scores(self, server_round: int, replies: list[Message]) -> dict[str, float]:
        """Keep (and append to ``rounds_per_user.jsonl``) each scored user's validation and test
        scores of this round; returns the mean validation scores (``val_<metric>``)."""
        rows = [round_row(server_round, self.user_ids[partition_id(r)], partition_id(r), r.content.metric_records["metrics"],
                          self.metric_names) for r in replies]
        self.round_scores += rows
        self.reporter.log_user_rounds(rows)
        out = {}
        for name in self.metric_names:
            values = [row["val"][name] for row in rows if name in row["val"]]
            out[f"val_{name}"] = float(np.mean(values)) if values else float("nan")
        return out

    def scores(self, replies: list[Message]) -> dict[str, float]:
        """Each metric's headline value under its plain name (LaMP: the benchmark's own corpus-level
        score over all questions; PEFT-U and synthetic: the unweighted mean over users of per-user
        scores) and its per-user distribution (``_mean``, ``_median``, ``_p10``, ``_min``)."""
        out = self.distribution({name: [r.content.metric_records["metrics"][name] for r in replies] for name in self.metric_names})
        if self.task.corpus_metrics and replies:
            infos = [r.content.config_records["info"] for r in replies]
            predictions = [p for info in infos for p in info["predictions"]]
            golds = [g for info in infos for g in json.loads(str(info["golds"]))]
            out.update(corpus_scores(self.task, predictions, golds))
        return out

    def distribution(self, values: dict[str, list[float]]) -> dict[str, float]:
        """Per metric: the mean over users under its plain name, and ``_mean``, ``_median``, ``_p10``, ``_min``."""
        out: dict[str, float] = {}
        for name in self.metric_names:
            stats = M.summarize(values[name])
            out.update({f"{name}_{k}": stats[k] for k in ("mean", "median", "p10", "min")})
            out[name] = stats["mean"]
        return out

    def finish(self, final: list[Message], new: dict[str, list[Message]], wall: float) -> dict[str, Any]:
        """The run's results: ``final``, the trained users' last evaluation; ``new``, the new users'
        scores after their fine-tune (and, fedavg, before it: "as_is")."""
        totals = self.totals
        if self.shared:
            tensors = {k: v.contiguous() for k, v in self.shared.items()}
            atomic_write(self.run_dir / "shared_final.safetensors", lambda tmp: save_file(tensors, tmp))
        scores = {partition_id(r): r for r in final + new["new"]}
        as_is = {partition_id(r): r for r in new["as_is"]}
        held_out = set(self.new_users)
        last_failure = {f["partition_id"]: f for f in self.failures}  # the latest failure of each user
        per_user, predictions = [], []
        for index, user_id in enumerate(self.user_ids):
            row: dict[str, Any] = {"user_id": user_id, "partition_id": index, "group": "new" if index in held_out else "trained",
                                   "rounds_trained": int(self.rounds_trained[index]),
                                   "rounds_scheduled": int(self.rounds_scheduled[index]),
                                   "examples_processed": int(self.examples_processed[index]),
                                   "failed_calls": sum(f["partition_id"] == index for f in self.failures)}
            if index not in scores:  # a user scored at the end counts as scored, whatever failed before
                failure = last_failure.get(index, {"error": "no evaluation reply", "traceback": ""})
                row.update(status="failed", error=failure["error"], traceback=failure["traceback"])
            else:
                m, info = scores[index].content.metric_records["metrics"], scores[index].content.config_records["info"]
                row.update(status="ok", n_test=int(m["n_test"]), n_train=int(m["n_train"]), error="",
                           **{name: m[name] for name in self.metric_names})
                if index in as_is:
                    row.update({f"as_is_{name}": as_is[index].content.metric_records["metrics"][name] for name in self.metric_names})
                predictions.append({"user_id": user_id, "group": row["group"], "sample_ids": list(info["sample_ids"]),
                                    "predictions": list(info["predictions"])})
            per_user.append(row)
        store = AdapterStore(self.config.output.store_dir, self.identity.run_id)
        store.keep_only(dict(zip(self.user_ids, self.last_round.tolist())))  # each user's final adapter only
        stored = [store.bytes_stored(u, int(r)) for u, r in zip(self.user_ids, self.last_round)]
        ok = [row for row in per_user if row["status"] == "ok" and row["group"] == "trained"]
        n_failed = len(self.trained_users) - len(ok)
        skipped = get_benchmark(self.config).skipped_users()
        rule = self.config.federation.select
        selection_info: dict[str, Any] = {"rule": rule, "metric": self.metric_names[0], "file": ROUNDS_FILE}
        if rule == "final":
            chosen = self.scores([scores[row["partition_id"]] for row in ok])
        else:  # corpus-level benchmarks are refused at start (fedpeft.federation.selection.check_selection)
            selection = apply_selection(per_user, self.round_scores, rule, self.metric_names,
                                        self.metric_names[0] in M.LOWER_IS_BETTER, self.total_rounds)
            chosen = self.distribution({name: [row[name] for row in ok] for name in self.metric_names})
            selection_info.update(round=selection.round, fallback=selection.counts(),
                                  description=describe(selection, self.total_rounds))
        # trained users whose cohorts gave them rounds they did not train (failed calls): scored, but on less training
        undertrained = int(sum(self.rounds_trained[i] < self.rounds_scheduled[i] for i in self.trained_users))
        # the run's verdict over every user, trained and new (fedpeft.federation.verdict): a diverged user is scored, not failed
        verdict = run_verdict(per_user, self.failures, self.config.federation.max_failed_fraction, self.config.train.lr)
        summary: dict[str, Any] = {"n_evaluated": len(ok), "n_failed": n_failed, "n_skipped": len(skipped),
                                   "n_undertrained": undertrained, **chosen}
        # the sweep metric: the validation score the rule chose by (never a test score)
        summary.update(selected_validation(self.round_scores, rule, self.metric_names,
                                           self.metric_names[0] in M.LOWER_IS_BETTER, self.total_rounds))
        if self.accountant is not None:  # the run's epsilon beside its scores (W&B summary: sweeps over privacy)
            summary["epsilon"] = self.privacy_report()["epsilon"]
        groups = {"trained": {"users": len(self.trained_users), **summary}}
        if self.new_users:
            groups.update(self.new_user_groups(per_user, scores, as_is))
            summary.update({f"{group}_{key}": value for group in ("new", "new_as_is") for key, value in groups.get(group, {}).items()
                            if key in self.metric_names or key in ("n_evaluated", "n_failed")})
        results = {
            **verdict,  # status (ok, degraded, failed), status_reason, status_counts
            "metrics": self.metric_names,
            "headline": "corpus" if self.task.corpus_metrics else "mean over users",
            "strategy": self.config.federation.strategy, "benchmark": self.config.data.benchmark,
            "model": self.config.model.name, "num_users": len(self.user_ids), "rounds": self.total_rounds,
            "summary": summary, "groups": groups, "by_activity": self.activity(per_user), "selection": selection_info, "wall_seconds": wall, "run_dir": str(self.run_dir),
            # bytes_total: the training traffic (down and up); evaluation messages carry the shared part down too
            "communication": {**totals, "bytes_total": totals["bytes_down"] + totals["bytes_up"],
                              "bytes_total_with_eval": totals["bytes_down"] + totals["bytes_up"] + totals["bytes_down_eval"]},
            "parameters": {k: v for k, v in self.accounting.items() if k != "pretrain_examples"},
            "private_bytes_per_user": {"mean": float(np.mean(stored)) if stored else 0.0, "max": int(max(stored, default=0))},
            "failed_users": {row["user_id"]: row["error"] for row in per_user if row["status"] != "ok"},
            "failed_calls": len(self.failures),
            "privacy": self.privacy_report(),
            "diverged": divergence_counts(self.failures),  # failed calls whose loss or weights became non-finite
            "compute": {"examples_processed_per_user_mean": float(self.examples_processed.mean()) if len(self.user_ids) else 0.0,
                        "examples_processed_total": int(self.examples_processed.sum()),
                        "driver_pretrain_examples": int(self.accounting.get("pretrain_examples", 0)),
                        # train.pack_users > 1: the worker count its calls were cut into bundles for (the run's first start's)
                        "bundle_workers": self.bundle_workers if self.config.train.pack_users > 1 else 0},
            "skipped_users": skipped,
            "data": data_summary(get_benchmark(self.config)),  # labels, users and examples per split
            "workers": {str(pid): loads for pid, loads in sorted(self.worker_loads.items())},
            # this process's own: wall times of its phases and the driver's peak resident memory
            "timings": {**self.timings,
                        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024},
        }
        self.reporter.write_final(per_user, results, predictions, self.metric_names, self.failures, selected=rule != "final",
                                  as_is=bool(as_is))
        return results

    def privacy_report(self) -> dict[str, Any]:
        """results.json's ``privacy``: the accountant's report (fedpeft.federation.privacy) and the round
        ``privacy.max_epsilon`` stopped before (0: none); without DP, only whether anything was
        released (epsilon None = unbounded; 0 for a strategy that shares nothing)."""
        if self.accountant is None:
            return {"mechanism": "none", "epsilon": None if self.accounting.get("shared_params") else 0.0}
        return {**self.accountant.report(self.config.privacy), "stopped_before_round": self.budget_stop}

    def new_user_groups(self, per_user: list[dict[str, Any]], scores: dict[int, Message],
                        as_is: dict[int, Message]) -> dict[str, dict[str, Any]]:
        """The new users' summaries: after the fine-tune ("new") and, fedavg, before it ("new_as_is")."""
        scored = [row["partition_id"] for row in per_user if row["group"] == "new" and row["status"] == "ok"]
        count = len(self.new_users)
        groups = {"new": {"users": count, "n_evaluated": len(scored), "n_failed": count - len(scored),
                          **self.scores([scores[i] for i in scored])}}
        if as_is:
            groups["new_as_is"] = {"users": count, "n_evaluated": len(as_is), "n_failed": count - len(as_is),
                                   **self.scores(list(as_is.values()))}
        return groups

    def activity(self, per_user: list[dict[str, Any]]) -> dict[str, Any]:
        """Per group, the scored users binned by their number of training examples
        (:func:`fedpeft.data.activity.by_activity`), every metric's mean per bin."""
        out: dict[str, Any] = {}
        for group in ("trained", "new"):
            rows = [row for row in per_user if row["group"] == group and row["status"] == "ok"]
            if rows:
                out[group] = by_activity({row["user_id"]: row for row in rows}, {row["user_id"]: row["n_train"] for row in rows},
                                         self.metric_names)
        return out


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


def bundle_users(users: list[int], pack: int, workers: int) -> list[list[int]]:
    """``users`` (in partition order) cut into consecutive bundles of at most ``pack`` users: the
    fewest that keep every worker busy (a multiple of the workers, at most one per user), of
    sizes that differ by at most one, so that no worker trains a big bundle while another idles."""
    if pack <= 1:
        return [[u] for u in users]
    count = -(-len(users) // pack)
    count = min(len(users), -(-count // workers) * workers)
    size, extra = divmod(len(users), max(1, count))
    bundles, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        bundles.append(users[start:end])
        start = end
    return bundles


def replied_users(reply: Message) -> int:
    """How far a reply moves the progress bar: the users it answers for (a packed reply answers
    for several; a call Ray must send again, for none; a failed one counts once)."""
    if worker_unavailable(reply):
        return 0
    return 1 if reply.has_error() else len(reply.content.metric_records)


def partition_id(reply: Message) -> int:
    return int(reply.content.metric_records["metrics"]["partition_id"])


def run_prepared(config: Config, prepared: Any, grid: Grid) -> dict[str, Any]:
    """Run one :class:`FederatedRun` on ``grid`` from what :func:`fedpeft.sim.prepare_run` made;
    the one code path of both entry points (``python -m fedpeft.sim`` and ``flwr run .``)."""
    from fedpeft.federation.flower_logs import quiet_lost_workers

    quiet_lost_workers()  # a worker lost mid-call is that user's failure, reported by fedpeft: not Flower's tracebacks
    return FederatedRun(config, prepared.run_dir, grid, prepared.initial_shared, prepared.accounting,
                        prepared.identity, prepared.resume).run()


def make_server_app(config: Config, prepared: Callable[[], Any], results: dict[str, Any]) -> ServerApp:
    """A ServerApp whose main waits for the run's preparation (``prepared()``: the
    :class:`fedpeft.sim.PreparedRun`, made while the simulation's workers start), then runs
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
