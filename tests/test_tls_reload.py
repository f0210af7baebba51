"""Certificate reload (SIGHUP): new connections get the certificate now in ``tls_cert`` /
``tls_key``, established ones keep theirs (and their identity proofs stay valid), bad files
leave the old pair in use, and the metrics plugin reports the served certificate's expiry
and each reload's result."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding
from quic_raw import until

from qpc_core.admin.testing import Scrape, get
from qpc_core.client.sdk import QpcClient
from qpc_core.identity import certificate_binding
from qpc_core.testing import (
    TEST_TOKEN,
    ServerProcess,
    free_tcp_port,
    free_udp_port,
    quic_port,
    quic_transport,
)
from qpc_core.transport.backend import peer_certificate_der
from qpc_core.transport.certs import generate_self_signed, resolve_tls

BACKENDS = ("aioquic", "qh3")


class Pair:
    """A development CA and a server certificate it issued (for localhost / 127.0.0.1)."""

    def __init__(self, root: Path) -> None:
        generate_self_signed(root)
        self.dir = root
        self.ca = root / "ca-cert.pem"
        self.cert_pem = root / "server-cert.pem"
        self.key_pem = root / "server-key.pem"
        self.leaf = x509.load_der_x509_certificate((root / "server-cert.der").read_bytes())

    @property
    def der(self) -> bytes:
        return self.leaf.public_bytes(Encoding.DER)


def install(pair: Pair, live: Path) -> tuple[Path, Path]:
    """Put ``pair`` at the configured paths the way an ACME client does (write, rename)."""
    live.mkdir(exist_ok=True)
    for src, name in ((pair.cert_pem, "cert.pem"), (pair.key_pem, "key.pem")):
        tmp = live / (name + ".new")
        shutil.copyfile(src, tmp)
        os.replace(tmp, live / name)
    return live / "cert.pem", live / "key.pem"


@pytest.fixture
def pairs(tmp_path: Path) -> tuple[Pair, Pair, Path]:
    return Pair(tmp_path / "a"), Pair(tmp_path / "b"), tmp_path / "live"


async def client(port: int, ca: Path, backend: str = "aioquic") -> QpcClient:
    return await QpcClient.connect("127.0.0.1", port, token=TEST_TOKEN,
                                   identity=Ed25519PrivateKey.generate(), ca_cert=ca,
                                   quic_backend=backend)


def served(c: QpcClient) -> bytes | None:
    return peer_certificate_der(c._proto._quic)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_new_connections_get_the_reloaded_certificate(
    app_factory: Callable[..., Any], pairs: tuple[Pair, Pair, Path], backend: str
) -> None:
    a, b, live = pairs
    cert, key = install(a, live)
    app = await app_factory(tls_cert=cert, tls_key=key, quic_backend=backend)
    port = quic_port(app)
    old = await client(port, a.ca, backend)  # identity proven against certificate A
    try:
        assert served(old) == a.der
        install(b, live)
        assert await app.reload_tls() == {"quic": None}
        assert quic_transport(app).tls_certificate == b.leaf
        new = await client(port, b.ca, backend)  # proves its identity against B
        try:
            assert served(new) == b.der
            await new.health()
        finally:
            await new.close()
        # The established connection keeps A, and a proof bound to A still holds on it.
        await old.health()
        await old.prove_identity()
        with pytest.raises(Exception):  # noqa: B017 - trusting only A's CA: refused now
            c = await client(port, a.ca, backend)
            await c.close()
    finally:
        await old.close()


async def test_bad_files_leave_the_old_certificate_in_use(
    app_factory: Callable[..., Any], pairs: tuple[Pair, Pair, Path]
) -> None:
    a, b, live = pairs
    cert, key = install(a, live)
    app = await app_factory(tls_cert=cert, tls_key=key)
    port = quic_port(app)
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    (err,) = (await app.reload_tls()).values()
    assert err is not None and "tls_cert" in err
    shutil.copyfile(b.cert_pem, cert)  # B's certificate with A's key
    (err,) = (await app.reload_tls()).values()
    assert err is not None and "is not the private key of the certificate" in err
    os.unlink(key)
    (err,) = (await app.reload_tls()).values()
    assert err is not None and "file not found" in err
    assert quic_transport(app).tls_certificate == a.leaf
    c = await client(port, a.ca)
    try:
        assert served(c) == a.der
    finally:
        await c.close()


async def test_sighup_reloads_a_running_server(pairs: tuple[Pair, Pair, Path]) -> None:
    """``kill -HUP`` on a real `qpc run`: the log says so, new connections get the new
    certificate, and /metrics shows its expiry and the reloads' results."""
    a, b, live = pairs
    cert, key = install(a, live)
    metrics_port = free_tcp_port()
    srv = ServerProcess(
        live.parent / "data", args=["--plugins", "metrics"],
        env={"QPC_TLS_CERT": str(cert), "QPC_TLS_KEY": str(key),
             "QPC_METRICS_ENABLED": "true", "QPC_METRICS_LISTEN": f"127.0.0.1:{metrics_port}"})
    await srv.start()
    try:
        url = f"http://127.0.0.1:{metrics_port}/metrics"

        async def metrics() -> Scrape:
            r = await get(url, timeout=5)
            assert r.status == 200, r.text
            return Scrape.parse(r.text)

        def expiry(m: Scrape) -> float:
            return m.value("tls_certificate_expiry_timestamp_seconds", listener="quic")

        def reloads(m: Scrape, result: str) -> float:
            return m.value("tls_reloads_total", listener="quic", result=result)

        async def shows_a() -> bool:
            return expiry(await metrics()) == a.leaf.not_valid_after_utc.timestamp()

        assert await _eventually(shows_a), "A's expiry never shown"
        install(b, live)
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGHUP)
        await until(lambda: any("certificate reloaded" in line for line in srv.log),
                    timeout=15, what="no reload logged")
        c = await client(srv.port, b.ca)
        try:
            assert served(c) == b.der
        finally:
            await c.close()
        m = await metrics()
        assert expiry(m) == b.leaf.not_valid_after_utc.timestamp()
        assert reloads(m, "ok") == 1
        key.write_bytes(b"garbage")
        srv.proc.send_signal(signal.SIGHUP)
        await until(lambda: any("certificate not reloaded" in line for line in srv.log),
                    timeout=15, what="no refusal logged")
        m = await metrics()
        assert (reloads(m, "ok"), reloads(m, "error")) == (1, 1)
        assert expiry(m) == b.leaf.not_valid_after_utc.timestamp()
        c = await client(srv.port, b.ca)  # still serving B
        try:
            assert served(c) == b.der
        finally:
            await c.close()
        assert srv.proc.returncode is None
    finally:
        assert await srv.terminate() == 0



