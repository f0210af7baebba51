"""Certificate revocation for federation: ``qpc-federation-certs revoke`` writes a CRL signed
by the federation CA; a node naming it as ``federation_crl`` refuses revoked peers (as
clients of its listener and as servers it calls), and SIGHUP's reload applies a new list to
new connections and closes the established ones of certificates it now names."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fed_helpers import D1, D2, fed_client, start_pair
from qpc_federation import certs
from qpc_federation.service import FEDERATION_HEALTH

from qpc_core.client.sdk import ConnectionLost
from qpc_core.config import FederationConfig
from qpc_core.errors import ConfigError, Unavailable
from qpc_core.pb import federation_pb2
from qpc_core.transport.certs import load_certificate

Factory = Callable[..., Any]


def serial(cert_dir: Path) -> int:
    return load_certificate(cert_dir / certs.NODE_CERT).serial_number


async def health(c: Any, origin: str = D2) -> str:
    h = await c.call(FEDERATION_HEALTH, federation_pb2.FederationHealthRequest(
        origin_domain=origin), federation_pb2.FederationHealthResponse)
    return str(h.status)


def test_revoke_writes_a_signed_list_that_keeps_earlier_serials(tmp_path: Path,
                                                               capsys: Any) -> None:
    ca = tmp_path / "ca"
    certs.make_ca(ca)
    certs.issue(ca, tmp_path / "n1", D1)
    certs.issue(ca, tmp_path / "n2", D2)
    ca_cert = load_certificate(ca / certs.CA_CERT)
    assert certs.main(["revoke", "--ca-dir", str(ca), "--cert",
                       str(tmp_path / "n1" / certs.NODE_CERT)]) == 0
    assert f"revoked serial {serial(tmp_path / 'n1'):x}" in capsys.readouterr().out
    assert certs.load_crl(ca / certs.CRL, ca_cert) == {serial(tmp_path / "n1")}
    assert certs.main(["revoke", "--ca-dir", str(ca), "--serial",
                       f"{serial(tmp_path / 'n2'):x}"]) == 0
    assert certs.load_crl(ca / certs.CRL, ca_cert) == {serial(tmp_path / "n1"),
                                                       serial(tmp_path / "n2")}
    assert certs.main(["revoke", "--ca-dir", str(ca), "--serial", "zz"]) == 1
    assert "not hexadecimal" in capsys.readouterr().err
    # A list from another CA is refused, by the node and by revoke.
    other = tmp_path / "other"
    certs.make_ca(other)
    certs.revoke(other, serial=7)
    with pytest.raises(ConfigError, match=r"not signed by federation\.federation_ca"):
        certs.load_crl(other / certs.CRL, ca_cert)
    (ca / certs.CRL).write_bytes((other / certs.CRL).read_bytes())
    with pytest.raises(ConfigError, match="was not issued by the CA"):
        certs.revoke(ca, serial=8)
    (ca / certs.CRL).write_bytes(b"not a crl")
    with pytest.raises(ConfigError, match="not a certificate revocation list"):
        certs.load_crl(ca / certs.CRL, ca_cert)


def test_a_node_whose_own_certificate_is_revoked_does_not_start(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    certs.make_ca(ca)
    certs.issue(ca, tmp_path / "n1", D1)
    certs.revoke(ca, serial=serial(tmp_path / "n1"))
    cfg = FederationConfig(
        enabled=True, domain=D1, federation_cert=tmp_path / "n1" / certs.NODE_CERT,
        federation_key=tmp_path / "n1" / certs.NODE_KEY,
        federation_ca=tmp_path / "n1" / certs.CA_CERT, federation_crl=ca / certs.CRL)
    with pytest.raises(ConfigError, match=r"is revoked by federation\.federation_crl"):
        certs.load(cfg)


async def test_reload_refuses_and_cuts_off_a_revoked_peer(
    app_factory: Factory, tmp_path: Path
) -> None:
    ca = tmp_path / "ca"
    crl = ca / certs.CRL
    certs.make_ca(ca)
    certs.revoke(ca, serial=1)  # a list that names no node yet
    n1, n2 = await start_pair(app_factory, tmp_path, federation_crl=crl)
    # node2 reaches node1's listener, node1 reaches node2's: both connections established.
    inbound = await fed_client(n1.port, D1, n2.cert_dir)
    try:
        assert await health(inbound) == "ok"
        outbound = await n1.fed.call(D2, FEDERATION_HEALTH, federation_pb2.FederationHealthRequest(
            origin_domain=D1), federation_pb2.FederationHealthResponse)
        assert outbound.domain == D2 and n1.fed.connected(D2)

        # A bad list on reload: refused, the old one stays (node2 still accepted).
        good = crl.read_bytes()
        crl.write_bytes(b"garbage")
        results = await n1.app.reload_tls()
        assert "not a certificate revocation list" in (results["federation"] or "")
        assert await health(inbound) == "ok"
        crl.write_bytes(good)

        certs.revoke(ca, serial=serial(n2.cert_dir))
        results = await n1.app.reload_tls()
        assert results == {"quic": None, "federation": None}
        # Both established connections with node2 are closed...
        with pytest.raises((ConnectionLost, Unavailable)):
            await health(inbound)
        assert not n1.fed.connected(D2)
        # ... and new ones refused, both ways.
        again = await fed_client(n1.port, D1, n2.cert_dir)
        try:
            with pytest.raises((ConnectionLost, Unavailable)):
                await health(again)
            assert "peer certificate refused" in (again.protocol.closed_reason or "")
        finally:
            await again.close()
        with pytest.raises(Unavailable, match="revoked certificate"):
            await n1.fed.call(D2, FEDERATION_HEALTH, federation_pb2.FederationHealthRequest(
                origin_domain=D1), federation_pb2.FederationHealthResponse)
        assert n1.app.transports[-1][1].peers_refused >= 1
    finally:
        await inbound.close()
