"""qpc plugin ``metrics``: Prometheus metrics on the admin app's ``/metrics``.

Hook implementations only: the metric families live in :mod:`qpc_metrics.collector`, the
per-App state (registration, queue-depth resync) in :mod:`qpc_metrics.service`.  Every
counter moves from a core ``on_*`` notification; gauges read the App at scrape time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from qpc_core.hookspecs import hookimpl
from qpc_core.rpc import ConfigSection
from qpc_metrics.config import MetricsConfig

if TYPE_CHECKING:
    from cryptography import x509

    from qpc_core.app import App
    from qpc_core.config import ConfigReload
    from qpc_core.rpc import Connection, MessageEnqueued, MessagesFetched, PeerInfo
    from qpc_metrics.collector import QpcMetrics
    from qpc_metrics.service import MetricsService

NAME = "metrics"


def _service(app: App) -> MetricsService:
    svc: MetricsService = app.state[NAME]
    return svc


def _m(app: App) -> QpcMetrics | None:
    svc: MetricsService | None = app.state.get(NAME)
    return svc.metrics if svc is not None else None


@hookimpl
def register_config_sections(app: App) -> list[ConfigSection]:
    return [ConfigSection(NAME, MetricsConfig)]


@hookimpl
async def startup(app: App) -> None:
    from qpc_metrics.service import MetricsService

    svc = app.state[NAME] = MetricsService(app, app.plugin_config(NAME))
    svc.register()
    await svc.resync()
    app.spawn(svc.resync_forever(), "metrics-queue-depth-resync")


@hookimpl
def register_admin_routes(app: App) -> list[Any]:
    async def resync(request: Request) -> Response:
        depth = await _service(app).resync()
        if depth is None:
            return JSONResponse({"error": "storage did not answer"}, status_code=503)
        return JSONResponse({"delivery_queue_depth": depth})

    return [Route("/resync", resync, methods=["POST"])]


# -- notifications: every counter moves here -------------------------------------------------------


@hookimpl
def on_connection_opened(app: App, conn: Connection) -> None:
    m = _m(app)
    if m is not None:
        m.connections_opened += 1


@hookimpl
def on_handshake_completed(app: App, conn: Connection, seconds: float) -> None:
    m = _m(app)
    if m is not None:
        m.handshake.observe(seconds)


@hookimpl
def on_rpc_completed(app: App, method_id: int, method: str, status: int, seconds: float) -> None:
    m = _m(app)
    if m is not None:
        m.rpc_completed(method, status, seconds)


@hookimpl
def on_message_enqueued(app: App, event: MessageEnqueued) -> None:
    m = _m(app)
    if m is not None:
        m.message_enqueued(event.size, event.duplicate)


@hookimpl
def on_message_fetched(app: App, event: MessagesFetched) -> None:
    m = _m(app)
    if m is not None:
        m.messages_fetched(event.method, event.count, event.size)


@hookimpl
def on_key_package_uploaded(app: App, identity_key: bytes, fingerprint: bytes) -> None:
    m = _m(app)
    if m is not None:
        m.key_package_upload += 1


@hookimpl
def on_login_success(app: App, username: str, identity_key: bytes, peer: PeerInfo) -> None:
    m = _m(app)
    if m is not None:
        m.login_success += 1


@hookimpl
def on_login_failure(app: App, username: str, peer: PeerInfo, reason: str) -> None:
    m = _m(app)
    if m is not None:
        m.login_failure += 1


@hookimpl
def on_rate_limited(
    app: App, key_kind: str, group: str, method_id: int, retry_after: float
) -> None:
    m = _m(app)
    if m is not None:
        m.rate_limit_hit += 1


@hookimpl
def on_storage_operation(app: App, operation: str, seconds: float) -> None:
    m = _m(app)
    if m is not None:
        m.storage_operation(operation, seconds)


@hookimpl
def on_tls_certificate(app: App, listener: str, certificate: x509.Certificate) -> None:
    m = _m(app)
    if m is not None:
        m.tls_certificate(listener, certificate.not_valid_after_utc.timestamp())


@hookimpl
def on_tls_reload(app: App, listener: str, error: str | None) -> None:
    m = _m(app)
    if m is not None:
        m.tls_reload(listener, error is None)


@hookimpl
async def on_config_reload(app: App, reload: ConfigReload) -> None:
    m = _m(app)
    if m is not None:
        m.config_reload(reload.error is None, len(reload.restart_pending))
