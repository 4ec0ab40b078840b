"""The user's own code: modules named by ``plugins`` and objects named ``module:attribute``.

The driver and every Ray worker go through here, so what the driver can load a worker loads the
same way (the module must be importable on every node, e.g. on ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
import traceback
from typing import Any

from fedpeft.config import ConfigError


def import_module(name: str, key: str) -> Any:
    """Import the user's module ``name`` (``key``: the config key that named it, for errors). Any
    error it raises, a missing module or one its own code raises, is a one-line ConfigError that
    names the module and the error; the original stays its cause (``--debug`` prints it)."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"Config key '{key}' names the module '{name}', which cannot be imported ({err}). "
                          "Give an importable module name (on PYTHONPATH of the driver and of every Ray node).") from err
    except Exception as err:  # the module's own code failed: a bug in it, not a missing module
        where = _where(err)
        raise ConfigError(f"Config key '{key}' names the module '{name}', which raised {type(err).__name__}: {err} "
                          f"when imported{where}. Fix the module (add --debug for the traceback).") from err


def _where(err: BaseException) -> str:
    """`` (at FILE:LINE)``: where the error was raised (the innermost frame outside importlib)."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if not f.filename.startswith("<frozen")]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def import_plugins(modules: list[str]) -> None:
    """Import the user's own modules (``plugins``), which register benchmarks or strategies."""
    for name in modules:
        import_module(name, "plugins")


def load_object(spec: str, key: str) -> Any:
    """The object ``module:attribute`` names (``key``: the config key that gave it, for errors)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"Config key '{key}' got '{spec}'; a plug-in is named 'module:Attribute', e.g. my_module:MyStrategy.")
    obj: Any = import_module(module_name, key)
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"Config key '{key}' got '{spec}', but module '{module_name}' has no '{attribute}'.")
        obj = getattr(obj, part)
    return obj
