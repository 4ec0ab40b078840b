"""User-level differential privacy on the shared part: checks, the mechanism, the accountant.

**Unit of privacy.** One user = one client. What leaves a user is its shared update (the change
it makes to the shared part in a round); private keys never reach the server and need nothing.
The guarantee covers the sequence of shared parts the server releases; it does not cover
training metrics, evaluation scores or fedpeft's own logs (which users trained in which round).

**Mechanism** (Flower's own wrappers, :class:`PrivateAggregator`): each user's update is clipped
to L2 norm ``privacy.clipping_norm`` = C (by the server: ``central``, ``central_adaptive``; by
the client, :func:`clip_shared_update`: ``client``), and the server releases the sum of the
clipped updates divided by m, the users *sampled* in the round (a fixed denominator), plus
Gaussian noise of std sigma * C / m (Flower's ``num_sampled_clients``). A sampled user that
failed, was dropped or did not answer contributes a zero update: the server pads the replies
with zero updates (the shared part as sent) up to m, so Flower's equal-weight mean divides by m.
The sensitivity is then C / m whatever fails, failures cost no epsilon, a round in which every
sampled user failed still releases (pure noise around the current shared part) and spends its
epsilon, and the accountant composes exactly sigma per round: the spent epsilon does not depend
on who failed (which may depend on their data), and ``privacy.max_epsilon`` and
``privacy.target_epsilon`` hold exactly. The cost: a failed user's share of the mean is zero,
so with m' of m users replying the mean of the updates shrinks towards the current shared part
by m' / m. FedAdam/FedYogi run on the noisy mean (post-processing); FedProx is local.

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

**Randomness.** Flower draws the noise from numpy's global generator; :func:`seeded_numpy` seeds
it per round from ``(seed, 50, round)`` and restores it afterwards, so a run (and a resumed
run) is reproducible. Anyone who knows the seed can therefore subtract the noise: this measures
the utility cost of a privacy level; it is not a deployment.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy
from flwr.supercore.differential_privacy import (
    KEY_NORM_BIT,
    compute_adaptive_clip_model_update,
    compute_clip_model_update,
    get_norm,
)
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting import PrivacyConfig as FlowerPrivacyConfig
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedpeft.config import Config, ConfigError, PrivacyConfig

State = dict[str, torch.Tensor]
ACCOUNTANT = ("flwr.supercore.privacy_accounting.RdpAccountant (dp-accounting RDP): fixed-size sampling "
              "without replacement, replace-one neighbours")
SAMPLING = "fixed-size cohort drawn uniformly without replacement each round (replace-one)"
DENOMINATOR = "users sampled (a sampled user that failed counts as a zero update)"
UNIFORM_WEIGHT = "dp-equal-weight"  # the metric the equal-weight FedAvg inside the DP wrapper averages by
NOISE_STREAM = 50  # numpy seed of a round's noise: (seed, NOISE_STREAM, round)
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


# ---- checks before Ray starts (the driver) ------------------------------------------------
def releasing_phases(strategy: Any, keys: list[str]) -> list[Any]:
    """The strategy's phases in which some adapter key is shared (each round releases an aggregate)."""
    return [p for p in strategy.phases() if any(strategy.is_shared(k, p.name) for k in keys)]


def privacy_refusal(strategy: Any, keys: list[str]) -> str | None:
    """Why ``privacy`` cannot apply to this strategy and adapter, or None if it can."""
    every = [p.name for p in strategy.phases() if p.everyone]
    if every:
        return (f"its phase '{every[0]}' (every user at once, after the federated rounds) is outside what fedpeft's "
                "privacy accounting models")
    if not releasing_phases(strategy, keys):
        pooled = (" (strategy.oppu_task_mode=pooled trains the task adapter on the pooled data of all users, which "
                  "differential privacy here does not cover: use oppu_task_mode=federated)"
                  if getattr(strategy.config.strategy, "oppu_task_mode", "") == "pooled" and strategy.name == "oppu" else "")
        return f"it shares no adapter key in any federated round, so there is nothing to privatise{pooled}"
    return None


