"""fedpeft: federated personalization simulator for language models.

The Python API (fedpeft.api), imported on first use so that ``import fedpeft`` stays cheap:
``fedpeft.run(...)``, ``fedpeft.load_run(path)``, ``fedpeft.compare([...])``, ``fedpeft.Run``,
``fedpeft.Config`` and ``fedpeft.ConfigError``.

The package, bottom to top: ``config``, ``files``, ``plugins``, ``tasks`` (the schema and the
plumbing); ``data`` (benchmarks and their users); ``learning`` (backbones, peft methods, local
training, packing, scores); ``federation`` (the ServerApp and ClientApp, the round, privacy,
aggregation, the run folder); ``launch`` (what is checked and started before a run); ``sim``,
``cli``, ``export``, ``flower_app`` (one run's entry points); ``study`` (comparisons and the
studies around runs); ``api`` and ``sweep`` (notebooks and sweeps).
"""

from __future__ import annotations

__version__ = "0.1.0"

_API = {"run": "fedpeft.api", "load_run": "fedpeft.api", "compare": "fedpeft.api", "Run": "fedpeft.api",
        "Config": "fedpeft.config", "ConfigError": "fedpeft.config"}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    import importlib

    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fedpeft' has no attribute '{name}'")
