"""qpc plugin ``federation``: server-to-server relaying over mutual-TLS QUIC (methods 900-905).

Configured by core's ``[federation]`` table (the scaling guide's keys); see service.py for the
routing rules and docs/operations for setting up a federation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from qpc_core.admin import metrics_registry
from qpc_core.hookspecs import hookimpl
from qpc_core.storage.base import EnqueueOutcome, NewMessage
from qpc_core.transport.quic import QuicTransport
from qpc_federation import certs
from qpc_federation.metrics import FederationCollector
from qpc_federation.service import ALPN, Federation

if TYPE_CHECKING:
    from qpc_core.app import App
    from qpc_core.config import ConfigReload, Settings
    from qpc_core.rpc import Transport

STATE = "federation"
LISTENER = "federation"


def get(app: App) -> Federation | None:
    """This App's federation state; None when ``federation.enabled`` is false."""
    fed: Federation | None = app.state.get(STATE)
    return fed


@hookimpl
async def startup(app: App) -> None:
    cfg = app.settings.federation
    if cfg.enabled:
        fed = app.state[STATE] = Federation(app, cfg, certs.load(cfg))
        await fed.check_list_number()
        metrics_registry(app).register(FederationCollector(fed))


@hookimpl
def check_config(app: App) -> list[str]:
    cfg = app.settings.federation
    if not cfg.enabled:
        return ["federation: disabled"]
    tls = certs.load(cfg)  # what start-up checks: format, key pair, CA, own domain, list
    cert = tls.material.certificate
    lines = [f"federation: {cfg.domain} on {cfg.listen}, certificate valid until "
             f"{cert.not_valid_after_utc:%Y-%m-%d} under {tls.ca.subject.rfc4514_string()}, "
             f"{len(cfg.peers)} peer(s): {', '.join(p.domain for p in cfg.peers) or 'none'}"]
    if tls.crl is None:
        lines.append("federation: no revocation list (federation_crl): set one from the "
                     "start (qpc-federation-certs crl) so that a revocation needs no restart")
    else:
        nxt = f"{tls.crl.next_update:%Y-%m-%d}" if tls.crl.next_update else "not set"
        lines.append(f"federation: revocation list number {tls.crl.number}, "
                     f"{len(tls.crl.serials)} certificate(s) revoked, next update {nxt}")
    return lines


@hookimpl
async def shutdown(app: App) -> None:
    fed = get(app)
    if fed is not None:
        await fed.close()


@hookimpl
def register_transports(app: App) -> list[Transport]:
    fed = get(app)
    if fed is None:
        return []
    fed.listener = QuicTransport(
        name=LISTENER, listen=fed.cfg.listen, alpn=ALPN,
        # Read at start-up and again on SIGHUP (certificate, key, CA, revocation list).
        tls=fed.load_tls, methods=fed.methods(),
        peer_certificate_auth=fed.check_peer,
        max_connections=fed.max_connections,
        # Address validation before any state: Initials with forged sources cannot hold
        # the peers' connection slots.
        retry="on")
    return [fed.listener]


#: ``[federation]`` keys applied while running when the configuration is read again.
RELOADABLE = ["federation.peers", "federation.relay_timeout_secs",
              "federation.route_cache_secs", "federation.federation_crl",
              "federation.federation_cert", "federation.federation_key",
              "federation.federation_ca"]


@hookimpl
def register_reloadable_settings(app: App) -> list[str]:
    return RELOADABLE


@hookimpl
def check_reload(app: App, new: Settings) -> None:
    fed = get(app)
    if fed is not None:
        fed.check_reload(new.federation)


@hookimpl
async def on_config_reload(app: App, reload: ConfigReload) -> None:
    fed = get(app)
    if fed is not None and reload.changed("federation"):
        fed.apply_config(app.settings.federation)


@hookimpl
def on_tls_reload(app: App, listener: str, error: str | None) -> None:
    fed = get(app)
    if fed is not None and listener == LISTENER:
        fed.reloaded(error)


@hookimpl
async def relay_enqueue(
    app: App, sender: bytes, messages: Sequence[NewMessage]
) -> list[EnqueueOutcome | None] | None:
    fed = get(app)
    if fed is None or not fed.peers:
        return None
    return await fed.route(sender, messages)


@hookimpl
async def on_user_registered(app: App, username: str, identity_key: bytes) -> None:
    fed = get(app)
    if fed is not None:
        fed.local_changed(identity_key, True)


@hookimpl
async def on_account_deleted(app: App, identity_key: bytes, username: str | None) -> None:
    fed = get(app)
    if fed is not None:
        fed.local_changed(identity_key, False)


@hookimpl
async def fetch_remote_key_package(app: App, identity_key: bytes) -> bytes | None:
    fed = get(app)
    if fed is None or not fed.peers:
        return None
    return await fed.remote_key_package(identity_key)


@hookimpl
async def fetch_remote_hybrid_keys(
    app: App, identity_keys: Sequence[bytes]
) -> dict[bytes, bytes] | None:
    fed = get(app)
    if fed is None or not fed.peers:
        return None
    return await fed.remote_hybrid_keys(identity_keys)


@hookimpl
async def resolve_remote_user(app: App, username: str, domain: str) -> Any | None:
    fed = get(app)
    if fed is None:
        return None  # federation off: read as a local name (BAD_REQUEST: it holds "@")
    return await fed.remote_user(username, domain)
