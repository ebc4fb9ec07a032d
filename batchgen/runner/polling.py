"""Asking the provider about each job it holds: the poll of one job (/status, or /result once
it is probably finished), what its answer means, and what to do when no answer comes: ask again
later, give the job up at its timeout (cancelled, or 'overdue': still followed)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import crashpoints
from ..client import FINISHED_STATUSES, Result
from ..errors import APIError, MalformedAnswerError, NotFoundError, RateLimitError
from ..retry import Call, Decision, classify
from ..store import FAILED, IN_PROGRESS, IN_QUEUE, OVERDUE, TIMED_OUT, Job
from .core import Fatal, RunCore

# /result statuses that mean the job is over (anything else, even unknown words, is not trusted
# to mean that: /status decides).
RESULT_FINISHED = ("succeeded", "failed", "cancelled")


class Polling(RunCore):
    """The poll task of one job, and the outcomes of a poll (see schedule.py for when)."""

    _unreadable: dict[int, int]  # answers that could not be read, in a row, by job
    _asking: set[int]  # jobs with a poll (or a write of _started_before) under way

    if TYPE_CHECKING:  # from the other parts of the run
        async def _on_result(self, job: Job, result: Result) -> None: ...
        async def _cancel_at_provider(self, job: Job) -> None: ...

    async def _poll_loop(self) -> None:
        """Start a short poll task for each job whose poll falls due (no sleeping task per job)."""
        # Stopping: no new polls (they are safe to redo next run).
        while not self._stopping.is_set():
            due = self.polls.next_due()
            if due is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            job_id = self.polls.pop_due()
            if job_id is None:
                self._wake.clear()
                await self._nap(due - self.polls.clock())
                continue
            job = self._followed.get(job_id)
            if job is not None:
                self._spawn(self._poll(job))

    def _poll_delay(self, job: Job, elapsed: float) -> float:
        return self.polls.delay(job.id, elapsed)

    async def _poll(self, job: Job) -> None:
        # Marked while it runs: its writes must not race one that _started_before makes.
        self._asking.add(job.id)
        try:
            await self._ask(job)
        finally:
            self._asking.discard(job.id)

    async def _ask(self, job: Job) -> None:
        assert job.request_id is not None
        if job.batch in self._cancel_batches and job.id not in self._cancel_asked:
            # Here rather than in a task of its own: one poll of a job at a time, so no answer
            # about it is recorded over its cancel.
            await self._cancel_at_provider(job)
            return
        rid = job.request_id
        expected = self.polls.planner.expected
        # From its start at the provider (polls.elapsed): a job that waited in its queue runs
        # a whole run time from there, not from its submit.
        elapsed = self.polls.elapsed(job.id, time.time(), job.submitted_at)
        paced = True
        limiter = self.client.limiter
        if expected is None and self.polls.is_scout(job.id) and limiter is not None:
            # A scout's early polls are extras: under --rate they are made only on a spare token
            # (nobody waiting, half the bucket left), so they never hold back a submit or another
            # job's poll. A skipped moment is simply followed by the next.
            if not limiter.try_take(reserve=limiter.burst / 2):
                self._schedule(job, time.time() + self._poll_delay(job, elapsed))
                return
            paced = False
        tester = self._testers.pop(job.id, None)  # asked once, whatever the answer
        try:
            result = None
            if expected is not None and elapsed >= expected:
                # Probably finished: /result gives the outputs of a finished job and the status
                # of an unfinished one, so one call does the work of /status and /result. A 4xx
                # may only mean "not ready" for an unfinished job: /status then decides.
                try:
                    result = await self.client.result(rid)
                except APIError as exc:
                    # Nor does an answer that cannot be read: /status decides.
                    if classify(exc, Call.POLL) is not Decision.FAIL and not isinstance(exc, MalformedAnswerError):
                        raise
                crashpoints.reached("status_answered")
            if result is not None and result.status in RESULT_FINISHED:
                self._tester_answered(tester, "finished", None)
                self._free_slot(job)
                await self._on_result(job, result)
                return
            if result is not None and result.status in (IN_QUEUE, IN_PROGRESS):
                status_now, position = result.status, None
            else:
                # Not expected yet, or /result said something we cannot read as an answer
                # either way: /status is the authority on whether a job has finished.
                status = await self.client.status(rid, paced=paced)
                crashpoints.reached("status_answered")
                if status.finished:
                    self._tester_answered(tester, "finished", None)
                    self._free_slot(job)
                    result = await self.client.result(rid)
                    await self._on_result(job, result)
                    return
                status_now, position = status.status, status.queue_position
        except APIError as exc:
            await self._poll_failed(job, exc)
            return
        self._answered(job)
        self._tester_answered(tester, status_now, position)
        now = time.time()
        if job.id in self._overdue:
            # It stays overdue until it finishes (its state says it was given up on once).
            self._schedule(job, now + self.settings.overdue_poll_interval)
            return
        if status_now == IN_PROGRESS:
            if job.state != IN_PROGRESS:
                await self.store.transition(job, IN_PROGRESS, started_at=now, queue_position=None)
                self._emit(IN_PROGRESS, job)
            await self._started_before(job)
        elif status_now == IN_QUEUE and position is not None and position != job.queue_position:
            await self.store.update_fields(job, queue_position=position)
        if self._past_timeout(job, now):
            await self._time_out(job, f"its last status was {status_now!r}")
            return
        # Seen waiting, it starts later (when a slot frees for it) and is asked once it could
        # be done; seen running, so is every job sent before it.
        self.polls.seen(job.id, status_now, now, position)
        self._schedule(job, now + self._poll_delay(job, self.polls.elapsed(job.id, now, job.submitted_at)))

    async def _started_before(self, running: Job) -> None:
        """The provider says ``running`` runs: every job sent before it that we still count as
        queued has started too (an account's jobs start in the order they were sent, which
        --concurrency auto relies on as well). Most jobs are asked about once, at their expected
        end: without this, jobs that run would show as queued until then. Their start time is
        not known, so none is recorded (timings leave them out). A job whose own poll is under
        way is left to it: that poll's writes, queued first, must not be overwritten by this one.
        The check and the queueing of the write happen with no await between them."""
        if running.submitted_at is None:
            return
        for other in list(self._followed.values()):
            if (other.state == IN_QUEUE and other.submitted_at is not None
                    and other.submitted_at < running.submitted_at and other.id not in self._overdue
                    and other.id not in self._asking):
                self._asking.add(other.id)
                try:
                    await self.store.transition(other, IN_PROGRESS, queue_position=None,
                                                detail=f"started: {running.key}, sent after it, runs")
                finally:
                    self._asking.discard(other.id)
                self._emit(IN_PROGRESS, other, "started (a job sent after it runs)")

    def _answered(self, job: Job) -> None:
        """The provider answered about ``job`` in a way we could read."""
        self.polls.answered(job.id)
        self._unreadable.pop(job.id, None)

    async def _poll_failed(self, job: Job, exc: APIError) -> None:
        decision = classify(exc, Call.POLL)
        if decision is Decision.FATAL:
            self._summary.account_error = str(exc)
            raise Fatal(str(exc)) from exc
        if (decision is Decision.FAIL and isinstance(exc, NotFoundError) and job.submitted_at is not None
                and time.time() - job.submitted_at < self.settings.not_found_grace):
            # A request id handed out a moment ago: the server asked may not know it yet. Ending a
            # paid job on that would lose it; it is believed only after the grace period.
            decision = Decision.RETRY
        if decision is Decision.FAIL:
            await self.store.transition(job, FAILED, error=str(exc),
                                        error_code=getattr(exc, "error_code", None),
                                        finished_at=time.time())
            self._leave_provider(job)
            self._finished(job, str(exc))
            return
        # Transient: poll again later; the job itself is fine at the provider.
        if isinstance(exc, RateLimitError):
            self._throttled()
        if isinstance(exc, MalformedAnswerError) and job.id not in self._overdue:
            unreadable = self._unreadable[job.id] = self._unreadable.get(job.id, 0) + 1
            if unreadable >= self.settings.policy.max_call_retries:
                # Not cancelled: the answer we cannot read may be its result.
                await self._set_aside(job, f"{unreadable} answers in a row about it could not be read "
                                      f"(last: {exc}); still followed: it may still be delivered, and is billed")
                return
        await self._again_later(job, f"poll failed ({exc})", getattr(exc, "retry_after", None))

    async def _again_later(self, job: Job, why: str, retry_after: float | None = None) -> None:
        """Ask about ``job`` again after a growing delay (a poll failed, or /result is not final
        yet), unless it is past its job timeout: then it is given up on (_time_out). An overdue
        job is simply asked again at its slow pace."""
        n = self.polls.failed(job.id)
        now = time.time()
        delay = self.settings.policy.delay(n, retry_after)
        if job.id in self._overdue:
            delay = max(delay, self.settings.overdue_poll_interval)
        elif self._past_timeout(job, now):
            await self._time_out(job, why)
            return
        self._emit("retry", job, f"{why}; again in {delay:.1f}s")
        self._schedule(job, now + delay)

    def _past_timeout(self, job: Job, now: float) -> bool:
        timeout = self.settings.job_timeout
        return (timeout is not None and job.id not in self._overdue
                and now - (job.submitted_at or now) > timeout)

    async def _time_out(self, job: Job, last: str) -> None:
        """``job`` is past its job timeout. Still queued, the provider cancels it: 'timed_out',
        nothing to pay, safe to retry. Otherwise it may still finish and be billed: 'overdue',
        still followed (this run slowly, the next again), so that what it costs is downloaded
        and `retry` does not pay for it twice."""
        assert job.request_id is not None and self.settings.job_timeout is not None
        outcome, status = "not asked", ""
        try:
            answer = await self.client.cancel(job.request_id)
            outcome, status = answer.outcome or "no outcome given", answer.status
        except APIError as exc:
            outcome = f"cancel failed: {exc}"
        why = f"not finished within the job timeout ({span(self.settings.job_timeout)}; {last})"
        if outcome == "cancelled":
            await self.store.transition(job, TIMED_OUT, finished_at=time.time(),
                                        error=f"{why}; cancelled at the provider")
            self._leave_provider(job)
            self._finished(job, job.error or "")
            return
        await self._set_aside(job, f"{why}; not cancelled ({outcome}): still followed, it may still "
                              "be delivered and is billed", soon=status in FINISHED_STATUSES)

    async def _set_aside(self, job: Job, error: str, *, soon: bool = False) -> None:
        """Give up waiting for ``job`` but keep following it: 'overdue'. It frees its slot and no
        longer keeps the run alive; it is polled every overdue_poll_interval while the run has
        other work (``soon``: once at once, it was just said to be finished), by every later run,
        and downloaded by whichever sees it finished."""
        await self.store.transition(job, OVERDUE, error=error)
        self._overdue.add(job.id)
        # It may be billed and may never say what: counted at the estimate from now on, and no
        # longer a job whose cost the run waits for (with no price known, that wait would never end).
        self.budget.left(job.id)
        self._testers.pop(job.id, None)
        self._unreadable.pop(job.id, None)
        self._stop_scouting(job)  # its failures go too
        self._free_slot(job)
        self._emit(OVERDUE, job, error)
        self._schedule(job, time.time() + (0.0 if soon else self.settings.overdue_poll_interval))


def span(seconds: float) -> str:
    """A duration as the options take it: 6h, 30m, 45s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
