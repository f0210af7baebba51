"""Hostile clients of the bridge (review round 1): each test reproduces a defect a reviewer
found in the first version of the plugin.  A full connection still takes CANCELs, a flood of
garbage from a client that reads nothing stays bounded, idle TCP connections are capped
before the upgrade, stalled messages and repeated headers are refused, shutdown stops calls
before storage closes, and proofs are bound to the Host actually sent."""

from __future__ import annotations

import asyncio
import dataclasses

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_ws_bridge import wire
from qpc_ws_bridge.bridge import HALF_OPEN_PER_IP, WRITE_BACKLOG
from qpc_ws_bridge.client import WsClient
from websockets.asyncio.client import connect as ws_connect
from websockets.frames import Frame, Opcode
from ws_helpers import bridge, bridge_settings, until, ws_url

from qpc_core.framing import Status
from qpc_core.pb import common_pb2
from qpc_core.testing import TEST_TOKEN


async def test_a_full_connection_still_takes_cancel_and_refuses_more_as_busy(app_factory):
    app = await app_factory(max_concurrent_bidi_streams=2, **bridge_settings())
    c = await WsClient.connect(ws_url(app), token=TEST_TOKEN,
                               identity=Ed25519PrivateKey.generate())
    conn = next(iter(bridge(app).conns))
    polls = [asyncio.ensure_future(c.fetch_wait(30_000)) for _ in range(2)]
    await until(lambda: len(conn.running) == 2)
    health = [asyncio.ensure_future(c.call_raw(802, b"")) for _ in range(2)]
    await until(lambda: len(conn.waiting) == 2)
    # Running and waiting are full: the next request is refused at once, not left unread.
    busy = await asyncio.wait_for(c.call_raw(802, b""), 10)
    assert busy.status == Status.UNAVAILABLE
    assert "busy" in common_pb2.Error.FromString(busy.payload).message
    polls[0].cancel()  # the CANCEL is read although the connection is full
    first = await asyncio.wait_for(health[0], 10)
    assert first.status == Status.OK
    polls[1].cancel()
    assert (await asyncio.wait_for(health[1], 10)).status == Status.OK
    await asyncio.gather(*polls, return_exceptions=True)
    await c.close()


async def test_garbage_from_a_client_that_reads_nothing_stays_bounded(app_factory):
    app = await app_factory(**bridge_settings())
    ws = await ws_connect(ws_url(app), subprotocols=[wire.SUBPROTOCOL],  # type: ignore[list-item]
                          compression=None, max_queue=1)
    # Stop reading on our side: every answer stays unread in the sockets' buffers.
    ws.transport.pause_reading()
    b = bridge(app)
    await until(lambda: b.conns)
    conn = next(iter(b.conns))
    peak = 0

    async def flood() -> None:
        nonlocal peak
        for _ in range(20_000):
            await ws.send(b"\x09")  # an unknown kind: each one is answered PROTOCOL_ERROR
            peak = max(peak, len(conn._writes))

    # The server stops reading once its answers pile up, so the flood blocks on TCP.
    done, _ = await asyncio.wait([asyncio.ensure_future(flood())], timeout=5)
    for t in done:
        t.result()
    assert peak <= WRITE_BACKLOG and len(conn._writes) <= WRITE_BACKLOG
    # Pushes have their own budget: a NEW_MESSAGE hint is not crowded out by the errors.
    dropped = b.pushes_dropped
    conn.push(1, b"hint")
    assert b.pushes_dropped == dropped
    ws.transport.abort()
    await until(lambda: not b.conns)


