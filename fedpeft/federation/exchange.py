"""Pushing a call's messages and pulling their replies through a Flower Grid, a window at a time.

Flower's in-memory simulation state keeps the messages in flight in one store, and its fleet
thread (``vce_api.add_messages_to_queue``) calls ``get_message_ins`` for every node every 0.1 s,
which scans that whole store; so a scan costs nodes x messages in flight, and messages are built
only as the window reaches them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from flwr.app import Message
from flwr.serverapp import Grid


def worker_unavailable(reply: Message) -> bool:
    """A call that reached a worker while Ray was restarting it: it never ran. (The call that was
    running when the worker died says "Socket closed" or "died" instead, and is not sent again.)"""
    return reply.has_error() and "actor is restarting" in reply.error.reason


class LazyMessages(Sequence):
    """``count`` messages, each built by ``build(i)`` only when a slice of them is taken (as the
    message window reaches them), so that a call to thousands of users does not hold thousands
    of messages, each with its own copy of the run's config, at once."""

    def __init__(self, count: int, build: Callable[[int], Message]) -> None:
        self.count, self.build = count, build

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.build(i) for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return self.build(index % self.count)


def exchange(grid: Grid, messages: Sequence[Message], no_reply_timeout: float,
             on_reply: Callable[[Message], None] | None = None, window: int = 0) -> list[Message | None]:
    """Push messages and pull their replies, calling ``on_reply`` as each one arrives; at most
    ``window`` messages are in flight at once (0: all of them). Returns each message's reply, in
    the order of ``messages``; None for those still unanswered (or never pushed) when no reply at
    all has arrived for ``no_reply_timeout`` seconds (a lost worker or node).

    Why a window: Flower's in-memory simulation state keeps the messages in flight in one store,
    and its fleet thread (``vce_api.add_messages_to_queue``) calls ``get_message_ins`` for every
    node every 0.1 s, which scans that whole store; so a scan costs nodes x messages in flight."""
    window = window or len(messages)
    ids: list[str] = []
    pending: set[str] = set()
    replies: dict[str, Message] = {}
    last_reply = time.monotonic()
    while pending or len(ids) < len(messages):
        if len(pending) < window and len(ids) < len(messages):
            pushed = list(grid.push_messages(messages[len(ids):len(ids) + window - len(pending)]))
            ids += pushed
            pending.update(pushed)
        got = list(grid.pull_messages(pending))
        for reply in got:
            pending.discard(reply.metadata.reply_to_message_id)
            replies[reply.metadata.reply_to_message_id] = reply
            if on_reply:
                on_reply(reply)
        if got:
            last_reply = time.monotonic()
        elif time.monotonic() - last_reply > no_reply_timeout:
            break
        else:
            time.sleep(0.05)
    return [replies.get(i) for i in ids] + [None] * (len(messages) - len(ids))
