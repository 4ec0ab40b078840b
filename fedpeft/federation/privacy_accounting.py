"""The privacy accountant: the (epsilon, delta) the released rounds spent, delta's automatic rule,
and the noise multiplier calibrated to ``privacy.target_epsilon``.

**Accounting** (:class:`PrivacyAccountant`, Flower's ``RdpAccountant`` on Google's
``dp-accounting``). fedpeft's cohort sampler (``Strategy.sample_cohort``) draws a fixed number m
of the n training users uniformly *without replacement*, independently each round. The matching
amplification theorem (Wang, Balle, Kasiviswanathan, AISTATS 2019, Thm. 27) holds for the
**replace-one** relation (n is public; neighbouring populations differ in one user's data), so
the accountant is ``SamplingMethod.WITHOUT_REPLACEMENT`` with ``NeighboringRelation.REPLACE_ONE``
— never Poisson, which fedpeft's sampler does not do. Under replace-one a clipped sum moves by
up to 2C, so the noise multiplier relative to the sensitivity is sigma / 2; dp-accounting's RDP
accountant (0.5.1 and 0.6.0) uses the multiplier as given (google/differential-privacy issue 378), so fedpeft
passes sigma / 2 (:func:`replace_one_factor` checks whether the installed backend already does
it). The amplification assumes the cohort draws are secret: fedpeft derives them from ``seed``.
**delta** (``privacy.delta=0``, :func:`automatic_delta`): min(1e-5, 1 / (10 n)). delta bounds the
probability that the guarantee fails outright, so it must lie well below 1 / n (Dwork and Roth
2014, section 2.3; Ponomareva et al. 2023, "How to DP-fy ML"); 1e-5 is the value DP training
usually reports (Abadi et al. 2016 onwards); from n = 10,000 users on, 1 / (10 n) is the smaller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting import PrivacyConfig as FlowerPrivacyConfig
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedpeft.config import ConfigError, PrivacyConfig

ACCOUNTANT = ("flwr.supercore.privacy_accounting.RdpAccountant (dp-accounting RDP): fixed-size sampling "
              "without replacement, replace-one neighbours")
SAMPLING = "fixed-size cohort drawn uniformly without replacement each round (replace-one)"
DENOMINATOR = "users sampled (a sampled user that failed counts as a zero update)"
MAX_NOISE_MULTIPLIER = 1e4  # the largest noise multiplier privacy.target_epsilon may calibrate to


AUTOMATIC_DELTA_CAP = 1e-5  # the conventional delta of DP training; see the module docstring


def automatic_delta(population_size: int) -> float:
    """The delta used when ``privacy.delta=0``: min(1e-5, 1 / (10 n)), n = users in the training
    population (well below 1 / n; see the module docstring)."""
    return min(AUTOMATIC_DELTA_CAP, 1.0 / (10 * population_size))


def resolve_delta(privacy: PrivacyConfig, population_size: int) -> float:
    """``privacy.delta``, or the automatic rule; refuses a delta outside (0, 1/n)."""
    if privacy.delta == 0:
        return automatic_delta(population_size)
    if not 0 < privacy.delta < 1 / population_size:
        raise ConfigError(f"Config key 'privacy.delta' got {privacy.delta!r}; allowed: 0 (automatic: min(1e-5, 1 / (10 x users)) = "
                          f"{automatic_delta(population_size):.3g}) or a number in (0, 1 / {population_size} users = "
                          f"{1 / population_size:.3g}): a delta of 1 / users or more allows releasing one user's data outright.")
    return privacy.delta


@cache
def replace_one_factor() -> float:
    """What fedpeft multiplies sigma by before the backend: 1/2 (the replace-one sensitivity of a
    clipped sum is 2C), or 1 if the installed dp-accounting already doubles it for replace-one
    (then a fully sampled replace-one release costs more than the same add-or-remove one)."""
    from dp_accounting import dp_event
    from dp_accounting.privacy_accountant import NeighboringRelation as Relation
    from dp_accounting.rdp import RdpAccountant as Rdp

    replace = Rdp(neighboring_relation=Relation.REPLACE_ONE)
    replace.compose(dp_event.SampledWithoutReplacementDpEvent(2, 2, dp_event.GaussianDpEvent(2.0)))
    add_remove = Rdp(neighboring_relation=Relation.ADD_OR_REMOVE_ONE)
    add_remove.compose(dp_event.GaussianDpEvent(2.0))
    return 1.0 if replace.get_epsilon(1e-5) > add_remove.get_epsilon(1e-5) * 1.01 else 0.5


@dataclass(frozen=True)
class Release:
    """One round's private aggregate, as the accountant needs it (``Strategy.privacy_release``)."""

    server_round: int
    mechanism: str
    noise_multiplier: float  # the configured sigma (adaptive: the effective one, updates and count together)
    clipping_norm: float  # the bound the updates of this round were clipped to
    sampled: int  # users sampled: the mean's denominator and the noise's calibration (failed users count as 0)
    replied: int  # users whose update is in the sum (fewer when some failed): for reporting, not accounting


