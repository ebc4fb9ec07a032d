"""The worker pool: submit pending jobs, poll them, fetch results, download outputs, resume.

One ``Runner.run()`` drives three kinds of work on one event loop:

- the submit loop claims pending jobs (the claim commits the intent, state 'submitting') while the
  in-flight cap has room, and starts one submit task per job;
- the poll scheduler keeps a heap of next-poll times, one entry per job at the provider, and starts
  a short poll task for each entry that falls due (no sleeping task per job);
- download tasks fetch every output of a finished job, then mark it succeeded.

Every outcome of every step is sorted into exactly one of: done, retry later (with a delay),
failed, unknown (a submit that may have created a job), or stop (account trouble). The state
change is committed before the step that follows it, so a run killed at any instant resumes
without submitting anything twice: a job with a request id is polled, a job caught mid-submit
becomes 'unknown'.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import itertools
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from . import constants as C
from . import crashpoints
from . import store as S
from .client import FINISHED_STATUSES, Result, RunComfyClient
from .downloads import DownloadLimits, download, output_name
from .durability import BOOT_ID, Flusher, file_intact
from .errors import (
    APIError,
    BatchgenError,
    DownloadError,
    InsufficientBalanceError,
    MalformedAnswerError,
    NotFoundError,
    RateLimitError,
    StoreError,
    UsageError,
)
from .inline import FileChecks, prepare_body
from .limits import AdaptiveCap, Slots, TokenBucket
from .outputhosts import OutputHosts
from .retry import Call, Decision, Outage, RefusalStreak, RetryPolicy, classify
from .store import Job, Output, Store

log = logging.getLogger(__name__)

# /result statuses that mean the job is over (anything else, even unknown words, is not trusted
# to mean that: /status decides).
_RESULT_FINISHED = ("succeeded", "failed", "cancelled")

# Most jobs claimed in one store round trip (bounded so one claim never holds the database long).
_CLAIM_BATCH = 64

EventSink = Callable[["Event"], None]


@dataclass
class RunSettings:
    # Fixed: the cap on jobs in flight. Auto (auto_concurrency): the ceiling of the cap found.
    concurrency: int = C.DEFAULT_CONCURRENCY
    auto_concurrency: bool = False
    download_concurrency: int = C.DEFAULT_DOWNLOAD_CONCURRENCY
    rate: float = C.DEFAULT_RATE
    max_jobs: int | None = None  # submissions this run may start
    max_cost: float | None = None  # USD this run may commit to (actual costs + estimates in flight)
    deadline: float | None = None  # wall-clock time.time() at which the run stops
    # Seconds from submit before a job is given up on (cancelled, or else overdue); None: never.
    job_timeout: float | None = C.DEFAULT_JOB_TIMEOUT
    overdue_poll_interval: float = C.OVERDUE_POLL_INTERVAL
    not_found_grace: float = C.NOT_FOUND_GRACE  # seconds after submit a 404001 is not believed
    outage_budget: float = C.OUTAGE_BUDGET  # seconds the API may stay unreachable before the run stops
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    first_poll_delay: float = C.FIRST_POLL_DELAY
    min_poll_interval: float = C.MIN_POLL_INTERVAL
    max_poll_interval: float = C.MAX_POLL_INTERVAL
    flush_every: float = C.FLUSH_EVERY  # seconds between flushes of small files (durability.py)
    output_hosts: tuple[str, ...] = ()  # allowed besides RunComfy's and the API's (outputhosts.py)
    download_limits: DownloadLimits = field(default_factory=DownloadLimits)


@dataclass(frozen=True)
class Event:
    """Something worth telling the user: a job changed state, or the run did something."""

    # A job state, or 'cap' (a 429 lowered the cap), 'tune' (--concurrency auto moved or held it),
    # 'stop', 'retry', 'note', 'outage' (the API unreachable, or back).
    kind: str
    job: Job | None
    message: str = ""


@dataclass
class RunSummary:
    submitted: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # terminal state -> count, this run
    # 'interrupted', 'deadline', 'max_jobs', 'budget', 'balance', 'refused', 'outage', 'error', None
    stop_reason: str | None = None
    account_error: str | None = None
    # For a stop the user must act on ('refused', 'outage'): what happened and what to do, one line.
    stop_message: str | None = None
    elapsed: float = 0.0
    api_calls: dict[str, int] = field(default_factory=dict)
    spent_usd: float = 0.0  # costs the API reported for jobs finished in this run


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


class PollPlanner:
    """When to poll a job next: learns how long jobs take and polls just after the expected finish.

    Before any job has finished it polls on a growing interval (first_delay, then a quarter of
    the time the job has been out, within [min, max]), except for the first SCOUTS jobs out,
    polled from 10 ms on, a quarter more each time, each scout offset from the others (see
    scout_delay): they cost a few hundred calls per run and notice the first finish within a few
    percent of its duration, instead of within a quarter (Runner then re-plans every job waiting
    for its first poll). Once it knows the median time the provider takes
    (its own created_at -> finished_at, so our polling lag does not inflate it), it polls a hair
    after that moment, then, if the job is late, every twentieth of it. Polls from the expected
    finish on go to /result (see Runner._poll): most jobs then cost one call, and a finished job
    waits milliseconds, not seconds, for us to notice (which is what keeps a provider slot busy).
    """

    def __init__(self, settings: RunSettings, window: int = 50):
        self.s = settings
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
        return slot / C.SCOUTS

    def scout_delay(self, elapsed: float, phase: float = 0.0, first: float = C.SCOUT_FIRST_POLL) -> float:
        """Next poll of a scout, while no duration is known: the first moment after ``elapsed``
        of ``first`` × SCOUT_GROWTH^(k + phase), k = 0, 1, ... Moments, not intervals
        from the last answer: each answer's round trip would otherwise push the scouts' polls
        together, and it is their being spread that makes them notice a finish promptly."""
        growth = math.log(C.SCOUT_GROWTH)
        k = 0 if elapsed < first else math.floor(math.log(elapsed / first) / growth - phase) + 1
        target = first * math.exp((k + phase) * growth)
        if target <= elapsed:  # rounding in the log picked the moment we are at: the next one
            target = first * math.exp((k + 1 + phase) * growth)
        return min(self.s.max_poll_interval, max(0.0, target - elapsed))

    def next_delay(self, elapsed: float) -> float:
        expected = self.expected
        lo, hi = self.s.min_poll_interval, self.s.max_poll_interval
        if expected is None:
            if elapsed <= 0:
                return self.s.first_poll_delay
            # A quarter more each time: a few more polls of the first jobs, in exchange for
            # noticing the first finishes (which teach the expected duration) promptly.
            return min(hi, max(lo, elapsed / 4))
        if elapsed <= 0 or elapsed < expected:
            # elapsed <= 0: the first poll of a job just submitted, even when jobs are so quick
            # that the expected duration is 0 (the "late" interval below is for a job that
            # was asked about and had not finished).
            return self.until_expected(elapsed)
        # Late: every twentieth of the expected time, or half the lateness once that is more. A
        # job far past the usual time most likely waited in the provider's queue first (it
        # then runs a whole job's time from some moment we cannot see): asking it every
        # twentieth would cost twenty calls per job's time of waiting.
        return min(hi, max(0.05, expected * 0.05, (elapsed - expected) / 2))

    @property
    def shortest(self) -> float | None:
        """The shortest time a job took, of those observed: the least a job still waiting in
        the provider's queue has yet to take."""
        return self._sorted[0] if self._sorted else None

    def until_expected(self, elapsed: float) -> float:
        """Delay until a hair after the expected finish of a job out for ``elapsed`` seconds (0
        if that is past): its first poll once a duration is known. Needs ``expected``."""
        assert self.expected is not None
        # Our submitted_at is taken when the answer arrives, after the provider's clock started,
        # so a job of exactly the expected duration is done by then: the margin only absorbs jitter.
        margin = max(C.POLL_MARGIN_MIN, self.expected * 0.002)
        return min(self.s.max_poll_interval, max(0.0, self.expected - elapsed) + margin)


