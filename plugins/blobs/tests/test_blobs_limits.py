"""What a blob costs an identity, restarting an upload, and when an upload counts as idle.

Real App with the plugin, real QUIC, the real SDK.  Time is injected: the service's clock is
replaced and the collector is given ``now``; no test sleeps."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
from blob_test_helpers import partial_files, sha, svc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_blobs import client as blobs
from qpc_blobs import service as service_mod

from qpc_core.app import App
from qpc_core.errors import BadRequest, QuotaExceeded
from qpc_core.testing import make_settings

BLOCK = 4096


async def put(c, blob_hash: bytes, offset: int, chunk: bytes, total: int):  # type: ignore[no-untyped-def]
    return await blobs.upload_chunk(c, blob_hash, offset, chunk, total)


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """The blob service's wall clock, set by the test (starts at the real time)."""
    now = [time.time()]
    monkeypatch.setattr(service_mod, "time", SimpleNamespace(time=lambda: now[0]))
    return now


# -- quota: every blob costs at least a block; a cap on the number of blobs -----------------


async def test_each_blob_is_charged_at_least_one_block(app_factory, connect) -> None:
    app = await app_factory(plugins=["blobs"], blobs={"quota_bytes_per_identity": 3 * BLOCK})
    c = await connect(app)
    for size in (0, 10, BLOCK):
        await blobs.upload(c, os.urandom(size))
    assert await svc(app).usage(c.identity_key) == 3 * BLOCK
    with pytest.raises(QuotaExceeded, match=f"this blob needs {BLOCK} more"):
        await blobs.upload(c, os.urandom(10))
    assert partial_files(app) == []
    # An unfinished upload reserves a block too, and claiming a stored blob costs one.
    other = await connect(app)
    await put(other, bytes(32), 0, b"x", 2)
    assert await svc(app).usage(other.identity_key) == BLOCK
    tiny = os.urandom(5)
    await blobs.upload(await connect(app), tiny)
    await blobs.upload(other, tiny)
    assert await svc(app).usage(other.identity_key) == 2 * BLOCK


async def test_blob_count_per_identity_is_limited(app_factory, connect, tmp_path) -> None:
    default = App(make_settings(tmp_path / "d", plugins=["blobs"])).plugin_config("blobs")
    assert default.max_blobs_per_identity == 100_000
    app = await app_factory(plugins=["blobs"], blobs={"max_blobs_per_identity": 3,
                                                      "quota_bytes_per_identity": 0})
    alice, bob = await connect(app), await connect(app)
    first = os.urandom(10)
    await blobs.upload(alice, first)
    await blobs.upload(alice, os.urandom(10))
    unfinished = os.urandom(9000)
    await put(alice, sha(unfinished), 0, unfinished[:100], len(unfinished))  # counts too
    limit = r"3 blobs held .* the limit is 3 per identity \(blobs\.max_blobs_per_identity\)"
    with pytest.raises(QuotaExceeded, match=limit):
        await blobs.upload(alice, os.urandom(10))
    shared = os.urandom(10)
    await blobs.upload(bob, shared)
    with pytest.raises(QuotaExceeded, match=limit):  # claiming stored content adds a blob
        await blobs.upload(alice, shared)
    assert await blobs.upload(alice, first) == sha(first)  # already hers: no new blob
    assert await blobs.upload(alice, unfinished) == sha(unfinished)  # its slot was reserved
    assert len(await app.storage.kv_scan("blobs", b"own:" + alice.identity_key)) == 3
    assert partial_files(app) == []


# -- restarting an upload with another size ---------------------------------------------------


async def test_offset_zero_with_another_size_starts_the_upload_over(app, connect) -> None:
    c = await connect(app)
    data = os.urandom(5000)
    h = sha(data)
    await put(c, h, 0, data[:100], 6000)  # e.g. an older client got the size wrong
    assert await svc(app).usage(c.identity_key) == 6000
    with pytest.raises(BadRequest, match="total_size 5000 differs from the 6000"):
        await put(c, h, 100, data[100:200], 5000)  # continuing with another size: refused
    r = await put(c, h, 0, data[:300], 5000)  # a fresh start drops the old partial
    assert r.received == 300 and not r.complete
    st = await blobs.status(c, h)
    assert (st.received, st.total_size) == (300, 5000)
    assert await svc(app).usage(c.identity_key) == 5000
    assert len(partial_files(app)) == 1
    # The SDK restarts a stale partial by itself.
    await put(c, h, 0, data[:100], 7000)
    assert await blobs.upload(c, data) == h
    assert await blobs.download(c, h) == data
    assert partial_files(app) == []
    assert await svc(app).usage(c.identity_key) == 5000


# -- idle time counts from the last new byte --------------------------------------------------


async def test_calls_adding_no_bytes_do_not_keep_an_upload_alive(app, connect, clock) -> None:
    c = await connect(app)
    ttl = svc(app).cfg.partial_ttl_secs
    data = os.urandom(5000)
    h = sha(data)
    t0 = clock[0]
    await put(c, h, 0, data[:100], len(data))
    clock[0] = t0 + ttl - 60  # almost a day later: calls that add nothing
    assert (await put(c, h, 0, data[:100], len(data))).received == 100
    assert (await put(c, h, 0, b"", len(data))).received == 100
    assert await svc(app).collect_garbage(now=t0 + ttl + 30) == 1  # idle since t0
    assert (await blobs.status(c, h)).received == 0
    # New bytes do keep an upload alive.
    await put(c, h, 0, data[:100], len(data))
    clock[0] = t0 + 2 * ttl
    await put(c, h, 100, data[100:200], len(data))
    assert await svc(app).collect_garbage(now=t0 + 2 * ttl + 30) == 0
    assert (await blobs.status(c, h)).received == 200


async def test_restart_does_not_reset_the_idle_time(app_factory, connect, clock) -> None:
    app = await app_factory(plugins=["blobs"])
    key = Ed25519PrivateKey.generate()
    c = await connect(app, identity=key)
    ttl = svc(app).cfg.partial_ttl_secs
    data = os.urandom(5000)
    h = sha(data)
    t0 = clock[0]
    await put(c, h, 0, data[:100], len(data))
    await app.stop()
    clock[0] = t0 + ttl - 60
    app2 = await app_factory(plugins=["blobs"])
    c2 = await connect(app2, identity=key)
    assert (await put(c2, h, 0, b"", len(data))).received == 100  # loads it; no new bytes
    # Idle since its last byte was written (within seconds of t0), not since the restart.
    assert await svc(app2).collect_garbage(now=t0 + ttl + 30) == 1
    assert (await blobs.status(c2, h)).received == 0


@pytest.fixture
async def app(app_factory) -> App:
    a: App = await app_factory(plugins=["blobs"])
    return a
