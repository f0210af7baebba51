"""Per-recipient bookkeeping of the delivery service stays bounded whatever senders do."""

from __future__ import annotations

import asyncio

from qpc_core.builtin import delivery as delivery_mod


async def test_push_bookkeeping_is_bounded_across_channel_ids(
    server, connect, monkeypatch
) -> None:
    monkeypatch.setattr(delivery_mod, "MAX_FETCH_HINTS", 5)
    rx = await connect(server)
    tx = await connect(server)
    svc = server.state["delivery"]
    for i in range(20):  # channel ids are the sender's choice
        await tx.enqueue(rx.identity_key, b"m", channel=b"chan-%02d" % i)
        assert len(svc.notified) <= 5
        assert len(svc.stored_since_fetch) <= 5
    # The recipient was still told: a NEW_MESSAGE push arrived for the newest inbox.
    seen = set()
    while True:
        try:
            push = await asyncio.wait_for(rx.pushes.get(), 5)
        except TimeoutError:
            break
        seen.add(push.payload)
        if any(b"chan-19" in p for p in seen):
            break
    assert any(b"chan-19" in p for p in seen)
