"""fedpeft: federated personalization simulator for language models.

The Python API (fedpeft.api), imported on first use so that ``import fedpeft`` stays cheap:
``fedpeft.run(...)``, ``fedpeft.load_run(path)``, ``fedpeft.compare([...])``, ``fedpeft.Run``,
``fedpeft.Config`` and ``fedpeft.ConfigError``.
"""

from __future__ import annotations

import sys
import types

__version__ = "0.1.0"

_API = {"run": "fedpeft.api", "load_run": "fedpeft.api", "Run": "fedpeft.api",
        "Config": "fedpeft.config", "ConfigError": "fedpeft.config"}
__all__ = ["__version__", "compare", *_API]


def __getattr__(name: str) -> object:
    import importlib

    if name == "compare":  # the submodule fedpeft.compare, which the package makes callable (below)
        return importlib.import_module("fedpeft.compare")
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fedpeft' has no attribute '{name}'")


class _CallableModule(types.ModuleType):
    """The module fedpeft.compare, callable: ``fedpeft.compare([...])`` is fedpeft.api.compare,
    and ``from fedpeft.compare import write_comparison`` works as before."""

    def __call__(self, *args: object, **kwargs: object) -> object:
        from fedpeft.api import compare

        return compare(*args, **kwargs)


class _Package(types.ModuleType):
    """The package itself: whenever the import system sets the submodule fedpeft.compare on it
    (it does on every first import of it), that module is made callable, in whatever order
    fedpeft.compare and the API are first imported."""

    def __setattr__(self, name: str, value: object) -> None:
        if name == "compare" and type(value) is types.ModuleType:
            value.__class__ = _CallableModule
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
