"""Who trains and on how much: new users held out of training, and a cap on training examples.

Both are drawn from ``data.seed`` and the users' ids only, never from the model seed or the
strategy, so every strategy of a comparison holds out the same users and trains on the same
examples.

- ``data.new_users``: users that never enter a training cohort (:func:`new_user_indices`). At the
  end of a run each one takes the final shared part, trains its private part on its own training
  split and is scored: fine-tune-before-test, as FL-bench's ``split=user`` and PFLlib's new-client
  evaluation.
- ``data.max_train_per_user``: each user's training split cut to at most K examples
  (:func:`cap_train`): the first K of a seeded permutation of the split, kept in their original
  order. A smaller K keeps a subset of a larger one (K = 8 is the first 8 of K = 32's draw), so a
  study over K varies the amount of data of the same users. Validation and test are unchanged.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import TYPE_CHECKING, Any

import numpy as np

from fedpeft.config import Config, ConfigError
from fedpeft.config_checks import new_users_spec

if TYPE_CHECKING:
    from fedpeft.data import UserData


def new_user_count(new_users: str | float, num_users: int) -> int:
    """``data.new_users`` as a count (:func:`fedpeft.config_checks.new_users_spec`): a fraction in (0, 1)
    of the users (rounded, at least 1), or a count (``count:N``). At least one user must be left
    to train."""
    kind, value = new_users_spec(new_users)
    if kind == "none":
        return 0
    count = max(1, round(value * num_users)) if kind == "fraction" else int(value)
    if count >= num_users:
        raise ConfigError(f"data.new_users={new_users} holds out {count} of the benchmark's {num_users} users, leaving "
                          "none to train. Give a fraction in (0, 1) or a count below the number of users (count:N).")
    return count


def new_user_indices(config: Config, num_users: int) -> list[int]:
    """The partition ids of the new users (sorted): a draw seeded by ``data.seed`` alone."""
    count = new_user_count(config.data.new_users, num_users)
    if not count:
        return []
    rng = np.random.default_rng([config.data.seed, 60])
    return sorted(int(i) for i in rng.choice(num_users, size=count, replace=False))


def cap_train(user: UserData, cap: int, data_seed: int) -> UserData:
    """The user with its training split cut to at most ``cap`` examples (0: as it is)."""
    if cap <= 0 or len(user.train) <= cap:
        return user
    rng = np.random.default_rng([data_seed, 61, zlib.crc32(user.user_id.encode())])
    keep = sorted(rng.permutation(len(user.train))[:cap].tolist())
    return dataclasses.replace(user, train=[user.train[i] for i in keep])


class CappedBenchmark:
    """A benchmark whose users' training splits are cut by :func:`cap_train`; everything else is
    the wrapped benchmark's (``get_benchmark`` hands it out when ``data.max_train_per_user`` > 0,
    so every caller, client, driver and baseline alike, sees the same examples)."""

    def __init__(self, inner: Any, cap: int, data_seed: int) -> None:
        self.inner, self.cap, self.data_seed = inner, cap, data_seed

    def load_user(self, index: int) -> UserData:
        return cap_train(self.inner.load_user(index), self.cap, self.data_seed)

    def split_counts(self) -> list[tuple[int, int, int]]:
        return [(min(tr, self.cap), va, te) for tr, va, te in self.inner.split_counts()]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
