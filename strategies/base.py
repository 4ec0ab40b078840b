"""The small base class every strategy builds on."""

from __future__ import annotations

import numpy as np
import torch

from fedpeft.config import Config

State = dict[str, torch.Tensor]


class Strategy:
    """A split of the adapter's keys plus the server's cohort and aggregation rules.

    Subclasses set ``name`` and override :meth:`is_shared`; federated ones may override
    :meth:`aggregate`. Shared versus private is decided here and nowhere else.
    """

    name: str = ""
    description: str = ""

    def __init__(self, config: Config) -> None:
        self.config = config

    # ---- the split (client and server) -------------------------------------------------
    def is_shared(self, key: str) -> bool:
        """Whether a peft state-dict key is shared (sent to the server)."""
        return False

    def split(self, state: State) -> tuple[State, State]:
        """(shared, private) parts of a peft state dict."""
        shared = {k: v for k, v in state.items() if self.is_shared(k)}
        private = {k: v for k, v in state.items() if not self.is_shared(k)}
        return shared, private

    @property
    def shares_anything(self) -> bool:
        return True

    # ---- the server ----------------------------------------------------------------------
    def cohort_size(self, num_users: int) -> int:
        fed = self.config.federation
        size = fed.cohort_size if fed.cohort_size > 0 else round(fed.cohort_fraction * num_users)
        return max(1, min(num_users, size))

    def sample_cohort(self, users: list[int], server_round: int) -> list[int]:
        """Users (partition ids) that train in ``server_round``; deterministic from the seed."""
        size = self.cohort_size(len(users))
        if size == len(users):
            return sorted(users)
        rng = np.random.default_rng([self.config.seed, 10, server_round])
        return sorted(int(u) for u in rng.choice(sorted(users), size=size, replace=False))

    def aggregate(self, shared: State, results: list[tuple[State, int]]) -> State:
        """New shared state from (client shared state, number of examples) pairs: FedAvg."""
        if not results:
            return shared
        total = float(sum(n for _, n in results))
        return {
            key: sum(state[key].double() * (n / total) for state, n in results).to(shared[key].dtype)
            for key in shared
        }
