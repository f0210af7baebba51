"""An identity whose account deletion is not yet complete (its blob purge failed, or was
stopped by a restart) comes back (ProveIdentity needs no account) and uploads: the pending
purge is finished before anything of it is accepted, so no later purge removes what it
stored afterwards.  Faults are injected by replacing the blob store's file deletion."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from blob_test_helpers import NS, blob_path, sha, svc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_blobs import client as blobs
from qpc_blobs.store import BlobStore

from qpc_core.app import App
from qpc_core.errors import NotFound, Unavailable


async def n_records(app: App, prefix: bytes) -> int:
    return len(await app.storage.kv_scan(NS, prefix))


def failing_deletes(real: Callable[[Any, bytes], bool], fail: set[int]
                    ) -> Callable[[Any, bytes], bool]:
    """``BlobStore.delete_blob`` failing on the calls numbered in ``fail`` (1-based) with an
    unexpected error (a file that merely cannot be removed no longer stops a purge)."""
    calls: list[bytes] = []

    def delete_blob(self: Any, h: bytes) -> bool:
        calls.append(h)
        if len(calls) in fail:
            raise RuntimeError("simulated failure in the middle of a purge")
        return real(self, h)

    return delete_blob


async def delete_with_failing_purge(app: App, connect: Any, key: Ed25519PrivateKey,
                                    monkeypatch: pytest.MonkeyPatch
                                    ) -> tuple[bytes, list[bytes]]:
    """The holder of ``key`` uploads three blobs and deletes its account; the purge fails on
    the first file, leaving its ``purge:`` record and the holdings."""
    alice = await connect(app, identity=key)
    ident = alice.identity_key
    old = [await blobs.upload(alice, os.urandom(300 + i)) for i in range(3)]
    real = BlobStore.delete_blob
    monkeypatch.setattr(BlobStore, "delete_blob", failing_deletes(real, {1}))
    await alice.delete_account()  # core logs the failing hook; the account is gone
    monkeypatch.setattr(BlobStore, "delete_blob", real)
    assert await n_records(app, b"purge:" + ident) == 1
    assert await n_records(app, b"own:" + ident) == 3
    await alice.close()
    return ident, old


async def upload_as_returned(app: App, connect: Any, key: Ed25519PrivateKey
                             ) -> tuple[Any, bytes, bytes, bytes]:
    """The same key comes back: one whole blob and one unfinished upload."""
    alice = await connect(app, identity=key)
    new = os.urandom(5000)
    h = await blobs.upload(alice, new)
    partial = os.urandom(9000)
    await blobs.upload_chunk(alice, sha(partial), 0, partial[:100], len(partial))
    return alice, new, h, sha(partial)


async def assert_new_holdings_kept(app: App, alice: Any, new: bytes, h: bytes,
                                   partial_hash: bytes, old: list[bytes]) -> None:
    ident = alice.identity_key
    assert await n_records(app, b"purge:" + ident) == 0
    assert await n_records(app, b"own:" + ident) == 1
    assert await n_records(app, b"part:" + ident) == 1
    assert await blobs.download(alice, h) == new
    status = await blobs.status(alice, partial_hash)
    assert (status.received, status.total_size) == (100, 9000)
    assert not any(blob_path(app, b).exists() for b in old)
    with pytest.raises(NotFound):
        await blobs.download(alice, old[-1])


async def test_uploads_after_a_failed_purge_survive_the_collector(
    app_factory: Any, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = await app_factory(plugins=["blobs"])
    key = Ed25519PrivateKey.generate()
    _ident, old = await delete_with_failing_purge(app, connect, key, monkeypatch)
    alice, new, h, partial_hash = await upload_as_returned(app, connect, key)
    await svc(app).collect_garbage()  # used to resume the purge over the new holdings
    await assert_new_holdings_kept(app, alice, new, h, partial_hash, old)


async def test_uploads_after_a_restart_survive_the_resumed_purge(
    app_factory: Any, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The purge failed, and fails again when the next start resumes it; then the identity
    comes back and uploads, and a collector pass runs."""
    app = await app_factory(plugins=["blobs"])
    key = Ed25519PrivateKey.generate()
    ident, old = await delete_with_failing_purge(app, connect, key, monkeypatch)
    await app.stop()
    real = BlobStore.delete_blob
    monkeypatch.setattr(BlobStore, "delete_blob", failing_deletes(real, {1}))
    app2 = await app_factory(plugins=["blobs"])  # same data directory
    service = svc(app2)
    for task in list(service._purges.values()):  # the resumed purge, failing
        with pytest.raises(RuntimeError):
            await task
    assert await n_records(app2, b"purge:" + ident) == 1  # still not done
    monkeypatch.setattr(BlobStore, "delete_blob", real)
    alice, new, h, partial_hash = await upload_as_returned(app2, connect, key)
    await service.collect_garbage()
    await assert_new_holdings_kept(app2, alice, new, h, partial_hash, old)


async def test_nothing_is_accepted_while_the_purge_cannot_finish(
    app_factory: Any, connect: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = await app_factory(plugins=["blobs"])
    bob = await connect(app)
    shared = os.urandom(3000)
    await blobs.upload(bob, shared)
    key = Ed25519PrivateKey.generate()
    _ident, old = await delete_with_failing_purge(app, connect, key, monkeypatch)
    real = BlobStore.delete_blob
    monkeypatch.setattr(BlobStore, "delete_blob", failing_deletes(real, set(range(1, 100))))
    alice = await connect(app, identity=key)
    ident = alice.identity_key
    new = os.urandom(4000)
    with pytest.raises(Unavailable):
        await blobs.upload(alice, new)
    with pytest.raises(Unavailable):  # nor a claim of a blob someone else stored
        await blobs.upload(alice, shared)
    assert await n_records(app, b"part:" + ident) == 0
    assert await n_records(app, b"purge:" + ident) == 1
    assert not blob_path(app, sha(new)).exists()
    monkeypatch.setattr(BlobStore, "delete_blob", real)  # the disk is fine again
    assert await blobs.upload(alice, new) == sha(new)
    assert await blobs.upload(alice, shared) == sha(shared)
    await svc(app).collect_garbage()
    assert await blobs.download(alice, sha(new)) == new
    assert await n_records(app, b"own:" + ident) == 2
    assert await n_records(app, b"purge:" + ident) == 0
    assert not any(blob_path(app, b).exists() for b in old)
    assert await blobs.download(bob, sha(shared)) == shared
