"""Benchmarks: users, their train/val/test examples and the task spec.

A benchmark lists its users cheaply (ids only) and loads one user's examples on demand, so a
client holds only its own user. ``get_benchmark`` keeps one instance per process and config.
Benchmarks are registered by family: ``synthetic``, ``peft-u/<task>``, ``lamp/LaMP-<n>``; the
part after the slash reaches the class as ``self.task_name``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from typing import Any

from fedpeft.config import Config, ConfigError
from fedpeft.tasks import TASK_KINDS, TaskSpec  # noqa: F401  (re-exported: users import them from here)


@dataclass(frozen=True)
class Example:
    """One example. ``text`` is the user's input (the question), never cut to make room for
    anything else; ``history`` holds context items put before it (LaMP's retrieved profile
    items, most relevant first), which give way first when the input is over the token budget.
    :func:`fedpeft.learning.inputs.model_text` builds what the model reads from both, the same way for
    training and prediction (see :func:`fedpeft.data.retrieval.fit_prompt`)."""

    id: str
    text: str
    labels: tuple[str, ...]
    history: tuple[str, ...] = ()


@dataclass
class UserData:
    user_id: str
    train: list[Example]
    val: list[Example]
    test: list[Example]


class Benchmark:
    """Base class: subclasses set ``name`` (the family) and implement the three methods.
    ``data_keys`` are the ``data.*`` keys only this family reads; setting one for another
    benchmark is refused (:func:`check_data_keys`)."""

    name: str = ""
    default_max_length: int = 128  # tokens per input when data.max_length is 0
    data_keys: tuple[str, ...] = ()

    def __init__(self, config: Config) -> None:
        self.config = config
        self.task_name = config.data.benchmark.partition("/")[2]

    def skipped_users(self) -> dict[str, str]:
        """Users left out while loading (user id -> why), reported in the run's summary."""
        return {}

    def driver_files(self) -> list[str]:
        """Files the driver prepared that every worker must see (e.g. the processed-data cache)."""
        return []

    def user_ids(self) -> list[str]:
        raise NotImplementedError

    def task(self) -> TaskSpec:
        raise NotImplementedError

    def load_user(self, index: int) -> UserData:
        raise NotImplementedError

    def split_counts(self) -> list[tuple[int, int, int]]:
        """(train, val, test) examples of each user, in :meth:`user_ids` order. This default loads
        every user; benchmarks that know the counts cheaply (a cache index, a config) override it."""
        counts = []
        for i in range(len(self.user_ids())):
            user = self.load_user(i)
            counts.append((len(user.train), len(user.val), len(user.test)))
        return counts


def data_summary(bench: Benchmark) -> dict[str, Any]:
    """What a run trained and scored on, for its results.json: the benchmark, its kind and label
    set, the number of users and of examples per split over all of them, and how many users
    were skipped while loading (the reasons are in results.json's ``skipped_users``)."""
    task = bench.task()
    counts = bench.split_counts()
    return {"benchmark": bench.config.data.benchmark, "kind": task.kind, "labels": list(task.labels),
            "users": len(counts), "examples": {s: int(sum(c[i] for c in counts)) for i, s in enumerate(("train", "val", "test"))},
            "skipped_users": len(bench.skipped_users())}


BENCHMARKS: dict[str, type[Benchmark]] = {}


def register_benchmark(cls: type[Benchmark]) -> type[Benchmark]:
    BENCHMARKS[cls.name] = cls
    return cls


def _shown(family: str) -> str:
    return f"{family}/<task>" if getattr(BENCHMARKS[family], "has_tasks", False) else family


BUILT_IN_FAMILIES = ("synthetic", "peft-u", "lamp")


def check_data_keys(config: Config) -> None:
    """Refuse a ``data.*`` key set (to a value other than its default) that only another
    benchmark family reads, e.g. data.num_users with peft-u/tweeteval: it would be ignored."""
    family = benchmark_family(config.data.benchmark)
    own = set(BENCHMARKS[family].data_keys)
    defaults = Config().data
    readers: dict[str, list[str]] = {}  # key -> the families that read it (a plug-in may subclass one)
    for other, cls in sorted(BENCHMARKS.items()):
        for key in cls.data_keys:
            readers.setdefault(key, []).append(other)
    for key, families in readers.items():
        value, default = getattr(config.data, key), getattr(defaults, key)
        if key not in own and value != default:
            shown = sorted(families, key=lambda f: (f not in BUILT_IN_FAMILIES, f))  # the built-in one first
            raise ConfigError(
                f"data.{key}={value!r} applies to the {' / '.join(_shown(f) for f in shown)} benchmark only, and "
                f"data.benchmark='{config.data.benchmark}' ignores it. Remove data.{key} (or set it back to "
                f"{default!r}), or run --benchmark {_shown(shown[0])}.")


def benchmark_family(name: str) -> str:
    """'peft-u/tweeteval' -> 'peft-u'; raises ConfigError for an unknown family."""
    family = name.partition("/")[0]
    if family not in BENCHMARKS:
        known = ", ".join(_shown(f) for f in sorted(BENCHMARKS))
        raise ConfigError(f"Unknown benchmark '{name}'. Known benchmarks: {known}.")
    return family


@functools.lru_cache(maxsize=8)
def _cached_benchmark(family: str, data_json: str) -> Benchmark:
    config = Config.from_dict({"data": json.loads(data_json)})
    bench = BENCHMARKS[family](config)
    if config.data.max_train_per_user:  # every caller sees the same capped training splits
        from fedpeft.data.user_groups import CappedBenchmark

        return CappedBenchmark(bench, config.data.max_train_per_user, config.data.seed)  # type: ignore[return-value]
    return bench


def input_length(config: Config) -> int:
    """Tokens per input: data.max_length, or the benchmark's own default when that is 0."""
    return config.data.max_length or get_benchmark(config).default_max_length


def get_benchmark(config: Config) -> Benchmark:
    family = benchmark_family(config.data.benchmark)
    return _cached_benchmark(family, json.dumps(dataclasses.asdict(config.data), sort_keys=True))


from fedpeft.data import lamp, peft_u, synthetic  # noqa: E402,F401  (each registers itself)
