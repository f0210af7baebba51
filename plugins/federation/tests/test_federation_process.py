"""Two real `qpc run` processes federated with the scaling guide's config keys: a user
registered with OPAQUE on one is found and written to from the other."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fed_helpers import D1, D2
from qpc_auth_opaque import client as opaque_client
from qpc_auth_opaque import opaque
from qpc_federation import certs

from qpc_core.testing import ServerProcess, free_udp_port, process_client


def _config(path: Path, domain: str, port: int, peer: str, peer_port: int) -> None:
    d = path.parent
    path.write_text(f'''
[auth_opaque]
ksf = "identity"

[federation]
enabled = true
domain = "{domain}"
listen = "127.0.0.1:{port}"
federation_cert = "{d / certs.NODE_CERT}"
federation_key = "{d / certs.NODE_KEY}"
federation_ca = "{d / certs.CA_CERT}"

[[federation.peers]]
domain = "{peer}"
address = "127.0.0.1:{peer_port}"
''')


async def test_two_processes_federate(tmp_path: Path) -> None:
    certs.make_ca(tmp_path / "ca")
    f1, f2 = free_udp_port(), free_udp_port()
    nodes = []
    for domain, port, peer, peer_port in ((D1, f1, D2, f2), (D2, f2, D1, f1)):
        data = tmp_path / domain
        certs.issue(tmp_path / "ca", data, domain)
        _config(data / "qpc-server.toml", domain, port, peer, peer_port)
        nodes.append(ServerProcess(data, ["--config", str(data / "qpc-server.toml"),
                                          "--plugins", "auth_opaque,federation"]))
    n1, n2 = nodes
    for n in nodes:
        await n.start()
    try:
        assert any(f"federation: QUIC listening on 127.0.0.1:{f1}" in line and "mutual TLS"
                   in line for line in n1.log)
        bob_key = Ed25519PrivateKey.generate()
        bob = await process_client(n2, identity=bob_key, token="devtoken")
        await opaque_client.register(bob, "bob", "pw", ksf=opaque.IdentityKSF())
        alice = await process_client(n1, token="devtoken")
        u = await alice.resolve_user("bob@node2.test")
        assert (u.username, u.identity_key) == ("bob@node2.test", bob.identity_key)
        r = await alice.enqueue(u.identity_key, b"sealed for bob", message_id=b"i" * 16)
        assert (r.seq, r.duplicate) == (1, False)
        assert [m.data for m in await bob.fetch()] == [b"sealed for bob"]
        await alice.close()
        await bob.close()
    finally:
        rcs = [await n.terminate() for n in nodes]
    assert rcs == [0, 0]
