"""Where a run's config is assembled and its names are checked.

:mod:`fedpeft.config` checks keys and values and imports nothing of fedpeft; the names that
registries resolve (the user's ``plugins`` modules, ``federation.strategy``, ``data.benchmark``)
are checked here, above the registries, by every entry point before anything starts.
"""

from __future__ import annotations

from fedpeft.config import Config
from fedpeft.data import benchmark_family
from fedpeft.plugins import import_plugins
from fedpeft.strategies import get_strategy_class


def check_names(config: Config) -> Config:
    """Import the user's plugins, then check that the strategy and benchmark names resolve
    (each raises a ConfigError listing the known names); returns ``config``."""
    import_plugins(config.plugins)
    get_strategy_class(config.federation.strategy)
    benchmark_family(config.data.benchmark)
    return config
