"""Federation against hostile or broken peers and clients (each case failed before its fix)."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aioquic.asyncio import connect as quic_connect
from aioquic.quic.configuration import QuicConfiguration
from cryptography.hazmat.primitives.serialization import Encoding
from fed_helpers import D1, D2, count_calls, fed_client, fed_transport, start_pair
from qpc_federation import certs
from qpc_federation.service import (
    FEDERATION_HEALTH,
    FEDERATION_LOOKUP,
    RELAY_BATCH_ENQUEUE,
    RELAY_ENQUEUE,
    RELAY_ENQUEUE_MANY,
)

from qpc_core.client.sdk import QpcClient
from qpc_core.dispatch import MAX_ERROR_MESSAGE, error_payload
from qpc_core.errors import BadRequest, Forbidden, QuotaExceeded, TooLarge, Unavailable
from qpc_core.framing import Status, encode_request
from qpc_core.pb import common_pb2, delivery_pb2, federation_pb2
from qpc_core.testing import free_udp_port
from qpc_core.transport.certs import load_certificate, load_private_key
from qpc_core.users import register_user

Factory = Callable[..., Any]


@pytest.mark.parametrize("client_cert", ["other-ca", "none"])
async def test_requests_in_the_refused_handshake_flight_never_run(
    app_factory: Factory, tmp_path: Path, client_cert: str
) -> None:
    n1, _n2 = await start_pair(app_factory, tmp_path)
    certs.make_ca(tmp_path / "other-ca")
    certs.issue(tmp_path / "other-ca", tmp_path / "intruder", D2)
    ran: list[int] = []
    dispatcher = fed_transport(n1.app).dispatcher
    real = dispatcher.call

    async def spy(conn: Any, frame: Any) -> bytes:
        ran.append(frame.method_id)
        return await real(conn, frame)

    dispatcher.call = spy  # type: ignore[method-assign]
    cfg = QuicConfiguration(is_client=True, alpn_protocols=["qpc-fed"], server_name=D1)
    cfg.load_verify_locations(cadata=load_certificate(tmp_path / "ca" / certs.CA_CERT)
                              .public_bytes(Encoding.PEM))
    if client_cert == "other-ca":
        cfg.certificate = load_certificate(tmp_path / "intruder" / certs.NODE_CERT)
        cfg.private_key = load_private_key(tmp_path / "intruder" / certs.NODE_KEY)
    # With a bearer token in field 15 too: it must not stand in for the certificate.
    req = federation_pb2.FederationHealthRequest(origin_domain=D2).SerializeToString()
    req += common_pb2.AuthEnvelope(auth=common_pb2.Auth(access_token=b"devtoken")) \
        .SerializeToString()
    async with quic_connect("127.0.0.1", n1.port, configuration=cfg,
                            wait_connected=False) as proto:
        quic = proto._quic
        for i in range(5):  # queued before the handshake: they leave with the Finished
            quic.send_stream_data(quic.get_next_available_stream_id(),
                                  encode_request(FEDERATION_HEALTH, i + 1, req), end_stream=True)
        proto.transmit()
        await asyncio.wait_for(proto.wait_closed(), 5)
        assert quic._close_event is not None
        assert quic._close_event.reason_phrase == "peer certificate refused"
    assert ran == []


async def test_a_token_does_not_stand_in_for_the_peer_certificate(
    app_factory: Factory, tmp_path: Path
) -> None:
    """On an accepted peer connection a request's Auth field is not read at all."""
    n1, n2 = await start_pair(app_factory, tmp_path)
    peer = await fed_client(n1.port, D1, n2.cert_dir)
    try:
        payload = federation_pb2.FederationHealthRequest(origin_domain=D2).SerializeToString()
        payload += common_pb2.AuthEnvelope(auth=common_pb2.Auth(access_token=b"wrong")) \
            .SerializeToString()
        r = await peer.call_raw(FEDERATION_HEALTH, payload)
        assert r.status == Status.OK  # a bad token would be UNAUTHENTICATED if it were read
    finally:
        await peer.close()


