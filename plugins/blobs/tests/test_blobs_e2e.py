"""blobs end to end: a real App with the plugin, real QUIC, the real SDK."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from blob_test_helpers import partial_files, sha, svc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_blobs import client as blobs
from qpc_blobs import store as store_mod

from qpc_core.app import App
from qpc_core.client.sdk import ConnectionLost
from qpc_core.errors import (
    BadRequest,
    ConfigError,
    Internal,
    NotFound,
    QuotaExceeded,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from qpc_core.pb import blobs_pb2 as pb
from qpc_core.testing import make_settings

KIB = 1024
MIB = 1024 * KIB


def assert_no_leftover_state(app: App) -> None:
    """Nothing in memory outlives the uploads it tracked."""
    service = svc(app)
    assert service._uploads == {}
    assert len(service._hash_locks) == 0 and len(service._ident_locks) == 0
    assert service._steps == set()


def blob_files(app: App) -> list[Path]:
    root = app.data_dir / "blobs"
    return sorted(p for p in root.glob("*/*") if p.parent.name != "partial")


async def put(c, data: bytes, offset: int, total: int, blob_hash: bytes | None = None,
              mime: str = "") -> pb.UploadBlobResponse:
    return await blobs.upload_chunk(c, blob_hash or sha(data), offset, data, total, mime)


@pytest.fixture
async def app(app_factory) -> App:
    a: App = await app_factory(plugins=["blobs"])
    return a


# -- round trips ----------------------------------------------------------------------------


async def test_round_trip_small(app, connect) -> None:
    c = await connect(app)
    for size in (0, 1, 1000, 256 * KIB, 3 * 256 * KIB + 17):
        data = os.urandom(size)
        blob_id = await blobs.upload(c, data, mime_type="image/png")
        assert blob_id == sha(data)
        assert await blobs.download(c, blob_id) == data
        # Stored content-addressed under data/blobs/, with its sidecar.
        path = app.data_dir / "blobs" / blob_id.hex()[:2] / blob_id.hex()
        assert path.read_bytes() == data
        meta = json.loads(path.with_name(blob_id.hex() + ".json").read_text())
        assert meta["size"] == size and meta["mime_type"] == "image/png"
        assert meta["sha256"] == blob_id.hex()
        resp = await blobs.download_chunk(c, blob_id, 0)
        assert resp.mime_type == "image/png" and resp.total_size == size
        st = await blobs.status(c, blob_id)
        assert st.complete and st.received == st.total_size == size
    assert partial_files(app) == []
    assert_no_leftover_state(app)


async def test_round_trip_50_mb_file(app, connect, tmp_path) -> None:
    src, dst = tmp_path / "big.bin", tmp_path / "copy.bin"
    src.write_bytes(os.urandom(50_000_000))  # exactly the default maximum
    c = await connect(app)
    seen: list[tuple[int, int]] = []
    blob_id = await blobs.upload(c, src, chunk_size=MIB, progress=lambda d, t: seen.append((d, t)))
    assert blob_id == sha(src.read_bytes())
    assert seen[0] == (0, 50_000_000) and seen[-1] == (50_000_000, 50_000_000)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    got: list[int] = []
    assert await blobs.download(c, blob_id, dst, chunk_size=MIB,
                                progress=lambda d, t: got.append(d)) is None
    assert got[-1] == 50_000_000
    assert sha(dst.read_bytes()) == blob_id
    assert not list(tmp_path.glob(".copy.bin*"))  # the temporary download file is gone
    with pytest.raises(TooLarge, match=r"blobs\.max_blob_bytes"):  # 50 MB is the default limit
        await put(c, b"x", 0, 50_000_001, blob_hash=bytes(32))


# -- dedup and quota ---------------------------------------------------------------------------


async def test_identical_content_is_stored_once(app, connect) -> None:
    alice, bob = await connect(app), await connect(app)
    data = os.urandom(600 * KIB)
    blob_id = await blobs.upload(alice, data)
    assert await svc(app).usage(alice.identity_key) == len(data)
    # Alice again: nothing is sent again and nothing more is charged.
    seen: list[int] = []
    assert await blobs.upload(alice, data, progress=lambda d, t: seen.append(d)) == blob_id
    assert seen == [0, len(data)]
    assert await svc(app).usage(alice.identity_key) == len(data)
    # Bob's first chunk of the same content completes at once; it counts for Bob once.
    resp = await put(bob, data[:256 * KIB], 0, len(data), blob_hash=blob_id)
    assert resp.complete and resp.blob_id == blob_id and resp.received == len(data)
    assert (await put(bob, b"", 0, len(data), blob_hash=blob_id)).complete
    assert await svc(app).usage(bob.identity_key) == len(data)
    assert await svc(app).usage(alice.identity_key) == len(data)
    assert len(blob_files(app)) == 2  # one blob and its sidecar
    assert partial_files(app) == []
    # A claim must name the stored size.
    with pytest.raises(BadRequest, match="stored with"):
        await put(bob, b"", 0, len(data) + 1, blob_hash=blob_id)


async def test_over_size_is_too_large(app_factory, connect) -> None:
    app = await app_factory(plugins=["blobs"], blobs={"max_blob_bytes": 1000,
                                                      "max_chunk_bytes": 4 * KIB})
    c = await connect(app)
    with pytest.raises(TooLarge, match="exceeds the maximum of 1000 bytes"):
        await blobs.upload(c, os.urandom(1001))
    assert await blobs.upload(c, os.urandom(1000))
    with pytest.raises(TooLarge, match="chunk of 5000 bytes"):
        await put(c, os.urandom(5000), 0, 900, blob_hash=bytes(32))
    assert partial_files(app) == []


async def test_limits_follow_a_configuration_reload(
    app_factory, settings_factory, connect
) -> None:
    cfg = {"plugins": ["blobs"], "blobs": {"max_blob_bytes": 1000}}
    app = await app_factory(**cfg)
    app.config_source = lambda: settings_factory(**cfg)
    c = await connect(app)
    with pytest.raises(TooLarge, match="maximum of 1000 bytes"):
        await blobs.upload(c, os.urandom(1500))
    cfg["blobs"] = {"max_blob_bytes": 6000, "quota_bytes_per_identity": 9000,
                    "max_chunk_bytes": 8 * KIB}
    r = await app.reload_config()
    assert r.applied == ("blobs.max_blob_bytes", "blobs.quota_bytes_per_identity")
    assert r.restart_pending == ("blobs.max_chunk_bytes",)
    await blobs.upload(c, os.urandom(5000))
    with pytest.raises(QuotaExceeded, match="5000 of 9000 bytes in use"):
        await blobs.upload(c, os.urandom(5000))
    assert partial_files(app) == []


async def test_quota_per_identity(app_factory, connect) -> None:
    app = await app_factory(plugins=["blobs"], blobs={"quota_bytes_per_identity": 10_000})
    alice, bob = await connect(app), await connect(app)
    a = os.urandom(5000)
    await blobs.upload(alice, a)
    with pytest.raises(QuotaExceeded, match="5000 of 10000 bytes in use"):
        await blobs.upload(alice, os.urandom(6000))
    assert partial_files(app) == []
    await blobs.upload(alice, a)  # already hers: free
    await blobs.upload(alice, os.urandom(5000))  # exactly fills the quota
    with pytest.raises(QuotaExceeded):
        await blobs.upload(alice, os.urandom(1))
    # Bob's copy of the same content counts for Bob; Alice's usage is unchanged.
    await blobs.upload(bob, a)
    assert await svc(app).usage(bob.identity_key) == 5000
    assert await svc(app).usage(alice.identity_key) == 10_000


async def test_quota_counts_reservations(app_factory, connect) -> None:
    app = await app_factory(plugins=["blobs"], blobs={"quota_bytes_per_identity": 14_000,
                                                      "max_partial_uploads_per_identity": 2})
    c = await connect(app)
    d1, d2, d3 = os.urandom(5000), os.urandom(4500), os.urandom(100)
    await put(c, d1[:10], 0, len(d1), blob_hash=sha(d1))
    with pytest.raises(QuotaExceeded, match="5000 of 14000 bytes in use"):
        await put(c, os.urandom(10), 0, 9001, blob_hash=bytes(32))
    await put(c, d2[:10], 0, len(d2), blob_hash=sha(d2))
    assert await svc(app).usage(c.identity_key) == 9500
    with pytest.raises(QuotaExceeded, match="2 unfinished blob uploads"):
        await put(c, d3, 0, len(d3))
    # Finishing an upload turns its reservation into the blob: the usage does not change.
    await blobs.upload(c, d1)
    assert await svc(app).usage(c.identity_key) == 9500
    await blobs.upload(c, d3)  # 100 bytes are charged as one 4 KiB block
    assert await svc(app).usage(c.identity_key) == 9500 + 4096


# -- integrity ---------------------------------------------------------------------------------


async def test_hash_mismatch_rejects_and_removes_partial(app, connect) -> None:
    c = await connect(app)
    claimed = os.urandom(300 * KIB)
    actual = bytearray(claimed)
    actual[-1] ^= 0xFF
    h = sha(claimed)
    r = await put(c, bytes(actual[:256 * KIB]), 0, len(actual), blob_hash=h)
    assert r.received == 256 * KIB and not r.complete
    assert len(partial_files(app)) == 1
    with pytest.raises(BadRequest, match=r"not blob_hash .* upload was rejected"):
        await put(c, bytes(actual[256 * KIB:]), 256 * KIB, len(actual), blob_hash=h)
    assert partial_files(app) == []
    assert blob_files(app) == []
    st = await blobs.status(c, h)
    assert (st.received, st.total_size, st.complete) == (0, 0, False)
    assert await svc(app).usage(c.identity_key) == 0
    with pytest.raises(NotFound):
        await blobs.download(c, h)
    # The right bytes go through afterwards, from offset 0.
    assert await blobs.upload(c, claimed) == h


async def test_unknown_blob_is_not_found(app, connect) -> None:
    c = await connect(app)
    with pytest.raises(NotFound, match="E027 BLOB_NOT_FOUND") as e:
        await blobs.download(c, os.urandom(32))
    assert e.value.status.name == "NOT_FOUND"
    with pytest.raises(BadRequest, match="32-byte"):
        await blobs.download_chunk(c, b"\x01" * 31, 0)
    data = os.urandom(5000)
    blob_id = await blobs.upload(c, data)
    with pytest.raises(BadRequest, match="past the end"):
        await blobs.download_chunk(c, blob_id, 5001)
    assert (await blobs.download_chunk(c, blob_id, 5000)).chunk == b""
    r = await blobs.download_chunk(c, blob_id, 100, 50)
    assert r.chunk == data[100:150] and r.offset == 100 and r.total_size == 5000


async def test_download_length_is_capped(app_factory, connect) -> None:
    app = await app_factory(plugins=["blobs"], blobs={"max_chunk_bytes": 64 * KIB,
                                                      "download_chunk_bytes": 16 * KIB})
    c = await connect(app)
    data = os.urandom(200 * KIB)
    blob_id = await blobs.upload(c, data, chunk_size=64 * KIB)
    assert len((await blobs.download_chunk(c, blob_id, 0)).chunk) == 16 * KIB  # default
    assert len((await blobs.download_chunk(c, blob_id, 0, 4_000_000)).chunk) == 64 * KIB
    # The SDK follows the server's cap when it asks for more.
    assert await blobs.download(c, blob_id, chunk_size=MIB) == data


async def test_concurrent_downloads_of_one_blob(app, connect) -> None:
    owner = await connect(app)
    data = os.urandom(MIB + 123)
    blob_id = await blobs.upload(owner, data)
    readers = [await connect(app) for _ in range(3)]
    results = await asyncio.gather(*(blobs.download(r, blob_id) for r in readers for _ in range(2)),
                                   blobs.download(owner, blob_id, chunk_size=32 * KIB, window=8))
    assert all(r == data for r in results)
    await asyncio.gather(*(r.close() for r in readers))  # each close waits out QUIC's drain


# -- offsets -----------------------------------------------------------------------------------


async def test_offsets_are_validated(app_factory, connect) -> None:
    app = await app_factory(plugins=["blobs"], blobs={"reorder_wait_secs": 0.05,
                                                      "reorder_window_bytes": 64 * KIB})
    c = await connect(app)
    data = os.urandom(200 * KIB)
    h, total = sha(data), len(data)
    with pytest.raises(BadRequest, match="start at offset 0"):
        await put(c, data[1000:2000], 1000, total, blob_hash=h)
    assert (await put(c, data[:1000], 0, total, blob_hash=h)).received == 1000
    # A gap: waits briefly for the missing bytes, then fails naming the received count.
    with pytest.raises(BadRequest, match="received 1000; continue at offset 1000"):
        await put(c, data[1001:2000], 1001, total, blob_hash=h)
    # Beyond the re-order window: fails at once.
    with pytest.raises(BadRequest, match="received 1000"):
        await put(c, data[100 * KIB:101 * KIB], 100 * KIB, total, blob_hash=h)
    # total_size must not change; the hash must be 32 bytes; chunks must fit total_size.
    with pytest.raises(BadRequest, match="total_size 300000 differs"):
        await put(c, data[1000:2000], 1000, 300_000, blob_hash=h)
    with pytest.raises(BadRequest, match="32-byte SHA-256"):
        await put(c, data[1000:2000], 1000, total, blob_hash=h[:31])
    with pytest.raises(BadRequest, match="runs past total_size"):
        await put(c, data[1000:2000], total - 10, total, blob_hash=h)
    # Bytes already held may be sent again: the overlap is ignored, the rest appended.
    assert (await put(c, data[:1000], 0, total, blob_hash=h)).received == 1000
    assert (await put(c, data[500:3000], 500, total, blob_hash=h)).received == 3000
    assert (await blobs.status(c, h)).received == 3000
    # After all that, the upload finishes and verifies.
    assert (await put(c, data[3000:], 3000, total, blob_hash=h)).complete
    assert await blobs.download(c, h) == data
    assert_no_leftover_state(app)


async def test_chunks_overtaking_each_other_are_reordered(app, connect) -> None:
    c = await connect(app)
    data = os.urandom(5 * 64 * KIB)
    h, total, n = sha(data), len(data), 64 * KIB
    await put(c, data[:n], 0, total, blob_hash=h)
    # Later chunks are started first; each waits for the bytes before it.
    calls = [asyncio.ensure_future(put(c, data[o:o + n], o, total, blob_hash=h))
             for o in (4 * n, 3 * n, 2 * n, n)]
    results = await asyncio.gather(*calls)
    assert sorted(r.received for r in results) == [2 * n, 3 * n, 4 * n, 5 * n]
    assert [r.complete for r in results] == [True, False, False, False]
    assert await blobs.download(c, h) == data
    assert_no_leftover_state(app)


async def test_waiting_chunk_does_not_hold_up_shutdown(app_factory, connect,
                                                       monkeypatch) -> None:
    app = await app_factory(plugins=["blobs"], blobs={"reorder_wait_secs": 60})
    c = await connect(app)
    data = os.urandom(100 * KIB)
    await put(c, data[:KIB], 0, len(data), blob_hash=sha(data))
    waiting = asyncio.Event()
    real_wait = svc(app)._wait_for_offset

    async def spy(up, offset):  # type: ignore[no-untyped-def]
        waiting.set()
        return await real_wait(up, offset)

    monkeypatch.setattr(svc(app), "_wait_for_offset", spy)
    ahead = asyncio.ensure_future(put(c, data[2 * KIB:3 * KIB], 2 * KIB, len(data),
                                      blob_hash=sha(data)))
    async with asyncio.timeout(10):
        await asyncio.wait([ahead, asyncio.ensure_future(waiting.wait())],
                           return_when=asyncio.FIRST_COMPLETED)
    assert waiting.is_set() and not ahead.done()
    t0 = time.monotonic()
    await app.stop()  # drain_timeout is 5 s in tests; the waiter gives up at once
    assert time.monotonic() - t0 < 3
    with pytest.raises((Unavailable, ConnectionLost)):
        await ahead


# -- resume ------------------------------------------------------------------------------------


async def test_resume_after_dropped_connection(app, connect) -> None:
    key = Ed25519PrivateKey.generate()
    c1 = await connect(app, identity=key)
    data = os.urandom(3 * MIB)
    h = sha(data)
    reached = asyncio.Event()

    def progress(done: int, total: int) -> None:
        if done >= MIB:
            reached.set()

    task = asyncio.ensure_future(blobs.upload(c1, data, chunk_size=128 * KIB, window=2,
                                              progress=progress))
    await reached.wait()
    await c1.close()  # the connection drops mid-upload
    with pytest.raises(ConnectionLost):
        await task
    c2 = await connect(app, identity=key)
    st = await blobs.status(c2, h)
    assert not st.complete and st.total_size == len(data)
    assert MIB <= st.received < len(data)
    seen: list[int] = []
    assert await blobs.upload(c2, data, progress=lambda d, t: seen.append(d)) == h
    assert seen[0] >= st.received  # continued, not restarted
    assert await blobs.download(c2, h) == data
    # Another identity's partial of the same content is its own business.
    other = await connect(app)
    assert (await blobs.status(other, h)).complete
    assert_no_leftover_state(app)


async def test_uploads_of_same_content_by_two_identities_do_not_clash(app, connect) -> None:
    alice, bob = await connect(app), await connect(app)
    data = os.urandom(400 * KIB)
    h, total = sha(data), len(data)
    await put(alice, data[:100 * KIB], 0, total, blob_hash=h)
    await put(bob, data[:50 * KIB], 0, total, blob_hash=h)
    assert (await blobs.status(alice, h)).received == 100 * KIB
    assert (await blobs.status(bob, h)).received == 50 * KIB
    assert len(partial_files(app)) == 2
    assert (await put(alice, data[100 * KIB:], 100 * KIB, total, blob_hash=h)).complete
    # Bob's next chunk finds the blob complete: his partial is dropped, the blob is his too.
    r = await put(bob, data[50 * KIB:100 * KIB], 50 * KIB, total, blob_hash=h)
    assert r.complete and r.blob_id == h
    assert partial_files(app) == []
    assert await svc(app).usage(bob.identity_key) == total


# -- housekeeping ----------------------------------------------------------------------------------


async def test_abandoned_uploads_are_collected(app, connect) -> None:
    c = await connect(app)
    data = os.urandom(300 * KIB)
    h = sha(data)
    await put(c, data[:100 * KIB], 0, len(data), blob_hash=h)
    assert await svc(app).collect_garbage() == 0  # fresh: kept
    assert len(partial_files(app)) == 1
    ttl = svc(app).cfg.partial_ttl_secs
    assert await svc(app).collect_garbage(now=time.time() + ttl + 1) == 1
    assert partial_files(app) == []
    assert (await blobs.status(c, h)).received == 0
    assert await svc(app).usage(c.identity_key) == 0
    assert await blobs.upload(c, data) == h


async def test_collector_runs_in_the_background(app_factory, connect) -> None:
    app = await app_factory(plugins=["blobs"], blobs={"partial_ttl_secs": 0.01,
                                                      "gc_interval_secs": 0.02})
    c = await connect(app)
    data = os.urandom(100 * KIB)
    resp = await put(c, data[:10 * KIB], 0, len(data), blob_hash=sha(data))
    assert resp.received == 10 * KIB  # held (the collector may take it any moment now)
    async with asyncio.timeout(10):
        while partial_files(app):
            await svc(app).wait_for_gc_pass()
    assert (await blobs.status(c, sha(data))).received == 0


async def test_stray_files_are_swept(app, connect) -> None:
    root = app.data_dir / "blobs"
    (root / "ab").mkdir()
    stray = [root / "ab" / ("ab" * 32 + ".json"), root / "ab" / "x.json.1.2.tmp",
             root / "partial" / ("cd" * 32 + ".part")]
    for p in stray:
        p.write_bytes(b"{}")
    c = await connect(app)
    with pytest.raises(NotFound):  # a sidecar alone is not a blob
        await blobs.download(c, bytes.fromhex("ab" * 32))
    assert await svc(app).collect_garbage() == 0  # too young
    assert await svc(app).collect_garbage(now=time.time() + 86_401) == 3
    assert not any(p.exists() for p in stray)
    # A stray partial file of the very upload being started (its record lost in a crash)
    # is emptied, not appended to.
    for data in (os.urandom(5000), b""):
        path = svc(app).store.partial_path(c.identity_key, sha(data))
        path.write_bytes(os.urandom(700))
        assert await blobs.upload(c, data) == sha(data)
        assert await blobs.download(c, sha(data)) == data


async def test_failed_commit_leaves_no_complete_blob(app, connect, monkeypatch) -> None:
    c = await connect(app)
    data = os.urandom(100 * KIB)
    h, total = sha(data), len(data)
    await put(c, data[:60 * KIB], 0, total, blob_hash=h)
    real_replace = os.replace

    def crash_for(blob: bytes):  # type: ignore[no-untyped-def]
        def replace(src: object, dst: object) -> None:
            if str(dst).endswith(blob.hex()):
                raise OSError(28, "No space left on device")
            real_replace(src, dst)  # type: ignore[arg-type]

        return replace

    monkeypatch.setattr(store_mod.os, "replace", crash_for(h))
    with pytest.raises(Internal):
        await put(c, data[60 * KIB:], 60 * KIB, total, blob_hash=h)
    with pytest.raises(NotFound):
        await blobs.download(c, h)
    st = await blobs.status(c, h)
    assert (st.received, st.complete) == (total, False)
    with pytest.raises(Internal):  # still failing: the SDK re-sends the end, same result
        await blobs.upload(c, data)
    monkeypatch.setattr(store_mod.os, "replace", real_replace)
    # Sending the last bytes again retries the commit.
    assert (await put(c, data[60 * KIB:], 60 * KIB, total, blob_hash=h)).complete
    assert await blobs.download(c, h) == data
    # The same through the SDK for a second blob.
    other = os.urandom(70 * KIB)
    monkeypatch.setattr(store_mod.os, "replace", crash_for(sha(other)))
    with pytest.raises(Internal):
        await blobs.upload(c, other)
    monkeypatch.setattr(store_mod.os, "replace", real_replace)
    assert await blobs.upload(c, other) == sha(other)
    assert await blobs.download(c, sha(other)) == other


async def test_account_deletion_removes_what_nobody_else_holds(app, connect) -> None:
    alice, bob = await connect(app), await connect(app)
    mine, shared, partial = os.urandom(5000), os.urandom(6000), os.urandom(7000)
    await blobs.upload(alice, mine)
    await blobs.upload(alice, shared)
    await blobs.upload(bob, shared)
    await put(alice, partial[:100], 0, len(partial))
    await alice.delete_account()
    with pytest.raises(NotFound):
        await blobs.download(bob, sha(mine))
    assert await blobs.download(bob, sha(shared)) == shared
    assert partial_files(app) == []
    assert await svc(app).usage(alice.identity_key) == 0


# -- access ---------------------------------------------------------------------------------


async def test_identity_is_required(app, connect) -> None:
    owner = await connect(app)
    blob_id = await blobs.upload(owner, b"hello")
    anon = await connect(app, new_identity=False)  # operator token, no proven identity
    with pytest.raises(Unauthenticated):
        await blobs.download(anon, blob_id)
    with pytest.raises(Unauthenticated):
        await blobs.upload(anon, b"hello")
    nobody = await connect(app, token=None, new_identity=False)
    with pytest.raises(Unauthenticated):
        await blobs.status(nobody, blob_id)
    # Any proven identity that knows the id may download it.
    assert await blobs.download(await connect(app), blob_id) == b"hello"


def test_config_is_validated(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"blobs\.nope"):
        App(make_settings(tmp_path, plugins=["blobs"], blobs={"nope": 1}))
    with pytest.raises(ConfigError, match=r"blobs\.max_chunk_bytes"):
        App(make_settings(tmp_path, plugins=["blobs"], blobs={"max_chunk_bytes": 8 * MIB}))
    app = App(make_settings(tmp_path, plugins=["blobs"], blobs={"max_blob_bytes": 10}))
    assert app.plugin_config("blobs").max_blob_bytes == 10
    assert app.plugin_config("blobs").quota_bytes_per_identity == 1024 * MIB
    assert {m.name: m.auth for _p, m in app.methods.values() if m.group == "blobs"} == {
        "UploadBlob": "identity", "DownloadBlob": "identity", "BlobUploadStatus": "identity"}


async def test_with_other_plugins_and_a_session(app_factory, connect) -> None:
    from qpc_auth_opaque import client as opaque_client
    from qpc_auth_opaque import opaque

    app = await app_factory(plugins=["auth_opaque", "blobs"], auth_opaque={"ksf": "identity"})
    key = Ed25519PrivateKey.generate()
    c = await connect(app, token=None, identity=key)
    await opaque_client.register(c, "carol", "pw", ksf=opaque.IdentityKSF())
    res = await opaque_client.login(c, "carol", "pw", ksf=opaque.IdentityKSF())
    s = await connect(app, token=res.session_token.decode(), new_identity=False)
    data = os.urandom(300 * KIB)
    blob_id = await blobs.upload(s, data)
    assert await blobs.download(s, blob_id) == data
    assert await svc(app).usage(key.public_key().public_bytes_raw()) == len(data)