class PrivacyAccountant:
    """Spent (epsilon, delta) of the releases so far, for a population of n training users.

    Each round is one Gaussian release on a cohort of m users sampled without replacement,
    composed with Flower's ``RdpAccountant`` (``WITHOUT_REPLACEMENT``, ``REPLACE_ONE``); see the
    module docstring for why, and for the sigma / 2 of replace-one. The mean's denominator is the
    users sampled, so a round costs the same whoever failed. A round with sigma = 0 makes epsilon
    infinite. The state is a JSON ledger of the rounds (identical consecutive rounds merged);
    restoring replays it. A ledger written before the fixed denominator may hold entries with
    ``aggregated`` < ``sample_size`` (the mean was then over the users that replied): they replay
    as they were composed, with sigma * aggregated / sample_size. One release costs dp-accounting about 0.5 s (its RDP orders
    go up to 1024): :meth:`would_exceed` composes the candidate round once, on a copy rebuilt from
    the merged ledger, and :meth:`compose_round` adopts that copy when the round is the candidate.
    """

    def __init__(self, population_size: int, delta: float) -> None:
        if population_size < 1 or not 0 < delta < 1:
            raise ValueError(f"population_size must be >= 1 and delta in (0, 1), got {population_size}, {delta}")
        self.population_size, self.delta = population_size, delta
        self.ledger: list[dict[str, Any]] = []  # {"noise_multiplier", "sample_size", "rounds"} (+ legacy "aggregated")
        self.last_clipping_norm: float | None = None
        self.rounds_with_failures = 0  # rounds in which some sampled user did not reply (reporting only)
        self._backend = self._replay([])
        self._projection: tuple[list[dict[str, Any]], RdpAccountant] | None = None

    def _replay(self, ledger: list[dict[str, Any]]) -> RdpAccountant:
        backend = RdpAccountant(FlowerPrivacyConfig(target_delta=self.delta, population_size=self.population_size,
                                                    neighboring_relation=NeighboringRelation.REPLACE_ONE,
                                                    sampling_method=SamplingMethod.WITHOUT_REPLACEMENT))
        for e in ledger:
            effective = e["noise_multiplier"] * e.get("aggregated", e["sample_size"]) / e["sample_size"]  # legacy: see class
            if effective > 0:  # sigma = 0: no event (epsilon is infinite, see :meth:`epsilon`)
                backend.compose(GaussianPrivacyEvent(noise_multiplier=effective * replace_one_factor(),
                                                     sample_size=e["sample_size"], population_size=self.population_size),
                                e["rounds"])
        return backend

    @staticmethod
    def _merged(ledger: list[dict[str, Any]], entry: dict[str, Any], count: int) -> list[dict[str, Any]]:
        ledger = [dict(e) for e in ledger]
        if ledger and {k: v for k, v in ledger[-1].items() if k != "rounds"} == entry:
            ledger[-1]["rounds"] += count
        else:
            ledger.append({**entry, "rounds": int(count)})
        return ledger

    @property
    def rounds(self) -> int:
        return sum(entry["rounds"] for entry in self.ledger)

    def _entry(self, noise_multiplier: float, sample_size: int, count: int) -> dict[str, Any]:
        if not 1 <= sample_size <= self.population_size or count < 1 or noise_multiplier < 0:
            raise ValueError(f"a round needs 1 <= sample_size ({sample_size}) <= population ({self.population_size}), "
                             f"count >= 1 ({count}) and noise_multiplier >= 0 ({noise_multiplier})")
        return {"noise_multiplier": float(noise_multiplier), "sample_size": int(sample_size)}

    def compose_round(self, noise_multiplier: float, sample_size: int, *, count: int = 1, replied: int | None = None) -> None:
        """Compose ``count`` rounds, each sampling ``sample_size`` users. ``replied`` (default: all)
        only counts the rounds with failures: the mean divides by the users sampled, so each round
        costs noise multiplier sigma whoever replied."""
        replied = sample_size if replied is None else replied
        if not 0 <= replied <= sample_size:
            raise ValueError(f"a round needs 0 <= replied ({replied}) <= sample_size ({sample_size})")
        entry = self._entry(noise_multiplier, sample_size, count)
        ledger = self._merged(self.ledger, entry, count)
        if self._projection is not None and self._projection[0] == ledger:
            self._backend = self._projection[1]
        elif entry["noise_multiplier"] > 0:
            self._backend.compose(GaussianPrivacyEvent(noise_multiplier=noise_multiplier * replace_one_factor(),
                                                       sample_size=sample_size, population_size=self.population_size), count)
        self.ledger, self._projection = ledger, None
        self.rounds_with_failures += count if replied < sample_size else 0

    def compose_release(self, release: Release) -> None:
        """Compose one round from ``Strategy.privacy_release``."""
        self.compose_round(release.noise_multiplier, release.sampled, replied=release.replied)
        self.last_clipping_norm = release.clipping_norm

    @staticmethod
    def _epsilon(ledger: list[dict[str, Any]], backend: RdpAccountant, delta: float) -> float:
        if any(e["noise_multiplier"] == 0 for e in ledger):
            return math.inf
        return float(backend.get_epsilon(delta)) if ledger else 0.0

    def epsilon(self, delta: float | None = None) -> float:
        """Spent epsilon at ``delta`` (default: the accountant's); inf after a round without noise."""
        return self._epsilon(self.ledger, self._backend, self.delta if delta is None else delta)

    def epsilon_after(self, noise_multiplier: float, sample_size: int) -> float:
        """The epsilon one more round sampling ``sample_size`` users brings (exactly: failures cost
        nothing); nothing is composed."""
        ledger = self._merged(self.ledger, self._entry(noise_multiplier, sample_size, 1), 1)
        if self._projection is None or self._projection[0] != ledger:
            self._projection = (ledger, self._replay(ledger))
        return self._epsilon(ledger, self._projection[1], self.delta)

    def would_exceed(self, max_epsilon: float, noise_multiplier: float, sample_size: int) -> bool:
        """Whether one more round would take epsilon past ``max_epsilon`` (the server then stops)."""
        return self.epsilon_after(noise_multiplier, sample_size) > max_epsilon

    def state(self) -> dict[str, Any]:
        """JSON-serialisable state (for the run checkpoint)."""
        return {"schema": 1, "accountant": ACCOUNTANT, "population_size": self.population_size, "delta": self.delta,
                "ledger": [dict(e) for e in self.ledger], "last_clipping_norm": self.last_clipping_norm,
                "rounds_with_failures": self.rounds_with_failures}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PrivacyAccountant:
        """The accountant :meth:`state` describes (its rounds replayed: the same epsilon)."""
        if state.get("schema") != 1:
            raise ValueError(f"unknown privacy accountant state schema {state.get('schema')!r}")
        accountant = cls(int(state["population_size"]), float(state["delta"]))
        accountant.ledger = [dict(e) for e in state["ledger"]]
        accountant._backend = accountant._replay(accountant.ledger)
        accountant.last_clipping_norm = state.get("last_clipping_norm")
        legacy = sum(e["rounds"] for e in accountant.ledger if e.get("aggregated", e["sample_size"]) < e["sample_size"])
        accountant.rounds_with_failures = int(state.get("rounds_with_failures", legacy))  # not recorded before: the ledger's
        return accountant

    def report(self, privacy: PrivacyConfig) -> dict[str, Any]:
        """What results.json's ``privacy`` holds (epsilon None: infinite, no noise)."""
        eps = self.epsilon()
        rates = sorted({e["sample_size"] / self.population_size for e in self.ledger})
        return {"mechanism": privacy.mechanism, "noise_multiplier": privacy.noise_multiplier,
                "clipping_norm": privacy.clipping_norm, "final_clipping_norm": self.last_clipping_norm,
                "delta": self.delta, "target_epsilon": privacy.target_epsilon or None,
                "max_epsilon": privacy.max_epsilon or None, "sampling_model": SAMPLING, "population_size": self.population_size,
                "sampling_rate": rates[0] if len(rates) == 1 else rates, "rounds_composed": self.rounds,
                "rounds_with_failures": self.rounds_with_failures, "denominator": DENOMINATOR,
                "epsilon": None if math.isinf(eps) else eps, "accountant": ACCOUNTANT}


