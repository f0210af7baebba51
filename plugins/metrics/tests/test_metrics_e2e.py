"""metrics end to end: a real App with the plugin, real QUIC, the real SDK, a real /metrics scrape.

Every test reads the counters through HTTP before and after known traffic and checks they
moved by exactly the expected amount.
"""

from __future__ import annotations

import asyncio
from importlib import metadata

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_auth_opaque import client as opaque_client
from qpc_auth_opaque import opaque
from qpc_metrics.collector import METRICS

from qpc_core.admin.testing import admin_url, get, http, scrape
from qpc_core.app import App
from qpc_core.errors import RateLimited, Unauthenticated
from qpc_core.framing import Status
from qpc_core.testing import make_settings

GUIDE_NAMES = [
    "enqueue_total", "enqueue_bytes_total", "fetch_total", "fetch_wait_total",
    "key_package_upload_total", "auth_login_success_total", "auth_login_failure_total",
    "rate_limit_hit_total", "delivery_queue_depth", "server_in_flight_rpcs",
]
ADMIN_TOKEN = "metrics-test-admin-token"
FAST = opaque.IdentityKSF()


@pytest.fixture
async def mapp(app_factory):
    return await app_factory(plugins=["metrics"], metrics_enabled=True, admin_token=ADMIN_TOKEN)


async def pair(connect, app):
    return await connect(app), await connect(app)


async def wait_metric(app, name: str, want: float, **labels: str) -> None:
    """Poll /metrics (bounded) until ``name{labels} == want``: for effects the server sees
    after the client call returned (a connection close)."""
    last = None
    for _ in range(200):
        last = (await scrape(app)).sum(name, **labels)
        if last == want:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{name}{labels} stayed {last}, expected {want}")


async def test_every_metric_is_exposed_with_its_name_type_and_help(mapp, connect) -> None:
    await pair(connect, mapp)  # some traffic, so labelled families have samples
    s = await scrape(mapp)
    for m in METRICS:
        assert s.help.get(m.name) == m.help, m.name
        assert s.types.get(m.name) == m.kind, m.name
    for name in GUIDE_NAMES:
        # Exactly the guide's name, unlabelled, present from the start (value 0 or more).
        assert s.value(name) >= 0
        assert [n for n, _ in s.samples if n.startswith(name.removesuffix("_total"))
                and n.endswith("_created")] == []
    assert s.value("qpc_info", version=mapp.version) == 1
    assert s.value("server_max_connections") == mapp.settings.max_connections
    assert s.value("process_resident_memory_bytes") > 0


async def test_enqueue_counts_messages_and_bytes_exactly(mapp, connect) -> None:
    alice, bob = await pair(connect, mapp)
    carol = await connect(mapp)
    before = await scrape(mapp)
    sizes = [1, 10, 300, 4096, 65_000]
    for n in sizes:
        await alice.enqueue(bob.identity_key, b"\xab" * n)
    # The same message_id again is a dedup hit: answered, not stored, not counted as enqueued.
    mid = b"\x01" * 16
    await alice.enqueue(bob.identity_key, b"dup", message_id=mid)
    await alice.enqueue(bob.identity_key, b"dup", message_id=mid)
    # BatchEnqueue stores one message per recipient.
    await alice.batch_enqueue([bob.identity_key, carol.identity_key], b"b" * 50)
    after = await scrape(mapp)

    def delta(name: str) -> float:
        return after.value(name) - before.value(name)

    assert delta("enqueue_total") == len(sizes) + 1 + 2
    assert delta("enqueue_bytes_total") == sum(sizes) + 3 + 2 * 50
    assert delta("enqueue_duplicate_total") == 1
    assert delta("delivery_queue_depth") == len(sizes) + 1 + 2
    assert after.value("rpc_requests_total", method="Enqueue", status="OK") == len(sizes) + 2
    assert after.value("rpc_requests_total", method="BatchEnqueue", status="OK") == 1
    # Every enqueue is a commit the storage histogram saw.
    assert after.sum("storage_operation_duration_seconds_count", operation="commit") > \
        before.sum("storage_operation_duration_seconds_count", operation="commit")


