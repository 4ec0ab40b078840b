"""The server's calls to the simulated clients: discovering the nodes, then sending each call.

:class:`ClientCalls` first finds the simulated nodes and checks, with one query per worker
process, that every worker sees the run's store and data (:meth:`ClientCalls.discover`); then
each train or evaluate call goes out as one message per user, or one per bundle of users a worker
runs packed (:func:`bundle_users`). Replies come back in partition order; a call that fails (the
user's error, a worker that died, no reply) is recorded as its users' failure in the run's
:class:`~fedpeft.federation.progress.RunProgress`, a call that reached a worker Ray is restarting
is sent again as it was, and a write that failed because of the storage stops the run
(:class:`StorageFailure`). What a worker does with a call is :mod:`fedpeft.federation.client_calls`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft.config import Config
from fedpeft.federation import messages as wire
from fedpeft.federation.exchange import LazyMessages, exchange, worker_unavailable
from fedpeft.federation.messages import QUERY, make_content
from fedpeft.federation.progress import RunProgress, partition_id
from fedpeft.federation.store import timeout_note

NODE_WAIT_SECONDS = 120


class StorageFailure(RuntimeError):
    """A write failed because of the storage (a full disk, a read-only or failing file system),
    in a worker or in the driver: the run stops before it checkpoints the round, and continues
    with ``--resume`` from the last complete round once the storage is fixed. ``code``: the errno."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ClientCalls:
    """The run's link to its clients: the grid, the nodes found on it, and the time spent in calls.

    ``retries`` and ``retry_wait``: how often, and after how long, a call that reached a worker Ray
    is restarting is sent again."""

    def __init__(self, config: Config, grid: Grid, run_id: str, progress: RunProgress, bar: Any,
                 retries: int, retry_wait: float) -> None:
        self.config = config
        self.config_json = config.to_json()
        self.grid = grid
        self.run_id = run_id
        self.progress = progress
        self.bar = bar
        self.retries, self.retry_wait = retries, retry_wait
        # a call has federation.call_timeout (then its worker ends itself); this is the backstop
        self.no_reply_timeout = 1.2 * config.federation.call_timeout + 120
        self.window = config.federation.message_window
        self.nodes: list[int] = []
        self.call_seconds = 0.0  # time spent inside client calls (the workers' side), for timings

    def discover(self, expected: int, workers: Callable[[], int]) -> list[int]:
        """The ``expected`` simulated nodes' ids, in node-id order. A node is a transport, not a
        user: every message names its user, and the messages of a call go round-robin over the
        nodes, so no round trip is needed to learn a map, and results do not depend on the number
        of nodes.

        Before any training, query messages go to nodes, a few workers' worth at a time, until
        replies have come from as many worker processes as the simulation runs (``workers()``, asked
        after each wave) or every node was asked: a worker's first call checks that it sees the
        run's store and data, and a worker that does not stops the run here, with the reason."""
        num_users = len(self.progress.user_ids)
        deadline = time.time() + NODE_WAIT_SECONDS
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
                msgs = [Message(content=make_content(self.config_json, 0, run_id=self.run_id, user=i % num_users),
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
            count = workers()
            if problems or len(pids) >= count:
                break
            wave = 4 * count
        if problems:
            raise RuntimeError(f"{len(problems)} simulated node(s) failed their first call, before any training: "
                               + "; ".join(sorted(set(problems))[:3]))
        self.nodes = nodes[:expected]
        return self.nodes

    def call(self, users: list[int], kind: str, server_round: int, shared: dict[str, torch.Tensor],
             phase: str, config_for: dict[int, str] | None = None) -> tuple[list[Message], int]:
        """Send the users their messages: one per user, or (``train.pack_users`` = k > 1) one per
        bundle of up to k consecutive users (:func:`bundle_users`), which a worker runs packed; returns each user's reply
        that succeeded (a packed reply split per user), in partition order (never arrival order, so
        that aggregation and every sum over replies is deterministic), and the bytes sent down (the
        shared part once per user: packing is the simulation's economy, not the protocol's). A
        failed call (the user's error, a worker process that died mid-call, no reply) is recorded
        as the failure of each of its users for this round. ``config_for``: a user's own config
        (JSON) where it differs from the run's (a straggler's steps, fedpeft.federation.participation)."""
        down, ok, storage = 0, [], []
        progress = self.progress
        pack = self.config.train.pack_users
        bundles = bundle_users(list(users), pack, progress.bundle_workers)
        record = wire.shared_record(shared)  # built once, carried by every message of the call
        for attempt in range(self.retries + 1):
            def message(i: int, bundles=bundles) -> Message:  # built as the window reaches it: 15,000 at once weigh
                first = bundles[i][0]
                bundle = [(u, int(progress.last_round[u])) for u in bundles[i]] if pack > 1 else None
                config_json = (config_for or {}).get(first, self.config_json)
                return Message(content=make_content(config_json, server_round, record, phase, self.run_id,
                                                    int(progress.last_round[first]), user=first, bundle=bundle),
                               dst_node_id=self.nodes[i % len(self.nodes)], message_type=kind)

            msgs = LazyMessages(len(bundles), message)
            if attempt == 0:  # resending to a restarted worker is the simulation's cost, not the protocol's
                down = len(users) * wire.record_bytes(record)
            replies = exchange(self.grid, msgs, self.no_reply_timeout * pack, window=self.window,
                               on_reply=lambda r: self.bar.update(replied_users(r)))
            retry = []
            for bundle, reply in zip(bundles, replies):
                if reply is not None and worker_unavailable(reply) and attempt < self.retries:
                    # it reached a worker that Ray is restarting: the call is idempotent, send the same bundle again
                    retry.append(bundle)
                elif reply is None:
                    for user in bundle:
                        progress.fail(user, kind, server_round, phase, f"no reply for {self.no_reply_timeout * pack:.0f} s: "
                                      "its worker or node was lost (federation.call_timeout bounds a call)")
                elif reply.has_error():
                    for user in bundle:
                        note = timeout_note(self.config.output.store_dir, self.run_id, user, kind, server_round)
                        progress.fail(user, kind, server_round, phase, note.read_text() if note.is_file() else
                                      "its worker process died mid-call (killed, out of memory, or a lost node); "
                                      f"Ray replaces it: {reply.error.reason}")
                        note.unlink(missing_ok=True)
                else:
                    for user, part in zip(bundle, wire.unbundle(reply)):
                        m = part.content.metric_records["metrics"]
                        self.call_seconds += float(m["seconds"])
                        progress.worker_loads[int(m["pid"])] = max(progress.worker_loads.get(int(m["pid"]), 0),
                                                                   int(m["backbone_loads"]))
                        if m["failed"] and m.get("storage_errno"):  # the storage's fault: never the user's failure
                            storage.append((int(m["storage_errno"]), str(part.content.config_records["info"]["error"]).strip().splitlines()[-1]))
                        elif m["failed"]:
                            progress.fail(user, kind, server_round, phase, str(part.content.config_records["info"]["error"]).strip())
                        else:
                            ok.append(part)
            if not retry:
                break
            bundles = retry
            time.sleep(self.retry_wait)
        if storage:
            raise StorageFailure(f"{len(storage)} {kind} call(s) of round {server_round} could not write: "
                                 + "; ".join(sorted({why for _, why in storage})[:3]), storage[0][0])
        return sorted(ok, key=partition_id), down


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
