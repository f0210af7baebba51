"""Types shared by the RPC layer, hooks and plugins: methods, contexts, auth results, events."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from google.protobuf.message import Message

from qpc_core.errors import Forbidden, RateLimited, TooLarge, Unauthenticated

if TYPE_CHECKING:
    from qpc_core.app import App

AuthLevel = Literal["none", "authenticated", "identity"]
"""What a method needs from the caller's connection.

* ``none``: callable before login (auth methods, Health).
* ``authenticated``: any accepted credential (operator token or session).
* ``identity``: a proven Ed25519 identity (session login, or token + ProveIdentity).
"""

Handler = Callable[["RpcContext", Any], Awaitable[Message]]


@dataclass(frozen=True, slots=True)
class RpcMethod:
    """One RPC method a plugin serves.  Returned in lists from ``register_rpc_methods``.

    ``request_type`` is the protobuf class the payload is parsed into (a parse failure is
    ``BAD_REQUEST`` before the handler runs); the handler returns the response message.
    ``group`` selects the rate limit (``rate_limits.<group>`` in config).

    ``cancel_on_disconnect``: when the client resets the call's stream, sends STOP_SENDING
    or disconnects, the handler's task is cancelled.  Off by default: a handler then runs to
    completion (unanswered), so it is never stopped between two writes.  Turn it on for
    handlers that mostly wait (long polls) and are safe to stop at any ``await``.
    """

    method_id: int
    name: str
    request_type: type[Message]
    handler: Handler
    group: str = "default"
    auth: AuthLevel = "identity"
    rate_limited: bool = True
    cancel_on_disconnect: bool = False


@dataclass(slots=True)
class AuthResult:
    """What an ``authenticate`` hook returns for an accepted token.

    ``identity_key`` is set when the credential itself proves an identity (an OPAQUE session);
    ``None`` for credentials that must still run ProveIdentity (the operator token).
    """

    kind: str
    identity_key: bytes | None = None
    username: str | None = None
    session_id: bytes | None = None
    expires_at: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


_connection_ids = itertools.count(1)


def new_connection_id() -> int:
    """A process-unique id for a new client connection (``Connection.connection_id``); every
    transport draws from this one counter, so ids never collide between listeners."""
    return next(_connection_ids)


@dataclass(frozen=True, slots=True)
class PeerInfo:
    host: str
    port: int


class Connection(Protocol):
    """What plugins may see of a client connection (implemented by the transport)."""

    @property
    def connection_id(self) -> int: ...

    @property
    def peer(self) -> PeerInfo: ...

    @property
    def auth(self) -> AuthResult | None: ...

    @property
    def identity_key(self) -> bytes | None: ...

    def bind(self, auth: AuthResult) -> None:
        """Bind the connection to a credential (and identity when the result carries one)."""

    def bind_identity(self, identity_key: bytes) -> None: ...

    def unbind(self) -> None:
        """Forget the credential and identity (the connection becomes unauthenticated)."""

    def note_request_credential(self, auth: AuthResult) -> None:
        """A request's own ``Auth`` field was accepted (called by the dispatcher): the
        connection counts as authenticated while that credential is valid."""

    def forget_credential(
        self, session_id: bytes | None = None, *, identity_key: bytes | None = None
    ) -> None:
        """A session (Logout) or an identity's account (DeleteAccount) was revoked: drop the
        credentials it made, bound or per-request.  (Optional for transports written before
        it; core calls it when present.)"""

    def push(self, event_type: int, payload: bytes) -> None:
        """Send a push frame on a new server-opened unidirectional stream."""

    def disconnect(self, reason: str) -> None:
        """Close the connection with ``reason`` as the QUIC reason phrase."""


@dataclass(slots=True)
class RpcContext:
    """Passed to every handler: the app, the calling connection and the call's auth."""

    app: App
    conn: Connection
    method: RpcMethod
    request_id: int
    auth: AuthResult | None
    #: Units this call has counted in its own rate-limit group (the dispatcher's 1, plus
    #: :meth:`charge`); the dispatcher sets the 1.
    charged: int = 0
    #: Units counted in other groups by :meth:`charge` (created on first use).
    charged_other: dict[str, int] | None = None

    @property
    def identity_key(self) -> bytes | None:
        if self.auth is not None and self.auth.identity_key is not None:
            return self.auth.identity_key
        return self.conn.identity_key

    def require_identity(self) -> bytes:
        """The caller's proven identity key, or ``UNAUTHENTICATED``."""
        ident = self.identity_key
        if ident is None:
            raise Unauthenticated(
                "this method needs a proven identity: log in, or prove your key with "
                "AuthChallenge (104) + ProveIdentity (105)"
            )
        return ident

    def require_self(self, identity_key: bytes, what: str = "queue") -> bytes:
        """Only the identity bound to the connection may act on its own ``what``."""
        ident = self.require_identity()
        if ident != identity_key:
            raise Forbidden(f"you may only access your own {what}")
        return ident

    def charge(self, extra: int, what: str = "units", *, group: str | None = None) -> None:
        """Count ``extra`` more units of rate limit for this call, against the caller's
        identity and IP.

        Without ``group``: this method's own group, where the dispatcher already counted 1
        (for calls whose work grows with the request, e.g. BatchEnqueue per recipient).
        With ``group``: another group, and only if the operator configured it explicitly
        (e.g. ``[rate_limits.enqueue]``; an unconfigured one does not fall back to
        ``default``).  ``RATE_LIMITED`` with retry-after when a budget is used up,
        ``TOO_LARGE`` when the call alone exceeds a limit (waiting would not help); either
        way the call then counts nothing, in any group."""
        if extra <= 0:
            return
        limiter = self.app.rate_limiter
        own = group is None or group == self.method.group
        name = self.method.group if own else str(group)
        if own and not self.method.rate_limited:
            return
        spec = limiter.limit_for(name) if own else limiter.limits.get(name)
        if spec is None:
            return
        keys: list[tuple[str, object]] = [("ip", self.conn.peer.host)]
        allowed = spec.requests * limiter.ip_factor
        if self.identity_key is not None:
            keys.insert(0, ("identity", self.identity_key))
            allowed = spec.requests
        total = (self.charged if own else 0) + extra
        if total > allowed:
            self._give_back(keys)
            raise TooLarge(
                f"this call counts as {total} {what} and the '{name}' rate limit allows "
                f"{spec.requests} per {spec.window_secs:g}s"
            )
        res = limiter.check_all(name, keys, extra)
        if not res.allowed:
            # A refused call counts nothing, or a batch that fills a whole limit could never
            # get through by retrying.
            self._give_back(keys)
            self.app.hooks.on_rate_limited(
                self.app, res.kind, name, self.method.method_id, res.retry_after_secs
            )
            raise RateLimited(
                f"rate limit for '{name}' calls exceeded ({total} {what}); "
                f"retry in {res.retry_after_secs:.1f}s",
                retry_after=res.retry_after_secs,
            )
        if own:
            self.charged += extra
        else:
            other = self.charged_other if self.charged_other is not None else {}
            other[name] = other.get(name, 0) + extra
            self.charged_other = other

    def _give_back(self, keys: list[tuple[str, object]]) -> None:
        """A refused call counts nothing anywhere: return what it counted so far."""
        limiter = self.app.rate_limiter
        if self.method.rate_limited and self.charged:
            limiter.refund(self.method.group, keys, self.charged)
            self.charged = 0
        if self.charged_other:
            for name, units in self.charged_other.items():
                limiter.refund(name, keys, units)
            self.charged_other = None


