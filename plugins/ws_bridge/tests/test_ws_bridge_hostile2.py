"""Hostile clients of the bridge (review round 2): each test reproduces a defect a reviewer
found after round 1.  A connection the server closed runs nothing more, Logout and
DeleteAccount leave the caller unauthenticated (on QUIC too), sessions end on time, stalls
are judged by bytes (single-frame stalls caught, slow senders kept), X-Forwarded-For entries
are canonical addresses."""

from __future__ import annotations

import asyncio
import struct

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_auth_opaque import client as oc
from qpc_auth_opaque import opaque
from qpc_ws_bridge import wire
from qpc_ws_bridge.bridge import _canonical_ip
from qpc_ws_bridge.client import WsClient
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus
from ws_helpers import bridge, bridge_settings, until, ws_url

from qpc_core.framing import Status
from qpc_core.pb import common_pb2, delivery_pb2, directory_pb2
from qpc_core.testing import TEST_TOKEN, quic_transport

FAST = opaque.IdentityKSF()


async def test_a_connection_the_server_closed_runs_nothing_more(app_factory) -> None:
    app = await app_factory(**bridge_settings())
    key = Ed25519PrivateKey.generate()
    a = await WsClient.connect(ws_url(app), token=TEST_TOKEN, identity=key)
    conn = next(iter(bridge(app).conns))
    poll = asyncio.ensure_future(a.fetch_wait(30_000))
    await until(lambda: conn.running)
    conn.disconnect("account deleted")  # what DeleteAccount does to the identity's others
    assert key.public_key().public_bytes_raw() not in app.by_identity  # no more pushes
    # Whatever the client still sends before its close reply is not run.
    conn._on_message(wire.request_message(200, 99, delivery_pb2.EnqueueRequest(
        recipient_key=b"\1" * 32, payload=b"after close").SerializeToString()))
    assert 99 not in conn.calls and not conn.waiting
    await asyncio.wait_for(a.closed, 10)
    assert poll.done()  # the long poll was stopped with the connection
    await asyncio.gather(poll, return_exceptions=True)
    assert a.ws.close_reason == "account deleted"


async def test_delete_account_drops_what_the_account_gave_the_caller(app_factory,
                                                                    connect) -> None:
    settings = bridge_settings()
    settings["plugins"] = ["auth_opaque", "ws_bridge"]
    app = await app_factory(auth_opaque={"ksf": "identity"}, auth_timeout_secs=0.5, **settings)
    # Operator token + a proven identity: the identity goes, the operator token stays (the
    # OK answer is not read as a credential either).
    key = Ed25519PrivateKey.generate()
    a = await WsClient.connect(ws_url(app), token=TEST_TOKEN, identity=key)
    await a.call(950, directory_pb2.DeleteAccountRequest(), directory_pb2.DeleteAccountResponse)
    conn = next(iter(bridge(app).conns))
    assert conn.identity_key is None and key.public_key().public_bytes_raw() not in app.by_identity
    assert conn.auth is not None and conn.auth.identity_key is None
    who = await a.call(106, common_pb2.WhoAmIRequest(), common_pb2.WhoAmIResponse)
    assert who.authenticated and not who.identity_key
    # A session of the deleted account was the connection's only credential: unauthenticated,
    # closed at the auth deadline (QUIC here; the bridge shares the code).
    q = await connect(app, token=None, identity=Ed25519PrivateKey.generate())
    await oc.register(q, "carol", "pw", ksf=FAST)
    await oc.login(q, "carol", "pw", ksf=FAST)
    proto = next(p for p in quic_transport(app).protocols if p.identity_key == q.identity_key)
    await q.delete_account()
    assert not proto.authenticated
    await asyncio.wait_for(proto._closed.wait(), 10)


async def test_logout_and_session_expiry_unbind_the_connection(app_factory, connect) -> None:
    settings = bridge_settings()
    settings["plugins"] = ["auth_opaque", "ws_bridge"]
    app = await app_factory(auth_opaque={"ksf": "identity", "session_lifetime_secs": 1},
                            auth_timeout_secs=30, **settings)
    q = await connect(app, token=None, identity=Ed25519PrivateKey.generate())
    await oc.register(q, "alice", "pw", ksf=FAST)
    token = (await oc.login(q, "alice", "pw", ksf=FAST)).session_token.decode()
    a = await WsClient.connect(ws_url(app), token=token)
    conn = next(iter(bridge(app).conns))
    assert conn.identity_key == q.identity_key and conn._expiry is not None
    # The session's end: SESSION_REVOKED, then unbound (no more pushes), not authenticated.
    push = await asyncio.wait_for(a.pushes.get(), 10)
    assert push.event_type == 2
    assert common_pb2.SessionRevokedEvent.FromString(push.payload).reason == "session expired"
    assert conn not in app.by_identity.get(q.identity_key, set())
    assert not conn.authenticated and conn._auth_timer is not None
    who = await a.call(106, common_pb2.WhoAmIRequest(), common_pb2.WhoAmIResponse)
    assert not who.authenticated
    # The QUIC connection that logged in lost its session at the same moment.
    proto = next(p for p in quic_transport(app).protocols if p.identity_key is None
                 and p._auth is None)
    assert not proto.authenticated


