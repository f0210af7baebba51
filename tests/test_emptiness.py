"""The known-empty inbox bookkeeping (qpc_core.storage.emptiness), without a database."""

from __future__ import annotations

import pytest

from qpc_core.storage import emptiness
from qpc_core.storage.emptiness import EmptyInboxes

A = (b"a" * 32, b"")
B = (b"b" * 32, b"")


def test_an_observation_counts_only_if_nothing_was_added_after_it_started() -> None:
    e = EmptyInboxes()
    since = e.stamp()
    e.writing(A)  # an enqueue queued after the observing operation
    e.observed_empty(A, since)
    assert not e.is_empty(A)
    since = e.stamp()
    e.observed_empty(A, since)
    assert e.is_empty(A)
    e.observed_empty(B, since)
    assert e.is_empty(B)
    e.writing(A)
    assert not e.is_empty(A) and e.is_empty(B)


def test_in_flight_until_written() -> None:
    e = EmptyInboxes()
    e.writing(A)
    e.writing(A)
    e.written(A)
    assert e.in_flight(A)
    e.written(A)
    assert not e.in_flight(A) and not e.in_flight(B)


def test_an_enqueue_that_handed_everything_over_observes_from_its_own_number() -> None:
    e = EmptyInboxes()
    n = e.writing(A)
    e.observed_empty(A, n)
    assert e.is_empty(A)
    n = e.writing(A)
    e.writing(A)  # a second add queued behind it
    e.observed_empty(A, n)
    assert not e.is_empty(A)


def test_forget_refuses_older_observations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(emptiness, "MAX_TRACKED", 2)
    e = EmptyInboxes()
    since = e.stamp()
    e.writing(A)
    e.writing(B)
    e.writing((b"c" * 32, b""))  # over the bound: everything is forgotten
    # A's write record is gone, but the observation predates the forgetting: refused.
    e.observed_empty(A, since)
    assert not e.is_empty(A)
    e.observed_empty(A, e.stamp())
    assert e.is_empty(A)


def test_disabled_knows_nothing() -> None:
    e = EmptyInboxes()
    e.observed_empty(A, e.stamp())
    e.disable()
    assert not e.is_empty(A)
    e.observed_empty(A, e.stamp())
    assert not e.is_empty(A)
