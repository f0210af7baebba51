"""Federation: relay messages to, and proxy key lookups from, the server that hosts a user.

Home server side: a second QUIC listener (``federation.listen``, ALPN ``qpc-fed``, mutual TLS)
serves methods 900-905 to configured peers only.  A peer is the holder of a certificate that
chains to ``federation_ca``; each request's ``origin_domain`` must be one of that
certificate's DNS names *and* a configured peer's domain.

Origin server side (``relay_enqueue``): a recipient is **hosted here** when this server's
directory knows its identity key (a registered user).  Any other recipient is looked for at
the peers: a known route (key -> peer, learnt from an accepted relay) is used directly;
otherwise the peers are asked in config order with the message itself (RelayEnqueue answers
``NOT_FOUND`` for keys the peer does not host).  When every peer answered ``NOT_FOUND`` the
message is stored here (a key nobody has registered yet, or a bearer-token identity), and
that answer is remembered for ``route_cache_secs``.  When a peer could not be asked, or the
known home cannot be reached, the call fails with ``UNAVAILABLE`` and nothing is stored
here: an acknowledged message must never be stranded on a server its recipient never uses.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from aioquic.quic.configuration import QuicConfiguration
from google.protobuf.message import Message

from qpc_core.builtin import delivery as delivery_mod
from qpc_core.config import FederationConfig, parse_hostport
from qpc_core.errors import (
    BadRequest,
    Forbidden,
    NotFound,
    QuotaExceeded,
    RpcError,
    TooLarge,
    Unavailable,
)
from qpc_core.identity import check_identity_key
from qpc_core.pb import delivery_pb2, directory_pb2, federation_pb2, keys_pb2
from qpc_core.rpc import AuthResult, Connection, RpcContext, RpcMethod
from qpc_core.storage.base import EnqueueOutcome, NewMessage
from qpc_core.users import resolve_identity, resolve_username
from qpc_federation.certs import FederationTls

if TYPE_CHECKING:
    from cryptography import x509

    from qpc_core.app import App
    from qpc_core.client.sdk import QpcClient

log = logging.getLogger("qpc.federation")

ALPN = "qpc-fed"
RELAY_ENQUEUE = 900
RELAY_BATCH_ENQUEUE = 901
PROXY_FETCH_KEY_PACKAGE = 902
PROXY_FETCH_HYBRID_KEY = 903
PROXY_RESOLVE_USER = 904
FEDERATION_HEALTH = 905
#: Rate-limit group of the federation methods (per peer address; ``rate_limits.federation``).
RATE_GROUP = "federation"
#: Routes (identity key -> peer domain) and "hosted by no peer" answers kept at most.
MAX_ROUTES = 100_000
#: Answers after which asking the next peer is pointless: the message itself is refused, or
#: the peer hosts the recipient and refuses for now (its queue is full).
_FINAL = (BadRequest, TooLarge, Forbidden, QuotaExceeded)


def _ttl(expires_at: float | None, now: float) -> int:
    return 0 if expires_at is None else max(1, math.ceil(expires_at - now))


class Federation:
    """Per-App federation state: peers, their connections, and learnt routes."""

    def __init__(self, app: App, cfg: FederationConfig, tls: FederationTls) -> None:
        self.app = app
        self.cfg = cfg
        self.tls = tls
        self.domain = cfg.domain
        self.peers = {p.domain: p.address for p in cfg.peers}  # config order
        self._clients: dict[str, QpcClient] = {}
        self._connecting: dict[str, asyncio.Lock] = {d: asyncio.Lock() for d in self.peers}
        self.routes: OrderedDict[bytes, str] = OrderedDict()
        self.nowhere: OrderedDict[bytes, float] = OrderedDict()  # key -> until (monotonic)
        self.relayed = 0
        self.closed = False

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
        domains: frozenset[str] = ctx.auth.extra.get("domains", frozenset()) if ctx.auth else \
            frozenset()
        d = origin_domain.strip().lower().rstrip(".")
        if d not in domains:
            raise Forbidden(
                f"origin_domain {d!r} is not a configured peer named by your certificate "
                f"({', '.join(sorted(domains))})"
            )
        return d

    async def _hosted(self, key: bytes) -> None:
        if await resolve_identity(self.app, key) is None:
            raise NotFound(f"recipient is not hosted on {self.domain}")

    async def relay_enqueue(
        self, ctx: RpcContext, req: federation_pb2.RelayEnqueueRequest
    ) -> delivery_pb2.EnqueueResponse:
        self.origin(ctx, req.origin_domain)
        sender = check_identity_key(req.sender_key, "sender_key")
        m = req.message
        recipient = check_identity_key(m.recipient_key, "message.recipient_key")
        d = delivery_mod.get(self.app)
        d.validate_common(m.payload, m.message_id)
        await self._hosted(recipient)
        await d.check_channel(m.channel_id, sender, (recipient,))
        msg = NewMessage(recipient, m.channel_id, m.payload, m.message_id,
                         d.expires_at(m.ttl_secs), sender)
        (out,) = await d.store(sender, [msg], relay=False)
        return delivery_pb2.EnqueueResponse(
            seq=out.seq, duplicate=out.duplicate,
            delivery_proof=d.proof(recipient, m.channel_id, out, m.payload, m.message_id),
        )

    async def relay_batch_enqueue(
        self, ctx: RpcContext, req: federation_pb2.RelayBatchEnqueueRequest
    ) -> delivery_pb2.BatchEnqueueResponse:
        self.origin(ctx, req.origin_domain)
        sender = check_identity_key(req.sender_key, "sender_key")
        b = req.batch
        recipients = [check_identity_key(r, "batch.recipient_keys[]") for r in b.recipient_keys]
        if not recipients:
            raise BadRequest("batch.recipient_keys must not be empty")
        if len(recipients) > delivery_mod.MAX_BATCH_RECIPIENTS:
            raise TooLarge(f"at most {delivery_mod.MAX_BATCH_RECIPIENTS} recipients per call")
        if len(set(recipients)) != len(recipients):
            raise BadRequest("batch.recipient_keys contains duplicates")
        d = delivery_mod.get(self.app)
        d.validate_common(b.payload, b.message_id)
        for r in recipients:
            await self._hosted(r)
        await d.check_channel(b.channel_id, sender, recipients)
        exp = d.expires_at(b.ttl_secs)
        outs = await d.store(
            sender, [NewMessage(r, b.channel_id, b.payload, b.message_id, exp, sender)
                     for r in recipients], relay=False)
        return delivery_pb2.BatchEnqueueResponse(results=[
            delivery_pb2.EnqueueResponse(
                seq=o.seq, duplicate=o.duplicate,
                delivery_proof=d.proof(r, b.channel_id, o, b.payload, b.message_id))
            for r, o in zip(recipients, outs, strict=True)
        ])

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
        user = await resolve_username(self.app, req.username)
        if user is None:
            raise NotFound(f"no user named {req.username!r} on {self.domain}")
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
        def m(mid: int, name: str, req: type[Message], handler: Any) -> tuple[str, RpcMethod]:
            return ("federation", RpcMethod(mid, name, req, handler, group=RATE_GROUP,
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
            FEDERATION_HEALTH: m(FEDERATION_HEALTH, "FederationHealth",
                                 f.FederationHealthRequest, self.health),
        }

    # -- origin server side: peer connections ----------------------------------------------------
    def client_configuration(self, domain: str) -> QuicConfiguration:
        cfg = QuicConfiguration(
            is_client=True, alpn_protocols=[ALPN], server_name=domain,
            idle_timeout=self.app.settings.max_idle_timeout_secs, verify_mode=ssl.CERT_REQUIRED,
        )
        cfg.load_verify_locations(cadata=self.tls.ca_pem)
        cfg.certificate = self.tls.material.certificate
        cfg.certificate_chain = list(self.tls.material.chain)
        cfg.private_key = self.tls.material.private_key
        return cfg

    async def _client(self, domain: str) -> QpcClient:
        from qpc_core.client.sdk import QpcClient

        c = self._clients.get(domain)
        if c is not None and c.protocol.closed_reason is None:
            return c
        async with self._connecting[domain]:
            c = self._clients.get(domain)
            if c is not None and c.protocol.closed_reason is None:
                return c
            if c is not None:
                await c.close()
            if self.closed:
                raise Unavailable("server shutting down", retry_after=1.0)
            host, port = parse_hostport(self.peers[domain])
            try:
                c = await QpcClient.connect(
                    host, port, configuration=self.client_configuration(domain),
                    timeout=self.cfg.relay_timeout_secs, quic_backend="aioquic",
                )
            except (OSError, TimeoutError, ConnectionError) as e:
                raise Unavailable(f"federation peer {domain} unreachable: {e or type(e).__name__}",
                                  retry_after=5.0) from None
            self._clients[domain] = c
            return c

    async def call(self, domain: str, method_id: int, request: Message,
                   response_type: type[Any]) -> Any:
        """One call to peer ``domain``: RpcErrors of the peer come back as such; a peer that
        cannot be reached in ``relay_timeout_secs`` raises Unavailable."""
        try:
            async with asyncio.timeout(self.cfg.relay_timeout_secs):
                client = await self._client(domain)
                return await client.call(method_id, request, response_type)
        except TimeoutError:
            raise Unavailable(f"federation peer {domain} did not answer within "
                              f"{self.cfg.relay_timeout_secs:g}s", retry_after=5.0) from None

    async def close(self) -> None:
        self.closed = True
        clients, self._clients = list(self._clients.values()), {}
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)

    # -- origin server side: routing --------------------------------------------------------------
    def _learn(self, key: bytes, domain: str | None) -> None:
        if domain is None:
            self.routes.pop(key, None)
            if self.cfg.route_cache_secs > 0:
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

    async def home_of(self, key: bytes) -> str | None:
        """``""``: hosted here; a peer domain: known home; None: not known, ask the peers."""
        if await resolve_identity(self.app, key) is not None:
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

    async def _send(self, domain: str, sender: bytes,
                    msgs: Sequence[NewMessage]) -> list[EnqueueOutcome]:
        method, request, rtype = self._request(sender, msgs)
        resp = await self.call(domain, method, request, rtype)
        results = [resp] if method == RELAY_ENQUEUE else list(resp.results)
        if len(results) != len(msgs):
            raise Unavailable(f"federation peer {domain} answered {len(results)} results for "
                              f"{len(msgs)} recipients", retry_after=5.0)
        for m in msgs:
            self._learn(m.recipient_key, domain)
        self.relayed += len(msgs)
        return [EnqueueOutcome(r.seq, r.duplicate) for r in results]

    async def _probe(self, sender: bytes, msg: NewMessage) -> EnqueueOutcome | None:
        """Offer ``msg`` to each peer in config order; None when every peer said NOT_FOUND."""
        unreachable: list[str] = []
        for domain in self.peers:
            try:
                (out,) = await self._send(domain, sender, [msg])
                return out
            except NotFound:
                continue
            except _FINAL:
                raise
            except RpcError as e:
                log.info("federation peer %s could not be asked: %s", domain, e.message)
                unreachable.append(domain)
        if unreachable:
            raise Unavailable(
                "cannot tell which server hosts the recipient: federation peer(s) "
                f"{', '.join(unreachable)} unreachable; retry later", retry_after=5.0)
        self._learn(msg.recipient_key, None)
        return None

    async def route(self, sender: bytes,
                    messages: Sequence[NewMessage]) -> list[EnqueueOutcome | None] | None:
        """The relay_enqueue hook: deliver what peers host, leave the rest (None) here."""
        homes = [await self.home_of(m.recipient_key) for m in messages]
        if all(h == "" for h in homes):
            return None
        out: list[EnqueueOutcome | None] = [None] * len(messages)
        groups: dict[str, list[int]] = {}
        unknown: list[int] = []
        for i, h in enumerate(homes):
            if h is None:
                unknown.append(i)
            elif h:
                groups.setdefault(h, []).append(i)

        async def to_home(domain: str, idx: list[int]) -> None:
            msgs = [messages[i] for i in idx]
            try:
                outs = await self._send(domain, sender, msgs)
            except NotFound:
                # A home that no longer hosts one of them (account deleted, or moved): forget
                # these routes and ask the peers again, one message at a time.
                for m in msgs:
                    self.routes.pop(m.recipient_key, None)
                outs = []
                for i in idx:
                    out[i] = await self._probe(sender, messages[i])
                return
            for i, o in zip(idx, outs, strict=True):
                out[i] = o

        async def probe(i: int) -> None:
            out[i] = await self._probe(sender, messages[i])

        # Every relay runs to its end (none is left running unobserved); the first failure
        # then fails the call.
        results = await asyncio.gather(*(to_home(d, idx) for d, idx in groups.items()),
                                       *(probe(i) for i in unknown), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return out

    # -- origin server side: key and user lookups ------------------------------------------------
    async def _ask_home(self, key: bytes, method_id: int, request: Message,
                        response_type: type[Any]) -> Any | None:
        """Ask the home server of ``key`` (known, else each peer in order until one does not
        answer NOT_FOUND).  None: hosted here, or by no peer."""
        home = await self.home_of(key)
        if home == "":
            return None
        order = [home, *(d for d in self.peers if d != home)] if home else list(self.peers)
        unreachable: list[str] = []
        for domain in order:
            try:
                resp = await self.call(domain, method_id, request, response_type)
            except NotFound:
                if domain == home:
                    self.routes.pop(key, None)
                continue
            except _FINAL:
                raise
            except RpcError as e:
                log.info("federation peer %s could not be asked: %s", domain, e.message)
                unreachable.append(domain)
                continue
            self._learn(key, domain)
            return resp
        if unreachable:
            raise Unavailable(
                "cannot reach the server that hosts this identity: federation peer(s) "
                f"{', '.join(unreachable)} unreachable; retry later", retry_after=5.0)
        self._learn(key, None)
        return None

    async def remote_key_package(self, identity_key: bytes) -> bytes | None:
        resp = await self._ask_home(
            identity_key, PROXY_FETCH_KEY_PACKAGE,
            federation_pb2.ProxyFetchKeyPackageRequest(origin_domain=self.domain,
                                                       identity_key=identity_key),
            keys_pb2.FetchKeyPackageResponse)
        return None if resp is None else bytes(resp.package)

    async def remote_hybrid_keys(self, identity_keys: Sequence[bytes]) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = {}

        async def one(key: bytes) -> None:
            resp = await self._ask_home(
                key, PROXY_FETCH_HYBRID_KEY,
                federation_pb2.ProxyFetchHybridKeyRequest(origin_domain=self.domain,
                                                          identity_key=key),
                keys_pb2.FetchHybridKeyResponse)
            if resp is not None and resp.hybrid_public_key:
                found[key] = bytes(resp.hybrid_public_key)

        results = await asyncio.gather(*(one(k) for k in dict.fromkeys(identity_keys)),
                                       return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return found

    async def remote_user(self, username: str, domain: str) -> Any | None:
        if domain not in self.peers:
            return None
        resp = await self.call(domain, PROXY_RESOLVE_USER, federation_pb2.ProxyResolveUserRequest(
            origin_domain=self.domain, username=username), directory_pb2.ResolveUserResponse)
        self._learn(bytes(resp.identity_key), domain)
        resp.username = f"{resp.username}@{domain}"
        return resp
