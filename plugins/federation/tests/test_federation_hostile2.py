"""Federation: the second review round's cases (each failed before its fix)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fed_helpers import (
    D1,
    D2,
    count_calls,
    fed_client,
    fed_transport,
    route_learnt,
    start_mesh,
    start_pair,
)
from qpc_federation.service import (
    FEDERATION_ANNOUNCE,
    FEDERATION_HEALTH,
    FEDERATION_LOOKUP,
    RELAY_ENQUEUE,
    RELAY_ENQUEUE_MANY,
)

from qpc_core.builtin import delivery as delivery_mod
from qpc_core.errors import BadRequest, RpcError, TooLarge, Unavailable
from qpc_core.framing import Status
from qpc_core.pb import delivery_pb2, federation_pb2
from qpc_core.users import register_user

Factory = Callable[..., Any]
D3 = "node3.test"


async def test_one_call_that_times_out_does_not_lock_the_peer_out(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    """A call that times out replaces the shared connection; the calls in flight on it fail
    (retryable) but the peer is healthy: the next call goes through at once."""
    n1, n2 = await start_pair(app_factory, tmp_path, relay_timeout_secs=30.0)
    bob = await connect(n2.app)
    await register_user(n2.app, "bob", bob.identity_key)
    alice = await connect(n1.app)
    assert (await alice.enqueue(bob.identity_key, b"warm-up")).seq == 1
    d2 = delivery_mod.get(n2.app)
    real_store = d2.store
    arrived = asyncio.Event()
    release = asyncio.Event()
    seen: list[bytes] = []

    async def held_store(sender: bytes, msgs: list[Any], **kw: Any) -> Any:
        seen.append(msgs[0].payload)
        if len(seen) >= 4:
            arrived.set()
        await release.wait()
        return await real_store(sender, msgs, **kw)

    d2.store = held_store  # type: ignore[method-assign]
    calls = [asyncio.ensure_future(alice.enqueue(bob.identity_key, b"m%d" % i))
             for i in range(4)]
    await asyncio.wait_for(arrived.wait(), 10)  # all four are at node2, held there
    n1.fed.cfg.relay_timeout_secs = 0.2  # a fifth one, held too, times out
    with pytest.raises(Unavailable, match="did not answer"):
        await alice.enqueue(bob.identity_key, b"m4")
    results = await asyncio.gather(*calls, return_exceptions=True)
    n1.fed.cfg.relay_timeout_secs = 30.0
    release.set()
    d2.store = real_store  # type: ignore[method-assign]
    assert D2 not in n1.fed._backoff  # no connect failed: no back-off
    assert (await alice.enqueue(bob.identity_key, b"next")).duplicate is False
    assert len(results) == 4


@pytest.mark.parametrize("message_id", [b"", b"i" * 16])
async def test_a_stale_route_in_a_batch_resends_only_its_own_part(
    app_factory: Factory, connect: Factory, tmp_path: Path, message_id: bytes
) -> None:
    n1, n2, n3 = await start_mesh(app_factory, tmp_path, [D1, D2, D3])
    bob, eve = await connect(n2.app), await connect(n3.app)
    await register_user(n2.app, "bob", bob.identity_key)
    await register_user(n3.app, "eve", eve.identity_key)
    alice = await connect(n1.app)
    await alice.batch_enqueue([bob.identity_key, eve.identity_key], b"hello")
    assert [m.data for m in await bob.fetch()] == [b"hello"]
    n3.fed.announce_local = lambda *a: None  # type: ignore[method-assign]  # "gone" is lost
    await eve.delete_account()
    res = await alice.batch_enqueue([bob.identity_key, eve.identity_key], b"once",
                                    message_id=message_id)
    assert [m.data for m in await bob.fetch()] == [b"once"]  # once, not twice
    assert not res[0].duplicate


async def test_a_batch_the_peer_refuses_as_a_whole_goes_item_by_item(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    n2.app.settings.max_payload_bytes = 64 * 1024  # a peer with a lower request limit
    bob = await connect(n2.app)
    await register_user(n2.app, "bob", bob.identity_key)
    alice = await connect(n1.app)
    await alice.enqueue(bob.identity_key, b"route")
    sent = await asyncio.gather(*(alice.enqueue(bob.identity_key, bytes([i]) * 20_000)
                                  for i in range(8)))
    assert sorted(r.seq for r in sent) == list(range(2, 10))
    got: list[bytes] = []
    while len(got) < 9:
        got += [m.data for m in await bob.fetch()]
    assert len(got) == 9


async def test_a_stale_route_for_the_sender_does_not_refuse_their_messages(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    bob = await connect(n2.app)
    await register_user(n2.app, "bob", bob.identity_key)
    alice = await connect(n1.app)
    n2.fed.routes[alice.identity_key] = D3  # an old home of alice's, not node1
    assert (await alice.enqueue(bob.identity_key, b"still delivered")).seq == 1
    assert [m.data for m in await bob.fetch()] == [b"still delivered"]


async def test_a_missed_registration_announcement_is_sent_again(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    bob_key = bytes(range(32))
    alice = await connect(n1.app)
    await alice.enqueue(bob_key, b"before")  # nobody hosts it: kept on node1
    assert bob_key in n1.fed.nowhere
    n2.fed._backoff[D1] = (time.monotonic() + 0.5, 0.5)  # node2 cannot reach node1 now
    told = route_learnt(n1, bob_key, D2)
    await register_user(n2.app, "bob", bob_key)
    await asyncio.wait_for(told.wait(), 15)  # retried once node1 is reachable again
    assert bob_key not in n1.fed.nowhere


async def test_forged_initials_cannot_take_the_peers_slots(
    app_factory: Factory, tmp_path: Path
) -> None:
    """The federation port always validates addresses (QUIC Retry) before keeping state,
    and counts handshakes in progress apart from the peers' connections."""
    n1, n2 = await start_pair(app_factory, tmp_path)
    # 40 Initials from two other source addresses that never complete a handshake.
    initial = bytearray(1200)
    initial[0] = 0xC0
    initial[1:5] = b"\x00\x00\x00\x01"
    initial[5] = 8
    for i, src in enumerate(["127.0.0.2", "127.0.0.3"] * 20):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((src, 0))
            initial[6:14] = i.to_bytes(8, "big")
            initial[14] = 0
            s.sendto(bytes(initial), ("127.0.0.1", n1.port))
        finally:
            s.close()
    peer = await fed_client(n1.port, D1, n2.cert_dir)
    try:
        h = await peer.call(FEDERATION_HEALTH,
                            federation_pb2.FederationHealthRequest(origin_domain=D2),
                            federation_pb2.FederationHealthResponse)
        assert h.domain == D1
    finally:
        await peer.close()


