"""Strategy registry: one strategy per file, registered by name.

A strategy is a split of the peft state dict into shared keys (leave the client and are
aggregated) and private keys (stay in the client's adapter store), plus a server rule for
sampling cohorts and aggregating the shared part. The same client code serves every strategy.

A strategy of one's own, without forking: ``--strategy my_module:MyStrategy`` (a
:class:`Strategy` subclass in an importable module), a name an installed package declares in
the entry-point group ``fedpeft.strategies``, or a name a ``plugins`` module registers with
:func:`register_strategy`. Each is checked like a built-in one (:func:`check_strategy_class`).
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from fedpeft.config import Config, ConfigError
from fedpeft.plugins import load_object
from fedpeft.strategies.base import Strategy

STRATEGIES: dict[str, type[Strategy]] = {}
ENTRY_POINT_GROUP = "fedpeft.strategies"


def check_strategy_class(cls: object, where: str) -> type[Strategy]:
    """``cls`` if it is a usable strategy class; a ConfigError that says what is wrong if not."""
    if not isinstance(cls, type) or not issubclass(cls, Strategy):
        raise ConfigError(f"{where} is {cls!r}, not a subclass of fedpeft.strategies.Strategy. "
                          "Subclass it: `class MyStrategy(Strategy): name = 'mine'` and override is_shared.")
    if cls is Strategy:
        raise ConfigError(f"{where} is the base class Strategy itself; give a subclass that overrides is_shared.")
    if not cls.name:
        raise ConfigError(f"{where}: {cls.__name__} must set a class attribute 'name' (e.g. name = 'mine').")
    return cls


def register_strategy(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[check_strategy_class(cls, f"register_strategy({getattr(cls, '__name__', cls)})").name] = cls
    return cls


@functools.lru_cache(maxsize=1)
def installed_strategies() -> dict[str, str]:
    """Strategies installed packages declare in the entry-point group ``fedpeft.strategies``
    (name -> 'module:attribute')."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def get_strategy_class(name: str) -> type[Strategy]:
    """A registered name, a name from the ``fedpeft.strategies`` entry points, or 'module:Class'."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    key = "federation.strategy"
    if ":" in name:
        return check_strategy_class(load_object(name, key), f"--strategy {name}")
    if name in installed_strategies():
        spec = installed_strategies()[name]
        return check_strategy_class(load_object(spec, key), f"--strategy {name} (entry point {ENTRY_POINT_GROUP}: {spec})")
    known = ", ".join(sorted(set(STRATEGIES) | set(installed_strategies())))
    raise ConfigError(
        f"Unknown strategy '{name}'. Known strategies: {known}. "
        "Pick one with --strategy NAME, or bring your own: --strategy my_module:MyStrategy (a Strategy "
        f"subclass), an entry point in the group '{ENTRY_POINT_GROUP}', or a file in strategies/ that registers one."
    )


def make_strategy(config: Config) -> Strategy:
    return get_strategy_class(config.federation.strategy)(config)


from fedpeft.strategies import (  # noqa: E402,F401  (each module registers itself)
    ditto,
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

__all__ = ["ENTRY_POINT_GROUP", "STRATEGIES", "Strategy", "check_strategy_class", "get_strategy_class",
           "make_strategy", "register_strategy"]
