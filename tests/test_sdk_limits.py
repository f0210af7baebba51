"""The SDK against a hostile or broken server: what it keeps is bounded."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from qpc_core.client import sdk
from qpc_core.errors import Internal
from qpc_core.framing import encode_push


@dataclass
class StreamDataReceived:  # same name as the QUIC libraries' event: the SDK dispatches on it
    stream_id: int
    data: bytes
    end_stream: bool


async def test_unread_pushes_are_bounded(server, connect) -> None:
    c = await connect(server)
    proto = c.protocol
    total = sdk.MAX_QUEUED_PUSHES + 50
    for i in range(total):
        sid = 3 + 4 * (1000 + i)  # server-opened uni streams
        proto.quic_event_received(
            StreamDataReceived(sid, encode_push(1, b"%d" % i), True))
    assert c.pushes.qsize() == sdk.MAX_QUEUED_PUSHES
    assert proto.pushes_dropped == 50
    assert c.pushes.get_nowait().payload == b"50"  # the oldest were dropped
    assert not proto.push_decoders


async def test_an_oversize_raw_reply_fails_the_call(server, connect) -> None:
    c = await connect(server)
    proto = c.protocol
    sid = proto._quic.get_next_available_stream_id()
    fut = proto._loop.create_future()
    proto.waiters[sid] = (bytearray(), fut)
    chunk = b"\0" * (1 << 20)
    for _ in range(sdk.MAX_RAW_REPLY // len(chunk) + 1):
        proto.quic_event_received(StreamDataReceived(sid, chunk, False))
        if fut.done():
            break
    with pytest.raises(Internal, match="longer than"):
        fut.result()
    assert sid not in proto.waiters
    assert (await c.health()).status == "ok"  # the connection itself goes on
