"""When to ask about each job at the provider next.

``PollPlanner`` learns how long jobs take and says how long to wait before the next poll of one
job. ``PollSchedule`` holds the run's plan: one heap entry per job (its next poll), the scouts
polled early while no duration is known, and the polls that failed in a row. Both are
synchronous and read time only through an injected clock, so they are tested without a run.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Container, Iterable

from .. import constants
from ..store import Job
from .settings import RunSettings
from .starts import Starts

# Run times known before the late polls' least step halves (PollPlanner.next_delay).
FEW_DURATIONS = 5


class PollPlanner:
    """When to poll a job next: learns how long jobs take and polls just after the expected finish.

    Before any job has finished it polls on a growing interval (first_delay, then a quarter of
    the time the job has been out, within [min, max]), except for the first SCOUTS jobs out,
    polled from 10 ms on, a quarter more each time, each scout offset from the others (see
    scout_delay): they cost a few hundred calls per run and notice the first finish within a few
    percent of its duration, instead of within a quarter (PollSchedule.replan then brings
    forward every job waiting for its first poll). Once it knows the median time the provider
    takes (its own created_at -> finished_at, so our polling lag does not inflate it), it polls a
    hair after that moment, then, if the job is late, at the middle of the longer times seen
    (see next_delay). Times are counted from each job's start at the provider (PollSchedule's
    ``starts``), not its submit: a job that waited in the queue takes no longer to run. Polls from the
    expected finish on go to /result (see polling.Polling._poll): most jobs then cost one call,
    and a finished job waits milliseconds, not seconds, for us to notice (which is what keeps a
    provider slot busy).
    """

    def __init__(self, settings: RunSettings, window: int = 50):
        self.settings = settings
        self._durations: deque[float] = deque(maxlen=window)
        self._sorted: list[float] = []  # the same durations in order: a median costs a lookup
        # The median, kept up to date by observe(): it is read on every poll and submit.
        self.expected: float | None = None

    def observe(self, seconds: float) -> None:
        if seconds < 0:
            return
        if len(self._durations) == self._durations.maxlen:
            del self._sorted[bisect.bisect_left(self._sorted, self._durations[0])]
        self._durations.append(seconds)
        bisect.insort(self._sorted, seconds)
        n = len(self._sorted)
        mid = self._sorted[n // 2]
        self.expected = mid if n % 2 else (self._sorted[n // 2 - 1] + mid) / 2

    @staticmethod
    def scout_phase(slot: int) -> float:
        """The phase of scout number ``slot``: the SCOUTS phases spread evenly over [0, 1)."""
        return slot / constants.SCOUTS

    def scout_delay(self, elapsed: float, phase: float = 0.0,
                    first: float = constants.SCOUT_FIRST_POLL) -> float:
        """Next poll of a scout, while no duration is known: the first moment after ``elapsed``
        of ``first`` × SCOUT_GROWTH^(k + phase), k = 0, 1, ... Moments, not intervals
        from the last answer: each answer's round trip would otherwise push the scouts' polls
        together, and it is their being spread that makes them notice a finish promptly."""
        growth = math.log(constants.SCOUT_GROWTH)
        k = 0 if elapsed < first else math.floor(math.log(elapsed / first) / growth - phase) + 1
        target = first * math.exp((k + phase) * growth)
        if target <= elapsed:  # rounding in the log picked the moment we are at: the next one
            target = first * math.exp((k + 1 + phase) * growth)
        return min(self.settings.max_poll_interval, max(0.0, target - elapsed))

    def next_delay(self, elapsed: float) -> float:
        expected = self.expected
        lo, hi = self.settings.min_poll_interval, self.settings.max_poll_interval
        if expected is None:
            if elapsed <= 0:
                return self.settings.first_poll_delay
            # A quarter more each time: a few more polls of the first jobs, in exchange for
            # noticing the first finishes (which teach the expected duration) promptly.
            return min(hi, max(lo, elapsed / 4))
        if elapsed <= 0 or elapsed < expected:
            # elapsed <= 0: the first poll of a job just submitted, even when jobs are so quick
            # that the expected duration is 0 (the "late" interval below is for a job that
            # was asked about and had not finished).
            return self.until_expected(elapsed)
        # Late: at the middle of the run times seen that are longer than this one has run so
        # far, so each poll finds about half of the late jobs done (times spread by ±20% cost
        # two polls or so past the median, not one per twentieth); past all of them, after half
        # the lateness. Never sooner than a twentieth of the expected time, or a tenth while
        # fewer than FEW_DURATIONS are known: the first known are the first finished, the
        # shortest of their wave, so the others are late by as much as the spread.
        longer = self._sorted[bisect.bisect_right(self._sorted, elapsed):]
        step = longer[len(longer) // 2] - elapsed if longer else (elapsed - expected) / 2
        least = expected * (0.1 if len(self._sorted) < FEW_DURATIONS else 0.05)
        return min(hi, max(0.05, least, step))

    def until_expected(self, elapsed: float) -> float:
        """Delay until a hair after the expected finish of a job out for ``elapsed`` seconds (0
        if that is past): its first poll once a duration is known. Needs ``expected``."""
        assert self.expected is not None
        # Our submitted_at is taken when the answer arrives, after the provider's clock started,
        # so a job of exactly the expected duration is done by then: the margin only absorbs jitter.
        margin = max(constants.POLL_MARGIN_MIN, self.expected * 0.002)
        return min(self.settings.max_poll_interval, max(0.0, self.expected - elapsed) + margin)


class PollSchedule:
    """The run's plan of polls: the next poll of each job at the provider (a heap with one entry
    per job: a second entry would start a second chain of polls), which jobs are scouts, and how
    many polls of each failed in a row (a job waiting out a backoff or a Retry-After is never
    brought forward). Times are ``clock()`` seconds (wall time in a run)."""

    def __init__(self, settings: RunSettings, clock: Callable[[], float] = time.time,
                 planner: PollPlanner | None = None):
        self.settings = settings
        self.clock = clock
        self.planner = planner or PollPlanner(settings)
        self._heap: list[tuple[float, int, int]] = []  # (due, tiebreak, job id)
        self._tiebreak = itertools.count()
        # The jobs polled early while no duration is known: job id -> their slot (0..count-1),
        # which sets their phase (PollPlanner.scout_delay). How many, and from when, depends on
        # how many jobs the run has (plan_scouts).
        self._scouts: dict[int, int] = {}
        self._scout_count = constants.SCOUTS
        self._scout_first = constants.SCOUT_FIRST_POLL
        self._failures: dict[int, int] = {}  # job id -> polls failed in a row
        # When each job started at the provider, or will (a job waits in its queue first when
        # the account runs fewer than we send): polls are planned from there.
        self.starts = Starts()

    # ---- the plan ------------------------------------------------------------------------------

    def plan(self, job_id: int, due: float) -> None:
        """Poll ``job_id`` at ``due``. Called once per answer: the entry before it was popped."""
        heapq.heappush(self._heap, (due, next(self._tiebreak), job_id))

    def next_due(self) -> float | None:
        """When the earliest planned poll falls due (None: nothing planned)."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self) -> int | None:
        """The job whose poll is due now, taken off the plan (None: none is due yet)."""
        if not self._heap or self._heap[0][0] > self.clock():
            return None
        return heapq.heappop(self._heap)[2]

    def planned(self) -> dict[int, float]:
        """Every planned poll: job id -> when."""
        return {job_id: due for due, _, job_id in self._heap}

    def bring_forward(self, due: Callable[[int], float | None]) -> None:
        """Move planned polls earlier, to ``due(job id)`` where that is earlier (None: leave it),
        in place: the heap keeps one entry per job."""
        heap = []
        for when, tiebreak, job_id in self._heap:
            new = due(job_id)
            heap.append((when if new is None else min(when, new), tiebreak, job_id))
        heapq.heapify(heap)
        self._heap = heap

    # ---- starts at the provider -----------------------------------------------------------------

    def sent(self, job_id: int, at: float) -> None:
        """The job's submit was answered at ``at`` (jobs in the order they were sent)."""
        self.starts.sent(job_id, at)

    def seen(self, job_id: int, status: str, at: float, position: int | None = None) -> None:
        """A poll found the job waiting ('in_queue', at ``position`` if said) or running
        ('in_progress') at ``at``."""
        if status == "in_queue":
            self.starts.waiting(job_id, at, position)
        elif status == "in_progress":
            self.starts.running(job_id, at)

    def elapsed(self, job_id: int, now: float, submitted_at: float | None) -> float:
        """How long the job has been running at ``now`` (negative: it starts that much later),
        as far as the provider's queue can be told; from its submit if the job is not known."""
        start = self.starts.start(job_id, self.planner.expected, now)
        if start is None:
            start = submitted_at if submitted_at is not None else now
        return now - start

    def finished(self, job_id: int, end: float, seconds: float) -> float:
        """The job finished at ``end`` (``seconds`` after its submit): how long it ran, from its
        start when that is known (a job that waited ran for less than it was out)."""
        run = self.starts.finished(job_id, end, self.planner.expected)
        return seconds if run is None else min(seconds, run)

    # ---- how long to wait ------------------------------------------------------------------------

    def delay(self, job_id: int, elapsed: float) -> float:
        """How long until the next poll of a job out for ``elapsed`` seconds: the scout's early
        schedule while no duration is known, the planner's otherwise. While scouts are out, the
        other jobs wait for the duration they will teach (replan brings their polls forward),
        asked only now and then in case the scouts are slower than they are: at
        max_poll_interval, then at twice the time they have been out."""
        slot = self._scouts.get(job_id)
        if self.planner.expected is None:
            if slot is not None:
                return self.planner.scout_delay(elapsed, slot / self._scout_count, self._scout_first)
            if self._scouts:
                return max(self.settings.max_poll_interval, elapsed)
        return self.planner.next_delay(elapsed)

    def observe(self, seconds: float, jobs: Iterable[Job], skip: Container[int]) -> bool:
        """A job took ``seconds``. If that is the first duration known, every poll planned
        without it is brought forward (replan) for ``jobs`` (those at the provider) but ``skip``;
        otherwise the polls of jobs waiting behind it may be (refit). True: polls may have
        moved earlier."""
        first = self.planner.expected is None
        self.planner.observe(seconds)
        if first and self.planner.expected is not None:
            self.replan(jobs, skip)
            return True
        return self.refit(skip)

    def refit(self, skip: Container[int]) -> bool:
        """A job finished: the jobs waiting behind it at the provider start when it ended, which
        may be sooner than planned. Each poll planned later than its job's expected end (from its
        start now) comes forward to it; a job already past its expected end keeps its plan (its
        late polls). Only once the account's limit is known: before, every job starts at its
        submit, which no finish moves."""
        expected = self.planner.expected
        if expected is None or self.starts.limit is None:
            return False
        now = self.clock()
        starts = self.starts.starts(expected, now)

        def due(job_id: int) -> float | None:
            start = starts.get(job_id)
            if start is None or job_id in self._failures or job_id in skip or now - start >= expected:
                return None
            return now + self.planner.until_expected(now - start)

        self.bring_forward(due)
        return True

    def replan(self, jobs: Iterable[Job], skip: Container[int]) -> None:
        """The first duration is known: bring forward every poll planned without it (the first
        polls were planned a whole first_poll_delay out), to just after each job's expected end,
        which for jobs out longer than that is now: the first wave finishes together, and each
        of its jobs is probably done once one is seen done. Not a job waiting out a backoff or a
        Retry-After on purpose, nor one in ``skip`` (overdue)."""
        now = self.clock()
        submitted = {job.id: job.submitted_at for job in jobs}

        def due(job_id: int) -> float | None:
            if job_id not in submitted or job_id in self._failures or job_id in skip:
                return None
            return now + self.planner.until_expected(self.elapsed(job_id, now, submitted[job_id]))

        self.bring_forward(due)

    # ---- scouts ----------------------------------------------------------------------------------

    def plan_scouts(self, todo: int) -> None:
        """Scouts cost calls, and are worth them for a first wave of many jobs, not for a few: one
        per SCOUT_JOBS_EACH jobs to do (at least one), and a scout alone starts at
        SCOUT_ALONE_FIRST_POLL. Scouts enlisted before (resumed jobs) beyond the count leave."""
        self._scout_count = max(1, min(constants.SCOUTS, todo // constants.SCOUT_JOBS_EACH))
        if self._scout_count == 1:
            self._scout_first = constants.SCOUT_ALONE_FIRST_POLL
        for job_id, slot in list(self._scouts.items()):
            if slot >= self._scout_count:
                del self._scouts[job_id]

    @property
    def scouts(self) -> dict[int, int]:
        """The scouts: job id -> slot (a copy)."""
        return dict(self._scouts)

    def is_scout(self, job_id: int) -> bool:
        return job_id in self._scouts

    def enlist(self, job_id: int) -> None:
        """Make the job a scout if no duration is known yet and a scout's slot is free."""
        if self.planner.expected is None and len(self._scouts) < self._scout_count:
            self._scouts[job_id] = min(set(range(self._scout_count)) - set(self._scouts.values()))

    def drop(self, job_id: int, jobs: Iterable[Job], skip: Container[int]) -> None:
        """The job leaves the provider, or is given up on. A scout leaving without teaching a
        duration (failed at once, timed out) hands its slot to the first of ``jobs`` not
        scouting yet, nor waiting out a backoff, nor in ``skip`` (overdue)."""
        self._failures.pop(job_id, None)
        self.starts.gone(job_id, self.clock())
        if self._scouts.pop(job_id, None) is None or self.planner.expected is not None:
            return
        heir = next((j for j in jobs if j.id not in self._scouts and j.id not in self._failures
                     and j.id not in skip), None)
        if heir is not None:
            self.enlist(heir.id)
            now = self.clock()
            due = now + self.delay(heir.id, self.elapsed(heir.id, now, heir.submitted_at))
            self.bring_forward(lambda job_id: due if job_id == heir.id else None)

    # ---- failed polls ----------------------------------------------------------------------------

    def failed(self, job_id: int) -> int:
        """A poll of the job failed: how many have in a row now."""
        n = self._failures[job_id] = self._failures.get(job_id, 0) + 1
        return n

    def answered(self, job_id: int) -> None:
        """The provider answered about the job: its run of failures is over."""
        self._failures.pop(job_id, None)

    def failures(self, job_id: int) -> int:
        return self._failures.get(job_id, 0)
