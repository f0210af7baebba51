"""The peer list follows a configuration reload (SIGHUP): a peer removed is cut off both
ways at once, a peer added (again) is accepted and called, a new address is used at once,
and the keys that need a restart keep their running values."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fed_helpers import D1, D2, Node, fed_client, fed_transport, start_pair
from qpc_federation.service import FEDERATION_HEALTH

from qpc_core.config import ConfigReload, FederationConfig
from qpc_core.errors import Unavailable
from qpc_core.pb import federation_pb2
from qpc_core.testing import free_udp_port, until
from qpc_core.users import register_user

Factory = Callable[..., Any]


async def reload_federation(node: Node, peers: list[tuple[str, int]],
                            **extra: Any) -> ConfigReload:
    """Reload ``node`` with a configuration whose ``[federation]`` has these peers (and
    ``extra`` keys); everything else as it runs."""
    app = node.app
    fed = app.settings.federation.model_dump()
    fed.update(peers=[{"domain": d, "address": f"127.0.0.1:{p}"} for d, p in peers], **extra)
    read = app.settings.model_copy(update={"federation": FederationConfig.model_validate(fed)})
    app.config_source = lambda: read
    config, _tls = await app.reload()
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
