"""qpc_core.transport.backend: ACK holding and piggybacking on aioquic's ACK state, one
transmit per connection and loop turn, reading every queued datagram per wake-up."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace
from typing import Any

import pytest
from aioquic import tls

from qpc_core.transport.backend import (
    ACK_HOLD_SECS,
    DatagramDrain,
    TurnBatching,
    hold_ack,
    piggyback_acks,
)


def fake_quic(ack_at: float | None) -> SimpleNamespace:
    return SimpleNamespace(_spaces={tls.Epoch.INITIAL: SimpleNamespace(ack_at=None),
                                    tls.Epoch.ONE_RTT: SimpleNamespace(ack_at=ack_at)})


def test_hold_postpones_a_fresh_ack_once() -> None:
    now = 100.0
    q = fake_quic(now + 0.001)  # aioquic's own 1 ms delay
    hold_ack(q, now)
    held = q._spaces[tls.Epoch.ONE_RTT].ack_at
    assert held == pytest.approx(now + 0.001 + ACK_HOLD_SECS)
    assert held - now < 0.025  # below the advertised max_ack_delay
    hold_ack(q, now + 0.010)  # more packets arrive: an already held ACK is not postponed
    assert q._spaces[tls.Epoch.ONE_RTT].ack_at == held


def test_hold_without_pending_ack_and_piggyback() -> None:
    q = fake_quic(None)
    hold_ack(q, 5.0)
    assert q._spaces[tls.Epoch.ONE_RTT].ack_at is None  # nothing to acknowledge
    q = fake_quic(5.016)
    piggyback_acks(q)  # we are sending anyway: the ACK is due now
    assert q._spaces[tls.Epoch.ONE_RTT].ack_at == 0.0
    assert q._spaces[tls.Epoch.INITIAL].ack_at is None
    hold_ack(SimpleNamespace(), 1.0)  # a library without these internals: no-op
    piggyback_acks(SimpleNamespace())


class _Recorder(asyncio.DatagramProtocol):
    """A datagram endpoint that drains like the qpc server and SDK do."""

    def __init__(self, limit: int, expect: int) -> None:
        self.limit, self.expect = limit, expect
        self.wakeups = 0  # datagram_received calls from the event loop
        self.got: list[bytes] = []
        self.all_in = asyncio.Event()
        self.drain: DatagramDrain | None = None

    def connection_made(self, transport: Any) -> None:
        self.drain = DatagramDrain(transport, limit=self.limit)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.wakeups += 1
        self._one(data, addr)
        assert self.drain is not None
        self.drain.drain(self._one)

    def _one(self, data: bytes, addr: Any) -> None:
        self.got.append(data)
        if len(self.got) >= self.expect:
            self.all_in.set()


async def _burst(limit: int, n: int) -> _Recorder:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _Recorder(limit, n), local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
            for i in range(n):  # all queued in the kernel before the loop looks
                tx.sendto(b"d%d" % i, ("127.0.0.1", port))
        await asyncio.wait_for(proto.all_in.wait(), 10)
        return proto
    finally:
        transport.close()
        assert proto.drain is not None
        proto.drain.close()


async def test_drain_reads_queued_datagrams_in_one_wakeup() -> None:
    proto = await _burst(limit=32, n=6)
    assert proto.got == [b"d%d" % i for i in range(6)]  # all of them, in order
    assert proto.wakeups == 1  # asyncio alone needs one loop wake-up per datagram


async def test_drain_is_bounded_per_wakeup() -> None:
    proto = await _burst(limit=2, n=7)
    assert proto.got == [b"d%d" % i for i in range(7)]
    assert proto.wakeups >= 3  # at most 1 + 2 datagrams per wake-up


class _Closing(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(None)


async def test_drain_close_releases_the_port() -> None:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(
        _Closing, local_addr=("127.0.0.1", 0))
    addr = transport.get_extra_info("sockname")
    drain = DatagramDrain(transport)
    transport.close()
    await asyncio.wait_for(proto.lost, 10)  # the transport closed its own descriptor
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy, pytest.raises(OSError):
        busy.bind(addr)  # the duplicate still holds the port...
    drain.close()
    drain.drain(lambda d, a: pytest.fail("read after close"))  # a no-op now
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as again:
        again.bind(addr)  # ...until the drain is closed


class _FakeConnection(TurnBatching):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._quic = SimpleNamespace(
            _spaces={tls.Epoch.ONE_RTT: SimpleNamespace(ack_at=None)},
            receive_datagram=self._received,
        )
        self.transmits: list[float | None] = []  # the ACK deadline at each transmit
        self.received = 0

    def _received(self, data: bytes, addr: Any, now: float) -> None:
        self.received += 1
        self._quic._spaces[tls.Epoch.ONE_RTT].ack_at = now + 0.001  # aioquic's 1 ms delay

    def _process_events(self) -> None:
        pass

    def transmit(self) -> None:
        self.transmits.append(self._quic._spaces[tls.Epoch.ONE_RTT].ack_at)


async def end_of_turn() -> None:
    """Return once the callbacks scheduled so far (this loop turn's flushes) have run."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon(done.set_result, None)  # FIFO: runs after every earlier call_soon
    await done


async def test_one_transmit_per_connection_and_turn() -> None:
    c = _FakeConnection(asyncio.get_running_loop())
    for _ in range(3):
        c.receive_batched(b"x", ("127.0.0.1", 1), lambda: False)
    assert c.received == 3 and c.transmits == []  # nothing sent inside the turn
    await end_of_turn()
    assert len(c.transmits) == 1  # one transmit for the three datagrams
    assert c.transmits[0] is not None and c.transmits[0] > 0  # ACK left to its own timer
    c.receive_batched(b"x", ("127.0.0.1", 1), lambda: False)
    c.send_soon()  # an answer in the same turn: one transmit, and it carries the ACK
    c.send_soon()
    await end_of_turn()
    assert c.transmits[1:] == [0.0]
