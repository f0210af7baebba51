"""The admin listener: uvicorn serving :mod:`qpc_core.admin.web` inside the server's loop.

It is a :class:`~qpc_core.rpc.Transport` registered by the built-in ``admin`` plugin, so the
App starts it with the other listeners and closes it at shutdown.  While the server drains
it keeps answering (that is when ``/readyz`` must say 503); it closes when the App closes
its listeners.

We bind the socket ourselves (so ``metrics_listen = "127.0.0.1:0"`` works and the bound
address is known) and hand it to uvicorn.  uvicorn's own signal capture is disabled: the
App owns SIGTERM/SIGINT and stops every listener in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator
from typing import TYPE_CHECKING

import uvicorn

from qpc_core.admin.state import admin_state
from qpc_core.admin.web import AdminWeb
from qpc_core.config import parse_hostport

if TYPE_CHECKING:
    from qpc_core.app import App

log = logging.getLogger("qpc.admin")

SHUTDOWN_GRACE_SECS = 2


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without signal handling, signalling when it is listening."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the App handles signals

    def install_signal_handlers(self) -> None:
        """Older uvicorn releases install loop signal handlers here instead: the App owns them."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.listening.set()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv4 or IPv6; port 0 picks a free port)."""
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, _type, proto, _canon, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class AdminTransport:
    """The admin/metrics HTTP listener on ``metrics_listen``."""

    name = "admin"

    def __init__(self) -> None:
        self.address: tuple[str, int] | None = None
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None
        self._sock: socket.socket | None = None

    @property
    def ready(self) -> bool:
        return self._server is not None and self._server.listening.is_set() \
            and not self._server.should_exit

    async def start(self, app: App) -> None:
        web = AdminWeb(app, self)
        host, port = parse_hostport(app.settings.metrics_listen)
        self._sock = bind(host, port)
        sockname = self._sock.getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        config = uvicorn.Config(
            web.asgi(),
            log_config=None,  # leave the process's logging alone
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=SHUTDOWN_GRACE_SECS,
        )
        server = self._server = _EmbeddedServer(config)
        self._task = asyncio.get_running_loop().create_task(
            server.serve(sockets=[self._sock]), name="admin-http"
        )
        listening = asyncio.ensure_future(server.listening.wait())
        await asyncio.wait([self._task, listening], return_when=asyncio.FIRST_COMPLETED)
        if not listening.done():
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
            await self._finish()
            raise OSError(f"admin HTTP server on {app.settings.metrics_listen} did not start")
        admin_state(app).transport = self
        log.info("admin HTTP listening on %s:%d (/metrics, /healthz, /readyz, status page /)",
                 *self.address)

    async def stop_accepting(self) -> None:
        """Keep serving while the App drains: /readyz answers 503 during that time."""

    async def close(self, reason: str) -> None:
        if self._server is not None:
            self._server.should_exit = True
        await self._finish()

    async def _finish(self) -> None:
        if self._task is not None:
            try:
                await self._task
            except Exception:
                log.exception("admin HTTP server failed")
            self._task = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
