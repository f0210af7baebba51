"""Account deletion removes a deleted identity's blobs completely, even when interrupted.

Real App with the plugin, real QUIC, the real SDK.  Faults are injected by replacing the
service's file operations; no test sleeps to synchronise."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
from blob_test_helpers import NS, blob_path, sha, svc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_blobs import client as blobs

from qpc_core.app import App
from qpc_core.client.sdk import ConnectionLost
from qpc_core.errors import Internal, NotFound


async def records_of(app: App, ident: bytes) -> dict[str, int]:
    """How many kv records still name ``ident``."""
    st = app.storage
    return {
        "own": len(await st.kv_scan(NS, b"own:" + ident)),
        "ref": sum(k.endswith(ident) for k, _v in await st.kv_scan(NS, b"ref:")),
        "part": len(await st.kv_scan(NS, b"part:" + ident)),
        "purge": len(await st.kv_scan(NS, b"purge:" + ident)),
    }


NOTHING = {"own": 0, "ref": 0, "part": 0, "purge": 0}


@pytest.fixture
async def app(app_factory) -> App:
    a: App = await app_factory(plugins=["blobs"])
    return a


async def test_account_purge_survives_a_dropped_connection(app, connect, monkeypatch) -> None:
    alice = await connect(app, identity=Ed25519PrivateKey.generate())
    bob = await connect(app)
    ident = alice.identity_key
    mine = [await blobs.upload(alice, os.urandom(100 + i)) for i in range(6)]
    shared = os.urandom(5000)
    await blobs.upload(alice, shared)
    await blobs.upload(bob, shared)
    unfinished = os.urandom(7000)
    await blobs.upload_chunk(alice, sha(unfinished), 0, unfinished[:100], len(unfinished))

    service = svc(app)
    loop = asyncio.get_running_loop()
    reached, release = asyncio.Event(), threading.Event()
    real_delete = service.store.delete_blob
    calls: list[bytes] = []

    def slow_delete(h: bytes) -> bool:  # runs in a worker thread
        calls.append(h)
        if len(calls) == 2:  # the purge is half done: hold it here
            loop.call_soon_threadsafe(reached.set)
            release.wait(timeout=30)
        return real_delete(h)

    monkeypatch.setattr(service.store, "delete_blob", slow_delete)
    deleting = asyncio.ensure_future(alice.delete_account())
    async with asyncio.timeout(30):
        await reached.wait()
    await alice.close()  # the network drops: the server cancels the DeleteAccount call
    async with asyncio.timeout(30):
        await app._idle.wait()  # the call has ended on the server (cancelled)
    release.set()
    with pytest.raises(ConnectionLost):
        await deleting
    await service.close()  # waits for running purges; the service keeps working

    assert await records_of(app, ident) == NOTHING
    assert not any(blob_path(app, h).exists() for h in mine)
    assert list((app.data_dir / "blobs" / "partial").iterdir()) == []
    assert await blobs.download(bob, sha(shared)) == shared  # Bob still holds it
    assert service._purges == {} and service._steps == set()


async def _half_purged(app: App, connect, monkeypatch) -> tuple[bytes, list[bytes]]:
    """Alice's DeleteAccount fails halfway (the database fails at the second blob)."""
    from qpc_core.errors import StorageError

    alice = await connect(app)
    ident = alice.identity_key
    mine = [await blobs.upload(alice, os.urandom(200 + i)) for i in range(5)]
    real_kv_delete = app.storage.kv_delete
    calls: list[bytes] = []

    async def failing_kv_delete(namespace: str, key: bytes) -> bool:
        if key.startswith(b"ref:"):
            calls.append(key)
            if len(calls) == 2:
                raise StorageError("database unavailable")
        return await real_kv_delete(namespace, key)

    monkeypatch.setattr(app.storage, "kv_delete", failing_kv_delete)
    await alice.delete_account()  # core logs a failing hook; the account itself is gone
    monkeypatch.setattr(app.storage, "kv_delete", real_kv_delete)
    assert (await records_of(app, ident))["own"] >= 3  # cut short
    assert sum(blob_path(app, h).exists() for h in mine) >= 3
    return ident, mine


async def test_interrupted_purge_is_finished_by_the_collector(app, connect,
                                                             monkeypatch) -> None:
    ident, mine = await _half_purged(app, connect, monkeypatch)
    assert await svc(app).collect_garbage() >= 3
    assert await records_of(app, ident) == NOTHING
    assert not any(blob_path(app, h).exists() for h in mine)
    reader = await connect(app)
    with pytest.raises(NotFound):
        await blobs.download(reader, mine[-1])


async def test_interrupted_purge_is_finished_at_the_next_start(app_factory, connect,
                                                               monkeypatch) -> None:
    app = await app_factory(plugins=["blobs"])
    ident, mine = await _half_purged(app, connect, monkeypatch)
    await app.stop()
    app2 = await app_factory(plugins=["blobs"])  # same data directory
    await svc(app2).close()  # waits for the purge the start-up resumed
    assert await records_of(app2, ident) == NOTHING
    assert not any(blob_path(app2, h).exists() for h in mine)


async def test_collector_removes_blob_files_nobody_holds(app, connect, monkeypatch) -> None:
    alice, bob = await connect(app), await connect(app)
    st, service = app.storage, svc(app)
    kept = await blobs.upload(alice, os.urandom(3000))
    orphan, young = await blobs.upload(bob, os.urandom(3000)), await blobs.upload(bob, b"young")
    for h in (orphan, young):  # what a purge cut short in an earlier version left behind
        await st.kv_delete(NS, b"own:" + bob.identity_key + h)
        await st.kv_delete(NS, b"ref:" + h + bob.identity_key)
    # A blob committed whose holder could not be recorded (the upload is still unfinished).
    data = os.urandom(6000)
    real_add_ref = service._add_ref

    async def failing_add_ref(ident: bytes, h: bytes, size: int) -> None:
        if h == sha(data):
            raise RuntimeError("storage unavailable")
        await real_add_ref(ident, h, size)

    monkeypatch.setattr(service, "_add_ref", failing_add_ref)
    with pytest.raises(Internal):
        await blobs.upload(alice, data)
    monkeypatch.setattr(service, "_add_ref", real_add_ref)
    assert blob_path(app, sha(data)).exists()
    old = time.time() - service.cfg.partial_ttl_secs - 100
    for h in (kept, orphan, sha(data)):
        os.utime(blob_path(app, h), (old, old))

    assert await service.collect_garbage() == 1
    assert not blob_path(app, orphan).exists()
    assert not blob_path(app, orphan).with_name(orphan.hex() + ".json").exists()
    assert blob_path(app, young).exists()  # written recently: left for a later pass
    assert await blobs.download(alice, kept) is not None
    # The committed upload is finished by its owner's retry.
    assert await blobs.upload(alice, data) == sha(data)
    assert await blobs.download(bob, sha(data)) == data
    assert await service.usage(alice.identity_key) == 4096 + 6000  # 3000 B cost a 4 KiB block
