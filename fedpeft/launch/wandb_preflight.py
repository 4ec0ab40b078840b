"""Check, before Ray starts, that ``--wandb online`` can work.

Without this check a missing or wrong API key, or a W&B server that cannot be reached, only
shows up inside ``wandb.init`` after the simulation has started: it blocks for about 100 s
and the run ends with "the simulation ended without results". :func:`check_wandb_online`
finds the same credentials and server wandb would use, makes one TCP connect and one HTTP
request (both with short timeouts), and raises :class:`~fedpeft.config.ConfigError` with
the fix. The API key is never printed.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from fedpeft.config import ConfigError

if TYPE_CHECKING:
    from fedpeft.config import Config

CONNECT_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 10.0
FIX = ("Fix: run `wandb login` (or set WANDB_API_KEY; for a private server also WANDB_BASE_URL), "
       "or use --wandb offline and upload the run later with `wandb sync <run folder>/wandb/offline-run-*`.")
_VIEWER_QUERY = "query Viewer { viewer { id entity username } }"


def _wandb_settings() -> tuple[str, str | None]:
    """wandb's server URL and settings-file API key: env vars over settings files over defaults."""
    from wandb.sdk.wandb_settings import Settings

    settings = Settings()
    config_dir = os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb"
    settings.settings_system = str(Path(config_dir).expanduser() / "settings")
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    return settings.base_url.rstrip("/"), settings.api_key


def _find_api_key(base_url: str, settings_key: str | None) -> str | None:
    """The key in the order wandb.init looks: WANDB_API_KEY, the netrc entry for the host, settings."""
    from wandb.sdk.lib import wbauth

    if key := os.environ.get("WANDB_API_KEY"):
        if problem := wbauth.check_api_key(key):
            raise ConfigError(f"--wandb online: WANDB_API_KEY is not a valid W&B API key: {problem} {FIX}")
        return key
    try:
        return wbauth.read_netrc_auth(host=base_url) or settings_key or None
    except Exception as e:  # AuthenticationError: a netrc entry with a malformed key
        raise ConfigError(f"--wandb online: the API key in your netrc file for {base_url} is not valid: {e} {FIX}") from None


def check_wandb_online(config: Config) -> None:
    """Raise :class:`ConfigError` unless W&B online logging can work; a no-op for other modes.

    Checks: an API key exists (as wandb would find it), the server (``WANDB_BASE_URL``, the
    wandb settings file, or wandb's default) accepts a TCP connection within 5 s, and one
    GraphQL ``viewer`` query authenticated like wandb (basic auth ``api:<key>``) succeeds.
    """
    if config.wandb.mode != "online":
        return
    import requests

    where = f"project {config.wandb.project!r}" + (f", entity {config.wandb.entity!r}" if config.wandb.entity else "")
    try:
        base_url, settings_key = _wandb_settings()
    except Exception as e:  # pydantic ValidationError: e.g. a malformed WANDB_BASE_URL
        message = str(e).replace(os.environ.get("WANDB_API_KEY") or "\0", "<WANDB_API_KEY>")
        raise ConfigError(f"--wandb online: wandb's settings are not valid: {message} {FIX}") from None
    key = _find_api_key(base_url, settings_key)
    if key is None and not os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        raise ConfigError(f"--wandb online ({where}): no W&B API key found for {base_url} "
                          f"(not in WANDB_API_KEY, your netrc file, or wandb's settings). {FIX}")

    parts = urlsplit(base_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if not requests.utils.get_environ_proxies(base_url):  # through a proxy, only the request below can tell
        try:
            socket.create_connection((parts.hostname or "", port), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise ConfigError(f"--wandb online: cannot reach the W&B server {base_url} "
                              f"(port {port}: {e or type(e).__name__}). Check your network, or WANDB_BASE_URL. {FIX}") from None
    if key is None:  # identity-token (OIDC) auth: wandb-core exchanges the token; the server answers
        return

    try:
        response = requests.post(f"{base_url}/graphql", json={"query": _VIEWER_QUERY}, auth=("api", key),
                                 timeout=(CONNECT_TIMEOUT_S, REQUEST_TIMEOUT_S))
    except requests.RequestException as e:
        raise ConfigError(f"--wandb online: the W&B server {base_url} did not answer ({type(e).__name__}). "
                          f"Check your network, or WANDB_BASE_URL. {FIX}") from None
    if response.status_code in (401, 403):
        raise ConfigError(f"--wandb online: W&B refused the API key (HTTP {response.status_code} from {base_url}): "
                          f"it is wrong, revoked, or for another server. {FIX}")
    try:
        response.raise_for_status()
        body = response.json()
        viewer, errors = (body.get("data") or {}).get("viewer"), body.get("errors")
    except Exception as e:  # HTTP 5xx/404, or not GraphQL JSON (a proxy's or captive portal's page)
        raise ConfigError(f"--wandb online: unexpected answer from the W&B server {base_url} "
                          f"(HTTP {response.status_code}: {type(e).__name__}: {e}). {FIX}") from None
    if not viewer:
        detail = f"GraphQL errors: {errors}"[:300] if errors else "it knows no user for this key"
        raise ConfigError(f"--wandb online: W&B refused the API key ({base_url}: {detail}). {FIX}")
