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


def _key(auth: AuthResult) -> object:
    """What identifies a per-request credential: its session, else its kind (a token)."""
    return auth.session_id if auth.session_id is not None else ("kind", auth.kind)


class ConnectionCredentials:
    app: App
    _loop: asyncio.AbstractEventLoop
    _gone: bool

    def _init_credentials(self) -> None:
        self._auth: AuthResult | None = None
        self._identity: bytes | None = None
        # Requests' own Auth fields the dispatcher accepted (one per session): the connection
        # counts as authenticated while any of them is valid.
        self._request_auths: dict[object, AuthResult] = {}
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
        return self._auth is not None or self._identity is not None or bool(self._request_auths)

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
        """Forget every credential and the identity (the caller's Logout or DeleteAccount)."""
        self._auth = None
        self._request_auths.clear()
        self._drop_identity()
        self._watch_expiry()
        self._unauthenticated()

    def note_request_credential(self, auth: AuthResult) -> None:
        """The dispatcher accepted a request's own ``Auth`` field (before running the call)."""
        if not self._accepting_credentials():
            return
        self._request_auths[_key(auth)] = auth
        self._authenticated()
        self._watch_expiry()

    def forget_credential(
        self, session_id: bytes | None = None, *, identity_key: bytes | None = None
    ) -> None:
        """A session was revoked (``session_id``: Logout) or an identity's account deleted
        (``identity_key``): drop the credentials it made, bound or per-request; others stay
        (the connection stays authenticated while one is left)."""

        def revoked(a: AuthResult) -> bool:
            return ((session_id is not None and a.session_id == session_id)
                    or (identity_key is not None and a.identity_key == identity_key))

        changed = False
        if self._auth is not None and revoked(self._auth):
            self._auth = None
            self._drop_identity()
            changed = True
        elif identity_key is not None and self._identity == identity_key:
            self._drop_identity()  # proven with a credential that names no identity
            changed = True
        for k, a in list(self._request_auths.items()):
            if revoked(a):
                del self._request_auths[k]
                changed = True
        if changed:
            self._watch_expiry()
            if not self.authenticated:
                self._unauthenticated()

    def _drop_identity(self) -> None:
        if self._identity is not None:
            self.app.unbind_identity(self, self._identity)  # type: ignore[arg-type]
            self._identity = None

    # -- session expiry -------------------------------------------------------------------------
    def _watch_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        ends = [a.expires_at for a in (self._auth, *self._request_auths.values())
                if a is not None and a.expires_at is not None]
        if ends and not self._gone:
            delay = min(max(0.0, min(ends) - time.time()), MAX_EXPIRY_TIMER_SECS)
            self._expiry = self._loop.call_later(delay, self._check_expiry)

    def _check_expiry(self) -> None:
        """A session ended on its own: a bound one is dropped with SESSION_REVOKED ("session
        expired"; no more pushes to its identity), per-request ones forgotten; with no
        credential left the connection must authenticate again within auth_timeout_secs."""
        self._expiry = None
        if self._gone:
            return
        now = time.time()
        changed = False
        auth = self._auth
        if auth is not None and auth.expires_at is not None and auth.expires_at <= now:
            revoked = common_pb2.SessionRevokedEvent(reason="session expired")
            self.push(PushEvent.SESSION_REVOKED, revoked.SerializeToString())
            self._auth = None
            self._drop_identity()
            changed = True
        for k, a in list(self._request_auths.items()):
            if a.expires_at is not None and a.expires_at <= now:
                del self._request_auths[k]
                changed = True
        if changed and not self.authenticated:
            self._unauthenticated()
        self._watch_expiry()

    def _stop_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
