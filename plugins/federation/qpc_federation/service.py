"""Federation: relay messages to, and proxy key lookups from, the server that hosts a user.

Home server side: a second QUIC listener (``federation.listen``, ALPN ``qpc-fed``, mutual TLS)
serves methods 900-906 to configured peers only.  A peer is the holder of a certificate that
chains to ``federation_ca``; each request's ``origin_domain`` must be one of that
certificate's DNS names *and* a configured peer's domain.  A peer vouches for the senders it
names, but never for an identity the called server hosts itself.

Origin server side: a recipient is **hosted here** when this server's directory knows its
identity key (a registered user).  For any other key the home is a known route (key -> peer,
learnt from a peer's FederationLookup answer), or else every peer is asked at once with
FederationLookup (906, keys only, no payloads).  Keys no peer claims are stored here (a key
nobody has registered, or a bearer-token identity) and that answer is remembered for
``route_cache_secs``.  When a peer that had to be asked cannot be, or the home cannot be
reached, the call fails with ``UNAVAILABLE`` and nothing is stored here: an acknowledged
message is never stranded on a server its recipient does not use.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from aioquic.quic.configuration import QuicConfiguration
from cryptography.hazmat.primitives import hashes
from google.protobuf.message import Message

from qpc_core.builtin import delivery as delivery_mod
from qpc_core.client.sdk import ConnectionLost, QpcClient
from qpc_core.config import FederationConfig, parse_hostport
from qpc_core.dispatch import MAX_ERROR_MESSAGE
from qpc_core.errors import (
    BadRequest,
    ConfigError,
    Forbidden,
    Internal,
    NotFound,
    ProtocolViolation,
    RpcError,
    TooLarge,
    Unavailable,
    Unimplemented,
    error_for_status,
)
from qpc_core.framing import FrameError, Status
from qpc_core.identity import check_identity_key
from qpc_core.pb import delivery_pb2, directory_pb2, federation_pb2, keys_pb2
from qpc_core.rpc import AuthResult, Connection, RpcContext, RpcMethod
from qpc_core.storage.base import EnqueueOutcome, NewMessage
from qpc_core.transport.backend import peer_certificates
from qpc_core.transport.certs import TlsMaterial, load_certificate
from qpc_core.transport.quic import ERR_PEER_CERTIFICATE, QuicTransport
from qpc_core.users import normalize_username, resolve_identity, resolve_username
from qpc_federation import certs
from qpc_federation.certs import FederationTls, Revoked

if TYPE_CHECKING:
    from cryptography import x509

    from qpc_core.app import App

log = logging.getLogger("qpc.federation")
#: Store namespace: the highest revocation-list number used, per federation CA.
CRL_NAMESPACE = "federation-crl"
T = TypeVar("T")

ALPN = "qpc-fed"
RELAY_ENQUEUE = 900
RELAY_BATCH_ENQUEUE = 901
PROXY_FETCH_KEY_PACKAGE = 902
PROXY_FETCH_HYBRID_KEY = 903
PROXY_RESOLVE_USER = 904
FEDERATION_HEALTH = 905
FEDERATION_LOOKUP = 906
FEDERATION_ANNOUNCE = 907
RELAY_ENQUEUE_MANY = 908
#: Keys per FederationAnnounce (registrations come one at a time; a backlog is chunked).
MAX_ANNOUNCE = 64
#: Items per RelayEnqueueMany, and the request size a batch stays under (the frame is 4 MiB).
MAX_MANY = 256
MANY_BUDGET = 3 * 1024 * 1024
#: Rate-limit group of the federation methods (per peer address; ``rate_limits.federation``).
RATE_GROUP = "federation"
#: Routes (identity key -> peer domain) and "hosted by no peer" answers kept at most.
MAX_ROUTES = 100_000
#: Identity keys per FederationLookup call.
MAX_LOOKUP = 1000
#: After a failed connect to a peer, calls to it fail at once for this long (doubling up to
#: the maximum while it keeps failing): no handshake storm against a peer that is down or
#: refuses this server.
BACKOFF_FIRST_SECS = 1.0
BACKOFF_MAX_SECS = 30.0
#: How long this server's directory answer for an identity key ("hosted here" or not) is
#: reused.  Registrations and account deletions on this server update it at once; the time
#: bound covers other servers sharing this server's database (PostgreSQL).
LOCAL_CACHE_SECS = 10.0
#: Connections the federation listener holds at most, per configured peer (reconnects
#: overlap for a moment), and never fewer than the minimum.
CONNECTIONS_PER_PEER = 8
MIN_CONNECTIONS = 16


async def _reap(attempt: asyncio.Future[QpcClient]) -> None:
    """Wait for a connect attempt that was given up on, and close what it opened."""
    try:
        c = await asyncio.shield(attempt)
    except asyncio.CancelledError:
        if not attempt.done():
            raise
        return  # the attempt itself was cancelled (as it should be): nothing to close
    except Exception:  # refused, timed out: nothing to close
        return
    await c.close()


def _ttl(expires_at: float | None, now: float) -> int:
    return 0 if expires_at is None else max(1, math.ceil(expires_at - now))


async def _all(aws: Iterable[Awaitable[T]]) -> list[T]:
    """Run every awaitable to its end (none is left running unobserved); then raise the
    first failure, if any."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


@dataclass
class Stats:
    relayed: dict[str, int] = field(default_factory=dict)
    received: dict[str, int] = field(default_factory=dict)
    errors: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, table: dict[Any, int], key: Any, n: int = 1) -> None:
        table[key] = table.get(key, 0) + n


