"""Limits on what the runner does: the in-flight cap (fixed or found: ``AdaptiveCap``), the
slots it drives, the request rate (``TokenBucket``), and the money a run may commit (``Budget``)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from . import constants as C


@dataclass(frozen=True)
class Move:
    """A decision of the cap, worded for the log and the panel (``after == before``: held)."""

    before: int
    after: int
    why: str

    def __str__(self) -> str:
        if self.after == self.before:
            return f"cap held at {self.after}: {self.why}"
        return f"cap {self.before} -> {self.after}: {self.why}"


def headroom(limit: int) -> int:
    """Jobs kept waiting at the provider beyond its ``limit``: enough that a slot it frees starts
    the next job at once (we notice a finish only at our next poll), few enough that its queue
    stays short. A quarter of the limit (AUTO_HEADROOM_DIVISOR), at least one."""
    return max(1, -(-limit // C.AUTO_HEADROOM_DIVISOR))


class AdaptiveCap:
    """How many jobs may be in flight at the provider. A pure rule: the runner reports what it
    sees, each call returns the ``Move`` it made (or None), and ``value`` is the cap.

    Fixed (``--concurrency N``): starts at N, halves on a 429 (throttles within ``cooldown``
    seconds of the last decrease count once: one burst is one signal), and grows back by one per
    cap accepted submits (additive increase, multiplicative decrease, as TCP does); never above N.

    Auto (``--concurrency auto[:N]``, ``auto=True``): RunComfy publishes no limit per account, so
    it is found. The runner asks about one *tester* job soon after its submit: a job that filled
    the cap. If it is already running (``on_start``), the whole cap is running: the cap grows, by
    half while no job has ever waited (a slow start), by one after. If it waits in the provider's
    queue at ``position`` (``on_wait``), the account runs ``in_flight - position`` jobs: that is
    its limit, and the cap becomes it plus a small ``headroom`` (never raised by a wait). A 429
    halves it as above. Never above ``maximum`` (the ceiling) nor under ``minimum``.
    """

    def __init__(self, maximum: int, minimum: int = 1, cooldown: float = 2.0,
                 clock: Callable[[], float] | None = None, *, auto: bool = False,
                 start: int | None = None):
        self.maximum = max(1, maximum)
        self.minimum = max(1, min(minimum, self.maximum))
        self.auto = auto
        self._value = float(self.maximum)
        self.cooldown = cooldown
        self._clock = clock or time.monotonic
        self._last_decrease = float("-inf")
        self.growing = auto  # the slow start: until a job waits or the provider throttles
        self.limit: int | None = None  # the account's limit, as last seen from a waiting job
        self.proven = 0  # the largest cap seen wholly running at once
        self._held = False  # the last move was a hold (said once, not at every tester)
        if auto:
            self.start_at(start or C.AUTO_START)

    @property
    def value(self) -> int:
        return int(self._value)

    def start_at(self, start: int) -> None:
        """Auto: begin at ``start`` (a cap learned by an earlier run), within the bounds."""
        self._value = float(min(self.maximum, max(self.minimum, start)))

    def _move(self, before: int, why: str) -> Move | None:
        self._held = False
        return Move(before, self.value, why) if self.value != before else None

    def on_success(self) -> Move | None:
        """A submit was accepted. Fixed: grow back towards the maximum, by one every cap of them.
        Auto: no sign of room at the provider; only ``on_start`` grows the cap."""
        if self.auto:
            return None
        before = self.value
        self._value = min(float(self.maximum), self._value + 1.0 / max(1.0, self._value))
        return self._move(before, "submits accepted again")

    def on_throttle(self) -> Move | None:
        """The provider answered 429: halve the cap (once per burst)."""
        now = self._clock()
        if now - self._last_decrease < self.cooldown:
            return None
        self._last_decrease = now
        self.growing = False
        before = self.value
        self._value = max(float(self.minimum), self._value / 2)
        return self._move(before, "429")

    def wants_tester(self, in_flight: int) -> bool:
        """Auto: whether a job just submitted, with ``in_flight`` jobs out (itself included), is
        worth asking about at once: it filled the cap, so its start says whether all of it runs."""
        return self.auto and in_flight >= self.value

    def on_start(self, cap_at_submit: int, in_flight: int) -> Move | None:
        """Auto: a tester submitted under cap ``cap_at_submit`` was running (or done) at its first
        look, and ``in_flight`` jobs are out now. Grows the cap only if that is the current cap,
        and it is in use (a cap that is not filled proves nothing)."""
        if not self.auto:
            return None
        self.proven = max(self.proven, cap_at_submit)
        before = self.value
        if cap_at_submit < before or in_flight < before or before >= self.maximum:
            return None
        grown = math.ceil(before * C.AUTO_SLOW_START) if self.growing else before + 1
        self._value = float(min(self.maximum, max(before + 1, grown)))
        if self.limit is not None:  # the whole cap ran: the account's limit is at least that
            self.limit = max(self.limit, before)
        return self._move(before, "jobs start at once")

    def on_wait(self, position: int | None, in_flight: int) -> Move | None:
        """Auto: a tester was waiting in the provider's queue at ``position`` (1: next to start;
        None: not said, so at least itself), with ``in_flight`` jobs out. The provider is full,
        so it runs the others: its limit. Others at most: some of ours may have finished without
        our knowing yet, so each such reading is an upper bound, and the least since the cap last
        grew is kept. The cap comes down to it plus the headroom; it is never raised here."""
        if not self.auto:
            return None
        waiting = max(1, position or 1)
        seen = max(self.minimum, in_flight - waiting)
        limit = self.limit = seen if self.limit is None else min(self.limit, seen)
        self.growing = False
        before = self.value
        target = min(self.maximum, max(self.minimum, limit + headroom(limit)))
        what = f"{waiting} job{'s' if waiting != 1 else ''} waiting at the provider"
        if target < before:
            self._value = float(target)
            return self._move(before, what)
        if self._held:
            return None
        self._held = True
        return Move(before, before, what)

    def learned(self) -> tuple[int, bool] | None:
        """Auto: the cap worth starting the next run at, and whether it is settled (the account's
        limit was seen, so it replaces what was learned before; otherwise only the largest cap
        seen running, which may be below the limit, so it only ever raises it). Fixed: None."""
        if not self.auto:
            return None
        if self.limit is not None:
            # The limit plus its headroom, not the cap of the moment: in a steady run it goes a
            # job or two above that whenever the queue ran dry, and comes back at the next wait.
            return min(self.value, self.limit + headroom(self.limit)), True
        if self._last_decrease > float("-inf"):
            return self.value, True
        return (self.proven, False) if self.proven else None


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

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate)
        self._clock = clock  # injected by tests, which then assert no wall time
        self._sleep = sleep
        self._tokens = self.burst
        self._stamp = clock()
        self._lock = asyncio.Lock()

    @property
    def tokens(self) -> float:
        """Tokens in the bucket as of the last take (negative: owed by callers waiting)."""
        return self._tokens

    async def take(self) -> None:
        if self.rate <= 0:
            return
        async with self._lock:
            self._refill()
            self._tokens -= 1.0
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
            if wait > 0:
                # Sleep holding the lock: the next caller's wait starts after ours, keeping order.
                await self._sleep(wait)

    def try_take(self, reserve: float = 0.0) -> bool:
        """Take a token now if one is spare: nobody is waiting for one, and ``reserve`` tokens
        stay in the bucket after it. For requests that may be skipped (they are never queued)."""
        if self.rate <= 0:
            return True
        if self._lock.locked():
            return False
        self._refill()
        if self._tokens - 1.0 < reserve:
            return False
        self._tokens -= 1.0
        return True

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now


class Budget:
    """Money committed by this run: costs reported for finished jobs, plus an estimate for each
    job sent whose cost is not known: still out, or gone without reporting one (a submit whose
    answer was lost, a job timed out). The estimate is the model's base price when known, else
    the largest cost reported so far. With neither, nothing bounds what a job costs, so only one
    job may be out at a time until one reports its cost (``waits_for_a_price``)."""

    def __init__(self, limit: float | None, estimate: float | None):
        self.limit = limit
        self.estimate = estimate
        self.spent = 0.0
        self._open: set[int] = set()
        self._unreported = 0  # jobs that may have cost something and will never say what

    def started(self, job_id: int) -> None:
        self._open.add(job_id)

    def finished(self, job_id: int, cost: float | None) -> None:
        """The job's cost is known (None: it certainly cost nothing, e.g. a refused submit)."""
        self._open.discard(job_id)
        if cost is not None:
            self.spent += cost
            if cost > 0:  # a failed job's 0 says nothing of the price of one that succeeds
                self.estimate = max(self.estimate or 0.0, cost)

    def reported(self, job_id: int, cost: float | None) -> None:
        """The provider ended the job: its cost if the answer gave one (None: not said, or not
        readable), which is then counted at the estimate, never as free."""
        if cost is None:
            self.left(job_id)
        else:
            self.finished(job_id, cost)

    def left(self, job_id: int) -> None:
        """The job is no longer followed and reported no cost (see the class docstring)."""
        if job_id in self._open:
            self._open.discard(job_id)
            self._unreported += 1

    def committed(self) -> float:
        return self.spent + (len(self._open) + self._unreported) * (self.estimate or 0.0)

    def unbounded(self) -> bool:
        """A job may have cost something nobody can say (no cost reported, no price known): from
        then on no sum stays under the cap for sure, so a capped run sends nothing more."""
        return self.limit is not None and self.estimate is None and self._unreported > 0

    def waits_for_a_price(self) -> bool:
        return self.limit is not None and self.estimate is None and bool(self._open)

    def allows_another(self) -> bool:
        if self.limit is None:
            return True
        if self.unbounded():
            return False
        return self.committed() + (self.estimate or 0.0) <= self.limit + 1e-9
