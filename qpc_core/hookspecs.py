"""Every qpc hook specification, and nothing else.

Conventions (see docs/hooks.md):

* ``register_*``: called once at start-up, returns a list.  Conflicting registrations (two
  plugins claiming one RPC method ID) are a start-up error naming both plugins.
* resolvers (``authenticate``, ``open_storage``, ``prove_binding``, ``relay_enqueue``,
  ``fetch_remote_*``, ``resolve_remote_user``): ``firstresult``; ``None``
  abstains; the first answer in plugin order wins; no answer means the safe default.
* ``on_*``: notifications.  A failing implementation is logged and isolated; it never breaks
  the request that triggered it.
* ``startup`` / ``shutdown``: awaited in plugin order / reverse plugin order.

Plugin order: core's built-in plugins first, then the selected plugins in the order listed.
Resolvers ask the *selected* plugins first (in listed order), then the built-ins, so a
selected plugin can override a built-in one.

Hooks marked ``async`` here must be implemented with ``async def``; the others with ``def``.
The loader checks this and refuses a mismatch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from cryptography import x509

    from qpc_core.app import App
    from qpc_core.config import ConfigReload, Settings
    from qpc_core.rpc import (
        AuthResult,
        ConfigSection,
        Connection,
        MessageEnqueued,
        MessagesFetched,
        PeerInfo,
        RpcMethod,
        Transport,
    )
    from qpc_core.storage.base import EnqueueOutcome, NewMessage, Storage

PROJECT = "qpc"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

ASYNC_HOOKS: set[str] = set()
"""Names of hooks whose implementations must be coroutine functions."""


def _async(fn: Any) -> Any:
    ASYNC_HOOKS.add(fn.__name__)
    return fn


# --- lifecycle ---------------------------------------------------------------------------


@hookspec
@_async
async def startup(app: App) -> None:
    """Called once after storage is open and before the listeners accept clients.

    Awaited one plugin at a time in plugin order.  Raising aborts start-up (the error line
    names the plugin)."""


@hookspec
@_async
async def shutdown(app: App) -> None:
    """Called once after connections are closed, before storage closes.

    Awaited in reverse plugin order.  A failure is logged and the next plugin still runs."""


# --- registration ------------------------------------------------------------------------


@hookspec
def register_rpc_methods(app: App) -> list[RpcMethod]:
    """Return the RPC methods this plugin serves (method ID → handler).

    Two plugins returning the same method ID is a start-up error naming both."""
    return []


@hookspec
def register_transports(app: App) -> list[Transport]:
    """Return listeners to start with the server (core registers the QUIC listener).

    Each is started after ``startup`` and told to stop accepting when the server drains."""
    return []


@hookspec
def register_admin_routes(app: App) -> list[Any]:
    """Return Starlette routes for the admin app, mounted under ``/p/<plugin name>/``.

    Every route mounted this way requires the admin token."""
    return []


@hookspec
def register_config_sections(app: App) -> list[ConfigSection]:
    """Return the config tables this plugin owns and the pydantic model validating each.

    Validated before start-up (and by ``qpc check-config``); the parsed model is available as
    ``app.plugin_config(name)``.  Errors name the path (``blobs.max_blob_bytes: ...``)."""
    return []


@hookspec
def register_reloadable_settings(app: App) -> list[str]:
    """Return the config keys this plugin applies while running, when the configuration is
    read again (SIGHUP): ``"blobs.max_blob_bytes"`` for one key, ``"blobs"`` for a whole
    table.  Keys of core's own settings cannot be declared (core decides those), except in
    the tables core validates for plugins (``federation.*``).  A changed key nobody declared
    keeps its running value until a restart.  Apply the change in ``on_config_reload``."""
    return []


@hookspec
def check_reload(app: App, new: Settings) -> None:
    """Before a configuration reload changes anything: raise
    :class:`~qpc_core.errors.ConfigError` to refuse it whole (the running configuration
    stays, the refusal is logged and counted).  ``new`` is what would then be in force
    (changed settings that need a restart keep their running values in it)."""


@hookspec
def check_config(app: App) -> list[str]:
    """``qpc check-config`` only: check the files and resources your configuration names the
    way start-up would (certificates, keys, directories), without starting anything.  Raise
    :class:`~qpc_core.errors.ConfigError` naming the config key for a problem; return lines
    saying what was checked (printed in plugin order)."""
    return []


# --- resolvers -----------------------------------------------------------------------------


@hookspec(firstresult=True)
@_async
async def open_storage(app: App) -> Storage | None:
    """Return the opened storage backend, or ``None`` to let another plugin answer.

    The built-in SQLCipher backend answers when ``storage = "sqlcipher"``."""


@hookspec(firstresult=True)
@_async
async def authenticate(app: App, token: bytes, peer: PeerInfo) -> AuthResult | None:
    """Check a bearer token (connection handshake or a request's ``Auth`` field).

    Return an :class:`~qpc_core.rpc.AuthResult` to accept, ``None`` if the token is not
    yours.  When nobody accepts, the caller is unauthenticated (fail closed).  Raise
    :class:`~qpc_core.errors.Unauthenticated` to reject a token you recognise but refuse
    (expired session)."""


@hookspec(firstresult=True)
@_async
async def prove_binding(app: App, username: str, identity_key: bytes) -> Any | None:
    """Return a ``qpc.v1.KtInclusion`` proving the (username, identity key) binding.

    Used by ResolveUser / ResolveIdentity; ``None`` leaves the field empty."""


@hookspec(firstresult=True)
@_async
async def relay_enqueue(
    app: App, sender: bytes, messages: Sequence[NewMessage]
) -> list[EnqueueOutcome | None] | None:
    """Deliver messages whose recipients another server hosts (federation).

    Called by Enqueue and BatchEnqueue after their checks (sizes, channel membership, rate
    limits) and before anything is stored here.  Return one entry per message, in order:
    the home server's :class:`~qpc_core.storage.base.EnqueueOutcome` (seq, duplicate) for
    each message you delivered there, ``None`` for each message to store on this server.
    Return ``None`` to abstain (everything is stored here).  Raise an
    :class:`~qpc_core.errors.RpcError` (e.g. ``Unavailable`` when the home server cannot be
    reached) to fail the call; messages already accepted by other servers stay there, so
    clients retry with the same ``message_id`` (deduplicated).  This server then signs the
    delivery proof over the home server's seq, as for a message it stored itself.
    Not called for messages that arrive over federation themselves (no relay loops)."""


@hookspec(firstresult=True)
@_async
async def fetch_remote_key_package(app: App, identity_key: bytes) -> bytes | None:
    """FetchKeyPackage found no package here for ``identity_key``: if another server hosts
    the identity (federation), pop one there.  Return the package, ``b""`` when that server
    has none, or ``None`` to abstain (the caller answers "none"; also the answer for an
    identity this server hosts: the implementer checks, core does not)."""


@hookspec(firstresult=True)
@_async
async def fetch_remote_hybrid_keys(
    app: App, identity_keys: Sequence[bytes]
) -> dict[bytes, bytes] | None:
    """FetchHybridKey / FetchHybridKeys found no hybrid key here for ``identity_keys``: return
    the keys that the servers hosting them hold (identities hosted here, or without a key,
    left out), or ``None`` to abstain."""


@hookspec(firstresult=True)
@_async
async def resolve_remote_user(app: App, username: str, domain: str) -> Any | None:
    """ResolveUser of ``username@domain`` where ``domain`` is not this server's: return the
    ``qpc.v1.ResolveUserResponse`` of the server for ``domain`` (its ``username`` field is then
    ``username@domain``).  Raise ``NotFound`` for a user that server does not have, or for a
    domain you know no server for.  ``None`` abstains: the name is then read as a local
    name (which cannot hold ``@``: ``BAD_REQUEST``), as without federation."""


# --- notifications -------------------------------------------------------------------------


@hookspec
def on_connection_opened(app: App, conn: Connection) -> None:
    """A client finished the TLS handshake."""


@hookspec
def on_connection_closed(app: App, conn: Connection, reason: str) -> None:
    """A client connection ended (any reason)."""


@hookspec
def on_handshake_completed(app: App, conn: Connection, seconds: float) -> None:
    """The QUIC/TLS handshake took ``seconds`` from the first client packet."""


@hookspec
def on_rpc_completed(app: App, method_id: int, method: str, status: int, seconds: float) -> None:
    """One RPC was answered with ``status`` after ``seconds``.  ``method`` is the method name,
    or ``"unknown"`` for unregistered IDs (so label sets stay bounded)."""


@hookspec
def on_message_enqueued(app: App, event: MessageEnqueued) -> None:
    """A message was committed to a queue (also fired with ``duplicate=True`` for dedup hits)."""


@hookspec
def on_message_fetched(app: App, event: MessagesFetched) -> None:
    """Messages were handed to their recipient by Fetch, FetchWait or Peek."""


@hookspec
def on_key_package_uploaded(app: App, identity_key: bytes, fingerprint: bytes) -> None:
    """A key package was stored."""


@hookspec
def on_login_success(app: App, username: str, identity_key: bytes, peer: PeerInfo) -> None:
    """A login completed."""


@hookspec
def on_login_failure(app: App, username: str, peer: PeerInfo, reason: str) -> None:
    """A login failed (wrong password, unknown user, throttled...)."""


@hookspec
def on_rate_limited(
    app: App, key_kind: str, group: str, method_id: int, retry_after: float
) -> None:
    """A call was refused by a rate limiter.

    ``key_kind`` is ``identity`` or ``ip`` (core limiter) or ``username`` (a login throttle,
    which also reports ``ip``)."""


@hookspec
def on_storage_operation(app: App, operation: str, seconds: float) -> None:
    """The storage backend finished ``operation`` (e.g. ``commit``, ``fetch``) in ``seconds``."""


@hookspec
def on_tls_certificate(app: App, listener: str, certificate: x509.Certificate) -> None:
    """Listener ``listener`` serves ``certificate`` to new connections: once at start-up for
    every listener with TLS, and again after each successful reload (SIGHUP)."""


@hookspec
def on_tls_reload(app: App, listener: str, error: str | None) -> None:
    """A certificate reload of ``listener`` finished: ``error`` None means the new files are
    in use; otherwise it says what was wrong with them, and the old pair stays in use."""


@hookspec
@_async
async def on_config_reload(app: App, reload: ConfigReload) -> None:
    """The configuration was read again (SIGHUP).  When ``reload.error`` is None,
    ``app.settings`` / ``app.plugin_config(...)`` hold the new values of the keys in
    ``reload.applied`` (the old ones are in ``reload.old``): apply yours
    (``reload.changed("blobs")``).  Awaited in plugin order; a failure is logged."""


@hookspec
@_async
async def on_user_registered(app: App, username: str, identity_key: bytes) -> None:
    """A username was bound to an identity key (awaited before the registration answers)."""


@hookspec
@_async
async def on_account_deleted(app: App, identity_key: bytes, username: str | None) -> None:
    """An account's data was purged (awaited before DeleteAccount answers)."""
