"""Graceful shutdown delivers answers already written: a Fetch answer (whose messages are
already removed from the queue) larger than the congestion window must not be cut off."""

from __future__ import annotations

import asyncio
from typing import Any

from qpc_core.testing import quic_transport

MiB = 1024 * 1024
FETCH = 201


async def _fetch_across_shutdown(app_factory: Any, connect: Any, monkeypatch: Any,
                                 **settings: Any) -> tuple[list[Any], list[bytes], Any]:
    app = await app_factory(**settings)
    sender = await connect(app)
    receiver = await connect(app)
    sent = [bytes([i]) * (MiB - 4096) for i in range(3)]
    for payload in sent:
        await sender.enqueue(receiver.identity_key, payload)  # acknowledged
    # SIGTERM arrives right after the Fetch answer is produced, while it is on its way.
    dispatcher = quic_transport(app).dispatcher
    real_call = dispatcher.call
    stopping: list[asyncio.Future[None]] = []

    async def call(conn: Any, frame: Any) -> bytes:
        out = await real_call(conn, frame)
        if frame.method_id == FETCH:
            stopping.append(asyncio.ensure_future(app.stop()))
        return bytes(out)

    monkeypatch.setattr(dispatcher, "call", call)
    got = await asyncio.wait_for(receiver.fetch(), 10)
    assert stopping
    await asyncio.wait_for(stopping[0], 15)
    return got, sent, receiver


async def test_fetch_answer_survives_graceful_shutdown(app_factory, connect, monkeypatch) -> None:
    got, sent, _ = await _fetch_across_shutdown(app_factory, connect, monkeypatch)
    assert [m.data for m in got] == sent


async def test_flush_is_bounded_by_drain_timeout(app_factory, connect, monkeypatch) -> None:
    """A client that stops acknowledging does not hold the shutdown past the drain timeout."""
    app = await app_factory(drain_timeout_secs=0.3)
    c = await connect(app)
    assert (await c.health()).status == "ok"
    (conn,) = list(app.connections)
    # The answer below is written but, as far as the server can tell, never acknowledged.
    monkeypatch.setattr(type(conn), "sending", lambda self: not self._gone)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(app.stop(), 10)
    assert loop.time() - t0 < 0.3 + 1.0 + 1.0  # drain timeout + close grace + slack
    assert not app.connections


async def test_calls_outliving_the_drain_are_stopped_before_storage_closes(
    app_factory, monkeypatch
) -> None:
    """A call that does not stop when its client goes away still must not run on after the
    server has closed its storage: past the drain timeout it is cancelled."""
    from plugin_helpers import use_fake_plugins
    from quic_raw import raw_clients

    from qpc_core.framing import encode_request

    use_fake_plugins(monkeypatch, slow="slow")
    app = await app_factory(plugins=["slow"], drain_timeout_secs=0.3)
    st = app.state["slow"]
    seen: list[tuple[bool, bool]] = []
    real_close = app._close_storage

    async def close_storage() -> None:
        seen.append((st["cancelled"].is_set(), app.in_flight == 0))
        await real_close()

    app._close_storage = close_storage  # type: ignore[method-assign]
    async with raw_clients(app) as make:
        c = await make()
        c.send(encode_request(9100, 1, b""))  # Slow: not cancelled on disconnect
        await asyncio.wait_for(st["started"].wait(), 5)
        await app.stop()
    assert seen == [(True, True)]  # cancelled and finished before storage closed
    assert not st["finished"].is_set()


async def test_a_quiet_long_poll_still_gets_its_answer_at_shutdown(
    app_factory, connect, monkeypatch
) -> None:
    """A client parked in FetchWait sends nothing for the poll's length; messages handed to it
    are already out of the store, so its answer must be waited for even though the client
    was quiet before the shutdown began."""
    app = await app_factory()
    sender = await connect(app)
    receiver = await connect(app)
    t = quic_transport(app)
    dispatcher = t.dispatcher
    real_call = dispatcher.call
    stopping: list[asyncio.Future[None]] = []

    async def call(conn: Any, frame: Any) -> bytes:
        out = await real_call(conn, frame)
        if frame.method_id == 202:  # FetchWait answered: SIGTERM now
            stopping.append(asyncio.ensure_future(app.stop()))
        return out

    monkeypatch.setattr(dispatcher, "call", call)
    poll = asyncio.ensure_future(receiver.fetch_wait(20_000))
    delivery = app.state["delivery"]
    await until_parked(delivery)
    for proto in t.protocols:  # quiet for a while, as a parked long poll is
        proto._last_heard -= 10.0
    payload = b"\x07" * (MiB - 4096)
    await sender.enqueue(receiver.identity_key, payload)
    got = await asyncio.wait_for(poll, 10)
    assert [m.data for m in got] == [payload]
    await asyncio.wait_for(stopping[0], 15)


async def until_parked(delivery: Any) -> None:
    from quic_raw import until

    await until(lambda: any(w.parked for ws in delivery.waiters.values() for w in ws),
                what="the FetchWait parked")
