"""Where a run's config is assembled and its names are checked.

:mod:`fedpeft.config` checks keys and values and imports nothing of fedpeft; the names that
registries resolve (the user's ``plugins`` modules, ``federation.strategy``, ``data.benchmark``)
are checked here, above the registries, by every entry point before anything starts.
"""

from __future__ import annotations

from typing import Any

from fedpeft.config import Config, build_config
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


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """The checked config of a ``flwr run`` (Flower's run config: fedpeft's dotted keys)."""
    return check_names(build_config([], list(run_config.items())))
