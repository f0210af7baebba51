"""The QUIC listener: a thin aioquic layer turning stream events into framed RPC calls.

* One client-opened bidirectional stream per RPC: request frame + FIN in, response + FIN out.
* The first bidi stream (id 0) may instead carry the connection auth handshake (``0x01``).
* Server push uses server-opened unidirectional streams.
* Per-stream state lives in ``ServerConnection.streams`` and is dropped when the response
  is sent, when the stream is reset, and when the connection ends.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from typing import TYPE_CHECKING, Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol

from qpc_core.config import parse_hostport
from qpc_core.dispatch import Dispatcher, error_response
from qpc_core.framing import (
    AUTH_MAGIC,
    AuthHandshakeDecoder,
    FrameError,
    PushEvent,
    RequestDecoder,
    Status,
    encode_auth_reply,
    encode_push,
)
from qpc_core.pb import common_pb2
from qpc_core.rpc import AuthResult, PeerInfo
from qpc_core.transport.backend import (
    Backend,
    DatagramDrain,
    TurnBatching,
    load_backend,
    peer_address,
    set_stream_limits,
)
from qpc_core.transport.certs import resolve_tls

if TYPE_CHECKING:
    from qpc_core.app import App

log = logging.getLogger("qpc.quic")

ALPN = "qpc"
_conn_ids = itertools.count(1)

# QUIC application error codes used when closing (0 = no error).
ERR_NONE = 0
ERR_PROTOCOL = 0x101
ERR_CONNECTION_LIMIT = 0x102
ERR_SHUTDOWN = 0x103


class _Stream:
    __slots__ = ("dead", "decoder", "task")

    def __init__(self, decoder: RequestDecoder | AuthHandshakeDecoder | None) -> None:
        self.decoder = decoder
        self.task: asyncio.Task[None] | None = None
        # A stream that had a protocol error stays here until the peer finishes or resets it,
        # so bytes still arriving on it are discarded instead of read as a new request.
        self.dead = decoder is None


if TYPE_CHECKING:
    _ProtocolBase = QuicConnectionProtocol
else:
    _ProtocolBase = object


class _ServerConnectionLogic(TurnBatching, _ProtocolBase):
    """One client connection.  Implements :class:`qpc_core.rpc.Connection`.

    Written against the asyncio protocol API that aioquic and qh3 share; the concrete classes
    (:class:`ServerConnection` for aioquic, one made by :func:`connection_class` for qh3) add
    the library's ``QuicConnectionProtocol`` as the next base."""

    def __init__(self, *args: Any, app: App, listener: QuicTransport, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = app.settings
        self.app = app
        self.listener = listener
        self.dispatcher = listener.dispatcher
        self.streams: dict[int, _Stream] = {}
        self._connection_id = next(_conn_ids)
        self._auth: AuthResult | None = None
        self._identity: bytes | None = None
        self.challenge: bytes | None = None
        self._peer: PeerInfo | None = None
        self._opened = False
        self._gone = False
        self._created = time.perf_counter()
        self._last_activity = time.monotonic()
        self._keepalive: asyncio.TimerHandle | None = None
        # Transport parameters are sent in the handshake, after this constructor: the
        # configured stream concurrency is what the client is allowed (RFC 9000 §4.6).
        if not set_stream_limits(
            self._quic, s.max_concurrent_bidi_streams, s.max_concurrent_uni_streams
        ):
            raise RuntimeError("this QUIC library does not let qpc set its stream limits")
        self.max_payload = s.max_payload_bytes

    # -- Connection protocol for plugins -----------------------------------------------------------
    @property
    def connection_id(self) -> int:
        return self._connection_id

    @property
    def peer(self) -> PeerInfo:
        if self._peer is None:
            addr = peer_address(self._quic)
            if addr is None:
                return PeerInfo("unknown", 0)
            self._peer = PeerInfo(*addr)
        return self._peer

    @property
    def auth(self) -> AuthResult | None:
        return self._auth

    @property
    def identity_key(self) -> bytes | None:
        return self._identity

    def bind(self, auth: AuthResult) -> None:
        self._auth = auth
        if auth.identity_key is not None:
            self.bind_identity(auth.identity_key)

    def unbind(self) -> None:
        """Forget the connection's credential and identity (logout, account deletion)."""
        self._auth = None
        if self._identity is not None:
            self.app.unbind_identity(self, self._identity)
            self._identity = None

    def bind_identity(self, identity_key: bytes) -> None:
        if self._identity == identity_key:
            return
        if self._identity is not None:
            self.app.unbind_identity(self, self._identity)
        self._identity = identity_key
        self.app.bind_identity(self, identity_key)

    def push(self, event_type: int, payload: bytes) -> None:
        if self._gone:
            return
        sid = self._quic.get_next_available_stream_id(is_unidirectional=True)
        self._quic.send_stream_data(sid, encode_push(event_type, payload), end_stream=True)
        self.send_soon()

    def disconnect(self, reason: str, error_code: int = ERR_NONE) -> None:
        if not self._gone:
            self.transmit()  # flush responses and pushes queued for this loop turn first
            self._quic.close(error_code=error_code, reason_phrase=reason)
            self.transmit()

    # -- aioquic events ----------------------------------------------------------------------------
    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        # Answers, pushes and what this datagram calls for leave together at the end of the
        # loop turn (TurnBatching), so responses produced together share packets.
        self.receive_batched(data, addr, self._answering)

    def _answering(self) -> bool:
        """Requests are being answered (their answers will carry the ACK) and none is still
        arriving (a partly received request, e.g. an upload, needs the prompt ACK)."""
        busy = False
        for st in self.streams.values():
            if st.task is not None:
                busy = True
            elif not st.dead:
                return False
        return busy

    def quic_event_received(self, event: Any) -> None:
        # By class name: aioquic and qh3 have separate but identically named event classes.
        kind = type(event).__name__
        if kind == "StreamDataReceived":
            self._last_activity = time.monotonic()
            self._on_stream_data(event.stream_id, event.data, event.end_stream)
        elif kind == "StreamReset":
            st = self.streams.pop(event.stream_id, None)
            if st is not None and st.task is not None:
                st.task.cancel()
        elif kind == "HandshakeCompleted":
            self._on_handshake()
        elif kind == "ConnectionTerminated":
            self._on_terminated(event.reason_phrase or f"error {event.error_code}")

    def _on_handshake(self) -> None:
        app = self.app
        if not self.listener.accepting:
            self.disconnect("server shutting down", ERR_SHUTDOWN)
            return
        if len(app.connections) >= app.settings.max_connections:
            self.disconnect("server at connection limit", ERR_CONNECTION_LIMIT)
            return
        self._opened = True
        self.listener.protocols.add(self)
        app.connection_opened(self)
        app.hooks.on_handshake_completed(app, self, time.perf_counter() - self._created)
        interval = app.settings.keepalive_interval_secs
        if interval > 0:
            self._keepalive = self._loop.call_later(interval, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        """Ping idle connections so healthy clients are not dropped by idle timeouts."""
        if self._gone:
            return
        interval = self.app.settings.keepalive_interval_secs
        if time.monotonic() - self._last_activity >= interval:
            self._quic.send_ping(0)
            self.transmit()
        self._keepalive = self._loop.call_later(interval, self._keepalive_tick)

    def _on_terminated(self, reason: str) -> None:
        if self._gone:
            return
        self._gone = True
        if self._keepalive is not None:
            self._keepalive.cancel()
        for st in self.streams.values():
            if st.task is not None:
                st.task.cancel()
        self.streams.clear()
        self.listener.protocols.discard(self)
        if self._opened:
            self.app.connection_closed(self, reason)

    # -- streams ----------------------------------------------------------------------------------
    def _on_stream_data(self, sid: int, data: bytes, fin: bool) -> None:
        if sid & 0x2:  # unidirectional: clients have nothing to say on those
            if sid & 0x1 == 0:
                self._quic.stop_stream(sid, ERR_PROTOCOL)
            return
        st = self.streams.get(sid)
        if st is None:
            if self._gone:
                return
            decoder: RequestDecoder | AuthHandshakeDecoder
            if sid == 0 and data[:1] == bytes([AUTH_MAGIC]):
                decoder = AuthHandshakeDecoder()
            else:
                decoder = RequestDecoder(self.max_payload)
            st = self.streams[sid] = _Stream(decoder)
        elif st.dead:
            if fin:
                del self.streams[sid]
            return
        elif st.task is not None:
            if data:  # bytes after the frame while the call runs
                self._stream_error(sid, FrameError("trailing", "unexpected bytes after the frame"))
            return
        assert st.decoder is not None
        try:
            st.decoder.feed(data)
            if not fin:
                return
            if isinstance(st.decoder, AuthHandshakeDecoder):
                token = st.decoder.finish()
                st.task = self._loop.create_task(self._handshake(sid, token))
            else:
                frame = st.decoder.finish()
                st.task = self._loop.create_task(self._call(sid, frame))
        except FrameError as e:
            self._stream_error(sid, e, fin)

    def _stream_error(self, sid: int, err: FrameError, fin: bool = False) -> None:
        """Protocol error confined to one stream: answer it, stop it; the connection lives."""
        st = self.streams.pop(sid, None)
        if st is not None and st.task is not None:
            st.task.cancel()
        if not fin:
            self.streams[sid] = _Stream(None)
        log.debug("stream %d protocol error: %s", sid, err)
        try:
            self._quic.send_stream_data(
                sid,
                error_response(0, Status.PROTOCOL_ERROR, f"protocol error: {err}"),
                end_stream=True,
            )
            self._quic.stop_stream(sid, ERR_PROTOCOL)
        except (ValueError, AssertionError):  # stream already finished on our side
            pass
        self.transmit()

    def _owns(self, sid: int) -> bool:
        """True while the running task still owns stream ``sid`` (not reset or failed)."""
        st = self.streams.get(sid)
        return not self._gone and st is not None and not st.dead and st.task is not None

    async def _call(self, sid: int, frame: Any) -> None:
        try:
            out = await self.dispatcher.call(self, frame)
            if self._owns(sid):
                self._quic.send_stream_data(sid, out, end_stream=True)
                self.send_soon()
        finally:
            st = self.streams.get(sid)
            if st is not None and not st.dead:
                del self.streams[sid]

    async def _handshake(self, sid: int, token: bytes) -> None:
        app = self.app
        try:
            status = Status.OK
            try:
                result = await app.hooks.authenticate(app, token, self.peer)
            except Exception as e:  # Unauthenticated from a plugin, or a plugin bug
                from qpc_core.errors import RpcError

                if not isinstance(e, RpcError):
                    log.exception("authenticate hook failed")
                result = None
            if result is None:
                status = Status.UNAUTHENTICATED
            else:
                self.bind(result)
            if self._owns(sid):
                self._quic.send_stream_data(sid, encode_auth_reply(status), end_stream=True)
                self.send_soon()
        finally:
            st = self.streams.get(sid)
            if st is not None and not st.dead:
                del self.streams[sid]


class ServerConnection(_ServerConnectionLogic, QuicConnectionProtocol):
    """A client connection on aioquic (the default backend)."""


def connection_class(backend: Backend) -> type[_ServerConnectionLogic]:
    if backend.name == "aioquic":
        return ServerConnection
    return cast(type[_ServerConnectionLogic], backend.bind(_ServerConnectionLogic))


class QuicTransport:
    """The client-facing QUIC listener (registered by the built-in ``core`` plugin)."""

    name = "quic"

    def __init__(self) -> None:
        self.server: Any = None  # the backend's QuicServer
        self.backend: Backend | None = None
        self._drain: DatagramDrain | None = None
        self.protocols: set[_ServerConnectionLogic] = set()
        self.accepting = False
        self.dispatcher: Dispatcher
        self.address: tuple[str, int] | None = None

    @property
    def ready(self) -> bool:
        return self.server is not None and self.accepting

    def configuration(self, app: App, backend: Backend | None = None) -> Any:
        s = app.settings
        backend = backend or load_backend("aioquic")
        tls = resolve_tls(s.data_dir, s.tls_cert, s.tls_key, production=s.production)
        cfg = backend.configuration(
            tls,
            alpn_protocols=[ALPN],
            idle_timeout=s.max_idle_timeout_secs,
            max_data=16 * 1024 * 1024,
            max_stream_data=max(s.max_payload_bytes + 64, 1024 * 1024),
        )
        keylog = os.environ.get("SSLKEYLOGFILE")
        if keylog:
            cfg.secrets_log_file = open(keylog, "a")  # noqa: SIM115 - lives with the server
        return cfg

    async def start(self, app: App) -> None:
        self.dispatcher = Dispatcher(app)
        s = app.settings
        host, port = parse_hostport(s.listen)
        backend = self.backend = load_backend(s.quic_backend)
        cfg = self.configuration(app, backend)
        cls = connection_class(backend)

        def factory(*args: Any, **kwargs: Any) -> _ServerConnectionLogic:
            return cls(*args, app=app, listener=self, **kwargs)

        self.server = server = await backend.serve(
            host, port, configuration=cfg, create_protocol=factory
        )
        assert server._transport is not None
        # Read every datagram already queued per wake-up (see DatagramDrain): requests that
        # arrive together are handled in one loop turn and share a commit and packets.
        drain = self._drain = DatagramDrain(server._transport)
        receive = server.datagram_received

        def datagram_received(data: bytes | str, addr: Any) -> None:
            receive(data, addr)
            drain.drain(receive)

        server.datagram_received = datagram_received
        sockname = server._transport.get_extra_info("sockname")
        self.address = (sockname[0], sockname[1])
        self.accepting = True
        log.info("QUIC listening on %s:%d (ALPN %s, %s)", self.address[0], self.address[1], ALPN,
                 backend.name)

    async def stop_accepting(self) -> None:
        """Refuse new connections and tell connected clients the server is going away."""
        self.accepting = False
        payload = common_pb2.ServerShuttingDownEvent(reason="server shutting down")
        data = payload.SerializeToString()
        for proto in list(self.protocols):
            proto.push(PushEvent.SERVER_SHUTTING_DOWN, data)

    async def close(self, reason: str) -> None:
        self.accepting = False
        protocols = list(self.protocols)
        for proto in protocols:
            proto.disconnect(reason, ERR_SHUTDOWN)
        if protocols:
            # Give close frames a moment to leave; wait_closed ends when aioquic is done.
            await asyncio.wait(
                [asyncio.ensure_future(p.wait_closed()) for p in protocols], timeout=1.0
            )
        for proto in protocols:
            proto._on_terminated(reason)
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._drain is not None:
            self._drain.close()
            self._drain = None
