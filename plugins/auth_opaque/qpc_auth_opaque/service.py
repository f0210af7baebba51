"""Server side of OPAQUE registration (100/101), login (102/103), sessions and Logout (107).

Protocol decisions (also in docs/protocol.md):

* ``credential_identifier`` is the normalised username; server identity defaults to the
  server's OPAQUE public key; context defaults to ``qpc-opaque-v1``.
* RegisterFinish carries an Ed25519 signature by ``identity_key`` over
  ``"qpc-v1 register\\0" || server OPAQUE public key || username || 0x00 || record``
  (possession of the identity key, for this server only: a registration captured by one
  server cannot be replayed to another).
* LoginFinish carries a signature over ``"qpc-v1 login\\0" || SHA-256(KE1 || KE2) ||
  identity_key``: the identity key must be the one registered for the username.
* Session tokens: ``qpcs1.`` + 64 hex characters (32 random bytes).  The server stores only
  SHA-256(token).  Lifetime ``session_lifetime_secs``; no refresh (log in again).
* Unknown usernames get KE2 built from a fake record derived from a server secret and the
  username (same size, same operations), so they fail only at LoginFinish.
* Brute-force throttle: every LoginStart counts as a failed attempt for the username and the
  client IP when it is admitted; only a successful LoginFinish takes it back.  (A KE2 alone
  lets its receiver test one password guess offline, so counting at LoginFinish let a client
  that never sent it guess without limit.)
"""

from __future__ import annotations

import asyncio
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
from qpc_core import audit
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


def register_message(server_public_key: bytes, username: str, record: bytes) -> bytes:
    return REGISTER_CONTEXT + server_public_key + username.encode() + b"\x00" + record


def login_message(ke1: bytes, ke2: bytes, identity_key: bytes) -> bytes:
    return LOGIN_CONTEXT + hashlib.sha256(ke1 + ke2).digest() + identity_key


