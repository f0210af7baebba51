"""Plugin discovery, ordering, validation and the third-party plugin workflow."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from plugin_helpers import use_fake_plugins

from conftest import make_settings
from qpc_core import hookspecs
from qpc_core.app import App
from qpc_core.errors import ConfigError, PluginError
from qpc_core.hooks import Hooks
from qpc_core.plugins import BUILTIN_PLUGINS

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _app(tmp_path: Path, **kw) -> App:
    return App(make_settings(tmp_path / "data", **kw))


def test_builtins_load_in_order(tmp_path: Path) -> None:
    app = _app(tmp_path)
    assert [p.name for p in app.plugins] == [n for n, _ in BUILTIN_PLUGINS]
    assert all(p.builtin for p in app.plugins)
    assert [p.order for p in app.plugins] == list(range(len(app.plugins)))
    assert 802 in app.methods and app.methods[802][0] == "core"


def test_missing_plugin_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match=r"plugin 'nosuch' is not installed: no entry point "
                                          r"'nosuch' in group 'qpc'"):
        _app(tmp_path, plugins=["nosuch"])


def test_import_failure_names_plugin_and_cause(tmp_path, monkeypatch) -> None:
    use_fake_plugins(monkeypatch, broken="broken_import")
    with pytest.raises(PluginError, match=r"plugin 'broken' \(.*\) failed to import: "
                                          r"No module named 'qpc_definitely_missing_module'"):
        _app(tmp_path, plugins=["broken"])


def test_misspelt_hook_is_caught(tmp_path, monkeypatch) -> None:
    use_fake_plugins(monkeypatch, typo="misspelt")
    with pytest.raises(PluginError, match=r"plugin 'typo'.*register_rpc_method"):
        _app(tmp_path, plugins=["typo"])


def test_sync_async_mismatch(tmp_path, monkeypatch) -> None:
    use_fake_plugins(monkeypatch, syncstart="sync_startup", asyncnote="async_notify")
    with pytest.raises(PluginError, match=r"hook 'startup' must be 'async def'"):
        _app(tmp_path, plugins=["syncstart"])
    with pytest.raises(PluginError, match=r"hook 'on_message_enqueued' must be a plain 'def'"):
        _app(tmp_path, plugins=["asyncnote"])


def test_duplicate_method_id_names_both_plugins(tmp_path, monkeypatch) -> None:
    use_fake_plugins(monkeypatch, dup="dup_method")
    with pytest.raises(PluginError, match=r"method 802 is claimed by both plugin 'core' "
                                          r"\(Health\) and plugin 'dup' \(MyHealth\)"):
        _app(tmp_path, plugins=["dup"])


def test_a_plugin_method_may_not_use_the_reserved_enqueue_group(tmp_path, monkeypatch) -> None:
    use_fake_plugins(monkeypatch, sneaky="reserved_group")
    with pytest.raises(PluginError, match=r"method 9101 \(Sneaky\) of plugin 'sneaky' uses "
                                          r"the rate-limit group 'enqueue', which is reserved"):
        _app(tmp_path, plugins=["sneaky"])


def test_blocking_a_builtin(tmp_path) -> None:
    app = _app(tmp_path, plugins=["no:keys"])
    assert "keys" not in [p.name for p in app.plugins]
    assert 300 not in app.methods


def test_plugin_config_is_validated_with_path(tmp_path, monkeypatch) -> None:
    use_fake_plugins(monkeypatch, with_config="with_config")
    app = _app(tmp_path, plugins=["with_config"], with_config={"max_things": 7})
    assert app.plugin_config("with_config").max_things == 7
    with pytest.raises(ConfigError, match=r"config: with_config.max_things: Input should be "
                                          r"greater than 0"):
        _app(tmp_path, plugins=["with_config"], with_config={"max_things": 0})
    with pytest.raises(ConfigError, match=r"with_config.nope: Extra inputs are not permitted"):
        _app(tmp_path, plugins=["with_config"], with_config={"nope": 1})


async def test_notification_failures_are_isolated(tmp_path, monkeypatch, connect) -> None:
    use_fake_plugins(monkeypatch, failing="failing_notify")
    from fake_plugins import failing_notify

    failing_notify.CALLS.clear()
    app = _app(tmp_path, plugins=["failing"])
    await app.start()
    try:
        c = await connect(app)
        peer = await connect(app)
        resp = await c.enqueue(peer.identity_key, b"ciphertext")
        assert resp.seq == 1  # the failing on_message_enqueued did not break the RPC
        assert failing_notify.CALLS == ["startup", "enqueued"]
    finally:
        await app.stop()
    assert failing_notify.CALLS[-1] == "shutdown"


def test_every_hookspec_has_a_facade_method_and_docs() -> None:
    docs = (ROOT / "docs" / "hooks.md").read_text()
    specs = [n for n in dir(hookspecs) if not n.startswith("_")
             and getattr(getattr(hookspecs, n), "qpc_spec", None) is not None]
    assert len(specs) >= 20
    for name in specs:
        assert hasattr(Hooks, name), f"hooks.Hooks lacks a facade method for {name}"
        assert f"### `{name}`" in docs, f"docs/hooks.md does not document {name}"
        assert getattr(hookspecs, name).__doc__, f"hookspec {name} has no docstring"


@pytest.fixture(scope="module")
def hello_installed():
    """pip-install the example third-party plugin into this environment (and remove it)."""
    src = ROOT / "tests" / "data" / "qpc-hello"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", str(src)], check=True)
    yield
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", "qpc-hello"],
                   check=True)


def test_third_party_plugin_discovered_and_loaded(hello_installed, tmp_path) -> None:
    out = subprocess.run([str(BIN / "qpc"), "plugins", "--json"], capture_output=True,
                         text=True, check=True)
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["hello"]["distribution"] == "qpc-hello"
    assert rows["hello"]["version"] == "0.3.0"
    assert rows["hello"]["hooks"] == ["register_rpc_methods", "startup"]
    assert rows["core"]["builtin"] is True
    chk = subprocess.run([str(BIN / "qpc"), "check-config", "--plugins", "hello",
                          "--data-dir", str(tmp_path / "d")], capture_output=True, text=True,
                         env={"PATH": str(BIN), "QPC_DB_KEY": "x"})
    assert chk.returncode == 0, chk.stderr
    assert "hello" in chk.stdout and "qpc-hello 0.3.0" in chk.stdout


async def test_third_party_plugin_serves_rpc(hello_installed, tmp_path, connect) -> None:
    app = _app(tmp_path, plugins=["hello"])
    await app.start()
    try:
        assert app.state["hello"] == "started"
        c = await connect(app, token=None, new_identity=False)
        from qpc_core.pb import common_pb2

        r = await c.call(9001, common_pb2.HealthRequest(), common_pb2.HealthResponse)
        assert r.status == "hello"
    finally:
        await app.stop()


def test_cli_plugin_error_is_one_line_exit_1(tmp_path) -> None:
    r = subprocess.run([str(BIN / "qpc"), "check-config", "--plugins", "nosuch",
                        "--data-dir", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qpc: error: plugin 'nosuch' is not installed")


def test_cli_bad_config_exit_1(tmp_path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[[federation.peers]]\ndomain = "x"\naddress = "nope"\n')
    r = subprocess.run([str(BIN / "qpc"), "check-config", "--config", str(cfg)],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert "config: federation.peers[0].address: expected host:port" in r.stderr


def test_qpc_version_and_server_script() -> None:
    r = subprocess.run([str(BIN / "qpc"), "version"], capture_output=True, text=True, check=True)
    assert r.stdout.startswith("qpc 0.")
    assert (BIN / "qpc-server").exists() and (BIN / "qpc-client").exists()
