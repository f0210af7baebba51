"""Built-in plugin ``admin``: the admin/metrics HTTP listener and the start-up system check.

* ``register_transports``: the Starlette admin app on ``metrics_listen`` (default
  ``0.0.0.0:9090``) when ``metrics_enabled``; see :mod:`qpc_core.admin.web` for the routes.
* ``startup``: warns when the open-file limit or the UDP buffer sizes are below what the
  scaling guide recommends for ``max_connections`` (:mod:`qpc_core.admin.syscheck`).
* ``on_*``: keeps the status page's figures (messages/s, handshake p95).

The Prometheus metrics themselves come from the ``metrics`` plugin, which registers its
collector in :func:`qpc_core.admin.metrics_registry`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qpc_core.admin.server import AdminTransport
from qpc_core.admin.state import admin_state
from qpc_core.admin.syscheck import warn_system
from qpc_core.hookspecs import hookimpl

if TYPE_CHECKING:
    from qpc_core.app import App
    from qpc_core.rpc import Connection, MessageEnqueued, MessagesFetched, Transport


@hookimpl
async def startup(app: App) -> None:
    admin_state(app)
    warn_system(app.settings.max_connections)


@hookimpl
def register_transports(app: App) -> list[Transport]:
    if not app.settings.metrics_enabled:
        return []
    return [AdminTransport()]


@hookimpl
def on_message_enqueued(app: App, event: MessageEnqueued) -> None:
    if not event.duplicate:
        admin_state(app).tracker.enqueued.add(1)


@hookimpl
def on_message_fetched(app: App, event: MessagesFetched) -> None:
    if event.method != "peek":
        admin_state(app).tracker.fetched.add(event.count)


@hookimpl
def on_handshake_completed(app: App, conn: Connection, seconds: float) -> None:
    admin_state(app).tracker.handshakes.observe(seconds)
