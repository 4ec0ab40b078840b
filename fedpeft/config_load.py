"""Loading a run's config in its three layers: the schema's defaults (:mod:`fedpeft.config`),
then YAML files (``configs/default.yaml``, then ``--config FILE``), then command-line overrides
(``train.lr=1e-4`` or ``--train.lr=1e-4``), and last the checks of :mod:`fedpeft.config_checks`.
Every key goes through :func:`fedpeft.config.set_key`, so an unknown key or a bad value raises
:class:`~fedpeft.config.ConfigError` naming the file or override it came from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fedpeft.config import Config, ConfigError, merge_into, set_key
from fedpeft.config_checks import validate

REPO_DEFAULT_YAML = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist. Give the path of a YAML file, e.g. configs/default.yaml.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of keys to values, got {type(data).__name__}.")
    return data


def parse_override(text: str) -> tuple[str, str]:
    """Split ``key=value`` (or ``--key=value``) on the first '='."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"Override '{text}' has no '='. Write it as key=value, e.g. train.lr=1e-4.")
    key, value = body.split("=", 1)
    return key.strip(), value


def build_config(config_files: list[str] | None = None, overrides: list[tuple[str, Any]] | None = None) -> Config:
    """Defaults, then configs/default.yaml (when present), then ``config_files``, then ``overrides``."""
    config = Config()
    files: list[Path] = [REPO_DEFAULT_YAML] if REPO_DEFAULT_YAML.is_file() else []
    files += [Path(f) for f in config_files or []]
    for path in files:
        merge_into(config, load_yaml(path), where=f"in {path}")
    for key, value in overrides or []:
        set_key(config, key, value)
    validate(config)
    return config
