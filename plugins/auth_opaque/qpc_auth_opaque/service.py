"""Server side of OPAQUE registration (100/101), login (102/103), sessions and Logout (107).

Protocol decisions (also in docs/protocol.md):

* ``credential_identifier`` is the normalised username; server identity defaults to the
  server's OPAQUE public key; context defaults to ``qpc-opaque-v1``.
* RegisterFinish carries an Ed25519 signature by ``identity_key`` over
  ``"qpc-v1 register\\0" || username || 0x00 || record`` (possession of the identity key).
* LoginFinish carries a signature over ``"qpc-v1 login\\0" || SHA-256(KE1 || KE2) ||
  identity_key``: the identity key must be the one registered for the username.
* Session tokens: ``qpcs1.`` + 64 hex characters (32 random bytes).  The server stores only
  SHA-256(token).  Lifetime ``session_lifetime_secs``; no refresh (log in again).
* Unknown usernames get KE2 built from a fake record derived from a server secret and the
  username (same size, same operations), so they fail only at LoginFinish.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

from qpc_auth_opaque import opaque
from qpc_auth_opaque.config import OpaqueConfig
from qpc_auth_opaque.throttle import Throttle
from qpc_core.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    RateLimited,
    Unauthenticated,
)
from qpc_core.framing import PushEvent
from qpc_core.identity import check_identity_key, verify_signature
from qpc_core.pb import auth_pb2 as pb
from qpc_core.pb import common_pb2
from qpc_core.rpc import AuthResult, PeerInfo, RpcContext
from qpc_core.storage.base import SessionRecord
from qpc_core.users import normalize_username, register_user

if TYPE_CHECKING:
    from qpc_core.app import App

log = logging.getLogger("qpc.auth_opaque")

KV = "auth_opaque"
SETUP_KEY = b"server_setup"
RECORD_PREFIX = b"record:"
TOKEN_PREFIX = b"qpcs1."
SESSION_KIND = "session"
REGISTER_CONTEXT = b"qpc-v1 register\x00"
LOGIN_CONTEXT = b"qpc-v1 login\x00"


def register_message(username: str, record: bytes) -> bytes:
    return REGISTER_CONTEXT + username.encode() + b"\x00" + record


def login_message(ke1: bytes, ke2: bytes, identity_key: bytes) -> bytes:
    return LOGIN_CONTEXT + hashlib.sha256(ke1 + ke2).digest() + identity_key


def token_hash(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


@dataclass(slots=True)
class _Pending:
    state: opaque.ServerLoginState
    binder: tuple[bytes, bytes]  # (ke1, ke2) serialised
    username: str
    known: bool
    expires: float


class OpaqueService:
    def __init__(self, app: App, cfg: OpaqueConfig, setup: opaque.ServerSetup) -> None:
        self.app = app
        self.cfg = cfg
        self.setup = setup
        self.context = cfg.context.encode()
        self.server_identity = cfg.server_identity.encode() or None
        # A secret for fake records, derived from (never equal to) the OPRF seed.
        self._fake_secret = hmac.new(
            setup.oprf_seed, b"qpc fake-record secret", hashlib.sha512
        ).digest()
        self.pending: OrderedDict[tuple[int, str], _Pending] = OrderedDict()
        self.user_throttle = Throttle(
            free=cfg.user_free_failures,
            window=cfg.failure_window_secs,
            base=cfg.backoff_base_secs,
            cap=cfg.backoff_max_secs,
        )
        self.ip_throttle = Throttle(
            free=cfg.ip_free_failures,
            window=cfg.failure_window_secs,
            base=cfg.backoff_base_secs,
            cap=cfg.backoff_max_secs,
        )

    # -- records ------------------------------------------------------------------------------
    async def load_record(self, username: str) -> opaque.RegistrationRecord | None:
        raw = await self.app.storage.kv_get(KV, RECORD_PREFIX + username.encode())
        return opaque.RegistrationRecord.deserialize(raw) if raw else None

    def fake_inputs(self, username: str) -> tuple[bytes, bytes]:
        """Per-username fake client key and masking key (stable across attempts)."""
        seed = hmac.new(self._fake_secret, b"key:" + username.encode(), hashlib.sha512).digest()
        sk, _pk = opaque.derive_diffie_hellman_key_pair(seed[:32])
        mask = hmac.new(self._fake_secret, b"mask:" + username.encode(), hashlib.sha512).digest()
        return sk, mask

    # -- registration ------------------------------------------------------------------------------
    async def register_start(
        self, ctx: RpcContext, req: pb.OpaqueRegisterStartRequest
    ) -> pb.OpaqueRegisterStartResponse:
        if not self.cfg.registration_open:
            raise Forbidden("registration is closed on this server")
        name = normalize_username(req.username)
        if await self.app.storage.get_user_by_name(name) is not None:
            raise Conflict(f"username '{name}' is already registered")
        try:
            request = opaque.RegistrationRequest.deserialize(req.request)
            resp = opaque.server_create_registration_response(self.setup, request, name.encode())
        except opaque.OpaqueError as e:
            raise BadRequest(f"invalid registration request: {e}") from None
        return pb.OpaqueRegisterStartResponse(response=resp.serialize())

    async def register_finish(
        self, ctx: RpcContext, req: pb.OpaqueRegisterFinishRequest
    ) -> pb.OpaqueRegisterFinishResponse:
        if not self.cfg.registration_open:
            raise Forbidden("registration is closed on this server")
        name = normalize_username(req.username)
        ident = check_identity_key(req.identity_key)
        try:
            record = opaque.RegistrationRecord.deserialize(req.upload)
        except opaque.OpaqueError as e:
            raise BadRequest(f"invalid registration record: {e}") from None
        if not verify_signature(ident, req.signature, register_message(name, req.upload)):
            raise BadRequest("signature by identity_key over the registration does not verify")
        # The directory entry is the atomic claim on the name; the record follows it.
        await register_user(self.app, name, ident)
        await self.app.storage.kv_put(KV, RECORD_PREFIX + name.encode(), record.serialize())
        log.info("registered user %s", name)
        return pb.OpaqueRegisterFinishResponse(success=True)

    # -- login ------------------------------------------------------------------------------------
    def _check_throttle(self, name: str, peer: PeerInfo, method_id: int) -> None:
        by_user = self.user_throttle.retry_after(name)
        by_ip = self.ip_throttle.retry_after(peer.host)
        wait = max(by_user, by_ip)
        if wait > 0:
            kind = "username" if by_user >= by_ip else "ip"
            self.app.hooks.on_login_failure(self.app, name, peer, "throttled")
            self.app.hooks.on_rate_limited(self.app, kind, "auth", method_id, wait)
            raise RateLimited(f"too many failed logins; retry in {wait:.0f}s", retry_after=wait)

    def _fail(self, name: str, peer: PeerInfo, reason: str) -> Unauthenticated:
        self.user_throttle.failure(name)
        self.ip_throttle.failure(peer.host)
        self.app.hooks.on_login_failure(self.app, name, peer, reason)
        return Unauthenticated("login failed")

    def _prune(self) -> None:
        now = time.monotonic()
        while self.pending:
            key, p = next(iter(self.pending.items()))
            if p.expires > now and len(self.pending) <= self.cfg.max_pending_logins:
                break
            del self.pending[key]

    async def login_start(
        self, ctx: RpcContext, req: pb.OpaqueLoginStartRequest
    ) -> pb.OpaqueLoginStartResponse:
        name = normalize_username(req.username)
        peer = ctx.conn.peer
        self._check_throttle(name, peer, 102)
        try:
            ke1 = opaque.KE1.deserialize(req.request)
        except opaque.OpaqueError as e:
            raise BadRequest(f"invalid KE1: {e}") from None
        record = await self.load_record(name)
        # Same work for known and unknown names: the fake inputs are always derived.
        fake_sk, fake_mask = self.fake_inputs(name)
        try:
            ke2, state = opaque.server_generate_ke2(
                self.setup,
                record,
                name.encode(),
                ke1,
                context=self.context,
                server_identity=self.server_identity,
                fake_client_private_key=fake_sk,
                fake_masking_key=fake_mask,
            )
        except opaque.OpaqueError as e:
            raise BadRequest(f"invalid KE1: {e}") from None
        ke2_bytes = ke2.serialize()
        key = (ctx.conn.connection_id, name)
        self.pending.pop(key, None)
        self.pending[key] = _Pending(
            state,
            (req.request, ke2_bytes),
            name,
            record is not None,
            time.monotonic() + self.cfg.pending_login_ttl_secs,
        )
        self._prune()
        return pb.OpaqueLoginStartResponse(response=ke2_bytes)

    async def login_finish(
        self, ctx: RpcContext, req: pb.OpaqueLoginFinishRequest
    ) -> pb.OpaqueLoginFinishResponse:
        name = normalize_username(req.username)
        peer = ctx.conn.peer
        self._check_throttle(name, peer, 103)
        pending = self.pending.pop((ctx.conn.connection_id, name), None)
        if pending is None or pending.expires < time.monotonic():
            raise self._fail(name, peer, "no pending login (expired or replayed)")
        try:
            ke3 = opaque.KE3.deserialize(req.finalization)
            opaque.server_finish(pending.state, ke3)
        except opaque.OpaqueError:
            raise self._fail(name, peer, "bad password or unknown user") from None
        if not pending.known:  # unreachable in practice: a fake record cannot verify
            raise self._fail(name, peer, "unknown user")
        user = await self.app.storage.get_user_by_name(name)
        if user is None or req.identity_key != user.identity_key:
            raise self._fail(name, peer, "identity key does not match the registration")
        ke1_b, ke2_b = pending.binder
        if not verify_signature(
            user.identity_key, req.signature, login_message(ke1_b, ke2_b, user.identity_key)
        ):
            raise self._fail(name, peer, "identity signature does not verify")
        token = TOKEN_PREFIX + os.urandom(32).hex().encode()
        now = time.time()
        expires = now + self.cfg.session_lifetime_secs
        th = token_hash(token)
        await self.app.storage.put_session(SessionRecord(th, user.identity_key, name, now, expires))
        self.user_throttle.success(name)
        ctx.conn.bind(
            AuthResult(
                kind=SESSION_KIND,
                identity_key=user.identity_key,
                username=name,
                session_id=th,
                expires_at=expires,
            )
        )
        self.app.hooks.on_login_success(self.app, name, user.identity_key, peer)
        return pb.OpaqueLoginFinishResponse(session_token=token, expires_at=int(expires))

    # -- sessions ----------------------------------------------------------------------------------
    async def authenticate(self, token: bytes) -> AuthResult | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        rec = await self.app.storage.get_session(token_hash(token))
        if rec is None:
            raise Unauthenticated("unknown or revoked session token")
        if rec.expires_at <= time.time():
            raise Unauthenticated("session expired: log in again")
        return AuthResult(
            kind=SESSION_KIND,
            identity_key=rec.identity_key,
            username=rec.username,
            session_id=rec.token_hash,
            expires_at=rec.expires_at,
        )

    async def logout(
        self, ctx: RpcContext, req: common_pb2.LogoutRequest
    ) -> common_pb2.LogoutResponse:
        auth = ctx.auth
        if auth is None or auth.kind != SESSION_KIND or auth.session_id is None:
            raise BadRequest("this connection is not using a session")
        await self.app.storage.delete_session(auth.session_id)
        revoked = common_pb2.SessionRevokedEvent(reason="logged out").SerializeToString()
        for conn in list(self.app.connections):
            cauth = conn.auth
            if cauth is not None and cauth.session_id == auth.session_id and conn is not ctx.conn:
                conn.push(PushEvent.SESSION_REVOKED, revoked)
                conn.unbind()
        if ctx.conn.auth is not None and ctx.conn.auth.session_id == auth.session_id:
            ctx.conn.unbind()
        return common_pb2.LogoutResponse()

    async def forget(self, username: str | None) -> None:
        if username:
            await self.app.storage.kv_delete(KV, RECORD_PREFIX + username.encode())


async def load_or_create_setup(app: App) -> opaque.ServerSetup:
    """The OPAQUE server setup: created once, then read back (never logged)."""
    fresh = opaque.ServerSetup.generate().serialize()
    raw = await app.storage.kv_put_if_absent(KV, SETUP_KEY, fresh)
    return opaque.ServerSetup.deserialize(raw)
