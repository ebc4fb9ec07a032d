"""The worker pool: ``Runner.run()`` drives a run's parts on one event loop until its work is
done or it is stopped.

- submitting (submitting.py): the submit loop claims pending jobs while the in-flight cap has
  room and starts one submit task per job;
- polling (polling.py, schedule.py): the poll loop starts a short poll task for each job at the
  provider whose planned poll falls due (one plan of next-poll times; no sleeping task per job);
- collecting (collecting.py): a finished job's result is recorded and its outputs downloaded;
- recovery (recovery.py) at the start; cancelling (cancelling.py) while it runs.

Every outcome of every step is sorted into exactly one of: done, retry later (with a delay),
failed, unknown (a submit that may have created a job), or stop (a ``StopReason``). The state
change is committed before the step that follows it, so a run killed at any instant resumes
without submitting anything twice: a job with a request id is polled, a job caught mid-submit
becomes 'unknown'.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp

from .. import constants
from ..client import RunComfyClient
from ..durability import Flusher
from ..errors import StoreError
from ..inline import FileChecks
from ..limits import AdaptiveCap, Budget, Slots, TokenBucket
from ..outputhosts import OutputHosts
from ..retry import Outage, RefusalStreak
from ..store import PENDING, SUBMITTING, Job, Store
from .cancelling import Cancelling
from .collecting import Collecting
from .core import log
from .events import EventSink, RunSummary, StopReason
from .polling import Polling
from .recovery import Recovery
from .schedule import PollSchedule
from .settings import RunSettings
from .submitting import SubmitGate, Submitting


class Runner(Submitting, Polling, Collecting, Recovery, Cancelling):
    """Runs the jobs of some batches to completion (or to a stop). See the module docstring."""

    def __init__(
        self,
        store: Store,
        client: RunComfyClient,
        workdir: Path,
        settings: RunSettings | None = None,
        *,
        download_session: aiohttp.ClientSession | None = None,
        on_event: EventSink | None = None,
        price_estimate: float | None = None,
        api_key: str | None = None,
    ):
        self.store = store
        self.client = client
        self._workdir = os.fspath(workdir)  # a string: joined with names on the hot path
        self.settings = settings or RunSettings()
        self.cap = AdaptiveCap(self.settings.concurrency, auto=self.settings.auto_concurrency)
        self.slots = Slots(self.cap)
        # What the cap last did and why (the panel shows it), and where a learned cap is kept:
        # per model and API (the simulator of a --simulate run is one API whatever its port).
        self.cap_note = ""
        self._api_key = api_key or client.base_url
        # Testers (AdaptiveCap.wants_tester) asked about soon after their submit: job id -> the
        # cap it was submitted under. At most one at a time.
        self._testers = {}
        self._last_tester = 0.0
        # Every API call of the run takes a token first (the client does it in one place); no
        # bucket at all when there is no limit.
        self.client.limiter = TokenBucket(self.settings.rate) if self.settings.rate > 0 else None
        self.polls = PollSchedule(self.settings)
        self.budget = Budget(self.settings.max_cost, price_estimate)
        # Submit failures that are the run's rather than the job's: an API that cannot be
        # reached, a refusal every job meets.
        self._outage = Outage(self.settings.outage_budget, self.settings.policy)
        self._streak = RefusalStreak()
        self._dl_session = download_session
        self._output_hosts = OutputHosts(client.base_url, self.settings.output_hosts)
        # Local files are sent inline; each is checked against what was validated (inline.py).
        self._file_checks = FileChecks()
        self._on_event = on_event
        self._dl_sem = asyncio.Semaphore(max(1, self.settings.download_concurrency))
        # Threads for downloads' blocking file calls (open, fsync, rename): one per download (up
        # to 16), so fsyncs waiting on the disk never queue behind each other (downloads.download).
        self._file_threads = ThreadPoolExecutor(max(1, min(16, self.settings.download_concurrency)),
                                                thread_name_prefix="batchgen-files")
        self._flusher = Flusher(self.store.mark_synced, self._flush_failed, self._file_threads,
                                self.settings.flush_every)
        # Files a flush failed on ({(job id, idx): path}), forgotten once the run's tasks are done.
        self._unflushable = {}
        self._flush_error = None

        self._followed: dict[int, Job] = {}  # jobs at the provider the run polls, by id
        # Jobs holding one of the provider's slots: from their submit until the provider says
        # they are finished (which can be before their result is fetched and recorded).
        self._holding_slot = set()
        self._unreadable = {}
        self._asking = set()
        # Jobs at the provider given up on but still followed ('overdue'): followed, polled at
        # a slow pace, holding no slot, and not keeping the run alive (see Polling._set_aside).
        self._overdue = set()
        self._tasks = set()
        self._submits = set()
        self._timers = set()  # not work: they do not keep the run alive
        self.gate = SubmitGate()
        # Jobs already at the provider when this run started: an earlier run may have fetched
        # their result and kept a broken download's bytes (.part) before it was killed.
        self._from_earlier_run = set()
        self._wake = asyncio.Event()
        self._stop_reason = None
        self._stopping = asyncio.Event()
        self._error = None
        self._summary = RunSummary()
        self._batches = []
        # Batches a `batchgen cancel` asked to stop (read from the store: _cancel_watch), and
        # the jobs at the provider already asked to cancel (once each; then followed as usual).
        self._cancel_batches = set()
        self._cancel_asked = set()

    @property
    def batches(self) -> list[str]:
        return list(self._batches)

    def flush_files(self) -> None:
        """Flush the small files written so far now, in the background, rather than at the next
        tick of ``flush_every`` (a failure stops the run, as at a tick)."""
        self._flusher.flush_soon()

    def close(self) -> None:
        """Release what a runner holds from its creation (its file threads), for one that was
        never run: run() does this itself."""
        self._file_threads.shutdown(wait=True)

    async def run(self, batches: Sequence[str]) -> RunSummary:
        started = time.monotonic()
        self._batches = list(batches)
        own_dl = self._dl_session is None
        if own_dl:
            from ..downloads import make_session

            self._dl_session = make_session(self.settings.download_concurrency, self._output_hosts)
        try:
            models = await self._start_cap()
            await self._resume()
            await self._plan_scouts()
            submit_loop = asyncio.create_task(self._submit_loop(), name="submit-loop")
            submit_loop.add_done_callback(lambda _t: self._wake.set())
            poll_loop = asyncio.create_task(self._poll_loop(), name="poll-loop")
            if self.settings.deadline is not None:
                self._spawn(self._deadline_watch(self.settings.deadline), timer=True)
            self._spawn(self._cancel_watch(), timer=True)
            try:
                await self._wait_until_done(submit_loop)
            finally:
                # Loops also end on _stopping: on Python 3.11 a cancel that races a wait_for
                # timeout can be swallowed, and a loop must not outlive its run.
                self._stopping.set()
                self._wake.set()
                self.slots.close()
                poll_loop.cancel()
                submit_loop.cancel()
                await self._drain(poll_loop, submit_loop)
            if self._error is not None:
                raise self._error
            await self._cancel_done()
            await self._remember_cap(models)
        finally:
            try:
                if own_dl and self._dl_session is not None:
                    await self._dl_session.close()
            finally:
                await asyncio.shield(self._flusher.close())  # a flush under way needs its thread
                await self._forget_unflushable()
            self._file_threads.shutdown(wait=True)  # all tasks are done: nothing is waiting
            self._summary.elapsed = time.monotonic() - started
            self._summary.api_calls = dict(self.client.calls)
        if self._error is not None:  # the last flush, while closing, failed
            raise self._error
        return self._summary

    async def _wait_until_done(self, submit_loop: asyncio.Task[Any]) -> None:
        while True:
            self._wake.clear()
            if self._error is not None:
                return
            # Overdue jobs are followed while there is other work, but not waited for.
            busy = (len(self._followed) > len(self._overdue) or bool(self._tasks - self._timers)
                    or not submit_loop.done())
            if self._stopping.is_set():
                # Prompt exit: only submits on the wire are awaited (their answers must be saved).
                if not self._submits:
                    return
            elif not busy:
                if submit_loop.done() and submit_loop.exception():
                    raise submit_loop.exception()  # type: ignore[misc]
                return
            await self._nap(1.0)

    async def _drain(self, *loops: asyncio.Task[Any]) -> None:
        # Submits in flight finish (their answers get recorded); everything else is cancelled.
        if self._submits:
            await asyncio.gather(*self._submits, return_exceptions=True)
        for job in list(self.gate.unsent.values()):
            # Claimed, never sent: certainly not at the provider, so simply pending again.
            try:
                await self.store.transition(job, PENDING, expect=(SUBMITTING,),
                                            attempts=max(0, job.attempts - 1), detail="claimed but not sent")
            except StoreError as exc:
                # Not ours any more (a shared store gave it to another runner after this one's
                # lease expired): theirs to send; the others are still put back.
                log.warning("job %s left as it is: %s", job.key, exc)
                self._stop_on_error(exc)
            self.gate.unsent.pop(job.id, None)
        self.gate.open()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *loops, return_exceptions=True)

    async def _deadline_watch(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.time()))
        self.stop(StopReason.DEADLINE)

    # ---- the cap and the scouts, set at the start ------------------------------------------------

    async def _start_cap(self) -> list[str]:
        """The models of the run's batches; with --concurrency auto, the cap starts where an
        earlier run left it for them at this API."""
        models = sorted({b.model_id for b in await self.store.batches() if b.name in self._batches})
        if self.cap.auto:
            learned = await self.store.learned_cap(models, self._api_key)
            if learned is not None:
                self.cap.start_at(learned)
                self._tuned(f"cap starts at {self.cap.value}: learned by an earlier run")
        return models

    async def _remember_cap(self, models: list[str]) -> None:
        learned = self.cap.learned()
        if learned is not None and models:
            await self.store.remember_cap(models, self._api_key, *learned)

    async def _plan_scouts(self) -> None:
        """How many scouts (PollSchedule.plan_scouts): by the jobs to do, those resumed included."""
        todo = len(self._followed) + await self.store.pending_at_least(
            self._batches, constants.SCOUTS * constants.SCOUT_JOBS_EACH)
        self.polls.plan_scouts(todo)
