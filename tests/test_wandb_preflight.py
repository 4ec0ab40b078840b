"""fedpeft.launch.wandb_preflight: `--wandb online` fails fast, before Ray, when W&B cannot work.

No Ray, no network: credentials come from a temporary HOME / WANDB_CONFIG_DIR / NETRC, and the
"W&B server" is a real http.server on 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import wandb  # noqa: F401  imported here so the timing below measures the check, not wandb's import

from fedpeft.config import Config, ConfigError
from fedpeft.launch.wandb_preflight import check_wandb_online

FAKE_KEY = "local-" + "a1b2c3d4e5" * 4  # the format wandb accepts (40+ word characters after a prefix)


@pytest.fixture(autouse=True)
def isolated_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No real credentials or settings can be read: empty HOME, config dir and netrc."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    monkeypatch.chdir(tmp_path)  # no ./wandb/settings from the repository
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE",
                 "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    return home


def _config(mode: str) -> Config:
    config = Config()
    config.wandb.mode = mode
    return config


class _Server:
    """A local GraphQL stand-in that answers every POST with a fixed status and body."""

    def __init__(self, status: int, body: dict) -> None:
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization", ""),
                                       "body": json.loads(self.rfile.read(length) or b"{}")})
                payload = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[_Server]:
    status, body = request.param
    srv = _Server(status, body)
    yield srv
    srv.close()


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_other_modes_do_nothing(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Even with a server URL that cannot work, nothing is checked.
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:1")
    assert check_wandb_online(_config(mode)) is None


@pytest.mark.parametrize("empty_env_key", [False, True])
def test_online_without_key_fails_fast(empty_env_key: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if empty_env_key:  # WANDB_API_KEY= is no key either
        monkeypatch.setenv("WANDB_API_KEY", "")
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        check_wandb_online(_config("online"))
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "no W&B API key" in message
    assert "--wandb offline" in message and "wandb login" in message and "WANDB_API_KEY" in message
    assert elapsed < 2.0, elapsed


def test_malformed_key_is_reported_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "short-secret")
    with pytest.raises(ConfigError, match="not a valid W&B API key") as info:
        check_wandb_online(_config("online"))
    assert "short-secret" not in str(info.value)


def test_unreachable_server_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as sock:  # a port that was just free, so nothing listens on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", url)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach the W&B server") as info:
        check_wandb_online(_config("online"))
    assert url in str(info.value) and "--wandb offline" in str(info.value)
    assert FAKE_KEY not in str(info.value)
    assert time.monotonic() - start < 6.0


@pytest.mark.parametrize("server", [(401, {"errors": [{"message": "user is not logged in"}]})], indirect=True)
def test_refused_key(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", server.url)
    with pytest.raises(ConfigError, match="W&B refused the API key") as info:
        check_wandb_online(_config("online"))
    assert "HTTP 401" in str(info.value) and "wandb login" in str(info.value)
    assert FAKE_KEY not in str(info.value)
    assert len(server.requests) == 1 and server.requests[0]["path"] == "/graphql"


@pytest.mark.parametrize("server", [(200, {"data": {"viewer": {"id": "VXNlcjox", "entity": "alice", "username": "alice"}}})],
                         indirect=True)
def test_accepted_key_from_env_passes(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", server.url + "/")
    assert check_wandb_online(_config("online")) is None
    assert len(server.requests) == 1
    sent = server.requests[0]
    assert sent["auth"] == "Basic " + base64.b64encode(f"api:{FAKE_KEY}".encode()).decode()
    assert "viewer" in sent["body"]["query"]


@pytest.mark.parametrize("server", [(200, {"data": {"viewer": {"id": "VXNlcjox", "entity": "bob", "username": "bob"}}})],
                         indirect=True)
def test_key_from_netrc_is_used(server: _Server, monkeypatch: pytest.MonkeyPatch, isolated_wandb: Path) -> None:
    # What `wandb login --host <url>` writes: a netrc entry for the host, no WANDB_API_KEY.
    host = server.url.removeprefix("http://")
    netrc = isolated_wandb / ".netrc"
    netrc.write_text(f"machine {host}\n  login user\n  password {FAKE_KEY}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("WANDB_BASE_URL", server.url)
    check_wandb_online(_config("online"))
    assert len(server.requests) == 1 and f"api:{FAKE_KEY}" in _decode(server.requests[0]["auth"])


@pytest.mark.parametrize("server", [(200, {"data": {"viewer": None}})], indirect=True)
def test_no_viewer_means_refused(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", server.url)
    with pytest.raises(ConfigError, match="W&B refused the API key"):
        check_wandb_online(_config("online"))


@pytest.mark.parametrize("server", [(502, {"error": "bad gateway"})], indirect=True)
def test_unexpected_answer(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", server.url)
    with pytest.raises(ConfigError, match="unexpected answer") as info:
        check_wandb_online(_config("online"))
    assert "HTTP 502" in str(info.value) and "--wandb offline" in str(info.value)


def _decode(header: str) -> str:
    import base64

    return base64.b64decode(header.removeprefix("Basic ")).decode()
