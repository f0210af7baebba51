"""Configuration mistakes are errors with a hint, never a silently different server."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import pytest
from cryptography import x509

from qpc_core.app import App
from qpc_core.config import load_config
from qpc_core.errors import ConfigError
from qpc_core.testing import make_settings
from qpc_core.transport.certs import generate_self_signed, load_certificate, resolve_tls


def write(tmp_path: Path, text: str) -> Path:
    cfg = tmp_path / "qpc-server.toml"
    cfg.write_text(text)
    return cfg


def test_misspelt_setting_is_an_error_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^config: unknown setting 'producton' \(did you "
                                          r"mean 'production'\?\)"):
        load_config(write(tmp_path, "producton = true\n"), env={})
    # A table is a plugin's and stays allowed.
    s = load_config(write(tmp_path, "[someplugin]\nx = 1\n"), env={})
    assert s.plugin_tables == {"someplugin": {"x": 1}}


def test_plugin_tables_can_be_set_from_the_environment(tmp_path: Path) -> None:
    env = {"QPC_METRICS__QUEUE_DEPTH_RESYNC_SECS": "-5", "QPC_A__B__C": "1"}
    s = load_config(write(tmp_path, "[metrics]\nqueue_depth_resync_secs = 30\n"), env=env)
    assert s.plugin_tables["metrics"] == {"queue_depth_resync_secs": "-5"}  # env wins
    assert s.plugin_tables["a"] == {"b": {"c": "1"}}
    # ... and are validated by the plugin like the file's values.
    s = load_config(write(tmp_path, ""), {"plugins": ["metrics"]}, env=env)
    with pytest.raises(ConfigError, match=r"metrics\.queue_depth_resync_secs"):
        App(s)


def test_unknown_environment_variable_warns(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="qpc.config"):
        s = load_config(write(tmp_path, ""), env={
            "QPC_PRODUCTON": "true", "QPC_CLIENT_QUIC_BACKEND": "qh3",
            "QPC_POSTGRES_DSN": "postgresql://x", "QPC_PASSWORD": "pw"})
    assert not s.production
    assert "QPC_PRODUCTON is not a qpc setting (did you mean QPC_PRODUCTION?)" in caplog.text
    for other in ("QPC_CLIENT_QUIC_BACKEND", "QPC_POSTGRES_DSN", "QPC_PASSWORD"):
        assert other not in caplog.text  # other tools' variables are not near misses


def test_misspelt_rate_limit_group_is_refused(tmp_path: Path) -> None:
    s = make_settings(tmp_path / "data",
                      rate_limits={"delivry": {"requests": 5, "window_secs": 1}})
    with pytest.raises(ConfigError, match=r"'delivry' \(did you mean 'delivery'\?\)"):
        App(s)
    # The optional enqueue group and the defaults' groups are fine.
    App(make_settings(tmp_path / "data",
                      rate_limits={"enqueue": {"requests": 5, "window_secs": 1}}))


def test_rate_limit_group_of_a_plugin_not_loaded_is_a_warning(tmp_path: Path, caplog) -> None:
    s = make_settings(tmp_path / "data",
                      rate_limits={"federation_relay": {"requests": 5, "window_secs": 1}})
    with caplog.at_level(logging.WARNING, logger="qpc.app"):
        App(s)
    assert "rate_limits.federation_relay: no loaded method uses this group" in caplog.text


@pytest.mark.parametrize("text, where", [
    ("db_wal_autocheckpoint = 0\n", "db_wal_autocheckpoint"),
    ('log_level = "LOUD"\n', "log_level"),
    ('tls_cert = "c.pem"\n', "tls_cert is set but not its pair"),
    ('tls_key = "k.pem"\n', "tls_key is set but not its pair"),
])
def test_bad_values_are_refused(tmp_path: Path, text: str, where: str) -> None:
    with pytest.raises(ConfigError, match=where):
        load_config(write(tmp_path, text), env={})


def test_log_level_is_case_insensitive(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, 'log_level = "debug"\n'), env={}).log_level == "DEBUG"


def test_production_refuses_a_development_certificate(tmp_path: Path) -> None:
    cert, key = generate_self_signed(tmp_path / "certs")
    with pytest.raises(ConfigError, match="development certificate"):
        resolve_tls(tmp_path, cert, key, production=True)
    resolve_tls(tmp_path, cert, key, production=False)  # fine outside production


def test_production_with_postgres_needs_no_database_key(tmp_path: Path) -> None:
    s = make_settings(tmp_path / "data", production=True, storage="postgres",
                      auth_token="a-long-operator-token-123", db_key=None)
    assert not [p for p in s.production_problems() if p.startswith("db_key")]
    s = make_settings(tmp_path / "data", production=True, auth_token="a-long-operator-token-123",
                      db_key=None)
    assert [p for p in s.production_problems() if p.startswith("db_key")]


def test_gen_cert_writes_addresses_as_ip_names(tmp_path: Path) -> None:
    cert, _key = generate_self_signed(tmp_path, hostnames=("10.0.0.1", "chat.example", "[::2]"))
    san = load_certificate(cert).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("10.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("::2") in san.get_values_for_type(x509.IPAddress)
    assert san.get_values_for_type(x509.DNSName) == ["chat.example"]
    with pytest.raises(ConfigError, match="empty host name"):
        generate_self_signed(tmp_path / "x", hostnames=(" ",))
