"""The transport limit keys: defaults and validation."""

from __future__ import annotations

import pytest

from qpc_core.config import load_config
from qpc_core.errors import ConfigError


def test_transport_limit_defaults() -> None:
    s = load_config(None, {}, env={})
    assert s.handshake_timeout_secs == 10
    assert s.auth_timeout_secs == 30
    assert s.request_receive_timeout_secs == 30
    assert s.max_connections_per_ip == 256
    assert s.max_request_buffer_bytes == 16 * 1024 * 1024
    assert s.max_unauthenticated_payload_bytes == 64 * 1024
    assert s.quic_retry == "auto"
    assert s.retry_half_open_threshold == 128


def test_transport_limits_from_environment() -> None:
    s = load_config(None, {}, env={"QPC_AUTH_TIMEOUT_SECS": "5", "QPC_QUIC_RETRY": "on"})
    assert s.auth_timeout_secs == 5 and s.quic_retry == "on"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_request_buffer_bytes": 1024 * 1024},
         "max_request_buffer_bytes: must be at least max_payload_bytes"),
        ({"handshake_timeout_secs": 0}, "handshake_timeout_secs: Input should be greater than 0"),
        ({"auth_timeout_secs": -1}, "auth_timeout_secs: Input should be greater than 0"),
        ({"max_connections_per_ip": 0}, "max_connections_per_ip"),
        ({"max_unauthenticated_payload_bytes": 10}, "max_unauthenticated_payload_bytes"),
        ({"quic_retry": "sometimes"}, "quic_retry"),
    ],
)
def test_transport_limit_validation(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, env={})


def test_small_payload_allows_small_buffer() -> None:
    s = load_config(None, {"max_payload_bytes": 65536, "max_request_buffer_bytes": 65536},
                    env={})
    assert s.max_request_buffer_bytes == 65536
