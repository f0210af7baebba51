"""TLS material: the development certificate verifies under both verification models
(OpenSSL-style via aioquic, WebPKI/rustls-style via qh3), operator chain files are sent
whole, and a key that does not match its certificate is a start-up error."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qpc_core.client.sdk import QpcClient
from qpc_core.errors import ConfigError
from qpc_core.framing.status import PushEvent
from qpc_core.testing import TEST_TOKEN, quic_port
from qpc_core.transport.certs import generate_self_signed, resolve_tls

BACKENDS = ("aioquic", "qh3")


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def test_dev_certificate_is_a_leaf_issued_by_a_dev_ca(tmp_path: Path) -> None:
    generate_self_signed(tmp_path)
    ca = x509.load_pem_x509_certificate((tmp_path / "ca-cert.pem").read_bytes())
    leaf = x509.load_der_x509_certificate((tmp_path / "server-cert.der").read_bytes())
    bc_ca = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    bc_leaf = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc_ca.ca and bc_ca.path_length == 0
    assert not bc_leaf.ca  # WebPKI refuses a CA certificate as the server's own
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    leaf.verify_directly_issued_by(ca)  # raises if not signed by the dev CA
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    # server-cert.pem is the chain (leaf, then the CA): trusting it trusts the CA too.
    chain = x509.load_pem_x509_certificates((tmp_path / "server-cert.pem").read_bytes())
    assert chain == [leaf, ca]
    # The CA's key is not kept: these six files and nothing else.
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca-cert.der", "ca-cert.pem", "server-cert.der", "server-cert.pem", "server-key.der",
        "server-key.pem"]
    keys = [p.name for p in tmp_path.iterdir() if b"PRIVATE KEY" in p.read_bytes()]
    assert keys == ["server-key.pem"]
    # The server loads the leaf; a self-signed root is never part of the chain it sends.
    tls = resolve_tls(tmp_path, None, None, production=False)
    assert tls.certificate == leaf and tls.chain == ()


@pytest.mark.parametrize("server_backend", BACKENDS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trust", ["ca-cert.pem", "server-cert.pem", "ca-cert.der"])
async def test_clients_of_both_verification_models_accept_the_dev_certificate(
    app_factory: Any, server_backend: str, backend: str, trust: str
) -> None:
    """qh3 verifies like rustls (the reference system's clients): it needs a CA trust anchor
    distinct from the server certificate; the old self-signed CA:TRUE certificate failed it.
    Both server libraries serve the same files."""
    app = await app_factory(quic_backend=server_backend)
    async with await QpcClient.connect(
        "127.0.0.1", quic_port(app), token=TEST_TOKEN,
        ca_cert=app.settings.data_dir / trust, quic_backend=backend, timeout=10,
    ) as c:
        assert (await c.health()).status == "ok"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_certificate_from_another_ca_is_refused(
    server: Any, tmp_path: Path, backend: str
) -> None:
    other = tmp_path / "other"
    generate_self_signed(other)
    with pytest.raises(ConnectionError):  # the handshake fails: verification is on
        await QpcClient.connect("127.0.0.1", quic_port(server), token=TEST_TOKEN,
                                ca_cert=other / "ca-cert.pem", quic_backend=backend, timeout=5)
    # Control: the same client with the server's own CA gets in.
    async with await QpcClient.connect(
        "127.0.0.1", quic_port(server), token=TEST_TOKEN,
        ca_cert=server.settings.data_dir / "ca-cert.pem", quic_backend=backend, timeout=5,
    ) as c:
        assert (await c.health()).status == "ok"


def _ca(name: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[x509.Name, Any] | None,
        now: dt.datetime, days: int = 30) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    return (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def _operator_chain(d: Path) -> tuple[Path, Path, Path]:
    """root -> intermediate -> leaf; writes fullchain.pem (leaf, intermediate, root), the
    leaf's key and the root alone (what clients trust)."""
    now = dt.datetime.now(dt.UTC)
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _ca("test root", root_key, None, now)
    inter = _ca("test intermediate", inter_key, (root.subject, root_key), now)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(inter.subject).public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(inter_key, hashes.SHA256())
    )
    d.mkdir(parents=True, exist_ok=True)
    (d / "fullchain.pem").write_bytes(_pem(leaf) + _pem(inter) + _pem(root))
    (d / "privkey.pem").write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (d / "root.pem").write_bytes(_pem(root))
    return d / "fullchain.pem", d / "privkey.pem", d / "root.pem"


