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
    assert certs.load_crl(ca / certs.CRL, ca_cert).serials == {serial(tmp_path / "n1")}
    assert certs.main(["revoke", "--ca-dir", str(ca), "--serial",
                       f"{serial(tmp_path / 'n2'):x}"]) == 0
    second = certs.load_crl(ca / certs.CRL, ca_cert)
    assert second.serials == {serial(tmp_path / "n1"), serial(tmp_path / "n2")}
    assert second.number == 2  # one more per list written
    for bad in ("zz", "0x0x1f", "", "0", "-1", "1" * 41):
        assert certs.main(["revoke", "--ca-dir", str(ca), "--serial", bad]) == 1, bad
        err = capsys.readouterr().err
        assert err.startswith("qpc-federation-certs: revoke:") and "Traceback" not in err
    assert certs.parse_serial("0X1F:2a") == 0x1F2A
    # Only certificates this CA issued, and never the CA itself.
    assert certs.main(["revoke", "--ca-dir", str(ca), "--cert", str(ca / certs.CA_CERT)]) == 1
    assert "the federation CA itself" in capsys.readouterr().err
    assert certs.main(["revoke", "--ca-dir", str(ca), "--serial",
                       f"{ca_cert.serial_number:x}"]) == 1
    assert "the federation CA itself" in capsys.readouterr().err
    # A list from another CA is refused, by the node and by revoke.
    other = tmp_path / "other"
    certs.make_ca(other)
    certs.revoke(other, serial=7)
    with pytest.raises(ConfigError, match=r"not signed by federation\.federation_ca"):
        certs.load_crl(other / certs.CRL, ca_cert)
    certs.issue(other, tmp_path / "stranger", D2)
    assert certs.main(["revoke", "--ca-dir", str(ca), "--cert",
                       str(tmp_path / "stranger" / certs.NODE_CERT)]) == 1
    assert "was not issued by the CA" in capsys.readouterr().err
    assert certs.load_crl(ca / certs.CRL, ca_cert).serials == second.serials
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
    assert certs.main(["crl", "--ca-dir", str(ca)]) == 0  # a list naming no one, from day one
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


def test_concurrent_revocations_are_all_kept(tmp_path: Path) -> None:
    """Every run reads, adds and writes the list under a lock: none is lost."""
    from concurrent.futures import ThreadPoolExecutor

    ca = tmp_path / "ca"
    certs.make_ca(ca)
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda s: certs.revoke(ca, serial=s), range(101, 107)))
    crl = certs.load_crl(ca / certs.CRL, load_certificate(ca / certs.CA_CERT))
    assert crl.serials == set(range(101, 107)) and crl.number == 6


def test_only_certificates_the_ca_issued_are_matched(tmp_path: Path) -> None:
    """The list speaks of the CA's own serials: a certificate of another issuer with the
    same serial is not revoked by it (it may be an intermediate's leaf)."""
    ca = tmp_path / "ca"
    certs.make_ca(ca)
    certs.issue(ca, tmp_path / "n1", D1)
    other = tmp_path / "other"
    certs.make_ca(other)
    certs.issue(other, tmp_path / "x", D2)
    foreign = load_certificate(tmp_path / "x" / certs.NODE_CERT)
    mine = load_certificate(tmp_path / "n1" / certs.NODE_CERT)
    certs.revoke(ca, serial=foreign.serial_number)
    certs.revoke(ca, serial=mine.serial_number)
    cfg = FederationConfig(
        enabled=True, domain=D1, federation_cert=tmp_path / "n1" / certs.NODE_CERT,
        federation_key=tmp_path / "n1" / certs.NODE_KEY,
        federation_ca=tmp_path / "n1" / certs.CA_CERT, federation_crl=ca / certs.CRL)
    tls = certs.load(cfg, own_revoked_fatal=False)
    tls.check_revoked([foreign])  # another issuer: not this list's business
    with pytest.raises(certs.Revoked):
        tls.check_revoked([mine])


async def test_a_list_naming_this_node_too_still_cuts_off_the_others(
    app_factory: Factory, tmp_path: Path, caplog: Any
) -> None:
    """Both nodes' keys revoked, the list sent everywhere: node1 must still refuse node2
    (its own revocation is for the peers to enforce; it is logged as critical)."""
    ca = tmp_path / "ca"
    certs.make_ca(ca)
    certs.write_crl(ca)
    n1, n2 = await start_pair(app_factory, tmp_path, federation_crl=ca / certs.CRL)
    inbound = await fed_client(n1.port, D1, n2.cert_dir)
    try:
        assert await health(inbound) == "ok"
        certs.revoke(ca, serial=serial(n1.cert_dir))
        certs.revoke(ca, serial=serial(n2.cert_dir))
        err = (await n1.app.reload_tls())["federation"]
        assert err is not None and "is revoked by federation.federation_crl" in err
        assert "the revocation list was applied" in caplog.text
        with pytest.raises((ConnectionLost, Unavailable)):
            await health(inbound)
    finally:
        await inbound.close()