class Federation:
    """Per-App federation state: peers, their connections, and learnt routes."""

    def __init__(self, app: App, cfg: FederationConfig, tls: FederationTls) -> None:
        self.app = app
        self.cfg = cfg
        self.tls = tls
        self.listener: QuicTransport | None = None  # the federation port (register_transports)
        self._tls_loaded = False
        # Prepared by a reload in its worker thread, put in place by reloaded() on the loop.
        self._next_tls: FederationTls | None = None
        self._next_crl: certs.RevocationList | None = None
        self.domain = cfg.domain
        self.peers = {p.domain: p.address for p in cfg.peers}  # config order
        self._rank = {d: i for i, d in enumerate(self.peers)}
        self._peers_gen = 0  # bumped by every reload that adds a peer (see _lookup)
        self._clients: dict[str, QpcClient] = {}
        self._connecting: dict[str, asyncio.Lock] = {d: asyncio.Lock() for d in self.peers}
        self._backoff: dict[str, tuple[float, float]] = {}  # domain -> (until, last delay)
        self.routes: OrderedDict[bytes, str] = OrderedDict()
        self.nowhere: OrderedDict[bytes, float] = OrderedDict()  # key -> until (monotonic)
        self.stats = Stats()
        self.closed = False
        self._local: OrderedDict[bytes, tuple[bool, float]] = OrderedDict()
        self._local_gen = 0  # bumped by every registration / deletion seen here
        self._fresh: set[str] = set()  # peers whose current connection has not answered yet
        # Registration changes not yet told to each peer: key -> (hosted, change number).
        self._changes: dict[str, dict[bytes, tuple[bool, int]]] = {}
        self._change_seq = 0
        self._announcers: set[str] = set()
        self._announce_wake: dict[str, asyncio.Event] = {}
        self._no_announce: set[str] = set()  # peers that refuse FederationAnnounce
        self._reapers: set[asyncio.Future[Any]] = set()
        self._no_many: set[str] = set()  # peers without RelayEnqueueMany (908)
        # Relays waiting for the end of this loop turn, per peer (see _relay_one).
        self._outbox: dict[str, list[tuple[bytes, NewMessage, asyncio.Future[Any]]]] = {}

    @property
    def max_connections(self) -> int:
        return max(MIN_CONNECTIONS, CONNECTIONS_PER_PEER * len(self.peers))

    # -- home server side -----------------------------------------------------------------------
    def check_peer(self, conn: Connection, chain: list[x509.Certificate]) -> AuthResult | None:
        """The federation listener's certificate check (see QuicTransport)."""
        names = self.tls.verify_peer(chain)
        allowed = frozenset(n for n in names if n in self.peers)
        if not allowed:
            raise ValueError(
                f"certificate for {', '.join(sorted(names)) or 'no DNS name'} is not a "
                "configured peer (federation.peers)"
            )
        return AuthResult(kind="federation", extra={"domains": allowed})

    def origin(self, ctx: RpcContext, origin_domain: str) -> str:
        domains: frozenset[str] = (
            ctx.auth.extra.get("domains", frozenset()) if ctx.auth else frozenset()
        )
        d = origin_domain.strip().lower().rstrip(".")
        if d not in domains or d not in self.peers:  # (a reload may have removed it)
            raise Forbidden("origin_domain is not a configured peer named by your certificate")
        return d

    async def hosted_here(self, key: bytes) -> bool:
        """Does this server's directory know ``key``?  (Cached: every relayed message asks
        it for its recipient and sender, and every origin for each recipient.)"""
        now = time.monotonic()
        hit = self._local.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        gen = self._local_gen
        found = await resolve_identity(self.app, key) is not None
        if gen == self._local_gen:  # no registration / deletion raced with the read
            self._remember_local(key, found)
        return found

    def _remember_local(self, key: bytes, hosted: bool) -> None:
        self._local[key] = (hosted, time.monotonic() + LOCAL_CACHE_SECS)
        self._local.move_to_end(key)
        while len(self._local) > MAX_ROUTES:
            self._local.popitem(last=False)

    def local_changed(self, key: bytes, hosted: bool) -> None:
        """A user registered here (``hosted``) or deleted their account here."""
        self._local_gen += 1
        self._remember_local(key, hosted)
        if hosted:
            self.routes.pop(key, None)
            self.nowhere.pop(key, None)
        if self.peers and not self.closed:
            self.announce_local(key, hosted)

    async def _hosted(self, key: bytes) -> None:
        if not await self.hosted_here(key):
            raise NotFound(f"recipient is not hosted on {self.domain}")

    async def _sender(self, origin: str, key: bytes) -> bytes:
        """A peer names senders of its own: never an identity this server hosts.  (Routes
        to other peers are not used to refuse: they may be stale, and a refusal here is
        final for the sender.)"""
        sender = check_identity_key(key, "sender_key")
        if await self.hosted_here(sender):
            raise Forbidden("sender_key is a user of this server, not of the origin")
        return sender

    async def relay_enqueue(
        self, ctx: RpcContext, req: federation_pb2.RelayEnqueueRequest
    ) -> delivery_pb2.EnqueueResponse:
        return await self._relay_item(self.origin(ctx, req.origin_domain), req)

    async def relay_enqueue_many(
        self, ctx: RpcContext, req: federation_pb2.RelayEnqueueManyRequest
    ) -> federation_pb2.RelayEnqueueManyResponse:
        origin = self.origin(ctx, req.origin_domain)
        if len(req.items) > MAX_MANY:
            raise TooLarge(f"at most {MAX_MANY} items per RelayEnqueueMany")
        ctx.charge(len(req.items) - 1)  # rate limits count relayed messages, not requests
        results = await asyncio.gather(*(self._relay_item(origin, it) for it in req.items),
                                       return_exceptions=True)
        out = federation_pb2.RelayEnqueueManyResponse()
        for r in results:
            item = out.results.add()
            if isinstance(r, delivery_pb2.EnqueueResponse):
                item.ok.CopyFrom(r)
                continue
            if not isinstance(r, RpcError):
                if not isinstance(r, Exception):
                    raise r  # cancellation (shutdown): not an item's answer
                log.error("relayed message failed", exc_info=r)
                r = Internal("internal error")
            item.error.code = int(r.status)
            item.error.name = Status(r.status).name
            item.error.message = r.message[:MAX_ERROR_MESSAGE]
            if r.retry_after:
                item.error.retry_after_ms = max(1, int(r.retry_after * 1000))
        return out

    async def _relay_item(
        self, origin: str, req: federation_pb2.RelayEnqueueRequest
    ) -> delivery_pb2.EnqueueResponse:
        m = req.message
        recipient = check_identity_key(m.recipient_key, "message.recipient_key")
        await self._hosted(recipient)  # first: a server that is not the home says only that
        sender = await self._sender(origin, req.sender_key)
        d = delivery_mod.get(self.app)
        d.validate_common(m.payload, m.message_id)
        await d.check_channel(m.channel_id, sender, (recipient,))
        msg = NewMessage(recipient, m.channel_id, m.payload, m.message_id,
                         d.expires_at(m.ttl_secs), sender)
        (out,) = await d.store(sender, [msg], relay=False)
        self.stats.add(self.stats.received, origin)
        return delivery_pb2.EnqueueResponse(
            seq=out.seq, duplicate=out.duplicate,
            delivery_proof=d.proof(recipient, m.channel_id, out, m.payload, m.message_id),
        )

    async def relay_batch_enqueue(
        self, ctx: RpcContext, req: federation_pb2.RelayBatchEnqueueRequest
    ) -> delivery_pb2.BatchEnqueueResponse:
        origin = self.origin(ctx, req.origin_domain)
        b = req.batch
        recipients = [check_identity_key(r, "batch.recipient_keys[]") for r in b.recipient_keys]
        if not recipients:
            raise BadRequest("batch.recipient_keys must not be empty")
        if len(recipients) > delivery_mod.MAX_BATCH_RECIPIENTS:
            raise TooLarge(f"at most {delivery_mod.MAX_BATCH_RECIPIENTS} recipients per call")
        if len(set(recipients)) != len(recipients):
            raise BadRequest("batch.recipient_keys contains duplicates")
        await _all(self._hosted(r) for r in recipients)
        sender = await self._sender(origin, req.sender_key)
        d = delivery_mod.get(self.app)
        d.validate_common(b.payload, b.message_id)
        await d.check_channel(b.channel_id, sender, recipients)
        exp = d.expires_at(b.ttl_secs)
        outs = await d.store(
            sender, [NewMessage(r, b.channel_id, b.payload, b.message_id, exp, sender)
                     for r in recipients], relay=False)
        self.stats.add(self.stats.received, origin, len(recipients))
        return delivery_pb2.BatchEnqueueResponse(results=[
            delivery_pb2.EnqueueResponse(
                seq=o.seq, duplicate=o.duplicate,
                delivery_proof=d.proof(r, b.channel_id, o, b.payload, b.message_id))
            for r, o in zip(recipients, outs, strict=True)
        ])

    async def lookup(
        self, ctx: RpcContext, req: federation_pb2.FederationLookupRequest
    ) -> federation_pb2.FederationLookupResponse:
        self.origin(ctx, req.origin_domain)
        keys = list(dict.fromkeys(req.identity_keys))
        if len(keys) > MAX_LOOKUP:
            raise TooLarge(f"at most {MAX_LOOKUP} identity keys per lookup")
        for k in keys:
            check_identity_key(k, "identity_keys[]")
        found = await _all(self.hosted_here(k) for k in keys)
        return federation_pb2.FederationLookupResponse(
            hosted=[k for k, h in zip(keys, found, strict=True) if h])

    async def announce(
        self, ctx: RpcContext, req: federation_pb2.FederationAnnounceRequest
    ) -> federation_pb2.FederationAnnounceResponse:
        """A peer's users registered (hosted) or left (gone) there.  A route is taken from
        it only where none points elsewhere (a peer cannot take over another peer's users
        this way) and the key is not a user of this server."""
        origin = self.origin(ctx, req.origin_domain)
        if len(req.hosted) + len(req.gone) > MAX_ANNOUNCE:
            raise TooLarge(f"at most {MAX_ANNOUNCE} keys per announcement")
        for k in (*req.hosted, *req.gone):
            check_identity_key(k, "identity key")
        for k in map(bytes, req.gone):
            if self.routes.get(k) == origin:
                del self.routes[k]
        for k in map(bytes, req.hosted):
            if self.routes.get(k, origin) == origin and not await self.hosted_here(k):
                self._learn(k, origin)
        return federation_pb2.FederationAnnounceResponse()

    def announce_local(self, key: bytes, hosted: bool) -> None:
        """Tell every peer that ``key`` registered here (``hosted``) or left: a peer that
        remembered "no peer hosts it" would store its messages for ``route_cache_secs``
        where the user never fetches.  One sender per peer sends the changes in order
        (the latest state of each key), and keeps trying, 1 s doubling to 30 s, while the
        peer cannot be reached; a peer that refuses announcements for good is not asked
        again."""
        self._change_seq += 1
        for d in self.peers:
            if d in self._no_announce:
                continue
            self._changes.setdefault(d, {})[key] = (hosted, self._change_seq)
            pending = self._changes[d]
            while len(pending) > MAX_ROUTES:
                pending.pop(next(iter(pending)))
            if d not in self._announcers and not self.closed:
                self._announcers.add(d)
                self.app.spawn(self._announcer(d), f"federation-announce-{d}")

    async def _announcer(self, domain: str) -> None:
        delay = BACKOFF_FIRST_SECS
        wake = self._announce_wake.setdefault(domain, asyncio.Event())
        try:
            while self._changes.get(domain) and not self.closed:
                pending = self._changes[domain]
                chunk = list(pending.items())[:MAX_ANNOUNCE]
                req = federation_pb2.FederationAnnounceRequest(
                    origin_domain=self.domain, hosted=[k for k, (h, _) in chunk if h],
                    gone=[k for k, (h, _) in chunk if not h])
                try:
                    await self.call(domain, FEDERATION_ANNOUNCE, req,
                                    federation_pb2.FederationAnnounceResponse)
                except (Unimplemented, BadRequest, Forbidden, TooLarge) as e:
                    log.warning("federation peer %s refuses registration announcements (%s): "
                                "not sent to it again until restart", domain, e.message)
                    self._no_announce.add(domain)
                    self._changes.pop(domain, None)
                    return
                except RpcError as e:
                    log.info("federation peer %s not told of %d registration change(s) yet "
                             "(%s); retrying in %.0fs", domain, len(pending), e.message, delay)
                    wake.clear()
                    with contextlib.suppress(TimeoutError):
                        # Paced retries; an answer from the peer to any call ends the wait.
                        await asyncio.wait_for(wake.wait(), delay)
                    delay = min(BACKOFF_MAX_SECS, 2 * delay)
                    continue
                delay = BACKOFF_FIRST_SECS
                for k, (_h, seq) in chunk:  # sent: unless it changed again meanwhile
                    if pending.get(k, (None, -1))[1] == seq:
                        del pending[k]
            self._changes.pop(domain, None)
        finally:
            self._announcers.discard(domain)

    async def proxy_fetch_key_package(
        self, ctx: RpcContext, req: federation_pb2.ProxyFetchKeyPackageRequest
    ) -> keys_pb2.FetchKeyPackageResponse:
        self.origin(ctx, req.origin_domain)
        ident = check_identity_key(req.identity_key)
        await self._hosted(ident)
        package = await self.app.storage.pop_key_package(ident)
        return keys_pb2.FetchKeyPackageResponse(package=package or b"")

    async def proxy_fetch_hybrid_key(
        self, ctx: RpcContext, req: federation_pb2.ProxyFetchHybridKeyRequest
    ) -> keys_pb2.FetchHybridKeyResponse:
        self.origin(ctx, req.origin_domain)
        ident = check_identity_key(req.identity_key)
        await self._hosted(ident)
        found = await self.app.storage.get_hybrid_keys([ident])
        return keys_pb2.FetchHybridKeyResponse(hybrid_public_key=found.get(ident, b""))

    async def proxy_resolve_user(
        self, ctx: RpcContext, req: federation_pb2.ProxyResolveUserRequest
    ) -> directory_pb2.ResolveUserResponse:
        self.origin(ctx, req.origin_domain)
        user = await resolve_username(self.app, req.username)  # None for invalid names too
        if user is None:
            raise NotFound(f"no such user on {self.domain}")
        resp = directory_pb2.ResolveUserResponse(
            identity_key=user.identity_key, username=user.username)
        proof = await self.app.hooks.prove_binding(self.app, user.username, user.identity_key)
        if proof is not None:
            resp.inclusion.CopyFrom(proof)
        return resp

    async def health(
        self, ctx: RpcContext, req: federation_pb2.FederationHealthRequest
    ) -> federation_pb2.FederationHealthResponse:
        self.origin(ctx, req.origin_domain)
        return federation_pb2.FederationHealthResponse(
            status="draining" if self.app.draining else "ok", domain=self.domain)

    def methods(self) -> dict[int, tuple[str, RpcMethod]]:
        def m(mid: int, name: str, req: type[Message], handler: Any,
              group: str = RATE_GROUP) -> tuple[str, RpcMethod]:
            return ("federation", RpcMethod(mid, name, req, handler, group=group,
                                            auth="authenticated"))

        f = federation_pb2
        return {
            RELAY_ENQUEUE: m(RELAY_ENQUEUE, "RelayEnqueue", f.RelayEnqueueRequest,
                             self.relay_enqueue),
            RELAY_BATCH_ENQUEUE: m(RELAY_BATCH_ENQUEUE, "RelayBatchEnqueue",
                                   f.RelayBatchEnqueueRequest, self.relay_batch_enqueue),
            PROXY_FETCH_KEY_PACKAGE: m(PROXY_FETCH_KEY_PACKAGE, "ProxyFetchKeyPackage",
                                       f.ProxyFetchKeyPackageRequest,
                                       self.proxy_fetch_key_package),
            PROXY_FETCH_HYBRID_KEY: m(PROXY_FETCH_HYBRID_KEY, "ProxyFetchHybridKey",
                                      f.ProxyFetchHybridKeyRequest, self.proxy_fetch_hybrid_key),
            PROXY_RESOLVE_USER: m(PROXY_RESOLVE_USER, "ProxyResolveUser",
                                  f.ProxyResolveUserRequest, self.proxy_resolve_user),
            # group "health": answered while draining (status "draining"), as Health is.
            FEDERATION_HEALTH: m(FEDERATION_HEALTH, "FederationHealth",
                                 f.FederationHealthRequest, self.health, group="health"),
            FEDERATION_LOOKUP: m(FEDERATION_LOOKUP, "FederationLookup",
                                 f.FederationLookupRequest, self.lookup),
            FEDERATION_ANNOUNCE: m(FEDERATION_ANNOUNCE, "FederationAnnounce",
                                   f.FederationAnnounceRequest, self.announce),
            RELAY_ENQUEUE_MANY: m(RELAY_ENQUEUE_MANY, "RelayEnqueueMany",
                                  f.RelayEnqueueManyRequest, self.relay_enqueue_many),
        }

    # -- certificates ------------------------------------------------------------------------------
    def load_tls(self, app: App) -> TlsMaterial:
        """The federation listener's TLS material.  At start-up (on the event loop) read and
        checked as :func:`certs.load` does.  On each reload (SIGHUP; a worker thread) read
        again but only prepared: :meth:`reloaded`, on the event loop, puts it in place (the
        CA and list for new connections both ways) once the listener took the pair.  A list
        older than the one in use is refused; when the node's own files fail their checks,
        a valid list is still prepared for the peers (ConfigError all the same)."""
        if not self._tls_loaded:
            self.tls = certs.load(self.cfg)
            self._tls_loaded = True
            return self.tls.material
        self._next_tls = self._next_crl = None
        current = self.tls.crl
        try:
            tls = certs.load(self.cfg)
        except ConfigError:
            if self.cfg.federation_crl is not None:
                crl = certs.load_crl(self.cfg.federation_crl, self.tls.ca)
                certs.check_not_older(crl, current)
                self._next_crl = crl
            raise
        if tls.ca == self.tls.ca:  # a new CA starts its own numbering
            if tls.crl is None and current is not None:
                raise ConfigError(
                    "config: federation.federation_crl: no longer set, but a revocation list "
                    "is in use: kept (dropping it would re-admit the certificates it "
                    "revokes; a new federation CA starts without one)")
            certs.check_not_older(tls.crl, current)
        self._next_tls = tls
        return tls.material

    def reloaded(self, error: str | None) -> None:
        """After a reload attempt of the federation listener (on the event loop): put what
        :meth:`load_tls` prepared in place, then end the connections, both ways, of
        certificates the list in use names."""
        if error is None and self._next_tls is not None:
            self.tls = self._next_tls
        elif self._next_crl is not None:
            self.tls = replace(self.tls, crl=self._next_crl)
            log.warning("federation: the revocation list was applied although this node's "
                        "own files were refused (%s)", error)
        if self.tls.crl is not None:
            self.app.spawn(self.remember_list(), "federation-crl-number")
        self._next_tls = self._next_crl = None
        if self.cfg.federation_crl is None:
            log.warning("federation: no federation_crl configured: revocations take effect "
                        "only once one is set (then SIGHUP); see qpc-federation-certs crl")
        self.drop_revoked()

    async def check_list_number(self) -> None:
        """Start-up: a list older than one this node used before (a stale copy put back by a
        backup or configuration management) would re-admit revoked certificates: refused.
        The highest number seen per CA is kept in the store."""
        crl = self.tls.crl
        seen = await self.app.storage.kv_get(CRL_NAMESPACE, self._ca_id())
        if crl is None:
            if seen is not None:
                log.warning("federation: no federation_crl configured, but this node used "
                            "revocation list number %s of its CA before: certificates that "
                            "list revokes are accepted again", int(seen))
            return
        if seen is not None and crl.number < int(seen):
            raise ConfigError(
                f"config: federation.federation_crl: list number {crl.number} is older than "
                f"number {int(seen)}, which this node used before: refused (it could re-admit "
                "revoked certificates); install the current list")
        await self.remember_list()

    async def remember_list(self) -> None:
        crl = self.tls.crl
        if crl is None:
            return
        key = self._ca_id()
        seen = await self.app.storage.kv_get(CRL_NAMESPACE, key)
        if seen is None or crl.number > int(seen):
            await self.app.storage.kv_put(CRL_NAMESPACE, key, str(crl.number).encode())

    def _ca_id(self) -> bytes:
        return self.tls.ca.fingerprint(hashes.SHA256())

    def drop_revoked(self) -> int:
        """After a reload: end the connections, both ways, of peers whose certificate the
        revocation list now names.  Returns how many."""
        n = 0
        listener = self.listener
        tls = self.tls
        for proto in list(listener.protocols) if listener is not None else ():
            try:
                tls.check_revoked(peer_certificates(proto._quic))
            except Revoked as e:
                log.warning("federation: closing a peer connection from %s: %s",
                            proto.peer.host, e)
                proto.disconnect("certificate revoked", ERR_PEER_CERTIFICATE)
                n += 1
        for domain, client in list(self._clients.items()):
            try:
                tls.check_revoked(peer_certificates(client.protocol._quic))
            except Revoked as e:
                log.warning("federation: closing the connection to %s: %s", domain, e)
                self._drop(domain, client)
                n += 1
        return n

    # -- configuration reload --------------------------------------------------------------------
    def check_reload(self, cfg: FederationConfig) -> None:
        """Before a configuration reload: a configuration that drops ``federation_crl``
        while a list of the same CA is in use is refused (it would re-admit the
        certificates the list revokes, as an older list would; a new CA starts without)."""
        if cfg.federation_crl is None and self.tls.crl is not None and self._same_ca(cfg):
            raise ConfigError(
                "config: federation.federation_crl: no longer set, but a revocation list "
                f"(number {self.tls.crl.number}) is in use: refused (it would re-admit the "
                "certificates the list revokes); a restart runs without a list")

    def _same_ca(self, cfg: FederationConfig) -> bool:
        """Does ``cfg`` name the CA in use (the same file, or another holding it)?"""
        if cfg.federation_ca == self.cfg.federation_ca or cfg.federation_ca is None:
            return True
        try:  # a small certificate file, read once per reload
            return bool(load_certificate(cfg.federation_ca, "federation.federation_ca")
                        == self.tls.ca)
        except ConfigError:
            return False  # unreadable: the certificate reload that follows refuses it

    def apply_config(self, cfg: FederationConfig) -> None:
        """A configuration reload (SIGHUP) changed keys of ``[federation]`` that apply while
        running (the plugin's ``RELOADABLE``).  Peers added are accepted and called from
        now on; a removed peer's connections both ways are closed, its routes and pending
        announcements dropped, and its calls refused; a peer whose address changed is
        called at the new one.  Timeouts and the route cache apply to the next call;
        certificate paths are read by the certificate reload that follows."""
        old, old_cache = self.peers, self.cfg.route_cache_secs
        new = {p.domain: p.address for p in cfg.peers}
        removed = [d for d in old if d not in new]
        moved = [d for d in new if d in old and old[d] != new[d]]
        added = [d for d in new if d not in old]
        self.cfg = cfg
        self.peers = new
        self._rank = {d: i for i, d in enumerate(new)}
        for d in added:
            self._connecting.setdefault(d, asyncio.Lock())
        for d in (*removed, *moved):
            self._drop(d)
            self._backoff.pop(d, None)
        for d in removed:
            self._changes.pop(d, None)
            wake = self._announce_wake.get(d)
            if wake is not None:
                wake.set()  # its announcer finds nothing left to send and ends
            self._no_announce.discard(d)
            self._no_many.discard(d)
            self._fresh.discard(d)
        if removed:
            gone = set(removed)
            for k in [k for k, d in self.routes.items() if d in gone]:
                del self.routes[k]
        if added:
            self._peers_gen += 1
            self.nowhere.clear()  # "no peer hosts it" was learnt without the new peers
        elif cfg.route_cache_secs < old_cache:  # nothing remembered longer than now allowed
            latest = time.monotonic() + cfg.route_cache_secs
            for k in [k for k, until in self.nowhere.items() if until > latest]:
                del self.nowhere[k]
        if self.listener is not None:
            self.listener.max_connections = self.max_connections
        closed = self.drop_unlisted()
        if added or removed or moved:
            log.info("federation: peers now %s (added: %s; removed: %s; address changed: "
                     "%s); %d connection(s) from removed peers closed",
                     ", ".join(new) or "none", ", ".join(added) or "none",
                     ", ".join(removed) or "none", ", ".join(moved) or "none", closed)

    def drop_unlisted(self) -> int:
        """Close the federation listener's connections from servers no longer configured
        as peers.  Returns how many."""
        n = 0
        for proto in list(self.listener.protocols) if self.listener is not None else ():
            auth = proto.auth
            domains = auth.extra.get("domains", frozenset()) if auth is not None else frozenset()
            if domains and not any(d in self.peers for d in domains):
                log.info("federation: closing the connection from %s (%s): no longer a "
                         "configured peer", proto.peer.host, ", ".join(sorted(domains)))
                proto.disconnect("no longer a federation peer", ERR_PEER_CERTIFICATE)
                n += 1
        return n

    # -- origin server side: peer connections ----------------------------------------------------
    def client_configuration(self, domain: str) -> QuicConfiguration:
        tls = self.tls  # one read: a reload replaces it as a whole
        cfg = QuicConfiguration(
            is_client=True, alpn_protocols=[ALPN], server_name=domain,
            idle_timeout=self.app.settings.max_idle_timeout_secs, verify_mode=ssl.CERT_REQUIRED,
        )
        cfg.load_verify_locations(cadata=tls.ca_pem)
        cfg.certificate = tls.material.certificate
        cfg.certificate_chain = list(tls.material.chain)
        cfg.private_key = tls.material.private_key
        return cfg

    def connected(self, domain: str) -> bool:
        c = self._clients.get(domain)
        return c is not None and c.protocol.closed_reason is None

    def _drop(self, domain: str, client: QpcClient | None = None) -> None:
        """Forget the connection to ``domain`` (only if it is still ``client``, when given;
        closed in the background): the next call opens a new one.  A peer that restarted
        drops packets of connections it no longer knows, so a connection that stopped
        answering is not reused."""
        c = self._clients.get(domain)
        if c is None or (client is not None and c is not client):
            return
        del self._clients[domain]
        self._fresh.discard(domain)
        self._background(c.close())  # not an app task (see _give_up)

    def _give_up(self, attempt: asyncio.Future[QpcClient]) -> None:
        """Cancel a connect attempt and close whatever it opens, outside the app's tasks:
        shutdown must not cancel that a second time (the library would then skip closing
        the socket); :meth:`close` waits for it."""
        attempt.cancel()
        self._background(_reap(attempt))

    def _background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    def _back_off(self, domain: str) -> float:
        """Connecting to ``domain`` failed, or its new connection was closed before it
        answered anything (e.g. it refuses this server's certificate): no new handshake for
        a while.  Not for an established connection that ends (a peer restart)."""
        _until, delay = self._backoff.get(domain, (0.0, 0.0))
        delay = min(BACKOFF_MAX_SECS, max(BACKOFF_FIRST_SECS, 2 * delay))
        self._backoff[domain] = (time.monotonic() + delay, delay)
        return delay

    async def _client(self, domain: str) -> QpcClient:
        if self.connected(domain):
            return self._clients[domain]
        lock = self._connecting.get(domain)
        if lock is None or domain not in self.peers:
            raise Unavailable(f"{domain} is no longer a federation peer", retry_after=1.0)
        async with lock:
            if self.connected(domain):
                return self._clients[domain]
            self._drop(domain)
            if self.closed:
                raise Unavailable("server shutting down", retry_after=1.0)
            if domain not in self.peers:  # removed by a reload while this call waited
                raise Unavailable(f"{domain} is no longer a federation peer", retry_after=1.0)
            until, delay = self._backoff.get(domain, (0.0, 0.0))
            now = time.monotonic()
            if now < until:
                raise Unavailable(f"federation peer {domain} unreachable (retrying in "
                                  f"{until - now:.1f}s)", retry_after=until - now)
            address = self.peers[domain]
            host, port = parse_hostport(address)
            # The caller waits relay_timeout_secs at most; an attempt given up on finishes
            # (and is closed) in the background, where the library's closing period runs.
            attempt = asyncio.ensure_future(QpcClient.connect(
                host, port, configuration=self.client_configuration(domain),
                timeout=self.cfg.relay_timeout_secs + 5, quic_backend="aioquic",
            ))
            try:
                try:
                    done, _ = await asyncio.wait({attempt},
                                                 timeout=self.cfg.relay_timeout_secs)
                except asyncio.CancelledError:
                    self._give_up(attempt)  # the caller went away (shutdown)
                    raise
                if not done:
                    self._give_up(attempt)
                    raise TimeoutError(f"no handshake within {self.cfg.relay_timeout_secs:g}s")
                c = attempt.result()
            except (OSError, TimeoutError, ConnectionError, RpcError) as e:
                # (an attempt at an address a reload replaced says nothing of the new one)
                delay = self._back_off(domain) if self.peers.get(domain) == address else 1.0
                raise Unavailable(f"federation peer {domain} unreachable: "
                                  f"{str(e) or type(e).__name__}", retry_after=delay) from None
            if self.closed:  # shut down while connecting
                await c.close()
                raise Unavailable("server shutting down", retry_after=1.0)
            if self.peers.get(domain) != address:  # removed or moved by a reload meanwhile
                await c.close()
                raise Unavailable(f"{domain} is no longer a federation peer at {address}",
                                  retry_after=1.0)
            try:  # the peer's server certificate: chained to the CA (library), not revoked
                self.tls.check_revoked(peer_certificates(c.protocol._quic))
            except Revoked as e:
                await c.close()
                delay = self._back_off(domain)
                log.warning("federation peer %s presents a revoked certificate: %s", domain, e)
                raise Unavailable(f"federation peer {domain} presents a revoked certificate",
                                  retry_after=delay) from None
            self._clients[domain] = c
            self._fresh.add(domain)  # no answer on it yet
            return c

    async def call(self, domain: str, method_id: int, request: Message,
                   response_type: type[Any]) -> Any:
        """One call to peer ``domain``.  The peer's RpcErrors come back as such (NOT_FOUND
        is an answer, not a failure); a peer that cannot be reached or does not answer in
        ``relay_timeout_secs`` raises Unavailable and its connection is replaced."""
        client: QpcClient | None = None
        try:
            client = await self._client(domain)  # connects within relay_timeout_secs
            async with asyncio.timeout(self.cfg.relay_timeout_secs):
                resp = await client.call(method_id, request, response_type)
            self._answered(domain)
            return resp
        except TimeoutError:
            self._drop(domain, client)
            self.stats.add(self.stats.errors, (domain, "unavailable"))
            raise Unavailable(f"federation peer {domain} did not answer within "
                              f"{self.cfg.relay_timeout_secs:g}s", retry_after=5.0) from None
        except FrameError:
            raise TooLarge("too large to relay to another server (the federation request "
                           "would exceed the 4 MiB frame limit)") from None
        except NotFound:
            self._answered(domain)
            raise
        except (Unavailable, ConnectionLost) as e:
            self.stats.add(self.stats.errors, (domain, "unavailable"))
            if isinstance(e, ConnectionLost):
                if client is not None and self._clients.get(domain) is client:
                    if domain in self._fresh:  # closed before any answer: refused
                        self._back_off(domain)
                    self._drop(domain, client)
                raise Unavailable(f"federation peer {domain}: {e.message}",
                                  retry_after=1.0) from None
            raise
        except RpcError:
            self._answered(domain, accepted=False)
            self.stats.add(self.stats.errors, (domain, "refused"))
            raise

    def _answered(self, domain: str, accepted: bool = True) -> None:
        """The peer answered: it is reachable, and its connection no longer new.  When it
        accepted the call, announcements waiting to retry it go now (not after a refusal:
        a peer limiting this server's rate would be asked again at once)."""
        self._backoff.pop(domain, None)
        self._fresh.discard(domain)
        wake = self._announce_wake.get(domain)
        if accepted and wake is not None:
            wake.set()

    async def close(self) -> None:
        self.closed = True
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
        if self._reapers:  # connect attempts given up on, still closing their sockets
            await asyncio.wait(list(self._reapers), timeout=5.0)

    # -- origin server side: routing --------------------------------------------------------------
    def _learn(self, key: bytes, domain: str | None) -> None:
        if domain is None:
            if key in self.routes or self.cfg.route_cache_secs <= 0:
                return  # a route learnt meanwhile wins over "nowhere"
            self.nowhere[key] = time.monotonic() + self.cfg.route_cache_secs
            self.nowhere.move_to_end(key)
            while len(self.nowhere) > MAX_ROUTES:
                self.nowhere.popitem(last=False)
            return
        self.nowhere.pop(key, None)
        self.routes[key] = domain
        self.routes.move_to_end(key)
        while len(self.routes) > MAX_ROUTES:
            self.routes.popitem(last=False)

    def _forget(self, keys: Iterable[bytes]) -> None:
        for k in keys:
            self.routes.pop(k, None)

    async def _known(self, key: bytes) -> str | None:
        """``""``: hosted here (or by no peer, recently); a peer domain: known home; None:
        ask the peers."""
        if await self.hosted_here(key):
            return ""
        domain = self.routes.get(key)
        if domain is not None and domain in self.peers:
            return domain
        until = self.nowhere.get(key)
        if until is not None:
            if until > time.monotonic():
                return ""
            del self.nowhere[key]
        return None

    async def _lookup(self, keys: list[bytes]) -> dict[bytes, str]:
        """Ask every peer at once which of ``keys`` it hosts.  A key two peers claim goes to
        the first in config order (and is logged).  Unavailable when a peer could not answer
        and some key is still unclaimed; keys no peer claims are learnt as "nowhere"."""
        found: dict[bytes, str] = {}
        unreachable: list[str] = []
        gen = self._peers_gen

        async def ask(domain: str) -> None:
            for i in range(0, len(keys), MAX_LOOKUP):
                chunk = keys[i:i + MAX_LOOKUP]
                try:
                    resp = await self.call(domain, FEDERATION_LOOKUP,
                                           federation_pb2.FederationLookupRequest(
                                               origin_domain=self.domain, identity_keys=chunk),
                                           federation_pb2.FederationLookupResponse)
                except RpcError as e:
                    log.info("federation peer %s could not be asked: %s", domain, e.message)
                    unreachable.append(domain)
                    return
                if domain not in self.peers:
                    return  # removed by a configuration reload meanwhile
                asked = set(chunk)
                for k in resp.hosted:
                    k = bytes(k)
                    if k not in asked:
                        continue  # never learn a key that was not asked for
                    prev = found.get(k)
                    if prev is not None and prev != domain:
                        log.warning("federation peers %s and %s both claim an identity key; "
                                    "the first in config order is used", prev, domain)
                    # (prev may have been removed by a reload since it answered)
                    if prev is None or self._rank[domain] < self._rank.get(prev, math.inf):
                        found[k] = domain

        await _all(ask(d) for d in self.peers)
        missing = [k for k in keys if k not in found]
        if missing and unreachable:
            raise Unavailable(
                "cannot tell which server hosts the recipient: federation peer(s) "
                f"{', '.join(sorted(unreachable))} unreachable; retry later", retry_after=5.0)
        for k, d in found.items():
            self._learn(k, d)
        if gen == self._peers_gen:  # peers added meanwhile were not asked: not "nowhere"
            for k in missing:
                self._learn(k, None)
        return found

    async def homes(self, keys: Sequence[bytes]) -> list[str]:
        """The home of each key: ``""`` (here, or no peer) or a peer domain."""
        known = await _all(self._known(k) for k in keys)
        unknown = list(dict.fromkeys(k for k, h in zip(keys, known, strict=True) if h is None))
        found = await self._lookup(unknown) if unknown else {}
        return [h if h is not None else found.get(k, "") for k, h in zip(keys, known,
                                                                             strict=True)]

    async def _with_home(self, keys: Sequence[bytes],
                         act: Callable[[list[str]], Awaitable[T]]) -> T:
        """``act(homes)``; if a home answers NOT_FOUND (the account went away), forget the
        routes and try once more with fresh answers from the peers."""
        homes = await self.homes(keys)
        try:
            return await act(homes)
        except NotFound:
            self._forget(keys)
            return await act(await self.homes(keys))

    def _request(self, sender: bytes, msgs: Sequence[NewMessage]) -> tuple[int, Message, type]:
        now = time.time()
        m = msgs[0]
        if len(msgs) == 1:
            return RELAY_ENQUEUE, federation_pb2.RelayEnqueueRequest(
                origin_domain=self.domain, sender_key=sender,
                message=delivery_pb2.EnqueueRequest(
                    recipient_key=m.recipient_key, payload=m.payload, channel_id=m.channel_id,
                    ttl_secs=_ttl(m.expires_at, now), message_id=m.message_id),
            ), delivery_pb2.EnqueueResponse
        return RELAY_BATCH_ENQUEUE, federation_pb2.RelayBatchEnqueueRequest(
            origin_domain=self.domain, sender_key=sender,
            batch=delivery_pb2.BatchEnqueueRequest(
                recipient_keys=[x.recipient_key for x in msgs], payload=m.payload,
                channel_id=m.channel_id, ttl_secs=_ttl(m.expires_at, now),
                message_id=m.message_id),
        ), delivery_pb2.BatchEnqueueResponse

    def _relay_one(self, domain: str, sender: bytes, msg: NewMessage) -> asyncio.Future[Any]:
        """Relay one message to ``domain``: messages to the same peer that are ready in the
        same loop turn leave together (RelayEnqueueMany), as Enqueues share a commit."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        queue = self._outbox.setdefault(domain, [])
        queue.append((sender, msg, fut))
        if len(queue) == 1:
            loop.call_soon(self._ship, domain)
        return fut

    def _ship(self, domain: str) -> None:
        items = self._outbox.pop(domain, [])
        batch: list[tuple[bytes, NewMessage, asyncio.Future[Any]]] = []
        size = 0
        # Peers usually share this server's limits; one refusing a batch still gets each
        # message alone (see _ship_batch).
        budget = min(MANY_BUDGET, self.app.settings.max_payload_bytes // 2)
        for it in items:
            n = len(it[1].payload) + 256
            if batch and (len(batch) >= MAX_MANY or size + n > budget):
                self.app.spawn(self._ship_batch(domain, batch), f"federation-relay-{domain}")
                batch, size = [], 0
            batch.append(it)
            size += n
        if batch:
            self.app.spawn(self._ship_batch(domain, batch), f"federation-relay-{domain}")

    async def _ship_batch(self, domain: str,
                          batch: list[tuple[bytes, NewMessage, asyncio.Future[Any]]]) -> None:
        batch = [it for it in batch if not it[2].done()]  # callers that went away: not sent
        if not batch:
            return
        if len(batch) > 1 and domain in self._no_many:
            await asyncio.gather(*(self._ship_batch(domain, [it]) for it in batch))
            return
        try:
            if len(batch) == 1:
                sender, msg, fut = batch[0]
                (out,) = await self._send(domain, sender, [msg])
                if not fut.done():
                    fut.set_result(out)
                return
            req = federation_pb2.RelayEnqueueManyRequest(origin_domain=self.domain)
            for sender, msg, _fut in batch:
                one = self._request(sender, [msg])[1]
                assert isinstance(one, federation_pb2.RelayEnqueueRequest)
                req.items.append(one)
            try:
                resp = await self.call(domain, RELAY_ENQUEUE_MANY, req,
                                       federation_pb2.RelayEnqueueManyResponse)
            except (ProtocolViolation, TooLarge, Unimplemented) as e:
                # The batch as a whole was refused (a peer with a lower payload limit, or one
                # without 908): each message on its own, concurrently.  (Not after
                # RATE_LIMITED: that peer asked for less, not for more requests.)
                log.info("federation peer %s refused a batch of %d relays (%s): sending them "
                         "one by one", domain, len(batch), e.message)
                if isinstance(e, Unimplemented):
                    self._no_many.add(domain)
                await asyncio.gather(*(self._ship_batch(domain, [it]) for it in batch))
                return
            if len(resp.results) != len(batch):
                raise Unavailable(f"federation peer {domain} answered {len(resp.results)} "
                                  f"results for {len(batch)} messages", retry_after=5.0)
            ok = 0
            for (_sender, _msg, fut), r in zip(batch, resp.results, strict=True):
                if fut.done():
                    continue
                if r.HasField("ok"):
                    ok += 1
                    fut.set_result(EnqueueOutcome(r.ok.seq, r.ok.duplicate))
                else:
                    err = r.error
                    fut.set_exception(error_for_status(
                        err.code or Status.INTERNAL, err.message,
                        err.retry_after_ms / 1000 if err.retry_after_ms else None))
            self.stats.add(self.stats.relayed, domain, ok)
        except BaseException as e:
            for _sender, _msg, fut in batch:
                if not fut.done():
                    fut.set_exception(e if isinstance(e, Exception) else
                                      Unavailable("server shutting down", retry_after=1.0))
            if not isinstance(e, Exception):
                raise

    async def _send(self, domain: str, sender: bytes,
                    msgs: Sequence[NewMessage]) -> list[EnqueueOutcome]:
        method, request, rtype = self._request(sender, msgs)
        resp = await self.call(domain, method, request, rtype)
        results = [resp] if method == RELAY_ENQUEUE else list(resp.results)
        if len(results) != len(msgs):
            raise Unavailable(f"federation peer {domain} answered {len(results)} results for "
                              f"{len(msgs)} recipients", retry_after=5.0)
        self.stats.add(self.stats.relayed, domain, len(msgs))
        return [EnqueueOutcome(r.seq, r.duplicate) for r in results]

    async def route(self, sender: bytes,
                    messages: Sequence[NewMessage]) -> list[EnqueueOutcome | None] | None:
        """The relay_enqueue hook: deliver what peers host, leave the rest (None) here.
        (The messages of one call share payload, channel and message_id.)"""

        homes = await self.homes([m.recipient_key for m in messages])
        if not any(homes):
            return None
        out: list[EnqueueOutcome | None] = [None] * len(messages)

        async def deliver(domain: str, idx: list[int]) -> None:
            if len(idx) == 1:
                outs = [await self._relay_one(domain, sender, messages[idx[0]])]
            else:
                outs = await self._send(domain, sender, [messages[i] for i in idx])
            for i, o in zip(idx, outs, strict=True):
                out[i] = o

        async def to_home(domain: str, idx: list[int]) -> None:
            try:
                await deliver(domain, idx)
            except NotFound:
                # That home no longer hosts (some of) them: ask again for *these* recipients
                # only (the other homes' parts are stored), once.
                keys = [messages[i].recipient_key for i in idx]
                self._forget(keys)
                again: dict[str, list[int]] = {}
                for i, h in zip(idx, await self.homes(keys), strict=True):
                    if h:
                        again.setdefault(h, []).append(i)
                await _all(deliver(d, ix) for d, ix in again.items())

        groups: dict[str, list[int]] = {}
        for i, h in enumerate(homes):
            if h:
                groups.setdefault(h, []).append(i)
        await _all(to_home(d, idx) for d, idx in groups.items())
        return out

    # -- origin server side: key and user lookups ------------------------------------------------
    async def remote_key_package(self, identity_key: bytes) -> bytes | None:
        async def act(homes: list[str]) -> bytes | None:
            if not homes[0]:
                return None
            resp = await self.call(homes[0], PROXY_FETCH_KEY_PACKAGE,
                                   federation_pb2.ProxyFetchKeyPackageRequest(
                                       origin_domain=self.domain, identity_key=identity_key),
                                   keys_pb2.FetchKeyPackageResponse)
            return bytes(resp.package)

        return await self._with_home([identity_key], act)

    async def remote_hybrid_keys(self, identity_keys: Sequence[bytes]) -> dict[bytes, bytes]:
        keys = list(dict.fromkeys(identity_keys))

        async def act(homes: list[str]) -> dict[bytes, bytes]:
            found: dict[bytes, bytes] = {}

            async def one(key: bytes, home: str) -> None:
                resp = await self.call(home, PROXY_FETCH_HYBRID_KEY,
                                       federation_pb2.ProxyFetchHybridKeyRequest(
                                           origin_domain=self.domain, identity_key=key),
                                       keys_pb2.FetchHybridKeyResponse)
                if resp.hybrid_public_key:
                    found[key] = bytes(resp.hybrid_public_key)

            await _all(one(k, h) for k, h in zip(keys, homes, strict=True) if h)
            return found

        return await self._with_home(keys, act)

    async def remote_user(self, username: str, domain: str) -> Any:
        if domain not in self.peers:
            raise NotFound(f"no federation peer for domain {domain[:253]!r}")
        try:
            name = normalize_username(username)
        except BadRequest:
            raise NotFound(f"no such user on {domain}") from None
        resp = await self.call(domain, PROXY_RESOLVE_USER, federation_pb2.ProxyResolveUserRequest(
            origin_domain=self.domain, username=name), directory_pb2.ResolveUserResponse)
        # No route is learnt from this answer: a peer could name any key (another peer's
        # user) and draw its messages.  Routes come from FederationLookup only.
        resp.username = f"{resp.username}@{domain}"
        return resp

