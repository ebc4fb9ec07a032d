"""A finished job's result becomes recorded files: the result read (cost, duration learned),
each output downloaded (a fresh URL asked for when one stops working), and the job's success
recorded with its last file."""

from __future__ import annotations

import asyncio
import math
import os
import time
from typing import TYPE_CHECKING

from .. import crashpoints
from ..client import Result
from ..downloads import download
from ..durability import BOOT_ID
from ..errors import APIError, BatchgenError, DownloadError
from ..outputnames import file_name
from ..retry import Call, Decision, classify
from ..store import CANCELLED, DOWNLOADING, FAILED, OUTPUT_LOST, SUCCEEDED, Job, Output
from .core import Fatal, RunCore
from .polling import RESULT_FINISHED


class Collecting(RunCore):
    """Results and downloads (see the module docstring)."""

    if TYPE_CHECKING:  # from the other parts of the run
        async def _again_later(self, job: Job, why: str, retry_after: float | None = None) -> None: ...
        async def _submits_first(self) -> None: ...
        def _answered(self, job: Job) -> None: ...

    async def _on_result(self, job: Job, result: Result) -> None:
        now = time.time()
        if result.status not in RESULT_FINISHED:
            # /status said finished but /result does not say so (not there yet, or a word we do
            # not know): asked again, less and less often, until the job timeout.
            await self._again_later(job, f"/status said finished, /result says {result.status!r}")
            return
        self._answered(job)
        self._observe_duration(job, result, now)
        self.budget.reported(job.id, result.cost)
        self._summary.spent_usd = self.budget.spent
        if result.status == "succeeded" and result.outputs:
            self._leave_provider(job)
            await self._submits_first()
            outputs = [Output(job.id, idx, kind, url, None, None, None)
                       for idx, (kind, url) in enumerate(result.outputs)]
            if len(outputs) == 1 and not self._dl_sem.locked():
                # The usual case: one output and a download slot free. Fetched right here, and
                # recorded with the result and the job's success in one write (a large output,
                # or a failed try, records the result first: see _download_job).
                await self._download_job(job, outputs, unrecorded=(result, now))
                return
            # Every download slot is busy (or several outputs): record the result now (its URLs
            # and cost, the job 'downloading') rather than keep it unrecorded while it waits.
            await self._record_result(job, result.outputs, result.cost, now)
            self._spawn(self._download_job(job, outputs))
            return
        if result.status == "succeeded":
            state, error = FAILED, "the provider reported success but returned no output"
        elif result.status == "cancelled":
            state, error = CANCELLED, result.error or "cancelled at the provider"
        else:
            state, error = FAILED, result.error or "the provider reported the job failed"
        await self.store.transition(job, state, error=error, cost=result.cost, finished_at=now)
        self._leave_provider(job)
        self._finished(job, error)

    def _observe_duration(self, job: Job, result: Result, now: float) -> None:
        seconds = duration_of(result, job.submitted_at, now)
        if seconds is None:
            return
        # Run time, from its start at the provider: a job that waited in its queue was out longer.
        run = self.polls.finished(job.id, (job.submitted_at or now) + seconds, seconds)
        # The first duration known brings forward every poll planned without it.
        if self.polls.observe(run, self._followed.values(), self._overdue):
            self._wake.set()

    async def _record_result(self, job: Job, outputs: list[tuple[str, str]], cost: float | None,
                             finished_at: float | None) -> None:
        await self.store.record_result(job, outputs, cost=cost, finished_at=finished_at)
        crashpoints.reached("result_recorded")
        self._emit(DOWNLOADING, job, f"{len(outputs)} output(s)")

    async def _download_job(
        self, job: Job, outputs: list[Output] | None = None,
        unrecorded: tuple[Result, float] | None = None,
    ) -> None:
        """Download a job's outputs (``outputs``: as just recorded; None: read them from the
        store, as on resume) and mark it succeeded with its last file.

        ``unrecorded``: (result, finished_at) of a one-output result not yet in the store. Its
        file is fetched first, then the result, the file and the success are one write. Nothing
        is lost by a crash meanwhile: the job is still at the provider's in the store, so the
        next run asks /result again (one call; nothing is paid twice). Before a large output
        streams to disk, or when a try fails, the result is recorded first: a long or retried
        download never runs with nothing recorded."""

        async def record() -> None:
            nonlocal unrecorded
            if unrecorded is not None:
                result, finished_at = unrecorded
                unrecorded = None
                await self._record_result(job, result.outputs, result.cost, finished_at)

        async with self._dl_sem:
            if outputs is None:
                outputs = await self.store.outputs(job.id)
            folder = os.path.join(self._workdir, job.batch)  # strings: see downloads.download
            todo = [out for out in outputs
                    if not (out.sha256 is not None and out.path
                            and os.path.exists(os.path.join(self._workdir, out.path)))]
            for n, out in enumerate(todo, 1):
                tries = 0
                while True:
                    name = file_name(job.file_stem, out.idx, out.kind, out.url)
                    dest = os.path.join(folder, name)
                    try:
                        got = await download(
                            self._dl_session, out.url, dest, self._file_threads,  # type: ignore[arg-type]
                            # A fresh result's first try has no partial file to resume, unless
                            # an earlier run was killed between keeping one and recording the
                            # result (then it is resumed, and removed once the file is whole).
                            resume=unrecorded is None or job.id in self._from_earlier_run,
                            before_streaming=record if unrecorded is not None else None,
                            hosts=self._output_hosts, limits=self.settings.download_limits,
                        )
                    except DownloadError as exc:
                        await record()
                        tries += 1
                        decision = classify(exc, Call.DOWNLOAD)
                        if decision is Decision.FAIL or tries > self.settings.policy.max_call_retries:
                            await self._output_lost(job, exc)
                            return
                        # An expired URL, or one failing again and again (a host that moved):
                        # ask /result for a fresh URL before the output is declared lost.
                        if decision is Decision.REFRESH or tries % 3 == 0:
                            url = await self._refresh_url(job, out.idx)
                            if url is None:
                                await self._output_lost(job, exc)
                                return
                            out.url = url or out.url
                        delay = self.settings.policy.delay(tries)
                        self._emit("retry", job, f"download failed ({exc}); again in {delay:.1f}s")
                        await asyncio.sleep(delay)
                        continue
                    crashpoints.reached("download_done")
                    rel = f"{job.batch}/{name}"  # relative to the work directory, as stored
                    boot = None if got.durable else BOOT_ID
                    if unrecorded is not None:
                        result, finished_at = unrecorded
                        out.path, out.size, out.sha256 = rel, got.size, got.sha256
                        await self.store.record_downloaded(job, [out], cost=result.cost,
                                                           finished_at=finished_at, unsynced_boot=boot)
                    else:
                        # The last file and the job's success: one write.
                        await self.store.output_downloaded(out, rel, got.size, got.sha256,
                                                           job_done=job if n == len(todo) else None,
                                                           unsynced_boot=boot)
                    if boot is not None:  # recorded first, so the flush that clears it covers it
                        self._flusher.add((job.id, out.idx), dest)
                    break
            if not todo:
                await self.store.transition(job, SUCCEEDED, expect=(DOWNLOADING,))
            crashpoints.reached("job_succeeded")
            self._finished(job, ", ".join(os.path.join(self._workdir, o.path) for o in outputs if o.path))

    async def _refresh_url(self, job: Job, idx: int) -> str | None:
        """An output URL stopped working: ask /result again for a fresh one before giving up.
        None: the output is gone for good; "": the API could not be asked right now."""
        if not job.request_id:
            return None
        rid = job.request_id
        try:
            result = await self.client.result(rid)
        except APIError as exc:
            decision = classify(exc, Call.POLL)
            if decision is Decision.FATAL:
                raise Fatal(str(exc)) from exc
            if decision is Decision.RETRY:
                return ""  # could not ask now: keep the old URL, the next try asks again
            return None
        if result.status != "succeeded" or idx >= len(result.outputs):
            return None
        await self.store.record_result(job, result.outputs, cost=result.cost, finished_at=job.finished_at)
        return result.outputs[idx][1]

    async def _output_lost(self, job: Job, exc: BatchgenError) -> None:
        await self.store.transition(job, FAILED, error=f"{OUTPUT_LOST}: {exc}")
        self._finished(job, str(exc))


def duration_of(result: Result, submitted_at: float | None, now: float) -> float | None:
    """How long a finished job took, for the poll planner; None: it teaches nothing.

    A job that failed (often at once: a refused input) or was cancelled says nothing of how long
    a job takes; learned, an instant failure would set the expected duration to 0 and every job
    out would be polled every 50 ms. The provider's own timestamps are preferred (ours include
    polling lag), but the job ran within the time since we submitted it (a second's slack:
    timestamps may be whole seconds), so timestamps saying otherwise, or putting the finish
    first, are garbage."""
    if result.status != "succeeded":
        return None
    ours = now - submitted_at if submitted_at else None
    if result.created_at is not None and result.finished_at is not None:
        seconds = result.finished_at - result.created_at
        if 0 <= seconds <= (math.inf if ours is None else ours + 1.0):
            return seconds
    return ours
