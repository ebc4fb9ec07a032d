"""Submitting: a pending row becomes a request id, and is never paid for twice.

The submit loop claims pending jobs while the in-flight cap has room (the claim commits the
intent, 'submitting', before the POST) and starts one submit task per job. Each outcome is
exactly one of: submitted (the request id committed at once), back to pending (certainly not
created: the API unreachable, a refusal every job meets, a 429 after a delay), failed, or
'unknown' (the answer was lost: it may exist, so it is never submitted again). ``SubmitGate``
lets downloads wait for the submits claimed before them.
"""

from __future__ import annotations

import asyncio
import shlex
import time

from .. import constants, crashpoints
from ..errors import (
    APIError,
    InsufficientBalanceError,
    LeaseLost,
    NotFoundError,
    RateLimitError,
    StoreError,
    UsageError,
)
from ..inline import FixedCopyError, InlineBody, prepare_body
from ..retry import Call, Decision, classify
from ..store import CANCELLED, FAILED, IN_QUEUE, PENDING, SUBMITTING, UNKNOWN, Job
from .core import Fatal, RunCore, log
from .events import StopReason

# Most jobs claimed in one store round trip (bounded so one claim never holds the database long).
CLAIM_BATCH = 64


class SubmitGate:
    """Submits go before downloads. Jobs of one wave finish together, and the event loop is then
    the bottleneck: a download's request, file and record done first would hold up the submits
    that refill the slots just freed, which is the provider's time and the batch's makespan
    (measured: 20 ms against 40 ms from a job's finish to the next submit into its slot). So a
    download waits while a claim is in flight or claimed jobs are not yet handed to the client
    (at most SUBMITS_FIRST_MAX); it merely moves a few milliseconds later."""

    def __init__(self) -> None:
        self.claiming = False  # a claim is in flight
        self.unsent: dict[int, Job] = {}  # claimed ('submitting') but not yet handed to the client
        self._waiting: list[asyncio.Future[None]] = []

    def all_sent(self) -> bool:
        """No claim in flight, no claimed job waiting to be handed to the client."""
        return not self.claiming and not self.unsent

    async def wait(self) -> None:
        """Wait until every claimed job is sent (at once if none is)."""
        # A slot freed just now wakes the submit loop: its turn (the claim) comes first.
        await asyncio.sleep(0)
        if self.all_sent():
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._waiting.append(fut)
        backstop = loop.call_later(constants.SUBMITS_FIRST_MAX, _set_done, fut)
        try:
            await fut
        finally:
            backstop.cancel()

    def claimed(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.unsent[job.id] = job

    def sending(self, job: Job) -> None:
        self.unsent.pop(job.id, None)
        self.open_if_sent()

    def open_if_sent(self) -> None:
        if self.all_sent():
            self.open()

    def open(self) -> None:
        """Let every waiting download go."""
        waiting, self._waiting = self._waiting, []
        for fut in waiting:
            _set_done(fut)


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Submitting(RunCore):
    """The submit loop and each submit's outcome (see the module docstring)."""

    gate: SubmitGate  # downloads wait for the submits claimed before them
    _last_tester: float  # when the last tester was sent (time.time())

    async def _submits_first(self) -> None:
        """Downloads call this first (SubmitGate)."""
        await self.gate.wait()

    async def _submit_loop(self) -> None:
        while self._stop_reason is None and not self._stopping.is_set():
            if self.settings.deadline is not None:
                # A job submitted now should finish before the deadline, else it would be left
                # running (and paid for) while nobody downloads it until the next run.
                left = self.settings.deadline - time.time()
                if left <= (self.polls.planner.expected or 0.0):
                    self._end_submitting(StopReason.DEADLINE, "deadline near: no more submits")
                    break
            if self.settings.max_jobs is not None and self._summary.submitted >= self.settings.max_jobs:
                if self._submits:  # one may yet come back unsent (a 429, a missing copy): not counted then
                    self._wake.clear()
                    await self._nap(1.0)
                    continue
                self._end_submitting(StopReason.MAX_JOBS,
                                     f"--max-jobs {self.settings.max_jobs} reached; no more submits")
                break
            if self.budget.waits_for_a_price():
                self._wake.clear()
                await self._nap(0.5)
                continue
            if not self.budget.allows_another():
                if self.budget.unbounded():
                    self._end_submitting(StopReason.BUDGET,
                                         f"--max-cost {self.settings.max_cost:g} USD cannot be kept: a job ended "
                                         "without a cost and the model's price is unknown; no more submits")
                else:
                    self._end_submitting(StopReason.BUDGET, f"--max-cost {self.settings.max_cost:g} USD reached (spent "
                                         f"{self.budget.spent:.2f}, committed {self.budget.committed():.2f})")
                break
            if self._outage.active:
                if self._outage.exhausted():
                    self._give_up_on_outage()
                    break
                if self._outage.wait() > 0:
                    self._wake.clear()
                    await self._nap(min(self._outage.wait(), 1.0))
                    continue
            await self.slots.acquire()
            if self._stop_reason is not None or self._stopping.is_set():
                self.slots.release()
                break
            # Every slot free right now is claimed in one round trip: claiming one job per loop
            # turn made the database the bottleneck of a fast provider. A budget claims one at a
            # time so that each job is checked against it.
            want = 1
            # An outage: one job probes whether the API is back.
            limit = 1 if self.settings.max_cost is not None or self._outage.active else CLAIM_BATCH
            if self.settings.max_jobs is not None:
                limit = min(limit, self.settings.max_jobs - self._summary.submitted)
            while want < limit and self.slots.try_acquire():
                want += 1
            # The claim commits 'submitting' (the intent). Run it as a tracked task so that a
            # cancel landing right after its commit cannot lose the jobs: _drain puts claimed but
            # never-sent jobs back to pending.
            claim = asyncio.create_task(self._claim(want))
            self._track(claim, submit=True)
            self.gate.claiming = True
            try:
                jobs = await asyncio.shield(claim)
            finally:
                self.gate.claiming = False
                self.gate.open_if_sent()  # nothing claimed, else its submits will
            for _ in range(want - len(jobs)):
                self.slots.release()
            if not jobs:
                # Only a submit in flight can put a job back to pending. Whether one is in flight
                # is read before the store is asked: one that ended during that read may have
                # made a job pending that the read did not see.
                submits_in_flight = bool(self._submits)
                when = await self.store.next_pending_at(self._batches)
                if when is None and not submits_in_flight:
                    # Nothing pending, and no submit in flight that could put one back; on a
                    # shared store, no other runner holding jobs this one may have to adopt.
                    if self.lease is None or not await self.lease.others_busy(self._batches):
                        return
                # Wait for a retry delay to pass or a submit to finish (it may return a job).
                # (Another runner's jobs, on a shared store: looked at again sooner, so that the
                # fleet ends together rather than a second after its last job.)
                idle = 1.0 if self.lease is None else self.lease.IDLE_CHECK
                delay = idle if when is None else max(0.0, when - time.time())
                self._wake.clear()
                await self._nap(min(delay, 1.0))
                continue
            if self._outage.active:
                self._outage.probing()
            for job in jobs:
                self._summary.submitted += 1
                self.budget.started(job.id)  # committed from the moment it may be sent
                self._spawn(self._submit(job), submit=True)

    async def _claim(self, n: int) -> list[Job]:
        jobs = await self.store.claim_many(self._batches, time.time(), n)
        self.gate.claimed(jobs)
        for _ in jobs:
            crashpoints.reached("claimed")  # once per job, whatever the size of the claim
        return jobs

    async def _submit(self, job: Job) -> None:
        # Everything that comes before the wire (the files' checks, the rate's token) is done
        # while the job is claimed but unsent: a stop asked meanwhile (Ctrl-C, a deadline) then
        # sends nothing, and _drain puts the job back to pending. Only a request already on its
        # way is let finish, so that its request id is recorded.
        try:
            body: InlineBody | str | None = job.inputs_json
            if job.inputs_json is None or "file://" in job.inputs_json:
                body = await prepare_body(job.inputs, self._file_checks)
        except UsageError as exc:  # a local file changed since it was validated
            self.gate.sending(job)  # settled here, not by _drain
            await asyncio.shield(self._submit_failed(job, exc))
            return
        limiter = self.client.limiter
        if limiter is not None:
            await limiter.take()
        if self._stopping.is_set():
            self._not_sent(job)
            return
        self.gate.sending(job)  # from here on, the request may reach the server
        # A shared store: the mark that the job is on its way (a runner dying from here on
        # leaves it unknown), refused if its batch was cancelled meanwhile: a cancel stops even
        # the jobs waiting for their turn.
        if self.lease is not None:
            try:
                ours = await self.lease.sent(job)
            except LeaseLost as exc:
                # Another runner holds it now (this one was paused past its lease): theirs to
                # send; nothing more goes from here (the stop says why, as for any lost lease).
                self._not_sent(job)
                self._stop_on_error(exc)
                return
            if not ours:
                await asyncio.shield(self._cancelled_unsent(job))
                return
        try:
            sub = await self.client.submit(job.model_id, job.inputs if body is None else body, paced=False)
        except (APIError, UsageError) as exc:
            await asyncio.shield(self._submit_failed(job, exc))
            return
        crashpoints.reached("submit_answered")
        await self._submitted(job, sub.request_id)
        crashpoints.reached("submit_recorded")

    def _not_sent(self, job: Job) -> None:
        """A stop came before ``job`` was sent: it stays claimed-but-unsent (gate.unsent), which
        _drain puts back to pending; nothing of it is spent, and it frees its slot."""
        self._summary.submitted -= 1
        self.budget.finished(job.id, None)
        self.slots.release()

    async def _submitted(self, job: Job, request_id: str) -> None:
        now = time.time()
        self._streak.accepted()
        self._api_answered()
        # The request id is the only handle on a paid job: it is committed even if we are
        # cancelled right now (the next run then follows the job).
        # UNKNOWN too: on a shared store, a runner paused past its lease mid-submit finds its job
        # made unknown by the others; the answer in hand is better than "unknown".
        try:
            await self.store.transition(
                job, IN_QUEUE, expect=(SUBMITTING, UNKNOWN), request_id=request_id, submitted_at=now,
                error=None, error_code=None, not_before=None, detail=f"request {request_id}", shield=True,
            )
        except StoreError as exc:
            # The store cannot take it (a shared store's server gone, a lost lease): the id is
            # then said here, the only place it is left, so that the paid job can be found.
            log.error("job %s was submitted as request %s, which could not be recorded: %s",
                      job.key, request_id, exc)
            raise
        if self.cap.on_success():
            self.slots.changed()
        self._followed[job.id] = job
        self._holding_slot.add(job.id)
        self._emit(IN_QUEUE, job, f"submitted as {request_id}")
        self.polls.enlist(job.id)
        self.polls.sent(job.id, now)
        delay = self.polls.delay(job.id, self.polls.elapsed(job.id, now, now))
        if (not self._testers and self.cap.wants_tester(len(self._holding_slot))
                and (self.cap.growing or now - self._last_tester >= max(
                    constants.AUTO_STEADY_TEST_EVERY, self.polls.planner.expected or 0.0))):
            # It filled the cap: whether it runs at once says whether all of the cap runs.
            self._testers[job.id] = self.cap.value
            self._last_tester = now
            delay = min(delay, constants.AUTO_PROBE_DELAY)
        self._schedule(job, now + delay)

    async def _submit_failed(self, job: Job, exc: BaseException) -> None:
        decision = Decision.FAIL if isinstance(exc, UsageError) else classify(exc, Call.SUBMIT)
        code = getattr(exc, "error_code", None)
        if decision is Decision.UNKNOWN:
            self.budget.left(job.id)  # it may exist, and be paid for
        else:
            self.budget.finished(job.id, None)  # refused, or never sent: nothing to pay
        if decision is Decision.UNREACHABLE:
            if not self._outage.active:
                self._emit("outage", None, f"API unreachable ({exc}): submits wait for it, at most "
                           f"--outage-budget {self.settings.outage_budget:g}s")
            self._outage.failed(str(exc))
        elif isinstance(exc, APIError):
            self._api_answered()  # even if only to refuse
        try:
            if isinstance(exc, FixedCopyError):
                await self._copy_missing(job, exc)
                return
            if decision is Decision.UNREACHABLE:
                await self._unclaim(job, exc, f"API unreachable, waiting for it: {exc}")
                self._emit("retry", job, f"API unreachable ({exc}); waiting for it")
                if self._outage.exhausted():
                    self._give_up_on_outage()
                return
            if decision is Decision.FAIL and await self._refused_like_every_job(job, exc):
                return
            if decision is Decision.RETRY:
                if isinstance(exc, RateLimitError):
                    self._throttled()
                if self.settings.policy.may_resubmit(job.round_attempts):
                    delay = self.settings.policy.delay(job.round_attempts, getattr(exc, "retry_after", None))
                    await self.store.transition(
                        job, PENDING, expect=(SUBMITTING,), not_before=time.time() + delay,
                        error=str(exc), error_code=code,
                        detail=f"submit refused, retry in {delay:.1f}s: {exc}",
                    )
                    self._emit("retry", job, f"submit refused ({exc}); retrying in {delay:.1f}s")
                    self._summary.submitted -= 1  # certainly not created: counts when it is
                    return
                await self.store.transition(
                    job, FAILED, expect=(SUBMITTING,), error=f"{exc} (after {job.round_attempts} attempts)",
                    error_code=code, finished_at=time.time(),
                )
            elif decision is Decision.UNKNOWN:
                await self.store.transition(
                    job, UNKNOWN, expect=(SUBMITTING,), error=str(exc), error_code=code,
                    finished_at=time.time(), detail="submit answer lost; not resubmitted",
                )
            elif decision in (Decision.STOP_SUBMITTING, Decision.FATAL):
                await self._unclaim(job, exc, f"refused: {exc}")
                if decision is Decision.FATAL:
                    self._summary.account_error = str(exc)
                    raise Fatal(str(exc)) from exc
                if isinstance(exc, InsufficientBalanceError):
                    self._summary.account_error = str(exc)
                    self._end_submitting(StopReason.BALANCE, f"{exc}; no more submits, finishing jobs in flight")
                elif isinstance(exc, NotFoundError):  # a bare 404: no such endpoint
                    self._refused_everywhere(
                        f"{exc}: {self.client.base_url} has no endpoint for model "
                        f"'{job.model_id}'; check --api-url (the API's base, ending in /v1: "
                        f"{constants.DEFAULT_API_URL}) and the model id, then run again: the jobs "
                        "are still pending")
                else:  # an unknown model: every job of it would be refused alike
                    self._refused_everywhere(
                        f"{exc}: no job of model '{job.model_id}' can be submitted; check the "
                        "model id (and --api-url), then run again: the jobs are still pending")
                return
            else:
                await self.store.transition(
                    job, FAILED, expect=(SUBMITTING,), error=str(exc), error_code=code,
                    finished_at=time.time(),
                )
            self._finished(job, str(exc))
        finally:
            self.slots.release()

    async def _cancelled_unsent(self, job: Job) -> None:
        """Claimed, never sent, and its batch cancelled since: cancelled, the attempt not counted."""
        self.budget.finished(job.id, None)
        try:
            await self.store.transition(
                job, CANCELLED, expect=(SUBMITTING,), attempts=max(0, job.attempts - 1),
                error="cancelled before submit", detail="cancelled by the user before submit")
            self._summary.submitted -= 1
            self._finished(job, "cancelled by the user before submit")
        finally:
            self.slots.release()

    async def _unclaim(self, job: Job, exc: BaseException, detail: str, was: str = SUBMITTING) -> None:
        """The job was certainly not created and the fault is not its own: back to pending as it
        was, the attempt not counted."""
        await self.store.transition(
            job, PENDING, expect=(was,), attempts=max(0, job.attempts - 1), error=str(exc),
            error_code=getattr(exc, "error_code", None), finished_at=None, detail=detail,
        )
        self._summary.submitted -= 1  # counts when it is created

    async def _copy_missing(self, job: Job, exc: FixedCopyError) -> None:
        """A fixed image copy is gone (fixed/ deleted, say): nothing was sent. The job goes back
        to pending, not failed (a retry would meet the same file), and submits stop (the other
        copies are likely gone too) with the one way out: the manifest run with --fix-images,
        which makes the copy again and gives the pending jobs its file reference."""
        first = self._stop_reason is None
        self._end_submitting(StopReason.REFUSED, "no more submits: an image copy made by --fix-images is "
                             "missing; finishing the jobs already submitted")
        await self._unclaim(job, exc, f"not sent: {exc}")
        if first:
            manifest = next((b.manifest_path for b in await self.store.batches() if b.name == job.batch), None)
            self._summary.stop_message = (
                f"{exc}: batchgen run {shlex.quote(manifest or 'MANIFEST')} --fix-images (with the --upscale or "
                "--fix-ratio it had) makes it again and sends the jobs waiting for it; they are still pending, "
                "nothing of them was sent")

    async def _refused_like_every_job(self, job: Job, exc: BaseException) -> bool:
        """Whether this refusal is one every job meets (retry.RefusalStreak). Then submitting
        stops, and this job, with those of the streak failed meanwhile, goes back to pending for
        a run after the fix. Nothing is awaited before the streak is updated: the jobs it
        holds have their 'failed' write queued already, ahead of the one that undoes it."""
        if self._streak.same(exc):
            await self._unclaim(job, exc, f"refused like the jobs before it: {exc}")
            return True
        if not self._streak.refused(job.id, job, exc):
            return False
        self._refused_everywhere(
            f"the API refused the first {len(self._streak.items)} submits the same way: {exc}; "
            "fix that, then run again: the jobs are still pending")
        for other in list(self._streak.items.values()):
            if other is job:
                await self._unclaim(job, exc, f"refused like the jobs before it: {exc}")
                continue
            await self._unclaim(other, exc, f"refused like the jobs after it: {exc}", was=FAILED)
            left = self._summary.finished.pop(FAILED, 0) - 1
            if left > 0:
                self._summary.finished[FAILED] = left
            self._emit(PENDING, other, "back to pending: every job is refused the same way")
        return True

    def _refused_everywhere(self, message: str) -> None:
        """Stop submitting: ``message`` (what the API refuses, what to do) ends the run's output."""
        if self._stop_reason is None:
            self._summary.stop_message = message
        self._end_submitting(StopReason.REFUSED, "no more submits: the API refuses every job alike; "
                             "finishing the jobs already submitted")

    def _api_answered(self) -> None:
        if self._outage.active:
            self._emit("outage", None, f"API reachable again after {self._outage.lasted():.1f}s")
            self._outage.ended()

    def _give_up_on_outage(self) -> None:
        if self._stop_reason is None:
            self._summary.stop_message = (
                f"the API has been unreachable for {self._outage.lasted():.0f}s, longer than "
                f"--outage-budget {self.settings.outage_budget:g}s ({self._outage.last_error}); the jobs "
                "not submitted are still pending: run again to go on")
        self.stop(StopReason.OUTAGE)