async def _eventually(check: Callable[[], Any], attempts: int = 100) -> bool:
    """Poll an HTTP check a bounded number of times (the admin app starts right after the
    QUIC listener this test waited for)."""
    for _ in range(attempts):
        try:
            if await check():
                return True
        except OSError:
            pass
        await asyncio.sleep(0.05)
    return False


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_binding_is_the_certificate_the_handshake_presented(
    app_factory: Callable[..., Any], pairs: tuple[Pair, Pair, Path], backend: str
) -> None:
    """The client's first Initial does not decrypt (damaged on the way): the connection
    exists, but the library sets up its TLS context again for the retransmitted Initial.
    A reload in between makes that handshake present B: the connection's tls_binding (what
    identity proofs are checked against) must be B's, not the A its first datagram saw."""
    a, b, live = pairs
    cert, key = install(a, live)
    app = await app_factory(tls_cert=cert, tls_key=key, quic_backend=backend)
    t = quic_transport(app)
    server = t.server
    receive = server.datagram_received
    damaged: list[bytes] = []

    def damage_first_initial(data: bytes, addr: Any) -> None:
        if not damaged and data[0] & 0x80:
            bad = bytearray(data)
            bad[200] ^= 0xFF  # inside the protected payload: decryption fails
            damaged.append(bytes(bad))
            receive(bytes(bad), addr)
            # The reload's swap, done here so it surely falls between the two Initials.
            install(b, live)
            assert t.backend is not None
            t.backend.apply_tls(t._cfg, resolve_tls(app.data_dir, cert, key, production=False))
            return
        receive(data, addr)

    server.datagram_received = damage_first_initial
    # An aioquic client: its Initial's protected payload covers byte 200 of the datagram
    # (qh3's client pads after the packet, where a flipped byte changes nothing).
    c = await client(quic_port(app), b.ca)  # proves its identity against B
    try:
        assert damaged and served(c) == b.der
        (conn,) = t.protocols
        assert conn.tls_binding == certificate_binding(b.der)
        await c.prove_identity()
    finally:
        await c.close()