def calibrate_noise(target_epsilon: float, schedule: Sequence[tuple[int, int]], population_size: int, delta: float,
                    max_noise_multiplier: float = MAX_NOISE_MULTIPLIER, limit_hint: str = "") -> float:
    """The noise multiplier whose rounds, ``schedule`` = [(rounds, users sampled), ...], spend
    ``target_epsilon`` at ``delta``: never more, and less by at most 0.1%. Regula falsi (Illinois)
    on log sigma against log epsilon, bracketed; each step is one accountant evaluation."""
    def spent(sigma: float) -> float:
        accountant = PrivacyAccountant(population_size, delta)
        for rounds, sampled in schedule:
            accountant.compose_round(sigma, sampled, count=rounds)
        return accountant.epsilon()

    low, high = 0.0, min(1.0, max_noise_multiplier)  # bracket: eps(low) > target >= eps(high)
    eps_low, eps_high = math.inf, spent(high)
    while eps_high > target_epsilon:
        if high >= max_noise_multiplier:
            rounds = sum(r for r, _ in schedule)
            raise ConfigError(f"Config key 'privacy.target_epsilon' got {target_epsilon!r}, which {rounds} rounds, each sampling "
                              f"{' or '.join(sorted({str(m) for _, m in schedule}))} of {population_size} users, cannot reach at delta "
                              f"{delta:.3g}: even noise multiplier {max_noise_multiplier:.4g}{limit_hint} spends "
                              f"{eps_high:.4g}. Allowed: a target >= {eps_high:.4g}, or fewer rounds, a smaller cohort, "
                              "or a larger privacy.delta.")
        low, eps_low, high = high, eps_high, min(4 * high, max_noise_multiplier)
        eps_high = spent(high)
    while low == 0.0 or eps_low <= target_epsilon:
        if eps_low <= target_epsilon:
            high, eps_high = low, eps_low
        low = high / 4
        eps_low = spent(low)
    f = lambda eps: math.log(max(eps, 1e-300) / target_epsilon)  # noqa: E731  (decreasing in log sigma)
    f_low, f_high, side = f(eps_low), f(eps_high), 0
    for _ in range(60):
        if eps_high >= target_epsilon * (1 - 1e-3) or high - low <= 1e-9 * high:
            break
        x_low, x_high = math.log(low), math.log(high)
        x = x_high - f_high * (x_high - x_low) / (f_high - f_low) if math.isfinite(f_low) else (x_low + x_high) / 2
        mid = math.exp(min(max(x, x_low + 1e-3 * (x_high - x_low)), x_high - 1e-3 * (x_high - x_low)))
        eps_mid = spent(mid)
        if eps_mid <= target_epsilon:
            high, eps_high, f_high = mid, eps_mid, f(eps_mid)
            f_low, side = (f_low / 2 if side == 1 else f_low), 1
        else:
            low, eps_low, f_low = mid, eps_mid, f(eps_mid)
            f_high, side = (f_high / 2 if side == -1 else f_high), -1
    return high
