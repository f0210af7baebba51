"""The stall breaker's loss case, against a real server on loopback (raw aioquic client).

When a client has used the whole connection window while requests are partly received, the
server refuses the newest of them as busy (see ``_break_stall`` in qpc_core/transport/quic.py
and test_transport_limits.py).  A window filled because a packet was *lost* is different: the
data above the gap is held in the library's receive buffer, the retransmission of the missing
bytes needs no new credit (they lie below data already counted), and once it arrives the
request completes and frees the window.  Nothing must be refused then."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from quic_raw import HEALTH, padding, raw_clients, until

from qpc_core.framing import Status
from qpc_core.framing.frames import REQUEST_HEADER
from qpc_core.testing import quic_transport
from qpc_core.transport import quic
from qpc_core.transport.backend import receive_buffered

KiB = 1024


def header(method: int, length: int) -> bytes:
    return REQUEST_HEADER.pack(method, 7, length)


async def test_window_full_behind_a_lost_packet_refuses_nothing(
    app_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three partly sent requests and one whole request (A) fill exactly the connection
    window; the next-to-last datagram of A is lost on its way to the server.  When the
    window's last datagram arrives the server holds a full window (nothing it could grant)
    *and* a gap: it must wait for the retransmission (A then completes, freeing room for the
    rest of the others), not refuse a request as busy.

    The loss is real: the datagram never reaches the socket, and the client's own loss
    detection (the server's ACK of the later datagram) sends the bytes again.  Only A's last
    two datagrams go out after the rest was received, so that retransmission cannot arrive
    before the datagram that fills the window: no timing is involved.

    Without the gap check at the top of ``_break_stall`` the newest request (the one behind
    the lost packet) is refused UNAVAILABLE here, and this test fails."""
    # A small pre-auth payload makes the unauthenticated window smaller than the
    # authenticated one, so authenticating grants the client exactly the latter.
    app = await app_factory(max_payload_bytes=64 * KiB, max_request_buffer_bytes=64 * KiB,
                            max_unauthenticated_payload_bytes=1 * KiB)
    window = quic_transport(app).window_authenticated

    stalls: list[tuple[int, int]] = []  # (bytes above gaps, allowance) at each stall
    break_stall = quic._ServerConnectionLogic._break_stall

    def noting_break_stall(self: quic._ServerConnectionLogic) -> None:
        stalls.append((receive_buffered(self._quic), self._receive_allowance()))
        break_stall(self)

    monkeypatch.setattr(quic._ServerConnectionLogic, "_break_stall", noting_break_stall)

    async with raw_clients(app) as make:
        c = await make(token=b"devtoken")
        (conn,) = list(app.connections)
        cq = c._quic
        conn_limit = conn._max_data
        await until(lambda: cq._remote_max_data == conn_limit.value, what="MAX_DATA reached")
        credit = cq._remote_max_data - cq._remote_max_data_used
        # Everything the client may send now is what the server may hold: once it is all
        # received and nothing complete, the server has no credit to give (allowance 0).
        assert credit == window

        # The whole request (A) and three partly sent ones (announcing 60 KiB each) make up
        # exactly the credit.  A's last ``tail`` bytes are held back for the lossy phase.
        hsize = REQUEST_HEADER.size
        whole = header(HEALTH, 60 * KiB) + padding(60 * KiB)
        tail = cq._max_datagram_size * 3 // 2  # two datagrams: the first one is lost
        partial_total = credit - len(whole)
        sizes = [partial_total // 3] * 3
        sizes[0] += partial_total - sum(sizes)
        body = padding(60 * KiB)
        assert all(hsize < n < hsize + len(body) for n in sizes)
        partial = [c.send(header(HEALTH, len(body)) + body[: n - hsize], fin=False)
                   for n in sizes]
        sid_a = c.send(whole[:-tail], fin=False)
        await until(lambda: conn_limit.value - conn_limit.used == tail
                    and receive_buffered(conn._quic) == 0,
                    what="first phase received in full")
        assert not stalls  # credit was left until now

        # Lose the first datagram carrying A's remaining bytes (not its FIN): the one after
        # it lands above a gap and uses the last of the window.
        sender = cq._streams[sid_a].sender
        cut = len(whole) - tail
        built: list[Any] = []
        dropped: list[tuple[int, int]] = []
        on_packet_sent = cq._loss.on_packet_sent
        datagrams_to_send = cq.datagrams_to_send

        def noting_packet_sent(*, packet: Any, space: Any) -> None:
            built.append(packet)
            on_packet_sent(packet=packet, space=space)

        def lossy_datagrams_to_send(now: float) -> list[tuple[bytes, Any]]:
            built.clear()
            out = datagrams_to_send(now=now)
            if dropped:
                return out
            for i, packet in enumerate(built):
                for handler, args in packet.delivery_handlers:
                    if getattr(handler, "__self__", None) is not sender:
                        continue  # not a STREAM frame of A
                    start, stop, fin = args
                    if start >= cut and not fin:
                        assert len(built) == len(out)  # 1-RTT: one packet per datagram
                        dropped.append((start, stop))
                        del out[i]
                        return out
            return out

        monkeypatch.setattr(cq._loss, "on_packet_sent", noting_packet_sent)
        monkeypatch.setattr(cq, "datagrams_to_send", lossy_datagrams_to_send)
        c.send(whole[-tail:], fin=True, sid=sid_a)

        # A completes once the lost bytes are retransmitted (the client's loss detection).
        assert (await c.response(sid_a)).status == Status.OK
        assert len(dropped) == 1, dropped
        assert dropped[0][1] < len(whole)  # data of A followed the lost datagram
        # The window was full while bytes sat above the gap, and the server held a whole
        # window (allowance <= 0): exactly where the stall breaker would otherwise refuse.
        assert any(above > 0 and allowance <= 0 for above, allowance in stalls), stalls

        # A's completion freed room: the partly sent requests finish and all are answered.
        for sid, n in zip(partial, sizes, strict=True):
            c.send(body[n - hsize:], fin=True, sid=sid)
        for sid in partial:
            frame = await c.response(sid)
            assert frame.status == Status.OK, frame
        assert conn._reserved == 0
        assert receive_buffered(conn._quic) == 0
        assert (await c.health()).status == Status.OK  # the connection still works
