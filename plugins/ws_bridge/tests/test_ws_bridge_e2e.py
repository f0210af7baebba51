"""The WebSocket bridge end to end: a real App, real WebSocket connections on loopback, QUIC
clients beside them; browsers and QUIC clients share inboxes, pushes and limits."""

from __future__ import annotations

import asyncio

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_ws_bridge import wire
from qpc_ws_bridge.client import WsClient
from ws_helpers import bridge, bridge_settings, until, ws_url

from qpc_core.app import App
from qpc_core.errors import BadRequest, Forbidden, Unauthenticated
from qpc_core.framing import Status
from qpc_core.identity import public_bytes
from qpc_core.pb import common_pb2, delivery_pb2
from qpc_core.testing import TEST_TOKEN


@pytest.fixture
async def app(app_factory) -> App:
    a: App = await app_factory(**bridge_settings())
    return a


@pytest.fixture
async def ws(app):
    clients: list[WsClient] = []

    async def make(identity: Ed25519PrivateKey | None = None, token: str | None = TEST_TOKEN,
                   **kw) -> WsClient:
        if identity is None and token is not None:
            identity = Ed25519PrivateKey.generate()
        c = await WsClient.connect(ws_url(app), token=token, identity=identity, **kw)
        clients.append(c)
        return c

    yield make
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def test_browser_and_quic_clients_exchange_messages(app, ws, connect) -> None:
    browser = await ws()
    quic = await connect(app)
    health = await browser.call(802, common_pb2.HealthRequest(), common_pb2.HealthResponse)
    assert health.status == "ok"
    who = await browser.call(106, common_pb2.WhoAmIRequest(), common_pb2.WhoAmIResponse)
    assert who.identity_key == browser.identity_key and who.authenticated

    r = await quic.enqueue(browser.identity_key, b"to the browser")
    got = await browser.fetch()
    assert [(m.seq, m.data) for m in got] == [(r.seq, b"to the browser")]

    sent = await browser.enqueue(quic.identity_key, b"to quic", message_id=b"m" * 16)
    assert len(sent.delivery_proof) == 96 and not sent.duplicate
    again = await browser.enqueue(quic.identity_key, b"to quic", message_id=b"m" * 16)
    assert again.duplicate and again.seq == sent.seq
    assert [m.data for m in await quic.fetch()] == [b"to quic"]


async def test_fetch_wait_is_woken_and_push_reaches_the_browser(app, ws, connect) -> None:
    browser = await ws()
    quic = await connect(app)
    waiting = asyncio.ensure_future(browser.fetch_wait(10_000))
    # The FetchWait is parked once the server has it in flight on this connection.
    conn = next(iter(bridge(app).conns))
    await until(lambda: conn.calls)
    await quic.enqueue(browser.identity_key, b"wake up")
    msgs = await asyncio.wait_for(waiting, 10)
    assert [m.data for m in msgs] == [b"wake up"]

    # No FetchWait waiting: the server pushes a NEW_MESSAGE hint over the WebSocket.
    r = await quic.enqueue(browser.identity_key, b"hint")
    push = await asyncio.wait_for(browser.pushes.get(), 10)
    ev = common_pb2.NewMessageEvent.FromString(push.payload)
    assert ev.recipient_key == browser.identity_key and ev.seq == r.seq


async def test_cancel_stops_a_long_poll_and_nothing_is_lost(app, ws, connect) -> None:
    browser = await ws()
    quic = await connect(app)
    waiting = asyncio.ensure_future(browser.fetch_wait(30_000))
    conn = next(iter(bridge(app).conns))
    await until(lambda: conn.calls)
    waiting.cancel()  # the client sends CANCEL for it
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await until(lambda: not conn.running)  # the server stops the parked call
    await quic.enqueue(browser.identity_key, b"after cancel")
    assert [m.data for m in await browser.fetch()] == [b"after cancel"]


async def test_another_identitys_queue_is_forbidden(app, ws, connect) -> None:
    browser = await ws()
    quic = await connect(app)
    await quic.enqueue(quic.identity_key, b"mine")
    with pytest.raises(Forbidden):
        await browser.call(201, delivery_pb2.FetchRequest(recipient_key=quic.identity_key),
                           delivery_pb2.FetchResponse)
    with pytest.raises(BadRequest):
        await browser.enqueue(b"short", b"x")
    assert [m.data for m in await quic.fetch()] == [b"mine"]


