"""The QUIC library behind qpc's transport: aioquic (default) or qh3 (``quic_backend``).

qh3 is an aioquic fork whose packet engine is compiled (Rust).  Its asyncio layer has the same
shape (``QuicConnectionProtocol``, ``serve``, the same event class names), so the transport
code is shared; the few places where qpc reaches below the public API live here:

* stream limits: aioquic lets the server advertise its own (a private attribute, set before
  the handshake); qh3 2.1's compiled core takes fixed values, so there the configured
  ``max_concurrent_bidi_streams`` / ``max_concurrent_uni_streams`` cannot be applied;
* the peer address: aioquic keeps it on the network path, qh3 on the connection;
* ACK piggybacking: only aioquic needs (and allows) it;
* certificates: aioquic takes ``cryptography`` objects, qh3 PEM.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qpc_core.transport.certs import TlsMaterial

BACKENDS = ("aioquic", "qh3")


@dataclass(frozen=True)
class Backend:
    name: str
    protocol_base: type[Any]  # the library's QuicConnectionProtocol
    serve: Any
    configuration_class: type[Any]
    can_set_stream_limits: bool

    def configuration(self, tls: TlsMaterial, **kwargs: Any) -> Any:
        """A server QuicConfiguration with qpc's TLS material."""
        cfg = self.configuration_class(is_client=False, **kwargs)
        if self.name == "qh3":
            # qh3 defaults to 1280-byte datagrams; against clients that pad their Initial to
            # the QUIC minimum of 1200 bytes its handshake flight then overruns the 3x
            # anti-amplification budget and the core fails with "packet builder capacity
            # exhausted".  1200 is what every QUIC path must carry anyway.
            cfg.max_datagram_size = 1200
            from cryptography.hazmat.primitives import serialization

            cert_pem = tls.certificate.public_bytes(serialization.Encoding.PEM)
            key_pem = tls.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            cfg.load_cert_chain(cert_pem, key_pem)
        else:
            cfg.certificate = tls.certificate
            cfg.private_key = tls.private_key
        return cfg


def load_backend(name: str) -> Backend:
    """Import the named QUIC library; ImportError says how to install a missing one."""
    if name not in BACKENDS:
        raise ValueError(f"unknown QUIC backend {name!r} (choose from {', '.join(BACKENDS)})")
    try:
        proto = importlib.import_module(f"{name}.asyncio.protocol")
        server = importlib.import_module(f"{name}.asyncio.server")
        conf = importlib.import_module(f"{name}.quic.configuration")
    except ImportError as e:
        hint = " (pip install 'qpc-core[fast]')" if name == "qh3" else ""
        raise ImportError(f"QUIC backend {name!r} is not installed{hint}: {e}") from e
    return Backend(
        name=name,
        protocol_base=proto.QuicConnectionProtocol,
        serve=server.serve,
        configuration_class=conf.QuicConfiguration,
        can_set_stream_limits=name == "aioquic",
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
