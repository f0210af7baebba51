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
from qpc_core.testing import TEST_TOKEN, ServerProcess, quic_port, quic_transport
from qpc_core.transport.backend import peer_certificate_der
from qpc_core.transport.certs import generate_self_signed

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
    metrics_port = _free_tcp_port()
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


def _free_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