def ed448_pair(root: Path) -> tuple[Path, Path]:
    """A self-signed Ed448 certificate for localhost: valid X.509 that cryptography (and so
    qpc's checks) accepts, but whose key qh3 cannot load."""
    import datetime as dt

    from cryptography.hazmat.primitives.asymmetric import ed448
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat
    from cryptography.x509.oid import NameOID

    root.mkdir()
    key = ed448.Ed448PrivateKey.generate()
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed448")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), False)
            .sign(key, None))
    (root / "cert.pem").write_bytes(cert.public_bytes(Encoding.PEM))
    (root / "key.pem").write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8,
                                                     NoEncryption()))
    return root / "cert.pem", root / "key.pem"


async def test_a_pair_qh3_cannot_load_leaves_the_old_one_whole(
    app_factory: Callable[..., Any], pairs: tuple[Pair, Pair, Path], tmp_path: Path
) -> None:
    """qh3 sets the certificate before it parses the key: a key type it cannot load must not
    leave the new certificate beside the old key (every handshake would fail)."""
    a, _b, live = pairs
    cert, key = install(a, live)
    app = await app_factory(tls_cert=cert, tls_key=key, quic_backend="qh3")
    new_cert, new_key = ed448_pair(tmp_path / "ed448")
    shutil.copyfile(new_cert, cert)
    shutil.copyfile(new_key, key)
    (err,) = (await app.reload_tls()).values()
    assert err is not None and "qh3" in err
    assert quic_transport(app).tls_certificate == a.leaf
    c = await client(quic_port(app), a.ca, "qh3")
    try:
        assert served(c) == a.der
    finally:
        await c.close()


async def test_a_chain_file_cut_short_is_refused(
    app_factory: Callable[..., Any], pairs: tuple[Pair, Pair, Path]
) -> None:
    """A fullchain file read while an ACME client rewrites it in place: the leaf is whole,
    the intermediate cut off.  Served as is, clients missing the intermediate would fail."""
    a, b, live = pairs
    cert, key = install(a, live)
    app = await app_factory(tls_cert=cert, tls_key=key)
    install(b, live)
    chain = cert.read_bytes()
    assert chain.count(b"-----BEGIN CERTIFICATE-----") == 2  # leaf, then its CA
    cert.write_bytes(chain[: len(chain) - 100])
    (err,) = (await app.reload_tls()).values()
    assert err is not None and "2 certificate blocks but only 1" in err
    assert quic_transport(app).tls_certificate == a.leaf


def _ignores_sighup(pid: int) -> bool:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigIgn:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGHUP - 1)))
    return False