@dataclass(frozen=True, slots=True)
class MessageEnqueued:
    """Event for ``on_message_enqueued``: one message accepted (and committed) for a queue."""

    recipient_key: bytes
    channel_id: bytes
    seq: int
    size: int
    sender_key: bytes | None
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class MessagesFetched:
    """Event for ``on_message_fetched``: ``count`` messages handed to a recipient."""

    recipient_key: bytes
    channel_id: bytes
    count: int
    size: int
    method: str  # "fetch", "fetch_wait", "peek"


@dataclass(frozen=True, slots=True)
class ConfigSection:
    """A plugin's config table: ``name`` is the top-level TOML table, ``model`` validates it."""

    name: str
    model: type[Any]


class Transport(Protocol):
    """A listener the App starts and stops (the QUIC server, the admin HTTP app, ...).

    A listener that serves TLS may also have a ``tls_certificate`` attribute (the
    ``x509.Certificate`` new connections get; the App reports it through the
    ``on_tls_certificate`` hook) and an ``async reload_tls() -> x509.Certificate | None``
    method: read its certificate files again and serve them to new connections (None: it
    has nothing to reload), raising :class:`~qpc_core.errors.ConfigError` and keeping the
    old pair when they are bad.  :meth:`App.reload_tls` (SIGHUP) calls it."""

    name: str

    @property
    def ready(self) -> bool: ...

    async def start(self, app: App) -> None: ...

    async def stop_accepting(self) -> None: ...

    async def close(self, reason: str) -> None: ...