class _Fatal(Exception):
    """Internal: an account error that ends the run."""


class Runner:
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
        self.s = settings or RunSettings()
        self.cap = AdaptiveCap(self.s.concurrency, auto=self.s.auto_concurrency)
        self.slots = Slots(self.cap)
        # What the cap last did and why (the panel shows it), and where a learned cap is kept:
        # per model and API (the simulator of a --simulate run is one API whatever its port).
        self.cap_note = ""
        self._api_key = api_key or client.base_url
        # Testers (AdaptiveCap.wants_tester) asked about soon after their submit: job id -> the
        # cap it was submitted under. At most one at a time.
        self._testers: dict[int, int] = {}
        self._last_tester = 0.0  # when the last one was sent (time.time())
        # Every API call of the run takes a token first (the client does it in one place); no
        # bucket at all when there is no limit.
        self.client.limiter = TokenBucket(self.s.rate) if self.s.rate > 0 else None
        self.planner = PollPlanner(self.s)
        self.budget = Budget(self.s.max_cost, price_estimate)
        # Submit failures that are the run's rather than the job's: an API that cannot be
        # reached, a refusal every job meets.
        self._outage = Outage(self.s.outage_budget, self.s.policy)
        self._streak: RefusalStreak[Job] = RefusalStreak()
        self._dl_session = download_session
        self._output_hosts = OutputHosts(client.base_url, self.s.output_hosts)
        # Local files are sent inline; each is checked against what was validated (inline.py).
        self._file_checks = FileChecks()
        self._on_event = on_event
        self._dl_sem = asyncio.Semaphore(max(1, self.s.download_concurrency))
        # Threads for downloads' blocking file calls (open, fsync, rename): one per download (up
        # to 16), so fsyncs waiting on the disk never queue behind each other (downloads.download).
        self._file_threads = ThreadPoolExecutor(max(1, min(16, self.s.download_concurrency)),
                                                thread_name_prefix="batchgen-files")
        self._flusher = Flusher(self.store.mark_synced, self._flush_failed, self._file_threads,
                                self.s.flush_every)
        # Files a flush failed on ({(job id, idx): path}), forgotten once the run's tasks are done.
        self._unflushable: dict[tuple[int, int], str] = {}
        self._flush_error: StoreError | None = None

        self._heap: list[tuple[float, int, int]] = []  # (due, tiebreak, job id)
        self._tiebreak = itertools.count()
        self._remote: dict[int, Job] = {}  # jobs at the provider, by id
        # The jobs polled early while no duration is known, by id: their slot (0..scouts-1),
        # which sets their phase (PollPlanner.scout_delay). How many, and from when, depends on
        # how many jobs the run has (_plan_scouts).
        self._scouts: dict[int, int] = {}
        self._scout_count = C.SCOUTS
        self._scout_first = C.SCOUT_FIRST_POLL
        # Jobs holding one of the provider's slots: from their submit until the provider says
        # they are finished (which can be before their result is fetched and recorded).
        self._holding: set[int] = set()
        self._poll_failures: dict[int, int] = {}
        # Answers that could not be read, in a row, by job: so many and the job is put aside.
        self._unreadable: dict[int, int] = {}
        # Jobs at the provider given up on but still followed ('overdue'): in _remote, polled at a
        # slow pace, holding no slot, and not keeping the run alive (see _set_aside).
        self._overdue: set[int] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._submits: set[asyncio.Task[Any]] = set()
        self._timers: set[asyncio.Task[Any]] = set()  # not work: they do not keep the run alive
        self._unsent: dict[int, Job] = {}  # claimed ('submitting') but not yet handed to the client
        # Submits go before downloads (_submits_first): a claim in flight, and the downloads
        # waiting for it and its jobs' submits to be on their way.
        self._claiming = False
        self._after_submits: list[asyncio.Future[None]] = []
        # Jobs already at the provider when this run started: an earlier run may have fetched
        # their result and kept a broken download's bytes (.part) before it was killed.
        self._from_earlier_run: set[int] = set()
        self._wake = asyncio.Event()
        # Why submitting ended (max_jobs, balance, deadline, interrupted, error), and whether the
        # run should also stop following jobs now (an interrupt) rather than finish them.
        self._stop_submitting: str | None = None
        self._exit_now = False
        self._closing = False
        self._fatal: BaseException | None = None
        self._summary = RunSummary()
        self._batches: list[str] = []
        # Batches a `batchgen cancel` asked to stop (read from the store: _cancel_watch), and
        # the jobs at the provider already asked to cancel (once each; then followed as usual).
        self._cancel_batches: set[str] = set()
        self._cancel_asked: set[int] = set()

    @property
    def batches(self) -> list[str]:
        return list(self._batches)

    # ---- public --------------------------------------------------------------------------------

    def stop(self, reason: str = "interrupted") -> None:
        """Stop taking new work (Ctrl-C, SIGTERM, a deadline). Submits already on the wire are
        allowed to finish so their request ids are recorded; polls and downloads stop at once
        (both are safe to redo next run)."""
        if not self._exit_now:
            self._exit_now = True
            self._stop_submitting = reason
            self._summary.stop_reason = reason
            self._emit("stop", None, f"stopping: {reason}")
        self._wake.set()

    def _end_submitting(self, reason: str, message: str) -> None:
        """No more submits (a budget, the balance), but jobs in flight are followed to the end."""
        if self._stop_submitting is None:
            self._stop_submitting = reason
            self._summary.stop_reason = reason
            self._emit("stop", None, message)
        self._wake.set()

    async def run(self, batches: Sequence[str]) -> RunSummary:
        started = time.monotonic()
        self._batches = list(batches)
        own_dl = self._dl_session is None
        if own_dl:
            from .downloads import make_session

            self._dl_session = make_session(self.s.download_concurrency, self._output_hosts)
        try:
            models = await self._start_cap()
            await self._resume()
            await self._plan_scouts()
            submit_loop = asyncio.create_task(self._submit_loop(), name="submit-loop")
            submit_loop.add_done_callback(lambda _t: self._wake.set())
            poll_loop = asyncio.create_task(self._poll_loop(), name="poll-loop")
            if self.s.deadline is not None:
                self._spawn(self._deadline_watch(self.s.deadline), timer=True)
            self._spawn(self._cancel_watch(), timer=True)
            try:
                await self._wait_until_done(submit_loop)
            finally:
                # Loops also check _closing: on Python 3.11 a cancel that races a wait_for
                # timeout can be swallowed, and a loop must not outlive its run.
                self._closing = True
                self._wake.set()
                self.slots.close()
                poll_loop.cancel()
                submit_loop.cancel()
                await self._drain(poll_loop, submit_loop)
            if self._fatal is not None:
                raise self._fatal
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
        if self._fatal is not None:  # the last flush, while closing, failed
            raise self._fatal
        return self._summary

    # ---- lifecycle -----------------------------------------------------------------------------

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

    def _tuned(self, note: str) -> None:
        self.cap_note = note
        self._emit("tune", None, note)

    async def _plan_scouts(self) -> None:
        """Scouts (PollPlanner.scout_delay) cost calls, and are worth them for a first wave of
        many jobs, not for a few: one per SCOUT_JOBS_EACH jobs to do (at least one), and a scout
        alone starts at SCOUT_ALONE_FIRST_POLL."""
        todo = len(self._remote) + await self.store.pending_at_least(
            self._batches, C.SCOUTS * C.SCOUT_JOBS_EACH)
        self._scout_count = max(1, min(C.SCOUTS, todo // C.SCOUT_JOBS_EACH))
        if self._scout_count == 1:
            self._scout_first = C.SCOUT_ALONE_FIRST_POLL
        # Jobs resumed from an earlier run were enlisted before this was known.
        for job_id, slot in list(self._scouts.items()):
            if slot >= self._scout_count:
                del self._scouts[job_id]

    async def _resume(self) -> None:
        """Pick up where an earlier run stopped."""
        for job in await self.store.recover_interrupted(self._batches):
            self._finished(job, "submit interrupted by an earlier run; outcome unknown")
        now = time.time()
        for job in await self.store.jobs(self._batches, S.FOLLOWED):
            if job.state == S.OVERDUE:
                # Given up on by an earlier run, but it may still be delivered: asked at once (the
                # run waits for that answer), then at the slow pace while the run has other work.
                self._remote[job.id] = job
                self._overdue.add(job.id)
                self._from_earlier_run.add(job.id)
                self._spawn(self._poll(job))
                continue
            # Already at the provider: it holds one of the provider's slots until it finishes.
            self.slots.used += 1
            self._holding.add(job.id)
            self._remote[job.id] = job
            self._from_earlier_run.add(job.id)
            self._enlist_scout(job)
            self._schedule(job, now)
        await self._check_unflushed()
        for job in await self.store.jobs(self._batches, [S.DOWNLOADING]):
            self._spawn(self._download_job(job))

    async def _check_unflushed(self) -> None:
        """Outputs recorded before their files were flushed (durability.py), in every batch of
        the store, not only this run's. Under this boot the page cache still holds them (an
        earlier run was killed, or ended before its next flush): each file that is still there,
        at its size, is flushed, in the background. Under an earlier boot the machine went down
        first, so each file is checked against its size and sha256. A file that is gone or
        damaged is forgotten: its job goes back to downloading (this run downloads it if the job
        is in one of its batches; nothing is resubmitted)."""
        unflushed = await self.store.unsynced_outputs()
        if not unflushed:
            return
        paths = [os.path.join(self._workdir, out.path or "") for _job, out, _boot in unflushed]
        fine = await asyncio.get_running_loop().run_in_executor(self._file_threads, lambda: [
            file_intact(path, out.size, out.sha256, digest=boot != BOOT_ID)
            for path, (_job, out, boot) in zip(paths, unflushed, strict=True)])
        checked, lost = [], []
        for path, (job, out, boot), ok in zip(paths, unflushed, fine, strict=True):
            if not ok:
                lost.append((job.id, out.idx))
            elif boot == BOOT_ID:
                self._flusher.add((job.id, out.idx), path)
            else:
                checked.append((job.id, out.idx))
        self._flusher.flush_soon()  # while the run goes on; its end waits for it
        if checked:
            await self.store.mark_synced(checked)
        if lost:
            await self._forget_outputs(lost, "was missing or damaged (the machine restarted before "
                                       "it reached the disk, or it was removed); downloading it again")
            self._emit("note", None, f"{len(lost)} output file(s) missing or damaged since they were "
                       "written, before they reached the disk: their jobs are downloading again")

    async def _forget_outputs(self, keys: list[tuple[int, int]], why: str) -> None:
        """Forget the files of outputs (job id, idx): one write per job, read afresh (a job with
        several such outputs must not be moved twice)."""
        by_job: dict[int, list[int]] = {}
        for job_id, idx in keys:
            by_job.setdefault(job_id, []).append(idx)
        for job_id, idxs in by_job.items():
            job = await self.store.job(job_id)
            await self.store.output_lost(job, idxs, f"output {', '.join(map(str, idxs))} {why}")

    async def _flush_failed(self, files: dict[tuple[int, int], str], exc: Exception) -> None:
        """The disk refused to flush these files. They may never reach it, and Linux reports such
        an error only once (a later flush would look fine), so they must not be trusted: the run
        stops (every further file would go to the same disk), and once every task is done their
        outputs are forgotten, to be downloaded again (_forget_unflushable). Not here: a download
        still running could meanwhile record a job's last output and call the job succeeded."""
        self._unflushable.update(files)
        if self._flush_error is None:
            self._flush_error = StoreError(f"cannot flush downloaded files to disk: {exc}")
        if self._fatal is None:
            self._fatal = self._flush_error
        self.stop("error")

    async def _forget_unflushable(self) -> None:
        if not self._unflushable:
            return
        files, self._unflushable = self._unflushable, {}
        err = self._flush_error
        assert err is not None
        try:
            await self._forget_outputs(list(files), "could not be flushed to disk; downloading it again")
            what = f"{len(files)} output file(s) will be downloaded again by the next run"
        except Exception as exc:  # noqa: BLE001 - the store is likely on the same failing disk
            # The files keep this boot's marks, which a run under this boot trusts if the files
            # are there at their size: remove them, so that it fetches them again instead.
            for path in files.values():
                with contextlib.suppress(OSError):
                    os.unlink(path)
            what = (f"recording that failed too ({exc}); their {len(files)} file(s) were removed, "
                    "so the next run downloads them again")
        # The same exception object, whichever path raises it (it may be on its way already).
        err.args = (f"{err.args[0]} ({what})",)
        if self._fatal is not err:  # another error stopped the run first and is the one raised
            log.error("%s", err)

    async def _wait_until_done(self, submit_loop: asyncio.Task[Any]) -> None:
        while True:
            self._wake.clear()
            if self._fatal is not None:
                return
            # Overdue jobs are followed while there is other work, but not waited for.
            busy = (len(self._remote) > len(self._overdue) or bool(self._tasks - self._timers)
                    or not submit_loop.done())
            if self._exit_now:
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
        for job in list(self._unsent.values()):
            # Claimed, never sent: certainly not at the provider, so simply pending again.
            await self.store.transition(job, S.PENDING, expect=(S.SUBMITTING,),
                                        attempts=max(0, job.attempts - 1), detail="claimed but not sent")
            self._unsent.pop(job.id, None)
        self._let_downloads_go()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *loops, return_exceptions=True)

    async def _nap(self, seconds: float) -> None:
        """Sleep until woken or ``seconds`` pass. asyncio.wait, unlike wait_for on 3.11, never
        swallows a cancellation that races the timeout."""
        waiter = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({waiter}, timeout=max(0.0, seconds))
        finally:
            waiter.cancel()

    def _spawn(
        self, coro: Coroutine[Any, Any, Any], *, submit: bool = False, timer: bool = False
    ) -> None:
        self._track(asyncio.create_task(coro), submit=submit, timer=timer)

    def _track(self, task: asyncio.Task[Any], *, submit: bool = False, timer: bool = False) -> None:
        self._tasks.add(task)
        if submit:
            self._submits.add(task)
        if timer:
            self._timers.add(task)
        task.add_done_callback(self._reap)

    def _reap(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._submits.discard(task)
        self._timers.discard(task)
        self._wake.set()
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        if isinstance(exc, _Fatal):
            self._fatal = exc.__cause__ or exc
        elif self._fatal is None:
            # A bug or a store failure: stop the run rather than go on with a store we cannot trust.
            # The run raises it, and the CLI reports it in one line: here only for -vv.
            log.debug("internal error in a runner task", exc_info=exc)
            self._fatal = exc
        self.stop("error")

    def _emit(self, kind: str, job: Job | None, message: str = "") -> None:
        if job is not None:
            log.info("%s %s %s", job.key, kind, message)
        elif message:
            log.info("%s", message)
        if self._on_event is not None:
            self._on_event(Event(kind, job, message))

    def _finished(self, job: Job, message: str = "") -> None:
        self._summary.finished[job.state] = self._summary.finished.get(job.state, 0) + 1
        self._emit(job.state, job, message)

    # ---- submitting ----------------------------------------------------------------------------

    async def _cancel_watch(self) -> None:
        """Carry out a `batchgen cancel` given while this run holds the work directory: it is
        recorded in the store (Store.request_cancel), where claims already skip the batch; here
        jobs put back to pending meanwhile are cancelled too, and each job of the batch at the
        provider is asked to cancel at its next poll, brought forward to now."""
        while not self._closing:
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
                        self._end_submitting("cancelled", "every batch of this run was cancelled")
            await asyncio.sleep(C.CANCEL_CHECK_EVERY)

    async def _cancel_pending(self, batches: list[str]) -> list[Job]:
        """Jobs of cancelled ``batches`` that are pending (put back by a refused submit after the
        cancel): cancelled, never submitted."""
        jobs = await self.store.jobs(batches, [S.PENDING])
        if jobs:
            await self.store.cancel_pending(batches)
            for job in jobs:
                job.state = S.CANCELLED
        return jobs

    async def _cancel_done(self) -> None:
        """At the end of the run: the cancel requests carried out are cleared, so that the next
        run of those batches (a `retry --cancelled`, a grown manifest) submits again. A request
        whose batch still has a job at the provider not yet asked (the run was stopped first)
        stays, for the next run."""
        if not self._cancel_batches:
            return
        await self._cancel_pending(sorted(self._cancel_batches))
        left = {j.batch for j in self._remote.values() if j.id not in self._cancel_asked}
        done = sorted(self._cancel_batches - left)
        if done:
            await self.store.clear_cancel(done)

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
            await self.store.transition(job, S.CANCELLED, detail="cancelled by the user",
                                        error="cancelled by the user", finished_at=time.time())
            self._leave_provider(job)
            self._finished(job, "cancelled at the provider")
            return
        self._emit("note", job, f"not cancelled ({outcome}): still followed")
        self._schedule(job, time.time())

    async def _deadline_watch(self, deadline: float) -> None:
        await asyncio.sleep(max(0.0, deadline - time.time()))
        self.stop("deadline")

    async def _submit_loop(self) -> None:
        while self._stop_submitting is None and not self._closing:
            if self.s.deadline is not None:
                # A job submitted now should finish before the deadline, else it would be left
                # running (and paid for) while nobody downloads it until the next run.
                left = self.s.deadline - time.time()
                if left <= (self.planner.expected or 0.0):
                    self._end_submitting("deadline", "deadline near: no more submits")
                    break
            if self.s.max_jobs is not None and self._summary.submitted >= self.s.max_jobs:
                self._end_submitting("max_jobs", f"--max-jobs {self.s.max_jobs} reached; no more submits")
                break
            if self.budget.waits_for_a_price():
                self._wake.clear()
                await self._nap(0.5)
                continue
            if not self.budget.allows_another():
                if self.budget.unbounded():
                    self._end_submitting("budget", f"--max-cost {self.s.max_cost:g} USD cannot be kept: a job "
                                         "ended without a cost and the model's price is unknown; no more submits")
                else:
                    self._end_submitting("budget", f"--max-cost {self.s.max_cost:g} USD reached (spent "
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
            if self._stop_submitting is not None or self._closing:
                self.slots.release()
                break
            # Every slot free right now is claimed in one round trip: claiming one job per loop
            # turn made the database the bottleneck of a fast provider. A budget claims one at a
            # time so that each job is checked against it.
            want = 1
            # An outage: one job probes whether the API is back.
            limit = 1 if self.s.max_cost is not None or self._outage.active else _CLAIM_BATCH
            if self.s.max_jobs is not None:
                limit = min(limit, self.s.max_jobs - self._summary.submitted)
            while want < limit and self.slots.try_acquire():
                want += 1
            # The claim commits 'submitting' (the intent). Run it as a tracked task so that a
            # cancel landing right after its commit cannot lose the jobs: _drain puts claimed but
            # never-sent jobs back to pending.
            claim = asyncio.create_task(self._claim(want))
            self._track(claim, submit=True)
            self._claiming = True
            try:
                jobs = await asyncio.shield(claim)
            finally:
                self._claiming = False
                self._let_downloads_go_if_sent()  # nothing claimed, else its submits will
            for _ in range(want - len(jobs)):
                self.slots.release()
            if not jobs:
                # Only a submit in flight can put a job back to pending. Whether one is in flight
                # is read before the store is asked: one that ended during that read may have
                # made a job pending that the read did not see.
                submits_in_flight = bool(self._submits)
                when = await self.store.next_pending_at(self._batches)
                if when is None and not submits_in_flight:
                    return  # nothing pending, and no submit in flight that could put one back
                # Wait for a retry delay to pass or a submit to finish (it may return a job).
                delay = 1.0 if when is None else max(0.0, when - time.time())
                self._wake.clear()
                await self._nap(min(delay, 1.0))
                continue
            if self._outage.active:
                self._outage.probing()
            for job in jobs:
                self._summary.submitted += 1
                self.budget.started(job.id)  # committed from the moment it may be sent
                self._spawn(self._submit(job), submit=True)

    async def _submits_first(self) -> None:
        """Wait, if a claim is in flight or claimed jobs are not yet sent, until they are (at most
        SUBMITS_FIRST_MAX). Downloads call this first. Jobs of one wave finish together, and
        the event loop is then the bottleneck: a download's request, file and record done first
        would hold up the submits that refill the slots just freed, which is the provider's time
        and the batch's makespan (measured: 20 ms against 40 ms from a job's finish to the next
        submit into its slot). The download merely moves a few milliseconds later."""
        # A slot freed just now wakes the submit loop: its turn (the claim) comes first.
        await asyncio.sleep(0)
        if self._all_sent():
            return
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._after_submits.append(fut)
        backstop = loop.call_later(C.SUBMITS_FIRST_MAX, _resolve, fut)
        try:
            await fut
        finally:
            backstop.cancel()

    def _all_sent(self) -> bool:
        """No claim in flight, no claimed job waiting to be handed to the client."""
        return not self._claiming and not self._unsent

    def _let_downloads_go_if_sent(self) -> None:
        if self._all_sent():
            self._let_downloads_go()

    def _let_downloads_go(self) -> None:
        waiting, self._after_submits = self._after_submits, []
        for fut in waiting:
            _resolve(fut)

    async def _claim(self, n: int) -> list[Job]:
        jobs = await self.store.claim_many(self._batches, time.time(), n)
        for job in jobs:
            self._unsent[job.id] = job
        for _ in jobs:
            crashpoints.reached("claimed")  # once per job, whatever the size of the claim
        return jobs

    async def _submit(self, job: Job) -> None:
        self._unsent.pop(job.id, None)  # from here on, the request may reach the server
        self._let_downloads_go_if_sent()
        try:
            if job.inputs_json is not None and "file://" not in job.inputs_json:
                # No local file: the recorded JSON text is the body (no decode, copy and encode of
                # the inputs per submit).
                sub = await self.client.submit(job.model_id, job.inputs_json)
            else:
                body = await prepare_body(job.inputs, self._file_checks)
                sub = await self.client.submit(job.model_id, job.inputs if body is None else body)
        except (APIError, UsageError) as exc:
            await asyncio.shield(self._submit_failed(job, exc))
            return
        crashpoints.reached("submit_answered")
        await self._submitted(job, sub.request_id)
        crashpoints.reached("submit_recorded")

    async def _submitted(self, job: Job, request_id: str) -> None:
        now = time.time()
        self._streak.accepted()
        self._api_answered()
        # The request id is the only handle on a paid job: it is committed even if we are
        # cancelled right now (the next run then follows the job).
        await self.store.transition(
            job, S.IN_QUEUE, expect=(S.SUBMITTING,), request_id=request_id, submitted_at=now,
            error=None, error_code=None, not_before=None, detail=f"request {request_id}", shield=True,
        )
        if self.cap.on_success():
            self.slots.changed()
        self._remote[job.id] = job
        self._holding.add(job.id)
        self._emit(S.IN_QUEUE, job, f"submitted as {request_id}")
        self._enlist_scout(job)
        delay = self._poll_delay(job, 0.0)
        if (not self._testers and self.cap.wants_tester(len(self._holding))
                and (self.cap.growing or now - self._last_tester >= C.AUTO_STEADY_TEST_EVERY)):
            # It filled the cap: whether it runs at once says whether all of the cap runs.
            self._testers[job.id] = self.cap.value
            self._last_tester = now
            delay = min(delay, C.AUTO_PROBE_DELAY)
        self._schedule(job, now + delay)

    def _throttled(self) -> None:
        move = self.cap.on_throttle()
        if move is not None:
            self.cap_note = f"{move} (the provider is throttling)"
            self._emit("cap", None, self.cap_note)

    def _tester_answered(self, job: Job, cap_at_submit: int | None, status: str,
                         position: int | None) -> None:
        """A tester's first answer: running (or done) or waiting decides the cap's next move."""
        if cap_at_submit is None:
            return
        in_flight = len(self._holding)
        if status == S.IN_QUEUE:
            move = self.cap.on_wait(position, in_flight)
        else:
            move = self.cap.on_start(cap_at_submit, in_flight)
        if move is not None:
            self._tuned(str(move))
            if move.after > move.before:
                self.slots.changed()

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
                           f"--outage-budget {self.s.outage_budget:g}s")
            self._outage.failed(str(exc))
        elif isinstance(exc, APIError):
            self._api_answered()  # even if only to refuse
        try:
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
                if self.s.policy.may_resubmit(job.round_attempts):
                    delay = self.s.policy.delay(job.round_attempts, getattr(exc, "retry_after", None))
                    await self.store.transition(
                        job, S.PENDING, expect=(S.SUBMITTING,), not_before=time.time() + delay,
                        error=str(exc), error_code=code,
                        detail=f"submit refused, retry in {delay:.1f}s: {exc}",
                    )
                    self._emit("retry", job, f"submit refused ({exc}); retrying in {delay:.1f}s")
                    self._summary.submitted -= 1  # certainly not created: counts when it is
                    return
                await self.store.transition(
                    job, S.FAILED, expect=(S.SUBMITTING,), error=f"{exc} (after {job.round_attempts} attempts)",
                    error_code=code, finished_at=time.time(),
                )
            elif decision is Decision.UNKNOWN:
                await self.store.transition(
                    job, S.UNKNOWN, expect=(S.SUBMITTING,), error=str(exc), error_code=code,
                    finished_at=time.time(), detail="submit answer lost; not resubmitted",
                )
            elif decision in (Decision.STOP_SUBMITTING, Decision.FATAL):
                await self._unclaim(job, exc, f"refused: {exc}")
                if decision is Decision.FATAL:
                    self._summary.account_error = str(exc)
                    raise _Fatal(str(exc)) from exc
                if isinstance(exc, InsufficientBalanceError):
                    self._summary.account_error = str(exc)
                    self._end_submitting("balance", f"{exc}; no more submits, finishing jobs in flight")
                else:  # an unknown model: every job of it would be refused alike
                    self._refused_everywhere(
                        f"{exc}: no job of model '{job.model_id}' can be submitted; check the "
                        "model id (and --api-url), then run again: the jobs are still pending")
                return
            else:
                await self.store.transition(
                    job, S.FAILED, expect=(S.SUBMITTING,), error=str(exc), error_code=code,
                    finished_at=time.time(),
                )
            self._finished(job, str(exc))
        finally:
            self.slots.release()

    async def _unclaim(self, job: Job, exc: BaseException, detail: str, was: str = S.SUBMITTING) -> None:
        """The job was certainly not created and the fault is not its own: back to pending as it
        was, the attempt not counted."""
        await self.store.transition(
            job, S.PENDING, expect=(was,), attempts=max(0, job.attempts - 1), error=str(exc),
            error_code=getattr(exc, "error_code", None), finished_at=None, detail=detail,
        )
        self._summary.submitted -= 1  # counts when it is created

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
            await self._unclaim(other, exc, f"refused like the jobs after it: {exc}", was=S.FAILED)
            left = self._summary.finished.pop(S.FAILED, 0) - 1
            if left > 0:
                self._summary.finished[S.FAILED] = left
            self._emit(S.PENDING, other, "back to pending: every job is refused the same way")
        return True

    def _refused_everywhere(self, message: str) -> None:
        """Stop submitting: ``message`` (what the API refuses, what to do) ends the run's output."""
        if self._stop_submitting is None:
            self._summary.stop_message = message
        self._end_submitting("refused", "no more submits: the API refuses every job alike; "
                             "finishing the jobs already submitted")

    def _api_answered(self) -> None:
        if self._outage.active:
            self._emit("outage", None, f"API reachable again after {self._outage.lasted():.1f}s")
            self._outage.ended()

    def _give_up_on_outage(self) -> None:
        if self._stop_submitting is None:
            self._summary.stop_message = (
                f"the API has been unreachable for {self._outage.lasted():.0f}s, longer than "
                f"--outage-budget {self.s.outage_budget:g}s ({self._outage.last_error}); the jobs "
                "not submitted are still pending: run again to go on")
        self.stop("outage")

    # ---- polling -------------------------------------------------------------------------------

    def _schedule(self, job: Job, due: float) -> None:
        if self._cancel_batches and job.batch in self._cancel_batches and job.id not in self._cancel_asked:
            due = 0.0  # its batch was cancelled: asked at once (_poll)
        heapq.heappush(self._heap, (due, next(self._tiebreak), job.id))
        self._wake.set()

    async def _poll_loop(self) -> None:
        while not self._closing:
            if self._exit_now:
                return  # stopping: no new polls (they are safe to redo next run)
            if not self._heap:
                self._wake.clear()
                await self._wake.wait()
                continue
            due, _, job_id = self._heap[0]
            delay = due - time.time()
            if delay > 0:
                self._wake.clear()
                await self._nap(delay)
                continue
            heapq.heappop(self._heap)
            job = self._remote.get(job_id)
            if job is not None:
                self._spawn(self._poll(job))

    async def _poll(self, job: Job) -> None:
        assert job.request_id is not None
        if job.batch in self._cancel_batches and job.id not in self._cancel_asked:
            # Here rather than in a task of its own: one poll of a job at a time, so no answer
            # about it is recorded over its cancel.
            await self._cancel_at_provider(job)
            return
        rid = job.request_id
        expected = self.planner.expected
        elapsed = time.time() - (job.submitted_at or time.time())
        paced = True
        limiter = self.client.limiter
        if expected is None and job.id in self._scouts and limiter is not None:
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
            if result is not None and result.status in _RESULT_FINISHED:
                self._tester_answered(job, tester, "finished", None)
                self._free_slot(job)
                await self._on_result(job, result)
                return
            if result is not None and result.status in (S.IN_QUEUE, S.IN_PROGRESS):
                status_now, position = result.status, None
            else:
                # Not expected yet, or /result said something we cannot read as an answer
                # either way: /status is the authority on whether a job has finished.
                status = await self.client.status(rid, paced=paced)
                crashpoints.reached("status_answered")
                if status.finished:
                    self._tester_answered(job, tester, "finished", None)
                    self._free_slot(job)
                    result = await self.client.result(rid)
                    await self._on_result(job, result)
                    return
                status_now, position = status.status, status.queue_position
        except APIError as exc:
            await self._poll_failed(job, exc)
            return
        self._answered(job)
        self._tester_answered(job, tester, status_now, position)
        now = time.time()
        if job.id in self._overdue:
            # It stays overdue until it finishes (its state says it was given up on once).
            self._schedule(job, now + self.s.overdue_poll_interval)
            return
        if status_now == S.IN_PROGRESS and job.state != S.IN_PROGRESS:
            await self.store.transition(job, S.IN_PROGRESS, started_at=now, queue_position=None)
            self._emit(S.IN_PROGRESS, job)
        elif status_now == S.IN_QUEUE and position is not None and position != job.queue_position:
            await self.store.update_fields(job, queue_position=position)
        elapsed = now - (job.submitted_at or now)
        if self._past_timeout(job, now):
            await self._time_out(job, f"its last status was {status_now!r}")
            return
        delay = self._poll_delay(job, elapsed)
        if status_now == S.IN_QUEUE and self.planner.shortest:
            # Still waiting: it has a whole run ahead of it, at least the shortest seen.
            delay = max(delay, min(self.planner.shortest, self.s.max_poll_interval))
        self._schedule(job, now + delay)

    def _enlist_scout(self, job: Job) -> None:
        """Make ``job`` a scout if no duration is known yet and a scout's slot is free."""
        if self.planner.expected is None and len(self._scouts) < self._scout_count:
            self._scouts[job.id] = min(set(range(self._scout_count)) - set(self._scouts.values()))

    def _poll_delay(self, job: Job, elapsed: float) -> float:
        """How long until ``job``'s next poll: the scout's early schedule while no duration is
        known, the planner's otherwise. While scouts are out, the other jobs wait for the
        duration they will teach (_replan brings their polls forward), asked only now and then
        in case the scouts are slower than they are: at max_poll_interval, then at twice the
        time they have been out."""
        slot = self._scouts.get(job.id)
        if self.planner.expected is None:
            if slot is not None:
                return self.planner.scout_delay(elapsed, slot / self._scout_count, self._scout_first)
            if self._scouts:
                return max(self.s.max_poll_interval, elapsed)
        return self.planner.next_delay(elapsed)

    async def _on_result(self, job: Job, result: Result) -> None:
        now = time.time()
        if result.status not in _RESULT_FINISHED:
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
            state, error = S.FAILED, "the provider reported success but returned no output"
        elif result.status == "cancelled":
            state, error = S.CANCELLED, result.error or "cancelled at the provider"
        else:
            state, error = S.FAILED, result.error or "the provider reported the job failed"
        await self.store.transition(job, state, error=error, cost=result.cost, finished_at=now)
        self._leave_provider(job)
        self._finished(job, error)

    def _observe_duration(self, job: Job, result: Result, now: float) -> None:
        if result.status != "succeeded":
            # A job that failed (often at once: a refused input) or was cancelled says nothing
            # of how long a job takes; learned, an instant failure would set the expected
            # duration to 0 and every job out would be polled every 50 ms.
            return
        # Prefer the provider's own timestamps: ours include polling lag. But the job ran within
        # the time since we submitted it (a second's slack: timestamps may be whole seconds), so
        # timestamps saying otherwise, or putting the finish first, are garbage.
        ours = now - job.submitted_at if job.submitted_at else None
        seconds = None
        if result.created_at is not None and result.finished_at is not None:
            seconds = result.finished_at - result.created_at
            if not 0 <= seconds <= (math.inf if ours is None else ours + 1.0):
                seconds = None
        if seconds is None:
            seconds = ours
        if seconds is not None:
            first = self.planner.expected is None
            self.planner.observe(seconds)
            if first and self.planner.expected is not None:
                self._replan()

    def _replan(self) -> None:
        """The first duration is known: bring forward every poll planned without it (the first
        polls were planned a whole first_poll_delay out), to just after each job's expected end,
        which for jobs out longer than that is now: the first wave finishes together, and each
        of its jobs is probably done once one is seen done."""
        now = time.time()

        def due(job: Job) -> float | None:
            if job.id in self._poll_failures or job.id in self._overdue:
                return None  # waiting out a backoff or a Retry-After on purpose, or overdue
            return now + self.planner.until_expected(max(0.0, now - (job.submitted_at or now)))

        self._bring_forward(due)

    def _bring_forward(self, due: Callable[[Job], float | None]) -> None:
        """Move planned polls earlier, to ``due(job)`` where that is earlier (None: leave it). The
        heap keeps one entry per job (a second would start a second chain of polls), so entries
        are changed in place, never added."""
        heap = []
        for when, tiebreak, job_id in self._heap:
            job = self._remote.get(job_id)
            new = due(job) if job is not None else None
            heap.append((when if new is None else min(when, new), tiebreak, job_id))
        heapq.heapify(heap)
        self._heap = heap
        self._wake.set()

    def _leave_provider(self, job: Job) -> None:
        self._remote.pop(job.id, None)
        self._testers.pop(job.id, None)
        self._overdue.discard(job.id)
        self.budget.left(job.id)  # no-op once its result reported a cost
        self._stop_scouting(job)
        self._free_slot(job)

    def _stop_scouting(self, job: Job) -> None:
        if self._scouts.pop(job.id, None) is not None and self.planner.expected is None:
            # It left without teaching a duration (failed at once, timed out): another job takes
            # its place, one not scouting yet nor waiting out a backoff or a Retry-After, nor overdue.
            heir = next((j for j in self._remote.values() if j.id not in self._scouts
                         and j.id not in self._poll_failures and j.id not in self._overdue), None)
            if heir is not None:
                self._enlist_scout(heir)
                now = time.time()
                due = now + self._poll_delay(heir, now - (heir.submitted_at or now))
                self._bring_forward(lambda j: due if j.id == heir.id else None)

    def _free_slot(self, job: Job) -> None:
        """The provider finished ``job``: its slot can take the next submit at once, before this
        job's result is fetched or recorded (those concern only this job, and are redone by a
        later run if a crash comes first). A freed slot is what keeps the provider busy."""
        if job.id in self._holding:
            self._holding.discard(job.id)
            self.slots.release()

    def _answered(self, job: Job) -> None:
        """The provider answered about ``job`` in a way we could read."""
        self._poll_failures.pop(job.id, None)
        self._unreadable.pop(job.id, None)

    async def _poll_failed(self, job: Job, exc: APIError) -> None:
        decision = classify(exc, Call.POLL)
        if decision is Decision.FATAL:
            self._summary.account_error = str(exc)
            raise _Fatal(str(exc)) from exc
        if (decision is Decision.FAIL and isinstance(exc, NotFoundError) and job.submitted_at is not None
                and time.time() - job.submitted_at < self.s.not_found_grace):
            # A request id handed out a moment ago: the server asked may not know it yet. Ending a
            # paid job on that would lose it; it is believed only after the grace period.
            decision = Decision.RETRY
        if decision is Decision.FAIL:
            await self.store.transition(job, S.FAILED, error=str(exc),
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
            if unreadable >= self.s.policy.max_call_retries:
                # Not cancelled: the answer we cannot read may be its result.
                await self._set_aside(job, f"{unreadable} answers in a row about it could not be read "
                                      f"(last: {exc}); still followed: it may still be delivered, and is billed")
                return
        await self._again_later(job, f"poll failed ({exc})", getattr(exc, "retry_after", None))

    async def _again_later(self, job: Job, why: str, retry_after: float | None = None) -> None:
        """Ask about ``job`` again after a growing delay (a poll failed, or /result is not final
        yet), unless it is past its job timeout: then it is given up on (_time_out). An overdue
        job is simply asked again at its slow pace."""
        n = self._poll_failures[job.id] = self._poll_failures.get(job.id, 0) + 1
        now = time.time()
        delay = self.s.policy.delay(n, retry_after)
        if job.id in self._overdue:
            delay = max(delay, self.s.overdue_poll_interval)
        elif self._past_timeout(job, now):
            await self._time_out(job, why)
            return
        self._emit("retry", job, f"{why}; again in {delay:.1f}s")
        self._schedule(job, now + delay)

    def _past_timeout(self, job: Job, now: float) -> bool:
        timeout = self.s.job_timeout
        return (timeout is not None and job.id not in self._overdue
                and now - (job.submitted_at or now) > timeout)

    async def _time_out(self, job: Job, last: str) -> None:
        """``job`` is past its job timeout. Still queued, the provider cancels it: 'timed_out',
        nothing to pay, safe to retry. Otherwise it may still finish and be billed: 'overdue',
        still followed (this run slowly, the next again), so that what it costs is downloaded
        and `retry` does not pay for it twice."""
        assert job.request_id is not None and self.s.job_timeout is not None
        outcome, status = "not asked", ""
        try:
            answer = await self.client.cancel(job.request_id)
            outcome, status = answer.outcome or "no outcome given", answer.status
        except APIError as exc:
            outcome = f"cancel failed: {exc}"
        why = f"not finished within the job timeout ({_span(self.s.job_timeout)}; {last})"
        if outcome == "cancelled":
            await self.store.transition(job, S.TIMED_OUT, finished_at=time.time(),
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
        await self.store.transition(job, S.OVERDUE, error=error)
        self._overdue.add(job.id)
        # It may be billed and may never say what: counted at the estimate from now on, and no
        # longer a job whose cost the run waits for (with no price known, that wait would never end).
        self.budget.left(job.id)
        self._testers.pop(job.id, None)
        self._poll_failures.pop(job.id, None)
        self._unreadable.pop(job.id, None)
        self._stop_scouting(job)
        self._free_slot(job)
        self._emit(S.OVERDUE, job, error)
        self._schedule(job, time.time() + (0.0 if soon else self.s.overdue_poll_interval))

    # ---- downloading ---------------------------------------------------------------------------

    async def _record_result(self, job: Job, outputs: list[tuple[str, str]], cost: float | None,
                             finished_at: float | None) -> None:
        await self.store.record_result(job, outputs, cost=cost, finished_at=finished_at)
        crashpoints.reached("result_recorded")
        self._emit(S.DOWNLOADING, job, f"{len(outputs)} output(s)")

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
                    name = output_name(job.key, out.idx, out.kind, out.url)
                    dest = os.path.join(folder, name)
                    try:
                        got = await download(
                            self._dl_session, out.url, dest, self._file_threads,  # type: ignore[arg-type]
                            # A fresh result's first try has no partial file to resume, unless
                            # an earlier run was killed between keeping one and recording the
                            # result (then it is resumed, and removed once the file is whole).
                            resume=unrecorded is None or job.id in self._from_earlier_run,
                            before_streaming=record if unrecorded is not None else None,
                            hosts=self._output_hosts, limits=self.s.download_limits,
                        )
                    except DownloadError as exc:
                        await record()
                        tries += 1
                        decision = classify(exc, Call.DOWNLOAD)
                        if decision is Decision.FAIL or tries > self.s.policy.max_call_retries:
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
                        delay = self.s.policy.delay(tries)
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
                await self.store.transition(job, S.SUCCEEDED, expect=(S.DOWNLOADING,))
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
                raise _Fatal(str(exc)) from exc
            if decision is Decision.RETRY:
                return ""  # could not ask now: keep the old URL, the next try asks again
            return None
        if result.status != "succeeded" or idx >= len(result.outputs):
            return None
        await self.store.record_result(job, result.outputs, cost=result.cost, finished_at=job.finished_at)
        return result.outputs[idx][1]

    async def _output_lost(self, job: Job, exc: BatchgenError) -> None:
        await self.store.transition(job, S.FAILED, error=f"{S.OUTPUT_LOST}: {exc}")
        self._finished(job, str(exc))


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _span(seconds: float) -> str:
    """A duration as the options take it: 6h, 30m, 45s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"
