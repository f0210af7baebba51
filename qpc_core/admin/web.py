"""The admin HTTP app (Starlette): health, readiness, metrics, status page, plugin routes.

Public (for load balancers, Prometheus and the operator's browser):

* ``GET /healthz``: the process is alive (200 even while draining);
* ``GET /readyz``: 200 when storage answers, every listener (the QUIC one at least) is up
  and the server is not draining; otherwise 503 with the reasons;
* ``GET /metrics``: Prometheus text of the per-App registry (the ``metrics`` plugin fills it);
* ``GET /`` and ``GET /status.json``: the status page and its data.

Everything else needs ``Authorization: Bearer <admin_token>``: ``GET /plugins`` and every
route a plugin returns from ``register_admin_routes``, mounted under ``/p/<plugin name>/``.
No token configured means those routes are disabled (403), never open.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocketClose

from qpc_core.admin.page import STATUS_PAGE
from qpc_core.admin.state import admin_state
from qpc_core.errors import PluginError

if TYPE_CHECKING:
    from qpc_core.app import App
    from qpc_core.rpc import Transport

log = logging.getLogger("qpc.admin")

PLUGIN_PREFIX = "/p"
STORAGE_PING_TIMEOUT = 2.0
# The classic Prometheus text format, which every Prometheus version parses.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    # The page is self-contained: one inline script and style, data from this origin only.
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
    "style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
}


def token_problem(app: App, headers: Headers) -> tuple[int, str] | None:
    """``None`` when the request carries the admin token, else (status, message)."""
    secret = app.settings.admin_token
    expected = secret.get_secret_value() if secret is not None else ""
    if not expected:
        return 403, "admin routes are disabled: set admin_token (QPC_ADMIN_TOKEN) to enable them"
    scheme, _, given = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return 401, "admin token required: send 'Authorization: Bearer <admin_token>'"
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        return 401, "invalid admin token"
    return None


class TokenGuard:
    """ASGI wrapper: pass the request on only with the admin token (HTTP and WebSocket)."""

    def __init__(self, inner: ASGIApp, app: App) -> None:
        self.inner = inner
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.inner(scope, receive, send)
            return
        problem = token_problem(self.app, Headers(scope=scope))
        if problem is None:
            await self.inner(scope, receive, send)
            return
        status, message = problem
        client = scope.get("client")
        log.info("admin: refused %s %s from %s: %s", scope.get("method", "WS"),
                 scope.get("path"), client[0] if client else "?", message)
        if scope["type"] == "websocket":
            await WebSocketClose(code=1008, reason=message)(scope, receive, send)
            return
        headers = {"WWW-Authenticate": 'Bearer realm="qpc-admin"'} if status == 401 else None
        await JSONResponse({"error": message}, status_code=status, headers=headers)(
            scope, receive, send
        )


async def readiness_problems(app: App, exclude: Transport | None = None) -> list[str]:
    """Why the server should not get traffic now (empty list: ready)."""
    reasons: list[str] = []
    if app.draining:
        reasons.append("draining: the server is shutting down")
    elif not app.started:
        reasons.append("starting: not every listener is up yet")
    if not app.has_storage:
        reasons.append("storage is not open")
    else:
        try:
            await asyncio.wait_for(app.storage.ping(), STORAGE_PING_TIMEOUT)
        except TimeoutError:
            reasons.append(f"storage did not answer within {STORAGE_PING_TIMEOUT:g}s")
        except Exception as e:
            reasons.append(f"storage unreachable: {e}")
    if not any(t.name == "quic" for _p, t in app.transports):
        reasons.append("no QUIC listener is registered (is the 'core' plugin blocked?)")
    for plugin, t in app.transports:
        if t is exclude:
            continue
        if not t.ready:
            reasons.append(f"listener '{t.name}' (plugin '{plugin}') is not accepting")
    return reasons


async def status_snapshot(app: App) -> dict[str, Any]:
    """The figures of the status page (``/status.json``)."""
    tracker = admin_state(app).tracker
    depth = None
    if app.has_storage:
        depth = await tracker.queue_depth(app.storage.total_queue_depth)
    p95 = tracker.handshakes.quantile(0.95)
    last = app.last_config_reload
    return {
        "version": app.version,
        "uptime_secs": max(0.0, time.time() - app.started_at),
        "started_at": app.started_at,
        "draining": app.draining,
        "connections": len(app.connections),
        "max_connections": app.settings.max_connections,
        "in_flight": app.in_flight,
        "queue_depth": depth,
        "messages": {
            "enqueued_total": tracker.enqueued.total,
            "fetched_total": tracker.fetched.total,
            "rate_1m": tracker.enqueued.rate(60),
            "rate_5m": tracker.enqueued.rate(tracker.enqueued.seconds - 1),
            "per_second": tracker.enqueued.series(),
        },
        "handshake_p95_ms": None if p95 is None else p95 * 1000.0,
        # Names only (the page is public): has the configuration file been read again, was
        # it taken, and which changed settings wait for a restart.
        "config": {
            "reloaded_at": last.at if last is not None else None,
            "reload_ok": last.error is None if last is not None else None,
            "restart_pending": list(app.config_restart_pending),
        },
        "handshakes_in_window": tracker.handshakes.count(),
        "plugins": [
            {"name": p.name, "distribution": p.distribution, "version": p.version,
             "order": p.order, "builtin": p.builtin}
            for p in app.plugins
        ],
    }


def plugin_mounts(app: App) -> dict[str, list[BaseRoute]]:
    """``register_admin_routes`` answers grouped by plugin (start-up error on a bad route)."""
    by_plugin: dict[str, list[BaseRoute]] = {}
    for plugin, route in app.hooks.register_admin_routes(app):
        if not isinstance(route, BaseRoute):
            raise PluginError(
                f"plugin '{plugin}': register_admin_routes returned {type(route).__name__}, "
                "expected Starlette routes (starlette.routing.Route, Mount, WebSocketRoute)"
            )
        by_plugin.setdefault(plugin, []).append(route)
    return by_plugin


class AdminWeb:
    """Endpoints bound to one App; :meth:`asgi` builds the Starlette application."""

    def __init__(self, app: App, transport: Transport | None = None) -> None:
        self.app = app
        self.transport = transport
        self.mounts = plugin_mounts(app)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "alive", "draining": self.app.draining})

    async def readyz(self, request: Request) -> Response:
        reasons = await readiness_problems(self.app, self.transport)
        if reasons:
            return JSONResponse({"status": "not ready", "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ready", "reasons": []})

    async def metrics(self, request: Request) -> Response:
        body = generate_latest(admin_state(self.app).registry)
        if not body:
            return PlainTextResponse(
                "no metrics are collected: load the 'metrics' plugin (plugins = [\"metrics\"])\n",
                status_code=404,
            )
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    async def index(self, request: Request) -> Response:
        return HTMLResponse(STATUS_PAGE, headers=PAGE_HEADERS)

    async def status(self, request: Request) -> Response:
        return JSONResponse(await status_snapshot(self.app), headers={"Cache-Control": "no-store"})

    async def plugins(self, request: Request) -> Response:
        rows = []
        for p in self.app.plugins:
            row = p.as_dict()
            row["admin_prefix"] = f"{PLUGIN_PREFIX}/{p.name}/" if p.name in self.mounts else None
            rows.append(row)
        return JSONResponse({"plugins": rows})

    def asgi(self) -> Starlette:
        guarded_plugins = TokenGuard(
            Router(routes=[Mount(f"/{name}", routes=routes) for name, routes in
                           self.mounts.items()]),
            self.app,
        )
        routes: list[BaseRoute] = [
            Route("/", self.index, methods=["GET"]),
            Route("/status.json", self.status, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            Route("/plugins", TokenGuard(_endpoint_app(self.plugins), self.app)),
            Mount(PLUGIN_PREFIX, app=guarded_plugins),
        ]
        return Starlette(routes=routes)


def _endpoint_app(endpoint: Any) -> ASGIApp:
    """A request/response endpoint as a plain ASGI app (so a guard can wrap it)."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        response = await endpoint(Request(scope, receive))
        await response(scope, receive, send)

    return asgi
