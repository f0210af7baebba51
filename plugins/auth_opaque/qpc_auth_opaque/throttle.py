"""Login failure throttling with growing back-off, per username and per client IP.

Each key keeps the times of its recent failures (inside ``window``).  Up to ``free``
failures cost nothing; failure number ``free + k`` locks the key for
``min(base * 2**(k-1), cap)`` seconds.  While locked, login attempts are refused before any
OPAQUE work is done.  A success clears the username's record.  Memory is bounded: keys whose
failures all left the window are dropped lazily, and beyond ``max_keys`` the least recently
failed keys are forgotten (unlocked ones first).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class _Entry:
    failures: deque[float] = field(default_factory=deque)
    locked_until: float = 0.0


class Throttle:
    def __init__(
        self,
        *,
        free: int,
        window: float,
        base: float,
        cap: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 100_000,
    ) -> None:
        self.free = free
        self.window = window
        self.base = base
        self.cap = cap
        self.clock = clock
        self.max_keys = max_keys
        self._entries: dict[object, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def retry_after(self, key: object) -> float:
        """Seconds until ``key`` may try again (0 = now)."""
        e = self._entries.get(key)
        if e is None:
            return 0.0
        return max(0.0, e.locked_until - self.clock())

    def failure(self, key: object) -> float:
        """Record a failure; return the lock-out it caused (0 while still free)."""
        now = self.clock()
        e = self._entries.pop(key, None)
        if e is None:
            if len(self._entries) >= self.max_keys:
                self._gc(now)
            e = _Entry()
        self._entries[key] = e  # (re)inserted last: the dict is ordered by last failure
        while e.failures and now - e.failures[0] > self.window:
            e.failures.popleft()
        e.failures.append(now)
        excess = len(e.failures) - self.free
        if excess <= 0:
            return 0.0
        lock = float(min(self.base * (2.0 ** (excess - 1)), self.cap))
        e.locked_until = max(e.locked_until, now + lock)
        return lock

    def success(self, key: object) -> None:
        self._entries.pop(key, None)

    def forgive(self, key: object) -> None:
        """Take back the most recent failure of ``key`` (an attempt counted when it started
        that then succeeded, or never got an answer).  A lock-out stays only while the
        failures left are still more than the free ones: the attempt forgiven may be what
        locked the key, and a correct login must not lock its address for everyone."""
        e = self._entries.get(key)
        if e is None or not e.failures:
            return
        e.failures.pop()
        if len(e.failures) <= self.free:
            e.locked_until = 0.0
        if not e.failures:
            del self._entries[key]

    def _gc(self, now: float) -> None:
        stale = [
            k
            for k, e in self._entries.items()
            if e.locked_until <= now and (not e.failures or now - e.failures[-1] > self.window)
        ]
        for k in stale:
            del self._entries[k]
        if len(self._entries) < self.max_keys:
            return
        # Still full: forget the least recently failed keys, unlocked ones first, down to
        # 90 % of the cap (so this does not run on every failure).
        target = self.max_keys * 9 // 10
        for k in [k for k, e in self._entries.items() if e.locked_until <= now]:
            if len(self._entries) <= target:
                return
            del self._entries[k]
        for k in list(self._entries):
            if len(self._entries) <= target:
                return
            del self._entries[k]
