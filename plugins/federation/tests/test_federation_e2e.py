"""Federation end to end: real qpc servers on loopback, mutual-TLS QUIC between them, the
real SDK as the users' client."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fed_helpers import D1, D2, fed_client, route_learnt, start_pair
from prometheus_client import generate_latest
from qpc_federation import certs
from qpc_federation.service import (
    FEDERATION_HEALTH,
    PROXY_FETCH_HYBRID_KEY,
    PROXY_FETCH_KEY_PACKAGE,
    PROXY_RESOLVE_USER,
    RELAY_ENQUEUE,
)

from qpc_core.admin import metrics_registry
from qpc_core.client.loadtest import run_loadtest
from qpc_core.client.sdk import ConnectionLost
from qpc_core.errors import Forbidden, NotFound, QuotaExceeded, Unavailable, Unimplemented
from qpc_core.pb import delivery_pb2, directory_pb2, federation_pb2, keys_pb2
from qpc_core.testing import free_udp_port, quic_port
from qpc_core.users import register_user

Factory = Callable[..., Any]


async def test_enqueue_to_a_user_of_the_peer_is_relayed_there(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    bob = Ed25519PrivateKey.generate()
    bob_on_2 = await connect(n2.app, identity=bob)
    await register_user(n2.app, "bob", bob_on_2.identity_key)
    alice = await connect(n1.app)
    # The SDK verifies the delivery proof with node1's key (verify=True is the default).
    r = await alice.enqueue(bob_on_2.identity_key, b"hello across", message_id=b"m" * 16)
    assert (r.seq, r.duplicate) == (1, False)
    msgs = await bob_on_2.fetch()
    assert [(m.seq, m.data) for m in msgs] == [(1, b"hello across")]
    assert n1.fed.routes[bob_on_2.identity_key] == D2
    # Not stored on node1: the same identity connected there finds nothing.
    bob_on_1 = await connect(n1.app, identity=bob)
    assert await bob_on_1.fetch() == []
    # A retry with the same message_id is the home server's duplicate, not a second copy.
    r = await alice.enqueue(bob_on_2.identity_key, b"hello across", message_id=b"m" * 16)
    assert (r.seq, r.duplicate) == (1, True)
    assert await bob_on_2.fetch() == []


async def test_batch_enqueue_splits_between_here_and_the_peer(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    carol = await connect(n1.app)
    await register_user(n1.app, "carol", carol.identity_key)
    bob, dave = await connect(n2.app), await connect(n2.app)
    await register_user(n2.app, "bob", bob.identity_key)
    await register_user(n2.app, "dave", dave.identity_key)
    alice = await connect(n1.app)
    keys = [carol.identity_key, bob.identity_key, dave.identity_key]
    # First BatchEnqueue: bob's and dave's home is not known yet (each found by asking).
    res = await alice.batch_enqueue(keys, b"one", message_id=b"a" * 16)
    assert [(r.seq, r.duplicate) for r in res] == [(1, False)] * 3
    # Second: both routes are known: one RelayBatchEnqueue to node2 for the two of them.
    res = await alice.batch_enqueue(keys, b"two", message_id=b"b" * 16)
    assert [(r.seq, r.duplicate) for r in res] == [(2, False)] * 3
    for c in (carol, bob, dave):
        assert [m.data for m in await c.fetch()] == [b"one", b"two"]
    assert n1.fed.stats.relayed == {D2: 4}
    assert n2.fed.stats.received == {D1: 4}
    text = generate_latest(metrics_registry(n1.app)).decode()
    assert 'federation_relayed_messages_total{peer="node2.test"} 4.0' in text
    assert 'federation_peer_connected{peer="node2.test"} 1.0' in text
    assert "federation_routes 2.0" in text


async def test_recipient_no_peer_hosts_is_stored_here_and_remembered(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, _n2 = await start_pair(app_factory, tmp_path)
    alice = await connect(n1.app)
    nobody = await connect(n1.app)  # a bearer-token identity: in no directory
    assert (await alice.enqueue(nobody.identity_key, b"kept here")).seq == 1
    assert [m.data for m in await nobody.fetch()] == [b"kept here"]
    assert nobody.identity_key in n1.fed.nowhere
    assert nobody.identity_key not in n1.fed.routes


async def test_unreachable_peer_fails_the_call_and_stores_nothing(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    dead = free_udp_port()  # node3: configured, never started
    n1, n2 = await start_pair(app_factory, tmp_path, extra_peers=[("node3.test", dead)],
                              relay_timeout_secs=0.5)
    alice = await connect(n1.app)
    someone = await connect(n1.app)
    # node2 says NOT_FOUND, node3 cannot be asked: which server hosts the key is unknown.
    with pytest.raises(Unavailable, match=r"node3\.test"):
        await alice.enqueue(someone.identity_key, b"x")
    assert await someone.fetch() == []
    assert someone.identity_key not in n1.fed.nowhere
    # A known home that went away: UNAVAILABLE (retryable), never stored on node1.
    bob = await connect(n2.app)
    await register_user(n2.app, "bob", bob.identity_key)
    assert (await alice.enqueue(bob.identity_key, b"first")).seq == 1
    await n2.app.stop()
    with pytest.raises(Unavailable) as e:
        await alice.enqueue(bob.identity_key, b"second")
    assert e.value.retry_after is not None
    # Nothing of it was kept on node1 either (bob's identity connected there finds nothing).
    assert bob.identity is not None
    bob_on_1 = await connect(n1.app, identity=bob.identity)
    assert await bob_on_1.fetch() == []


async def test_federation_methods_are_not_served_on_the_client_port(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, _n2 = await start_pair(app_factory, tmp_path)
    c = await connect(n1.app)
    with pytest.raises(Unimplemented):
        await c.call(FEDERATION_HEALTH, federation_pb2.FederationHealthRequest(origin_domain=D2),
                     federation_pb2.FederationHealthResponse)


async def test_peer_calls_health_and_proxies(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    carol = await connect(n1.app)
    await register_user(n1.app, "carol", carol.identity_key)
    await carol.upload_key_package(b"kp-1")
    await carol.upload_hybrid_key(b"\x07" * 1216)
    peer = await fed_client(n1.port, D1, n2.cert_dir)  # node2's certificate
    try:
        h = await peer.call(FEDERATION_HEALTH,
                            federation_pb2.FederationHealthRequest(origin_domain=D2),
                            federation_pb2.FederationHealthResponse)
        assert (h.status, h.domain) == ("ok", D1)
        u = await peer.call(PROXY_RESOLVE_USER,
                            federation_pb2.ProxyResolveUserRequest(origin_domain=D2,
                                                                   username="Carol"),
                            directory_pb2.ResolveUserResponse)
        assert (u.username, u.identity_key) == ("carol", carol.identity_key)
        with pytest.raises(NotFound):
            await peer.call(PROXY_RESOLVE_USER,
                            federation_pb2.ProxyResolveUserRequest(origin_domain=D2,
                                                                   username="nobody"),
                            directory_pb2.ResolveUserResponse)
        kp = await peer.call(PROXY_FETCH_KEY_PACKAGE, federation_pb2.ProxyFetchKeyPackageRequest(
            origin_domain=D2, identity_key=carol.identity_key), keys_pb2.FetchKeyPackageResponse)
        assert kp.package == b"kp-1"  # popped: single use, as FetchKeyPackage
        kp = await peer.call(PROXY_FETCH_KEY_PACKAGE, federation_pb2.ProxyFetchKeyPackageRequest(
            origin_domain=D2, identity_key=carol.identity_key), keys_pb2.FetchKeyPackageResponse)
        assert kp.package == b""
        hk = await peer.call(PROXY_FETCH_HYBRID_KEY, federation_pb2.ProxyFetchHybridKeyRequest(
            origin_domain=D2, identity_key=carol.identity_key), keys_pb2.FetchHybridKeyResponse)
        assert hk.hybrid_public_key == b"\x07" * 1216
        # A relay for a key node1 does not host: NOT_FOUND, nothing stored.
        stranger = os.urandom(32)
        with pytest.raises(NotFound, match="not hosted"):
            await peer.call(RELAY_ENQUEUE, federation_pb2.RelayEnqueueRequest(
                origin_domain=D2, sender_key=os.urandom(32),
                message=delivery_pb2.EnqueueRequest(recipient_key=stranger, payload=b"x")),
                delivery_pb2.EnqueueResponse)
        # Claiming to be another server than the certificate says: FORBIDDEN.
        with pytest.raises(Forbidden, match="origin_domain"):
            await peer.call(FEDERATION_HEALTH,
                            federation_pb2.FederationHealthRequest(origin_domain=D1),
                            federation_pb2.FederationHealthResponse)
    finally:
        await peer.close()


async def _refused(port: int, domain: str, cert_dir: Path) -> None:
    c = await fed_client(port, domain, cert_dir)
    try:
        with pytest.raises((ConnectionLost, Unavailable)):
            await c.call(FEDERATION_HEALTH,
                         federation_pb2.FederationHealthRequest(origin_domain=D2),
                         federation_pb2.FederationHealthResponse)
        assert "peer certificate refused" in (c.protocol.closed_reason or "")
    finally:
        await c.close()


async def test_listener_refuses_certificates_that_are_not_a_peers(
    app_factory: Factory, tmp_path: Path
) -> None:
    n1, _n2 = await start_pair(app_factory, tmp_path)
    # A certificate from another CA (the client still trusts node1's CA for the server).
    certs.make_ca(tmp_path / "other-ca")
    certs.issue(tmp_path / "other-ca", tmp_path / "intruder", D2)
    (tmp_path / "intruder" / certs.CA_CERT).write_bytes(
        (tmp_path / "ca" / certs.CA_CERT).read_bytes())
    await _refused(n1.port, D1, tmp_path / "intruder")
    # The right CA, but a domain node1 has no peer entry for.
    certs.issue(tmp_path / "ca", tmp_path / "node9", "node9.test")
    await _refused(n1.port, D1, tmp_path / "node9")
    # No client certificate at all.
    (tmp_path / "anon").mkdir()
    (tmp_path / "anon" / certs.CA_CERT).write_bytes((tmp_path / "ca" / certs.CA_CERT).read_bytes())
    await _refused(n1.port, D1, tmp_path / "anon")


async def test_key_packages_hybrid_keys_and_users_of_the_peer(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    bob = await connect(n2.app)
    await register_user(n2.app, "bob", bob.identity_key)
    await bob.upload_key_package(b"bob-kp")
    await bob.upload_hybrid_key(b"\x02" * 1216)
    carol = await connect(n1.app)
    await register_user(n1.app, "carol", carol.identity_key)
    await carol.upload_hybrid_key(b"\x03" * 1216)
    alice = await connect(n1.app)
    u = await alice.resolve_user("bob@Node2.test")
    assert (u.username, u.identity_key) == ("bob@node2.test", bob.identity_key)
    assert await alice.fetch_key_package(bob.identity_key) == b"bob-kp"
    assert n1.fed.routes[bob.identity_key] == D2
    assert await alice.fetch_key_package(bob.identity_key) == b""  # single use, at the home
    assert await alice.fetch_hybrid_key(bob.identity_key) == b"\x02" * 1216
    both = await alice.fetch_hybrid_keys([bob.identity_key, carol.identity_key])
    assert both == {bob.identity_key: b"\x02" * 1216, carol.identity_key: b"\x03" * 1216}
    with pytest.raises(NotFound, match="no federation peer"):
        await alice.resolve_user("bob@elsewhere.test")
    with pytest.raises(NotFound):
        await alice.resolve_user("nobody@node2.test")
    with pytest.raises(NotFound):  # this server's own domain: a local lookup
        await alice.resolve_user("bob@node1.test")
    assert (await alice.resolve_user("carol@node1.test")).identity_key == carol.identity_key
    # A key no peer hosts: no package anywhere, and nothing asked twice meanwhile.
    stranger = os.urandom(32)
    assert await alice.fetch_key_package(stranger) == b""
    assert stranger in n1.fed.nowhere


async def test_home_that_lost_the_user_is_forgotten_and_quota_is_the_homes(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    bob = await connect(n2.app)
    await register_user(n2.app, "bob", bob.identity_key)
    alice = await connect(n1.app)
    waiting = asyncio.ensure_future(bob.fetch_wait(10_000))
    assert (await alice.enqueue(bob.identity_key, b"to node2")).seq == 1
    assert [m.data for m in await waiting] == [b"to node2"]  # a long poll at the home
    assert n1.fed.routes[bob.identity_key] == D2
    await bob.delete_account()
    # The known home answers NOT_FOUND now: the route is dropped, the peers asked again,
    # and (no peer hosts the key any more) the message is kept on node1.
    assert (await alice.enqueue(bob.identity_key, b"kept on node1")).seq == 1
    assert bob.identity_key not in n1.fed.routes
    assert bob.identity_key in n1.fed.nowhere
    assert bob.identity is not None
    bob_on_1 = await connect(n1.app, identity=bob.identity)
    assert [m.data for m in await bob_on_1.fetch()] == [b"kept on node1"]


async def test_a_full_queue_at_the_home_is_the_senders_error(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    n2.app.settings.max_queue_depth = 1
    bob = await connect(n2.app)
    await register_user(n2.app, "bob", bob.identity_key)
    alice = await connect(n1.app)
    assert (await alice.enqueue(bob.identity_key, b"1")).seq == 1
    with pytest.raises(QuotaExceeded, match="queue is full"):
        await alice.enqueue(bob.identity_key, b"2")
    # Found at its home on the first try too (while probing, a full queue is final).
    n1.fed.routes.clear()
    with pytest.raises(QuotaExceeded):
        await alice.enqueue(bob.identity_key, b"3")
    assert [m.data for m in await bob.fetch()] == [b"1"]


async def test_large_messages_cross_at_full_size(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    """Peer connections get the authenticated receive windows at once (a relayed request is
    far above the 64 KiB allowed before authentication)."""
    n1, n2 = await start_pair(app_factory, tmp_path)
    bob = await connect(n2.app)
    await register_user(n2.app, "bob", bob.identity_key)
    alice = await connect(n1.app)
    big = os.urandom(900 * 1024)
    results = await asyncio.gather(*(alice.enqueue(bob.identity_key, big) for _ in range(3)))
    assert sorted(r.seq for r in results) == [1, 2, 3]
    got = []
    while len(got) < 3:
        got += await bob.fetch()
    assert [m.data for m in got] == [big] * 3


async def test_load_across_the_federation_loses_nothing(
    app_factory: Factory, tmp_path: Path
) -> None:
    """The benchmark's relayed load (bench/bench_federation.py) as a check: every message
    acknowledged on node1 is delivered on node2, once."""
    n1, n2 = await start_pair(app_factory, tmp_path)
    keys = [Ed25519PrivateKey.generate() for _ in range(3)]
    for i, k in enumerate(keys):
        await register_user(n2.app, f"rx{i}", k.public_key().public_bytes_raw())
    r = await run_loadtest(
        "127.0.0.1", quic_port(n1.app), token="devtoken",
        ca_cert=n1.app.settings.data_dir / "ca-cert.pem", clients=6, messages=300, window=4,
        max_seconds=60, receiver_port=quic_port(n2.app),
        receiver_ca_cert=n2.app.settings.data_dir / "ca-cert.pem", receiver_identities=keys)
    assert (r.sent, r.delivered, r.errors, r.leftover) == (300, 300, 0, 0)
    assert n1.fed.stats.relayed == {D2: 300}
    assert n2.fed.stats.received == {D1: 300}


async def test_a_registration_at_the_peer_ends_a_no_home_answer_at_once(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    """node1 remembered "no peer hosts this key" (route_cache_secs); when the user then
    registers on node2, node2 tells node1 (FederationAnnounce) and the next message goes
    there instead of being stored on node1 for the rest of the minute."""
    n1, n2 = await start_pair(app_factory, tmp_path)
    bob_id = Ed25519PrivateKey.generate()
    bob_key = bob_id.public_key().public_bytes_raw()
    alice = await connect(n1.app)
    assert (await alice.enqueue(bob_key, b"early")).seq == 1  # nobody hosts it yet
    assert bob_key in n1.fed.nowhere
    heard = route_learnt(n1, bob_key, D2)
    await register_user(n2.app, "bob", bob_key)
    await asyncio.wait_for(heard.wait(), 10)
    assert bob_key not in n1.fed.nowhere
    assert (await alice.enqueue(bob_key, b"late")).seq == 1  # node2's inbox
    bob = await connect(n2.app, identity=bob_id)
    assert [m.data for m in await bob.fetch()] == [b"late"]


async def test_announcements_cannot_take_over_another_peers_users(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    carol = await connect(n1.app)
    await register_user(n1.app, "carol", carol.identity_key)
    someone = os.urandom(32)
    n1.fed.routes[someone] = "node3.test"  # a route to another peer
    peer = await fed_client(n1.port, D1, n2.cert_dir)
    try:
        await peer.call(907, federation_pb2.FederationAnnounceRequest(
            origin_domain=D2, hosted=[someone, carol.identity_key]),
            federation_pb2.FederationAnnounceResponse)
        await peer.call(907, federation_pb2.FederationAnnounceRequest(
            origin_domain=D2, gone=[someone]), federation_pb2.FederationAnnounceResponse)
    finally:
        await peer.close()
    assert n1.fed.routes[someone] == "node3.test"
    assert carol.identity_key not in n1.fed.routes  # node1's own user stays node1's
