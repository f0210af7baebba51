from __future__ import annotations

from pathlib import Path

import pytest

from qpc_core.config import load_config
from qpc_core.errors import ConfigError

GUIDE = Path(__file__).resolve().parents[2] / "shared" / "spec" / "scaling-guide.md"

FEDERATION_EXAMPLE = '''
# qpc-server.toml on node-1
[federation]
enabled = true
domain = "node1.chat.example.com"
listen = "0.0.0.0:7001"
federation_cert = "data/federation-cert.der"
federation_key = "data/federation-key.der"
federation_ca = "data/federation-ca.der"

[[federation.peers]]
domain = "node2.chat.example.com"
address = "10.0.1.2:7001"
'''


def _guide_toml() -> str:
    """The [federation] example exactly as the scaling guide prints it (when available)."""
    if GUIDE.is_file():
        text = GUIDE.read_text()
        start = text.index("```toml") + len("```toml")
        return text[start : text.index("```", start)]
    return FEDERATION_EXAMPLE


def test_guide_federation_example_parses_verbatim(tmp_path: Path) -> None:
    cfg = tmp_path / "qpc-server.toml"
    cfg.write_text(_guide_toml())
    s = load_config(cfg, env={})
    assert s.federation.enabled is True
    assert s.federation.domain == "node1.chat.example.com"
    assert s.federation.peers[0].address == "10.0.1.2:7001"
    assert str(s.federation.federation_ca) == "data/federation-ca.der"


def test_defaults_match_guide() -> None:
    s = load_config(None, env={})
    assert s.listen == "0.0.0.0:7000"
    assert s.metrics_listen == "0.0.0.0:9090"
    assert s.max_idle_timeout_secs == 300
    assert s.db_pool_size == 4
    assert s.db_synchronous == "NORMAL"
    assert s.resolved_db_path == Path("data/qpc.db")


def test_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('listen = "127.0.0.1:1000"\nmetrics_listen = "127.0.0.1:2000"\n'
                   'data_dir = "/tmp/file"\n')
    env = {"QPC_LISTEN": "127.0.0.1:1001", "QPC_DATA_DIR": "/tmp/env"}
    s = load_config(cfg, {"listen": "127.0.0.1:1002"}, env=env)
    assert s.listen == "127.0.0.1:1002"  # CLI
    assert s.data_dir == Path("/tmp/env")  # env over file
    assert s.metrics_listen == "127.0.0.1:2000"  # file over default


def test_env_names_from_reference() -> None:
    env = {"QPC_AUTH_TOKEN": "t" * 20, "QPC_DB_KEY": "k", "QPC_DB_PATH": "/x/q.db",
           "QPC_TLS_CERT": "/c.der", "QPC_TLS_KEY": "/k.der", "QPC_METRICS_LISTEN": "1.2.3.4:9",
           "QPC_METRICS_ENABLED": "false", "QPC_PRODUCTION": "false", "QPC_PLUGINS": "a, b"}
    s = load_config(None, env=env)
    assert s.auth_token_value() == "t" * 20
    assert s.db_key is not None and s.db_key.get_secret_value() == "k"
    assert s.resolved_db_path == Path("/x/q.db")
    assert s.metrics_enabled is False
    assert s.plugins == ["a", "b"]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[[federation.peers]]\ndomain = "x"\naddress = "nope"\n',
         "federation.peers[0].address: expected host:port"),
        ('listen = "0.0.0.0:99999"\n', "listen: expected host:port with a port in 0-65535"),
        ('max_idle_timeout_secs = -1\n', "max_idle_timeout_secs: Input should be greater than 0"),
        ('db_synchronous = "SOMETIMES"\n', "db_synchronous:"),
        ('[rate_limits.delivery]\nrequests = 0\nwindow_secs = 1\n',
         "rate_limits.delivery.requests"),
        ('[federation]\nenabeld = true\n', "federation.enabeld: Extra inputs are not permitted"),
        ("listen = ", "invalid TOML"),
    ],
)
def test_bad_config_names_the_path(tmp_path: Path, toml: str, expected: str) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(toml)
    with pytest.raises(ConfigError) as ei:
        load_config(cfg, env={})
    assert expected in str(ei.value)


def test_bad_env_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="max_connections"):
        load_config(None, env={"QPC_MAX_CONNECTIONS": "lots"})
    with pytest.raises(ConfigError, match="environment"):
        load_config(None, env={"QPC_RATE_LIMITS": "{not json"})


def test_missing_config_file() -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(Path("/nonexistent/qpc.toml"), env={})


def test_production_rules() -> None:
    s = load_config(None, env={"QPC_PRODUCTION": "true"})
    problems = "\n".join(s.production_problems())
    assert "auth_token" in problems and "db_key" in problems and "tls_cert" in problems
    s = load_config(None, env={"QPC_PRODUCTION": "true", "QPC_AUTH_TOKEN": "short"})
    assert any("16 characters" in p for p in s.production_problems())
