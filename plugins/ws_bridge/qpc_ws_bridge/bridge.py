"""The WebSocket listener: browser connections as qpc :class:`~qpc_core.rpc.Connection` objects.

A thin layer between ``websockets`` (HTTP upgrade, framing, ping/pong, close handshake) and
core's :class:`~qpc_core.dispatch.Dispatcher`: each REQUEST message runs as one call, exactly
as a request stream does on QUIC, and is answered with a RESPONSE message carrying the same
``request_id``.  What QUIC gives per stream is done per call here: a bounded number of calls
in flight per connection (beyond it a bounded waiting queue, then "busy" refusals; reading
stops only while the client leaves too many answers unread), CANCEL instead of a stream
reset, the pre-auth message size limit, the auth deadline.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import ipaddress
import logging
import ssl
import time
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
)
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from qpc_core.config import parse_hostport
from qpc_core.dispatch import Dispatcher, error_response
from qpc_core.framing import PushEvent, RequestFrame, Status
from qpc_core.pb import common_pb2
from qpc_core.rpc import PeerInfo, new_connection_id
from qpc_core.transport.certs import check_valid_now, resolve_tls, write_atomic
from qpc_core.transport.credentials import ConnectionCredentials
from qpc_core.transport.quic import OWN_CAP_HALF_OPEN, OWN_CAP_HALF_OPEN_PER_IP
from qpc_ws_bridge import wire
from qpc_ws_bridge.config import WsBridgeConfig

if TYPE_CHECKING:
    from qpc_core.app import App

log = logging.getLogger("qpc.ws_bridge")

#: What identity proofs on the bridge are bound to, before the host (docs/protocol.md).
HOST_BINDING_CONTEXT = b"qpc-v1 ws-host\x00"
#: The browser OPAQUE client (built from plugins/ws_bridge/js by `make install`), served
#: next to qpc.js.
OPAQUE_JS = "qpc-opaque.js"
#: Pushes a connection may have waiting to be written; more are dropped (pushes are hints).
MAX_PUSH_BACKLOG = 64
#: Error answers a connection may have waiting to be written before reading it stops.
WRITE_BACKLOG = 64
#: TCP connections in the opening handshake at most, and from one address at most.
HALF_OPEN_MAX = OWN_CAP_HALF_OPEN
HALF_OPEN_PER_IP = OWN_CAP_HALF_OPEN_PER_IP
#: WebSocket close codes used.
CLOSE_NORMAL, CLOSE_GOING_AWAY, CLOSE_UNSUPPORTED, CLOSE_POLICY = 1000, 1001, 1003, 1008
CLOSE_INTERNAL = 1011


def host_binding(host: str) -> bytes:
    """SHA-256 over the context and the ``Host`` the client connected to (lower case): what
    a browser signs into ProveIdentity instead of the QUIC certificate hash, so a proof made
    for one server's page cannot be relayed to another server."""
    return hashlib.sha256(HOST_BINDING_CONTEXT + host.lower().encode()).digest()


def _canonical_ip(text: str) -> str | None:
    """``text`` as an IP address in canonical form (IPv4-mapped IPv6 as IPv4; a port as in
    ``1.2.3.4:5`` or ``[::1]:5`` dropped), or None when it is not one."""
    t = text.strip()
    if t.startswith("["):
        t = t[1:].split("]", 1)[0]
    elif t.count(":") == 1:
        t = t.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(t)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


def _one(headers: Headers, name: str) -> str:
    """The header's value ('' when absent; admission refused it when repeated)."""
    values = headers.get_all(name)
    return values[0] if len(values) == 1 else ""


def _close_reason(reason: str) -> str:
    """WebSocket close reasons are at most 123 bytes of UTF-8."""
    data = reason.encode()[:123]
    return data.decode(errors="ignore")


