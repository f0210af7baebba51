"""Two (or three) qpc servers federated over loopback, with certificates from a test CA."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qpc_federation import certs, get
from qpc_federation.service import ALPN, Federation

from qpc_core.app import App
from qpc_core.client import QpcClient
from qpc_core.testing import free_udp_port
from qpc_core.transport.quic import QuicTransport

D1, D2 = "node1.test", "node2.test"


@dataclass
class Node:
    app: App
    domain: str
    port: int
    cert_dir: Path

    @property
    def fed(self) -> Federation:
        fed = get(self.app)
        assert fed is not None
        return fed


def fed_settings(cert_dir: Path, domain: str, port: int,
                 peers: list[tuple[str, int]], **extra: Any) -> dict[str, Any]:
    return {
        "enabled": True, "domain": domain, "listen": f"127.0.0.1:{port}",
        "federation_cert": cert_dir / certs.NODE_CERT,
        "federation_key": cert_dir / certs.NODE_KEY,
        "federation_ca": cert_dir / certs.CA_CERT,
        "peers": [{"domain": d, "address": f"127.0.0.1:{p}"} for d, p in peers],
        **extra,
    }


async def start_pair(app_factory: Callable[..., Any], tmp: Path, *,
                     extra_peers: list[tuple[str, int]] = (),  # type: ignore[assignment]
                     **extra: Any) -> tuple[Node, Node]:
    """node1 and node2, each the other's peer (node1 also gets ``extra_peers``); their
    certificates from the CA in ``tmp/ca`` (made unless it exists)."""
    if not (tmp / "ca" / certs.CA_CERT).exists():
        certs.make_ca(tmp / "ca")
    p1, p2 = free_udp_port(), free_udp_port()
    nodes = []
    for domain, port, peers in ((D1, p1, [(D2, p2), *extra_peers]), (D2, p2, [(D1, p1)])):
        d = tmp / domain
        certs.issue(tmp / "ca", d, domain)
        app = await app_factory(
            data_dir=tmp / f"data-{domain}", plugins=["federation"],
            federation=fed_settings(d, domain, port, peers, **extra),
        )
        nodes.append(Node(app, domain, port, d))
    return nodes[0], nodes[1]


async def fed_client(port: int, server_domain: str, cert_dir: Path) -> QpcClient:
    """A federation-port client presenting the certificate in ``cert_dir``."""
    from aioquic.quic.configuration import QuicConfiguration

    from qpc_core.transport.certs import load_certificate, load_private_key

    cfg = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=server_domain)
    ca = load_certificate(cert_dir / certs.CA_CERT)
    from cryptography.hazmat.primitives.serialization import Encoding

    cfg.load_verify_locations(cadata=ca.public_bytes(Encoding.PEM))
    if (cert_dir / certs.NODE_CERT).exists():
        cfg.certificate = load_certificate(cert_dir / certs.NODE_CERT)
        cfg.private_key = load_private_key(cert_dir / certs.NODE_KEY)
    return await QpcClient.connect("127.0.0.1", port, configuration=cfg, quic_backend="aioquic")


def fed_transport(app: App) -> QuicTransport:
    for _p, t in app.transports:
        if isinstance(t, QuicTransport) and t.name == "federation":
            return t
    raise AssertionError("no federation transport")


async def start_mesh(app_factory: Callable[..., Any], tmp: Path, domains: list[str],
                     **extra: Any) -> list[Node]:
    """Every node a peer of every other (config order: the list order)."""
    certs.make_ca(tmp / "ca")
    ports = {d: free_udp_port() for d in domains}
    nodes = []
    for d in domains:
        certs.issue(tmp / "ca", tmp / d, d)
        app = await app_factory(
            data_dir=tmp / f"data-{d}", plugins=["federation"],
            federation=fed_settings(tmp / d, d, ports[d],
                                    [(o, ports[o]) for o in domains if o != d], **extra))
        nodes.append(Node(app, d, ports[d], tmp / d))
    return nodes


def count_calls(monkeypatch: Any, only: int | None = None) -> list[int]:
    """The method ids of every call a Federation makes to a peer from now on (those of
    ``only``, when given), in order."""
    calls: list[int] = []
    real = Federation.call

    async def counting(self: Federation, domain: str, method_id: int, *a: Any) -> Any:
        if only is None or method_id == only:
            calls.append(method_id)
        return await real(self, domain, method_id, *a)

    monkeypatch.setattr(Federation, "call", counting)
    return calls


def route_learnt(node: Node, key: bytes, domain: str) -> asyncio.Event:
    """Set once ``node`` learns that ``domain`` hosts ``key``."""
    event = asyncio.Event()
    learn = node.fed._learn

    def learnt(k: bytes, d: str | None) -> None:
        learn(k, d)
        if k == key and d == domain:
            event.set()

    node.fed._learn = learnt  # type: ignore[method-assign]
    return event
