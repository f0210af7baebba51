"""What a client connection is allowed to be: its credential, its proven identity, a per-request
credential, and when a session's time is up.  Shared by the QUIC listener and transports of
plugins (the WebSocket bridge), so every transport treats credentials the same way.

A transport class mixes :class:`ConnectionCredentials` in, calls :meth:`_init_credentials` in
its constructor and provides ``app``, ``_loop``, ``_gone``, ``push()``, ``_authenticated()``
(a credential arrived: lift the pre-auth limits, stop the auth deadline) and
``_unauthenticated()`` (the last credential went: pre-auth limits, auth deadline again).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from qpc_core.framing import PushEvent
from qpc_core.pb import common_pb2
from qpc_core.rpc import AuthResult

if TYPE_CHECKING:
    from qpc_core.app import App

#: Session timers wake at least this often and compare with the wall clock again (a clock
#: stepped or a host suspended moves ``expires_at``, which is wall-clock time, against the
#: loop's monotonic timers).
MAX_EXPIRY_TIMER_SECS = 3600.0


class ConnectionCredentials:
    app: App
    _loop: asyncio.AbstractEventLoop
    _gone: bool

    def _init_credentials(self) -> None:
        self._auth: AuthResult | None = None
        self._identity: bytes | None = None
        # A request's own Auth field that the dispatcher accepted on a connection bound to
        # no credential: the connection counts as authenticated while it is valid.
        self._request_auth: AuthResult | None = None
        self._expiry: asyncio.TimerHandle | None = None

    # -- provided by the transport --------------------------------------------------------------
    def push(self, event_type: int, payload: bytes) -> None:
        raise NotImplementedError

    def _authenticated(self) -> None:
        raise NotImplementedError

    def _unauthenticated(self) -> None:
        raise NotImplementedError

    def _accepting_credentials(self) -> bool:
        """False once the connection ended (or is closing): nothing is bound any more."""
        return not self._gone

    # -- Connection protocol --------------------------------------------------------------------
    @property
    def auth(self) -> AuthResult | None:
        return self._auth

    @property
    def identity_key(self) -> bytes | None:
        return self._identity

    @property
    def authenticated(self) -> bool:
        """Has a credential or a proven identity (what lifts the pre-auth limits)."""
        return (self._auth is not None or self._identity is not None
                or self._request_auth is not None)

    def bind(self, auth: AuthResult) -> None:
        if not self._accepting_credentials():  # e.g. a call that finished after the end
            return
        self._auth = auth
        if auth.identity_key is not None:
            self.bind_identity(auth.identity_key)
        self._authenticated()
        self._watch_expiry()

    def bind_identity(self, identity_key: bytes) -> None:
        if not self._accepting_credentials() or self._identity == identity_key:
            return
        if self._identity is not None:
            self.app.unbind_identity(self, self._identity)  # type: ignore[arg-type]
        self._identity = identity_key
        self.app.bind_identity(self, identity_key)  # type: ignore[arg-type]
        self._authenticated()

    def unbind(self) -> None:
        """Forget every credential and the identity (logout, account deletion, expiry)."""
        self._auth = None
        self._request_auth = None
        if self._identity is not None:
            self.app.unbind_identity(self, self._identity)  # type: ignore[arg-type]
            self._identity = None
        self._watch_expiry()
        self._unauthenticated()

    def note_request_credential(self, auth: AuthResult) -> None:
        """The dispatcher accepted a request's own ``Auth`` field (before running the call)."""
        if not self._accepting_credentials() or self._auth is not None:
            return
        self._request_auth = auth
        self._authenticated()
        self._watch_expiry()

    def forget_credential(self, session_id: bytes) -> None:
        """Session ``session_id`` was revoked: drop it, bound or per-request."""
        if self._auth is not None and self._auth.session_id == session_id:
            self.unbind()
        elif self._request_auth is not None and self._request_auth.session_id == session_id:
            self._request_auth = None
            self._watch_expiry()
            if not self.authenticated:
                self._unauthenticated()

    # -- session expiry -------------------------------------------------------------------------
    def _watch_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        ends = [a.expires_at for a in (self._auth, self._request_auth)
                if a is not None and a.expires_at is not None]
        if ends and not self._gone:
            delay = min(max(0.0, min(ends) - time.time()), MAX_EXPIRY_TIMER_SECS)
            self._expiry = self._loop.call_later(delay, self._check_expiry)

    def _check_expiry(self) -> None:
        """A session ended on its own: a bound one is unbound with SESSION_REVOKED ("session
        expired"; no more pushes to its identity), a per-request one forgotten; with no
        credential left the connection must authenticate again within auth_timeout_secs."""
        self._expiry = None
        if self._gone:
            return
        now = time.time()
        auth = self._auth
        if auth is not None and auth.expires_at is not None and auth.expires_at <= now:
            revoked = common_pb2.SessionRevokedEvent(reason="session expired")
            self.push(PushEvent.SESSION_REVOKED, revoked.SerializeToString())
            self.unbind()
            return
        req = self._request_auth
        if req is not None and req.expires_at is not None and req.expires_at <= now:
            self._request_auth = None
            if not self.authenticated:
                self._unauthenticated()
        self._watch_expiry()

    def _stop_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