def test_operator_chain_file_keeps_its_intermediates(tmp_path: Path) -> None:
    cert, key, _root = _operator_chain(tmp_path)
    tls = resolve_tls(tmp_path, cert, key, production=True)
    assert tls.certificate.subject.rfc4514_string() == "CN=localhost"
    # The intermediate is sent, the self-signed root (the client's own anchor) is not.
    assert [c.subject.rfc4514_string() for c in tls.chain] == ["CN=test intermediate"]


@pytest.mark.parametrize("server_backend", BACKENDS)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_server_sends_the_intermediates_of_an_operator_chain(
    app_factory: Any, tmp_path: Path, backend: str, server_backend: str
) -> None:
    """A client trusting only the root reaches a server whose certificate an intermediate
    issued (the ACME fullchain.pem layout); with the leaf alone it could not build a path."""
    cert, key, root = _operator_chain(tmp_path / "pki")
    app = await app_factory(tls_cert=cert, tls_key=key, quic_backend=server_backend)
    async with await QpcClient.connect("127.0.0.1", quic_port(app), token=TEST_TOKEN,
                                       ca_cert=root, quic_backend=backend, timeout=10) as c:
        assert (await c.health()).status == "ok"


def test_a_key_of_another_certificate_is_a_config_error(tmp_path: Path) -> None:
    generate_self_signed(tmp_path / "a")
    generate_self_signed(tmp_path / "b")
    with pytest.raises(ConfigError, match="is not the private key of the certificate"):
        resolve_tls(tmp_path, tmp_path / "a" / "server-cert.der",
                    tmp_path / "b" / "server-key.der", production=True)
    # The right key but the chain file in the wrong order: said as such.
    cert, key, _root = _operator_chain(tmp_path / "pki")
    leaf, inter, root = x509.load_pem_x509_certificates(cert.read_bytes())
    cert.write_bytes(_pem(inter) + _pem(leaf) + _pem(root))
    with pytest.raises(ConfigError, match="must start with the server's own certificate"):
        resolve_tls(tmp_path, cert, key, production=True)