async def test_a_disabled_federation_reads_name_at_domain_as_before(
    app_factory: Factory, connect: Factory
) -> None:
    app = await app_factory(plugins=["federation"], federation={"domain": "here.test"})
    carol = await connect(app)
    await register_user(app, "carol", carol.identity_key)
    with pytest.raises(BadRequest):
        await carol.resolve_user("carol@here.test")


def _stall_after_retry(port: int, n: int, source: str) -> int:
    """``n`` handshakes from ``source`` that answer the server's Retry, then go silent."""
    from aioquic.quic.configuration import QuicConfiguration
    from aioquic.quic.connection import QuicConnection

    validated = 0
    for _ in range(n):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((source, 0))
            s.settimeout(1.0)
            c = QuicConnection(configuration=QuicConfiguration(
                is_client=True, alpn_protocols=["qpc-fed"], server_name=D1))
            c.connect(("127.0.0.1", port), now=time.time())
            for data, _addr in c.datagrams_to_send(now=time.time()):
                s.sendto(data, ("127.0.0.1", port))
            try:
                data, addr = s.recvfrom(65536)  # the Retry
            except TimeoutError:
                continue
            c.receive_datagram(data, addr, now=time.time())
            for data, _addr in c.datagrams_to_send(now=time.time()):
                s.sendto(data, ("127.0.0.1", port))  # the Initial with the token; then nothing
            validated += 1
    return validated