def check_privacy_strategy(strategy: Any, keys: list[str]) -> None:
    """Refuse ``privacy`` with a strategy that shares nothing (local_only, the epsilon = 0 anchor)
    or with fedavg_ft's fine-tune phase; lists the strategies it fits."""
    if strategy.config.privacy.mechanism == "none":
        return
    why = privacy_refusal(strategy, keys)
    if why:
        from fedpeft.strategies import STRATEGIES

        fits = [n for n, cls in sorted(STRATEGIES.items()) if privacy_refusal(cls(strategy.config), keys) is None]
        raise ConfigError(f"Config key 'privacy.mechanism' got {strategy.config.privacy.mechanism!r} with "
                          f"federation.strategy={strategy.name}, but {why}. Allowed: privacy.mechanism=none with this "
                          f"strategy (local_only is the epsilon = 0 anchor), or one of {', '.join(fits) or 'none'}.")


def release_schedule(strategy: Any, keys: list[str], population_size: int) -> list[tuple[int, int]]:
    """(rounds, users sampled per round) of every phase that releases a shared aggregate."""
    return [(p.rounds, strategy.cohort_size(population_size)) for p in releasing_phases(strategy, keys)]


def adaptive_count_stddev(privacy: PrivacyConfig, sampled: int) -> float:
    """Flower's std of the clipped-count noise: ``privacy.clipped_count_stddev``, or users sampled / 20."""
    return privacy.clipped_count_stddev or sampled / 20


def prepare_privacy(config: Config, strategy: Any, keys: list[str], population_size: int) -> None:
    """Everything privacy needs before Ray starts (the driver calls it once, after the strategy is
    built and before the config is written to the run folder): the strategy check, delta (the
    automatic rule resolved into ``config.privacy.delta``), the adaptive-clipping constraint, and
    ``privacy.target_epsilon`` calibrated into ``config.privacy.noise_multiplier``."""
    privacy = config.privacy
    if privacy.mechanism == "none":
        return
    check_privacy_strategy(strategy, keys)
    privacy.delta = resolve_delta(privacy, population_size)
    PrivacyAccountant(population_size, privacy.delta)  # dp-accounting missing: Flower's ImportError now, not in round 1
    schedule = release_schedule(strategy, keys, population_size)
    limit = MAX_NOISE_MULTIPLIER
    if privacy.mechanism == "central_adaptive":
        sampled = min(m for _, m in schedule)
        limit = 2 * adaptive_count_stddev(privacy, sampled) * (1 - 1e-9)
        if not privacy.target_epsilon and privacy.noise_multiplier and privacy.noise_multiplier >= limit:
            raise ConfigError(f"Config key 'privacy.noise_multiplier' got {privacy.noise_multiplier!r}; allowed with "
                              f"privacy.mechanism=central_adaptive: a number below 2 x privacy.clipped_count_stddev = "
                              f"{limit:.4g} (Flower splits the noise between the updates and the clipped count). Raise "
                              "privacy.clipped_count_stddev (0 = users sampled / 20) or sample more users per round.")
    if privacy.target_epsilon:
        hint = (" (the most central_adaptive allows: below 2 x privacy.clipped_count_stddev; raise that key)"
                if privacy.mechanism == "central_adaptive" else "")
        privacy.noise_multiplier = calibrate_noise(privacy.target_epsilon, schedule, population_size, privacy.delta,
                                                   max_noise_multiplier=limit, limit_hint=hint)


# ---- accounting -----------------------------------------------------------------------------
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


# ---- the mechanism (server) ----------------------------------------------------------------
@contextmanager
def seeded_numpy(seed: Sequence[int]) -> Iterator[None]:
    """numpy's global generator (Flower's noise source) seeded from ``seed``, restored afterwards."""
    saved = np.random.get_state()
    np.random.seed(np.random.SeedSequence(list(seed)).generate_state(4))
    try:
        yield
    finally:
        np.random.set_state(saved)


def _reply(record: ArrayRecord, metrics: dict[str, float], like: Message | None) -> Message:
    """A train reply holding only ``record`` as "shared" (what Flower's wrappers may read and rewrite),
    with the metadata of ``like``; None: a stand-in (a failed user's zero update), never sent."""
    content = RecordDict({"shared": record, "metrics": MetricRecord(metrics)})
    if like is None:
        return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
    return Message(content=content, metadata=like.metadata)