async def test_fetch_fetch_wait_and_peek(mapp, connect) -> None:
    alice, bob = await pair(connect, mapp)
    for i in range(3):
        await alice.enqueue(bob.identity_key, bytes([i]) * 100)
    s0 = await scrape(mapp)
    assert s0.value("delivery_queue_depth") == 3

    assert len(await bob.peek()) == 3  # peek removes nothing
    s1 = await scrape(mapp)
    assert s1.value("fetch_total") == s0.value("fetch_total")
    assert s1.value("delivery_queue_depth") == 3
    assert s1.value("fetched_messages_total", method="peek") == 3

    assert len(await bob.fetch()) == 3
    assert await bob.fetch() == []  # an empty Fetch is still a Fetch call
    s2 = await scrape(mapp)
    assert s2.value("fetch_total") - s1.value("fetch_total") == 2
    assert s2.value("fetched_messages_total", method="fetch") == 3
    assert s2.value("fetched_bytes_total", method="fetch") == 300
    assert s2.value("delivery_queue_depth") == 0

    # FetchWait: one answered by a message arriving during the wait, one by its timeout.
    waiting = asyncio.ensure_future(bob.fetch_wait(10_000))
    await wait_metric(mapp, "server_in_flight_rpcs", 1)
    await alice.enqueue(bob.identity_key, b"wake up")
    assert [m.data for m in await waiting] == [b"wake up"]
    assert await bob.fetch_wait(50) == []
    s3 = await scrape(mapp)
    assert s3.value("fetch_wait_total") - s2.value("fetch_wait_total") == 2
    assert s3.value("fetch_total") == s2.value("fetch_total")
    assert s3.value("fetched_messages_total", method="fetch_wait") == 1
    assert s3.value("delivery_queue_depth") == 0
    assert s3.value("server_in_flight_rpcs") == 0


async def test_key_package_upload(mapp, connect) -> None:
    alice = await connect(mapp)
    before = (await scrape(mapp)).value("key_package_upload_total")
    for i in range(3):
        await alice.upload_key_package(b"kp-%d" % i)
    assert (await scrape(mapp)).value("key_package_upload_total") == before + 3


async def test_rate_limited_call(app_factory, connect) -> None:
    app = await app_factory(plugins=["metrics"], metrics_enabled=True,
                            rate_limits={"keys": {"requests": 2, "window_secs": 60}})
    alice = await connect(app)
    before = (await scrape(app)).value("rate_limit_hit_total")
    await alice.upload_key_package(b"one")
    await alice.upload_key_package(b"two")
    with pytest.raises(RateLimited):
        await alice.upload_key_package(b"three")
    s = await scrape(app)
    assert s.value("rate_limit_hit_total") == before + 1
    assert s.value("key_package_upload_total") == 2
    assert s.value("rpc_requests_total", method="UploadKeyPackage", status="RATE_LIMITED") == 1


async def test_logins_via_auth_opaque(app_factory, connect) -> None:
    app = await app_factory(plugins=["auth_opaque", "metrics"], metrics_enabled=True,
                            auth_opaque={"ksf": "identity", "user_free_failures": 0})
    c = await connect(app, token=None)
    await opaque_client.register(c, "alice", "correct horse", ksf=FAST)
    s0 = await scrape(app)
    assert s0.value("auth_login_success_total") == 0
    assert s0.value("auth_login_failure_total") == 0

    await opaque_client.login(c, "alice", "correct horse", ksf=FAST)
    s1 = await scrape(app)
    assert s1.value("auth_login_success_total") == 1
    assert s1.value("auth_login_failure_total") == 0

    other = await connect(app, token=None)
    with pytest.raises(Unauthenticated):
        await opaque_client.login(other, "alice", "wrong password", ksf=FAST)
    s2 = await scrape(app)
    assert s2.value("auth_login_failure_total") == 1
    assert s2.value("rate_limit_hit_total") == s1.value("rate_limit_hit_total")

    # No free failures: the next attempt is throttled, a failed login and a rate-limit hit.
    with pytest.raises(RateLimited):
        await opaque_client.login(other, "alice", "correct horse", ksf=FAST)
    s3 = await scrape(app)
    assert s3.value("auth_login_failure_total") == 2
    assert s3.value("auth_login_success_total") == 1
    assert s3.value("rate_limit_hit_total") == s2.value("rate_limit_hit_total") + 1


