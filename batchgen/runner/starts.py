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
from dataclasses import dataclass


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
    seen running. With no limit known (no job has waited), every job starts when it was sent."""

    def __init__(self) -> None:
        self.limit: int | None = None  # the account's running limit, when a wait has shown it
        self._jobs: dict[int, _Out] = {}  # in the order sent

    def sent(self, job_id: int, at: float) -> None:
        """A job was sent (its submit answered) at ``at``. Jobs must come in the order sent."""
        self._jobs[job_id] = _Out(at, at)

    def waiting(self, job_id: int, at: float) -> None:
        """The job was seen waiting in the provider's queue at ``at``: it starts later."""
        out = self._jobs.get(job_id)
        if out is not None and out.running_by is None:
            out.after = max(out.after, at)

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
        self._forget_old()
        return None if start is None else max(0.0, end - start)

    def gone(self, job_id: int, at: float) -> None:
        """The job left the provider at ``at`` with nothing learned (failed, cancelled, given up)."""
        out = self._jobs.get(job_id)
        if out is not None and out.end is None:
            out.end = at
            self._forget_old()

    def start(self, job_id: int, run: float | None, now: float | None = None) -> float | None:
        """The job's start (past or expected), each job out taking ``run`` (None: not known yet,
        so the starts of jobs that waited are not known either). ``now``: a job out not seen
        finished frees its slot no earlier than that (for plans; a run time learned leaves it
        out: it would put the start of a job after its own end)."""
        out = self._jobs.get(job_id)
        if out is None:
            return None
        if self.limit is None:
            return min(out.after, out.running_by) if out.running_by is not None else out.after
        slots: list[float] = []  # when each busy slot frees
        for other, o in self._jobs.items():
            start: float | None = o.after
            if len(slots) >= self.limit:
                free = heapq.heappop(slots)
                start = max(o.after, free)
            if o.running_by is not None and start is not None:
                start = min(start, o.running_by)
            if other == job_id:
                return start
            if o.end is not None:
                heapq.heappush(slots, o.end)
            elif run is None:
                return None  # a job ahead has no end known nor expected
            else:
                assert start is not None
                heapq.heappush(slots, start + run if now is None else max(now, start + run))
        return None  # not reached: job_id is among the jobs

    def _forget_old(self) -> None:
        sent_out = [o.sent for o in self._jobs.values() if o.end is None]
        oldest = min(sent_out) if sent_out else float("inf")
        for job_id in [j for j, o in self._jobs.items() if o.end is not None and o.end < oldest]:
            del self._jobs[job_id]

    def __len__(self) -> int:
        return len(self._jobs)
