"""End-to-end tests of the core server over real QUIC on loopback."""

from __future__ import annotations

import asyncio
import struct

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from plugin_helpers import use_fake_plugins

from conftest import quic_transport
from qpc_core.client.sdk import ConnectionLost
from qpc_core.errors import BadRequest, Forbidden, Unauthenticated, Unavailable, Unimplemented
from qpc_core.framing import PushEvent, Status, encode_request
from qpc_core.identity import prove_identity_message, public_bytes
from qpc_core.pb import common_pb2


async def test_health(server, connect) -> None:
    c = await connect(server)
    h = await c.health()
    assert h.status == "ok"
    assert h.version == server.version
    assert len(h.signing_key) == 32


async def test_health_without_any_auth(server, connect) -> None:
    c = await connect(server, token=None, new_identity=False)
    assert (await c.health()).status == "ok"
    who = await c.whoami()
    assert not who.authenticated


async def test_unknown_method_keeps_connection(server, connect) -> None:
    c = await connect(server)
    with pytest.raises(Unimplemented, match="unknown method 4242"):
        await c.call(4242, common_pb2.HealthRequest(), common_pb2.HealthResponse)
    frame = await c.call_raw(4242, b"")
    assert frame.status == Status.UNIMPLEMENTED
    err = common_pb2.Error.FromString(frame.payload)
    assert err.name == "UNIMPLEMENTED" and err.code == Status.UNIMPLEMENTED
    assert (await c.health()).status == "ok"


async def _raw_stream(c, data: bytes, *, fin: bool = True):
    proto = c.protocol
    return await proto.roundtrip(data, raw=True) if fin else None


@pytest.mark.parametrize(
    "garbage",
    [
        struct.pack(">HII", 802, 1, 5 * 1024 * 1024),  # oversize length in the header
        b"\xff" * 40,  # garbage
        encode_request(802, 1, b"abc")[:-1],  # truncated by FIN
        encode_request(802, 1, b"") + b"extra",  # bytes after the frame
    ],
)
async def test_malformed_frame_fails_only_its_stream(server, connect, garbage: bytes) -> None:
    c = await connect(server)
    reply = await _raw_stream(c, garbage)
    status, _rid, length = struct.unpack(">BII", reply[:9])
    assert status == Status.PROTOCOL_ERROR
    err = common_pb2.Error.FromString(reply[9 : 9 + length])
    assert "protocol error" in err.message
    assert (await c.health()).status == "ok"  # the connection survived


async def test_malformed_protobuf_is_bad_request(server, connect) -> None:
    c = await connect(server)
    frame = await c.call_raw(200, b"\xff\xff\xff")
    assert frame.status == Status.BAD_REQUEST
    with pytest.raises(BadRequest):
        from qpc_core.client.sdk import decode_error

        raise decode_error(frame)


async def test_ten_thousand_streams_are_freed(server, connect) -> None:
    c = await connect(server)
    (conn,) = list(server.connections)
    payload = common_pb2.HealthRequest().SerializeToString()
    total = 0
    for _ in range(100):
        frames = await asyncio.gather(*(c.call_raw(802, payload) for _ in range(100)))
        assert all(f.status == Status.OK for f in frames)
        total += len(frames)
    assert total == 10_000
    assert conn.streams == {}
    assert server.in_flight == 0
    assert c.protocol.waiters == {}


async def test_bytes_after_a_protocol_error_are_not_a_new_request(server, connect) -> None:
    c = await connect(server)
    (conn,) = list(server.connections)
    quic = c.protocol._quic
    sid = quic.get_next_available_stream_id()
    fut = asyncio.get_running_loop().create_future()
    from qpc_core.framing import ResponseDecoder

    c.protocol.waiters[sid] = (ResponseDecoder(), fut)
    quic.send_stream_data(sid, struct.pack(">HII", 802, 1, 5 * 1024 * 1024), end_stream=False)
    c.protocol.transmit()
    frame = await asyncio.wait_for(fut, 10)
    assert frame.status == Status.PROTOCOL_ERROR
    from qpc_core.hookspecs import hookimpl

    health_calls: list[int] = []

    class Spy:
        @hookimpl
        def on_rpc_completed(self, method_id):  # a subset of the spec's arguments is fine
            if method_id == 802:
                health_calls.append(method_id)

    server.pm.register(Spy(), name="spy")
    server.hooks._cache.clear()
    try:  # the server asked us to stop sending; a misbehaving client sends more anyway
        quic.send_stream_data(sid, encode_request(802, 2, b""), end_stream=True)
        c.protocol.transmit()
    except Exception:
        pass
    assert (await c.health()).status == "ok"
    assert health_calls == [802]  # only our Health ran; the stray frame was discarded
    assert sid not in conn.streams or conn.streams[sid].dead


