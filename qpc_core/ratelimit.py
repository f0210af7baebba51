"""Sliding-window rate limiter (REFERENCE §10), keyed by (group, key kind, key).

Uses the two-bucket sliding-window approximation: the count in the current fixed window plus
the previous window's count weighted by how much of it still overlaps the sliding window.
That is O(1) time and about a hundred bytes per key, and never lets more than ``requests``
through in any window-sized interval by more than the previous window's rounding.
Idle entries are collected lazily, at most once per ``gc_interval`` seconds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol


class LimitSpec(Protocol):
    requests: int
    window_secs: float


@dataclass(frozen=True, slots=True)
class RateResult:
    allowed: bool
    remaining: int
    retry_after_secs: float
    #: Which key kind refused the call ("identity", "ip"); empty when allowed.
    kind: str = ""


class _Window:
    __slots__ = ("cur", "prev", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.cur = 0
        self.prev = 0


class RateLimiter:
    def __init__(
        self,
        limits: Mapping[str, LimitSpec],
        *,
        clock: Callable[[], float] = time.monotonic,
        gc_interval: float = 60.0,
        ip_factor: float = 10.0,
    ) -> None:
        self.limits = dict(limits)
        self.ip_factor = ip_factor
        self._clock = clock
        self._gc_interval = gc_interval
        self._last_gc = clock()
        self._entries: dict[tuple[str, str, object], _Window] = {}

    def configure(self, limits: Mapping[str, LimitSpec], *, ip_factor: float) -> None:
        """New limits (a configuration reload).  What each key used in its current window
        still counts: a reload does not hand out a fresh allowance."""
        self.limits = dict(limits)
        self.ip_factor = ip_factor

    def __len__(self) -> int:
        return len(self._entries)

    def limit_for(self, group: str) -> LimitSpec | None:
        return self.limits.get(group) or self.limits.get("default")

    def check(self, group: str, kind: str, key: object, cost: int = 1) -> RateResult:
        """Count one call for ``key`` in ``group`` and say whether it is allowed.

        A refused call is not counted, so a client that backs off recovers."""
        return self.check_all(group, [(kind, key)], cost)

    def check_all(
        self, group: str, keys: Sequence[tuple[str, object]], cost: int = 1
    ) -> RateResult:
        """One call counted against every ``(kind, key)`` (e.g. identity and IP) only if all
        of them allow it; otherwise none is charged and the first refusal is returned."""
        spec = self.limit_for(group)
        if spec is None:
            return RateResult(True, 1 << 31, 0.0)
        now = self._clock()
        if now - self._last_gc >= self._gc_interval:
            self._gc(now)
        windows: list[_Window] = []
        remaining = 1 << 31
        for kind, key in keys:
            w, res = self._assess(spec, group, kind, key, cost, now)
            if not res.allowed:
                return res
            windows.append(w)
            remaining = min(remaining, res.remaining)
        for w in windows:
            w.cur += cost
        return RateResult(True, remaining, 0.0)

    def peek(self, group: str, keys: Sequence[tuple[str, object]], cost: int = 1) -> RateResult:
        """Would ``check_all`` allow ``cost`` now?  Counts nothing (for limits charged only
        on failure: refuse early while the failures are over the limit)."""
        spec = self.limit_for(group)
        if spec is None:
            return RateResult(True, 1 << 31, 0.0)
        now = self._clock()
        remaining = 1 << 31
        for kind, key in keys:
            _w, res = self._assess(spec, group, kind, key, cost, now)
            if not res.allowed:
                return res
            remaining = min(remaining, res.remaining)
        return RateResult(True, remaining, 0.0)

    def refund(self, group: str, keys: Sequence[tuple[str, object]], cost: int = 1) -> None:
        """Give back ``cost`` counted earlier for each key (never below zero): a call that
        was admitted and then refused for its size should not count at all."""
        for kind, key in keys:
            w = self._entries.get((group, kind, key))
            if w is not None:
                w.cur = max(0, w.cur - cost)

    def _assess(
        self, spec: LimitSpec, group: str, kind: str, key: object, cost: int, now: float
    ) -> tuple[_Window, RateResult]:
        window = spec.window_secs
        allowed = spec.requests * self.ip_factor if kind == "ip" else spec.requests
        ent_key = (group, kind, key)
        w = self._entries.get(ent_key)
        if w is None:
            w = self._entries[ent_key] = _Window(now)
        elapsed = now - w.start
        if elapsed >= window:
            periods = int(elapsed // window)
            w.prev = w.cur if periods == 1 else 0
            w.cur = 0
            w.start += periods * window
            elapsed = now - w.start
        weight = 1.0 - elapsed / window
        estimate = w.prev * weight + w.cur
        if estimate + cost > allowed:
            # Time until the previous window's share decays enough to admit `cost`.
            if w.prev > 0 and w.cur + cost <= allowed:
                need = (estimate + cost - allowed) / w.prev * window
                retry = min(window - elapsed, need)
            else:
                # After the roll, the current count decays as the new previous window:
                # cur * (1 - t / window) + cost <= requests.
                frac = 1.0 - (allowed - cost) / w.cur if w.cur else 0.0
                retry = (window - elapsed) + window * max(frac, 0.0)
            return w, RateResult(False, 0, max(retry, 0.001), kind)
        return w, RateResult(True, max(0, math.floor(allowed - estimate - cost)), 0.0)

    def _gc(self, now: float) -> None:
        self._last_gc = now
        longest = max((s.window_secs for s in self.limits.values()), default=60.0)
        stale = [k for k, w in self._entries.items() if now - w.start >= 2 * longest]
        for k in stale:
            del self._entries[k]
