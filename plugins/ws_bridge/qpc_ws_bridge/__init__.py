"""qpc plugin ``ws_bridge``: browser clients over WebSocket.

The same RPC frames as QUIC, one per binary WebSocket message (wire format in
:mod:`qpc_ws_bridge.wire` and docs/protocol.md); the listener in :mod:`qpc_ws_bridge.bridge`;
the browser client library in ``static/qpc.js`` (served at ``<path>/qpc.js``).  Hook
implementations only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from qpc_core.admin import metrics_registry
from qpc_core.config import parse_hostport
from qpc_core.errors import ConfigError
from qpc_core.hookspecs import hookimpl
from qpc_core.rpc import ConfigSection
from qpc_ws_bridge.bridge import WsBridge
from qpc_ws_bridge.config import WsBridgeConfig

if TYPE_CHECKING:
    from qpc_core.app import App
    from qpc_core.config import ConfigReload
    from qpc_core.rpc import Transport

NAME = "ws_bridge"  # entry point = --plugins token = config table = app.state key


def _problems(app: App, cfg: WsBridgeConfig) -> list[str]:
    """What production refuses (tokens and sessions must not cross a network in clear)."""
    if not app.settings.production:
        return []
    out = []
    if not cfg.public_hosts:
        out.append("ws_bridge.public_hosts: production requires the host names browsers use "
                   "(identity proofs are bound to them; other Host headers are refused)")
    host, _port = parse_hostport(cfg.listen)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not cfg.tls and not loopback:
        out.append("ws_bridge.tls: production serves plain ws:// only on a loopback address "
                   "(behind a TLS reverse proxy); set tls = true or listen on 127.0.0.1")
    return out


@hookimpl
def register_config_sections(app: App) -> list[ConfigSection]:
    return [ConfigSection(NAME, WsBridgeConfig)]


@hookimpl
async def startup(app: App) -> None:
    cfg: WsBridgeConfig = app.plugin_config(NAME)
    problems = _problems(app, cfg)
    if problems:
        raise ConfigError("config: " + "; ".join(problems))
    bridge = app.state[NAME] = WsBridge(app, cfg)
    metrics_registry(app).register(_Collector(bridge))


#: Keys of ``[ws_bridge]`` applied while running (SIGHUP), to connections opened from then
#: on.  ``public_hosts`` is not among them: production's rule for it is checked at start-up.
RELOADABLE = ("allowed_origins", "trusted_proxies", "max_connections")


@hookimpl
def register_reloadable_settings(app: App) -> list[str]:
    return [f"{NAME}.{key}" for key in RELOADABLE]


@hookimpl
async def on_config_reload(app: App, reload: ConfigReload) -> None:
    bridge: WsBridge | None = app.state.get(NAME)
    if bridge is not None and reload.changed(NAME):
        bridge.configure(app.plugin_config(NAME))


@hookimpl
def check_config(app: App) -> list[str]:
    cfg: WsBridgeConfig = app.plugin_config(NAME)
    problems = _problems(app, cfg)
    if problems:
        raise ConfigError("config: " + "; ".join(problems))
    scheme = "wss" if cfg.tls else "ws"
    hosts = ", ".join(cfg.public_hosts) or "any host"
    origins = ", ".join(cfg.allowed_origins) if cfg.allowed_origins is not None else "any"
    return [f"ws_bridge: {scheme}://{cfg.listen}{cfg.path} for {hosts}, origins: {origins}"]


@hookimpl
def register_transports(app: App) -> list[Transport]:
    bridge: WsBridge | None = app.state.get(NAME)
    return [bridge] if bridge is not None else []


class _Collector:
    def __init__(self, bridge: WsBridge) -> None:
        self.bridge = bridge

    def collect(self) -> Iterator[Metric]:
        b = self.bridge
        yield GaugeMetricFamily("ws_bridge_connections",
                                "Open WebSocket bridge connections", value=len(b.conns))
        refused = CounterMetricFamily(
            "ws_bridge_upgrades_refused_total",
            "WebSocket upgrades the bridge refused, by reason", labels=["reason"])
        for reason, n in sorted(b.refused.items()):
            refused.add_metric([reason], n)
        yield refused
        yield CounterMetricFamily(
            "ws_bridge_pushes_dropped_total",
            "Push events dropped because the connection had too many waiting to be written",
            value=b.pushes_dropped)