async def test_a_stalled_single_frame_closes_and_a_slow_sender_is_kept(app_factory) -> None:
    # (No pings here: a client cannot answer one in the middle of a frame, and this test
    # client's pong bytes would be taken as the frame's payload.)
    app = await app_factory(request_receive_timeout_secs=1.0, keepalive_interval_secs=0,
                            **bridge_settings())
    url = ws_url(app)
    # One frame announcing 3 MiB, 64 KiB of it sent, then silence.
    ws = await ws_connect(url, subprotocols=[wire.SUBPROTOCOL],  # type: ignore[list-item]
                          compression=None)
    await ws.send(wire.auth_message(TEST_TOKEN.encode()))
    assert await ws.recv() == bytes([wire.AUTH_REPLY, Status.OK])
    header = bytes([0x82, 0x80 | 127]) + struct.pack(">Q", 3 << 20) + b"\0\0\0\0"  # zero mask
    ws.transport.write(header + b"\x02" + b"\0" * 65535)
    try:
        await asyncio.wait_for(ws.wait_closed(), 10)
    finally:
        ws.transport.abort()
    assert ws.close_code == 1008 and "stalled" in (ws.close_reason or "")

    # A 200 KiB request trickled in one frame over ~2 s: the server's pings cannot be
    # answered meanwhile (slower than two keep-alive intervals), but bytes keep coming, so
    # it is read and answered.
    app = await app_factory(data_dir=app.data_dir.parent / "d2", request_receive_timeout_secs=1.0,
                            keepalive_interval_secs=0.5, **bridge_settings())
    url = ws_url(app)
    c = await WsClient.connect(url, token=TEST_TOKEN, identity=Ed25519PrivateKey.generate())
    body = wire.request_message(200, 7, delivery_pb2.EnqueueRequest(
        recipient_key=c.identity_key, payload=b"s" * 200_000).SerializeToString())
    fut: asyncio.Future = asyncio.get_running_loop().create_future()
    c._pending[7] = fut
    # Like a browser mid-frame, this client sends nothing else meanwhile (no pongs: it does
    # not read the server's pings until its frame is written).
    c.ws.transport.pause_reading()
    c.ws.transport.write(bytes([0x82, 0x80 | 127]) + struct.pack(">Q", len(body)) + b"\0" * 4)
    for i in range(0, len(body), 5000):
        c.ws.transport.write(body[i:i + 5000])
        await asyncio.sleep(0.05)  # pacing the slow sender, not synchronising
    c.ws.transport.resume_reading()
    answer = await asyncio.wait_for(fut, 10)
    assert answer.status == Status.OK and not c.closed.done()
    assert [len(m.data) for m in await c.fetch()] == [200_000]
    await c.close()


async def test_forwarded_addresses_are_canonical(app_factory) -> None:
    assert _canonical_ip("203.0.113.7:4000") == "203.0.113.7"
    assert _canonical_ip("[2001:DB8::1]:443") == "2001:db8::1"
    assert _canonical_ip("2001:0db8:0::1") == "2001:db8::1"
    assert _canonical_ip("::ffff:203.0.113.9") == "203.0.113.9"
    for junk in ("<script>", "999.1.1.1", "unknown", ""):
        assert _canonical_ip(junk) is None
    app = await app_factory(max_connections_per_ip=1,
                            **bridge_settings(trusted_proxies=["127.0.0.1"]))
    first = await WsClient.connect(ws_url(app), token=TEST_TOKEN,
                                   additional_headers={"X-Forwarded-For": "203.0.113.7:4000"})
    try:  # the same client through another source port: the same address, over its limit
        await WsClient.connect(ws_url(app), token=TEST_TOKEN,
                               additional_headers={"X-Forwarded-For": "203.0.113.7:4001"})
        raise AssertionError("admitted past max_connections_per_ip")
    except InvalidStatus as e:
        assert e.response.status_code == 503
    # Junk in the header: the last trusted hop (the proxy) is the address.
    junk = await WsClient.connect(ws_url(app), token=TEST_TOKEN,
                                  additional_headers={"X-Forwarded-For": "<script>"})
    assert {c.peer.host for c in bridge(app).conns} == {"203.0.113.7", "127.0.0.1"}
    await asyncio.gather(first.close(), junk.close())
