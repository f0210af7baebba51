"""The QUIC library behind qpc's transport: aioquic (default) or qh3 (``quic_backend``).

qh3 1.x is an aioquic fork with compiled (Rust) cryptography, header protection and buffers
under the same Python connection logic, so the transport code is shared and every setting
applies.  qh3 2.x is a different engine (a compiled packet core behind a thin facade) and is
refused here, because with it (2.0-2.1, checked on this project's machines):

* the server cannot set its stream limits (the core takes fixed values), so
  ``max_concurrent_bidi_streams`` / ``max_concurrent_uni_streams`` would be ignored;
* every handshake from an aioquic-based client (the qpc SDK) fails inside the core with
  "packet builder capacity exhausted" several times and completes only through
  retransmission (~0.8 s per handshake instead of milliseconds); a qh3 2.1 client could not
  connect to a qh3 2.1 server at all.

The few places where qpc reaches below the public API live here: the stream limits it
advertises, the peer address, ACK piggybacking, one transmit per connection and loop turn
(:class:`TurnBatching`) and reading every queued datagram per wake-up (:class:`DatagramDrain`).
"""

from __future__ import annotations

import importlib
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from qpc_core.errors import ConfigError

if TYPE_CHECKING:
    from qpc_core.transport.certs import TlsMaterial

BACKENDS = ("aioquic", "qh3")


@dataclass(frozen=True)
class Backend:
    name: str
    protocol_base: type[Any]  # the library's QuicConnectionProtocol
    serve: Any
    configuration_class: type[Any]
    connect: Any = None  # the library's client ``connect`` (an async context manager)

    def configuration(self, tls: TlsMaterial, **kwargs: Any) -> Any:
        """A server QuicConfiguration with qpc's TLS material."""
        cfg = self.configuration_class(is_client=False, **kwargs)
        self.apply_tls(cfg, tls)
        return cfg

    def apply_tls(self, cfg: Any, tls: TlsMaterial) -> None:
        """Put ``tls`` (certificate, chain, key) into a server configuration.  Both libraries
        read them when a connection's TLS context is created, at its first datagram, so a
        listener whose configuration changes serves the new pair to new connections while
        established ones keep theirs (certificate reload).  All or nothing: a pair the
        library cannot load leaves ``cfg`` as it was (ConfigError)."""
        if self.name == "qh3":
            from cryptography.hazmat.primitives import serialization

            cert_pem = b"".join(
                c.public_bytes(serialization.Encoding.PEM) for c in (tls.certificate, *tls.chain)
            )
            key_pem = tls.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            # qh3 parses into its own types and sets the certificate before it parses the
            # key: load into a scratch configuration, then take all three at once.
            scratch = self.configuration_class(is_client=False)
            try:
                scratch.load_cert_chain(cert_pem, key_pem)
            except Exception as e:
                raise ConfigError(
                    f"config: tls_cert/tls_key: the QUIC library (qh3) cannot use this "
                    f"certificate and key: {e}"
                ) from None
            cfg.certificate, cfg.certificate_chain, cfg.private_key = (
                scratch.certificate, scratch.certificate_chain, scratch.private_key)
        else:
            cfg.certificate = tls.certificate
            cfg.certificate_chain = list(tls.chain)
            cfg.private_key = tls.private_key

    def bind(self, logic: type[Any]) -> type[Any]:
        """``logic`` (a protocol mixin written against the asyncio API aioquic and qh3 1.x
        share) on this library's QuicConnectionProtocol; one class per (logic, library)."""
        key = (logic, self.name)
        cls = _bound.get(key)
        if cls is None:
            cls = _bound[key] = type(f"{self.name.capitalize()}{logic.__name__.lstrip('_')}",
                                     (logic, self.protocol_base), {})
        return cls


_bound: dict[tuple[type[Any], str], type[Any]] = {}


