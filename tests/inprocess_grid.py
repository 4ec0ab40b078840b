"""An in-process Flower grid: FederatedRun drives fedpeft's real ClientApp in this process.

For tests of round logic without Ray: every pushed message is handled at once by
``fedpeft.federation.client_app.app`` with a Context that names the node's partition id, and its reply waits
to be pulled. ``reply_order_seed`` hands replies back in a scrambled order, as Ray may deliver
them, so that tests can show results never depend on arrival order.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid

NODE_ID_BASE = 1000  # node ids are arbitrary in Flower; distinct from partition ids on purpose


class InProcessGrid(Grid):
    def __init__(self, num_nodes: int, reply_order_seed: int | None = None) -> None:
        from fedpeft.federation.client_app import app

        self.client_app = app
        self.partition = {NODE_ID_BASE + 7 * i: i for i in range(num_nodes)}
        self.waiting: list[Message] = []
        self.rng = random.Random(reply_order_seed) if reply_order_seed is not None else None
        self._run: Any = None

    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.partition)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            node = message.metadata.dst_node_id
            context = Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                              node_config={"partition-id": self.partition[node], "num-partitions": len(self.partition)})
            self.waiting.append(self.client_app(message, context))
            ids.append(message.metadata.message_id)
        if self.rng is not None:
            self.rng.shuffle(self.waiting)
        return ids

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = set(message_ids)
        out = [m for m in self.waiting if m.metadata.reply_to_message_id in wanted]
        self.waiting = [m for m in self.waiting if m.metadata.reply_to_message_id not in wanted]
        return out


def run_in_process(config: Any, reply_order_seed: int | None = None, resume: bool = False,
                   grid_class: type[InProcessGrid] = InProcessGrid) -> tuple[dict[str, Any], Path]:
    """What ``fedpeft.sim.run`` does, minus Ray: returns (results, run folder)."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedpeft.data import get_benchmark
    from fedpeft.federation.server_app import run_prepared, simulated_nodes
    from fedpeft.launch.prepare import prepare_run

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # the ServerApp's identity
    p = prepare_run(config, resume)
    grid = grid_class(simulated_nodes(config, len(get_benchmark(config).user_ids())), reply_order_seed)
    return run_prepared(config, p, grid), p.run_dir
