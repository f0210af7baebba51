"""Federation configuration and certificates: mistakes are start-up errors that say what to
fix; the certificate tool makes what the scaling guide's [federation] example names."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fed_helpers import D1, D2, fed_settings
from qpc_federation import certs, get

from qpc_core.app import App
from qpc_core.config import load_config
from qpc_core.errors import ConfigError, QpcError
from qpc_core.testing import make_settings

GUIDE_EXAMPLE = '''
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


def test_enabled_without_the_plugin_is_refused(tmp_path: Path) -> None:
    cfg = tmp_path / "qpc-server.toml"
    cfg.write_text(GUIDE_EXAMPLE)
    s = load_config(cfg, {"data_dir": tmp_path / "d", "db_key": "k"}, env={})
    with pytest.raises(ConfigError, match="'federation' plugin is not loaded"):
        App(s)


_ON = {"enabled": True, "domain": "a.test", "federation_cert": "c", "federation_key": "k",
       "federation_ca": "a"}


@pytest.mark.parametrize(("table", "message"), [
    ({"enabled": True, "domain": "a.test"},
     "needs federation_cert, federation_key, federation_ca"),
    ({"enabled": True, "federation_cert": "c", "federation_key": "k", "federation_ca": "a"},
     "needs domain"),
    ({**_ON, "peers": [{"domain": "b.test", "address": "h:1"},
                       {"domain": "B.test.", "address": "h:2"}]},
     "peers[1].domain 'b.test' is listed twice"),
    ({**_ON, "peers": [{"domain": "A.test", "address": "h:1"}]},
     "peers[0].domain is this server's own domain"),
    ({"relay_timeout_secs": 0}, "relay_timeout_secs"),
])
def test_incomplete_or_contradictory_tables_are_errors(
    tmp_path: Path, table: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as e:
        make_settings(tmp_path, federation=table)
    assert message in str(e.value)
    assert "federation" in str(e.value)


def test_guide_example_env_override(tmp_path: Path) -> None:
    cfg = tmp_path / "qpc-server.toml"
    cfg.write_text(GUIDE_EXAMPLE)
    s = load_config(cfg, env={"QPC_FEDERATION__LISTEN": "127.0.0.1:7101"})
    assert s.federation.listen == "127.0.0.1:7101"
    assert s.federation.peers[0].domain == "node2.chat.example.com"


async def test_certificate_problems_stop_the_start(
    app_factory: Callable[..., Any], tmp_path: Path
) -> None:
    certs.make_ca(tmp_path / "ca")
    certs.issue(tmp_path / "ca", tmp_path / "n1", D1)
    # domain not in the certificate: peers would refuse this node.
    with pytest.raises(QpcError, match=r"'node2\.test' is not among the names"):
        await app_factory(data_dir=tmp_path / "a", plugins=["federation"],
                          federation=fed_settings(tmp_path / "n1", D2, 0, []))
    # a CA that did not issue the certificate
    certs.make_ca(tmp_path / "ca2")
    s = fed_settings(tmp_path / "n1", D1, 0, [])
    s["federation_ca"] = tmp_path / "ca2" / certs.CA_CERT
    with pytest.raises(QpcError, match="not a valid client certificate"):
        await app_factory(data_dir=tmp_path / "b", plugins=["federation"], federation=s)
    # a key that is not the certificate's
    certs.issue(tmp_path / "ca", tmp_path / "other", D1)
    s = fed_settings(tmp_path / "n1", D1, 0, [])
    s["federation_key"] = tmp_path / "other" / certs.NODE_KEY
    with pytest.raises(QpcError, match=r"federation\.federation_key: .* is not the private key"):
        await app_factory(data_dir=tmp_path / "c", plugins=["federation"], federation=s)
    # a missing file
    s = fed_settings(tmp_path / "n1", D1, 0, [])
    s["federation_ca"] = tmp_path / "nope.der"
    with pytest.raises(QpcError, match=r"federation\.federation_ca: cannot read"):
        await app_factory(data_dir=tmp_path / "d", plugins=["federation"], federation=s)


async def test_loaded_but_disabled_does_nothing(app_factory: Callable[..., Any]) -> None:
    app = await app_factory(plugins=["federation"])
    assert "federation" not in [t.name for _p, t in app.transports]
    assert get(app) is None


def test_certificate_tool(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs.main(["ca", "--out", str(tmp_path / "ca")]) == 0
    key_mode = stat.S_IMODE((tmp_path / "ca" / certs.CA_KEY).stat().st_mode)
    assert key_mode == 0o600
    # never replaced: every node certificate issued under it would stop being trusted
    assert certs.main(["ca", "--out", str(tmp_path / "ca")]) == 1
    assert "already holds a federation CA" in capsys.readouterr().err
    assert certs.main(["issue", "--ca-dir", str(tmp_path / "ca"), "--domain", "Node1.Test.",
                       "--ip", "10.0.1.1", "--out", str(tmp_path / "n1")]) == 0
    for name in (certs.NODE_CERT, certs.NODE_KEY, certs.CA_CERT):
        assert (tmp_path / "n1" / name).is_file()
    assert stat.S_IMODE((tmp_path / "n1" / certs.NODE_KEY).stat().st_mode) == 0o600
    tls = certs.load(load_config(None, {"federation": fed_settings(tmp_path / "n1", D1, 0, [])},
                                 env={}).federation)
    assert tls.verify_peer([tls.material.certificate]) == {D1}
    assert certs.main(["issue", "--ca-dir", str(tmp_path / "ca"), "--domain", "bad_name!",
                       "--out", str(tmp_path / "x")]) == 1
    assert "is not a DNS name" in capsys.readouterr().err
    assert certs.main(["issue", "--ca-dir", str(tmp_path / "ca"), "--domain", "a.test",
                       "--ip", "nope", "--out", str(tmp_path / "x")]) == 1
    assert certs.main(["issue", "--ca-dir", str(tmp_path / "missing"), "--domain", "a.test",
                       "--out", str(tmp_path / "x")]) == 1
    assert "cannot read" in capsys.readouterr().err


def test_a_disabled_table_is_not_held_to_the_peer_rules(tmp_path: Path) -> None:
    s = make_settings(tmp_path, federation={"domain": "a.test", "peers": [
        {"domain": "b.test", "address": "h:1"}, {"domain": "b.test", "address": "h:2"}]})
    assert s.federation.enabled is False


def test_check_config_checks_the_federation_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from qpc_core.cli import main as qpc

    certs.make_ca(tmp_path / "ca")
    certs.issue(tmp_path / "ca", tmp_path / "n1", D1)
    certs.issue(tmp_path / "ca", tmp_path / "other", D1)
    table = fed_settings(tmp_path / "n1", D1, 7001, [(D2, 7002)])
    lines = ["plugins = [\"federation\"]", "[federation]"]
    lines += [f'{k} = "{v}"' if isinstance(v, (str, Path)) else f"{k} = {str(v).lower()}"
              for k, v in table.items() if k != "peers"]
    lines += ["[[federation.peers]]", f'domain = "{D2}"', 'address = "10.0.1.2:7001"']
    cfg = tmp_path / "qpc-server.toml"
    cfg.write_text("\n".join(lines) + "\n")
    args = ["check-config", "--config", str(cfg), "--data-dir", str(tmp_path / "data")]
    assert qpc(args) == 0
    out = capsys.readouterr().out
    assert f"federation: {D1} on 127.0.0.1:7001, certificate valid until" in out
    assert "1 peer(s): node2.test" in out
    # A key that is not the certificate's: found before any restart.
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "n1" / certs.NODE_KEY),
                                           str(tmp_path / "other" / certs.NODE_KEY)))
    assert qpc(args) == 1
    assert "federation.federation_key" in capsys.readouterr().err
