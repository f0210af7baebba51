"""A real ``qpc run --plugins blobs`` process is SIGKILLed mid-upload, restarted, resumed."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from qpc_blobs import client as blobs

from qpc_core.client import QpcClient
from qpc_core.errors import NotFound
from qpc_core.testing import TEST_TOKEN, ServerProcess

pytestmark = pytest.mark.timeout(120)

MIB = 1024 * 1024


async def _connect(srv: ServerProcess, key: Ed25519PrivateKey) -> QpcClient:
    return await QpcClient.connect("127.0.0.1", srv.port, token=TEST_TOKEN, identity=key,
                                   ca_cert=srv.ca)


async def test_server_killed_mid_upload_then_resumed(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data = os.urandom(6 * MIB + 12_345)
    h = hashlib.sha256(data).digest()
    key = Ed25519PrivateKey.generate()

    srv = ServerProcess(data_dir, args=["--plugins", "blobs"])
    await srv.start()
    acked = 0
    reached = asyncio.Event()

    def progress(done: int, total: int) -> None:
        nonlocal acked
        acked = max(acked, done)
        if done >= 2 * MIB:
            reached.set()

    c1 = await _connect(srv, key)
    try:
        upload = asyncio.ensure_future(blobs.upload(c1, data, chunk_size=256 * 1024,
                                                    progress=progress))
        await reached.wait()
        await srv.kill()  # SIGKILL while chunks are in flight
        upload.cancel()  # a dead server never answers; QUIC would only notice at idle timeout
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await upload
    finally:
        await c1.close()
    assert 2 * MIB <= acked < len(data)

    srv2 = ServerProcess(data_dir, args=["--plugins", "blobs"])
    await srv2.start()
    try:
        c2 = await _connect(srv2, key)
        try:
            # Nothing claims to be complete, and the server kept what it had written.
            with pytest.raises(NotFound, match="E027"):
                await blobs.download(c2, h)
            st = await blobs.status(c2, h)
            assert not st.complete and st.total_size == len(data)
            assert acked <= st.received < len(data)
            seen: list[int] = []
            assert await blobs.upload(c2, data, progress=lambda d, t: seen.append(d)) == h
            assert seen[0] == st.received  # resumed from the persisted count
            got = await blobs.download(c2, h)
            assert got is not None and hashlib.sha256(got).digest() == h
            blob = data_dir / "blobs" / h.hex()[:2] / h.hex()
            assert blob.read_bytes() == data
            assert list((data_dir / "blobs" / "partial").iterdir()) == []
        finally:
            await c2.close()
    finally:
        await srv2.terminate()
