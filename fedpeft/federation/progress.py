"""The run's users and what each has done so far: the bookkeeping a checkpoint keeps.

:class:`RunProgress` splits the benchmark's users into the trained ones and the new ones
(``data.new_users``: held out of every cohort, trained and scored at the end), and counts per
user the rounds scheduled and trained, the round of its stored adapter and the examples it
processed; beside them, the failed calls, each worker's backbone loads, the bytes sent, and the
worker count packed calls are cut for. :meth:`RunProgress.state` is the checkpoint's progress
record and :meth:`RunProgress.restore` reads it back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Message


def partition_id(reply: Message) -> int:
    """The user (its partition index) a reply answers for."""
    return int(reply.content.metric_records["metrics"]["partition_id"])


class RunProgress:
    """Per-user counters and the run's call records, updated in place as the rounds go."""

    def __init__(self, user_ids: list[str], new_users: list[int]) -> None:
        n = len(user_ids)
        self.user_ids = user_ids
        self.new_users = new_users  # held out of every cohort; trained and scored at the end
        held_out = set(new_users)
        self.trained_users = [i for i in range(n) if i not in held_out]
        self.failures: list[dict[str, Any]] = []  # one record per failed call: round, call, user, reason
        self.rounds_trained = np.zeros(n, dtype=int)
        self.rounds_scheduled = np.zeros(n, dtype=int)  # rounds whose cohort held the user
        self.last_round = np.zeros(n, dtype=int)  # the round that wrote each user's stored adapter
        self.examples_processed = np.zeros(n, dtype=np.int64)
        self.rounds_dropped = np.zeros(n, dtype=int)  # rounds it was sampled but dropped out or missed the deadline
        self.dropped = {"dropped_out": 0, "late": 0}
        self.sim_time = 0.0  # the simulated clock (fedpeft.federation.participation)
        self.worker_loads: dict[int, int] = {}
        self.totals = {"bytes_down": 0, "bytes_up": 0, "bytes_down_eval": 0}
        # the worker count that cuts packed calls into bundles (fedpeft.federation.server_calls.bundle_users):
        # the client worker processes at the run's start, kept by its checkpoint, so that a run
        # resumed on more or fewer workers packs the same users together (with dropout on, a
        # bundle's draws depend on who is in it); 0: not known yet (set as the rounds start)
        self.bundle_workers = 0

    def state(self, wall_seconds: float) -> dict[str, Any]:
        """The checkpoint's progress record (the privacy accountant's state is added beside it)."""
        return {"rounds_trained": self.rounds_trained.tolist(), "rounds_scheduled": self.rounds_scheduled.tolist(),
                "last_round": self.last_round.tolist(),
                "examples_processed": self.examples_processed.tolist(), "failures": self.failures,
                "worker_loads": {str(k): v for k, v in self.worker_loads.items()}, "totals": self.totals,
                "bundle_workers": self.bundle_workers,
                "rounds_dropped": self.rounds_dropped.tolist(), "dropped": self.dropped, "sim_time": self.sim_time,
                "wall_seconds": wall_seconds}

    def restore(self, p: dict[str, Any]) -> None:
        """Read back a checkpoint's progress record (``wall_seconds`` is the run's to read)."""
        self.rounds_trained[:] = p["rounds_trained"]
        self.rounds_scheduled[:] = p.get("rounds_scheduled", p["rounds_trained"])  # not recorded before: unknown
        self.last_round[:] = p["last_round"]
        self.examples_processed[:] = p["examples_processed"]
        self.failures = list(p["failures"])
        self.worker_loads = {int(k): int(v) for k, v in p["worker_loads"].items()}
        self.totals = {"bytes_down_eval": 0, **p["totals"]}
        self.bundle_workers = int(p.get("bundle_workers", 0))  # not recorded before: the workers of this start
        self.rounds_dropped[:] = p.get("rounds_dropped", 0)  # not recorded before: nobody dropped
        self.dropped = {"dropped_out": 0, "late": 0, **p.get("dropped", {})}
        self.sim_time = float(p.get("sim_time", 0.0))

    def record_training(self, reply: Message, server_round: int) -> int:
        """A successful train reply: its user's stored adapter is now of ``server_round``, and its
        examples count. Returns the user."""
        user = partition_id(reply)
        self.last_round[user] = server_round
        self.examples_processed[user] += int(reply.content.metric_records["metrics"]["examples_processed"])
        return user

    def note_dropped(self, dropped: list[int], late: list[int], seconds: float) -> None:
        """A round's users who dropped out and whose replies came too late; its simulated seconds."""
        for users in (dropped, late):
            self.rounds_dropped[users] += 1
        self.dropped["dropped_out"] += len(dropped)
        self.dropped["late"] += len(late)
        self.sim_time += seconds

    def fail(self, user: int, kind: str, server_round: int, phase: str, reason: str) -> None:
        """Record a failed call of ``user`` (the round goes on without it)."""
        self.failures.append({"round": server_round, "phase": phase, "call": kind, "user_id": self.user_ids[user],
                              "partition_id": user, "error": reason.splitlines()[-1] if reason else "",
                              "traceback": reason})
