"""The run's privacy budget: the accountant of user-level DP on the shared part, and its cap.

:class:`PrivacyBudget` holds the run's :class:`~fedpeft.federation.privacy_accounting.PrivacyAccountant`
(none without ``privacy.mechanism``), composes each round's release into it, says whether the next
round would take the spent epsilon past ``privacy.max_epsilon`` (the run then stops training before
it), keeps its state in the checkpoint, and writes results.json's ``privacy``.
"""

from __future__ import annotations

from typing import Any

import torch

from fedpeft.config import Config
from fedpeft.federation.privacy_accounting import PrivacyAccountant
from fedpeft.strategies.base import Phase, Strategy


class PrivacyBudget:
    """The accountant over the ``population`` trained users (None: no DP) and the round
    ``privacy.max_epsilon`` stopped training before (``stopped_before``; 0: it did not)."""

    def __init__(self, config: Config, population: int) -> None:
        self.privacy = config.privacy
        private = config.privacy.mechanism != "none"  # user-level DP on the shared part (fedpeft.federation.privacy)
        self.accountant = PrivacyAccountant(population, config.privacy.delta) if private else None
        self.stopped_before = 0

    def state(self) -> dict[str, Any] | None:
        """The accountant's state for the checkpoint (None without DP)."""
        return self.accountant.state() if self.accountant is not None else None

    def restore(self, progress: dict[str, Any]) -> None:
        """The rounds composed so far, from a checkpoint's progress record: the same epsilon."""
        if self.accountant is not None and "privacy" in progress:
            self.accountant = PrivacyAccountant.from_state(progress["privacy"])

    def would_stop(self, strategy: Strategy, shared: dict[str, torch.Tensor], server_round: int, phase: Phase,
                   users: list[int]) -> bool:
        """Whether this round's release would take the spent epsilon past ``privacy.max_epsilon``
        (a phase that shares nothing releases nothing, and is never stopped). Exact: a round costs
        the same whoever fails in it (the mean divides by the users sampled, fedpeft.federation.privacy)."""
        pr = self.privacy
        if self.accountant is None or not pr.max_epsilon or not any(strategy.is_shared(k, phase.name) for k in shared):
            return False
        cohort = strategy.sample_cohort(users, server_round, phase)
        return self.accountant.would_exceed(pr.max_epsilon, pr.noise_multiplier, len(cohort))

    def compose(self, strategy: Strategy) -> None:
        """Compose the round the strategy just released (if it released one under DP)."""
        if self.accountant is not None and strategy.privacy_release is not None:
            self.accountant.compose_release(strategy.privacy_release)

    def round_record(self) -> dict[str, float]:
        """The round record's ``epsilon`` (spent so far); nothing without DP."""
        return {"epsilon": self.accountant.epsilon()} if self.accountant is not None else {}

    def spent(self) -> float:
        return self.accountant.epsilon() if self.accountant is not None else 0.0

    def report(self, accounting: dict[str, Any]) -> dict[str, Any]:
        """results.json's ``privacy``: the accountant's report (fedpeft.federation.privacy_accounting) and the round
        ``privacy.max_epsilon`` stopped before (0: none); without DP, only whether anything was
        released (epsilon None = unbounded; 0 for a strategy that shares nothing)."""
        if self.accountant is None:
            return {"mechanism": "none", "epsilon": None if accounting.get("shared_params") else 0.0}
        return {**self.accountant.report(self.privacy), "stopped_before_round": self.stopped_before}
