"""Which inboxes are known to hold no deliverable message, kept on the event loop.

A store that is the only writer of its data (the embedded SQLCipher file) can answer "is this
inbox empty?" from memory once it has seen the inbox drained, instead of asking a reader
thread.  That matters for FetchWait: a long poll that parks in the same loop turn it arrives
in is there for the next Enqueue to hand its message to (one commit, no store-then-fetch).

The rule that keeps the answer right: an inbox is recorded as empty only from an observation
(a fetch that drained it, an enqueue whose messages were all handed over, a reader that found
it empty with no write to it in flight) that no write able to add messages (enqueue, restore)
was submitted after.  Writes are numbered as they are submitted; an observation carries the
number current when its operation was submitted.  Everything here runs on the storage's event
loop, so no locking.  Only messages being added can make a recorded "empty" wrong; removing
(fetch, ack, expiry, account deletion) never can.
"""

from __future__ import annotations

Inbox = tuple[bytes, bytes]

#: Past this many tracked inboxes everything is forgotten (it is only a hint).
MAX_TRACKED = 100_000


class EmptyInboxes:
    """Known-empty inboxes, with the bookkeeping that keeps them right (see module doc)."""

    __slots__ = ("_cleared_at", "_clock", "_empty", "_inflight", "_last_write", "enabled")

    def __init__(self) -> None:
        self._clock = 0
        self._cleared_at = 0
        self._empty: set[Inbox] = set()
        self._last_write: dict[Inbox, int] = {}
        self._inflight: dict[Inbox, int] = {}
        #: False once a write came from outside the event loop (order no longer known).
        self.enabled = True

    def stamp(self) -> int:
        """The write number an operation submitted now observes the store after."""
        return self._clock

    def writing(self, inbox: Inbox) -> int:
        """A write that may add messages to ``inbox`` is being submitted; returns its number.
        Call :meth:`written` once it has committed or failed."""
        self._clock += 1
        self._empty.discard(inbox)
        if len(self._last_write) >= MAX_TRACKED and inbox not in self._last_write:
            self.forget()
        self._last_write[inbox] = self._clock
        self._inflight[inbox] = self._inflight.get(inbox, 0) + 1
        return self._clock

    def written(self, inbox: Inbox) -> None:
        n = self._inflight.get(inbox, 0) - 1
        if n > 0:
            self._inflight[inbox] = n
        else:
            self._inflight.pop(inbox, None)

    def in_flight(self, inbox: Inbox) -> bool:
        """True while a write that may add messages to ``inbox`` has not committed."""
        return inbox in self._inflight

    def is_empty(self, inbox: Inbox) -> bool:
        return self.enabled and inbox in self._empty

    def observed_empty(self, inbox: Inbox, since: int) -> None:
        """An operation submitted at write number ``since`` saw ``inbox`` without deliverable
        messages; record it unless something may have been added since."""
        if not self.enabled or since < self._cleared_at:
            return
        if self._last_write.get(inbox, 0) > since:
            return
        if len(self._empty) >= MAX_TRACKED:
            self.forget()
            return
        self._empty.add(inbox)

    def forget(self) -> None:
        """Drop every recorded empty inbox and refuse observations made before now."""
        self._clock += 1
        self._cleared_at = self._clock
        self._empty.clear()
        self._last_write.clear()

    def disable(self) -> None:
        self.enabled = False
        self._empty.clear()
