"""When each job out started at the provider, or will: the provider starts an account's jobs in
the order they were sent, at most its limit at once, each the moment a slot frees.

A job's poll is planned from its start, not its submit: a job that waited in the provider's queue
first takes longer than a job's run time from its submit, and asked at its submit plus the run
time it is asked again and again until it finishes (five to eight calls a job, measured). And the
run time learned from a finished job is counted from its start, or the planner learns the
queue's wait with it. Pure and synchronous: times are the caller's clock (``time.time()`` in a
run), ends on that clock too (the provider's own finish, shifted by its clock's offset).
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass

# Sightings (a job seen waiting) kept to tell the account's limit: the latest few.
SIGHTINGS = 16
# Most jobs kept: past it the oldest finished are forgotten even while an older job is still out
# (one job stuck for hours would otherwise keep every job finished since, and each plan reads
# them all).
KEEP = 1024


@dataclass
class _Out:
    sent: float  # when its submit was answered
    after: float  # it starts no earlier than this: sent, or when it was last seen waiting
    running_by: float | None = None  # it was seen running (or a job sent after it was) by then
    end: float | None = None  # when it finished (None: not yet known)


class Starts:
    """The jobs of a run in the order they were sent, what was seen of each, and the start of
    each as the provider's rule gives it: job by job in that order, each starts at the earliest
    of the ``limit`` slots to free (a slot frees at its job's known end, or at its start plus
    ``run`` while it is out), not before it was sent or last seen waiting, and not after it was
    seen running. With no limit known (no job has waited), every job starts when it was sent.

    The limit is told by the jobs seen waiting: one seen waiting at position p at time t had
    the account full, so the limit is the jobs sent before it and out at t, less the p - 1 of
    them waiting ahead of it. Counted again whenever asked, with the ends known by then: a job
    that had ended unseen at t counts at first, and no longer once its end is known (the cap's
    own reading, taken at the moment, cannot be corrected so)."""

    def __init__(self) -> None:
        self._jobs: dict[int, _Out] = {}  # in the order sent
        # (when, job id, position): seen waiting (position None: not said)
        self._waits: deque[tuple[float, int, int | None]] = deque(maxlen=SIGHTINGS)
        self._limit: int | None = None  # the last one told (kept when its sightings are gone)
        self._stale = False  # a sighting or an end came since the limit was last counted
        self._forgotten_end = float("-inf")  # the latest end of a job forgotten

    def sent(self, job_id: int, at: float) -> None:
        """A job was sent (its submit answered) at ``at``. Jobs must come in the order sent."""
        self._jobs[job_id] = _Out(at, at)

    def waiting(self, job_id: int, at: float, position: int | None = None) -> None:
        """The job was seen waiting in the provider's queue at ``at`` (``position``: 1 is next
        to start): it starts later, and the account was full."""
        out = self._jobs.get(job_id)
        if out is not None and out.running_by is None:
            out.after = max(out.after, at)
            self._waits.append((at, job_id, position))
            self._stale = True

    @property
    def limit(self) -> int | None:
        """The account's running limit as the jobs seen waiting tell it (None: none has waited)."""
        if not self._stale:
            return self._limit
        self._stale = False
        told = None
        for at, job_id, position in self._waits:
            if job_id not in self._jobs or at < self._forgotten_end:
                continue  # a job out with it then may be forgotten: it would not be counted
            out_ahead = 0
            for other, o in self._jobs.items():
                if other == job_id:
                    break
                if o.sent <= at and (o.end is None or o.end > at):
                    out_ahead += 1
            limit = max(1, out_ahead - max(0, (position or 1) - 1))
            told = limit if told is None else min(told, limit)
        if told is not None:
            self._limit = told
        return self._limit

    def running(self, job_id: int, at: float) -> None:
        """The job was seen running at ``at``; so was every job sent before it (started in order)."""
        if job_id not in self._jobs:
            return
        for other, out in self._jobs.items():
            if out.running_by is None or out.running_by > at:
                out.running_by = at
            if other == job_id:
                break

    def finished(self, job_id: int, end: float, run: float | None) -> float | None:
        """The job finished at ``end``: its run time (None: its start is not known). Jobs that
        ended before every job still out was sent are forgotten (they held no slot any later)."""
        out = self._jobs.get(job_id)
        if out is None:
            return None
        start = self.start(job_id, run)
        out.end = end
        self._stale = True
        self._forget_old()
        return None if start is None else max(0.0, end - start)

    def gone(self, job_id: int, at: float) -> None:
        """The job left the provider at ``at`` with nothing learned (failed, cancelled, given up)."""
        out = self._jobs.get(job_id)
        if out is not None and out.end is None:
            out.end = at
            self._stale = True
            self._forget_old()

    def start(self, job_id: int, run: float | None, now: float | None = None) -> float | None:
        """The job's start (past or expected), each job out taking ``run`` (None: not known yet,
        so the starts of jobs that waited are not known either). ``now``: a job out not seen
        finished frees its slot no earlier than that (for plans; a run time learned leaves it
        out: it would put the start of a job after its own end)."""
        out = self._jobs.get(job_id)
        if out is None:
            return None
        if self.limit is None:  # every job starts when sent (or last seen waiting)
            return out.after if out.running_by is None else min(out.after, out.running_by)
        return self.starts(run, now, until=job_id).get(job_id)

    def starts(self, run: float | None, now: float | None = None, until: int | None = None) -> dict[int, float]:
        """The start of every job known (see start), in one pass; up to ``until`` if given. A
        job whose start is not known is left out (and so is every job after it)."""
        limit = self.limit
        found: dict[int, float] = {}
        slots: list[float] = []  # when each busy slot frees
        for job_id, o in self._jobs.items():
            start = o.after
            if limit is not None and len(slots) >= limit:
                start = max(start, heapq.heappop(slots))
            if o.running_by is not None:
                start = min(start, o.running_by)
            found[job_id] = start
            if job_id == until:
                break
            if limit is None:
                continue
            if o.end is not None:
                heapq.heappush(slots, o.end)
            elif run is None:
                break  # a job ahead has no end known nor expected
            else:
                heapq.heappush(slots, start + run if now is None else max(now, start + run))
        return found

    def _oldest_out(self) -> float:
        """When the oldest job still out was sent (infinity: none is out)."""
        return min((o.sent for o in self._jobs.values() if o.end is None), default=float("inf"))

    def _forget_old(self) -> None:
        oldest = self._oldest_out()
        old = [j for j, o in self._jobs.items() if o.end is not None and o.end < oldest]
        ended = [j for j, o in self._jobs.items() if o.end is not None]
        for job_id in set(old) | set(ended[:max(0, len(self._jobs) - KEEP)]):
            end = self._jobs.pop(job_id).end
            assert end is not None
            self._forgotten_end = max(self._forgotten_end, end)

    def __len__(self) -> int:
        return len(self._jobs)
