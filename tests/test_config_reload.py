"""Configuration reload (SIGHUP, ``App.reload_config``): settings that apply while running
take their new values at once, the others keep the running value and are reported as
waiting for a restart, and a configuration start-up would refuse changes nothing."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import qpc_metrics
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from plugin_helpers import use_fake_plugins
from quic_raw import until

from qpc_core.admin.testing import Scrape, get
from qpc_core.app import App
from qpc_core.client.sdk import QpcClient
from qpc_core.config import (
    CORE_RELOADABLE,
    FederationConfig,
    FederationPeer,
    changed_settings,
    load_config,
    merge_settings,
)
from qpc_core.errors import (
    ConfigError,
    NotFound,
    PluginError,
    RateLimited,
    TooLarge,
    Unauthenticated,
)
from qpc_core.testing import ServerProcess, free_tcp_port, make_settings

Factory = Callable[..., Any]


def test_changed_settings_names_the_keys_that_differ(tmp_path: Path) -> None:
    old = make_settings(tmp_path, greeter={"greeting": "hi", "port": 1})
    new = make_settings(
        tmp_path, max_queue_depth=5, auth_token="another-token-123456",
        rate_limits={"users": {"requests": 2, "window_secs": 60}},
        federation=FederationConfig(peers=[FederationPeer(domain="b.test",
                                                          address="127.0.0.1:1")]),
        greeter={"greeting": "hi", "port": 2, "extra": True}, other={"x": 1})
    assert changed_settings(old, old) == []
    assert changed_settings(old, new) == [
        "auth_token", "federation.peers", "greeter.extra", "greeter.port", "max_queue_depth",
        "other.x", "rate_limits"]


def test_merge_takes_only_the_named_keys_and_is_validated_whole(tmp_path: Path) -> None:
    old = make_settings(tmp_path, greeter={"greeting": "hi", "port": 1})
    new = make_settings(tmp_path, max_queue_depth=5, max_connections=7,
                        greeter={"greeting": "hello", "port": 2})
    merged = merge_settings(old, new, ["max_queue_depth", "greeter.greeting"])
    assert (merged.max_queue_depth, merged.max_connections) == (5, old.max_connections)
    assert merged.plugin_tables["greeter"] == {"greeting": "hello", "port": 1}
    assert merged.db_key is not None and merged.db_key.get_secret_value() == "test-db-key"
    # tls_cert without its tls_key: the merged whole is checked, not just each key.
    half = make_settings(tmp_path, tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")
    with pytest.raises(ConfigError, match="tls_cert is set but not its pair"):
        merge_settings(old, half, ["tls_cert"])


def reading(app: App, settings_factory: Factory, cfg: dict[str, Any]) -> App:
    """``app`` reads its configuration again from ``cfg`` (what a test changes)."""
    app.config_source = lambda: settings_factory(**cfg)
    return app


async def test_live_settings_apply_and_the_others_wait_for_a_restart(
    app_factory: Factory, settings_factory: Factory, connect: Factory
) -> None:
    cfg: dict[str, Any] = {}
    app = reading(await app_factory(), settings_factory, cfg)
    alice, bob = await connect(app), await connect(app)
    await alice.enqueue(bob.identity_key, b"x" * 3000)
    max_conn = app.settings.max_connections
    cfg.update(max_message_bytes=2048, max_connections=max_conn + 1,
               rate_limits={"users": {"requests": 2, "window_secs": 60}})
    r = await app.reload_config()
    assert r.error is None
    assert r.applied == ("max_message_bytes", "rate_limits")
    assert r.restart_pending == ("max_connections",)
    assert app.settings.max_message_bytes == 2048
    assert app.settings.max_connections == max_conn  # still what the server runs with
    assert app.config_restart_pending == ("max_connections",)
    with pytest.raises(TooLarge, match="max_message_bytes=2048"):
        await alice.enqueue(bob.identity_key, b"x" * 3000)
    for name in ("nobody1", "nobody2"):
        with pytest.raises(NotFound):
            await alice.resolve_user(name)
    with pytest.raises(RateLimited):
        await alice.resolve_user("nobody3")
    assert len(await bob.fetch()) == 1  # the message taken before the reload is there
    # The same file again: nothing to apply, the restart still pending.
    r = await app.reload_config()
    assert (r.applied, r.restart_pending) == ((), ("max_connections",))


async def test_a_refused_configuration_changes_nothing(
    app_factory: Factory, settings_factory: Factory, connect: Factory
) -> None:
    cfg: dict[str, Any] = {"max_message_bytes": 2048}
    app = reading(await app_factory(), settings_factory, cfg)
    alice, bob = await connect(app), await connect(app)
    before = app.settings
    cfg["max_message_bytes"] = 0  # invalid value
    r = await app.reload_config()
    assert r.error is not None and "max_message_bytes" in r.error and r.applied == ()
    # A misspelt rate-limit group is refused as at start-up, with the good keys beside it.
    cfg.update(max_message_bytes=4096, rate_limits={"delivry": {"requests": 1,
                                                                "window_secs": 1}})
    r = await app.reload_config()
    assert r.error is not None and "did you mean 'delivery'" in r.error
    assert app.settings is before
    await alice.enqueue(bob.identity_key, b"x" * 3000)  # the start-up value still applies

    def broken() -> Any:
        raise ConfigError("config: qpc-server.toml: invalid TOML: line 3")

    app.config_source = broken
    r = await app.reload_config()
    assert r.error == "config: qpc-server.toml: invalid TOML: line 3"
    assert app.settings is before


async def test_a_new_operator_token_applies_to_new_connections(
    app_factory: Factory, settings_factory: Factory, connect: Factory
) -> None:
    cfg: dict[str, Any] = {}
    app = reading(await app_factory(), settings_factory, cfg)
    old = await connect(app)
    cfg["auth_token"] = "rotated-token-0123456789"
    assert (await app.reload_config()).applied == ("auth_token",)
    with pytest.raises(Unauthenticated):
        await connect(app)  # the old token
    new = await connect(app, token="rotated-token-0123456789")
    assert (await new.whoami()).authenticated
    assert (await old.whoami()).authenticated  # established connections keep their auth


@pytest.fixture
def root_level() -> Iterator[None]:
    root, quic = logging.getLogger(), logging.getLogger("quic")
    levels = root.level, quic.level
    yield
    root.setLevel(levels[0])
    quic.setLevel(levels[1])


async def test_log_level_applies_while_running(
    app_factory: Factory, settings_factory: Factory, root_level: None
) -> None:
    cfg: dict[str, Any] = {"log_level": "ERROR"}
    app = reading(await app_factory(), settings_factory, cfg)
    assert (await app.reload_config()).applied == ("log_level",)
    assert logging.getLogger().level == logging.ERROR
    cfg["log_level"] = "debug"
    await app.reload_config()
    assert logging.getLogger().level == logging.DEBUG
    assert logging.getLogger("quic").level == logging.WARNING  # aioquic stays quiet


async def test_a_plugin_applies_the_keys_it_declared(
    monkeypatch: pytest.MonkeyPatch, app_factory: Factory, settings_factory: Factory
) -> None:
    use_fake_plugins(monkeypatch, reloading="reloading")
    cfg: dict[str, Any] = {"plugins": ["reloading"], "greeter": {"greeting": "hi", "port": 1}}
    app = reading(await app_factory(**cfg), settings_factory, cfg)
    assert "greeter.greeting" in app.reloadable_settings
    assert app.reloadable_settings >= CORE_RELOADABLE
    cfg["greeter"] = {"greeting": "good day", "port": 2}
    r = await app.reload_config()
    assert (r.applied, r.restart_pending) == (("greeter.greeting",), ("greeter.port",))
    assert app.plugin_config("greeter").greeting == "good day"
    assert app.plugin_config("greeter").port == 1
    ((told, seen),) = app.state["greeter-reloads"]
    assert told is r and told.changed("greeter") and not told.changed("greet")
    assert seen == "good day"  # in place before the plugin is told
    assert told.old.plugin_tables["greeter"]["greeting"] == "hi"
    cfg["greeter"] = {"greeting": "x", "port": "not a number"}
    r = await app.reload_config()
    assert r.error is not None and "greeter.port" in r.error
    assert app.plugin_config("greeter").greeting == "good day"
    assert app.state["greeter-reloads"][-1][0].error == r.error  # told of the refusal too


def test_a_plugin_cannot_declare_a_core_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_fake_plugins(monkeypatch, claims="claims_core_key")
    with pytest.raises(PluginError, match="'max_connections' is a core setting"):
        App(make_settings(tmp_path / "data", plugins=["claims"]))


def test_only_the_federation_plugin_declares_federation_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_fake_plugins(monkeypatch, claims="claims_federation_key")
    with pytest.raises(PluginError, match=r"'federation\.listen' belongs to the 'federation' "
                                          "plugin"):
        App(make_settings(tmp_path / "data", plugins=["claims"]))


def test_a_plugin_cannot_declare_another_plugins_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    use_fake_plugins(monkeypatch, claims="claims_blobs_key")
    with pytest.raises(PluginError, match=r"'blobs\.max_chunk_bytes' belongs to the 'blobs' "
                                          "plugin"):
        App(make_settings(tmp_path / "data", plugins=["blobs", "claims"]))


async def test_a_reload_follows_the_config_symlink_as_start_up_did(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``--config`` is often a symlink that deployment re-points (``current ->
    releases/N``, a Kubernetes ConfigMap): each reload reads what it points to then."""
    from qpc_core.cli import _make_app, build_parser

    for k in [k for k in os.environ if k.startswith("QPC_")]:
        monkeypatch.delenv(k)
    for n, depth in ((1, 10), (2, 20)):
        (tmp_path / f"release-{n}").mkdir()
        (tmp_path / f"release-{n}" / "qpc-server.toml").write_text(f"max_queue_depth = {depth}\n")
    link = tmp_path / "qpc-server.toml"
    link.symlink_to(tmp_path / "release-1" / "qpc-server.toml")
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args([
        "run", "--config", "qpc-server.toml", "--data-dir", str(tmp_path / "data"),
        "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
    app = _make_app(args)
    assert app.settings.max_queue_depth == 10
    monkeypatch.chdir(tmp_path / "release-1")  # a relative --config stays the one started with
    new = tmp_path / "qpc-server.toml.new"  # re-pointed atomically, as deploy tools do
    new.symlink_to(tmp_path / "release-2" / "qpc-server.toml")
    new.replace(link)
    r = await app.reload_config()
    assert (r.error, r.applied) == (None, ("max_queue_depth",))
    assert app.settings.max_queue_depth == 20


async def test_an_unreadable_file_is_a_refused_reload_and_certificates_still_reload(
    monkeypatch: pytest.MonkeyPatch, app_factory: Factory, tmp_path: Path
) -> None:
    """A file that is not UTF-8 (saved by a latin-1 editor) or cannot be read is a refused
    reload like any other: reported to the hooks and the metrics, and the certificate
    reload that follows it still runs (a renewal is not lost with it)."""
    app = await app_factory(plugins=["metrics"])
    conf = tmp_path / "qpc-server.toml"
    conf.write_bytes(b'log_level = "caf\xe9"\n')
    app.config_source = lambda: load_config(conf, {}, env={})
    tls_reloads: list[int] = []
    real = app._reload_tls

    async def counted() -> dict[str, str | None]:
        tls_reloads.append(1)
        return await real()

    monkeypatch.setattr(app, "_reload_tls", counted)
    config, tls = await app.reload()
    assert config.error is not None and "not UTF-8" in config.error
    assert tls_reloads == [1] and tls == {"quic": None}
    m = qpc_metrics._m(app)
    assert m is not None and not m.config_last_ok and m.config_reloads == {"error": 1}
    conf.unlink()
    conf.mkdir()  # a directory where the file was
    config, _tls = await app.reload()
    assert config.error is not None and "cannot be read" in config.error
    assert m.config_reloads == {"error": 2}

    def bug() -> Any:
        raise RuntimeError("a bug in a reader")

    app.config_source = bug
    config, _tls = await app.reload()
    assert config.error == "RuntimeError: a bug in a reader" and tls_reloads == [1, 1, 1]


async def test_a_vanished_default_file_is_an_error_not_the_defaults(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, connect: Factory
) -> None:
    """``qpc run`` without --config reads ./qpc-server.toml; a reload after that file went
    away (moved while editing) is refused, not read as "no file" (which would put every
    default back, the development operator token among them)."""
    from qpc_core.cli import _make_app, build_parser

    for k in [k for k in os.environ if k.startswith("QPC_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "qpc-server.toml").write_text('auth_token = "operator-secret-0123456789"\n')
    args = build_parser().parse_args(["run", "--data-dir", str(tmp_path / "data"), "--listen",
                                      "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
    app = _make_app(args)
    await app.start()
    try:
        (tmp_path / "qpc-server.toml").rename(tmp_path / "qpc-server.toml.bak")
        r = await app.reload_config()
        assert r.error is not None and "file not found" in r.error
        assert app.settings.auth_token_value() == "operator-secret-0123456789"
        with pytest.raises(Unauthenticated):
            await connect(app, token="devtoken")
    finally:
        await app.stop()


async def test_without_a_source_a_reload_reads_nothing(app_factory: Factory) -> None:
    app = await app_factory()
    r = await app.reload_config()
    assert (r.applied, r.restart_pending, r.error) == ((), (), None)


async def test_sighup_reloads_the_configuration_file_of_a_running_server(
    tmp_path: Path,
) -> None:
    """``kill -HUP`` on a real ``qpc run --config FILE``: the file is read again with the
    environment and the command line's flags on top, the log says what applied and what
    waits for a restart, /metrics counts it, and a broken file changes nothing."""
    conf = tmp_path / "qpc-server.toml"
    conf.write_text("max_message_bytes = 100000\n")
    metrics_port = free_tcp_port()
    srv = ServerProcess(
        tmp_path / "data", args=["--config", str(conf), "--plugins", "metrics"],
        env={"QPC_METRICS_ENABLED": "true", "QPC_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
             "QPC_MAX_QUEUE_DEPTH": "50"})
    await srv.start()
    url = f"http://127.0.0.1:{metrics_port}/metrics"

    async def metrics() -> Scrape:
        r = await get(url, timeout=5)
        assert r.status == 200, r.text
        return Scrape.parse(r.text)

    c = await QpcClient.connect("127.0.0.1", srv.port, token="devtoken", ca_cert=srv.ca,
                                identity=Ed25519PrivateKey.generate())
    try:
        me = c.identity_key
        await c.enqueue(me, b"x" * 3000)
        # max_queue_depth from the file is overridden by the environment (50): not a change.
        conf.write_text("max_message_bytes = 2048\nmax_queue_depth = 7\nmax_connections = 99\n")
        assert srv.proc is not None
        srv.proc.send_signal(signal.SIGHUP)
        await until(lambda: any("configuration reloaded: applied max_message_bytes" in line
                                for line in srv.log), timeout=15, what="no reload logged")
        assert any("applied only by a restart" in line and "max_connections" in line
                   for line in srv.log)
        with pytest.raises(TooLarge, match="max_message_bytes=2048"):
            await c.enqueue(me, b"x" * 3000)
        m = await metrics()
        assert m.value("config_reloads_total", result="ok") == 1
        assert m.value("config_restart_pending_settings") == 1
        assert m.value("config_last_reload_successful") == 1
        conf.write_text("max_message_bytes = [\n")
        srv.proc.send_signal(signal.SIGHUP)
        await until(lambda: any("configuration not reloaded" in line for line in srv.log),
                    timeout=15, what="no refusal logged")
        m = await metrics()
        assert m.value("config_reloads_total", result="error") == 1
        assert m.value("config_last_reload_successful") == 0
        assert m.value("config_restart_pending_settings") == 1
        await c.enqueue(me, b"x" * 2000)  # still running with the last good configuration
        assert len(await c.fetch()) == 2
    finally:
        await c.close()
        assert await srv.terminate() == 0