async def test_idle_tcp_connections_are_capped_before_the_upgrade(app_factory):
    app = await app_factory(**bridge_settings())
    host, port = bridge(app).address
    b = bridge(app)
    conns = [await asyncio.open_connection(host, port) for _ in range(HALF_OPEN_PER_IP + 20)]
    await until(lambda: b.refused.get("handshake limit", 0) >= 20)
    assert b.half_open_total == HALF_OPEN_PER_IP
    # The dropped ones see their connection end at once (not after handshake_timeout_secs).
    ended = 0
    for r, _w in conns:
        try:
            if await asyncio.wait_for(r.read(1), 0.5) == b"":
                ended += 1
        except (ConnectionError, TimeoutError):
            ended += 1 if r.at_eof() else 0
    assert ended >= 20
    for _r, w in conns:
        w.close()
    await until(lambda: b.half_open_total == 0)
    ok = await WsClient.connect(ws_url(app), token=TEST_TOKEN)  # room again
    await ok.close()


async def test_a_stalled_message_closes_the_connection(app_factory):
    app = await app_factory(request_receive_timeout_secs=0.5, **bridge_settings())
    ws = await ws_connect(ws_url(app), subprotocols=[wire.SUBPROTOCOL],  # type: ignore[list-item]
                          compression=None)
    await ws.send(wire.auth_message(TEST_TOKEN.encode()))
    assert await ws.recv() == bytes([wire.AUTH_REPLY, Status.OK])
    # The first fragment of a message, then nothing more (pongs still flow).
    ws.protocol.send_frame(Frame(Opcode.BINARY, b"\x02" + b"\0" * 100, fin=False))
    ws.send_data()
    try:
        await asyncio.wait_for(ws.wait_closed(), 10)
    finally:
        await ws.close()
    assert ws.close_code == 1008 and "stalled" in (ws.close_reason or "")


async def test_repeated_host_or_origin_headers_are_refused(app_factory):
    app = await app_factory(**bridge_settings(allowed_origins=["http://good.example"]))
    host, port = bridge(app).address
    for extra in ("Host: evil.example", "Origin: http://good.example\r\n"
                  "Origin: http://evil.example"):
        r, w = await asyncio.open_connection(host, port)
        w.write((f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n"
                 "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                 f"Sec-WebSocket-Protocol: {wire.SUBPROTOCOL}\r\n\r\n").encode())
        status = await asyncio.wait_for(r.readline(), 10)
        w.close()
        assert status.startswith(b"HTTP/1.1 400"), status
    assert bridge(app).refused == {"repeated header": 2}


async def test_shutdown_stops_calls_before_storage_closes(app_factory):
    app = await app_factory(drain_timeout_secs=0.3, **bridge_settings())
    started, released = asyncio.Event(), asyncio.Event()
    after_stop: list[object] = []

    async def stuck(ctx, req):  # not cancel_on_disconnect, and never finishing by itself
        started.set()
        try:
            await released.wait()
        finally:
            after_stop.append(ctx.app._storage)
        return common_pb2.HealthResponse(status="late")

    plugin, m = app.methods[802]
    app.methods[802] = (plugin, dataclasses.replace(m, handler=stuck))
    c = await WsClient.connect(ws_url(app), token=TEST_TOKEN)
    call = asyncio.ensure_future(c.call_raw(802, b""))
    await asyncio.wait_for(started.wait(), 10)
    push = asyncio.ensure_future(c.pushes.get())
    await app.stop()
    assert not bridge(app).calls  # stopped within the shutdown, not left running
    assert after_stop and after_stop[0] is not None  # it ended while storage was open
    shutting = await asyncio.wait_for(push, 10)
    assert shutting.event_type == 3  # SERVER_SHUTTING_DOWN
    call.cancel()
    await asyncio.gather(call, return_exceptions=True)
    await c.close()


async def test_identity_proof_uses_the_host_header_sent(app_factory):
    app = await app_factory(**bridge_settings())
    host, port = bridge(app).address
    # User info in the URL is not part of the Host header, so not of the proof.
    c = await WsClient.connect(f"ws://someone:secret@{host}:{port}/v1/ws", token=TEST_TOKEN,
                               identity=Ed25519PrivateKey.generate())
    r = await c.enqueue(c.identity_key, b"x")
    assert [m.seq for m in await c.fetch()] == [r.seq]
    await c.close()