async def test_reset_stream_frees_state(server, connect) -> None:
    c = await connect(server)
    (conn,) = list(server.connections)
    quic = c.protocol._quic
    sid = quic.get_next_available_stream_id()
    quic.send_stream_data(sid, encode_request(802, 1, b"abcdef")[:7], end_stream=False)
    c.protocol.transmit()
    assert (await c.health()).status == "ok"
    assert sid in conn.streams  # half a frame is being held
    quic.reset_stream(sid, 0)
    c.protocol.transmit()
    assert (await c.health()).status == "ok"
    assert conn.streams == {}


async def test_unauthenticated_connection_is_refused(server, connect) -> None:
    c = await connect(server, token=None, new_identity=False)
    with pytest.raises(Unauthenticated):
        await c.enqueue(b"\x01" * 32, b"hello")
    with pytest.raises(Unauthenticated):
        await c.fetch(recipient=b"\x01" * 32)
    assert (await c.health()).status == "ok"


async def test_wrong_token_is_refused_at_handshake(server, connect) -> None:
    with pytest.raises(Unauthenticated):
        await connect(server, token="not-the-token")


async def test_auth_field_per_request(server, connect) -> None:
    c = await connect(server, token=None, new_identity=False)
    req = common_pb2.WhoAmIRequest(auth=common_pb2.Auth(access_token=b"devtoken"))
    who = await c.call(106, req, common_pb2.WhoAmIResponse)
    assert who.authenticated and who.auth_kind == "operator-token"
    bad = common_pb2.WhoAmIRequest(auth=common_pb2.Auth(access_token=b"wrong"))
    with pytest.raises(Unauthenticated):
        await c.call(106, bad, common_pb2.WhoAmIResponse)


async def test_token_client_must_prove_identity(server, connect) -> None:
    me = Ed25519PrivateKey.generate()
    c = await connect(server, identity=me)
    who = await c.whoami()
    assert who.identity_key == public_bytes(me)

    # A token-only connection (no proof) has no identity: identity methods refuse it.
    anon = await connect(server, new_identity=False)
    with pytest.raises(Unauthenticated, match="proven identity"):
        await anon.fetch(recipient=public_bytes(me))


async def test_token_client_cannot_claim_another_identity(server, connect) -> None:
    victim = Ed25519PrivateKey.generate()
    attacker = Ed25519PrivateKey.generate()
    c = await connect(server, identity=attacker)
    ch = await c.call(104, common_pb2.AuthChallengeRequest(), common_pb2.AuthChallengeResponse)
    # The attacker signs the victim's key with its own key: refused.
    forged = attacker.sign(prove_identity_message(ch.nonce, public_bytes(victim)))
    with pytest.raises(Unauthenticated, match="does not verify"):
        await c.call(
            105,
            common_pb2.ProveIdentityRequest(identity_key=public_bytes(victim), signature=forged),
            common_pb2.ProveIdentityResponse,
        )
    # A replayed challenge is refused too (single use).
    good = victim.sign(prove_identity_message(ch.nonce, public_bytes(victim)))
    with pytest.raises(BadRequest, match="no challenge"):
        await c.call(
            105,
            common_pb2.ProveIdentityRequest(identity_key=public_bytes(victim), signature=good),
            common_pb2.ProveIdentityResponse,
        )
    with pytest.raises(Forbidden):
        await c.fetch(recipient=public_bytes(victim))
    who = await c.whoami()
    assert who.identity_key == public_bytes(attacker)


async def test_wrong_size_identity_key_is_bad_request(server, connect) -> None:
    c = await connect(server)
    for n in (0, 31, 33):
        with pytest.raises(BadRequest, match="exactly 32 bytes"):
            await c.enqueue(b"\x01" * n, b"hi")


