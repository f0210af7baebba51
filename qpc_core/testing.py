"""Pytest fixtures for qpc and its plugins: a real server on loopback, real SDK clients.

Enabled for qpc's own suites by the repository's root ``conftest.py``; a third-party plugin
enables them with ``pytest_plugins = ["qpc_core.testing"]`` in its own conftest.

* ``app_factory(**settings)`` starts an :class:`~qpc_core.app.App` on 127.0.0.1 with an
  ephemeral port and a temporary data dir, and stops it after the test;
* ``server`` is ``app_factory()`` with the defaults;
* ``connect(app, identity=..., token=...)`` opens a :class:`~qpc_core.client.QpcClient`.

For a real ``qpc run`` process: :class:`ServerProcess`, and :func:`sigkill_loses_nothing`,
the crash-safety check every storage backend must pass.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from qpc_core.app import App
from qpc_core.client import QpcClient
from qpc_core.config import Settings, load_config
from qpc_core.transport.quic import QuicTransport

TEST_TOKEN = "devtoken"


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "metrics_enabled": False,
        "data_dir": data_dir,
        "db_key": "test-db-key",
        "drain_timeout_secs": 5,
        "rate_limits": {
            "default": {"requests": 100000, "window_secs": 60},
            "delivery": {"requests": 100000, "window_secs": 60},
            "auth": {"requests": 100000, "window_secs": 60},
            "keys": {"requests": 100000, "window_secs": 60},
            "users": {"requests": 100000, "window_secs": 60},
            "health": {"requests": 100000, "window_secs": 60},
        },
    }
    base.update(overrides)
    return load_config(None, base, env={})


async def until(cond: Callable[[], object], timeout: float = 10.0, what: str = "") -> None:
    """Wait until ``cond()`` holds (a state the test waits for, reached by the server's own
    work), checking every few milliseconds; fail after ``timeout`` seconds.  Never a fixed
    sleep: the wait ends as soon as the state is there."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {what}")
        await asyncio.sleep(0.002)


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
        return make_settings(overrides.pop("data_dir", tmp_path / "data"), **overrides)

    return make


@pytest.fixture
async def app_factory(
    settings_factory: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Any]]:
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

    async def make(
        app: App,
        *,
        identity: Ed25519PrivateKey | None = None,
        token: str | None = TEST_TOKEN,
        new_identity: bool = True,
        **kw: Any,
    ) -> QpcClient:
        if identity is None and new_identity:
            identity = Ed25519PrivateKey.generate()
        # aioquic unless a test asks otherwise (QPC_CLIENT_QUIC_BACKEND is not inherited,
        # as the server settings ignore the environment).
        kw.setdefault("quic_backend", "aioquic")
        c = await QpcClient.connect(
            "127.0.0.1",
            quic_port(app),
            token=token,
            identity=identity,
            ca_cert=app.settings.data_dir / "ca-cert.pem",
            **kw,
        )
        clients.append(c)
        return c

    yield make
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# -- a real `qpc run` process -----------------------------------------------------------

BIN = Path(sys.executable).parent
READY = re.compile(r"QUIC listening on ([\d.]+):(\d+)")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    data_dir: Path
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: asyncio.subprocess.Process | None = None
    log: list[str] = field(default_factory=list)
    _reader: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 30.0) -> None:
        if not self.port:
            self.port = free_udp_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "QPC_DB_KEY": "proc-test-key",
            "QPC_METRICS_ENABLED": "false",
            **self.env,
        }
        self.proc = await asyncio.create_subprocess_exec(
            str(BIN / "qpc"),
            "run",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--data-dir",
            str(self.data_dir),
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._reader = asyncio.ensure_future(self._read(ready))
        await asyncio.wait_for(ready, timeout)

    async def _read(self, ready: asyncio.Future[None]) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                if not ready.done():
                    ready.set_exception(RuntimeError("server exited:\n" + "".join(self.log)))
                return
            text = line.decode(errors="replace")
            self.log.append(text)
            if not ready.done() and READY.search(text):
                ready.set_result(None)

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()
        if self._reader:
            await self._reader

    async def terminate(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.terminate()
        rc = await asyncio.wait_for(self.proc.wait(), timeout)
        if self._reader:
            await self._reader
        return rc

    @property
    def ca(self) -> Path:
        return self.data_dir / "server-cert.pem"


async def process_client(
    srv: ServerProcess, identity: Ed25519PrivateKey | None = None, token: str = TEST_TOKEN
) -> QpcClient:
    """An SDK client of a :class:`ServerProcess` (a new identity unless one is given)."""
    return await QpcClient.connect(
        "127.0.0.1", srv.port, token=token, identity=identity or Ed25519PrivateKey.generate(),
        ca_cert=srv.ca,
    )


async def sigkill_loses_nothing(srv: ServerProcess, target: int = 1500, workers: int = 32) -> int:
    """Crash safety, for any storage backend: enqueue from ``workers`` concurrent callers
    until ``target`` messages are acknowledged, SIGKILL the server with enqueues in flight,
    start it again (same data dir, config and environment) and fetch everything.  Every
    acknowledged message must be there exactly once, under its seq, in seq order.  Returns
    how many were acknowledged.  ``srv`` must be started; it is left running."""
    from qpc_core.client.sdk import ConnectionLost
    from qpc_core.errors import RpcError

    sender = await process_client(srv)
    receiver = await process_client(srv)
    rkey, rid = receiver.identity_key, receiver.identity
    await receiver.close()
    assert rkey is not None and rid is not None
    acked: dict[int, bytes] = {}
    kill_at = asyncio.Event()
    counter = iter(range(10**9))

    async def worker() -> None:
        while not kill_at.is_set():
            payload = f"msg-{next(counter)}".encode()
            try:
                r = await asyncio.wait_for(sender.enqueue(rkey, payload, verify=False), 5)
            except (RpcError, ConnectionLost, TimeoutError, ConnectionError):
                return
            acked[r.seq] = payload
            if len(acked) >= target:
                kill_at.set()

    tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
    await kill_at.wait()
    await srv.kill()  # SIGKILL while enqueues are in flight
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await sender.close()
    assert len(acked) >= target

    await srv.start()
    receiver = await process_client(srv, identity=rid)
    got: list[tuple[int, bytes]] = []
    while True:
        batch = await receiver.fetch(limit=500)
        if not batch:
            break
        got.extend((m.seq, m.data) for m in batch)
    await receiver.close()
    seqs = [s for s, _ in got]
    assert seqs == sorted(set(seqs)), "seqs must be strictly increasing, each once"
    stored = dict(got)
    missing = [s for s in acked if s not in stored]
    assert not missing, f"{len(missing)} acknowledged messages lost"
    assert all(stored[s] == p for s, p in acked.items())
    return len(acked)
