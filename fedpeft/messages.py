"""What travels between the ServerApp and the ClientApps, in one place.

Every message carries the resolved config (a few KB of JSON) and, for train and evaluate,
the shared part of the adapter. Replies carry metrics and, for train, the updated shared part.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedpeft.config import Config

QUERY, TRAIN, EVALUATE = "query", "train", "evaluate"


@functools.lru_cache(maxsize=4)
def config_from_json(text: str) -> Config:
    return Config.from_dict(json.loads(text))


@dataclass
class Request:
    config: Config
    server_round: int
    phase: str
    shared: dict[str, torch.Tensor]


def make_content(config_json: str, server_round: int, shared: dict[str, torch.Tensor] | None = None,
                 phase: str = "") -> RecordDict:
    content = RecordDict({"run": ConfigRecord({"config": config_json, "round": server_round, "phase": phase})})
    if shared is not None:
        content["shared"] = ArrayRecord(torch_state_dict=shared) if shared else ArrayRecord()
    return content


def read_request(message: Message) -> Request:
    run = message.content.config_records["run"]
    shared_record = message.content.array_records.get("shared")
    shared = shared_record.to_torch_state_dict() if shared_record is not None and len(shared_record) else {}
    return Request(config_from_json(str(run["config"])), int(run["round"]), str(run["phase"]), shared)


def make_reply(
    message: Message,
    metrics: dict[str, float],
    info: dict[str, str | list[str]],
    shared: dict[str, torch.Tensor] | None = None,
) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord(info)})
    if shared is not None:
        content["shared"] = ArrayRecord(torch_state_dict=shared) if shared else ArrayRecord()
    return Message(content=content, reply_to=message)


def array_bytes(record_dict: RecordDict) -> int:
    """Bytes of the arrays in a message (what a real deployment would put on the wire)."""
    return sum(arr.numpy().nbytes for rec in record_dict.array_records.values() for arr in rec.values())
