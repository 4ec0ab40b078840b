"""Strategy registry: one strategy per file, registered by name.

A strategy is a split of the peft state dict into shared keys (leave the client and are
aggregated) and private keys (stay in the client's adapter store), plus a server rule for
sampling cohorts and aggregating the shared part. The same client code serves every strategy.
"""

from __future__ import annotations

from fedpeft.config import Config, ConfigError
from strategies.base import Strategy

STRATEGIES: dict[str, type[Strategy]] = {}


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} must set a class attribute 'name' to be registered")
    STRATEGIES[cls.name] = cls
    return cls


def get_strategy_class(name: str) -> type[Strategy]:
    if name not in STRATEGIES:
        known = ", ".join(sorted(STRATEGIES))
        raise ConfigError(
            f"Unknown strategy '{name}'. Known strategies: {known}. "
            "Pick one with --strategy NAME, or add a file to strategies/ that registers a new one."
        )
    return STRATEGIES[name]


def make_strategy(config: Config) -> Strategy:
    return get_strategy_class(config.federation.strategy)(config)


from strategies import (  # noqa: E402,F401  (each module registers itself)
    fedavg,
    fedavg_ft,
    feddpa,
    fedper,
    fedrep,
    fedsa,
    ffa,
    local_only,
    oppu,
)

__all__ = ["STRATEGIES", "Strategy", "get_strategy_class", "make_strategy", "register_strategy"]
