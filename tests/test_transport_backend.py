"""qpc_core.transport.backend: ACK holding and piggybacking on aioquic's ACK state."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from aioquic import tls

from qpc_core.transport.backend import ACK_HOLD_SECS, hold_ack, piggyback_acks


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
