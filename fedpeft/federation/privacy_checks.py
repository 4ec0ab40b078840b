"""What user-level privacy refuses before Ray starts, and what it settles there: a strategy that
releases no shared aggregate (or trains everyone at once after the rounds) is refused, and
:func:`prepare_privacy` (the driver calls it once) resolves delta, checks the adaptive-clipping
constraint and calibrates ``privacy.target_epsilon`` into ``privacy.noise_multiplier``, so that a
run that cannot be private fails before any user trains.
"""

from __future__ import annotations

from typing import Any

from fedpeft.config import Config, ConfigError
from fedpeft.federation.privacy import adaptive_count_stddev
from fedpeft.federation.privacy_accounting import (
    MAX_NOISE_MULTIPLIER,
    PrivacyAccountant,
    calibrate_noise,
    resolve_delta,
)


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
