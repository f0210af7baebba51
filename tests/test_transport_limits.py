"""Transport resource limits against a real server on loopback (raw aioquic clients).

Receive windows that cannot be grown by the peer (gap amplification), per-connection request
buffer budget, pre-auth payload cap, request receive deadline, STOP_SENDING handling and the
push backlog."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest
from quic_raw import FLOW_CONTROL_ERROR, HEALTH, padding, raw_clients, until

from qpc_core.framing import PushEvent, Status, encode_request
from qpc_core.framing.frames import REQUEST_HEADER
from qpc_core.pb import common_pb2
from qpc_core.testing import quic_transport

KiB = 1024
BACKENDS = pytest.mark.parametrize("backend", ["aioquic", "qh3"])


def only_connection(app: Any) -> Any:
    (conn,) = list(app.connections)
    return conn


def header(method: int, length: int) -> bytes:
    return REQUEST_HEADER.pack(method, 7, length)


def error_text(frame: Any) -> str:
    return common_pb2.Error.FromString(frame.payload).message


# -- defect 1: receive windows ---------------------------------------------------------------


@BACKENDS
async def test_stream_window_never_grows_and_data_beyond_it_is_refused(app_factory,
                                                                      backend) -> None:
    """One-byte STREAM frames at the edge of a stream's window: the window must stay one
    request frame, the server's buffer with it, and a byte past it is FLOW_CONTROL_ERROR."""
    app = await app_factory(max_payload_bytes=64 * KiB, max_request_buffer_bytes=1024 * KiB,
                            quic_backend=backend)
    async with raw_clients(app) as make:
        c = await make(token=b"devtoken")
        conn = only_connection(app)
        sid = c.send(b"\x03", fin=False)  # a request's first byte: the stream exists
        await c.health()
        sq = conn._quic
        initial = sq._streams[sid].max_stream_data_local
        assert initial <= REQUEST_HEADER.size + 64 * KiB + 64  # one frame, not 1 MiB
        for _ in range(4):  # each step reaches past half of the window, at its very end
            window = sq._streams[sid].max_stream_data_local
            c.byte_at(sid, window - 1)
            assert (await c.health()).status == Status.OK  # limits are written with it
            stream = sq._streams[sid]
            assert stream.max_stream_data_local == initial, "stream window grew"
            assert len(stream.receiver._buffer) <= initial
        c.byte_at(sid, initial)  # one byte past the window
        code, _reason = await asyncio.wait_for(asyncio.shield(c.terminated), 5)
        assert code == FLOW_CONTROL_ERROR


@BACKENDS
async def test_connection_window_stays_capped(app_factory, backend) -> None:
    """Gaps on many streams: the connection window never runs more than the configured
    budget ahead of what the server releases, so the peer is cut off, not served."""
    app = await app_factory(max_payload_bytes=64 * KiB, max_request_buffer_bytes=64 * KiB,
                            quic_backend=backend)
    # The budget, plus room for the auth handshake and headers: well under 4x the budget.
    window = 4 * 64 * KiB
    async with raw_clients(app) as make:
        c = await make(token=b"devtoken")
        sq = only_connection(app)._quic
        held = 0
        for _ in range(12):
            sid = c._quic.get_next_available_stream_id()
            c._quic.send_stream_data(sid, b"")  # opens it here; nothing is sent
            c.byte_at(sid, 64 * KiB + REQUEST_HEADER.size - 1)  # a 64 KiB gap per stream
            try:
                await c.health()
            except (ConnectionError, TimeoutError):
                break
            held += 64 * KiB + REQUEST_HEADER.size
            assert sq._local_max_data.value - sq._local_max_data.used <= window
        assert c.terminated.done(), f"{held} bytes of gaps held without a flow-control error"
        code, reason = c.terminated.result()
        assert code == FLOW_CONTROL_ERROR, reason
        assert held <= window


# -- defect 2: request buffers -----------------------------------------------------------------


async def test_unauthenticated_payload_cap(app_factory) -> None:
    app = await app_factory(max_unauthenticated_payload_bytes=4 * KiB)
    async with raw_clients(app) as make:
        c = await make()
        # Before authenticating: a 4 KiB request is fine, an 8 KiB one refused at its header.
        ok = await c.call(HEALTH, padding(4 * KiB))
        assert ok.status == Status.OK
        sid = c.send(header(HEALTH, 8 * KiB) + b"\0" * 100, fin=False)
        refused = await c.response(sid)
        assert refused.status == Status.PROTOCOL_ERROR
        assert "not authenticated" in error_text(refused)
        assert (await c.health()).status == Status.OK  # the connection lives
        # After the auth handshake (on a fresh connection) the normal limit applies.
        c2 = await make(token=b"devtoken")
        big = await c2.call(HEALTH, padding(8 * KiB))
        assert big.status == Status.OK


