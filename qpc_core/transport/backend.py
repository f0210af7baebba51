"""Small QUIC-library specifics kept in one place (no asyncio, no qpc imports)."""

from __future__ import annotations

from typing import Any


def piggyback_acks(quic: Any) -> None:
    """Let the packets about to be sent carry the pending ACK.

    aioquic delays an ACK by 1 ms after an ack-eliciting packet and leaves it out of packets
    sent before then, so a response written within that millisecond went without it and a
    separate ACK-only datagram followed 1 ms later (on both ends: two extra packets, two timer
    wake-ups and their crypto per RPC at low load).  Acknowledging earlier than the delay is
    always allowed (RFC 9000 §13.2.1); ACK frequency under bulk transfer is unchanged because
    this only runs when we have data of our own to send.
    """
    spaces = getattr(quic, "_spaces", None)
    if not spaces:
        return
    for space in spaces.values():
        if space.ack_at is not None:
            space.ack_at = 0.0  # "due now" for aioquic's `ack_at <= now` test