async def test_a_sighup_during_start_up_does_not_end_the_server(tmp_path: Path) -> None:
    """`systemctl reload` racing a start: the signal arrives while `qpc run` still imports and
    reads its configuration.  The server ignores SIGHUP from its first statement until its
    handler exists (systemd would not restart a unit that died of SIGHUP)."""
    import sys

    port = free_udp_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import sys; from qpc_core.launch import main; sys.exit(main())",
        "run", "--listen", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={"PATH": os.environ.get("PATH", ""), "QPC_DB_KEY": "k",
             "QPC_METRICS_ENABLED": "false"})
    try:
        await until(lambda: _ignores_sighup(proc.pid), timeout=15,
                    what="qpc run never ignored SIGHUP")
        proc.send_signal(signal.SIGHUP)  # long before the listener starts
        assert proc.stdout is not None
        seen = b""
        while b"QUIC listening on" not in seen:
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            assert line, f"the server ended: {seen.decode()}"
            seen += line
        assert proc.returncode is None
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 30) == 0



@pytest.mark.parametrize("when", ["expired", "not yet valid"])
async def test_a_certificate_not_valid_now_is_not_loaded(
    app_factory: Callable[..., Any], pairs: tuple[Pair, Pair, Path], tmp_path: Path, when: str
) -> None:
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import NoEncryption, PrivateFormat
    from cryptography.x509.oid import NameOID

    a, _b, live = pairs
    cert, key = install(a, live)
    app = await app_factory(tls_cert=cert, tls_key=key)
    k = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start = now - dt.timedelta(days=60) if when == "expired" else now + dt.timedelta(days=2)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, when)])
    bad = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
           .public_key(k.public_key()).serial_number(x509.random_serial_number())
           .not_valid_before(start).not_valid_after(start + dt.timedelta(days=30))
           .sign(k, hashes.SHA256()))
    cert.write_bytes(bad.public_bytes(Encoding.PEM))
    key.write_bytes(k.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    (err,) = (await app.reload_tls()).values()
    assert err is not None and ("expired on" if when == "expired" else "not valid before") in err
    assert quic_transport(app).tls_certificate == a.leaf


def test_the_legacy_x509_certificate_label_still_counts(pairs: tuple[Pair, Pair, Path]) -> None:
    """The cut-short check counts the blocks the PEM reader takes: "X509 CERTIFICATE" too."""
    from qpc_core.transport.certs import load_certificate_chain

    a, _b, live = pairs
    chain = a.cert_pem.read_bytes().replace(b"-----BEGIN CERTIFICATE-----\n",
                                            b"-----BEGIN X509 CERTIFICATE-----\n", 1)
    chain = chain.replace(b"-----END CERTIFICATE-----\n", b"-----END X509 CERTIFICATE-----\n", 1)
    live.mkdir()
    (live / "legacy.pem").write_bytes(chain)
    assert len(load_certificate_chain(live / "legacy.pem")) == 2


async def test_changed_certificate_paths_apply_with_the_reload(
    app_factory: Callable[..., Any], settings_factory: Callable[..., Any],
    pairs: tuple[Pair, Pair, Path]
) -> None:
    """SIGHUP (``App.reload``) reads the configuration first: ``tls_cert`` / ``tls_key``
    pointing at other files are served from then on."""
    a, b, _live = pairs
    cfg: dict[str, Any] = {"tls_cert": a.cert_pem, "tls_key": a.key_pem}
    app = await app_factory(**cfg)
    app.config_source = lambda: settings_factory(**cfg)
    cfg.update(tls_cert=b.cert_pem, tls_key=b.key_pem)
    config, tls = await app.reload()
    assert config.applied == ("tls_cert", "tls_key") and tls == {"quic": None}
    c = await client(quic_port(app), b.ca)
    try:
        assert served(c) == b.der
    finally:
        await c.close()
    cfg["tls_key"] = a.key_pem  # B's certificate with A's key: the pair is refused
    config, tls = await app.reload()
    assert config.applied == ("tls_key",)
    assert tls["quic"] is not None and "is not the private key" in tls["quic"]
    assert quic_transport(app).tls_certificate == b.leaf
