"""The user's own code: modules named by ``plugins`` and objects named ``module:attribute``.

The driver and every Ray worker go through here, so what the driver can load a worker loads the
same way (the module must be importable on every node, e.g. on ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
from typing import Any

from fedpeft.config import ConfigError


def import_plugins(modules: list[str]) -> None:
    """Import the user's own modules (``plugins``), which register benchmarks or strategies."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as err:
            raise ConfigError(f"Config key 'plugins' names the module '{name}', which cannot be imported ({err}). "
                              "Give an importable module name (on PYTHONPATH of the driver and of every Ray node).") from None


def load_object(spec: str, key: str) -> Any:
    """The object ``module:attribute`` names (``key``: the config key that gave it, for errors)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"Config key '{key}' got '{spec}'; a plug-in is named 'module:Attribute', e.g. my_module:MyStrategy.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"Config key '{key}' names the module '{module_name}', which cannot be imported ({err}). "
                          "Put it on PYTHONPATH of the driver and of every Ray node.") from None
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"Config key '{key}' got '{spec}', but module '{module_name}' has no '{attribute}'.")
        obj = getattr(obj, part)
    return obj