async def test_requests_overfilling_the_buffer_budget_refuse_the_newest(app_factory) -> None:
    """More partly received request bytes than the connection may hold: none could ever
    complete (the window is full of them), so the newest is refused (retryable) and the
    others go on."""
    app = await app_factory(max_payload_bytes=64 * KiB, max_request_buffer_bytes=64 * KiB)
    async with raw_clients(app) as make:
        c = await make(token=b"devtoken")
        body = padding(60 * KiB)
        sids = [c.send(header(HEALTH, len(body)) + body[:-1], fin=False) for _ in range(4)]
        refused = await c.response(sids[-1])
        assert refused.status == Status.UNAVAILABLE
        assert "max_request_buffer_bytes" in error_text(refused)
        for sid in sids[:-1]:  # the others complete normally
            c.send(body[-1:], fin=True, sid=sid)
        for sid in sids[:-1]:
            assert (await c.response(sid)).status == Status.OK
        assert only_connection(app)._reserved == 0
        assert (await c.call(HEALTH, body)).status == Status.OK  # sent again: fine


async def test_pipelined_requests_within_the_budget_all_complete(app_factory) -> None:
    """Requests pipelined within max_request_buffer_bytes all complete, however the client
    interleaves them; beyond it a round-robin sender can fill the window with partial
    requests, and then the newest are refused as busy (never a connection error)."""
    app = await app_factory(max_payload_bytes=64 * KiB, max_request_buffer_bytes=128 * KiB)
    async with raw_clients(app) as make:
        c = await make(token=b"devtoken")
        body = padding(60 * KiB)
        sids = [c.send(header(HEALTH, len(body)) + body, fin=True) for _ in range(2)]
        for sid in sids:
            assert (await c.response(sid)).status == Status.OK
        sids = [c.send(header(HEALTH, len(body)) + body, fin=True) for _ in range(12)]
        statuses = [(await c.response(sid)).status for sid in sids]
        assert set(statuses) <= {Status.OK, Status.UNAVAILABLE}
        assert statuses[0] == Status.OK
        assert (await c.health()).status == Status.OK


async def test_incomplete_request_is_refused_after_deadline(app_factory) -> None:
    app = await app_factory(request_receive_timeout_secs=0.3)
    async with raw_clients(app) as make:
        c = await make()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sid = c.send(header(HEALTH, 1000) + b"\0" * 10, fin=False)
        refused = await c.response(sid, timeout=5)
        assert loop.time() - t0 >= 0.25
        assert refused.status == Status.PROTOCOL_ERROR
        assert "no bytes for 0.3 s" in error_text(refused)
        conn = only_connection(app)
        assert conn._reserved == 0
        assert (await c.health()).status == Status.OK


# -- defect 8: STOP_SENDING ---------------------------------------------------------------------


@pytest.fixture
async def loop_errors() -> Any:
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    yield seen
    loop.set_exception_handler(old)


async def test_stop_sending_cancels_a_long_poll(app_factory, monkeypatch, loop_errors) -> None:
    from plugin_helpers import use_fake_plugins

    use_fake_plugins(monkeypatch, slow="slow")
    app = await app_factory(plugins=["slow"])
    st = app.state["slow"]
    async with raw_clients(app) as make:
        c = await make()
        sid = c.send(encode_request(9101, 1, b""))  # SlowPoll: cancel_on_disconnect
        await asyncio.wait_for(st["started"].wait(), 5)
        assert app.in_flight == 1
        c._quic.stop_stream(sid, 7)  # "I do not want the answer"
        c.transmit()
        await until(lambda: app.in_flight == 0, what="the call was not cancelled")
        assert st["cancelled"].is_set() and not st["finished"].is_set()
        assert sid not in only_connection(app).streams
        st["release"].set()
        assert (await c.health()).status == Status.OK
    assert not [e for e in loop_errors if isinstance(e.get("exception"), RuntimeError)]


@pytest.mark.parametrize("how", ["stop_sending", "disconnect"])
async def test_a_call_runs_to_completion_when_its_client_goes_away(
    app_factory, monkeypatch, loop_errors, how
) -> None:
    """Methods that did not opt in to cancellation are never stopped between two awaits by a
    client that leaves: they finish, unanswered."""
    from plugin_helpers import use_fake_plugins

    use_fake_plugins(monkeypatch, slow="slow")
    app = await app_factory(plugins=["slow"])
    st = app.state["slow"]
    async with raw_clients(app) as make:
        c = await make()
        sid = c.send(encode_request(9100, 1, b""))
        await asyncio.wait_for(st["started"].wait(), 5)
        if how == "stop_sending":
            c._quic.stop_stream(sid, 7)
        if how == "disconnect":
            c.close()
        else:
            c.transmit()
            await until(lambda: sid not in only_connection(app).streams,
                        what="the server did not see the client leave the stream")
        if how == "disconnect":
            await until(lambda: not app.connections, what="the connection did not end")
        assert app.in_flight == 1 and not st["cancelled"].is_set()
        st["release"].set()
        await asyncio.wait_for(st["finished"].wait(), 5)
        await until(lambda: app.in_flight == 0, what="the call did not finish")
    assert not [e for e in loop_errors if isinstance(e.get("exception"), RuntimeError)]


