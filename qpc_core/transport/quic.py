"""The QUIC listener: a thin aioquic layer turning stream events into framed RPC calls.

* One client-opened bidirectional stream per RPC: request frame + FIN in, response + FIN out.
* The first bidi stream (id 0) may instead carry the connection auth handshake (``0x01``).
* Server push uses server-opened unidirectional streams.
* Per-stream state lives in ``ServerConnection.streams`` and is dropped when the response
  is sent, when the stream is reset, and when the connection ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from aioquic.asyncio.protocol import QuicConnectionProtocol
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from qpc_core.config import parse_hostport
from qpc_core.dispatch import Dispatcher, error_response
from qpc_core.framing import (
    AUTH_MAGIC,
    MAX_PAYLOAD,
    AuthHandshakeDecoder,
    FrameError,
    PushEvent,
    RequestDecoder,
    Status,
    encode_auth_reply,
    encode_push,
)
from qpc_core.framing.frames import REQUEST_HEADER
from qpc_core.identity import certificate_binding
from qpc_core.pb import common_pb2
from qpc_core.rpc import AuthResult, Connection, PeerInfo, RpcMethod, new_connection_id
from qpc_core.transport.backend import (
    Backend,
    DatagramDrain,
    SlidingLimit,
    TurnBatching,
    cap_receive_windows,
    load_backend,
    local_uni_streams,
    own_certificate_der,
    peer_address,
    peer_certificates,
    receive_buffered,
    request_client_certificate,
    retry_handler,
    send_pending,
    set_stream_limits,
    uni_stream_credit,
)
from qpc_core.transport.certs import TlsMaterial, check_valid_now, resolve_tls
from qpc_core.transport.credentials import ConnectionCredentials

if TYPE_CHECKING:
    from qpc_core.app import App

log = logging.getLogger("qpc.quic")

ALPN = "qpc"

# QUIC application error codes used when closing (0 = no error).
ERR_NONE = 0
ERR_PROTOCOL = 0x101
ERR_CONNECTION_LIMIT = 0x102
ERR_SHUTDOWN = 0x103
ERR_AUTH_TIMEOUT = 0x104
ERR_HANDSHAKE_TIMEOUT = 0x105
ERR_PEER_CERTIFICATE = 0x106

#: Largest auth handshake frame (``0x01 | len u16 | token``).
AUTH_FRAME_MAX = 3 + 0xFFFF
#: Admission verdicts for a datagram that would open a connection.
PASS, DROP, RETRY = 0, 1, 2
#: A token-bearing Initial is sent down the Retry path only this long after the last token
#: was handed out (none can be valid later; forged ones would cost a validation each).
RETRY_TOKEN_WINDOW_SECS = 60.0
#: Connections from one IP still mid-handshake beyond which new ones must pass a QUIC Retry
#: (prove they own the address) when Retry is available: forged Initials cannot lock an
#: address out.
PER_IP_HALF_OPEN_BEFORE_RETRY = 8


def _has_token(data: bytes) -> bool:
    """A QUIC v1 or v2 (RFC 9369) Initial packet carrying a (Retry) token."""
    try:
        version = data[1:5]
        kind = data[0] & 0xB0
        if not ((version == b"\x00\x00\x00\x01" and kind == 0x80)  # v1 Initial
                or (version == b"\x6b\x33\x43\xcf" and kind == 0x90)):  # v2 Initial
            return False
        pos = 5
        pos += 1 + data[pos]  # destination connection id
        pos += 1 + data[pos]  # source connection id
        first = data[pos]
        size = 1 << (first >> 6)  # variable-length integer (RFC 9000 16)
        length = first & 0x3F
        for b in data[pos + 1:pos + size]:
            length = (length << 8) | b
        return length > 0
    except IndexError:
        return False


def _refuse_bad_tokens_quietly(handler: Any) -> None:
    """The libraries' servers treat ValueError from a Retry token check as "bad token"; qh3's
    handler raises its own crypto error on a forged token, which escaped the receive
    callback (a traceback per packet, and the rest of that batch of datagrams skipped)."""
    validate_token = handler.validate_token

    def validate_token_safely(*args: Any, **kwargs: Any) -> Any:
        try:
            return validate_token(*args, **kwargs)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"invalid retry token: {e}") from None

    handler.validate_token = validate_token_safely


def _count(counts: dict[str, int], key: str, delta: int) -> None:
    n = counts.get(key, 0) + delta
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)


#: At shutdown, answers not yet acknowledged are waited for only on connections heard from
#: within this many seconds.
FLUSH_SILENT_SECS = 2.0
#: Handshakes in progress a listener with its own ``max_connections`` admits at most.
OWN_CAP_HALF_OPEN = 256
#: ... and from one address at most.
OWN_CAP_HALF_OPEN_PER_IP = 8
#: Pushes (server-opened uni streams) a connection may have unacknowledged; more are dropped.
MAX_PUSH_BACKLOG = 64


class _Stream:
    __slots__ = ("cancellable", "dead", "decoder", "head", "last", "reserved", "started", "task")

    def __init__(
        self, decoder: RequestDecoder | AuthHandshakeDecoder | None, started: float = 0.0
    ) -> None:
        self.decoder = decoder
        self.task: asyncio.Task[None] | None = None
        # Whether the client going away (stream reset, STOP_SENDING, connection lost) cancels
        # the call: only for methods that opt in (long polls); others run to completion so
        # a handler is never stopped between two writes.
        self.cancellable = True
        # A stream that had a protocol error stays here until the peer finishes or resets it,
        # so bytes still arriving on it are discarded instead of read as a new request.
        self.dead = decoder is None
        # The request header's bytes until its length is known (None: checked, or no header).
        self.head: bytearray | None = (
            bytearray() if isinstance(decoder, RequestDecoder) else None
        )
        self.reserved = 0  # announced payload bytes of the request still arriving
        self.started = started  # loop time of the first byte (the newest is refused first)
        self.last = started  # loop time of the latest byte (request_receive_timeout_secs)


if TYPE_CHECKING:
    _ProtocolBase = QuicConnectionProtocol
else:
    _ProtocolBase = object


class _ServerConnectionLogic(ConnectionCredentials, TurnBatching, _ProtocolBase):
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
        self._connection_id = new_connection_id()
        self._init_credentials()
        self.challenge: bytes | None = None
        self._tls_binding: bytes | None = None  # see tls_binding
        self._peer: PeerInfo | None = None
        self._opened = False
        self._gone = False
        # Refused at the handshake (peer certificate): requests that arrived in the same
        # flight as the client's Finished are not run.
        self._refused = False
        self._created = time.perf_counter()
        self._last_activity = time.monotonic()
        self._last_heard = self._last_activity  # any datagram from the client
        self._keepalive: asyncio.TimerHandle | None = None
        # Transport parameters are sent in the handshake, after this constructor: the
        # configured stream concurrency is what the client is allowed (RFC 9000 §4.6).
        if not set_stream_limits(
            self._quic, s.max_concurrent_bidi_streams, s.max_concurrent_uni_streams
        ):
            raise RuntimeError("this QUIC library does not let qpc set its stream limits")
        self.max_payload = s.max_payload_bytes
        self.preauth_max_payload = min(s.max_unauthenticated_payload_bytes, s.max_payload_bytes)
        self.request_budget = s.max_request_buffer_bytes
        self.request_timeout = s.request_receive_timeout_secs
        self._reserved = 0  # sum of the streams' ``reserved``
        self._sweep: asyncio.TimerHandle | None = None
        self._auth_timer: asyncio.TimerHandle | None = None
        self._flushed: asyncio.Event | None = None
        self._detached = False
        # Receive windows that do not grow past what qpc will hold (see backend.py).
        self._max_data: SlidingLimit = cap_receive_windows(
            self._quic, listener.stream_window(s), self._receive_allowance
        )
        self._handshake_timer: asyncio.TimerHandle | None = self._loop.call_later(
            s.handshake_timeout_secs, self._handshake_expired
        )

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
    def tls_binding(self) -> bytes:
        """SHA-256 of the server certificate this connection's handshake presented: read
        from the connection's own TLS context (a certificate reload changes what later
        handshakes present, and the library re-creates the context for every Initial until
        one decrypts), fixed once the handshake is complete."""
        if self._tls_binding is not None:
            return self._tls_binding
        der = own_certificate_der(self._quic)
        if der is None:
            return self.listener.tls_binding
        binding = certificate_binding(der)
        if self._opened:  # handshake complete: its certificate can no longer change
            self._tls_binding = binding
        return binding

    def _unauthenticated(self) -> None:
        self._arm_auth_deadline()

    def _authenticated(self) -> None:
        if self._auth_timer is not None:
            self._auth_timer.cancel()
            self._auth_timer = None
        if not self._gone:
            self._max_data.raise_to_ceiling()  # the authenticated window, at once
            self.send_soon()

    def push(self, event_type: int, payload: bytes) -> None:
        """Pushes are hints: one the client cannot take now (no uni-stream credit, or
        :data:`MAX_PUSH_BACKLOG` pushes not yet acknowledged) is dropped, not queued."""
        if self._gone:
            return
        quic = self._quic
        if not uni_stream_credit(quic) or local_uni_streams(quic) >= MAX_PUSH_BACKLOG:
            self.listener.pushes_dropped += 1
            log.debug("connection %d: push %d dropped (client takes no more push streams now)",
                      self._connection_id, event_type)
            return
        sid = quic.get_next_available_stream_id(is_unidirectional=True)
        if self._send(sid, encode_push(event_type, payload)):
            self.send_soon()

    def disconnect(self, reason: str, error_code: int = ERR_NONE) -> None:
        if not self._gone:
            self.transmit()  # flush responses and pushes queued for this loop turn first
            self._quic.close(error_code=error_code, reason_phrase=reason)
            self.transmit()

    def transmit(self) -> None:
        if not self._detached:
            super().transmit()

    def _abort(self, reason: str, error_code: int) -> None:
        """Close and forget the connection now, without the closing period: the library's
        state goes at once (a peer that went silent mid-handshake needs none)."""
        if self._gone:
            return
        try:
            self._quic.close(error_code=error_code, reason_phrase=reason)
            self.transmit()
        except Exception:  # a connection that never got a packet has no path to send on
            log.debug("connection %d: close before abort failed", self._connection_id,
                      exc_info=True)
        self._detached = True
        timer = getattr(self, "_timer", None)
        if timer is not None:
            timer.cancel()
            self._timer = None
        self._connection_terminated_handler()  # the server forgets its connection ids
        self._on_terminated(reason)
        self._closed.set()

    # -- deadlines -----------------------------------------------------------------------------
    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self._opened and not self._gone:
            log.debug("connection %d: handshake not completed within %g s, dropped",
                      self._connection_id, self.app.settings.handshake_timeout_secs)
            self._abort("handshake timeout", ERR_HANDSHAKE_TIMEOUT)

    def _arm_auth_deadline(self) -> None:
        if self._opened and not self._gone and self._auth_timer is None:
            self._auth_timer = self._loop.call_later(
                self.app.settings.auth_timeout_secs, self._auth_expired
            )

    def _auth_expired(self) -> None:
        self._auth_timer = None
        if self._gone or self.authenticated:
            return
        secs = self.app.settings.auth_timeout_secs
        log.debug("connection %d: not authenticated within %g s, closed",
                  self._connection_id, secs)
        self.disconnect(f"not authenticated within {secs:g} s", ERR_AUTH_TIMEOUT)

    def _receive_allowance(self) -> int:
        """Bytes the connection window may be ahead of what was received: the window of the
        connection's auth state minus what is still held (library receive buffers, partly
        received requests)."""
        if self.authenticated:
            window = self.listener.window_authenticated
        else:
            window = self.listener.window_unauthenticated
        held = receive_buffered(self._quic)
        for st in self.streams.values():
            if isinstance(st.decoder, RequestDecoder):
                held += st.decoder.buffered
        return window - held

    # -- shutdown flush ---------------------------------------------------------------------------
    def sending(self) -> bool:
        """Data written to the peer is not yet all acknowledged."""
        return not self._gone and send_pending(self._quic)

    async def wait_sent(self) -> None:
        """Until every answer and push written so far is acknowledged (or the connection
        ends)."""
        if not self.sending():
            return
        if self._flushed is None:
            self._flushed = asyncio.Event()
        await self._flushed.wait()

    def _check_flushed(self) -> None:
        if self._flushed is not None and not self.sending():
            self._flushed.set()

    # -- aioquic events ----------------------------------------------------------------------------
    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        # Answers, pushes and what this datagram calls for leave together at the end of the
        # loop turn (TurnBatching), so responses produced together share packets.
        if self._detached:
            return
        self._last_heard = time.monotonic()
        self._max_data.invalidate()
        self.receive_batched(data, addr, self._answering)
        limit = self._max_data
        if limit.used >= limit.value and self.streams:
            self._break_stall()
        if self._flushed is not None:
            self._check_flushed()

    def _break_stall(self) -> None:
        """The client has used all the connection window and what the server holds leaves
        no room to grant more: if that is partly received requests, none of them can ever
        complete (a client pipelining more request bytes than ``max_request_buffer_bytes``).
        Refuse the newest of them until there is room again; the others go on."""
        if receive_buffered(self._quic):
            return  # a gap below received data: its retransmission needs no new credit
        while self._receive_allowance() <= 0:
            waiting = [
                (st.started, sid) for sid, st in self.streams.items()
                if not st.dead and st.task is None and isinstance(st.decoder, RequestDecoder)
            ]
            if not waiting:
                return
            _started, sid = max(waiting)
            self._stream_error(sid, FrameError(
                "busy",
                f"this connection's partly received requests filled max_request_buffer_bytes "
                f"({self.request_budget} bytes) and none could complete: this one, the "
                "newest, is refused; send it again (keep fewer request bytes in flight)",
            ))
        self._max_data.invalidate()
        self.send_soon()

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
            if st is not None:
                self._release(st)
                if st.task is not None:
                    self._cancel_call(st)
        elif kind == "StopSendingReceived":
            self._on_stop_sending(event.stream_id)
        elif kind == "HandshakeCompleted":
            self._on_handshake()
        elif kind == "ConnectionTerminated":
            self._on_terminated(event.reason_phrase or f"error {event.error_code}")

    def _on_handshake(self) -> None:
        app = self.app
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        if not self.listener.accepting:
            self.disconnect("server shutting down", ERR_SHUTDOWN)
            return
        if len(self.listener.protocols) >= self.listener._cap():
            self.disconnect("server at connection limit", ERR_CONNECTION_LIMIT)
            return
        if self.listener.established_from(self) >= app.settings.max_connections_per_ip:
            # (Retry-validated connections may have been admitted past the address's share)
            self.disconnect("per-IP connection limit", ERR_CONNECTION_LIMIT)
            return
        check = self.listener.peer_certificate_auth
        if check is not None:
            chain = peer_certificates(self._quic)
            why = "no client certificate"
            try:
                result = check(self, chain) if chain else None
            except Exception as e:
                why = str(e) or type(e).__name__
                result = None
            if result is None:
                self.listener.refused_peer(self.peer.host, why)
                self._refused = True
                self.disconnect("peer certificate refused", ERR_PEER_CERTIFICATE)
                return
            self._auth = result  # bound before any request can run
            self._authenticated()  # the authenticated receive window, no auth deadline
        self._opened = True
        self.listener.established(self)
        app.connection_opened(self)
        app.hooks.on_handshake_completed(app, self, time.perf_counter() - self._created)
        if not self.authenticated:
            self._arm_auth_deadline()
        interval = app.settings.keepalive_interval_secs
        if interval > 0:
            self._keepalive = self._loop.call_later(interval, self._keepalive_tick)

    def _keepalive_tick(self) -> None:
        """Ping idle connections so healthy clients are not dropped by idle timeouts.
        Only authenticated ones: an unauthenticated connection is not kept alive (and is
        closed at its auth deadline anyway)."""
        if self._gone:
            return
        interval = self.app.settings.keepalive_interval_secs
        if self.authenticated and time.monotonic() - self._last_activity >= interval:
            self._quic.send_ping(0)
            self.transmit()
        self._keepalive = self._loop.call_later(interval, self._keepalive_tick)

    def _on_terminated(self, reason: str) -> None:
        if self._gone:
            return
        self._gone = True
        for timer in (self._keepalive, self._handshake_timer, self._auth_timer, self._sweep):
            if timer is not None:
                timer.cancel()
        self._keepalive = self._handshake_timer = self._auth_timer = self._sweep = None
        self._stop_expiry()
        for st in self.streams.values():
            if st.task is not None:
                self._cancel_call(st)
        self.streams.clear()
        self._reserved = 0
        self.listener.forget(self)
        if self._flushed is not None:
            self._flushed.set()
        if self._opened:
            self.app.connection_closed(self, reason)

    # -- streams ----------------------------------------------------------------------------------
    def _on_stream_data(self, sid: int, data: bytes, fin: bool) -> None:
        if self._refused:
            return
        if sid & 0x2:  # unidirectional: clients have nothing to say on those
            if sid & 0x1 == 0:
                self._stop(sid)
            return
        st = self.streams.get(sid)
        if st is None:
            if self._gone:
                return
            decoder: RequestDecoder | AuthHandshakeDecoder
            if sid == 0 and data[:1] == bytes([AUTH_MAGIC]) and self.listener.token_auth:
                decoder = AuthHandshakeDecoder()
            else:
                decoder = RequestDecoder(self.max_payload)
            now = self._loop.time()
            st = self.streams[sid] = _Stream(decoder, now)
            if self._sweep is None:
                self._sweep = self._loop.call_at(now + self.request_timeout, self._sweep_requests)
        elif st.dead:
            if fin:
                del self.streams[sid]
            return
        elif st.task is not None:
            if data:  # bytes after the frame while the call runs
                self._stream_error(sid, FrameError("trailing", "unexpected bytes after the frame"))
            return
        assert st.decoder is not None
        if data:
            st.last = self._loop.time()
        try:
            if st.head is not None and data:
                self._check_header(st, data)
            st.decoder.feed(data)
            if not fin:
                return
            if isinstance(st.decoder, AuthHandshakeDecoder):
                token = st.decoder.finish()
                st.task = self._loop.create_task(self._handshake(sid, token))
            else:
                frame = st.decoder.finish()
                self._release(st)  # the request left the buffer for its handler
                entry = self.dispatcher.methods.get(frame.method_id)
                st.cancellable = entry is None or entry[1].cancel_on_disconnect
                st.task = task = self._loop.create_task(self._call(sid, frame))
                calls = self.listener.calls
                calls.add(task)
                task.add_done_callback(calls.discard)
        except FrameError as e:
            self._stream_error(sid, e, fin)

    def _check_header(self, st: _Stream, data: bytes) -> None:
        """Admit a request by its announced length, before any of its body is buffered."""
        assert st.head is not None
        hsize = REQUEST_HEADER.size
        st.head += data[: hsize - len(st.head)]
        if len(st.head) < hsize:
            return
        length = REQUEST_HEADER.unpack_from(st.head)[2]
        st.head = None
        if length > self.max_payload:
            return  # the decoder reports it (``oversize``)
        if length > self.preauth_max_payload and not self.authenticated:
            raise FrameError(
                "unauthenticated_oversize",
                f"payload length {length} exceeds the limit of {self.preauth_max_payload} "
                "bytes for a connection that has not authenticated (send the auth handshake "
                "first)",
            )
        st.reserved = length
        self._reserved += length

    def _release(self, st: _Stream) -> None:
        self._reserved -= st.reserved
        st.reserved = 0
        self._max_data.invalidate()

    def _sweep_requests(self) -> None:
        """Refuse requests that received no byte for ``request_receive_timeout_secs`` (a
        stalled sender holding buffer and a stream).  A slow sender that keeps sending is not
        cut off, however long its request takes."""
        self._sweep = None
        if self._gone:
            return
        now = self._loop.time()
        limit = self.request_timeout
        due_next: float | None = None
        for sid, st in list(self.streams.items()):
            if st.dead or st.task is not None:
                continue
            due = st.last + limit
            if due <= now:
                self._stream_error(
                    sid, FrameError("timeout", f"request stalled: no bytes for {limit:g} s")
                )
            elif due_next is None or due < due_next:
                due_next = due
        if due_next is not None:
            self._sweep = self._loop.call_at(due_next, self._sweep_requests)

    def _on_stop_sending(self, sid: int) -> None:
        """The client wants no answer on ``sid`` (the library has reset our side of it):
        cancel the call; bytes of a request still arriving are discarded."""
        st = self.streams.pop(sid, None)
        if st is None:
            return
        self._release(st)
        if st.task is not None:
            self._cancel_call(st)  # its request was complete (FIN seen): nothing more arrives
        elif not st.dead:
            self.streams[sid] = _Stream(None)
            self._stop(sid)

    @staticmethod
    def _cancel_call(st: _Stream) -> None:
        """The client no longer wants this call's answer: stop a call whose method opted in
        (``RpcMethod.cancel_on_disconnect``); any other call finishes, unanswered."""
        if st.task is not None and st.cancellable:
            st.task.cancel()

    def _send(self, sid: int, data: bytes) -> bool:
        """Write ``data`` + FIN on ``sid``; False when the stream can no longer carry it
        (reset by STOP_SENDING, already finished): a write never raises out of the
        transport."""
        try:
            self._quic.send_stream_data(sid, data, end_stream=True)
        except (ValueError, AssertionError, RuntimeError) as e:
            log.debug("connection %d: stream %d cannot be written: %s",
                      self._connection_id, sid, e)
            return False
        return True

    def _stop(self, sid: int) -> None:
        """STOP_SENDING ``sid`` (the peer should stop sending on it); never raises."""
        try:
            self._quic.stop_stream(sid, ERR_PROTOCOL)
        except (ValueError, AssertionError, RuntimeError):
            pass

    def _stream_error(self, sid: int, err: FrameError, fin: bool = False) -> None:
        """Protocol error confined to one stream: answer it, stop it; the connection lives."""
        st = self.streams.pop(sid, None)
        if st is not None:
            self._release(st)
            if st.task is not None:
                self._cancel_call(st)
        if not fin:
            self.streams[sid] = _Stream(None)
        log.debug("stream %d protocol error: %s", sid, err)
        if err.reason == "busy":  # not the client's fault: the same request may come again
            answer = error_response(0, Status.UNAVAILABLE, f"busy: {err}", retry_after=0.05)
        else:
            answer = error_response(0, Status.PROTOCOL_ERROR, f"protocol error: {err}")
        self._send(sid, answer)
        if not fin:
            self._stop(sid)
        self.transmit()

    def _owns(self, sid: int) -> bool:
        """True while the running task still owns stream ``sid`` (not reset or failed)."""
        st = self.streams.get(sid)
        return not self._gone and st is not None and not st.dead and st.task is not None

    async def _call(self, sid: int, frame: Any) -> None:
        try:
            out = await self.dispatcher.call(self, frame)
            if self._owns(sid) and self._send(sid, out):
                self.send_soon()
        finally:
            st = self.streams.get(sid)
            if st is not None and not st.dead:
                del self.streams[sid]

    async def _handshake(self, sid: int, token: bytes) -> None:
        try:
            # Refused tokens count against the IP's 'auth' budget (RATE_LIMITED beyond).
            status = await self.dispatcher.handshake(self, token)
            if self._owns(sid) and self._send(sid, encode_auth_reply(status)):
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


#: Checks a client certificate chain (leaf first) after the handshake of a mutual-TLS
#: listener: returns what the connection is bound to, or None / raises to refuse it.
PeerCertificateCheck = Callable[[Connection, list[x509.Certificate]], "AuthResult | None"]


class QuicTransport:
    """A QUIC RPC listener.  With no arguments: the client-facing listener (registered by the
    built-in ``core`` plugin) on ``listen``, ALPN ``qpc``, serving ``app.methods``.

    Plugins may start more (public API): ``listen`` (host:port), ``alpn``, ``tls`` (a function
    returning the listener's :class:`~qpc_core.transport.certs.TlsMaterial`; called at start
    and again, in a worker thread, on each certificate reload: re-read files there, or raise
    ConfigError to keep the old material), ``methods``
    (the method table served, ``{id: (plugin, RpcMethod)}``) and ``peer_certificate_auth``
    (mutual TLS: the client must present a certificate, which this function checks after the
    handshake; its :class:`~qpc_core.rpc.AuthResult` is bound to the connection, and the
    bearer-token handshake is not offered; aioquic backend only).  Every other limit
    (connections, per-IP, buffers, timeouts) is the server's.

    Admission: a datagram that would open a connection is dropped while the connections
    (established + mid-handshake) reach ``max_connections``, or those of its source IP reach
    ``max_connections_per_ip``; a connection still mid-handshake after
    ``handshake_timeout_secs`` is dropped; QUIC Retry per ``quic_retry``."""

    def __init__(
        self,
        *,
        name: str = "quic",
        listen: str | None = None,
        alpn: str = ALPN,
        tls: Callable[[App], TlsMaterial] | None = None,
        methods: Mapping[int, tuple[str, RpcMethod]] | None = None,
        peer_certificate_auth: PeerCertificateCheck | None = None,
        max_connections: int | None = None,
        retry: str | None = None,
    ) -> None:
        self.name = name
        #: QUIC Retry for this listener ("off" / "on" / "auto"); None: ``quic_retry``.
        self.retry = retry
        #: A cap of this listener's own (established + mid-handshake), instead of the
        #: server-wide ``max_connections`` over all client connections: a plugin listener
        #: whose clients must not be crowded out by the client port's.
        self.max_connections = max_connections
        self.listen = listen
        self.alpn = alpn
        self._tls = tls
        self._methods = methods
        self.peer_certificate_auth = peer_certificate_auth
        #: Whether the bearer-token handshake (``0x01`` on stream 0) is offered.
        self.token_auth = peer_certificate_auth is None
        self.server: Any = None  # the backend's QuicServer
        self.backend: Backend | None = None
        self._drain: DatagramDrain | None = None
        self.protocols: set[_ServerConnectionLogic] = set()  # handshake completed
        self.pending: set[_ServerConnectionLogic] = set()  # mid-handshake
        self._ips: dict[_ServerConnectionLogic, str] = {}
        self._per_ip: dict[str, int] = {}  # connections per client IP, mid-handshake included
        self._half_per_ip: dict[str, int] = {}  # ... of which still mid-handshake
        self._admitting: str | None = None  # the source IP of the datagram being received
        self.accepting = False
        self.dispatcher: Dispatcher
        self.address: tuple[str, int] | None = None
        self.window_authenticated = 16 * 1024 * 1024
        self.window_unauthenticated = 256 * 1024
        #: The certificate new connections are served (changed by :meth:`reload_tls`).
        self.tls_certificate: x509.Certificate | None = None
        self._cfg: Any = None  # the library's server configuration, shared by connections
        #: Running calls (their tasks), also those whose connection has ended.
        self.calls: set[asyncio.Task[None]] = set()
        self.initials_refused = 0
        self.peers_refused = 0
        self._peer_refused_logged = 0.0
        self.pushes_dropped = 0
        self._refused_logged = 0.0
        self._retry_mode = "off"
        self._retry_handler: Any = None
        self._retry_since = 0.0

    @property
    def ready(self) -> bool:
        return self.server is not None and self.accepting

    @property
    def tls_binding(self) -> bytes:
        """SHA-256 of the certificate new connections are served (what identity proofs made
        on them are bound to); b"" before the listener has one."""
        cert = self.tls_certificate
        return certificate_binding(cert.public_bytes(Encoding.DER)) if cert is not None else b""

    @staticmethod
    def stream_window(s: Any) -> int:
        """Receive window of a client-opened stream: one request frame at most (or the auth
        handshake on stream 0)."""
        payload = min(int(s.max_payload_bytes), MAX_PAYLOAD)
        return max(REQUEST_HEADER.size + payload, AUTH_FRAME_MAX)

    def _windows(self, s: Any) -> None:
        # Room for the announced payloads plus headers, the auth handshake and stray bytes.
        slack = AUTH_FRAME_MAX + 64 * 1024
        self.window_authenticated = s.max_request_buffer_bytes + slack
        # Never more than the authenticated window: the initial window is granted in the
        # handshake and a granted limit cannot be taken back.
        self.window_unauthenticated = min(
            4 * min(s.max_unauthenticated_payload_bytes, s.max_payload_bytes) + slack,
            self.window_authenticated,
        )

    def configuration(self, app: App, backend: Backend | None = None) -> Any:
        s = app.settings
        backend = backend or load_backend("aioquic")
        self._windows(s)
        tls = self._load_tls(app)
        self.tls_certificate = tls.certificate
        cfg = backend.configuration(
            tls,
            alpn_protocols=[self.alpn],
            idle_timeout=s.max_idle_timeout_secs,
            # Initial windows; they grow only as far as SlidingLimit / the stream cap allow.
            max_data=self.window_unauthenticated,
            max_stream_data=self.stream_window(s),
        )
        keylog = os.environ.get("SSLKEYLOGFILE")
        if keylog:
            cfg.secrets_log_file = open(keylog, "a")  # noqa: SIM115 - lives with the server
        return cfg

    def _load_tls(self, app: App) -> TlsMaterial:
        if self._tls is not None:
            return self._tls(app)
        s = app.settings
        return resolve_tls(s.data_dir, s.tls_cert, s.tls_key, production=s.production)

    async def reload_tls(self) -> x509.Certificate | None:
        """Read the certificate and key files again (``tls_cert``/``tls_key`` with the
        checks of start-up, or the listener's own ``tls`` function) and serve them to new
        connections; established connections keep the pair they were served.  Raises
        ConfigError (the old pair stays in use) when the files are missing, unreadable or do
        not match.  None before the listener started."""
        if self._cfg is None or self.backend is None:
            return None
        # File reads and parsing off the event loop; the swap itself is one loop step, so a
        # connection's certificate and its tls_binding always agree.
        tls = await asyncio.to_thread(self._load_tls, self.app)
        check_valid_now(tls.certificate)
        self.backend.apply_tls(self._cfg, tls)
        self.tls_certificate = tls.certificate
        return tls.certificate

    async def start(self, app: App) -> None:
        self.dispatcher = Dispatcher(app, self._methods, request_auth=self.token_auth)
        self.app = app
        s = app.settings
        host, port = parse_hostport(self.listen or s.listen)
        mutual = self.peer_certificate_auth is not None
        # Client certificates: aioquic only (see request_client_certificate).
        backend = self.backend = load_backend("aioquic" if mutual else s.quic_backend)
        cfg = self._cfg = self.configuration(app, backend)
        cls = connection_class(backend)

        def factory(*args: Any, **kwargs: Any) -> _ServerConnectionLogic:
            proto = cls(*args, app=app, listener=self, **kwargs)
            if mutual:
                request_client_certificate(proto._quic)
            self._track(proto)
            return proto

        retry = self._retry_mode = self.retry or s.quic_retry
        self.server = server = await backend.serve(
            host, port, configuration=cfg, create_protocol=factory,
            retry=retry == "on",
        )
        if retry == "auto":
            handler = self._retry_handler = retry_handler(backend)
            create_token = handler.create_token

            def create_token_noted(*args: Any, **kwargs: Any) -> Any:
                # Retry stays on until the last token handed out has expired (see
                # _auto_retry): a client holding one must find it accepted.
                self._retry_since = time.monotonic()
                return create_token(*args, **kwargs)

            handler.create_token = create_token_noted
            _refuse_bad_tokens_quietly(handler)
        elif retry == "on":
            _refuse_bad_tokens_quietly(server._retry)
        assert server._transport is not None
        # Read every datagram already queued per wake-up (see DatagramDrain): requests that
        # arrive together are handled in one loop turn and share a commit and packets.
        drain = self._drain = DatagramDrain(server._transport)
        library_receive = server.datagram_received

        def receive(data: bytes | str, addr: Any) -> None:
            verdict = self._admit(cast(bytes, data), addr)
            if verdict == DROP:
                return
            retry_now = verdict == RETRY
            if retry_now:  # this address must prove itself before it gets any state
                server._retry = self._retry_handler
            try:
                library_receive(data, addr)
            finally:
                self._admitting = None
                if retry_now:
                    server._retry = None

        def datagram_received(data: bytes | str, addr: Any) -> None:
            receive(data, addr)
            drain.drain(receive)

        server.datagram_received = datagram_received
        sockname = server._transport.get_extra_info("sockname")
        self.address = (sockname[0], sockname[1])
        self.accepting = True
        log.info("%s: QUIC listening on %s:%d (ALPN %s, %s%s)", self.name, self.address[0],
                 self.address[1], self.alpn, backend.name, ", mutual TLS" if mutual else "")

    # -- admission ---------------------------------------------------------------------------------
    def _admit(self, data: bytes, addr: Any) -> int:
        """PASS, DROP (over the limits) or RETRY (answer a token-less Initial with a Retry)
        for a datagram that would open a connection."""
        # Only a long-header packet (an Initial) for an unknown connection id opens one.
        if len(data) < 7 or not data[0] & 0x80:
            return PASS
        dcid = bytes(data[6:6 + data[5]])
        server = self.server
        if server is None:
            return DROP
        if dcid in server._protocols:
            return PASS
        s = self.app.settings
        ip = str(addr[0])
        half_open = len(self.pending)
        if self.max_connections is not None:
            # A listener with its own cap: established connections against the cap, and
            # handshakes in progress apart (forged Initials must not take the slots).
            crowded = (len(self.protocols) >= self.max_connections
                       or half_open >= OWN_CAP_HALF_OPEN)
        else:
            crowded = half_open + len(self.protocols) >= self._cap()
        if crowded:
            self._refuse(ip, "server at connection limit (established + mid-handshake)")
            return DROP
        total = self._per_ip.get(ip, 0)
        half = self._half_per_ip.get(ip, 0)
        if self.max_connections is not None and half >= OWN_CAP_HALF_OPEN_PER_IP:
            # One address (validated by Retry, but silent after it) cannot hold the
            # listener's whole handshake budget.
            self._refuse(ip, "per-IP handshakes in progress")
            return DROP
        cap = s.max_connections_per_ip
        if total - half >= cap:
            self._refuse(ip, "per-IP connection limit")
            return DROP
        if self._retry_mode == "auto":
            self._auto_retry(half_open, s.retry_half_open_threshold)
        self._admitting = ip
        if (server._retry is None and self._retry_handler is not None
                and time.monotonic() - self._retry_since < RETRY_TOKEN_WINDOW_SECS
                and _has_token(data)):
            # The answer to a Retry of ours (per address, below): the token must be checked
            # by the Retry path, or the handshake lacks the Retry's connection ids and fails.
            return RETRY
        if total >= cap or half >= PER_IP_HALF_OPEN_BEFORE_RETRY:
            # Handshakes that never completed fill this address's share: they may be forged
            # with its address, so new ones must prove they own it (a Retry round trip)
            # rather than be turned away.
            if server._retry is not None:
                return PASS  # Retry is on anyway: only validated Initials get state
            if self._retry_handler is not None:
                return RETRY
            if total >= cap:  # quic_retry = "off": the address's share is simply full
                self._admitting = None
                self._refuse(ip, "per-IP connection limit (mid-handshake included)")
                return DROP
        return PASS

    def _auto_retry(self, half_open: int, threshold: int) -> None:
        """Retry while many handshakes are open; back off only when few are and the tokens
        handed out meanwhile have expired (30 s), so no client is caught mid-Retry."""
        server = self.server
        now = time.monotonic()
        if server._retry is None:
            if half_open >= threshold:
                server._retry = self._retry_handler
                self._retry_since = now
                log.warning("QUIC Retry on: %d connections mid-handshake", half_open)
        elif half_open < threshold // 2 and now - self._retry_since > 60.0:
            server._retry = None
            log.info("QUIC Retry off: %d connections mid-handshake", half_open)
        elif half_open >= threshold:
            self._retry_since = now

    def _refuse(self, ip: str, why: str) -> None:
        self.initials_refused += 1
        now = time.monotonic()
        if now - self._refused_logged >= 10.0:
            self._refused_logged = now
            log.warning("refusing new QUIC connections (%s; %d refused so far; last from %s)",
                        why, self.initials_refused, ip)

    def refused_peer(self, ip: str, why: str) -> None:
        """A mutual-TLS connection was refused for its certificate (logged at most every
        10 s, with the count, so a peer retrying in a loop cannot flood the log)."""
        self.peers_refused += 1
        now = time.monotonic()
        if now - self._peer_refused_logged >= 10.0:
            self._peer_refused_logged = now
            log.warning("%s: refused a peer certificate from %s: %s (%d refused so far)",
                        self.name, ip, why, self.peers_refused)

    def _cap(self) -> int:
        if self.max_connections is not None:
            return self.max_connections
        return int(self.app.settings.max_connections)

    def _track(self, proto: _ServerConnectionLogic) -> None:
        ip = self._admitting or "unknown"
        self.pending.add(proto)
        self._ips[proto] = ip
        _count(self._per_ip, ip, 1)
        _count(self._half_per_ip, ip, 1)

    def established_from(self, proto: _ServerConnectionLogic) -> int:
        """Established connections from ``proto``'s address (not counting ``proto``)."""
        ip = self._ips.get(proto)
        if ip is None:
            return 0
        return self._per_ip.get(ip, 0) - self._half_per_ip.get(ip, 0)

    def established(self, proto: _ServerConnectionLogic) -> None:
        if proto in self.pending:
            self.pending.discard(proto)
            ip = self._ips.get(proto)
            if ip is not None:
                _count(self._half_per_ip, ip, -1)
        self.protocols.add(proto)

    def forget(self, proto: _ServerConnectionLogic) -> None:
        was_pending = proto in self.pending
        self.pending.discard(proto)
        self.protocols.discard(proto)
        ip = self._ips.pop(proto, None)
        if ip is not None:
            _count(self._per_ip, ip, -1)
            if was_pending:
                _count(self._half_per_ip, ip, -1)

    # -- shutdown ----------------------------------------------------------------------------------
    async def stop_accepting(self) -> None:
        """Refuse new connections and tell connected clients the server is going away."""
        self.accepting = False
        payload = common_pb2.ServerShuttingDownEvent(reason="server shutting down")
        data = payload.SerializeToString()
        for proto in list(self.protocols):
            proto.push(PushEvent.SERVER_SHUTTING_DOWN, data)

    async def flush(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until every connection's answers are acknowledged by
        the client: closing earlier would cut off an answer still in flight (e.g. a Fetch,
        whose messages are already removed from the queue).  A client from which nothing
        arrives for FLUSH_SILENT_SECS *during* the flush is given up on (out of coverage: it
        would hold every restart for the whole timeout); one that was merely quiet before
        (a long poll) is waited for."""
        loop = asyncio.get_running_loop()
        waiting = {p: asyncio.ensure_future(p.wait_sent()) for p in self.protocols if p.sending()}
        if not waiting or timeout <= 0:
            for t in waiting.values():
                t.cancel()
            return
        start = time.monotonic()
        deadline = loop.time() + timeout
        while waiting:
            left = deadline - loop.time()
            if left <= 0:
                break
            await asyncio.wait(list(waiting.values()), timeout=min(left, FLUSH_SILENT_SECS / 4))
            now = time.monotonic()
            for p, t in list(waiting.items()):
                if t.done():
                    del waiting[p]
                elif now - max(p._last_heard, start) >= FLUSH_SILENT_SECS:
                    t.cancel()  # silent since the flush began: not waited for
                    del waiting[p]
        for t in waiting.values():
            t.cancel()
        if waiting:
            log.warning("shutdown: %d connections still had unacknowledged answers after the "
                        "drain timeout", len(waiting))

    async def close(self, reason: str) -> None:
        self.accepting = False
        for proto in list(self.pending):
            proto._abort(reason, ERR_SHUTDOWN)
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
        # Calls still running have outlived the drain timeout (their clients left, and they
        # are not cancelled for that): stop them now, before storage closes under them.
        calls = list(self.calls)
        if calls:
            log.warning("shutdown: cancelling %d calls still running after the drain timeout",
                        len(calls))
            for t in calls:
                t.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
        if self.server is not None:
            self.server.close()
            self.server = None
        if self._drain is not None:
            self._drain.close()
            self._drain = None
