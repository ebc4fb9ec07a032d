"""Carrying out a `batchgen cancel` given while a run holds the work directory."""

from __future__ import annotations

import asyncio
import time

from .. import constants
from ..errors import APIError
from ..store import CANCELLED, PENDING, Job
from .core import RunCore
from .events import StopReason


class Cancelling(RunCore):
    """The cancel requests of the run's batches: read from the store now and then, carried out
    at the provider job by job (each at its next poll), cleared once done."""

    async def _cancel_watch(self) -> None:
        """Carry out a `batchgen cancel` given while this run holds the work directory: it is
        recorded in the store (Store.request_cancel), where claims already skip the batch; here
        jobs put back to pending meanwhile are cancelled too, and each job of the batch at the
        provider is asked to cancel at its next poll, brought forward to now."""
        while not self._stopping.is_set():
            wanted = await self.store.cancel_requests(self._batches)
            if wanted:
                new = set(wanted) - self._cancel_batches
                self._cancel_batches |= new
                for job in await self._cancel_pending(list(wanted)):
                    self._finished(job, "cancelled by the user before submit")
                if new:
                    self._emit("stop", None, f"cancel requested for {', '.join(sorted(new))}: no more "
                               "submits there; its queued jobs are cancelled at the provider")
                    # _schedule makes their next poll due now (the cancel)
                    self._bring_forward(lambda j: 0.0 if j.batch in self._cancel_batches else None)
                    if self._cancel_batches >= set(self._batches):
                        self._end_submitting(StopReason.CANCELLED, "every batch of this run was cancelled")
            await asyncio.sleep(constants.CANCEL_CHECK_EVERY)

    async def _cancel_pending(self, batches: list[str]) -> list[Job]:
        """Jobs of cancelled ``batches`` that are pending (put back by a refused submit after the
        cancel): cancelled, never submitted."""
        jobs = await self.store.jobs(batches, [PENDING])
        if jobs:
            await self.store.cancel_pending(batches)
            for job in jobs:
                job.state = CANCELLED
        return jobs

    async def _cancel_done(self) -> None:
        """At the end of the run: the cancel requests carried out are cleared, so that the next
        run of those batches (a `retry --cancelled`, a grown manifest) submits again. A request
        whose batch still has a job at the provider not yet asked (the run was stopped first)
        stays, for the next run."""
        if not self._cancel_batches:
            return
        await self._cancel_pending(sorted(self._cancel_batches))
        left = {j.batch for j in self._followed.values() if j.id not in self._cancel_asked}
        done = sorted(self._cancel_batches - left)
        if self.lease is not None:
            # A shared store: the last runner at a batch clears its request, not the first to
            # end, or the others would go on sending the jobs they had claimed.
            done = [b for b in done if not await self.lease.others_busy([b])]
        if done:
            await self.store.clear_cancel(done, carried_out=True)

    async def _cancel_at_provider(self, job: Job) -> None:
        """Ask the provider to cancel ``job`` (its batch was cancelled). Cancelled: it leaves
        the run; otherwise (already running, an error) it is followed to its end as usual."""
        assert job.request_id is not None
        self._cancel_asked.add(job.id)
        try:
            answer = await self.client.cancel(job.request_id)
            outcome = answer.outcome or "no outcome given"
        except APIError as exc:
            outcome = f"cancel failed: {exc}"
        if outcome == "cancelled":
            await self.store.transition(job, CANCELLED, detail="cancelled by the user",
                                        error="cancelled by the user", finished_at=time.time())
            self._leave_provider(job)
            self._finished(job, "cancelled at the provider")
            return
        self._emit("note", job, f"not cancelled ({outcome}): still followed")
        self._schedule(job, time.time())
