"""[blobs] keys that apply on a configuration reload: uploads in progress finish under the
limit they began with, and a lower TTL reschedules the collection of unheld blobs."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from blob_test_helpers import blob_path, sha, svc
from qpc_blobs import client as blobs
from qpc_blobs.service import NS, OWN, REF

from qpc_core.errors import TooLarge


async def test_lowering_max_blob_bytes_lets_uploads_in_progress_finish(
    app_factory: Any, settings_factory: Any, connect: Any
) -> None:
    """A lower max_blob_bytes applies to uploads started from then on: one in progress
    above the new limit finishes; a new one of its size is refused."""
    cfg: dict[str, Any] = {"plugins": ["blobs"], "blobs": {"max_blob_bytes": 20_000}}
    app = await app_factory(**cfg)
    app.config_source = lambda: settings_factory(**cfg)
    c = await connect(app)
    data = os.urandom(10_000)
    h = sha(data)
    first = await blobs.upload_chunk(c, h, 0, data[:4000], len(data))
    assert first.received == 4000
    cfg["blobs"] = {"max_blob_bytes": 5000}
    assert (await app.reload_config()).applied == ("blobs.max_blob_bytes",)
    rest = await blobs.upload_chunk(c, h, 4000, data[4000:], len(data))
    assert rest.complete
    other = os.urandom(10_000)
    with pytest.raises(TooLarge, match="maximum of 5000 bytes"):
        await blobs.upload_chunk(c, sha(other), 0, other[:4000], len(other))


async def test_a_lower_partial_ttl_reschedules_the_unheld_blob_scan(
    app_factory: Any, settings_factory: Any, connect: Any
) -> None:
    """After a reload lowers partial_ttl_secs from a day to a minute, the next collection
    scans for unheld blobs against the new value (not the day-long schedule the last
    scan set)."""
    cfg: dict[str, Any] = {"plugins": ["blobs"], "blobs": {"partial_ttl_secs": 86_400.0}}
    app = await app_factory(**cfg)
    app.config_source = lambda: settings_factory(**cfg)
    service = svc(app)
    t = time.time()
    await service.collect_garbage(now=t)  # a collector pass: next unheld scan in a day
    c = await connect(app)
    data = os.urandom(6000)
    h = await blobs.upload(c, data)
    assert h == sha(data)
    await app.storage.kv_delete(NS, REF + h + c.identity_key)  # nobody holds it any more
    await app.storage.kv_delete(NS, OWN + c.identity_key + h)
    cfg["blobs"] = {"partial_ttl_secs": 60.0}
    assert (await app.reload_config()).applied == ("blobs.partial_ttl_secs",)
    await service.collect_garbage(now=t + 1000)  # cut-off t + 940: the blob is older
    assert not blob_path(app, h).exists()
