"""Per-App admin state: the metrics registry served at ``/metrics`` and the status figures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from qpc_core.admin.status import StatusTracker

if TYPE_CHECKING:
    from qpc_core.admin.server import AdminTransport
    from qpc_core.app import App

STATE_KEY = "admin"


@dataclass(slots=True)
class AdminState:
    # One registry per App, never prometheus_client's global REGISTRY: several Apps in one
    # process (the test suite) must not see each other's metrics.
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True)
    )
    tracker: StatusTracker = field(default_factory=StatusTracker)
    transport: AdminTransport | None = None


def admin_state(app: App) -> AdminState:
    """The App's admin state, created on first use (whichever plugin asks first)."""
    st = app.state.get(STATE_KEY)
    if st is None:
        st = app.state[STATE_KEY] = AdminState()
    assert isinstance(st, AdminState)
    return st


def metrics_registry(app: App) -> CollectorRegistry:
    """The per-App Prometheus registry rendered at ``/metrics``.

    Plugins register their collectors here (in ``startup``), e.g.
    ``metrics_registry(app).register(MyCollector())``."""
    return admin_state(app).registry


def admin_address(app: App) -> tuple[str, int] | None:
    """(host, port) the admin HTTP app is bound to, or ``None`` when it is not running."""
    t = admin_state(app).transport
    return t.address if t is not None else None