def mean_reply(record: ArrayRecord, weighted_by_key: str, like: Message | None) -> Message:
    """One reply carrying an aggregate, for the server optimiser to step on (its mean is itself)."""
    return _reply(record, {weighted_by_key: 1.0}, like)


class _AdaptiveClipping(flwr_strategy.DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's wrapper, noising the mean with the norm the round's updates were clipped to
    (Flower's updates the norm first and noises with the new one: too little noise when it shrinks)."""

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, MetricRecord | None]:
        self.round_norm = self.clipping_norm
        return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        updated, self.clipping_norm = self.clipping_norm, self.round_norm
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = updated


class PrivateAggregator:
    """The noisy sum of the replies' clipped "shared" updates over the users sampled, through
    Flower's DP wrappers.

    Each wrapper goes around a Flower ``FedAvg`` that weighs every user 1, and sees copies of the
    replies' shared records only, padded up to the users sampled with zero updates (the shared
    part as sent) for the users that failed, so that Flower's mean divides by the users sampled
    (the module docstring says why). Under ``central_adaptive`` a padded zero update is an
    unclipped update (norm bit 1), as a user whose update is zero would be. ``central``: ``DifferentialPrivacyServerSideFixedClipping``
    clips and noises. ``client``: ``DifferentialPrivacyClientSideFixedClipping`` noises what the
    clients clipped (the server checks the norms). Two Flower 1.42 defects are worked around:

    - server-side clipping divides by the update's norm (``clip_inputs_inplace``), so a round with
      an exactly zero update (e.g. fedsa's LoRA A after one step from B = 0) is clipped here with
      Flower's clipping helper and noised by the client-side wrapper: the same mechanism;
    - the adaptive wrappers count *clipped* updates (``adaptive_clip_inputs_inplace`` returns
      ``scaling_factor < 1``) in Andrew et al.'s update ``C *= exp(-lr (b - gamma))``, whose ``b``
      is the fraction *unclipped*, so the norm runs away from the target quantile (towards 0 when
      most updates are clipped). ``central_adaptive`` therefore clips here with Flower's
      ``compute_adaptive_clip_model_update`` and gives ``DifferentialPrivacyClientSideAdaptiveClipping``
      the unclipped bit and the target 1 - ``privacy.target_clipped_quantile``; that wrapper then
      noises the count, updates the norm and noises the mean as Flower does, except that the
      mean's noise uses the norm the round clipped to, not the one just updated
      (:class:`_AdaptiveClipping`): std sigma_updates * C / m.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.clipping_norm = config.privacy.clipping_norm  # central_adaptive: the current norm (server state)
        self._wrappers: dict[tuple[str, int], Any] = {}

    def _wrapper(self, kind: str, sampled: int) -> Any:
        if (kind, sampled) not in self._wrappers:
            pr, mean = self.config.privacy, flwr_strategy.FedAvg(arrayrecord_key="shared", weighted_by_key=UNIFORM_WEIGHT)
            if kind == "adaptive":
                wrapper = _AdaptiveClipping(
                    mean, pr.noise_multiplier, sampled, initial_clipping_norm=self.clipping_norm,
                    target_clipped_quantile=1 - pr.target_clipped_quantile, clip_norm_lr=pr.clip_norm_lr,
                    clipped_count_stddev=adaptive_count_stddev(pr, sampled))
            elif kind == "server":
                wrapper = flwr_strategy.DifferentialPrivacyServerSideFixedClipping(mean, pr.noise_multiplier, pr.clipping_norm, sampled)
            else:
                wrapper = flwr_strategy.DifferentialPrivacyClientSideFixedClipping(mean, pr.noise_multiplier, pr.clipping_norm, sampled)
            self._wrappers[(kind, sampled)] = wrapper
        return self._wrappers[(kind, sampled)]

    def aggregate(self, server_round: int, current: dict[str, np.ndarray], replies: list[Message],
                  sampled: int, keys: list[str] | None = None) -> tuple[ArrayRecord, Release]:
        """The noisy sum of the clipped updates of ``replies`` divided by ``sampled`` (each sampled
        user that did not reply counts as a zero update), and the release for the accountant.
        ``current``: the shared part the users started from, as it travelled; ``keys``: the keys
        the round shares (default: the replies'; needed when no user replied)."""
        mechanism, records = self.config.privacy.mechanism, [r.content.array_records["shared"] for r in replies]
        if keys is None:
            keys = [k for k in current if records and k in records[0]]
        if not keys or any(k not in current for k in keys) or any(set(rec.keys()) != set(keys) for rec in records):
            raise RuntimeError("privacy: the replies' shared keys differ from each other or from the server's shared part")
        if not 0 <= len(replies) <= sampled or sampled < 1:
            raise ValueError(f"privacy: {len(replies)} replies for {sampled} users sampled")
        base = [current[k] for k in keys]
        updates = [[rec[k].numpy() for k in keys] for rec in records]
        updates += [[c.copy() for c in base] for _ in range(sampled - len(replies))]  # the failed users: zero updates
        norms = [get_norm([u - c for u, c in zip(upd, base)]) for upd in updates]
        C = self.clipping_norm if mechanism == "central_adaptive" else self.config.privacy.clipping_norm
        metrics: list[dict[str, float]] = [{UNIFORM_WEIGHT: 1.0} for _ in updates]
        if mechanism == "client":
            kind, slack = "client", 1e-5 * C + np.finfo(np.float32).eps * (get_norm(base) + C)
            if max(norms) > C + slack:
                raise RuntimeError(f"privacy.mechanism=client: a client sent a shared update of norm {max(norms):.6g} > "
                                   f"privacy.clipping_norm {C}; the client must clip it (fedpeft.federation.privacy.clip_shared_update)")
        elif mechanism == "central" and min(norms) > 0:
            kind = "server"
        else:  # clipped here with Flower's helpers (see the class docstring)
            kind = "adaptive" if mechanism == "central_adaptive" else "client"
            for upd, norm, m in zip(updates, norms, metrics):
                clipped = norm > 0 and compute_adaptive_clip_model_update(upd, base, C)
                if kind == "adaptive":
                    m[KEY_NORM_BIT] = 0.0 if clipped else 1.0  # Andrew et al.'s b: the update was not clipped
        likes: list[Message | None] = [*replies, *[None] * (sampled - len(replies))]
        copies = [_reply(ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(keys, upd)}), m, like)
                  for upd, m, like in zip(updates, metrics, likes)]
        wrapper = self._wrapper(kind, sampled)
        if kind == "server":
            wrapper.current_arrays = ArrayRecord({k: Array(np.asarray(c)) for k, c in zip(keys, base)})
        if kind == "adaptive":
            wrapper.clipping_norm = C
        with seeded_numpy([self.config.seed, NOISE_STREAM, server_round]):
            arrays, _ = wrapper.aggregate_train(server_round, copies)
            if arrays is None:
                raise RuntimeError("Flower's DP wrapper returned no aggregate (see its log)")
        if kind == "adaptive":
            self.clipping_norm = float(wrapper.clipping_norm)
        return arrays, Release(server_round, mechanism, self.config.privacy.noise_multiplier, C, sampled, replied=len(replies))


