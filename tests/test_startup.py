"""Start-up behaviour: dev secrets, certificate checks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from qpc_core.errors import ConfigError
from qpc_core.transport.certs import generate_self_signed, resolve_tls


def test_dev_mode_generates_certificate_der_and_pem(tmp_path: Path) -> None:
    tls = resolve_tls(tmp_path, None, None, production=False)
    for name in ("server-cert.der", "server-key.der", "server-cert.pem", "server-key.pem"):
        assert (tmp_path / name).is_file()
    assert os.stat(tmp_path / "server-key.der").st_mode & 0o777 == 0o600
    assert tls.cert_path == tmp_path / "server-cert.der"
    # Second start reuses the same certificate.
    again = resolve_tls(tmp_path, None, None, production=False)
    assert again.certificate == tls.certificate


def test_production_refuses_without_certificate_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="production requires certificate files"):
        resolve_tls(tmp_path, None, None, production=True)
    with pytest.raises(ConfigError, match="file not found"):
        resolve_tls(tmp_path, tmp_path / "nope.der", tmp_path / "nope.key", production=True)


def test_warns_when_certificate_expires_soon(tmp_path: Path, caplog) -> None:
    cert, key = generate_self_signed(tmp_path, days=10)
    caplog.set_level(logging.WARNING, logger="qpc.tls")
    resolve_tls(tmp_path, cert, key, production=False)  # operator files, DER
    assert "expires in" in caplog.text and "renew" in caplog.text
    caplog.clear()
    generate_self_signed(tmp_path / "long", days=365)
    resolve_tls(tmp_path, tmp_path / "long" / "server-cert.pem",
                tmp_path / "long" / "server-key.pem", production=False)  # PEM works too
    assert "expires in" not in caplog.text


def test_bad_certificate_file_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "cert.der"
    bad.write_bytes(b"not a certificate")
    key = tmp_path / "key.der"
    key.write_bytes(b"nor a key")
    with pytest.raises(ConfigError, match=r"tls_cert: .* is not a DER or PEM certificate"):
        resolve_tls(tmp_path, bad, key, production=True)


async def test_dev_database_key_is_generated_once_with_mode_0600(app_factory, tmp_path) -> None:
    data = tmp_path / "devdata"
    app = await app_factory(db_key=None, data_dir=data)
    key_file = data / "db.key"
    assert key_file.is_file() and os.stat(key_file).st_mode & 0o777 == 0o600
    first = key_file.read_text()
    await app.stop()
    await app_factory(db_key=None, data_dir=data)  # reopens the same DB with the same key
    assert key_file.read_text() == first


async def test_production_refuses_to_start_without_db_key(app_factory, tmp_path) -> None:
    from qpc_core.builtin.sqlcipher import resolve_db_key

    class FakeApp:
        settings = type("S", (), {"db_key": None, "production": True, "data_dir": tmp_path})()

    with pytest.raises(ConfigError, match="production requires a database key"):
        resolve_db_key(FakeApp())  # type: ignore[arg-type]


def test_qpc_run_exits_with_the_apps_exit_code(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """`qpc run` returns 1 when the server stopped because of a failure (e.g. a failed store),
    0 after an ordinary shutdown."""
    from qpc_core import cli
    from qpc_core.app import App

    codes = iter([1, 0])

    async def serve_forever(self: App) -> None:
        self.exit_code = next(codes)

    monkeypatch.setattr(App, "serve_forever", serve_forever)
    monkeypatch.setattr(cli, "_setup_logging", lambda level: None)  # no global logging changes
    argv = ["run", "--data-dir", str(tmp_path / "data")]
    assert cli.main(argv) == 1
    assert cli.main(argv) == 0