async def test_one_address_cannot_hold_the_federation_ports_handshakes(
    app_factory: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    t = fed_transport(n1.app)
    validated = await asyncio.to_thread(_stall_after_retry, n1.port, 10, "127.0.0.2")
    assert validated >= 8  # at least as many as one address may hold
    # The peer's datagrams are read after the attacker's (one socket, in order).
    h = await n2.fed.call(D1, FEDERATION_HEALTH, federation_pb2.FederationHealthRequest(
        origin_domain=D2), federation_pb2.FederationHealthResponse)
    assert h.status == "ok"
    assert t._half_per_ip.get("127.0.0.2", 0) <= 8


async def test_a_peer_without_announcements_is_not_asked_in_a_loop(
    app_factory: Factory, connect: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    fed_transport(n2.app).dispatcher.methods.pop(FEDERATION_ANNOUNCE)  # an older peer
    calls = count_calls(monkeypatch, only=FEDERATION_ANNOUNCE)
    for name in ("ann", "bea"):
        await register_user(n1.app, name, bytes([len(calls) + 7]) * 31 + name[:1].encode())
    await _announcers_done(n1)
    assert calls == [FEDERATION_ANNOUNCE]  # refused (UNIMPLEMENTED) once, then never again
    assert D2 in n1.fed._no_announce
    await register_user(n1.app, "cid", b"\x09" * 32)
    await _announcers_done(n1)
    assert calls == [FEDERATION_ANNOUNCE]


async def _announcers_done(node: Any) -> None:
    tasks = [t for t in node.app._tasks if t.get_name().startswith("federation-announce-")]
    await asyncio.wait_for(asyncio.gather(*tasks), 15)


@pytest.mark.parametrize("changes", [(True, False), (False, True)])
async def test_changes_missed_while_unreachable_arrive_in_their_final_state(
    app_factory: Factory, connect: Factory, tmp_path: Path, changes: tuple[bool, bool]
) -> None:
    """Register then delete (or delete then register) while node1 cannot be reached: node1
    learns only the final state, whatever order the retries run in."""
    n1, n2 = await start_pair(app_factory, tmp_path)
    key = bytes(range(1, 33))
    n2.fed._backoff[D1] = (time.monotonic() + 0.3, 0.3)  # node1 unreachable for now
    for hosted in changes:
        n2.fed.local_changed(key, hosted)
    await _announcers_done(n2)
    assert (n1.fed.routes.get(key) == D2) is changes[-1]


async def test_malformed_peer_requests_get_clear_errors_and_store_nothing(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    carol = await connect(n1.app)
    await register_user(n1.app, "carol", carol.identity_key)
    f = federation_pb2
    peer = await fed_client(n1.port, D1, n2.cert_dir)
    try:
        cases: list[tuple[int, Any, type[RpcError], str]] = [
            (RELAY_ENQUEUE, f.RelayEnqueueRequest(
                origin_domain=D2, sender_key=b"\x01" * 32,
                message=delivery_pb2.EnqueueRequest(recipient_key=b"\x02" * 31, payload=b"x")),
             BadRequest, "32 bytes"),
            (RELAY_ENQUEUE, f.RelayEnqueueRequest(
                origin_domain=D2, sender_key=b"\x01" * 5,
                message=delivery_pb2.EnqueueRequest(recipient_key=carol.identity_key,
                                                    payload=b"x")),
             BadRequest, "sender_key"),
            (RELAY_ENQUEUE, f.RelayEnqueueRequest(
                origin_domain=D2, sender_key=b"\x01" * 32,
                message=delivery_pb2.EnqueueRequest(recipient_key=carol.identity_key)),
             BadRequest, "payload"),
            (FEDERATION_LOOKUP, f.FederationLookupRequest(
                origin_domain=D2, identity_keys=[bytes([i % 256, i // 256]) * 16
                                                 for i in range(1001)]),
             TooLarge, "1000"),
            (FEDERATION_ANNOUNCE, f.FederationAnnounceRequest(origin_domain=D2,
                                                              hosted=[b"short"]),
             BadRequest, "32 bytes"),
            (RELAY_ENQUEUE_MANY, f.RelayEnqueueManyRequest(
                origin_domain=D2, items=[f.RelayEnqueueRequest()] * 257),
             TooLarge, "256"),
        ]
        for method, req, err, text in cases:
            with pytest.raises(err, match=text):
                await peer.call(method, req, f.FederationHealthResponse)
        r = await peer.call_raw(RELAY_ENQUEUE, b"\xff\xff\xff")  # not protobuf
        assert r.status == Status.BAD_REQUEST
        # and the connection is still good
        h = await peer.call(FEDERATION_HEALTH, f.FederationHealthRequest(origin_domain=D2),
                            f.FederationHealthResponse)
        assert h.status == "ok"
    finally:
        await peer.close()
    assert await carol.fetch() == []
