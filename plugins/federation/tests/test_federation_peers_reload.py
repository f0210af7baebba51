"""The peer list follows a configuration reload (SIGHUP): a peer removed is cut off both
ways at once, a peer added (again) is accepted and called, a new address is used at once,
and the keys that need a restart keep their running values."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fed_helpers import (
    D1,
    D2,
    Node,
    count_calls,
    fed_client,
    fed_transport,
    start_mesh,
    start_pair,
)
from qpc_federation import certs
from qpc_federation import service as service_mod
from qpc_federation.service import FEDERATION_HEALTH, FEDERATION_LOOKUP, Federation

from qpc_core.config import ConfigReload, FederationConfig
from qpc_core.errors import Unavailable
from qpc_core.pb import federation_pb2
from qpc_core.testing import free_udp_port, until
from qpc_core.transport.certs import load_certificate
from qpc_core.users import register_user

Factory = Callable[..., Any]
D3 = "node3.test"


async def reload_federation_tls(node: Node, peers: list[tuple[str, int]],
                                **extra: Any) -> tuple[ConfigReload, dict[str, str | None]]:
    """Reload ``node`` (configuration, then certificates) with a configuration whose
    ``[federation]`` has these peers (and ``extra`` keys); everything else as it runs."""
    app = node.app
    fed = app.settings.federation.model_dump()
    fed.update(peers=[{"domain": d, "address": f"127.0.0.1:{p}"} for d, p in peers], **extra)
    read = app.settings.model_copy(update={"federation": FederationConfig.model_validate(fed)})
    app.config_source = lambda: read
    return await app.reload()


async def reload_federation(node: Node, peers: list[tuple[str, int]],
                            **extra: Any) -> ConfigReload:
    config, _tls = await reload_federation_tls(node, peers, **extra)
    return config


async def health(port: int, server: str, cert_dir: Path) -> None:
    c = await fed_client(port, server, cert_dir)
    try:
        await c.call(FEDERATION_HEALTH, federation_pb2.FederationHealthRequest(origin_domain=D2),
                     federation_pb2.FederationHealthResponse)
    finally:
        await c.close()


async def test_a_removed_peer_is_cut_off_and_can_be_added_again(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path)
    bob = Ed25519PrivateKey.generate()
    bob_on_2 = await connect(n2.app, identity=bob)
    await register_user(n2.app, "bob", bob_on_2.identity_key)
    alice = await connect(n1.app)
    await alice.enqueue(bob_on_2.identity_key, b"before")
    await health(n1.port, D1, n2.cert_dir)  # node2's certificate is accepted by node1
    assert n1.fed.connected(D2) and n1.fed.routes[bob_on_2.identity_key] == D2

    r = await reload_federation(n1, [])
    assert (r.error, r.applied) == (None, ("federation.peers",))
    assert n1.fed.peers == {} and not n1.fed.connected(D2)
    assert bob_on_2.identity_key not in n1.fed.routes
    # node2's connections into node1 (its announcer's) are closed, new ones refused.
    await until(lambda: not fed_transport(n1.app).protocols, timeout=10,
                what="node2's connections to node1 still open")
    with pytest.raises(Exception):  # noqa: B017 - closed at the handshake or on first use
        await health(n1.port, D1, n2.cert_dir)
    with pytest.raises(Unavailable, match="no longer a federation peer"):
        await n1.fed.call(D2, FEDERATION_HEALTH,
                          federation_pb2.FederationHealthRequest(origin_domain=D1),
                          federation_pb2.FederationHealthResponse)

    r = await reload_federation(n1, [(D2, n2.port)])
    assert r.applied == ("federation.peers",) and n1.fed.peers == {D2: f"127.0.0.1:{n2.port}"}
    await health(n1.port, D1, n2.cert_dir)
    await alice.enqueue(bob_on_2.identity_key, b"after")  # asked node2 again, relayed
    assert [m.data for m in await bob_on_2.fetch()] == [b"before", b"after"]
    assert n1.fed.routes[bob_on_2.identity_key] == D2


async def test_a_new_address_is_used_at_once_and_restart_keys_wait(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    n1, n2 = await start_pair(app_factory, tmp_path, relay_timeout_secs=0.5)
    bob = await connect(n2.app)
    await register_user(n2.app, "bob", bob.identity_key)
    alice = await connect(n1.app)
    await alice.enqueue(bob.identity_key, b"one")
    r = await reload_federation(n1, [(D2, free_udp_port())])  # nothing listens there
    assert r.applied == ("federation.peers",)
    with pytest.raises(Unavailable):
        await alice.enqueue(bob.identity_key, b"lost in transit")
    # Back at the right address: used at once, not after the failed address's back-off.
    old_listen = n1.app.settings.federation.listen
    r = await reload_federation(n1, [(D2, n2.port)], route_cache_secs=5.0,
                                relay_timeout_secs=3.0, listen="127.0.0.1:1")
    assert r.applied == ("federation.peers", "federation.relay_timeout_secs",
                         "federation.route_cache_secs")
    assert r.restart_pending == ("federation.listen",)
    assert (n1.fed.cfg.relay_timeout_secs, n1.fed.cfg.route_cache_secs) == (3.0, 5.0)
    assert n1.app.settings.federation.listen == old_listen
    await alice.enqueue(bob.identity_key, b"two")
    assert [m.data for m in await bob.fetch()] == [b"one", b"two"]


def gate_connects(monkeypatch: pytest.MonkeyPatch) -> tuple[asyncio.Event, asyncio.Event]:
    """Federation connects wait for ``gate``; ``entered`` is set when one is waiting."""
    entered, gate = asyncio.Event(), asyncio.Event()
    real = service_mod.QpcClient.connect

    async def slow_connect(*a: Any, **kw: Any) -> Any:
        entered.set()
        await gate.wait()
        return await real(*a, **kw)

    monkeypatch.setattr(service_mod.QpcClient, "connect", slow_connect)
    return entered, gate


async def test_a_peer_removed_while_a_relay_connects_to_it_gets_nothing(
    monkeypatch: pytest.MonkeyPatch, app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    """A connect in progress when the reload removes the peer is closed when it completes:
    nothing is relayed to the removed peer after the reload, no connection to it is kept
    (the peer list is checked again after the handshake)."""
    n1, n2 = await start_pair(app_factory, tmp_path)
    bob = await connect(n2.app, identity=Ed25519PrivateKey.generate())
    await register_user(n2.app, "bob", bob.identity_key)
    alice = await connect(n1.app)
    await alice.enqueue(bob.identity_key, b"before")  # route learnt, connection open
    assert n1.fed.routes[bob.identity_key] == D2
    n1.fed._drop(D2)  # the connection went away (idle timeout, node2 restarted ...)
    entered, gate = gate_connects(monkeypatch)
    send = asyncio.ensure_future(alice.enqueue(bob.identity_key, b"after removal"))
    await asyncio.wait_for(entered.wait(), 10)
    r = await reload_federation(n1, [])  # node2 removed: "cut off at once, both ways"
    assert r.error is None and n1.fed.peers == {}
    gate.set()
    outcome = await asyncio.gather(send, return_exceptions=True)
    got = [m.data for m in await bob.fetch()]
    problems = []
    if b"after removal" in got:
        problems.append(f"relayed to the removed peer after the reload (enqueue -> "
                        f"{outcome[0]!r}; bob on node2 got {got})")
    if n1.fed.connected(D2):
        problems.append("a connection to the removed peer is kept in _clients")
    assert not problems, "; ".join(problems)


async def test_a_peer_moved_while_connecting_is_called_at_its_new_address(
    monkeypatch: pytest.MonkeyPatch, app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    """The same race for a new address: the connection to the old address that completes
    after the reload is not kept; the next call goes to the new address."""
    n1, _n2 = await start_pair(app_factory, tmp_path)
    entered, gate = gate_connects(monkeypatch)
    first = asyncio.ensure_future(n1.fed.call(
        D2, FEDERATION_HEALTH, federation_pb2.FederationHealthRequest(origin_domain=D1),
        federation_pb2.FederationHealthResponse))
    await asyncio.wait_for(entered.wait(), 10)
    new_port = free_udp_port()  # the peer's new address (nothing there yet)
    await reload_federation(n1, [(D2, new_port)])
    gate.set()
    await asyncio.gather(first, return_exceptions=True)
    monkeypatch.undo()
    with pytest.raises(Unavailable):  # docs: "called at the new address from the next call"
        await n1.fed.call(D2, FEDERATION_HEALTH,
                          federation_pb2.FederationHealthRequest(origin_domain=D1),
                          federation_pb2.FederationHealthResponse)


async def test_a_lookup_answered_around_a_reload_does_not_crash(
    app_factory: Factory, tmp_path: Path
) -> None:
    """node2 answers a lookup first; before node3's answer a reload removes node2: the
    answer goes to node3 (no KeyError on the removed peer's rank, no INTERNAL)."""
    n1, _n2 = await start_pair(app_factory, tmp_path, extra_peers=[(D3, free_udp_port())])
    fed = n1.fed
    key = Ed25519PrivateKey.generate().public_key().public_bytes_raw()

    async def fake_call(domain: str, method_id: int, request: Any, rtype: Any) -> Any:
        assert method_id == FEDERATION_LOOKUP
        if domain == D3:  # asked after node2, whose answer is in by now: node2 removed
            fed.apply_config(fed.cfg.model_copy(update={"peers": [
                p for p in fed.cfg.peers if p.domain == D3]}))
        return federation_pb2.FederationLookupResponse(hosted=[key])

    fed.call = fake_call  # type: ignore[method-assign]
    assert await fed._lookup([key]) == {key: D3}
    assert fed.routes[key] == D3


async def test_an_added_peer_is_asked_about_keys_remembered_as_nowhere(
    app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    """A node joins: bob registered on node3 before node1 and node3 were peers, and node1
    remembered "no peer hosts bob" (route_cache_secs).  Once both add each other by
    SIGHUP, node1 asks again: bob's next message goes to node3, not into node1's store."""
    n1, n2, n3 = await start_mesh(app_factory, tmp_path, [D1, D2, D3])
    await reload_federation(n1, [(D2, n2.port)])
    await reload_federation(n3, [(D2, n2.port)])
    bob = await connect(n3.app)
    await register_user(n3.app, "bob", bob.identity_key)
    alice = await connect(n1.app)
    await alice.enqueue(bob.identity_key, b"before node3 joined")  # stored on node1
    assert bob.identity_key in n1.fed.nowhere
    # node3 joins node1's federation (both sides), as the docs describe.
    await reload_federation(n3, [(D2, n2.port), (D1, n1.port)])
    await reload_federation(n1, [(D2, n2.port), (D3, n3.port)])
    await alice.enqueue(bob.identity_key, b"after node3 joined")
    got = [m.data for m in await bob.fetch()]
    assert b"after node3 joined" in got, (
        "stored on node1 (nowhere cache) instead of relayed to bob's home node3")


async def test_removing_federation_crl_by_reload_does_not_readmit_a_revoked_peer(
    app_factory: Factory, tmp_path: Path
) -> None:
    """A configuration that no longer names federation_crl (a template that lost the line)
    does not turn revocation off: the reload is refused whole and the list in use stays
    (as an older list would be refused: either could re-admit revoked peers); a routine
    renewal of the node's own certificate is still taken."""
    ca = tmp_path / "ca"
    crl = ca / certs.CRL
    certs.make_ca(ca)
    assert certs.main(["crl", "--ca-dir", str(ca)]) == 0
    n1, n2 = await start_pair(app_factory, tmp_path, federation_crl=crl)
    certs.revoke(ca, serial=load_certificate(n2.cert_dir / certs.NODE_CERT).serial_number)
    await n1.app.reload_tls()
    with pytest.raises(Exception):  # noqa: B017 - refused at the handshake or first use
        c = await fed_client(n1.port, D1, n2.cert_dir)
        try:
            await c.call(FEDERATION_HEALTH, federation_pb2.FederationHealthRequest(
                origin_domain=D2), federation_pb2.FederationHealthResponse)
        finally:
            await c.close()
    config, _tls = await reload_federation_tls(n1, [(D2, n2.port)], federation_crl=None)
    assert config.error is not None and "no longer set" in config.error
    assert config.applied == () and n1.app.settings.federation.federation_crl == crl
    assert n1.fed.tls.crl is not None
    # The same CA under another path in the same reload: still the same CA, still refused.
    moved_ca = tmp_path / "ca-copy.pem"
    moved_ca.write_bytes((n1.cert_dir / certs.CA_CERT).read_bytes())
    config, _tls = await reload_federation_tls(n1, [(D2, n2.port)], federation_crl=None,
                                               federation_ca=moved_ca)
    assert config.error is not None and "no longer set" in config.error
    readmitted = True
    try:
        c = await fed_client(n1.port, D1, n2.cert_dir)
        try:
            await c.call(FEDERATION_HEALTH, federation_pb2.FederationHealthRequest(
                origin_domain=D2), federation_pb2.FederationHealthResponse)
        finally:
            await c.close()
    except Exception:
        readmitted = False
    assert not readmitted, "the revoked peer is accepted again after the reload"
    serial = n1.fed.tls.material.certificate.serial_number
    certs.issue(ca, n1.cert_dir, D1)  # the node's own certificate renewed, list unchanged
    assert (await n1.app.reload_tls())["federation"] is None
    assert n1.fed.tls.material.certificate.serial_number != serial


async def test_a_removed_peers_open_connection_is_closed(
    app_factory: Factory, tmp_path: Path
) -> None:
    """A connection the removed peer opened and used before the reload is closed."""
    n1, n2 = await start_pair(app_factory, tmp_path)
    c = await fed_client(n1.port, D1, n2.cert_dir)
    try:
        await c.call(FEDERATION_HEALTH, federation_pb2.FederationHealthRequest(
            origin_domain=D2), federation_pb2.FederationHealthResponse)
        await reload_federation(n1, [])
        await until(lambda: c.protocol.closed_reason is not None, 10, "still open")
    finally:
        await c.close()


async def test_route_cache_secs_lowered_to_zero_asks_the_peers_at_once(
    monkeypatch: pytest.MonkeyPatch, app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    """route_cache_secs lowered by a reload applies to the next call, also to what was
    remembered under the old value (0: every message asks the peers)."""
    n1, _n2 = await start_pair(app_factory, tmp_path, route_cache_secs=3600.0)
    alice = await connect(n1.app)
    nobody = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    await alice.enqueue(nobody, b"one")  # asked node2: nobody hosts it, remembered 1 h
    assert nobody in n1.fed.nowhere
    r = await reload_federation(n1, [(D2, _n2.port)], route_cache_secs=0.0)
    assert r.applied == ("federation.route_cache_secs",)
    lookups = count_calls(monkeypatch, only=FEDERATION_LOOKUP)
    await alice.enqueue(nobody, b"two")
    assert lookups == [FEDERATION_LOOKUP], "route_cache_secs = 0 did not apply to the next call"


async def test_a_lookup_in_flight_when_a_peer_is_added_does_not_remember_nowhere(
    monkeypatch: pytest.MonkeyPatch, app_factory: Factory, connect: Factory, tmp_path: Path
) -> None:
    """A lookup that was asking the old peers when a reload added node3 does not conclude
    "no peer hosts bob" (node3 was not asked): bob's next message goes to node3."""
    n1, n2, n3 = await start_mesh(app_factory, tmp_path, [D1, D2, D3])
    await reload_federation(n1, [(D2, n2.port)])
    await reload_federation(n3, [(D2, n2.port)])
    bob = await connect(n3.app)
    await register_user(n3.app, "bob", bob.identity_key)
    alice = await connect(n1.app)
    entered, gate = asyncio.Event(), asyncio.Event()
    real = Federation.call

    async def gated(self: Federation, domain: str, method_id: int, *a: Any) -> Any:
        if self is n1.fed and method_id == FEDERATION_LOOKUP and not gate.is_set():
            entered.set()
            await gate.wait()
        return await real(self, domain, method_id, *a)

    monkeypatch.setattr(Federation, "call", gated)
    in_flight = asyncio.ensure_future(alice.enqueue(bob.identity_key, b"in flight"))
    await asyncio.wait_for(entered.wait(), 10)  # node1 is asking node2 (only) about bob
    await reload_federation(n3, [(D2, n2.port), (D1, n1.port)])
    await reload_federation(n1, [(D2, n2.port), (D3, n3.port)])  # node3 joins
    gate.set()
    await asyncio.gather(in_flight, return_exceptions=True)
    assert bob.identity_key not in n1.fed.nowhere
    await alice.enqueue(bob.identity_key, b"after node3 joined")
    assert b"after node3 joined" in [m.data for m in await bob.fetch()]


async def test_a_failed_connect_to_a_moved_peers_old_address_does_not_back_off_the_new(
    monkeypatch: pytest.MonkeyPatch, app_factory: Factory, tmp_path: Path
) -> None:
    """A connect to the old address that fails after the reload moved the peer does not
    put the peer (now at its new address) in back-off: the next call is tried at once."""
    n1, n2 = await start_pair(app_factory, tmp_path)
    old_port = free_udp_port()
    await reload_federation(n1, [(D2, old_port)])
    entered, gate = asyncio.Event(), asyncio.Event()
    real = service_mod.QpcClient.connect

    async def connect_(host: str, port: int, **kw: Any) -> Any:
        if port == old_port:
            entered.set()
            await gate.wait()
            raise ConnectionRefusedError("nothing at the old address")
        return await real(host, port, **kw)

    monkeypatch.setattr(service_mod.QpcClient, "connect", connect_)

    def health() -> Any:
        return n1.fed.call(D2, FEDERATION_HEALTH,
                           federation_pb2.FederationHealthRequest(origin_domain=D1),
                           federation_pb2.FederationHealthResponse)

    first = asyncio.ensure_future(health())
    await asyncio.wait_for(entered.wait(), 10)
    await reload_federation(n1, [(D2, n2.port)])  # the operator fixes the address
    gate.set()
    with pytest.raises(Unavailable):
        await first
    await health()
