"""Shared fixtures: a real qpc server on an ephemeral loopback port and real SDK clients."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from qpc_core.app import App  # noqa: E402
from qpc_core.client import QpcClient  # noqa: E402
from qpc_core.config import Settings, load_config  # noqa: E402
from qpc_core.transport.quic import QuicTransport  # noqa: E402

TEST_TOKEN = "devtoken"


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "metrics_enabled": False,
        "data_dir": data_dir,
        "db_key": "test-db-key",
        "drain_timeout_secs": 5,
        "rate_limits": {"default": {"requests": 100000, "window_secs": 60},
                        "delivery": {"requests": 100000, "window_secs": 60},
                        "auth": {"requests": 100000, "window_secs": 60},
                        "keys": {"requests": 100000, "window_secs": 60},
                        "users": {"requests": 100000, "window_secs": 60},
                        "health": {"requests": 100000, "window_secs": 60}},
    }
    base.update(overrides)
    return load_config(None, base, env={})


def quic_transport(app: App) -> QuicTransport:
    for _plugin, t in app.transports:
        if isinstance(t, QuicTransport):
            return t
    raise AssertionError("no QUIC transport")


def quic_port(app: App) -> int:
    addr = quic_transport(app).address
    assert addr is not None
    return addr[1]


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return make_settings(tmp_path / "data", **overrides)

    return make


@pytest.fixture
async def app_factory(settings_factory: Callable[..., Settings]) -> AsyncIterator[Callable[..., Any]]:
    started: list[App] = []

    async def make(**overrides: Any) -> App:
        app = App(settings_factory(**overrides))
        await app.start()
        started.append(app)
        return app

    yield make
    for app in reversed(started):
        await app.stop()


@pytest.fixture
async def server(app_factory: Callable[..., Any]) -> App:
    app: App = await app_factory()
    return app


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Any]]:
    clients: list[QpcClient] = []

    async def make(app: App, *, identity: Ed25519PrivateKey | None = None,
                   token: str | None = TEST_TOKEN, new_identity: bool = True,
                   **kw: Any) -> QpcClient:
        if identity is None and new_identity:
            identity = Ed25519PrivateKey.generate()
        c = await QpcClient.connect(
            "127.0.0.1", quic_port(app), token=token, identity=identity,
            ca_cert=app.settings.data_dir / "server-cert.pem", **kw,
        )
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.close()
