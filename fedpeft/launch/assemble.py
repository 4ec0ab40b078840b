"""Where a run's config is assembled and its names are checked.

:mod:`fedpeft.config` checks keys and values and imports nothing of fedpeft; the names that
registries resolve (the user's ``plugins`` modules, ``federation.strategy``, ``data.benchmark``)
are checked here, above the registries, by every entry point before anything starts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fedpeft.config import Config, ConfigError, set_key
from fedpeft.config_checks import validate
from fedpeft.config_load import build_config, load_yaml
from fedpeft.data import check_data_keys
from fedpeft.plugins import import_plugins
from fedpeft.strategies import get_strategy_class


def check_names(config: Config) -> Config:
    """Import the user's plugins, then check that the strategy and benchmark names resolve
    (each raises a ConfigError listing the known names) and that no ``data.*`` key is set that
    only another benchmark reads (:func:`fedpeft.data.check_data_keys`); returns ``config``."""
    import_plugins(config.plugins)
    get_strategy_class(config.federation.strategy)
    check_data_keys(config)  # also resolves data.benchmark
    return config


def config_from_run_config(run_config: dict[str, Any]) -> Config:
    """The checked config of a ``flwr run`` (Flower's run config: fedpeft's dotted keys)."""
    return check_names(build_config([], list(run_config.items())))


SWEEP_PARAM_PATH, SWEEP_ID = "WANDB_SWEEP_PARAM_PATH", "WANDB_SWEEP_ID"  # set by `wandb agent`


def apply_sweep_parameters(config: Config) -> Config:
    """Under a W&B sweep agent: the sweep's parameters, from the file ``wandb.init()`` reads
    them from (``WANDB_SWEEP_PARAM_PATH``), set on the config before it is checked, so they
    reach fedpeft even with a command without ``${args}``, and the W&B run's config (where they
    take precedence) equals what fedpeft runs. A parameter that is no config key is refused."""
    path = os.environ.get(SWEEP_PARAM_PATH)
    if not path:
        return config
    if not Path(path).is_file():
        raise ConfigError(f"{SWEEP_PARAM_PATH}={path} (set by a W&B sweep agent) is no file; run fedpeft from the agent.")
    for key, entry in load_yaml(path).items():
        if key == "wandb_version" or key.startswith("_"):
            continue
        value = entry["value"] if isinstance(entry, dict) and "value" in entry else entry
        set_key(config, key, value, where=f"a W&B sweep parameter; name sweep parameters by fedpeft's dotted keys, e.g. train.lr ({path})")
    validate(config)
    if os.environ.get(SWEEP_ID) and config.wandb.mode == "disabled":
        raise ConfigError("A W&B sweep agent runs this (WANDB_SWEEP_ID is set) but wandb.mode='disabled', so the sweep "
                          "would never see the run. Add --wandb=online (wandb agent) or --wandb=offline to the sweep's command.")
    return config