async def test_stop_sending_with_a_bad_frame_does_not_escape(server, loop_errors) -> None:
    async with raw_clients(server) as make:
        c = await make(token=b"devtoken")
        sid = c._quic.get_next_available_stream_id()
        c._quic.send_stream_data(sid, header(HEALTH, 5 * 1024 * KiB), end_stream=False)
        c._quic.stop_stream(sid, 7)
        # a good request in the same datagram
        good = c._quic.get_next_available_stream_id()
        c._quic.send_stream_data(good, encode_request(HEALTH, 2, b""), end_stream=True)
        c.transmit()
        assert (await c.response(good)).status == Status.OK
        assert (await c.health()).status == Status.OK
    errors = [e for e in loop_errors if e.get("exception") is not None]
    assert not errors, errors


# -- defect 9: pushes -----------------------------------------------------------------------------


@BACKENDS
async def test_push_dropped_without_uni_stream_credit(app_factory, backend) -> None:
    server = await app_factory(quic_backend=backend)
    async with raw_clients(server) as make:
        c = await make(token=b"devtoken", grant_uni_streams=0)
        conn = only_connection(server)
        for _ in range(50):
            conn.push(PushEvent.NEW_MESSAGE, b"")
        await c.health()
        q = conn._quic
        assert len(q._streams_blocked_uni) == 0
        assert not [sid for sid in q._streams if sid & 0x3 == 0x3]
        assert quic_transport(server).pushes_dropped == 50


async def test_push_backlog_is_bounded(server) -> None:
    """A client that grants credit but whose pushes stay unacknowledged (here: not yet
    delivered in this loop turn) gets at most the backlog; the rest is dropped."""
    from qpc_core.transport import quic

    backlog = getattr(quic, "MAX_PUSH_BACKLOG", 64)
    async with raw_clients(server) as make:
        c = await make(token=b"devtoken", grant_uni_streams=1000)
        conn = only_connection(server)
        for _ in range(backlog + 40):
            conn.push(PushEvent.NEW_MESSAGE, b"")
        opened = [sid for sid in conn._quic._streams if sid & 0x3 == 0x3]
        assert len(opened) == backlog
        assert quic_transport(server).pushes_dropped == 40
        # Pushes that went out arrive; once acknowledged, new ones are accepted again.
        def pushes() -> list[int]:
            return [sid for sid in c.ended if sid & 0x3 == 0x3]

        await until(lambda: len(pushes()) >= backlog, what="pushes delivered")
        await until(lambda: not [s for s in conn._quic._streams if s & 0x3 == 0x3],
                    what="pushes acknowledged")
        conn.push(PushEvent.NEW_MESSAGE, b"")
        assert quic_transport(server).pushes_dropped == 40
        frame = struct.pack(">HI", PushEvent.NEW_MESSAGE, 0)
        await until(lambda: len(pushes()) == backlog + 1, what="the last push")
        assert all(c.ended[sid].result() == frame for sid in pushes())


@BACKENDS
async def test_window_slides_for_well_behaved_uploads(app_factory, backend) -> None:
    """Capped windows still slide: many times the window in total, sequentially and
    concurrently, gets through (no flow-control deadlock)."""
    app = await app_factory(max_payload_bytes=64 * KiB, max_request_buffer_bytes=64 * KiB,
                            quic_backend=backend)
    async with raw_clients(app) as make:
        c = await make(token=b"devtoken")
        body = padding(60 * KiB)
        for _ in range(20):
            assert (await c.call(HEALTH, body)).status == Status.OK
        # Concurrent: at most one fits the 64 KiB budget at a time; the others are refused
        # cleanly (stream errors), never stuck.
        sids = [c.send(encode_request(HEALTH, i, body)) for i in range(3)]
        answers = await asyncio.gather(*(c.response(sid, timeout=10) for sid in sids))
        assert answers[0].status == Status.OK
        assert {a.status for a in answers} <= {Status.OK, Status.PROTOCOL_ERROR}
        for _ in range(5):
            assert (await c.call(HEALTH, body)).status == Status.OK