async def test_graceful_shutdown_finishes_in_flight_rpc(app_factory, connect, monkeypatch) -> None:
    use_fake_plugins(monkeypatch, slow="slow")
    app = await app_factory(plugins=["slow"])
    c = await connect(app)
    st = app.state["slow"]
    call = asyncio.ensure_future(
        c.call(9100, common_pb2.HealthRequest(), common_pb2.HealthResponse)
    )
    await st["started"].wait()
    assert app.in_flight == 1
    stopping = asyncio.ensure_future(app.stop())
    # Draining: new calls are refused while the in-flight one is still running; Health
    # still answers (and says so), and connected clients were told by a push.
    with pytest.raises(Unavailable, match="shutting down"):
        await c.fetch()
    assert (await c.health()).status == "draining"
    push = await asyncio.wait_for(c.pushes.get(), 10)
    assert push.event_type == PushEvent.SERVER_SHUTTING_DOWN
    assert not call.done()
    st["release"].set()
    resp = await call
    assert resp.status == "finished"
    await stopping
    assert app.in_flight == 0
    await asyncio.wait_for(c.protocol.wait_closed(), 5)
    assert c.protocol.closed_reason == "server shutting down"


async def test_new_connections_refused_while_draining(server, connect) -> None:
    await quic_transport(server).stop_accepting()
    c = await connect(server, token=None, new_identity=False)
    with pytest.raises(ConnectionLost, match="server shutting down"):
        await c.health()
    assert server.connections == set()


@pytest.mark.parametrize("keepalive", [0.2, 0.0])
async def test_keepalive_keeps_idle_clients_connected(app_factory, connect, keepalive) -> None:
    """A client whose own idle timeout (1 s) is shorter than the server's survives an idle
    period thanks to the server's keep-alive pings; without them it is dropped (control)."""
    app = await app_factory(keepalive_interval_secs=keepalive)
    c = await connect(app, idle_timeout=1.0)
    assert (await c.health()).status == "ok"
    # Waiting out the idle timeout is the behaviour under test, not synchronisation.
    await asyncio.sleep(2.5)
    if keepalive:
        assert (await c.health()).status == "ok"
        assert c.protocol.closed_reason is None
    else:
        with pytest.raises(ConnectionLost):
            await c.health()


async def test_identity_proof_is_bound_to_the_server_certificate(
    app_factory, connect, tmp_path
) -> None:
    """A server that passes another server's challenge to its own client cannot use the
    proof it gets back there: the signature covers the certificate the client verified."""
    from qpc_core.identity import certificate_binding
    from qpc_core.transport.certs import DEV_CERT_DER

    a = await app_factory()
    b = await app_factory(data_dir=tmp_path / "b")
    victim_key = Ed25519PrivateKey.generate()
    victim = public_bytes(victim_key)
    on_b = await connect(b, identity=victim_key)  # the victim talks to B
    b_binding = on_b.server_cert_binding()
    assert b_binding == certificate_binding((tmp_path / "b" / DEV_CERT_DER).read_bytes())
    relay = await connect(a, new_identity=False)  # B's operator connection to A
    ch = await relay.call(104, common_pb2.AuthChallengeRequest(), common_pb2.AuthChallengeResponse)
    relayed = victim_key.sign(prove_identity_message(ch.nonce, victim, b_binding))
    with pytest.raises(Unauthenticated, match="does not verify"):
        await relay.call(
            105,
            common_pb2.ProveIdentityRequest(identity_key=victim, signature=relayed),
            common_pb2.ProveIdentityResponse,
        )
    assert (await relay.whoami()).identity_key == b""
    # The victim's own proof to A (bound to A's certificate) works.
    on_a = await connect(a, identity=victim_key)
    assert on_a.server_cert_binding() != b_binding
    assert (await on_a.whoami()).identity_key == victim


@pytest.mark.parametrize("backend", ["aioquic", "qh3"])
async def test_sdk_binds_its_identity_proof_on_either_quic_library(server, connect, backend):
    me = Ed25519PrivateKey.generate()
    c = await connect(server, identity=me, quic_backend=backend)  # proves on connect
    assert len(c.server_cert_binding()) == 32
    assert (await c.whoami()).identity_key == public_bytes(me)
