"""What travels between the ServerApp and the ClientApps, in one place.

Every message carries the resolved config (a few KB of JSON) and, for train and evaluate,
the shared part of the adapter. Replies carry metrics and, for train, the updated shared part.

Arrays travel as float32 when the model holds them narrower (bfloat16, float16): Flower's
ArrayRecord goes through numpy, which has no bfloat16, and Flower's aggregation would sum float16
arrays in float16. Widening is exact; the receiver casts back to its own dtype (the client when it
loads the adapter, the server when it takes the aggregate).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.config import Config
from fedpeft.plugins import import_plugins

QUERY, TRAIN, EVALUATE = "query", "train", "evaluate"


@functools.lru_cache(maxsize=4)
def config_from_json(text: str) -> Config:
    config = Config.from_dict(json.loads(text))
    import_plugins(config.plugins)  # a worker registers the user's own benchmarks and strategies too
    return config


@dataclass
class Request:
    config: Config
    server_round: int
    phase: str
    shared: dict[str, torch.Tensor]
    run_id: str = ""
    private_round: int = 0  # the round that wrote the user's stored adapter (0: none yet)
    user: int = 0  # the user's index (partition id in fedpeft's sense: its place in the benchmark's user list)
    users: tuple[int, ...] = ()  # a packed call's users (train.pack_users > 1), in partition order; else (user,)
    private_rounds: tuple[int, ...] = ()  # their private_round, in the same order

    def __post_init__(self) -> None:
        self.users = self.users or (self.user,)
        self.private_rounds = self.private_rounds or (self.private_round,)


def transport_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every floating tensor narrower than float32 widened to float32 (exact)."""
    return {k: v.float() if _narrow_float(v) else v for k, v in state.items()}


def _narrow_float(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() and tensor.element_size() < 4


def _array_record(shared: dict[str, torch.Tensor]) -> ArrayRecord:
    """The one place a state dict becomes an ArrayRecord (see the module docstring on dtypes)."""
    return ArrayRecord(torch_state_dict=transport_state(shared)) if shared else ArrayRecord()


def shared_record(shared: dict[str, torch.Tensor]) -> ArrayRecord:
    """The shared part as it travels: build it once and give it to every message of a call."""
    return _array_record(shared)


def make_content(config_json: str, server_round: int, shared: dict[str, torch.Tensor] | ArrayRecord | None = None,
                 phase: str = "", run_id: str = "", private_round: int = 0, user: int = 0,
                 bundle: list[tuple[int, int]] | None = None) -> RecordDict:
    """A request to one user; ``shared`` may be an ArrayRecord from :func:`shared_record`, which
    messages then share (nobody writes to it). ``bundle``: a packed call's (user, private_round)
    pairs (``train.pack_users`` > 1); ``user`` and ``private_round`` are then its first's."""
    run = {"config": config_json, "round": server_round, "phase": phase, "run_id": run_id,
           "private_round": private_round, "user": user}
    if bundle:
        run.update(user=bundle[0][0], private_round=bundle[0][1], users=[u for u, _ in bundle],
                   private_rounds=[r for _, r in bundle])
    content = RecordDict({"run": ConfigRecord(run)})
    if shared is not None:
        content["shared"] = shared if isinstance(shared, ArrayRecord) else _array_record(shared)
    return content


def read_request(message: Message) -> Request:
    run = message.content.config_records["run"]
    shared_record = message.content.array_records.get("shared")
    shared = shared_record.to_torch_state_dict() if shared_record is not None and len(shared_record) else {}
    users = tuple(int(u) for u in run["users"]) if "users" in run else ()
    rounds = tuple(int(r) for r in run["private_rounds"]) if "private_rounds" in run else ()
    return Request(config_from_json(str(run["config"])), int(run["round"]), str(run["phase"]), shared,
                   str(run["run_id"]), int(run["private_round"]), int(run["user"]), users, rounds)


def make_reply(
    message: Message,
    metrics: dict[str, float],
    info: dict[str, str | list[str]],
    shared: dict[str, torch.Tensor] | None = None,
) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord(info)})
    if shared is not None:
        content["shared"] = _array_record(shared)
    return Message(content=content, reply_to=message)


def make_bundle_reply(message: Message, parts: list[tuple[dict[str, float], dict[str, str | list[str]],
                                                         dict[str, torch.Tensor] | None]]) -> Message:
    """A packed call's reply: user j's metrics, info and shared part (as :func:`make_reply` would
    carry them) under ``metrics.j``, ``info.j`` and ``shared.j``; :func:`unbundle` splits it."""
    content = RecordDict()
    for j, (metrics, info, shared) in enumerate(parts):
        content[f"metrics.{j}"], content[f"info.{j}"] = MetricRecord(metrics), ConfigRecord(info)
        if shared is not None:
            content[f"shared.{j}"] = _array_record(shared)
    return Message(content=content, reply_to=message)


def unbundle(reply: Message) -> list[Message]:
    """A reply's per-user replies, in its users' order: a one-user reply as it is, a packed one
    (:func:`make_bundle_reply`) split into replies of the one-user form (same metadata)."""
    content = reply.content
    if "metrics" in content.metric_records:
        return [reply]
    out = []
    for j in range(len(content.metric_records)):
        part = RecordDict({"metrics": content.metric_records[f"metrics.{j}"], "info": content.config_records[f"info.{j}"]})
        if f"shared.{j}" in content.array_records:
            part["shared"] = content.array_records[f"shared.{j}"]
        out.append(Message(content=part, metadata=reply.metadata))
    return out


def array_bytes(record_dict: RecordDict) -> int:
    """Bytes of the arrays in a message (what a real deployment would put on the wire)."""
    return sum(record_bytes(rec) for rec in record_dict.array_records.values())


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of an ArrayRecord's arrays, from their shapes and dtypes (nothing deserialised)."""
    return sum(int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize for arr in record.values())
