"""Live figures for the operator status page (``/`` and ``/status.json``).

Kept by the built-in ``admin`` plugin from the core's ``on_*`` notifications, so the page
works with core alone (the ``metrics`` plugin is not needed for it):

* :class:`RateRing`: per-second counts over the last few minutes (messages/s);
* :class:`LatencyWindow`: recent handshake durations, for a p95 over a time window.

Both are plain data structures with an injectable clock, cheap enough to update on every
message: O(1) per event, memory bounded by the window, never by traffic.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable

Clock = Callable[[], float]


class RateRing:
    """Counts per whole second for the last ``seconds`` seconds (a ring of buckets)."""

    def __init__(self, seconds: int = 300, clock: Clock = time.monotonic) -> None:
        if seconds < 1:
            raise ValueError("seconds must be >= 1")
        self.seconds = seconds
        self._clock = clock
        self._counts = [0] * seconds
        self._stamps = [-1] * seconds  # which absolute second each slot currently holds
        self.total = 0

    def add(self, n: int = 1) -> None:
        if n <= 0:
            return
        sec = int(self._clock())
        i = sec % self.seconds
        if self._stamps[i] != sec:
            self._stamps[i] = sec
            self._counts[i] = 0
        self._counts[i] += n
        self.total += n

    def series(self, last: int | None = None) -> list[int]:
        """Counts per second, oldest first, ending with the current (partial) second."""
        n = self.seconds if last is None else max(1, min(last, self.seconds))
        now = int(self._clock())
        out = []
        for sec in range(now - n + 1, now + 1):
            i = sec % self.seconds
            out.append(self._counts[i] if self._stamps[i] == sec else 0)
        return out

    def rate(self, window: int) -> float:
        """Average events per second over the last ``window`` whole seconds.

        The current second is still filling, so the window is the ``window`` seconds before it
        plus what the current second has so far (never under-reports a burst just now)."""
        window = max(1, min(window, self.seconds - 1))
        s = self.series(window + 1)
        return sum(s) / window


class LatencyWindow:
    """Durations observed in the last ``window`` seconds (at most ``max_samples`` kept)."""

    def __init__(
        self, window: float = 300.0, max_samples: int = 4096, clock: Clock = time.monotonic
    ) -> None:
        self.window = window
        self._clock = clock
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def observe(self, seconds: float) -> None:
        self._samples.append((self._clock(), seconds))

    def _recent(self) -> list[float]:
        cutoff = self._clock() - self.window
        while self._samples and self._samples[0][0] < cutoff:
            self._samples.popleft()
        return [s for _, s in self._samples]

    def count(self) -> int:
        return len(self._recent())

    def quantile(self, q: float) -> float | None:
        """Nearest-rank quantile of the window, or ``None`` when it is empty."""
        values = sorted(self._recent())
        if not values:
            return None
        rank = max(1, math.ceil(q * len(values)))
        return values[rank - 1]


class StatusTracker:
    """What the status page shows beyond the App's own state (connections, plugins...)."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self.enqueued = RateRing(300, clock)
        self.fetched = RateRing(300, clock)
        self.handshakes = LatencyWindow(300.0, clock=clock)
        self._clock = clock
        self._depth: int | None = None
        self._depth_at = -math.inf

    async def queue_depth(
        self, read: Callable[[], Awaitable[int]], max_age: float = 1.0
    ) -> int | None:
        """Total queue depth from ``read`` (the storage), at most once per ``max_age`` seconds.

        Several browsers polling the page cost one storage read per second between them;
        a failing read shows as ``None`` ("n/a") instead of failing the page."""
        now = self._clock()
        if now - self._depth_at > max_age:
            self._depth_at = now
            try:
                self._depth = await read()
            except Exception:
                self._depth = None
        return self._depth