async def test_an_older_list_is_refused_on_reload(
    app_factory: Factory, tmp_path: Path
) -> None:
    """A stale copy (a backup, configuration management) must not re-admit a revoked
    certificate: a list with a lower number than the one in use is refused."""
    ca = tmp_path / "ca"
    crl = ca / certs.CRL
    certs.make_ca(ca)
    certs.write_crl(ca)
    n1, n2 = await start_pair(app_factory, tmp_path, federation_crl=crl)
    before = crl.read_bytes()  # number 1: names no one
    certs.revoke(ca, serial=serial(n2.cert_dir))
    assert (await n1.app.reload_tls())["federation"] is None
    crl.write_bytes(before)
    err = (await n1.app.reload_tls())["federation"]
    assert err is not None and "older than the one in use" in err
    again = await fed_client(n1.port, D1, n2.cert_dir)
    try:
        with pytest.raises((ConnectionLost, Unavailable)):
            await health(again)
    finally:
        await again.close()
    from qpc_federation.metrics import FederationCollector

    gauges = {m.name: m.samples[0].value for m in FederationCollector(n1.fed).collect()
              if m.name.startswith("federation_crl")}
    assert gauges["federation_crl_revoked_certificates"] == 1
    assert gauges["federation_crl_next_update_timestamp_seconds"] > 0


async def test_list_numbers_across_reloads_restarts_and_a_new_ca(
    app_factory: Factory, tmp_path: Path
) -> None:
    """The number decides (a list written on a machine with a slower clock is newer all the
    same); a new CA starts its own numbering; a restart keeps refusing an older list."""
    import asyncio
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding
    from fed_helpers import fed_settings

    from qpc_core.errors import PluginError

    ca = tmp_path / "ca"
    crl = ca / certs.CRL
    certs.make_ca(ca)
    certs.write_crl(ca)
    certs.write_crl(ca)  # number 2
    n1, n2 = await start_pair(app_factory, tmp_path, federation_crl=crl)
    stale = crl.read_bytes()
    # Number 3, revoking node2, but dated before number 2 (its writer's clock was slow).
    ca_cert, ca_key = certs._ca_signer(ca)
    earlier = x509.load_der_x509_crl(stale).last_update_utc - dt.timedelta(minutes=2)
    newer = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
             .last_update(earlier).next_update(earlier + dt.timedelta(days=30))
             .add_extension(x509.CRLNumber(3), critical=False)
             .add_revoked_certificate(x509.RevokedCertificateBuilder()
                                      .serial_number(serial(n2.cert_dir))
                                      .revocation_date(earlier).build())
             .sign(ca_key, hashes.SHA256()))
    crl.write_bytes(newer.public_bytes(Encoding.DER))
    assert (await n1.app.reload_tls())["federation"] is None
    assert n1.fed.tls.crl is not None and n1.fed.tls.crl.number == 3

    async def remembered() -> int:
        v = await n1.app.storage.kv_get("federation-crl", ca_cert.fingerprint(hashes.SHA256()))
        return int(v) if v else 0

    for _ in range(500):  # the reload stores the number in the background (bounded poll)
        if await remembered() == 3:
            break
        await asyncio.sleep(0.01)
    assert await remembered() == 3
    # node1 restarted with the stale list put back: refused at start-up.
    await n1.app.stop()
    crl.write_bytes(stale)
    with pytest.raises((ConfigError, PluginError), match="which this node used before"):
        await app_factory(data_dir=n1.app.settings.data_dir, plugins=["federation"],
                          federation=fed_settings(n1.cert_dir, D1, n1.port, [(D2, n2.port)],
                                                  federation_crl=crl))
    # A new CA (every node issued again): its first list is number 1, and it is taken.
    ca2 = tmp_path / "ca2"
    certs.make_ca(ca2)
    certs.write_crl(ca2)
    certs.issue(ca2, n2.cert_dir, D2)
    crl.write_bytes((ca2 / certs.CRL).read_bytes())
    assert (await n2.app.reload_tls())["federation"] is None
    assert n2.fed.tls.ca == load_certificate(ca2 / certs.CA_CERT)


async def test_a_node_revoked_on_reload_keeps_its_old_pair_and_its_domain(
    app_factory: Factory, tmp_path: Path
) -> None:
    """Reload with a new certificate for another domain that the list also revokes: the
    node's files are refused (old pair kept), the list still applies."""
    ca = tmp_path / "ca"
    certs.make_ca(ca)
    certs.write_crl(ca)
    n1, n2 = await start_pair(app_factory, tmp_path, federation_crl=ca / certs.CRL)
    old = n1.fed.tls.material.certificate
    certs.issue(ca, n1.cert_dir, "wrong.example")
    certs.revoke(ca, serial=serial(n1.cert_dir))
    certs.revoke(ca, serial=serial(n2.cert_dir))
    err = (await n1.app.reload_tls())["federation"]
    assert err is not None and "wrong.example" in err
    assert n1.fed.tls.material.certificate == old
    assert n1.fed.tls.crl is not None and serial(n2.cert_dir) in n1.fed.tls.crl.serials
