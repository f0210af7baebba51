"""Review round 3: per-request credentials on both transports (a long poll carrying its own
Auth field outlives the auth deadline; Logout through an Auth field leaves the connection
without a credential; such a credential ends with its session), the bridge's idle limit
without pings, and session timers that fire early (a wall clock stepped back)."""

from __future__ import annotations

import asyncio
import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_auth_opaque import client as oc
from qpc_auth_opaque import opaque
from qpc_ws_bridge.client import WsClient
from ws_helpers import bridge, bridge_settings, until, ws_url

from qpc_core.client.sdk import ConnectionLost
from qpc_core.framing import Status
from qpc_core.pb import common_pb2, delivery_pb2
from qpc_core.rpc import AuthResult
from qpc_core.testing import TEST_TOKEN, quic_transport

FAST = opaque.IdentityKSF()


async def opaque_app(app_factory, connect, **kw):
    settings = bridge_settings()
    settings["plugins"] = ["auth_opaque", "ws_bridge"]
    lifetime = kw.pop("lifetime", 3600)
    app = await app_factory(auth_opaque={"ksf": "identity", "session_lifetime_secs": lifetime},
                            **kw, **settings)
    key = Ed25519PrivateKey.generate()
    q = await connect(app, token=None, identity=key)
    await oc.register(q, "alice", "pw", ksf=FAST)
    token = (await oc.login(q, "alice", "pw", ksf=FAST)).session_token
    return app, q, token


def with_auth(msg, token: bytes) -> bytes:
    msg.auth.CopyFrom(common_pb2.Auth(access_token=token))
    return msg.SerializeToString()


async def test_a_long_poll_with_its_own_auth_field_outlives_the_auth_deadline(
        app_factory, connect) -> None:
    app, q, token = await opaque_app(app_factory, connect, auth_timeout_secs=0.5)
    poll = with_auth(delivery_pb2.FetchRequest(recipient_key=q.identity_key, timeout_ms=4000),
                     token)
    ws = await WsClient.connect(ws_url(app))  # no AUTH message: the request's field only
    quic = await connect(app, token=None, identity=None, new_identity=False)
    ws_poll = asyncio.ensure_future(ws.call_raw(202, poll))
    quic_poll = asyncio.ensure_future(quic.call_raw(202, poll))
    conn = next(iter(bridge(app).conns))
    await until(lambda: conn.authenticated)  # from the accepted field, before the call ends
    # Well past the 0.5 s deadline, both long polls are still waiting, then answered.
    deadline = time.monotonic() + 1.5
    await until(lambda: time.monotonic() > deadline, timeout=5)
    assert not ws.closed.done() and not ws_poll.done() and not quic_poll.done()
    await q.enqueue(q.identity_key, b"for the long polls")
    # One poll takes the message; the other ends empty at its 4 s: both answered, neither
    # connection closed by the 0.5 s deadline meanwhile.
    answers = await asyncio.wait_for(asyncio.gather(ws_poll, quic_poll), 15)
    assert all(a.status == Status.OK for a in answers)
    got = [delivery_pb2.FetchResponse.FromString(a.payload).messages for a in answers]
    assert sorted(len(m) for m in got) == [0, 1]
    assert not ws.closed.done()
    await ws.close()


async def test_logout_through_an_auth_field_leaves_no_credential(app_factory, connect) -> None:
    app, q, token = await opaque_app(app_factory, connect, auth_timeout_secs=0.5)
    ws = await WsClient.connect(ws_url(app))
    out = await ws.call_raw(107, with_auth(common_pb2.LogoutRequest(), token))
    assert out.status == Status.OK
    conn = next(iter(bridge(app).conns))
    assert not conn.authenticated
    await asyncio.wait_for(ws.closed, 10)  # closed at the auth deadline again
    assert ws.ws.close_code == 1008
    # QUIC: the same through a request's Auth field (q, bound to the session logged out
    # above, lost it too: a new login on a new connection).
    q2 = await connect(app, token=None, identity=q.identity)
    token2 = (await oc.login(q2, "alice", "pw", ksf=FAST)).session_token
    plain = await connect(app, token=None, identity=None, new_identity=False)
    out = await plain.call_raw(107, with_auth(common_pb2.LogoutRequest(), token2))
    assert out.status == Status.OK
    with pytest.raises(ConnectionLost, match="not authenticated"):
        for _ in range(100):  # until the deadline closes it (bounded)
            await plain.health()
            await asyncio.sleep(0.05)


async def test_a_request_credential_ends_with_its_session(app_factory, connect) -> None:
    app, q, token = await opaque_app(app_factory, connect, lifetime=1, auth_timeout_secs=30)
    ws = await WsClient.connect(ws_url(app))
    out = await ws.call_raw(201, with_auth(delivery_pb2.FetchRequest(
        recipient_key=q.identity_key), token))
    assert out.status == Status.OK
    conn = next(iter(bridge(app).conns))
    proto = next(p for p in quic_transport(app).protocols if p.identity_key == q.identity_key)
    assert conn.authenticated and conn._request_auths
    await until(lambda: not conn._request_auths)  # at the session's end
    assert not conn.authenticated and conn._auth_timer is not None
    assert conn.ws.protocol.max_message_size == bridge(app).preauth_max_message
    await until(lambda: proto.auth is None)  # the QUIC login's session ended too
    await ws.close()


async def test_the_bridge_closes_idle_connections_without_pings(app_factory) -> None:
    app = await app_factory(keepalive_interval_secs=0, max_idle_timeout_secs=0.5,
                            **bridge_settings())
    c = await WsClient.connect(ws_url(app), token=TEST_TOKEN,
                               identity=Ed25519PrivateKey.generate())
    c.ws.transport.pause_reading()  # gone quiet (and no pings to answer)
    b = bridge(app)
    await until(lambda: not b.conns)
    assert b.per_ip == {} and not app.by_identity
    c.ws.transport.abort()


async def test_a_session_timer_that_fires_early_checks_the_clock_again(app_factory) -> None:
    app = await app_factory(**bridge_settings())
    c = await WsClient.connect(ws_url(app), token=TEST_TOKEN)
    conn = next(iter(bridge(app).conns))
    session = AuthResult(kind="session", identity_key=b"\7" * 32, session_id=b"s",
                         expires_at=time.time() + 3600)
    conn.bind(session)
    timer = conn._expiry
    assert timer is not None and timer.when() - asyncio.get_running_loop().time() <= 3600
    conn._check_expiry()  # as if the wall clock had been stepped back an hour
    assert conn.auth is session and conn._expiry is not None  # still bound, re-armed
    session.expires_at = time.time() - 1  # and now really over
    conn._check_expiry()
    assert conn.auth is None and b"\7" * 32 not in app.by_identity
    push = await asyncio.wait_for(c.pushes.get(), 10)
    assert common_pb2.SessionRevokedEvent.FromString(push.payload).reason == "session expired"
    await c.close()