def load_backend(name: str) -> Backend:
    """Import the named QUIC library; ImportError says how to install a missing one."""
    if name not in BACKENDS:
        raise ValueError(f"unknown QUIC backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name == "qh3":
        try:
            from importlib.metadata import version

            major = int(version("qh3").split(".")[0])
        except Exception:  # not installed: the import below says so
            major = 1
        if major >= 2:
            raise ImportError(
                f"QUIC backend 'qh3' needs qh3 1.x, found {version('qh3')} "
                "(pip install 'qh3>=1.9,<2'; qh3 2.x is not supported, see "
                "qpc_core/transport/backend.py)"
            )
    try:
        proto = importlib.import_module(f"{name}.asyncio.protocol")
        server = importlib.import_module(f"{name}.asyncio.server")
        conf = importlib.import_module(f"{name}.quic.configuration")
        client = importlib.import_module(f"{name}.asyncio.client")
    except ImportError as e:
        hint = " (pip install 'qpc-core[fast]')" if name == "qh3" else ""
        raise ImportError(f"QUIC backend {name!r} is not installed{hint}: {e}") from e
    return Backend(
        name=name,
        protocol_base=proto.QuicConnectionProtocol,
        serve=server.serve,
        configuration_class=conf.QuicConfiguration,
        connect=client.connect,
    )


def set_stream_limits(quic: Any, bidi: int, uni: int) -> bool:
    """Advertise how many streams the peer may open (before the handshake).  False when
    the library does not allow it (qh3)."""
    lb = getattr(quic, "_local_max_streams_bidi", None)
    lu = getattr(quic, "_local_max_streams_uni", None)
    if lb is None or lu is None:
        return False
    lb.value = bidi
    lu.value = uni
    return True


def peer_address(quic: Any) -> tuple[str, int] | None:
    paths = getattr(quic, "_network_paths", None)
    if paths:
        addr = paths[0].addr
        return str(addr[0]), int(addr[1])
    addr = getattr(quic, "_remote_addr", None)  # qh3
    if addr:
        return str(addr[0]), int(addr[1])
    return None


def request_client_certificate(quic: Any) -> None:
    """Make a server connection ask the client for a certificate in its TLS handshake
    (mutual TLS, for server-to-server listeners).  aioquic only: it has the server side of
    client authentication but no public switch for it (``Context._request_client_certificate``
    is set on the TLS context, which the connection creates on the first Initial).  The
    certificate's chain is *not* verified by the library: the caller verifies it after the
    handshake (:func:`peer_certificates`); a client that sends none is seen as sending none."""
    init = getattr(quic, "_initialize", None)
    if init is None or not hasattr(quic, "_network_paths"):
        raise RuntimeError("client certificates need the aioquic backend")

    def initialize(peer_cid: bytes) -> None:
        init(peer_cid)
        quic.tls._request_client_certificate = True

    quic._initialize = initialize


def peer_certificates(quic: Any) -> list[Any]:
    """The certificate chain the peer presented (leaf first); empty if none (aioquic)."""
    ctx = getattr(quic, "tls", None)
    leaf = getattr(ctx, "_peer_certificate", None)
    if leaf is None:
        return []
    return [leaf, *getattr(ctx, "_peer_certificate_chain", [])]


#: How long an ACK may wait for an outgoing packet to ride on (below the 25 ms max_ack_delay
#: that aioquic and qh3 1.x advertise, so the peer's loss detection is unaffected).
ACK_HOLD_SECS = 0.015
# aioquic schedules an ACK at most 1 ms after the packet that needs it; anything later than
# this is already held.
_NOT_HELD = 0.002


def hold_ack(quic: Any, now: float) -> None:
    """Let a pending application-data ACK wait up to :data:`ACK_HOLD_SECS` for a packet to
    ride on.

    Used while answers (server) or further requests (client) are about to be sent: they carry
    the ACK (see :func:`piggyback_acks`) instead of a separate ACK-only packet going out after
    aioquic's 1 ms.  An ACK that is already being held is not postponed again, so no ACK waits
    longer than the hold (plus aioquic's 1 ms), below the max_ack_delay the endpoint
    advertised (25 ms): the peer's loss detection never fires because of it."""
    spaces = getattr(quic, "_spaces", None)
    if not spaces:
        return
    for epoch, space in spaces.items():
        if getattr(epoch, "name", "") == "ONE_RTT":
            ack_at = space.ack_at
            if ack_at is not None and ack_at <= now + _NOT_HELD:
                space.ack_at = ack_at + ACK_HOLD_SECS
            return


class TurnBatching:
    """Mixin for an asyncio QUIC connection protocol (aioquic, qh3 1.x): what a connection
    sends in one event-loop turn leaves in one ``transmit()``.

    The libraries transmit after every received datagram.  A ``transmit()`` with nothing
    to send still walks every packet space, builds and discards packets and re-arms the
    loss/ACK timer (more than half of the server's transmits in a 2-client run sent
    nothing); received datagrams and the answers, requests and pushes of the same turn now
    share one.
    Deferring to the end of the turn delays nothing that was ready to leave earlier in it.
    """

    _loop: Any
    _quic: Any
    _turn_flush = False  # a flush is scheduled for this loop turn
    _turn_sending = False  # ... and data of ours is queued (so the ACK rides along)

    # Provided by the library's QuicConnectionProtocol (later in the MRO).
    transmit: Callable[[], None]
    _process_events: Callable[[], None]

    def send_soon(self) -> None:
        """Our data (an answer, a request, a push) is queued: send it at the end of the turn,
        with the pending ACK (:func:`piggyback_acks`)."""
        self._turn_sending = True
        self._flush_at_end_of_turn()

    def _flush_at_end_of_turn(self) -> None:
        if not self._turn_flush:
            self._turn_flush = True
            self._loop.call_soon(self._flush_turn)

    def _flush_turn(self) -> None:
        self._turn_flush = False
        if self._turn_sending:
            self._turn_sending = False
            piggyback_acks(self._quic)
        self.transmit()

    def receive_batched(self, data: bytes | str, addr: Any, may_hold: Callable[[], bool]) -> None:
        """``datagram_received``: receive and dispatch events now, plus :func:`hold_ack` when
        ``may_hold()`` says a packet of ours will follow shortly; send at the end of the turn."""
        now = self._loop.time()
        quic = self._quic
        quic.receive_datagram(cast(bytes, data), addr, now=now)
        self._process_events()
        if may_hold():
            hold_ack(quic, now)
        self._flush_at_end_of_turn()


class DatagramDrain:
    """Reads the datagrams already queued on a UDP endpoint's socket each time the event loop
    delivers one.

    asyncio's selector loop hands a datagram endpoint one datagram per wake-up, so a burst
    of N packets took N loop turns, each with its own storage hand-off and its own
    transmit; read together, their RPCs share a group commit and their answers share
    packets.  Bounded per wake-up (``limit``) so one busy socket cannot starve the loop.
    uvloop already reads in batches; there this finds the socket empty (one syscall).

    Works on a duplicate of the transport's socket descriptor (the transport does not lend
    its socket for reading); :meth:`close` it with the transport."""

    def __init__(self, transport: Any, limit: int = 32) -> None:
        self.limit = limit
        self._transport = transport
        self._sock: socket.socket | None = None
        ts = transport.get_extra_info("socket")
        if ts is None:
            return
        try:
            fd = os.dup(ts.fileno())
        except (OSError, AttributeError, ValueError):
            return  # no descriptor to share: one datagram per wake-up, as before
        try:
            self._sock = socket.socket(fileno=fd)
            self._sock.setblocking(False)
        except (OSError, ValueError):
            os.close(fd)
            self._sock = None

    def drain(self, receive: Callable[[bytes, Any], None]) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(self.limit):
            if self._transport.is_closing():
                return
            try:
                data, addr = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. an ICMP error: the loop's own read reports it
                return
            receive(data, addr)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def piggyback_acks(quic: Any) -> None:
    """Let the packets about to be sent carry the pending ACK.

    aioquic delays an ACK by 1 ms after an ack-eliciting packet and leaves it out of packets
    sent before then, so a response written within that millisecond went without it and a
    separate ACK-only datagram followed 1 ms later (on both ends: extra packets, timer
    wake-ups and their crypto per RPC at low load).  Acknowledging earlier than the delay is
    always allowed (RFC 9000 §13.2.1); ACK frequency under bulk transfer is unchanged because
    this only runs when we have data of our own to send.  A no-op on qh3.
    """
    spaces = getattr(quic, "_spaces", None)
    if not spaces:
        return
    for space in spaces.values():
        if space.ack_at is not None:
            space.ack_at = 0.0  # "due now" for aioquic's `ack_at <= now` test


# -- receive windows (flow control) ------------------------------------------------------------
#
# aioquic and qh3 1.x treat the configured ``max_data`` / ``max_stream_data`` as *initial*
# windows: when the peer has used more than half of one, the window doubles (aioquic's
# ``_write_connection_limits`` / ``_write_stream_limits``, inlined in qh3's
# ``_write_application``; qh3 also doubles on DATA_BLOCKED / STREAM_DATA_BLOCKED).  A stream's
# receive buffer is a bytearray zero-filled up to the highest offset seen, so each doubling
# let a peer make the server allocate twice as much with a one-byte frame.  The two classes
# below make the windows self-limiting whichever code path raises them, in both libraries:
#
# * a peer-opened stream never gets more than ``stream_cap`` bytes of window (a request stream
#   never needs more than one frame), so data beyond it is the library's FLOW_CONTROL_ERROR;
# * the connection window slides: it is raised only up to ``used + allowance()``, the bytes
#   received so far plus what the server is still willing to hold (see :func:`cap_receive_windows`).


class SlidingLimit:
    """Stand-in for the library's ``Limit`` object behind the connection's MAX_DATA.

    ``value`` only ever grows (a QUIC limit cannot shrink), and never past
    ``used + allowance()``."""

    __slots__ = ("_allowance", "_ceiling", "_ceiling_at", "_value", "frame_type", "name",
                 "sent", "used")

    def __init__(self, limit: Any, allowance: Callable[[], int]) -> None:
        self.frame_type = limit.frame_type
        self.name = limit.name
        self.sent = limit.sent
        self.used = limit.used
        self._value: int = int(limit.value)
        self._allowance = allowance
        self._ceiling = 0
        self._ceiling_at = -1  # ``used`` when _ceiling was computed

    @property
    def value(self) -> int:
        return self._value

    @value.setter
    def value(self, new: int) -> None:
        if new <= self._value:
            return  # a limit granted to the peer is never taken back (RFC 9000 4.1)
        # The libraries try to raise the limit on every packet they build once the peer used
        # half of it; the allowance walks the streams, so it is computed once per change
        # (``used``, or :meth:`invalidate`).
        if self._ceiling_at != self.used:
            self._ceiling = self.used + max(0, self._allowance())
            self._ceiling_at = self.used
        new = min(new, self._ceiling)
        # Raise in steps of at least a quarter of the open allowance: once more than half
        # the window is used the libraries ask on every packet, and each raise is a MAX_DATA
        # frame.  (A peer blocked at the limit always gets the whole allowance, which is
        # larger than the step: no stall.)
        if new <= self._value or new - self._value < (self._ceiling - self.used) // 4:
            return
        self._value = new

    def invalidate(self) -> None:
        """What the server holds may have changed (data arrived, a request was taken or
        refused): compute the allowance again at the next raise."""
        self._ceiling_at = -1

    def raise_to_ceiling(self) -> None:
        """Grant the whole allowance now (e.g. once the connection authenticated)."""
        self._ceiling_at = -1
        self.value = self.used + max(0, self._allowance())


_capped_streams: dict[tuple[type[Any], int], type[Any]] = {}
_capped_connections: dict[tuple[type[Any], int], type[Any]] = {}
_capped_kinds: set[type[Any]] = set()


def _capped_stream_class(base: type[Any], cap: int) -> type[Any]:
    key = (base, cap)
    cls = _capped_streams.get(key)
    if cls is not None:
        return cls
    slot = base.__dict__.get("max_stream_data_local")  # qh3: a __slots__ member descriptor

    def get(self: Any) -> int:
        if slot is not None:
            return int(slot.__get__(self, type(self)))
        return int(self.__dict__["max_stream_data_local"])

    def put(self: Any, new: int) -> None:
        cur = get(self)
        if new > cur:
            new = max(cur, min(new, cap))
        if slot is not None:
            slot.__set__(self, new)
        else:
            self.__dict__["max_stream_data_local"] = new

    cls = _capped_streams[key] = type(
        f"Capped{base.__name__}", (base,),
        {"__slots__": (), "max_stream_data_local": property(get, put)},
    )
    _capped_kinds.add(cls)
    return cls


def _capped_connection_class(base: type[Any], cap: int) -> type[Any]:
    key = (base, cap)
    cls = _capped_connections.get(key)
    if cls is not None:
        return cls
    create = base._get_or_create_stream
    # aioquic raises a stream's window in one method only, ``_write_stream_limits`` (called
    # for every stream of every packet built): skipping it for peer-opened streams is enough
    # and keeps the stream objects as they are.  qh3 inlines that code (and also raises on
    # STREAM_DATA_BLOCKED), so there the streams get a class whose window cannot grow.
    write_limits = base.__dict__.get("_write_stream_limits") or getattr(
        base, "_write_stream_limits", None)

    def _get_or_create_stream(self: Any, frame_type: int, stream_id: int) -> Any:
        stream = create(self, frame_type, stream_id)
        # Streams the peer opened (client-initiated ids are even on a server).
        if not stream_id & 1 and type(stream) not in _capped_kinds:
            if stream.max_stream_data_local > cap:
                stream.max_stream_data_local = cap
                stream.max_stream_data_local_sent = cap
            if write_limits is None:
                stream.__class__ = _capped_stream_class(type(stream), cap)
        return stream

    members: dict[str, Any] = {"__slots__": (), "_get_or_create_stream": _get_or_create_stream}
    if write_limits is not None:
        def _write_stream_limits(self: Any, builder: Any, space: Any, stream: Any) -> None:
            if stream.stream_id & 1:  # a stream this server opened: the library's rule
                write_limits(self, builder, space, stream)
            # A peer-opened stream keeps the window it started with (at most ``cap``): its
            # MAX_STREAM_DATA is never raised, so there is nothing to send for it.

        members["_write_stream_limits"] = _write_stream_limits
    cls = _capped_connections[key] = type(f"Capped{base.__name__}", (base,), members)
    return cls


def cap_receive_windows(quic: Any, stream_cap: int, allowance: Callable[[], int]) -> SlidingLimit:
    """Stop the library from growing the receive windows of server connection ``quic``
    (before its handshake): peer-opened streams keep at most ``stream_cap`` bytes of window,
    and the connection window is at most ``allowance()`` bytes ahead of what was received.
    Returns the connection-level limit."""
    quic.__class__ = _capped_connection_class(type(quic), stream_cap)
    limit = SlidingLimit(quic._local_max_data, allowance)
    quic._local_max_data = limit
    return limit


def receive_buffered(quic: Any) -> int:
    """Bytes the library holds in stream receive buffers (out-of-order data and the zeros
    filling the gaps before it)."""
    total = 0
    for stream in quic._streams.values():
        buf = getattr(stream.receiver, "_buffer", None)
        if buf:
            total += len(buf)
    return total


def send_pending(quic: Any) -> bool:
    """True while an answer (a bidirectional stream) has data or a FIN the peer has not
    acknowledged yet.  Pushes (unidirectional) are hints and are not waited for."""
    for sid, stream in quic._streams.items():
        if sid & 0x2:
            continue
        s = stream.sender
        if s.is_finished:
            continue
        if not s.buffer_is_empty or s.highest_offset > 0 or s.reset_pending:
            return True
    return False


def uni_stream_credit(quic: Any) -> bool:
    """True when the peer lets us open one more unidirectional stream now (otherwise the
    library would queue it, without bound, until the peer raises its limit)."""
    sid = quic.get_next_available_stream_id(is_unidirectional=True)
    return bool((sid >> 2) < quic._remote_max_streams_uni)


def local_uni_streams(quic: Any) -> int:
    """Unidirectional streams we opened that are not finished (pushes not yet acknowledged)."""
    return sum(1 for sid in quic._streams if sid & 0x3 == 0x3)


def retry_handler(backend: Backend) -> Any:
    """A Retry token handler of the library; ``server._retry = handler`` makes its QuicServer
    answer token-less Initials with Retry (address validation before any connection state),
    ``server._retry = None`` stops it."""
    return importlib.import_module(f"{backend.name}.quic.retry").QuicRetryTokenHandler()


def peer_certificate_der(quic: Any) -> bytes | None:
    """DER of the certificate the peer presented in this connection's TLS handshake (client
    side: the server's), or None when there is none (yet)."""
    tls = getattr(quic, "tls", None)
    return _der(getattr(tls, "_peer_certificate", None) if tls is not None else None)


def own_certificate_der(quic: Any) -> bytes | None:
    """DER of the certificate this side presents in the connection's TLS handshake (server
    side: the server's own), or None before the connection's TLS context exists."""
    tls = getattr(quic, "tls", None)
    return _der(getattr(tls, "certificate", None) if tls is not None else None)


def _der(cert: Any) -> bytes | None:
    if cert is None:
        return None
    try:  # cryptography's x509.Certificate (aioquic)
        from cryptography.hazmat.primitives.serialization import Encoding

        return bytes(cert.public_bytes(Encoding.DER))
    except TypeError:  # qh3's own certificate type
        return bytes(cert.public_bytes())