async def test_identity_proof_is_bound_to_the_host(app, ws) -> None:
    key = Ed25519PrivateKey.generate()
    c = await ws(identity=None)
    ch = await c.call(104, common_pb2.AuthChallengeRequest(), common_pb2.AuthChallengeResponse)
    from qpc_ws_bridge.bridge import host_binding

    from qpc_core.identity import prove_identity_message

    # Signed for another host (a relaying server's page): refused.
    sig = key.sign(prove_identity_message(ch.nonce, public_bytes(key),
                                          host_binding("evil.example:443")))
    with pytest.raises(Unauthenticated, match="does not verify"):
        await c.call(105, common_pb2.ProveIdentityRequest(identity_key=public_bytes(key),
                                                          signature=sig),
                     common_pb2.ProveIdentityResponse)
    await c.prove_identity(key)  # bound to the Host this connection used: accepted
    assert c.identity_key == public_bytes(key)


async def test_unauthenticated_calls_and_bad_tokens(app, ws) -> None:
    c = await ws(token=None)
    with pytest.raises(Unauthenticated):
        await c.enqueue(b"\1" * 32, b"x")
    health = await c.call(802, common_pb2.HealthRequest(), common_pb2.HealthResponse)
    assert health.status == "ok"
    with pytest.raises(Unauthenticated):
        await WsClient.connect(ws_url(app), token="wrong-token")


async def test_malformed_messages_get_clear_errors_and_the_connection_lives(app, ws) -> None:
    c = await ws()
    cases = [  # (message, the request id its answer names, what the error says)
        (b"", 0, "empty message"),
        (b"\x09abc", 0, "unknown message kind 0x09"),
        (b"\x02\x00", 0, "message ended after 1 bytes, inside the frame header"),
        (wire.request_message(200, 77, b"x")[:-1], 77, "message ended after 10 of 11 frame"),
        (wire.request_message(200, 78, b"x") + b"junk", 78, "unexpected bytes after the frame"),
        (b"\x03\x00", 0, "cancel message must be 5 bytes"),
        (wire.auth_message(b"devtoken"), 0, "must be the first message"),
    ]
    for raw, rid, expect in cases:
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        c._pending[rid] = fut
        await c.send_raw(raw)
        frame = await asyncio.wait_for(fut, 10)
        assert frame.status == Status.PROTOCOL_ERROR and frame.request_id == rid, raw
        assert expect in common_pb2.Error.FromString(frame.payload).message, raw
    # A request for an unknown method, and a payload that is not the method's message.
    f = await c.call_raw(4242, b"")
    assert f.status == Status.UNIMPLEMENTED
    f = await c.call_raw(200, b"\xff\xff\xff")
    assert f.status == Status.BAD_REQUEST
    # Still the same, working connection.
    assert (await c.call(802, common_pb2.HealthRequest(), common_pb2.HealthResponse)).status == "ok"
    # A text message is not a qpc message: the connection is closed with 1003.
    await c.ws.send("hello")
    await asyncio.wait_for(c.closed, 10)
    assert c.ws.close_code == 1003


async def test_duplicate_request_id_in_flight_is_refused(app, ws) -> None:
    c = await ws()
    fetch_wait = delivery_pb2.FetchRequest(recipient_key=c.identity_key, timeout_ms=30_000)
    first = asyncio.ensure_future(c.call_raw(202, fetch_wait.SerializeToString(), request_id=9))
    conn = next(iter(bridge(app).conns))
    await until(lambda: 9 in conn.calls)
    parked = conn.calls[9]
    await c.send_raw(wire.request_message(201, 9, delivery_pb2.FetchRequest(
        recipient_key=c.identity_key).SerializeToString()))
    frame = await asyncio.wait_for(first, 10)  # the refusal names request 9
    assert frame.status == Status.BAD_REQUEST
    assert "already in flight" in common_pb2.Error.FromString(frame.payload).message
    assert conn.calls[9] is parked  # the first call is untouched
    await c.send_raw(wire.cancel_message(9))
    await until(lambda: not conn.running)
    assert 9 not in conn.calls