def token_hash(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


#: Logins of one username that one connection may have in progress at once.
MAX_PENDING_PER_NAME = 4


@dataclass(slots=True)
class _Pending:
    state: opaque.ServerLoginState
    binder: tuple[bytes, bytes]  # (ke1, ke2) serialised
    username: str
    known: bool
    expires: float
    peer: PeerInfo


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
        # Logins in progress, per (connection, username), oldest first; a few per key so two
        # concurrent logins of one name on one connection do not overwrite each other.
        self.pending: OrderedDict[tuple[int, str], list[_Pending]] = OrderedDict()
        self.pending_count = 0
        self.pending_per_ip: dict[str, int] = {}
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

    def fake_record(self, username: str) -> opaque.RegistrationRecord:
        """Per-username fake record (stable across attempts).  Built for every login, known
        name or not, so both take the same operations."""
        seed = hmac.new(self._fake_secret, b"key:" + username.encode(), hashlib.sha512).digest()
        sk, _pk = opaque.derive_diffie_hellman_key_pair(seed[:32])
        mask = hmac.new(self._fake_secret, b"mask:" + username.encode(), hashlib.sha512).digest()
        return opaque.create_fake_record(sk, mask)

    # -- registration ------------------------------------------------------------------------------
    async def register_start(
        self, ctx: RpcContext, req: pb.OpaqueRegisterStartRequest
    ) -> pb.OpaqueRegisterStartResponse:
        if not self.cfg.registration_open:
            raise Forbidden("registration is closed on this server")
        name = normalize_username(req.username)
        user = await self.app.storage.get_user_by_name(name)
        if user is not None and await self.load_record(name) is not None:
            raise Conflict(f"username '{name}' is already registered")
        # (A name in the directory without an OPAQUE record: a registration interrupted
        # between its two writes, or a user of another auth plugin.  Only the holder of its
        # identity key can finish, see register_finish.)
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
        message = register_message(self.setup.server_public_key, name, req.upload)
        if not verify_signature(ident, req.signature, message):
            raise BadRequest(
                "signature by identity_key over the registration (for this server's OPAQUE "
                "key) does not verify"
            )
        # Two writes (directory entry, then record) that a lost connection must not split:
        # the request's task is cancelled when its stream or connection goes away.
        await asyncio.shield(self._register(name, ident, record))
        return pb.OpaqueRegisterFinishResponse(success=True)

    async def _register(
        self, name: str, ident: bytes, record: opaque.RegistrationRecord
    ) -> None:
        try:
            # The directory entry is the atomic claim on the name; the record follows it.
            await register_user(self.app, name, ident)
        except Conflict:
            # A registration of this same binding that stopped between the two writes (a
            # crash): the identity key's holder (the signature checked that) completes it.
            user = await self.app.storage.get_user_by_name(name)
            if user is None or user.identity_key != ident or await self.load_record(name):
                raise
            log.info("completing the interrupted registration of %s", self._who(name, ident))
        await self.app.storage.kv_put(KV, RECORD_PREFIX + name.encode(), record.serialize())
        log.info("registered user %s", self._who(name, ident))

    def _who(self, name: str, ident: bytes) -> str:
        """A user as log lines name it: in clear only with ``redact_logs = false``; else the
        audit log's token of the identity key (``identity=h:...`` in its lines), or nothing
        identifying when the audit log (which holds the redaction key) is off."""
        if not self.app.settings.redact_logs:
            return name
        audit_log = audit.get(self.app)
        return f"identity={audit_log.token(ident)}" if audit_log is not None else "(redacted)"

    # -- login ------------------------------------------------------------------------------------
    def _check_throttle(self, name: str | None, peer: PeerInfo, method_id: int) -> None:
        """Refuse before any OPAQUE work while the username (None: not checked) or the IP is
        locked out."""
        by_user = self.user_throttle.retry_after(name) if name is not None else 0.0
        by_ip = self.ip_throttle.retry_after(peer.host)
        wait = max(by_user, by_ip)
        if wait > 0:
            kind = "username" if by_user >= by_ip else "ip"
            self.app.hooks.on_login_failure(self.app, name or "", peer, "throttled")
            self.app.hooks.on_rate_limited(self.app, kind, "auth", method_id, wait)
            raise RateLimited(f"too many failed logins; retry in {wait:.0f}s", retry_after=wait)

    def _failed(self, name: str, peer: PeerInfo, reason: str) -> Unauthenticated:
        """An admitted attempt failed (it was counted when it started)."""
        self.app.hooks.on_login_failure(self.app, name, peer, reason)
        return Unauthenticated("login failed")

    def _drop(self, p: _Pending) -> None:
        self._release_slot(p.peer.host)

    def _release_slot(self, host: str) -> None:
        self.pending_count -= 1
        left = self.pending_per_ip.get(host, 1) - 1
        if left > 0:
            self.pending_per_ip[host] = left
        else:
            self.pending_per_ip.pop(host, None)

    def configure(self, cfg: OpaqueConfig) -> None:
        """A configuration reload.  A lower pending_login_ttl_secs also shortens the logins
        in progress (no pending login outlives the TTL in force, and they stay in expiry
        order, which _prune relies on)."""
        if cfg.pending_login_ttl_secs < self.cfg.pending_login_ttl_secs:
            latest = time.monotonic() + cfg.pending_login_ttl_secs
            for entries in self.pending.values():
                for p in entries:
                    p.expires = min(p.expires, latest)
        self.cfg = cfg

    def _prune(self) -> None:
        """Forget expired logins, and the oldest ones beyond ``max_pending_logins``.  Each was
        counted as a failure when it started and stays counted (never sent LoginFinish)."""
        now = time.monotonic()
        while self.pending:
            key, entries = next(iter(self.pending.items()))
            while entries and (
                entries[0].expires <= now or self.pending_count > self.cfg.max_pending_logins
            ):
                p = entries.pop(0)
                self._drop(p)
                self.app.hooks.on_login_failure(self.app, p.username, p.peer, "abandoned")
            if entries:
                break
            del self.pending[key]

    async def login_start(
        self, ctx: RpcContext, req: pb.OpaqueLoginStartRequest
    ) -> pb.OpaqueLoginStartResponse:
        name = normalize_username(req.username)
        peer = ctx.conn.peer
        self._check_throttle(name, peer, 102)
        self._prune()
        if self.pending_per_ip.get(peer.host, 0) >= self.cfg.max_pending_logins_per_ip:
            self.app.hooks.on_rate_limited(
                self.app, "ip", "auth", 102, self.cfg.pending_login_ttl_secs
            )
            raise RateLimited(
                "too many logins in progress from this address (max_pending_logins_per_ip="
                f"{self.cfg.max_pending_logins_per_ip})",
                retry_after=self.cfg.pending_login_ttl_secs,
            )
        try:
            ke1 = opaque.KE1.deserialize(req.request)
        except opaque.OpaqueError as e:
            raise BadRequest(f"invalid KE1: {e}") from None
        # The answer lets its receiver test one password guess offline: the attempt counts
        # as a failure (until a LoginFinish succeeds) and takes its pending slot *here*,
        # before the first await, so parallel LoginStarts cannot all pass the checks above
        # before any of them is counted.
        self.user_throttle.failure(name)
        self.ip_throttle.failure(peer.host)
        self.pending_count += 1
        self.pending_per_ip[peer.host] = self.pending_per_ip.get(peer.host, 0) + 1
        try:
            record = await self.load_record(name)
            fake = self.fake_record(name)  # same work for known and unknown names
            ke2, state = opaque.server_generate_ke2(
                self.setup,
                record if record is not None else fake,
                name.encode(),
                ke1,
                context=self.context,
                server_identity=self.server_identity,
            )
        except BaseException as e:
            # No KE2 went out: no guess was possible, nothing to count.
            self._release_slot(peer.host)
            self.user_throttle.forgive(name)
            self.ip_throttle.forgive(peer.host)
            if isinstance(e, opaque.OpaqueError):
                raise BadRequest(f"invalid KE1: {e}") from None
            raise
        ke2_bytes = ke2.serialize()
        key = (ctx.conn.connection_id, name)
        entries = self.pending.pop(key, [])
        if len(entries) >= MAX_PENDING_PER_NAME:
            old = entries.pop(0)
            self._drop(old)
            self.app.hooks.on_login_failure(self.app, name, old.peer, "abandoned")
        entries.append(
            _Pending(
                state,
                (req.request, ke2_bytes),
                name,
                record is not None,
                time.monotonic() + self.cfg.pending_login_ttl_secs,
                peer,
            )
        )
        self.pending[key] = entries  # re-inserted: the most recently used key is last
        self._prune()
        return pb.OpaqueLoginStartResponse(response=ke2_bytes)

    def _take_pending(
        self, key: tuple[int, str], ke3: opaque.KE3 | None,
        identity_key: bytes = b"", signature: bytes = b"",
    ) -> tuple[_Pending | None, bool]:
        """The pending login ``ke3`` finishes (and True), or the one the failed attempt
        consumes (and False): the attempt its identity signature names (a client giving up
        signs its own KE1/KE2, so a concurrent login of the same name on the connection is
        left alone), else the oldest one of ``key``; (None, False) when there is none."""
        entries = self.pending.get(key)
        now = time.monotonic()
        live = [p for p in entries or [] if p.expires > now]
        chosen: _Pending | None = None
        ok = False
        if ke3 is not None:
            for p in live:
                try:
                    opaque.server_finish(p.state, ke3)
                except opaque.OpaqueError:
                    continue
                chosen, ok = p, True
                break
        if chosen is None and live:
            chosen = live[0]
            if signature and len(live) > 1:
                for p in live:
                    if verify_signature(identity_key, signature,
                                        login_message(*p.binder, identity_key)):
                        chosen = p
                        break
        if chosen is not None and entries is not None:
            entries.remove(chosen)
            self._drop(chosen)
            if not entries:
                del self.pending[key]
        return chosen, ok

    async def login_finish(
        self, ctx: RpcContext, req: pb.OpaqueLoginFinishRequest
    ) -> pb.OpaqueLoginFinishResponse:
        name = normalize_username(req.username)
        peer = ctx.conn.peer
        try:
            ke3: opaque.KE3 | None = opaque.KE3.deserialize(req.finalization)
        except opaque.OpaqueError:
            ke3 = None
        pending, ok = self._take_pending((ctx.conn.connection_id, name), ke3,
                                         req.identity_key, req.signature)
        if pending is None:
            # Nothing to finish (expired, replayed or never started).  It reveals nothing
            # about the password, so it counts against the IP only: otherwise anyone could
            # lock a username out with requests that cost them nothing.
            self._check_throttle(None, peer, 103)
            self.ip_throttle.failure(peer.host)
            self.app.hooks.on_login_failure(
                self.app, name, peer, "no pending login (expired or replayed)"
            )
            raise Unauthenticated("login failed")
        # An admitted attempt is not throttled again: it was counted when it started.
        if not ok:
            raise self._failed(name, peer, "bad password or unknown user")
        if not pending.known:  # unreachable in practice: a fake record cannot verify
            raise self._failed(name, peer, "unknown user")
        user = await self.app.storage.get_user_by_name(name)
        if user is None or req.identity_key != user.identity_key:
            raise self._failed(name, peer, "identity key does not match the registration")
        ke1_b, ke2_b = pending.binder
        if not verify_signature(
            user.identity_key, req.signature, login_message(ke1_b, ke2_b, user.identity_key)
        ):
            raise self._failed(name, peer, "identity signature does not verify")
        token = TOKEN_PREFIX + os.urandom(32).hex().encode()
        now = time.time()
        expires = now + self.cfg.session_lifetime_secs
        th = token_hash(token)
        await self.app.storage.put_session(SessionRecord(th, user.identity_key, name, now, expires))
        self.user_throttle.success(name)
        self.ip_throttle.forgive(peer.host)  # this attempt's own count, no more
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
            # Bound to the session, or holding it from a request's Auth field (the caller's
            # Logout may have come that way): the connection no longer has it.
            forget = getattr(conn, "forget_credential", None)  # transports before 0.1
            if forget is not None:
                forget(auth.session_id)
            elif cauth is not None and cauth.session_id == auth.session_id:
                conn.unbind()
        return common_pb2.LogoutResponse()

    async def forget(self, username: str | None) -> None:
        if username:
            await self.app.storage.kv_delete(KV, RECORD_PREFIX + username.encode())


async def load_or_create_setup(app: App) -> opaque.ServerSetup:
    """The OPAQUE server setup: created once, then read back (never logged)."""
    fresh = opaque.ServerSetup.generate().serialize()
    raw = await app.storage.kv_put_if_absent(KV, SETUP_KEY, fresh)
    return opaque.ServerSetup.deserialize(raw)
