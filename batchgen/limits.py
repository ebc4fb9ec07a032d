"""Limits on what the runner does at once: the adaptive in-flight cap and the request rate."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable


class AdaptiveCap:
    """How many jobs may be in flight at the provider; lowered when it throttles, raised slowly.

    Additive increase, multiplicative decrease (as TCP does): each success adds 1/cap, so the cap
    grows by one per cap successes; a throttle halves it. Throttles within ``cooldown`` seconds of
    the last decrease count once, since one burst of 429s is one signal, not many.
    The cap never exceeds ``maximum`` (the user's --concurrency) nor goes under ``minimum``.
    """

    def __init__(self, maximum: int, minimum: int = 1, cooldown: float = 2.0,
                 clock: Callable[[], float] | None = None):
        self.maximum = max(1, maximum)
        self.minimum = max(1, min(minimum, self.maximum))
        self._value = float(self.maximum)
        self.cooldown = cooldown
        self._clock = clock or time.monotonic
        self._last_decrease = float("-inf")

    @property
    def value(self) -> int:
        return int(self._value)

    def on_success(self) -> bool:
        """Register a success; return True when it raised the cap (by one, every cap successes)."""
        before = int(self._value)
        self._value = min(float(self.maximum), self._value + 1.0 / max(1.0, self._value))
        return int(self._value) != before

    def on_throttle(self) -> bool:
        """Register a throttle; return True when it lowered the cap."""
        now = self._clock()
        if now - self._last_decrease < self.cooldown:
            return False
        self._last_decrease = now
        lowered = max(float(self.minimum), self._value / 2)
        changed = int(lowered) != int(self._value)
        self._value = lowered
        return changed


class Slots:
    """A counting limit whose size can change while tasks wait (the adaptive cap drives it).

    Only ``acquire`` waits; giving a slot back or moving the cap is a plain call that wakes the
    waiters (one event loop, so no lock is needed: nothing runs between a check and its update).
    """

    def __init__(self, cap: AdaptiveCap):
        self.cap = cap
        self.used = 0
        self.closed = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Take a slot; after close() returns at once (the caller checks and gives it back)."""
        while self.used >= self.cap.value and not self.closed:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):  # not a waiter any more (if still listed)
                    self._waiters.remove(waiter)
                raise
        self.used += 1

    def close(self) -> None:
        self.closed = True
        self.changed()

    def try_acquire(self) -> bool:
        if self.used < self.cap.value:
            self.used += 1
            return True
        return False

    def release(self) -> None:
        self.used = max(0, self.used - 1)
        self.changed()

    def changed(self) -> None:
        """Wake the waiters (a slot came free, or the cap moved); each checks again."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    @property
    def free(self) -> int:
        return max(0, self.cap.value - self.used)


class TokenBucket:
    """At most ``rate`` requests per second on average, bursts up to ``burst``; rate 0 = no limit.

    Callers await ``take()`` before each API request. Waiters are served in arrival order because
    each reserves its token under the lock before sleeping.
    """

    def __init__(self, rate: float, burst: float | None = None):
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            if wait > 0:
                # Sleep holding the lock: the next caller's wait starts after ours, keeping order.
                await asyncio.sleep(wait)

    def try_take(self, reserve: float = 0.0) -> bool:
        """Take a token now if one is spare: nobody is waiting for one, and ``reserve`` tokens
        stay in the bucket after it. For requests that may be skipped (they are never queued)."""
        if self.rate <= 0:
            return True
        if self._lock.locked():
            return False
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens - 1.0 < reserve:
            return False
        self._tokens -= 1.0
        return True