# ---- the mechanism (client) ----------------------------------------------------------------
def clip_shared_update(new_shared: State, reference_shared: State, clipping_norm: float) -> State:
    """``new_shared`` with its update (``new - reference``, over all its keys together) clipped to
    L2 norm ``clipping_norm`` with Flower's ``compute_clip_model_update``, as ``fixedclipping_mod``
    does. ``reference_shared``: the shared part as the client received it (``Request.shared``), so
    the server measures the same update. An update already inside the ball comes back unchanged
    (the same tensors); a clipped one comes back in float32 (what it travels as)."""
    missing = [k for k in new_shared if k not in reference_shared]
    if missing:
        raise KeyError(f"clip_shared_update: keys without a reference value: {missing[:3]}")
    keys = list(new_shared)
    as_np = lambda t: t.detach().to("cpu", torch.float64 if t.dtype == torch.float64 else torch.float32).numpy()  # noqa: E731
    new, ref = [as_np(new_shared[k]).copy() for k in keys], [as_np(reference_shared[k]) for k in keys]
    if get_norm([n - r for n, r in zip(new, ref)]) <= clipping_norm:
        return dict(new_shared)
    compute_clip_model_update(new, ref, clipping_norm)
    return {k: torch.from_numpy(np.asarray(v)) for k, v in zip(keys, new)}