async def test_connections_and_handshakes(mapp, connect) -> None:
    s0 = await scrape(mapp)
    assert s0.value("server_active_connections") == 0
    a, _b = await pair(connect, mapp)
    s1 = await scrape(mapp)
    assert s1.value("server_active_connections") == 2
    assert s1.value("server_connections_opened_total") == 2
    assert s1.value("tls_handshake_duration_seconds_count") == 2
    assert 0 < s1.value("tls_handshake_duration_seconds_sum") < 10
    assert s1.value("tls_handshake_duration_seconds_bucket", le="+Inf") == 2
    await a.close()
    await wait_metric(mapp, "server_active_connections", 1)
    assert (await scrape(mapp)).value("server_connections_opened_total") == 2


async def test_unknown_methods_keep_labels_bounded(mapp, connect) -> None:
    c = await connect(mapp)
    for mid in (7777, 7778, 7779):
        frame = await c.call_raw(mid, b"")
        assert frame.status == Status.UNIMPLEMENTED
    s = await scrape(mapp)
    assert s.value("rpc_requests_total", method="unknown", status="UNIMPLEMENTED") == 3
    methods = {dict(ls).get("method") for n, ls in s.samples if n == "rpc_requests_total"}
    assert methods <= {m.name for _p, m in mapp.methods.values()} | {"unknown"}


async def test_queue_depth_resync_catches_acks(mapp, connect) -> None:
    alice, bob = await pair(connect, mapp)
    for i in range(4):
        await alice.enqueue(bob.identity_key, bytes([i]))
    msgs = await bob.peek()
    assert await bob.ack(msgs[-1].seq) == 4  # Ack fires no event: the gauge lags...
    assert (await scrape(mapp)).value("delivery_queue_depth") == 4
    url = admin_url(mapp, "/p/metrics/resync")
    assert (await http("POST", url)).status == 401
    r = await http("POST", url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert r.status == 200 and r.json() == {"delivery_queue_depth": 0}
    assert (await scrape(mapp)).value("delivery_queue_depth") == 0  # ...until the resync


async def test_queue_depth_is_read_from_storage_at_startup(app_factory, connect) -> None:
    # The first App stores messages without the metrics plugin; the second one, on the same
    # data directory, starts with the depth read from storage.
    plain = await app_factory()
    alice, bob = await pair(connect, plain)
    for _ in range(5):
        await alice.enqueue(bob.identity_key, b"x")
    await alice.close()
    await bob.close()
    await plain.stop()
    app = await app_factory(plugins=["metrics"], metrics_enabled=True)
    assert (await scrape(app)).value("delivery_queue_depth") == 5


async def test_each_app_has_its_own_registry(app_factory, connect, tmp_path) -> None:
    one = await app_factory(plugins=["metrics"], metrics_enabled=True)
    two = App(make_settings(tmp_path / "second", plugins=["metrics"], metrics_enabled=True))
    await two.start()
    try:
        a, b = await pair(connect, one)
        await a.enqueue(b.identity_key, b"only on one")
        assert (await scrape(one)).value("enqueue_total") == 1
        assert (await scrape(two)).value("enqueue_total") == 0
    finally:
        await two.stop()


async def test_disabled_admin_app_has_no_listener(app_factory) -> None:
    app = await app_factory(plugins=["metrics"], metrics_enabled=False)
    assert not [t for _p, t in app.transports if t.name == "admin"]
    with pytest.raises(AssertionError, match="not running"):
        admin_url(app)


BUNDLED = ["auth_opaque", "blobs", "kt_log", "metrics"]


async def test_with_all_bundled_plugins(app_factory, connect) -> None:
    installed = {ep.name for ep in metadata.entry_points(group="qpc")}
    plugins = [p for p in BUNDLED if p in installed]
    app = await app_factory(plugins=plugins, metrics_enabled=True,
                            auth_opaque={"ksf": "identity"})
    c = await connect(app, token=None, identity=Ed25519PrivateKey.generate())
    await opaque_client.register(c, "zoe", "pw pw pw pw", ksf=FAST)
    await opaque_client.login(c, "zoe", "pw pw pw pw", ksf=FAST)
    peer = await connect(app)
    await c.enqueue(peer.identity_key, b"hello")
    s = await scrape(app)
    assert s.value("auth_login_success_total") == 1
    assert s.value("enqueue_total") == 1
    r = await get(admin_url(app, "/status.json"))
    assert [p["name"] for p in r.json()["plugins"]][-len(plugins):] == plugins