def test_an_expiring_intermediate_is_reported(tmp_path: Path, caplog: Any) -> None:
    import logging

    now = dt.datetime.now(dt.UTC)
    root_key, inter_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _ca("test root", root_key, None, now)
    inter = _ca("short intermediate", inter_key, (root.subject, root_key), now, days=5)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(inter.subject).public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=90))
        .sign(inter_key, hashes.SHA256())
    )
    (tmp_path / "chain.pem").write_bytes(_pem(leaf) + _pem(inter))
    (tmp_path / "key.pem").write_bytes(leaf_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    caplog.set_level(logging.WARNING, logger="qpc.tls")
    resolve_tls(tmp_path, tmp_path / "chain.pem", tmp_path / "key.pem", production=True)
    assert "intermediate 1 (CN=short intermediate)" in caplog.text and "renew" in caplog.text
    assert f"TLS certificate {tmp_path / 'chain.pem'} expires" not in caplog.text


async def test_sdk_on_qh3_delivers_and_verifies_proofs(server: Any, connect: Any) -> None:
    """The SDK's qh3 option runs the same client logic: identity proof, Enqueue with a
    verified delivery proof, Fetch, and a push hint, against an aioquic client."""
    alice = await connect(server)  # aioquic
    bob = await connect(server, quic_backend="qh3")
    libs = {c.__module__.split(".")[0] for c in type(bob.protocol).__mro__}
    assert "qh3" in libs and "aioquic" not in libs
    r = await alice.enqueue(bob.identity_key, b"to qh3")  # alice verifies the proof
    assert r.seq == 1
    push = await asyncio.wait_for(bob.pushes.get(), 10)
    assert push.event_type == PushEvent.NEW_MESSAGE
    r2 = await bob.enqueue(alice.identity_key, b"from qh3")  # bob verifies the proof
    assert r2.seq == 1 and len(r2.delivery_proof) == 96
    assert [m.data for m in await bob.fetch()] == [b"to qh3"]
    assert [m.data for m in await alice.fetch()] == [b"from qh3"]


def test_unknown_client_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown QUIC backend 'quiche'"):
        asyncio.run(QpcClient.connect("127.0.0.1", 9, quic_backend="quiche"))


def test_gen_cert_command_and_client_default_trust(tmp_path: Path, monkeypatch: Any) -> None:
    from qpc_core.cli import main as qpc_main
    from qpc_core.client.cli import dev_ca

    monkeypatch.chdir(tmp_path)
    assert dev_ca() is None  # nothing to trust: the client says so instead of guessing
    assert qpc_main(["gen-cert", "--out", "data", "--hostname", "chat.example"]) == 0
    leaf = x509.load_der_x509_certificate((tmp_path / "data/server-cert.der").read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["chat.example"]
    assert dev_ca() == Path("data/ca-cert.pem")
    (tmp_path / "data/ca-cert.pem").unlink()  # a data dir from before: its own certificate
    assert dev_ca() == Path("data/server-cert.pem")


def test_check_config_validates_the_certificate_pair(tmp_path: Path, monkeypatch: Any,
                                                     capsys: Any) -> None:
    """`qpc check-config` makes the same TLS checks as `qpc run`, so a renewal can be
    checked before the restart: a good chain passes, a key of another certificate fails."""
    from qpc_core.cli import main as qpc_main

    for k in [k for k in os.environ if k.startswith("QPC_")]:
        monkeypatch.delenv(k)
    cert, key, _root = _operator_chain(tmp_path / "pki")
    monkeypatch.setenv("QPC_TLS_CERT", str(cert))
    monkeypatch.setenv("QPC_TLS_KEY", str(key))
    args = ["check-config", "--data-dir", str(tmp_path / "data")]
    assert qpc_main(args) == 0
    out = capsys.readouterr().out
    assert "tls: CN=localhost valid until" in out and "1 intermediate(s) sent" in out
    generate_self_signed(tmp_path / "other")
    monkeypatch.setenv("QPC_TLS_KEY", str(tmp_path / "other" / "server-key.pem"))
    assert qpc_main(args) == 1
    assert "is not the private key of the certificate" in capsys.readouterr().err


def test_an_old_self_signed_ca_dev_certificate_is_kept_with_a_warning(
    tmp_path: Path, caplog: Any
) -> None:
    """Data dirs from before the CA-issued dev certificate keep working (aioquic clients
    accept it) and the log says how to get one rustls/qh3 clients accept."""
    import logging

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qpc development server")])
    now = dt.datetime.now(dt.UTC)
    old = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=300))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "server-cert.der").write_bytes(old.public_bytes(serialization.Encoding.DER))
    (tmp_path / "server-key.der").write_bytes(key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    caplog.set_level(logging.WARNING, logger="qpc.tls")
    tls = resolve_tls(tmp_path, None, None, production=False)
    assert tls.certificate == old  # kept: clients pinned it
    assert "self-signed as its own CA" in caplog.text and "server-*" in caplog.text
    caplog.clear()
    fresh = tmp_path / "fresh"
    resolve_tls(fresh, None, None, production=False)
    caplog.clear()
    resolve_tls(fresh, None, None, production=False)  # a current one: no such warning
    assert "own CA" not in caplog.text