async def test_a_peer_that_lost_the_connection_is_reconnected(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    """A peer that restarted drops packets of the connections it no longer knows: after one
    timed-out (retryable) call the origin opens a new connection, and no call state leaks."""
    n1, n2 = await start_pair(app_factory, tmp_path, relay_timeout_secs=1.0)
    bob = await connect(n2.app)
    await register_user(n2.app, "bob", bob.identity_key)
    alice = await connect(n1.app)
    assert (await alice.enqueue(bob.identity_key, b"1")).seq == 1
    old = n1.fed._clients[D2]
    fed_transport(n2.app).server._protocols.clear()  # node2 forgets every connection
    with pytest.raises(Unavailable):
        await alice.enqueue(bob.identity_key, b"lost")
    assert old.protocol.waiters == {}  # the timed-out call was given up on both sides
    assert (await alice.enqueue(bob.identity_key, b"2")).seq in (2, 3)
    assert n1.fed._clients[D2] is not old
    assert b"2" in [m.data for m in await bob.fetch()]


async def test_peers_refusing_this_server_are_not_hammered(
    app_factory: Factory, connect: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = free_udp_port()
    n1, _n2 = await start_pair(app_factory, tmp_path, extra_peers=[("node3.test", dead)],
                               relay_timeout_secs=0.3)
    handshakes: list[str] = []
    real = QpcClient.connect

    async def counting(*a: Any, **kw: Any) -> Any:
        cfg = kw.get("configuration")
        handshakes.append(cfg.server_name if cfg is not None else "client")
        return await real(*a, **kw)

    monkeypatch.setattr(QpcClient, "connect", counting)
    alice = await connect(n1.app)
    handshakes.clear()
    with pytest.raises(Unavailable, match="node3"):
        await alice.enqueue(os.urandom(32), b"x")
    # The failed connect started a back-off of 1 s (doubling while it keeps failing) ...
    until, delay = n1.fed._backoff["node3.test"]
    assert delay == 1.0 and until > time.monotonic() - 1.0
    # ... during which calls are refused at once instead of each starting a handshake.
    # (Its end is moved out of reach so that a slow machine cannot end it mid-test.)
    n1.fed._backoff["node3.test"] = (time.monotonic() + 60.0, delay)
    for _ in range(4):
        with pytest.raises(Unavailable, match="node3"):
            await alice.enqueue(os.urandom(32), b"x")
    assert handshakes.count("node3.test") == 1


async def test_unknown_recipients_are_looked_up_not_sent_around(
    app_factory: Factory, connect: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A BatchEnqueue to 300 keys nobody hosts: one FederationLookup per peer, no payload
    sent anywhere; a peer with a smaller message limit is never asked to take the payload."""
    n1, n2 = await start_pair(app_factory, tmp_path)
    n2.app.settings.max_message_bytes = 1000
    calls = count_calls(monkeypatch)
    alice = await connect(n1.app)
    keys = [os.urandom(32) for _ in range(300)]
    res = await alice.batch_enqueue(keys, os.urandom(32 * 1024))
    assert [r.seq for r in res] == [1] * 300  # stored on node1
    assert calls == [FEDERATION_LOOKUP]
    assert RELAY_ENQUEUE not in calls and RELAY_BATCH_ENQUEUE not in calls


async def test_a_message_too_large_to_relay_is_too_large(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path, )
    n1.app.settings.max_message_bytes = 4 * 1024 * 1024
    bob = await connect(n2.app)
    await register_user(n2.app, "bob", bob.identity_key)
    alice = await connect(n1.app)
    biggest = n1.app.state["delivery"].max_message()
    with pytest.raises(TooLarge, match="too large to relay"):
        await alice.enqueue(bob.identity_key, b"x" * biggest)


async def test_a_peer_cannot_speak_for_this_servers_users(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    carol, dave = await connect(n1.app), await connect(n1.app)
    await register_user(n1.app, "carol", carol.identity_key)
    await register_user(n1.app, "dave", dave.identity_key)
    peer = await fed_client(n1.port, D1, n2.cert_dir)  # node2 posing as carol's server
    try:
        with pytest.raises(Forbidden, match="user of this server"):
            await peer.call(RELAY_ENQUEUE, federation_pb2.RelayEnqueueRequest(
                origin_domain=D2, sender_key=carol.identity_key,
                message=delivery_pb2.EnqueueRequest(recipient_key=dave.identity_key,
                                                    payload=b"forged")),
                delivery_pb2.EnqueueResponse)
    finally:
        await peer.close()
    assert await dave.fetch() == []


async def test_client_connections_cannot_crowd_out_peers(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    carol = await connect(n1.app)
    await register_user(n1.app, "carol", carol.identity_key)
    n1.app.settings.max_connections = len(n1.app.connections)  # client port full
    bob = await connect(n2.app)
    r = await bob.enqueue(carol.identity_key, b"through the federation port")
    assert r.seq == 1
    assert [m.data for m in await carol.fetch()] == [b"through the federation port"]


async def test_health_says_draining_and_refusals_are_logged_sparingly(
    app_factory: Factory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    (tmp_path / "anon").mkdir()
    (tmp_path / "anon" / certs.CA_CERT).write_bytes((tmp_path / "ca" / certs.CA_CERT).read_bytes())
    with caplog.at_level(logging.WARNING, logger="qpc.quic"):
        for _ in range(4):
            c = await fed_client(n1.port, D1, tmp_path / "anon")
            await asyncio.wait_for(c.protocol.wait_closed(), 5)
            await c.close()
    refused = [r for r in caplog.records if "refused a peer certificate" in r.getMessage()]
    assert len(refused) == 1 and fed_transport(n1.app).peers_refused == 4
    peer = await fed_client(n1.port, D1, n2.cert_dir)
    try:
        n1.app.draining = True  # what App.stop() sets first
        h = await peer.call(FEDERATION_HEALTH,
                            federation_pb2.FederationHealthRequest(origin_domain=D2),
                            federation_pb2.FederationHealthResponse)
        assert (h.status, h.domain) == ("draining", D1)
    finally:
        n1.app.draining = False
        await peer.close()


async def test_oversize_names_get_short_answers(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, _n2 = await start_pair(app_factory, tmp_path)
    alice = await connect(n1.app)
    with pytest.raises(BadRequest) as e:
        await alice.resolve_user("x" * 100_000 + "@node2.test")
    assert len(e.value.message) < 200
    assert len(error_payload(Status.NOT_FOUND, "y" * 5_000_000)) < MAX_ERROR_MESSAGE + 64


async def test_relays_ready_together_share_one_request_and_fail_alone(
    app_factory: Factory, connect: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    bob, dave = await connect(n2.app), await connect(n2.app)
    await register_user(n2.app, "bob", bob.identity_key)
    await register_user(n2.app, "dave", dave.identity_key)
    alice = await connect(n1.app)
    for i in range(3):
        assert (await alice.enqueue(bob.identity_key, b"fills bob's queue")).seq == i + 1
    n2.app.settings.max_queue_depth = 3
    calls = count_calls(monkeypatch)
    results = await asyncio.gather(
        alice.enqueue(bob.identity_key, b"refused"),
        *(alice.enqueue(dave.identity_key, b"d%d" % i) for i in range(3)),
        return_exceptions=True)
    assert calls == [RELAY_ENQUEUE_MANY]  # four relays, one request
    assert isinstance(results[0], QuotaExceeded)
    assert sorted(r.seq for r in results[1:] if not isinstance(r, BaseException)) == [1, 2, 3]
    assert sorted(m.data for m in await dave.fetch()) == [b"d0", b"d1", b"d2"]
    assert n1.fed.stats.relayed[D2] == 6  # the first three, then three of these four
