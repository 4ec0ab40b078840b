"""Federations as they behave: which users are online in a round (``federation.availability``),
which sampled users drop out mid-round (``federation.dropout_rate``), how fast each user works
(``federation.speed``) and which replies miss the round's deadline (``federation.deadline``).

Every draw depends on ``data.seed`` and the user alone (and the round, for the per-round ones):
every strategy and every model seed sees the same users online in the same rounds, the same
dropouts and the same speeds, and a resumed run draws what the uninterrupted one drew (nothing
is kept between rounds). With the defaults (``const:1``, no dropouts, ``const:1`` speed, no
deadline) nothing is drawn and a run is what it was before these options existed.

Simulated time: a user at speed 1 processes one training example per simulated second; its local
work in a round takes ``examples processed / speed`` seconds. A round lasts as long as its
slowest reply that is kept, or the deadline when one was missed; the run's simulated clock adds
them up (``sim_time`` in metrics.jsonl).
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedpeft.config import Config, ConfigError
from fedpeft.config_checks import Spec, parse_spec

AVAILABILITY, ONLINE, DROPOUT, SPEED = 70, 71, 72, 73  # the draws' tags (data.seed, tag, user[, round])
def _user_rng(seed: int, tag: int, user_id: str) -> np.random.Generator:
    return np.random.default_rng([seed, tag, zlib.crc32(user_id.encode())])


def read_trace(path: str, user_ids: list[str], rounds: int) -> dict[str, np.ndarray]:
    """A trace file: a header ``user,1,2,...,R`` and one row per user of 0/1 (online in that round)."""
    where = f"federation.availability=trace:{path}"
    try:
        with Path(path).expanduser().open(newline="") as f:
            rows = list(csv.reader(f))
    except OSError as err:
        raise ConfigError(f"{where}: cannot read the trace file ({err.strerror or err}).") from None
    if not rows or len(rows[0]) < 2:
        raise ConfigError(f"{where}: the trace needs a header `user,1,2,...,{rounds}` and a row per user.")
    try:
        columns = [int(c) for c in rows[0][1:]]
    except ValueError:
        raise ConfigError(f"{where}: the header's round columns must be round numbers 1..{rounds}, "
                          f"not {rows[0][1:4]}.") from None
    if sorted(columns) != list(range(1, rounds + 1)):
        outside = sorted(set(columns) - set(range(1, rounds + 1)))
        missing = sorted(set(range(1, rounds + 1)) - set(columns))
        raise ConfigError(f"{where}: the run has rounds 1..{rounds}; the trace's round columns "
                          + (f"include rounds out of range {outside[:5]}" if outside else f"miss rounds {missing[:5]}")
                          + " (one column per round, each once).")
    order = np.argsort(columns)
    known, trace = set(user_ids), {}
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        user, values = row[0], row[1:]
        if user not in known:
            raise ConfigError(f"{where}: line {line} names user '{user}', who is not in the benchmark "
                              f"(e.g. {', '.join(user_ids[:3])}).")
        if len(values) != len(columns) or any(v.strip() not in ("0", "1") for v in values):
            raise ConfigError(f"{where}: line {line} (user '{user}') must hold one 0 or 1 per round; found {values[:6]}.")
        trace[user] = np.array([int(v) for v in values], dtype=bool)[order]
    absent = [u for u in user_ids if u not in trace]
    if absent:
        raise ConfigError(f"{where}: the trace has no row for {len(absent)} user(s), e.g. {absent[:3]}; give every user a row.")
    return trace


class Participation:
    """Who is online, who drops out and how long each user's work takes, for one run's users
    (``user_ids``, by partition id) over ``rounds`` rounds (numbered from 1 across phases)."""

    def __init__(self, config: Config, user_ids: list[str], rounds: int, bench: Any = None) -> None:
        fed, seed = config.federation, config.data.seed
        self.user_ids, self.rounds, self.seed = list(user_ids), rounds, seed
        self.dropout_rate, self.deadline = float(fed.dropout_rate), float(fed.deadline)
        availability, speed = parse_spec("federation.availability", fed.availability), parse_spec("federation.speed", fed.speed)
        self.spec_text = {"availability": fed.availability, "speed": fed.speed}
        self.always_online = availability.kind == "const" and availability.params[0] == 1.0
        n = len(self.user_ids)
        if availability.kind == "trace":
            trace = read_trace(availability.path, self.user_ids, rounds)
            self.online_table = np.stack([trace[u] for u in self.user_ids]) if n else np.zeros((0, rounds), bool)
            self.probability = self.online_table.mean(axis=1) if rounds else np.ones(n)
        else:
            self.probability = np.array([self._probability(availability, u) for u in self.user_ids])
            self.online_table = np.stack([_user_rng(seed, ONLINE, u).random(rounds) < p
                                          for u, p in zip(self.user_ids, self.probability)]) if n else np.zeros((0, rounds), bool)
        self.speed = np.array([self._speed(speed, u) for u in self.user_ids])
        self.partial = fed.stragglers == "partial" and bool(self.deadline)
        # under partial: each too slow user's steps that fit the deadline (0: not one), fixed for the run
        self.steps_that_fit = self._steps_that_fit(config, bench) if self.partial and bench is not None else {}
        self._cut_configs: dict[int, str] = {}  # steps -> the config (JSON) a user cut to them is sent
        self.active = not (self.always_online and not self.dropout_rate and not self.deadline and bool(np.all(self.speed == 1.0)))

    def _probability(self, spec: Spec, user_id: str) -> float:
        if spec.kind == "const":
            return spec.params[0]
        rng = _user_rng(self.seed, AVAILABILITY, user_id)
        return float(rng.uniform(*spec.params) if spec.kind == "uniform" else rng.beta(*spec.params))

    def _speed(self, spec: Spec, user_id: str) -> float:
        if spec.kind == "const":
            return spec.params[0]
        return float(np.exp(_user_rng(self.seed, SPEED, user_id).normal(0.0, spec.params[0])))

    def _steps_that_fit(self, config: Config, bench: Any) -> dict[int, int]:
        from fedpeft.learning.schedule import examples_of_steps, step_budget, steps_within

        size, fits = config.train.batch_size, {}
        for user in range(len(self.user_ids)):
            n = len(bench.load_user(user).train)
            steps = step_budget(n, config, None)
            if self.work_seconds(user, examples_of_steps(n, steps, size)) > self.deadline:
                fits[user] = steps_within(n, self.deadline * float(self.speed[user]), size, steps)
        return fits

    def online(self, users: list[int], server_round: int) -> list[int]:
        """The users of ``users`` (partition ids) online in ``server_round``."""
        if self.always_online:
            return list(users)
        return [u for u in users if self.online_table[u, server_round - 1]]

    def dropped_out(self, users: list[int], server_round: int) -> list[int]:
        """The sampled users who never reply in ``server_round`` (``federation.dropout_rate``)."""
        if not self.dropout_rate:
            return []
        return [u for u in users if np.random.default_rng(
            [self.seed, DROPOUT, zlib.crc32(self.user_ids[u].encode()), server_round]).random() < self.dropout_rate]

    def work_seconds(self, user: int, examples: float) -> float:
        """Simulated seconds of ``user``'s local work on ``examples`` training examples."""
        return float(examples) / float(self.speed[user])

    def misses_deadline(self, user: int, examples: float) -> bool:
        return bool(self.deadline) and self.work_seconds(user, examples) > self.deadline

    def round_seconds(self, kept_seconds: list[float], missed: bool) -> float:
        """A round's simulated wall time: the slowest reply kept, or the deadline when one was missed."""
        slowest = max(kept_seconds, default=0.0)
        return max(slowest, self.deadline) if missed else slowest

    def stragglers(self, users: list[int], config: Config) -> tuple[list[int], dict[int, str]]:
        """Under ``stragglers=partial``: (the users who cannot finish one step by the deadline, and
        for each user whose ``train.steps`` would run past it, its config with the steps that fit
        (as JSON, what its message carries)). Nothing otherwise."""
        slow = [u for u in users if u in self.steps_that_fit]
        too_slow = [u for u in slow if not self.steps_that_fit[u]]
        for steps in {self.steps_that_fit[u] for u in slow} - {0} - set(self._cut_configs):
            cut = Config.from_dict(config.to_dict())
            cut.train.steps = steps
            self._cut_configs[steps] = cut.to_json()
        return too_slow, {u: self._cut_configs[self.steps_that_fit[u]] for u in slow if self.steps_that_fit[u]}

    def settle(self, replies: list[Any], user_of: Callable[[Any], int], missed: bool = False,
               ) -> tuple[list[Any], list[int], float]:
        """A round's successful train replies -> (those kept, the users whose reply came after the
        deadline, the round's simulated seconds). A reply's time is its user's examples processed
        in this call over its speed. Under ``stragglers=partial`` every reply is kept (a late user
        was told to stop at the deadline); ``missed``: a user could not reply in time at all."""
        if not self.active:
            return replies, [], 0.0
        kept, late, seconds = [], [], []
        for reply in replies:
            user = user_of(reply)
            work = self.work_seconds(user, reply.content.metric_records["metrics"]["examples_processed"])
            if self.deadline and work > self.deadline and not self.partial:
                late.append(user)
            else:
                kept.append(reply)
                seconds.append(min(work, self.deadline) if self.partial else work)
        return kept, late, self.round_seconds(seconds, bool(late) or missed)

    def round_record(self, server_round: int, trained: list[int], dropped: int, late: int, seconds: float,
                     clock: float) -> dict[str, Any]:
        """What metrics.jsonl (and W&B) log of a round's participation; nothing when inactive."""
        if not self.active:
            return {}
        return {"online": len(self.online(trained, server_round)), "dropped_out": dropped, "late": late,
                "round_sim_seconds": seconds, "sim_time": clock}

    def report(self, trained: list[int], dropped: dict[str, int], clock: float) -> dict[str, Any]:
        """results.json's ``participation``: the options, the trained users' mean availability,
        the replies lost (``dropped_out``: never sent; ``late``: past the deadline) and the clock."""
        return {**self.spec_text, "dropout_rate": self.dropout_rate, "deadline": self.deadline,
                "stragglers": "partial" if self.partial else "drop",
                "mean_availability": float(self.probability[trained].mean()) if trained else float("nan"),
                **dropped, "sim_time": clock}

    def check(self, trained: list[int], examples_per_round: dict[int, float]) -> None:
        """Refuse, before anything starts, a federation in which some round has no trained user
        online, or a deadline that no user can meet."""
        if not self.always_online and trained:
            counts = self.online_table[trained].sum(axis=0)
            empty = [r + 1 for r in np.flatnonzero(counts == 0)]
            if empty:
                raise ConfigError(
                    f"federation.availability: no user is online in round {empty[0]}"
                    + (f" (and {len(empty) - 1} more rounds)" if len(empty) > 1 else "")
                    + f" of {self.rounds}; mean availability {self.probability[trained].mean():.3f} over "
                    f"{len(trained)} users. Raise the availability or use fewer rounds.")
        if self.deadline and examples_per_round:
            fastest = min(self.work_seconds(u, x) for u, x in examples_per_round.items())
            if fastest > self.deadline:
                raise ConfigError(
                    f"federation.deadline={self.deadline:g} simulated seconds: no user can meet it (the fastest takes "
                    f"{fastest:.1f} s for {'one step' if self.partial else 'its local work'}: one example per second at speed 1). "
                    "Raise the deadline, or set 0 to wait for everyone.")