class BridgeConnection(ConnectionCredentials):
    """One browser connection.  Implements :class:`qpc_core.rpc.Connection` (credentials as
    on QUIC: :class:`~qpc_core.transport.credentials.ConnectionCredentials`)."""

    def __init__(self, bridge: WsBridge, ws: ServerConnection, peer: PeerInfo,
                 binding: bytes) -> None:
        self.bridge = bridge
        self.app = bridge.app
        self.ws = ws
        self._peer = peer
        self._connection_id = new_connection_id()
        self._init_credentials()
        self.challenge: bytes | None = None
        #: Identity proofs are bound to the host (see :func:`host_binding`).
        self.tls_binding = binding
        self._gone = False
        self._seen_request = False
        # request_id -> (the call's task, whether the client going away cancels it); a call
        # leaves this table when answered or cancelled by the client.
        self.calls: dict[int, tuple[asyncio.Task[None], bool]] = {}
        self.running: set[asyncio.Task[None]] = set()  # every call task until it ends
        # Requests read while the calls-in-flight limit was reached, in arrival order.
        self.waiting: OrderedDict[int, RequestFrame] = OrderedDict()
        self.waiting_bytes = 0
        self._slot = asyncio.Event()
        self._slot.set()
        self._pushes: set[asyncio.Task[None]] = set()  # pushes being written (bounded)
        # Other writes (error answers, refusals, closes): reading stops while too many wait,
        # so a client that sends without reading cannot make the server queue without end.
        self._writes: set[asyncio.Task[None]] = set()
        self._stall_timer: asyncio.TimerHandle | None = None
        self._closing = False
        self._auth_timer: asyncio.TimerHandle | None = None
        loop = asyncio.get_running_loop()
        self._loop = loop

    # -- Connection protocol ----------------------------------------------------------------
    @property
    def connection_id(self) -> int:
        return self._connection_id

    @property
    def peer(self) -> PeerInfo:
        return self._peer

    def _accepting_credentials(self) -> bool:
        return not self._gone and not self._closing

    def _unauthenticated(self) -> None:
        self.ws.protocol.max_message_size = self.bridge.preauth_max_message
        self._arm_auth_deadline()

    def push(self, event_type: int, payload: bytes) -> None:
        if self._gone:
            return
        if len(self._pushes) >= MAX_PUSH_BACKLOG:
            self.bridge.pushes_dropped += 1
            log.debug("connection %d: push %d dropped (%d pushes not yet written)",
                      self._connection_id, event_type, len(self._pushes))
            return
        self._track(self._pushes, self._write(wire.push_message(event_type, payload)))

    def disconnect(self, reason: str, code: int = CLOSE_NORMAL) -> None:
        """Close the connection.  From now on nothing it sends runs (the close handshake
        may take the client a while): waiting requests are dropped, long polls stopped,
        and the identity no longer gets pushes."""
        if self._gone or self._closing:
            return
        self._closing = True
        self._drop_calls()
        if self._identity is not None:
            self.app.unbind_identity(self, self._identity)
        self._track(self._writes, self._close(code, reason))

    def _drop_calls(self) -> None:
        """The client is gone or going: long polls stop; other calls finish (unanswered), so
        a handler is never stopped between two writes (RpcMethod.cancel_on_disconnect)."""
        for task, cancellable in self.calls.values():
            if cancellable:
                task.cancel()
        self.calls.clear()
        self.waiting.clear()  # never started: nothing of them ran
        self.waiting_bytes = 0

    # -- internals --------------------------------------------------------------------------
    def _track(self, tasks: set[asyncio.Task[None]], coro: Any) -> None:
        task = self._loop.create_task(coro)
        tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            tasks.discard(t)
            self._slot.set()

        task.add_done_callback(done)

    async def _write(self, message: bytes) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(message)

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(code, _close_reason(reason))

    def _authenticated(self) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        self.ws.protocol.max_message_size = self.bridge.max_message

    def _arm_auth_deadline(self) -> None:
        if not self._gone and self._auth_timer is None:
            self._auth_timer = self._loop.call_later(
                self.app.settings.auth_timeout_secs, self._auth_expired)

    def _arm_stall_check(self) -> None:
        s = self.app.settings
        period = min(s.request_receive_timeout_secs, s.max_idle_timeout_secs)
        if s.keepalive_interval_secs > 0:
            period = min(period, s.keepalive_interval_secs)
        self._stall_timer = self._loop.call_later(period / 2, self._stall_check)

    def _partly_received(self) -> bool:
        """A frame or a fragmented message has begun and not ended."""
        proto = self.ws.protocol
        reader = getattr(proto, "reader", None)
        return (getattr(proto, "current_size", None) is not None
                or bool(reader is not None and getattr(reader, "buffer", b"")))

    def _stall_check(self) -> None:
        """Liveness by bytes received, as QUIC's idle and receive timers: a message begun and
        then without a byte for ``request_receive_timeout_secs`` (a stalled sender holding
        its buffer) closes the connection (1008), and so does silence for two keep-alive
        intervals, pongs included (1011).  A slow sender that keeps sending is never cut
        off, even while one big frame delays its pongs."""
        self._stall_timer = None
        if self._gone or self._closing:
            return
        s = self.app.settings
        quiet = time.monotonic() - getattr(self.ws, "last_received", time.monotonic())
        if quiet >= s.request_receive_timeout_secs and self._partly_received():
            self.disconnect(f"message stalled: no bytes for {s.request_receive_timeout_secs:g} s",
                            CLOSE_POLICY)
            return
        if s.keepalive_interval_secs > 0 and quiet >= 2 * s.keepalive_interval_secs:
            self.disconnect("keepalive timeout: nothing received", CLOSE_INTERNAL)
            return
        if quiet >= s.max_idle_timeout_secs:  # as QUIC's idle timeout, with or without pings
            self.disconnect(f"idle for {s.max_idle_timeout_secs:g} s", CLOSE_GOING_AWAY)
            return
        self._arm_stall_check()

    def _auth_expired(self) -> None:
        self._auth_timer = None
        if self._gone or self.authenticated:
            return
        secs = self.app.settings.auth_timeout_secs
        self.disconnect(f"not authenticated within {secs:g} s", CLOSE_POLICY)

    async def serve(self) -> str:
        """Read messages until the connection ends; returns why it ended.

        Requests beyond the calls-in-flight limit wait here, in order, up to that many
        and ``max_request_buffer_bytes``; beyond that they are refused (``UNAVAILABLE``,
        busy), so reading never stops for them and a CANCEL or a pong always arrives.
        Reading stops only while the client leaves the server's answers unread (more than
        :data:`WRITE_BACKLOG` error answers waiting to be written)."""
        self._arm_auth_deadline()
        self._arm_stall_check()
        try:
            while True:
                while len(self._writes) >= WRITE_BACKLOG:
                    self._slot.clear()
                    await self._slot.wait()
                message = await self.ws.recv()
                if isinstance(message, str):
                    await self._close(CLOSE_UNSUPPORTED, "binary messages only (qpc frames)")
                    return "text message"
                self._on_message(message)
        except ConnectionClosed as e:
            rcvd = e.rcvd
            return (rcvd.reason or f"closed {rcvd.code}") if rcvd is not None else "connection lost"

    def _on_message(self, data: bytes) -> None:
        if self._closing:
            return  # closed by the server: the client's close reply is all that counts now
        try:
            msg = wire.parse_client(data, self.bridge.max_payload)
        except wire.WireError as e:
            self._protocol_error(e.request_id, e.reason, str(e))
            return
        if isinstance(msg, RequestFrame):
            self._seen_request = True
            if msg.request_id in self.calls or msg.request_id in self.waiting:
                self._answer_now(error_response(
                    msg.request_id, Status.BAD_REQUEST,
                    f"request_id {msg.request_id} is already in flight on this connection"))
                return
            if len(self.running) >= self.bridge.calls_per_connection:
                size = len(msg.payload)
                if (len(self.waiting) >= self.bridge.calls_per_connection
                        or self.waiting_bytes + size > self.bridge.request_budget):
                    self._answer_now(error_response(
                        msg.request_id, Status.UNAVAILABLE,
                        f"busy: {len(self.running)} calls of this connection are running "
                        f"and {len(self.waiting)} waiting; send it again (keep fewer calls "
                        "in flight)", retry_after=0.05))
                    return
                self.waiting[msg.request_id] = msg
                self.waiting_bytes += size
            else:
                self._start_call(msg)
        elif isinstance(msg, wire.Cancel):
            queued = self.waiting.pop(msg.request_id, None)
            if queued is not None:
                self.waiting_bytes -= len(queued.payload)
                self._slot.set()
            call = self.calls.pop(msg.request_id, None)
            if call is not None and call[1]:
                call[0].cancel()
        else:  # Auth: only as the first message, as the handshake is on QUIC's first stream
            if self._seen_request or self.authenticated or self.running:
                self._protocol_error(0, "auth_late", "the auth message must be the first "
                                     "message of the connection")
                return
            self._seen_request = True
            self._start(self._handshake(msg.token))

    def _start_call(self, frame: RequestFrame) -> None:
        entry = self.bridge.dispatcher.methods.get(frame.method_id)
        task = self._start(self._call(frame))
        self.calls[frame.request_id] = (task, entry is None or entry[1].cancel_on_disconnect)

    def _start(self, coro: Any) -> asyncio.Task[None]:
        task = self._loop.create_task(coro)
        self.running.add(task)
        self.bridge.calls.add(task)
        task.add_done_callback(self._call_done)
        return task

    def _call_done(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        self.bridge.calls.discard(task)
        while (self.waiting and not self._gone
               and len(self.running) < self.bridge.calls_per_connection):
            _rid, frame = self.waiting.popitem(last=False)
            self.waiting_bytes -= len(frame.payload)
            self._start_call(frame)
        self._slot.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("connection %d: call failed", self._connection_id,
                      exc_info=task.exception())

    def _answer_now(self, response: bytes) -> None:
        self._track(self._writes, self._write(wire.response_message(response)))

    def _protocol_error(self, request_id: int, reason: str, message: str) -> None:
        log.debug("connection %d: protocol error (%s): %s", self._connection_id, reason, message)
        self._answer_now(error_response(request_id, Status.PROTOCOL_ERROR,
                                        f"protocol error: {message}"))

    async def _call(self, frame: RequestFrame) -> None:
        task = asyncio.current_task()
        out = await self.bridge.dispatcher.call(self, frame)
        call = self.calls.get(frame.request_id)
        if call is None or call[0] is not task:
            return  # cancelled by the client: unanswered, as a reset stream on QUIC
        del self.calls[frame.request_id]
        await self._write(wire.response_message(out))

    async def _handshake(self, token: bytes) -> None:
        status = await self.bridge.dispatcher.handshake(self, token)
        await self._write(wire.auth_reply_message(status))

    def terminated(self, reason: str) -> None:
        if self._gone:
            return
        self._gone = True
        for timer in (self._auth_timer, self._stall_timer):
            if timer is not None:
                timer.cancel()
        self._auth_timer = self._stall_timer = None
        self._stop_expiry()
        self._drop_calls()
        self.app.connection_closed(self, reason)


class WsBridge:
    """The bridge's listener (a :class:`~qpc_core.rpc.Transport`)."""

    name = "ws_bridge"

    def __init__(self, app: App, cfg: WsBridgeConfig) -> None:
        s = app.settings
        self.app = app
        self.cfg = cfg
        self.dispatcher = Dispatcher(app)
        self.max_payload = s.max_payload_bytes
        # A bigger message is not read (close 1009, message too big): a connection holds at
        # most one message in progress of this size.
        self.max_message = s.max_payload_bytes + wire.OVERHEAD
        self.preauth_max_message = (
            min(s.max_unauthenticated_payload_bytes, s.max_payload_bytes) + wire.OVERHEAD)
        self.calls_per_connection = s.max_concurrent_bidi_streams
        self.request_budget = s.max_request_buffer_bytes
        self.conns: set[BridgeConnection] = set()
        self.per_ip: dict[str, int] = {}
        self.calls: set[asyncio.Task[None]] = set()
        self.pushes_dropped = 0
        self.refused: dict[str, int] = {}
        self.address: tuple[str, int] | None = None
        self.accepting = False
        self._server: Server | None = None
        self._ssl: ssl.SSLContext | None = None  # wss:// only: the listening context
        self._current_ssl: ssl.SSLContext | None = None  # the newest (see _ssl_context)
        #: The certificate new wss:// connections get (None with plain ws://).
        self.tls_certificate: x509.Certificate | None = None
        self._proxies = self._networks(cfg)
        self._client_js: bytes | None = None
        self._opaque_js: bytes | None = None
        self.half_open: dict[str, int] = {}  # TCP connections not yet upgraded, per IP
        self.half_open_total = 0

    @staticmethod
    def _networks(cfg: WsBridgeConfig) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(p, strict=False) for p in cfg.trusted_proxies]

    def configure(self, cfg: WsBridgeConfig) -> None:
        """A configuration reload: origins, trusted proxies and the connection cap apply to
        connections opened from now on (the other keys keep their running values)."""
        self._proxies = self._networks(cfg)
        self.cfg = cfg

    @property
    def ready(self) -> bool:
        return self.accepting

    # -- lifecycle --------------------------------------------------------------------------
    async def start(self, app: App) -> None:
        host, port = parse_hostport(self.cfg.listen)
        if self.cfg.serve_client_js:
            static = resources.files("qpc_ws_bridge") / "static"
            self._client_js = (static / "qpc.js").read_bytes()
            opaque = static / OPAQUE_JS
            if opaque.is_file():
                self._opaque_js = opaque.read_bytes()
                digest = base64.b64encode(hashlib.sha384(self._opaque_js).digest()).decode()
                log.info("ws_bridge: serving %s, integrity sha384-%s (pin it in pages with "
                         "<script integrity=... crossorigin>)", OPAQUE_JS, digest)
            else:
                log.warning("ws_bridge: %s (the browser OPAQUE client) is not built, so "
                            "browsers cannot log in with a password here: run `make install`"
                            " (or `npm ci && npm run build` in plugins/ws_bridge/js)", OPAQUE_JS)
        keepalive = app.settings.keepalive_interval_secs or None
        self._server = await serve(
            self._handle, host, port,
            create_connection=self._connection_factory(),
            ssl=self._ssl_context(self._tls_files()) if self.cfg.tls else None,
            # asyncio counts a connection only after its TLS handshake: that stage is bounded
            # by this timeout (and the listen backlog), not by the half-open caps.
            ssl_handshake_timeout=min(app.settings.handshake_timeout_secs, 10.0)
            if self.cfg.tls else None,
            process_request=self._admit,
            subprotocols=[wire.SUBPROTOCOL],  # type: ignore[list-item]
            compression=None,  # ciphertext does not compress; no deflate state per connection
            max_size=self.preauth_max_message,
            max_queue=4,
            open_timeout=app.settings.handshake_timeout_secs,
            # Pings keep idle connections open through NATs and proxies; liveness is judged by
            # any bytes received (_stall_check), since a pong waits behind a frame in progress.
            ping_interval=keepalive, ping_timeout=None,
            close_timeout=5,
            server_header=None,
        )
        sock = next(iter(self._server.sockets))
        self.address = sock.getsockname()[:2]
        self.accepting = True
        scheme = "wss" if self.cfg.tls else "ws"
        log.info("WebSocket bridge listening on %s://%s:%d%s", scheme, self.address[0],
                 self.address[1], self.cfg.path)

    def _tls_files(self) -> tuple[Path, Path, x509.Certificate]:
        """The server's certificate and key (``tls_cert``/``tls_key``, checked as at
        start-up), written as PEM files the ``ssl`` module can load."""
        s = self.app.settings
        tls = resolve_tls(s.data_dir, s.tls_cert, s.tls_key, production=s.production)
        out = self.app.data_dir / "ws_bridge"
        out.mkdir(mode=0o700, exist_ok=True)
        cert = out / "cert.pem"
        key = out / "key.pem"
        chain = b"".join(c.public_bytes(Encoding.PEM) for c in (tls.certificate, *tls.chain))
        write_atomic(cert, chain, 0o644)
        write_atomic(key, tls.private_key.private_bytes(
            Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), 0o600)
        return cert, key, tls.certificate

    @staticmethod
    def _new_context(cert: Path, key: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        return ctx

    def _ssl_context(self, files: tuple[Path, Path, x509.Certificate]) -> ssl.SSLContext:
        """The listening context.  A reload builds a whole new context (loading a pair into
        a context that has one adds it beside the old when the key types differ: clients
        would still be served the old certificate) and this one's server-name callback,
        which OpenSSL runs on every ClientHello, with or without SNI, hands each new
        connection to the newest context."""
        cert, key, self.tls_certificate = files
        ctx = self._ssl = self._current_ssl = self._new_context(cert, key)

        def newest(sslobj: ssl.SSLObject, _name: str | None, current: ssl.SSLContext) -> None:
            newest_ctx = self._current_ssl
            if newest_ctx is not None and newest_ctx is not current:
                sslobj.context = newest_ctx

        ctx.sni_callback = newest
        return ctx

    async def reload_tls(self) -> x509.Certificate | None:
        """``wss://``: serve the server's certificate files, read again, to new connections
        (established connections keep theirs).  ConfigError, and the old pair, when they
        are bad or not valid now."""
        if self._ssl is None:
            return None
        cert, key, certificate = await asyncio.to_thread(self._tls_files)
        check_valid_now(certificate)
        self._current_ssl = await asyncio.to_thread(self._new_context, cert, key)
        self.tls_certificate = certificate
        return certificate

    async def stop_accepting(self) -> None:
        """Refuse new connections and tell connected clients the server is going away."""
        self.accepting = False
        if self._server is not None:
            self._server.server.close()  # the listening socket only; connections go on
        data = common_pb2.ServerShuttingDownEvent(reason="server shutting down")
        for conn in list(self.conns):
            conn.push(PushEvent.SERVER_SHUTTING_DOWN, data.SerializeToString())

    async def flush(self, timeout: float) -> None:
        """Until answers of calls that finished are written (or ``timeout``)."""
        pending = [t for c in self.conns for t in (*c.running, *c._writes, *c._pushes)]
        if pending:
            await asyncio.wait(pending, timeout=max(0.0, timeout))

    async def close(self, reason: str) -> None:
        self.accepting = False
        # Calls still running after the drain: stopped now, before storage closes under them.
        calls = list(self.calls)
        for task in calls:
            task.cancel()
        if calls:
            await asyncio.gather(*calls, return_exceptions=True)
        if self._server is None:
            return
        self._server.close(close_connections=True, code=CLOSE_GOING_AWAY,
                           reason=_close_reason(reason))
        try:
            await asyncio.wait_for(self._server.wait_closed(), 10)
        except TimeoutError:
            log.warning("WebSocket bridge: connections still open after 10 s of closing")
        self._server = None

    # -- admission --------------------------------------------------------------------------
    def _connection_factory(self) -> type[ServerConnection]:
        """websockets' connection class, counting TCP connections not yet upgraded: beyond
        :data:`HALF_OPEN_MAX` in all, or :data:`HALF_OPEN_PER_IP` from one address (not a
        trusted proxy), a new one is dropped at once instead of being held until
        ``handshake_timeout_secs``."""
        bridge = self

        class Counted(ServerConnection):
            upgrading_ip: str | None = None
            last_received = 0.0

            def data_received(self, data: bytes) -> None:
                self.last_received = time.monotonic()
                super().data_received(data)

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                super().connection_made(transport)
                peer = transport.get_extra_info("peername")
                ip = str(peer[0]) if peer else "unknown"
                per_ip = bridge.half_open.get(ip, 0)
                if (bridge.half_open_total >= HALF_OPEN_MAX
                        or (per_ip >= HALF_OPEN_PER_IP and not bridge._trusted(ip))):
                    bridge.refused["handshake limit"] = (
                        bridge.refused.get("handshake limit", 0) + 1)
                    cast(asyncio.Transport, transport).abort()
                    return
                self.upgrading_ip = ip
                self.last_received = time.monotonic()
                bridge.half_open[ip] = per_ip + 1
                bridge.half_open_total += 1

            def connection_lost(self, exc: Exception | None) -> None:
                bridge.upgraded(self)
                super().connection_lost(exc)

        return Counted

    def upgraded(self, ws: ServerConnection) -> None:
        """``ws`` left the opening handshake (upgraded, refused or gone)."""
        ip = getattr(ws, "upgrading_ip", None)
        if ip is None:
            return
        ws.upgrading_ip = None  # type: ignore[attr-defined]
        self.half_open_total -= 1
        n = self.half_open.get(ip, 1) - 1
        if n > 0:
            self.half_open[ip] = n
        else:
            self.half_open.pop(ip, None)

    def client_address(self, ws: ServerConnection, headers: Headers) -> str:
        """The client's IP (canonical text): the TCP peer, or behind trusted proxies the last
        ``X-Forwarded-For`` entry that is not one of them.  An entry that is not an address
        (``ip:port`` forms are accepted) ends the walk at the last trusted hop."""
        peer = ws.remote_address[0] if ws.remote_address else None
        host = _canonical_ip(str(peer)) if peer is not None else None
        if host is None:
            return "unknown"
        if not self._proxies or not self._trusted(host):
            return host
        forwarded = [a.strip() for v in headers.get_all("X-Forwarded-For") for a in v.split(",")]
        for entry in reversed(forwarded):
            addr = _canonical_ip(entry)
            if addr is None:
                break
            if not self._trusted(addr):
                return addr
            host = addr
        return host

    def _trusted(self, addr: str) -> bool:
        ip = _canonical_ip(addr)
        return ip is not None and any(
            ipaddress.ip_address(ip) in net for net in self._proxies)

    def _refuse(self, ws: ServerConnection, status: int, why: str) -> Response:
        self.refused[why.split(":")[0]] = self.refused.get(why.split(":")[0], 0) + 1
        log.debug("WebSocket upgrade refused (%d): %s", status, why)
        return ws.respond(status, why + "\n")

    def _admit(self, ws: ServerConnection, request: Request) -> Response | None:
        for name in ("Host", "Origin"):
            if len(request.headers.get_all(name)) > 1:
                return self._refuse(ws, 400, f"repeated header: more than one {name} header")
        path = request.path.split("?", 1)[0]
        base = self.cfg.path
        script = {"qpc.js": self._client_js, OPAQUE_JS: self._opaque_js}.get(
            path[len(base.rstrip("/")) + 1:]) if path.startswith(base.rstrip("/") + "/") else None
        if script is not None:
            return Response(200, "OK", Headers([
                ("Content-Type", "text/javascript; charset=utf-8"),
                ("Content-Length", str(len(script))),
                ("Cache-Control", "no-cache"),
                ("X-Content-Type-Options", "nosniff"),
                # Public files: pages of any origin may load them with integrity= (SRI
                # needs a CORS-enabled response), so a page can refuse a changed script.
                ("Access-Control-Allow-Origin", "*"),
            ]), script)
        if path != base:
            return self._refuse(ws, 404, f"not found: the WebSocket endpoint is {base}")
        host = _one(request.headers, "Host").lower()
        if self.cfg.public_hosts and host not in self.cfg.public_hosts:
            return self._refuse(ws, 421, f"host: this bridge does not serve {host!r}")
        origin = _one(request.headers, "Origin") or None
        allowed = self.cfg.allowed_origins
        # No Origin header: not a browser (browsers always send one on a WebSocket upgrade).
        if allowed is not None and origin is not None and origin not in allowed:
            return self._refuse(ws, 403, f"origin: pages of {origin!r} may not connect here")
        if not self.accepting or self.app.draining:
            return self._refuse(ws, 503, "shutting down: server shutting down")
        offered = [p.strip() for v in request.headers.get_all("Sec-WebSocket-Protocol")
                   for p in v.split(",")]
        if wire.SUBPROTOCOL not in offered:
            return self._refuse(ws, 400, f"subprotocol: offer the subprotocol "
                                f"{wire.SUBPROTOCOL!r} (Sec-WebSocket-Protocol)")
        if len(self.conns) >= self.cfg.max_connections:
            return self._refuse(ws, 503, "connection limit: too many WebSocket connections")
        ip = self.client_address(ws, request.headers)
        if self.per_ip.get(ip, 0) >= self.app.settings.max_connections_per_ip:
            return self._refuse(ws, 503, "per-IP connection limit: too many connections "
                                "from this address")
        return None

    # -- connections ------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        self.upgraded(ws)
        t0 = time.perf_counter()
        assert ws.request is not None
        headers = ws.request.headers
        ip = self.client_address(ws, headers)
        port = int(ws.remote_address[1]) if ws.remote_address else 0
        # Admission ran before the upgrade; connections that completed it since count now.
        if (len(self.conns) >= self.cfg.max_connections
                or self.per_ip.get(ip, 0) >= self.app.settings.max_connections_per_ip):
            await ws.close(CLOSE_POLICY, "connection limit")
            return
        conn = BridgeConnection(self, ws, PeerInfo(ip, port),
                                host_binding(_one(headers, "Host")))
        self.conns.add(conn)
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
        app = self.app
        app.connection_opened(conn)
        app.hooks.on_handshake_completed(app, conn, time.perf_counter() - t0)
        reason = "connection lost"
        try:
            reason = await conn.serve()
        finally:
            conn.terminated(reason)
            self.conns.discard(conn)
            n = self.per_ip.get(ip, 1) - 1
            if n > 0:
                self.per_ip[ip] = n
            else:
                self.per_ip.pop(ip, None)
