"""RPC dispatch: one request frame in, one response frame out.

Order of checks for each call: known method → not draining → credentials (connection or
the request's ``Auth`` field) → the method's auth level → rate limits (per identity and per
client IP) → payload decode → handler.  Any failure answers only this call.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from qpc_core import audit
from qpc_core.errors import (
    BadRequest,
    RateLimited,
    RpcError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from qpc_core.framing import FrameError, RequestFrame, Status, encode_response
from qpc_core.pb import common_pb2
from qpc_core.rpc import AuthResult, Connection, RpcContext, RpcMethod

if TYPE_CHECKING:
    from qpc_core.app import App

log = logging.getLogger("qpc.rpc")

_AUTH_TAG = b"\x7a"  # field 15, wire type 2: cheap pre-check before decoding AuthEnvelope


#: Longest error message sent: errors may quote client input, and an answer must fit a frame.
MAX_ERROR_MESSAGE = 1024


def error_payload(status: int, message: str, retry_after: float | None = None) -> bytes:
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[: MAX_ERROR_MESSAGE - 3] + "..."
    err = common_pb2.Error(code=int(status), name=Status(status).name, message=message)
    if retry_after:
        err.retry_after_ms = max(1, int(retry_after * 1000))
    return err.SerializeToString()


def error_response(
    request_id: int, status: int, message: str, retry_after: float | None = None
) -> bytes:
    return encode_response(status, request_id, error_payload(status, message, retry_after))


class Dispatcher:
    """Runs calls against a method table: ``app.methods`` unless another is given (a
    listener of a plugin serving its own methods, e.g. federation)."""

    def __init__(
        self, app: App, methods: Mapping[int, tuple[str, RpcMethod]] | None = None,
        *, request_auth: bool = True,
    ) -> None:
        self.app = app
        self.methods = app.methods if methods is None else methods
        # Whether a request's own Auth field (field 15) is read: not on listeners whose
        # connections authenticate otherwise (mutual TLS), where a bearer token must not
        # stand in for the certificate.
        self.request_auth = request_auth
        self.max_payload = app.settings.max_payload_bytes
        self.audit = audit.get(app)  # None unless audit_log is on

    async def call(self, conn: Connection, frame: RequestFrame) -> bytes:
        """Run one RPC and return the encoded response frame (never raises)."""
        app = self.app
        t0 = time.perf_counter()
        entry = self.methods.get(frame.method_id)
        name = entry[1].name if entry is not None else "unknown"
        status: int = Status.OK
        app.rpc_started()
        try:
            if entry is None:
                raise Unimplemented(f"unknown method {frame.method_id}")
            method = entry[1]
            payload = await self._run(conn, method, frame)
            try:
                out = encode_response(
                    Status.OK, frame.request_id, payload, max_payload=self.max_payload
                )
            except FrameError:
                try:
                    # Over the configured limit but within the protocol's: e.g. a Fetch of a
                    # message stored while max_payload_bytes was larger (Fetch has already
                    # removed it, so refusing would lose it).  Clients accept up to the
                    # protocol maximum.
                    out = encode_response(Status.OK, frame.request_id, payload)
                    log.warning(
                        "method %s answered %d bytes, above max_payload_bytes=%d (stored "
                        "under a larger limit?)", method.name, len(payload), self.max_payload,
                    )
                except FrameError:
                    log.error("method %s produced an oversize response (%d bytes)",
                              method.name, len(payload))
                    status = Status.INTERNAL
                    out = error_response(frame.request_id, status, "internal error")
        except RpcError as e:
            status = e.status
            out = error_response(frame.request_id, status, e.message, e.retry_after)
        except Exception:
            log.exception("method %s (%d) failed", name, frame.method_id)
            status = Status.INTERNAL
            out = error_response(frame.request_id, status, "internal error")
        finally:
            app.rpc_finished()
        seconds = time.perf_counter() - t0
        app.hooks.on_rpc_completed(app, frame.method_id, name, status, seconds)
        if self.audit is not None:
            self.audit.rpc(conn, frame.method_id, name, status, seconds)
        return out

    async def _run(self, conn: Connection, method: RpcMethod, frame: RequestFrame) -> bytes:
        app = self.app
        if app.draining and method.group != "health":
            raise Unavailable("server shutting down", retry_after=1.0)
        auth = conn.auth
        payload = frame.payload
        if self.request_auth and _AUTH_TAG in payload:
            accepted = await self._request_auth(conn, payload)
            if accepted is not None:
                # The connection counts as authenticated from now (the transport limits, the
                # auth deadline) while this credential is valid: also while this call runs.
                note = getattr(conn, "note_request_credential", None)  # older transports
                if note is not None:
                    note(accepted)
                auth = accepted
        if auth is not None and auth.expires_at is not None and auth.expires_at <= time.time():
            if method.auth != "none":
                raise Unauthenticated("session expired: log in again")
            auth = None  # open methods run, but as unauthenticated (WhoAmI says so)
        if method.auth != "none" and auth is None:
            raise Unauthenticated(
                f"{method.name} requires authentication: send the connection auth "
                "handshake or an Auth field with a valid token"
            )
        if method.rate_limited:
            self._rate_limit(conn, method, auth)
        try:
            request = method.request_type.FromString(payload)
        except DecodeError as e:
            raise BadRequest(f"malformed {method.request_type.__name__}: {e}") from None
        ctx = RpcContext(app, conn, method, frame.request_id, auth,
                         charged=1 if method.rate_limited else 0)
        if method.auth == "identity":
            ctx.require_identity()
        response = await method.handler(ctx, request)
        return response.SerializeToString()

    async def _request_auth(self, conn: Connection, payload: bytes) -> AuthResult | None:
        try:
            env = common_pb2.AuthEnvelope.FromString(payload)
        except DecodeError:
            return None  # the method's own decode reports the error
        if not env.HasField("auth") or not env.auth.access_token:
            return None
        result = await self.authenticate_token(conn, env.auth.access_token, 0)
        if result is None:
            raise Unauthenticated("invalid access token")
        if (
            conn.identity_key is not None
            and result.identity_key is not None
            and result.identity_key != conn.identity_key
        ):
            raise Unauthenticated("access token belongs to another identity than the connection")
        return result

    async def handshake(self, conn: Connection, token: bytes) -> int:
        """The connection auth handshake (QUIC's first stream, the bridge's AUTH message):
        the token is resolved, bound to ``conn`` when accepted, and the status to answer is
        returned (OK, UNAUTHENTICATED, or RATE_LIMITED while the address guesses tokens)."""
        try:
            result = await self.authenticate_token(conn, token, 0)
        except RateLimited:
            return Status.RATE_LIMITED
        except Exception as e:  # Unauthenticated from a plugin, or a plugin bug
            if not isinstance(e, RpcError):
                log.exception("authenticate hook failed")
            return Status.UNAUTHENTICATED
        if result is None:
            return Status.UNAUTHENTICATED
        conn.bind(result)
        return Status.OK

    async def authenticate_token(
        self, conn: Connection, token: bytes, method_id: int
    ) -> AuthResult | None:
        """Resolve a bearer token (connection handshake or a request's ``Auth`` field).

        Refused tokens count against the client IP in the ``auth`` rate group (``method_id``:
        0 for the handshake); while that IP is over the limit, tokens are refused with
        ``RATE_LIMITED`` before any resolver runs, so tokens cannot be guessed online at
        full speed.  Accepted tokens count nothing (a session token may ride on every
        request)."""
        limiter = self.app.rate_limiter
        # A bucket of its own inside the 'auth' group's per-IP limit: logins and other auth
        # calls from a busy address must not make its valid tokens refused.
        key: list[tuple[str, object]] = [("ip", ("refused-token", conn.peer.host))]
        res = limiter.peek("auth", key)  # would one more refusal still be allowed?
        if not res.allowed:
            self.app.hooks.on_rate_limited(
                self.app, res.kind, "auth", method_id, res.retry_after_secs
            )
            raise RateLimited(
                f"too many refused tokens from this address; retry in "
                f"{res.retry_after_secs:.1f}s",
                retry_after=res.retry_after_secs,
            )
        try:
            result = await self.app.hooks.authenticate(self.app, token, conn.peer)
        except Unauthenticated:
            limiter.check_all("auth", key)
            raise
        if result is None:
            limiter.check_all("auth", key)
        return result

    def _rate_limit(self, conn: Connection, method: RpcMethod, auth: AuthResult | None) -> None:
        limiter = self.app.rate_limiter
        ident = (auth.identity_key if auth is not None else None) or conn.identity_key
        checks: list[tuple[str, object]] = [("ip", conn.peer.host)]
        if ident is not None:
            checks.insert(0, ("identity", ident))
        # Charged to every key only when all allow the call: a call the IP limit refuses
        # does not use up the identity's budget (and the other way round).
        res = limiter.check_all(method.group, checks)
        if not res.allowed:
            self.app.hooks.on_rate_limited(
                self.app, res.kind, method.group, method.method_id, res.retry_after_secs
            )
            raise RateLimited(
                f"rate limit for '{method.group}' calls exceeded; retry in "
                f"{res.retry_after_secs:.1f}s",
                retry_after=res.retry_after_secs,
            )
