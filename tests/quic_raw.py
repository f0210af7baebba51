"""A bare aioquic client for transport tests: raw frames, partial frames, flow-control tricks.

Independent of the SDK on purpose: these tests send what a well-behaved client never would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

from qpc_core.app import App
from qpc_core.framing import ResponseDecoder, ResponseFrame, encode_auth_request, encode_request
from qpc_core.testing import quic_port, until  # noqa: F401 - until: re-exported for the tests

HEALTH = 802
FLOW_CONTROL_ERROR = 0x3


def client_config(app: App) -> QuicConfiguration:
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["qpc"], server_name="localhost")
    cfg.load_verify_locations(cafile=str(app.settings.data_dir / "ca-cert.pem"))
    return cfg


def padding(n: int) -> bytes:
    """A protobuf payload of exactly ``n`` bytes (>= 4): one unknown length-delimited field
    (number 99), which every request message skips."""
    assert n >= 4
    tag = bytes([0x9A, 0x06])  # field 99, wire type 2
    for vlen in (1, 2, 3, 4):
        body = n - len(tag) - vlen
        if body < 0:
            break
        enc = _varint(body)
        if len(enc) == vlen:
            return tag + enc + b"\0" * body
    raise ValueError(f"cannot pad to {n} bytes")


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


class RawClient(QuicConnectionProtocol):
    """Collects the bytes of every stream; ``terminated`` resolves to (error code, reason)."""

    grant_uni_streams: int | None = None  # set before connecting to override the client's limit

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.grant_uni_streams is not None:
            self._quic._local_max_streams_uni.value = self.grant_uni_streams
        self.received: dict[int, bytearray] = {}
        self.ended: dict[int, asyncio.Future[bytes]] = {}
        self.terminated: asyncio.Future[tuple[int, str]] = self._loop.create_future()

    def _ended(self, sid: int) -> asyncio.Future[bytes]:
        fut = self.ended.get(sid)
        if fut is None:
            fut = self.ended[sid] = self._loop.create_future()
        return fut

    def quic_event_received(self, event: Any) -> None:
        kind = type(event).__name__
        if kind == "StreamDataReceived":
            buf = self.received.setdefault(event.stream_id, bytearray())
            buf += event.data
            if event.end_stream and not self._ended(event.stream_id).done():
                self._ended(event.stream_id).set_result(bytes(buf))
        elif kind == "ConnectionTerminated" and not self.terminated.done():
            self.terminated.set_result((event.error_code, event.reason_phrase))
            for fut in self.ended.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(event.reason_phrase))

    # -- sending ---------------------------------------------------------------------------------
    def send(self, data: bytes, fin: bool = True, sid: int | None = None) -> int:
        if sid is None:
            sid = self._quic.get_next_available_stream_id()
        self._quic.send_stream_data(sid, data, end_stream=fin)
        self.transmit()
        return sid

    def byte_at(self, sid: int, offset: int) -> None:
        """Send one byte of stream ``sid`` at ``offset``, ignoring the server's flow-control
        limits (as a hostile client would): everything before it is a gap."""
        quic: QuicConnection = self._quic
        quic._remote_max_data = 1 << 60
        stream = quic._get_or_create_stream_for_send(sid)
        stream.max_stream_data_remote = 1 << 60
        snd = stream.sender
        snd._buffer = bytearray(b"x")
        snd._buffer_start = offset
        snd._buffer_stop = offset + 1
        snd._pending.add(offset, offset + 1)
        snd.buffer_is_empty = False
        self.transmit()

    async def response(self, sid: int, timeout: float = 5.0) -> ResponseFrame:
        data = await asyncio.wait_for(asyncio.shield(self._ended(sid)), timeout)
        dec = ResponseDecoder()
        dec.feed(data)
        return dec.finish()

    async def call(self, method_id: int, payload: bytes = b"", timeout: float = 5.0) -> Any:
        return await self.response(self.send(encode_request(method_id, 1, payload)), timeout)

    async def health(self) -> ResponseFrame:
        return await self.call(HEALTH)

    async def auth(self, token: bytes = b"devtoken") -> None:
        sid = self.send(encode_auth_request(token))
        assert sid == 0
        reply = await asyncio.wait_for(asyncio.shield(self._ended(sid)), 5.0)
        assert reply == b"\x01\x00", reply


@contextlib.asynccontextmanager
async def raw_clients(app: App) -> AsyncIterator[Callable[..., Awaitable[RawClient]]]:
    """``await make(token=b"devtoken" | None, grant_uni_streams=None)`` -> a connected
    :class:`RawClient`; all are closed on exit."""
    async with contextlib.AsyncExitStack() as stack:

        async def make(token: bytes | None = None,
                       grant_uni_streams: int | None = None) -> RawClient:
            cls = type("Raw", (RawClient,), {"grant_uni_streams": grant_uni_streams})
            proto = await asyncio.wait_for(
                stack.enter_async_context(
                    connect("127.0.0.1", quic_port(app), configuration=client_config(app),
                            create_protocol=cls)
                ),
                10,
            )
            assert isinstance(proto, RawClient)
            if token is not None:
                await proto.auth(token)
            return proto

        yield make


