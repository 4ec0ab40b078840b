"""Benchmarks: users, their train/val/test examples and the task spec.

A benchmark lists its users cheaply (ids only) and loads one user's examples on demand, so a
client holds only its own user. ``get_benchmark`` keeps one instance per process and config.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field

from fedpeft.config import Config, ConfigError


@dataclass(frozen=True)
class Example:
    id: str
    text: str
    labels: tuple[str, ...]


@dataclass
class UserData:
    user_id: str
    train: list[Example]
    val: list[Example]
    test: list[Example]


@dataclass(frozen=True)
class TaskSpec:
    kind: str  # "classification" | "multilabel"
    labels: tuple[str, ...]
    metrics: tuple[str, ...] = field(default=("accuracy", "macro_f1"))


class Benchmark:
    """Base class: subclasses set ``name`` and implement the three methods."""

    name: str = ""

    def __init__(self, config: Config) -> None:
        self.config = config

    def user_ids(self) -> list[str]:
        raise NotImplementedError

    def task(self) -> TaskSpec:
        raise NotImplementedError

    def load_user(self, index: int) -> UserData:
        raise NotImplementedError


BENCHMARKS: dict[str, type[Benchmark]] = {}


def register_benchmark(cls: type[Benchmark]) -> type[Benchmark]:
    BENCHMARKS[cls.name] = cls
    return cls


@functools.lru_cache(maxsize=8)
def _cached_benchmark(name: str, data_json: str) -> Benchmark:
    return BENCHMARKS[name](Config.from_dict({"data": json.loads(data_json)}))


def get_benchmark(config: Config) -> Benchmark:
    name = config.data.benchmark
    if name not in BENCHMARKS:
        raise ConfigError(f"Unknown benchmark '{name}'. Known benchmarks: {', '.join(sorted(BENCHMARKS))}.")
    return _cached_benchmark(name, json.dumps(dataclasses.asdict(config.data), sort_keys=True))


from fedpeft.data import synthetic  # noqa: E402,F401  (registers itself)
