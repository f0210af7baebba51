"""The admin HTTP app: health/readiness, the admin token, plugin routes, the status page in a
real headless Chromium, and the start-up system check."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import shutil
import socket
import time
from typing import Any

import pytest
from plugin_helpers import use_fake_plugins
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from conftest import quic_transport
from qpc_core import plugins as plugin_loader
from qpc_core.admin import admin_address
from qpc_core.admin.status import LatencyWindow, RateRing
from qpc_core.admin.syscheck import GUIDE_NOFILE, GUIDE_SYSCTL, check_system, read_sysctl
from qpc_core.admin.testing import admin_url, get, http
from qpc_core.errors import PluginError, StorageError
from qpc_core.hookspecs import hookimpl
from qpc_core.pb import common_pb2
from qpc_core.testing_chromium import CHROMIUM, chromium

TOKEN = "admin-token-for-tests-0123456789"


# -- a plugin with admin routes, selected through a fake entry point --------------------------


class _FakeAdminPlugin:
    def __init__(self, routes: list[Any]) -> None:
        self.routes = routes

    @hookimpl
    def register_admin_routes(self, app: Any) -> list[Any]:
        return self.routes


async def _hello(request: Request) -> Response:
    return PlainTextResponse("hello operator")


async def _echo(request: Request) -> Response:
    return JSONResponse({"got": (await request.body()).decode()})


class _EntryPoint:
    dist = None

    def __init__(self, name: str, obj: object) -> None:
        self.name = name
        self._obj = obj

    def load(self) -> object:
        return self._obj


def use_admin_plugin(monkeypatch: pytest.MonkeyPatch, name: str, routes: list[Any]) -> None:
    real = plugin_loader.available_entry_points
    plugin = _FakeAdminPlugin(routes)
    monkeypatch.setattr(plugin_loader, "available_entry_points",
                        lambda: {**real(), name: _EntryPoint(name, plugin)})


DEFAULT_ROUTES = [Route("/hello", _hello), Route("/echo", _echo, methods=["POST"])]


# -- public routes ------------------------------------------------------------------------------


async def test_public_routes_need_no_token(app_factory) -> None:
    app = await app_factory(metrics_enabled=True, admin_token=TOKEN)
    addr = admin_address(app)
    assert addr is not None and addr[0] == "127.0.0.1" and addr[1] != 0  # port 0 → bound port
    r = await get(admin_url(app, "/healthz"))
    assert r.status == 200 and r.json() == {"status": "alive", "draining": False}
    r = await get(admin_url(app, "/readyz"))
    assert r.status == 200 and r.json() == {"status": "ready", "reasons": []}
    r = await get(admin_url(app, "/"))
    assert r.status == 200 and r.headers["content-type"].startswith("text/html")
    assert 'id="conn"' in r.text and "status.json" in r.text
    assert "default-src 'none'" in r.headers["content-security-policy"]
    r = await get(admin_url(app, "/status.json"))
    assert r.status == 200 and r.json()["version"] == app.version
    # Without the metrics plugin nothing fills the registry: say so instead of an empty 200.
    r = await get(admin_url(app, "/metrics"))
    assert r.status == 404 and "'metrics' plugin" in r.text


async def test_admin_token_guards_plugins_and_plugin_routes(app_factory, monkeypatch) -> None:
    use_admin_plugin(monkeypatch, "fakeadmin", DEFAULT_ROUTES)
    app = await app_factory(plugins=["fakeadmin"], metrics_enabled=True, admin_token=TOKEN)
    guarded = ["/plugins", "/p/fakeadmin/hello", "/p/nosuch/thing"]
    for path in guarded:
        url = admin_url(app, path)
        r = await get(url)
        assert r.status == 401, path
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "admin token required" in r.json()["error"]
        r = await get(url, token="wrong-token")
        assert r.status == 401 and r.json() == {"error": "invalid admin token"}, path
        r = await http("GET", url, headers={"Authorization": f"Basic {TOKEN}"})
        assert r.status == 401, path
    r = await http("POST", admin_url(app, "/p/fakeadmin/echo"), headers={"X-Ignored": "1"})
    assert r.status == 401

    r = await get(admin_url(app, "/p/fakeadmin/hello"), token=TOKEN)
    assert r.status == 200 and r.text == "hello operator"
    r = await http("POST", admin_url(app, "/p/fakeadmin/echo"),
                   headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status == 200 and r.json() == {"got": ""}
    assert (await get(admin_url(app, "/p/nosuch/thing"), token=TOKEN)).status == 404

    r = await get(admin_url(app, "/plugins"), token=TOKEN)
    assert r.status == 200
    rows = {p["name"]: p for p in r.json()["plugins"]}
    assert list(rows) == [p.name for p in app.plugins]
    fake = rows["fakeadmin"]
    assert fake["order"] == len(app.plugins) - 1 and not fake["builtin"]
    assert fake["hooks"] == ["register_admin_routes"]
    assert fake["admin_prefix"] == "/p/fakeadmin/"
    assert rows["core"]["version"] == app.version and rows["core"]["admin_prefix"] is None
    assert "register_transports" in rows["admin"]["hooks"]


async def test_admin_routes_are_disabled_without_a_token(app_factory, monkeypatch) -> None:
    use_admin_plugin(monkeypatch, "fakeadmin", DEFAULT_ROUTES)
    app = await app_factory(plugins=["fakeadmin"], metrics_enabled=True)
    assert app.settings.admin_token is None
    for path in ("/plugins", "/p/fakeadmin/hello"):
        for token in (None, "", "anything"):
            r = await get(admin_url(app, path), token=token)
            assert r.status == 403, (path, token)
            assert "set admin_token" in r.json()["error"]
    assert (await get(admin_url(app, "/healthz"))).status == 200


async def test_a_plugin_returning_a_non_route_is_a_startup_error(app_factory, monkeypatch) -> None:
    use_admin_plugin(monkeypatch, "badroutes", ["/not-a-route"])
    with pytest.raises(PluginError, match=r"plugin 'badroutes': register_admin_routes returned "
                                          r"str, expected Starlette routes"):
        await app_factory(plugins=["badroutes"], metrics_enabled=True)


async def test_busy_port_is_a_clear_startup_error(app_factory) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PluginError, match=r"plugin 'admin': listener 'admin' could not start"):
            await app_factory(metrics_enabled=True, metrics_listen=f"127.0.0.1:{port}")


# -- readiness ----------------------------------------------------------------------------------


async def test_readyz_fails_while_draining(app_factory, connect, monkeypatch) -> None:
    use_fake_plugins(monkeypatch, slow="slow")
    app = await app_factory(plugins=["slow"], metrics_enabled=True)
    ready, health = admin_url(app, "/readyz"), admin_url(app, "/healthz")
    assert (await get(ready)).status == 200
    c = await connect(app)
    st = app.state["slow"]
    call = asyncio.ensure_future(c.call(9100, common_pb2.HealthRequest(),
                                        common_pb2.HealthResponse))
    await st["started"].wait()
    stopping = asyncio.ensure_future(app.stop())
    try:
        # stop() is now waiting for the in-flight call: the admin app still answers.
        r = await get(ready)
        assert r.status == 503
        assert r.json()["status"] == "not ready"
        assert "draining: the server is shutting down" in r.json()["reasons"]
        r = await get(health)
        assert r.status == 200 and r.json() == {"status": "alive", "draining": True}
        assert not stopping.done()
    finally:
        st["release"].set()
        assert (await call).status == "finished"
        await stopping
    with pytest.raises(OSError):
        await get(ready, timeout=2)


async def test_readyz_reports_storage_and_listener_problems(app_factory, monkeypatch) -> None:
    app = await app_factory(metrics_enabled=True)
    url = admin_url(app, "/readyz")

    async def broken_ping() -> None:
        raise StorageError("database is locked")

    monkeypatch.setattr(app.storage, "ping", broken_ping)
    r = await get(url)
    assert r.status == 503
    assert r.json()["reasons"] == ["storage unreachable: database is locked"]
    monkeypatch.undo()
    assert (await get(url)).status == 200

    await quic_transport(app).stop_accepting()
    r = await get(url)
    assert r.status == 503
    assert r.json()["reasons"] == ["listener 'quic' (plugin 'core') is not accepting"]


# -- status page ----------------------------------------------------------------------------------


async def test_status_json_follows_traffic(app_factory, connect) -> None:
    app = await app_factory(metrics_enabled=True)
    url = admin_url(app, "/status.json")
    st = (await get(url)).json()
    assert st["connections"] == 0 and st["queue_depth"] == 0 and st["draining"] is False
    assert st["messages"]["enqueued_total"] == 0 and st["handshake_p95_ms"] is None
    assert st["max_connections"] == app.settings.max_connections
    assert [p["name"] for p in st["plugins"]] == [p.name for p in app.plugins]
    assert len(st["messages"]["per_second"]) == 300
    a, b = await connect(app), await connect(app)
    for _ in range(7):
        await a.enqueue(b.identity_key, b"m")
    st = (await get(url)).json()
    assert st["connections"] == 2
    assert st["messages"]["enqueued_total"] == 7
    assert sum(st["messages"]["per_second"]) == 7
    assert st["messages"]["rate_1m"] > 0
    assert st["handshakes_in_window"] == 2 and st["handshake_p95_ms"] > 0
    assert len(await b.fetch()) == 7
    assert (await get(url)).json()["messages"]["fetched_total"] == 7


def test_rate_ring_counts_per_second_and_forgets_old_seconds() -> None:
    now = [1000.0]
    ring = RateRing(10, clock=lambda: now[0])
    ring.add(3)
    now[0] = 1001.5
    ring.add(2)
    assert ring.series(3) == [0, 3, 2]
    assert ring.rate(2) == (3 + 2) / 2
    now[0] = 1011.0  # the slot of second 1001 is reused for 1011: the old count is dropped
    ring.add(1)
    assert ring.series() == [0] * 9 + [1]
    assert ring.total == 6


def test_latency_window_p95_over_recent_samples() -> None:
    now = [0.0]
    w = LatencyWindow(window=60, clock=lambda: now[0])
    assert w.quantile(0.95) is None
    for i in range(1, 101):
        w.observe(i / 1000)
    assert w.quantile(0.95) == 0.095 and w.count() == 100
    now[0] = 61.0  # all samples left the window
    w.observe(0.5)
    assert w.quantile(0.95) == 0.5 and w.count() == 1


# -- the status page in headless Chromium ---------------------------------------------------------

STATUS_FIGURES = ("version", "state", "uptime", "conn", "maxconn", "queue", "rate1", "rate5",
                  "p95", "handshakes", "inflight", "enqueued", "fetched", "nplugins", "plugins",
                  "cfg", "pending")


@pytest.mark.skipif(shutil.which(CHROMIUM) is None,
                    reason="chromium is not installed (make system-deps installs it)")
async def test_status_page_updates_in_headless_chromium(
    app_factory, settings_factory, connect, tmp_path
) -> None:
    app = await app_factory(metrics_enabled=True)
    async with chromium(tmp_path / "profile") as page:
        await page.goto(admin_url(app, "/?interval=200"))
        idle = await page.wait_for(
            f"T('version') === {json.dumps(app.version)} && T('conn') === '0' "
            "&& T('queue') === '0' && T('enqueued') === '0' && T('p95') === 'n/a'",
            STATUS_FIGURES,
        )
        assert idle["state"] == "serving"
        assert (idle["cfg"], idle["pending"]) == ("as started", "")
        assert idle["maxconn"] == str(app.settings.max_connections)
        assert idle["nplugins"] == str(len(app.plugins))
        for p in app.plugins:
            assert p.name in idle["plugins"]

        alice, bob = await connect(app), await connect(app)
        for i in range(6):
            await alice.enqueue(bob.identity_key, b"message %d" % i)
        busy = await page.wait_for(
            "T('conn') === '2' && T('enqueued') === '6' && T('queue') === '6' "
            "&& / ms$/.test(T('p95')) && T('handshakes') === '2' && T('rate1') !== '0.00'",
            STATUS_FIGURES,
        )
        assert float(busy["p95"].removesuffix(" ms")) > 0
        assert float(busy["rate1"]) == pytest.approx(6 / 60, abs=0.02)

        assert len(await bob.fetch()) == 6
        await alice.close()
        done = await page.wait_for("T('queue') === '0' && T('fetched') === '6' "
                                   "&& T('conn') === '1'", STATUS_FIGURES)
        assert done["enqueued"] == "6"
        # The sparkline drew the burst: its highest point is above the baseline.
        points = await page.evaluate(
            "document.getElementById('sparkline').getAttribute('points')")
        ys = [float(p.split(",")[1]) for p in points.split()]
        assert min(ys) < max(ys)

        # A configuration reload: what waits for a restart is named; a refused one is said.
        cfg = {"metrics_enabled": True, "max_connections": 77, "max_queue_depth": 5}
        app.config_source = lambda: settings_factory(**cfg)
        await app.reload_config()
        shown = await page.wait_for("T('cfg').startsWith('reloaded ') && T('pending') !== ''",
                                    STATUS_FIGURES)
        assert shown["pending"] == " · waiting for a restart: max_connections"
        cfg["max_queue_depth"] = 0
        await app.reload_config()
        refused = await page.wait_for("T('cfg').startsWith('reload refused ')", STATUS_FIGURES)
        assert refused["pending"] == " · waiting for a restart: max_connections"
        st = (await get(admin_url(app, "/status.json"))).json()["config"]
        assert st["reload_ok"] is False and st["restart_pending"] == ["max_connections"]
        assert st["reloaded_at"] == pytest.approx(time.time(), abs=60)


# -- system check ----------------------------------------------------------------------------------


def test_syscheck_all_good_with_guide_values() -> None:
    assert check_system(10_000, sysctl=GUIDE_SYSCTL.get,
                        nofile=lambda: (GUIDE_NOFILE, GUIDE_NOFILE)) == []
    unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
    assert check_system(10_000, sysctl=lambda n: 1 << 30, nofile=lambda: unlimited) == []


def test_syscheck_warns_below_the_guide_for_many_connections() -> None:
    values = {"net.core.rmem_max": 212_992, "net.core.wmem_max": 26_214_400,
              "net.core.rmem_default": 212_992, "net.core.wmem_default": 1_048_576}
    problems = check_system(10_000, sysctl=values.get, nofile=lambda: (1024, 4096))
    assert len(problems) == 2
    nofile, udp = problems
    assert "open-file limit (ulimit -n) is 1024, below the 65536" in nofile
    assert "max_connections=10000" in nofile and "LimitNOFILE=65536" in nofile
    assert "net.core.rmem_max = 212992 (< 26214400)" in udp
    assert "net.core.rmem_default = 212992 (< 1048576)" in udp
    assert "wmem" not in udp  # those are at the guide's values
    assert "sysctl -p /etc/sysctl.d/99-qpc.conf" in udp
    # A soft limit below the guide with a hard limit that allows it: `ulimit -n` is enough.
    (hint,) = check_system(10_000, sysctl=GUIDE_SYSCTL.get, nofile=lambda: (1024, 1 << 20))
    assert "`ulimit -n 65536`" in hint


def test_syscheck_small_servers_only_need_the_floor() -> None:
    tiny = {name: 4096 for name in GUIDE_SYSCTL}
    assert check_system(500, sysctl=tiny.get, nofile=lambda: (4096, 4096)) == []
    (problem,) = check_system(500, sysctl=tiny.get, nofile=lambda: (256, 256))
    assert "is 256, below the 1024" in problem


def test_syscheck_skips_what_it_cannot_read() -> None:
    assert check_system(10_000, sysctl=lambda name: None, nofile=lambda: (70_000, 70_000)) == []


async def test_startup_warns_with_the_running_systems_values(app_factory, caplog) -> None:
    caplog.set_level(logging.WARNING, "qpc.syscheck")
    await app_factory(max_connections=5000)
    expected = check_system(5000)  # the same check, on this machine's real values
    got = [r.getMessage().removeprefix("system check: ") for r in caplog.records
           if r.name == "qpc.syscheck"]
    assert got == expected
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    low_nofile = soft != resource.RLIM_INFINITY and soft < GUIDE_NOFILE
    assert any("open-file limit" in g for g in got) == low_nofile
    low_udp = any((read_sysctl(n) or want) < want for n, want in GUIDE_SYSCTL.items())
    assert any("UDP buffer sizes" in g for g in got) == low_udp
