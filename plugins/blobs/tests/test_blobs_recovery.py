"""Restart recovery and durability of the blob store.

Real App with the plugin, real QUIC, the real SDK; restarts reuse the data directory."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from blob_test_helpers import NS, blob_path, sha, svc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_blobs import client as blobs
from qpc_blobs import store as store_mod

from qpc_core.app import App
from qpc_core.errors import Internal, QuotaExceeded


def ident_of(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


async def owns(app: App, ident: bytes, h: bytes) -> bool:
    return await app.storage.kv_get(NS, b"own:" + ident + h) is not None


async def leave_partial(app: App, ident: bytes, h: bytes, content: bytes, total: int) -> None:
    """The state a crash leaves for an upload by ``ident`` holding ``content`` so far."""
    service = svc(app)
    service.store.partial_path(ident, h).write_bytes(content)
    rec = {"total_size": total, "mime_type": "application/octet-stream",
           "created_at": time.time()}
    await app.storage.kv_put(NS, b"part:" + ident + h, json.dumps(rec).encode())


async def test_restart_adopts_only_uploads_that_committed_the_blob(app_factory, connect,
                                                                   monkeypatch) -> None:
    cfg = {"quota_bytes_per_identity": 40_000}
    app = await app_factory(plugins=["blobs"], blobs=cfg)
    keys = {name: Ed25519PrivateKey.generate() for name in ("alice", "bob", "carol", "frank")}
    ids = {name: ident_of(k) for name, k in keys.items()}
    dave, erin = os.urandom(32), os.urandom(32)  # identities known only from their records
    alice = await connect(app, identity=keys["alice"])
    bob = await connect(app, identity=keys["bob"])
    carol = await connect(app, identity=keys["carol"])
    frank = await connect(app, identity=keys["frank"])
    x, z, y = os.urandom(8000), os.urandom(9000), os.urandom(10_000)
    # Unfinished uploads of X that did not complete it: a wrong total_size, and 10 bytes.
    await blobs.upload_chunk(bob, sha(x), 0, x[:10], 100)
    await blobs.upload_chunk(carol, sha(x), 0, x[:10], len(x))
    await blobs.upload(bob, os.urandom(12_000))
    await blobs.upload(alice, x)
    await blobs.upload(alice, z)
    # Erin's partial of X has the right length but not X's bytes; Dave's holds exactly Z
    # (Z was committed by someone else first and the crash came before his file was dropped).
    await leave_partial(app, erin, sha(x), os.urandom(len(x)), len(x))
    await leave_partial(app, dave, sha(z), z, len(z))
    # Frank's upload committed Y, and the crash came before he was recorded as its holder.
    real_add_ref = svc(app)._add_ref

    async def failing_add_ref(ident: bytes, h: bytes, size: int) -> None:
        if h == sha(y):
            raise RuntimeError("crash")
        await real_add_ref(ident, h, size)

    monkeypatch.setattr(svc(app), "_add_ref", failing_add_ref)
    with pytest.raises(Internal):
        await blobs.upload(frank, y)
    assert blob_path(app, sha(y)).exists()
    await app.stop()

    app2 = await app_factory(plugins=["blobs"], blobs=cfg)
    service = svc(app2)
    # Adopted: uploads that committed the blob (or hold exactly its bytes).
    assert await owns(app2, ids["frank"], sha(y))
    assert await owns(app2, dave, sha(z))
    assert await service.usage(ids["frank"]) == len(y)
    assert await app2.storage.kv_scan(NS, b"part:" + ids["frank"]) == []
    # Not adopted: the others stay reservations, charged their own total_size.
    for ident in (ids["bob"], ids["carol"], erin):
        assert not await owns(app2, ident, sha(x))
    assert await service.usage(ids["bob"]) == 12_000 + 4096  # not 12 000 + 8000
    assert await service.usage(ids["carol"]) == len(x)
    # Alice was X's only holder: deleting her account deletes it (nobody else holds it).
    alice2 = await connect(app2, identity=keys["alice"])
    await alice2.delete_account()
    assert not blob_path(app2, sha(x)).exists()
    assert blob_path(app2, sha(z)).exists()  # Dave holds Z
    # The leftover reservations expire like any abandoned upload.
    ttl = service.cfg.partial_ttl_secs
    assert await service.collect_garbage(now=time.time() + ttl + 1) == 3
    assert await service.usage(ids["bob"]) == 12_000
    assert await service.usage(ids["carol"]) == 0 and await service.usage(erin) == 0


async def test_claim_after_restart_checks_the_quota(app_factory, connect) -> None:
    cfg = {"quota_bytes_per_identity": 10_000}
    app = await app_factory(plugins=["blobs"], blobs=cfg)
    key = Ed25519PrivateKey.generate()
    alice, bob = await connect(app), await connect(app, identity=key)
    x = os.urandom(8000)
    await blobs.upload_chunk(bob, sha(x), 0, x[:10], 100)  # reserves 4 KiB
    await blobs.upload(bob, os.urandom(5000))
    await blobs.upload(alice, x)
    await app.stop()
    app2 = await app_factory(plugins=["blobs"], blobs=cfg)
    bob2 = await connect(app2, identity=key)
    assert await svc(app2).usage(ident_of(key)) == 5000 + 4096
    with pytest.raises(QuotaExceeded, match="5000 of 10000"):  # + 8000 > 10 000
        await blobs.upload(bob2, x)
    assert await svc(app2).usage(ident_of(key)) <= 10_000


async def test_new_prefix_directory_is_made_durable(app_factory, connect, monkeypatch) -> None:
    app = await app_factory(plugins=["blobs"])
    root = app.data_dir / "blobs"
    data = os.urandom(1000)
    prefix = root / sha(data).hex()[:2]
    assert not prefix.exists()
    synced: list[tuple[Path, bool]] = []
    real = store_mod._fsync_dir

    def spy(path: Path) -> None:
        synced.append((Path(path), prefix.exists()))
        real(path)

    monkeypatch.setattr(store_mod, "_fsync_dir", spy)
    c = await connect(app)
    assert await blobs.upload(c, data) == sha(data)  # acknowledged
    assert prefix.is_dir()
    # The root (which holds the new directory's entry) was fsynced after the directory
    # existed, before the upload was acknowledged.
    assert (root, True) in synced
    assert (prefix, True) in synced
