"""A blob file that cannot be removed does not keep a deleted account's purge, and with it
the identity's uploads, blocked for good."""

from __future__ import annotations

import logging
import os

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_blobs import client as blobs


async def test_an_unremovable_file_does_not_block_the_purge(app_factory, connect,
                                                             caplog) -> None:
    app = await app_factory(plugins=["blobs"])
    key = Ed25519PrivateKey.generate()
    alice = await connect(app, identity=key)
    h = await blobs.upload(alice, os.urandom(500))
    side = app.data_dir / "blobs" / h.hex()[:2] / (h.hex() + ".json")
    side.unlink()
    side.mkdir()  # unlink() of it fails (EISDIR), as a permission or I/O error would
    await alice.delete_account()
    await alice.close()
    svc = app.state["blobs"]
    alice = await connect(app, identity=key)
    with caplog.at_level(logging.ERROR, logger="qpc.blobs"):
        again = await blobs.upload(alice, os.urandom(100))  # accepted: the purge completed
    assert again != h
    assert alice.identity_key not in svc._unpurged
    assert not await app.storage.kv_scan("blobs", b"purge:")
    assert h.hex()[:16] in caplog.text and "could not be removed" in caplog.text
