"""The state every part of a run shares, and what each part may do with it: start a task, tell
an event, stop. The parts (submitting, polling, collecting, recovery, cancelling) are mixins of
``RunCore``; ``coordinator.Runner`` brings them together and owns the loops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import aiohttp

from ..client import RunComfyClient
from ..durability import Flusher
from ..errors import LeaseLost, StoreError
from ..inline import FileChecks
from ..limits import AdaptiveCap, Budget, Slots
from ..outputhosts import OutputHosts
from ..retry import Outage, RefusalStreak
from ..store import IN_QUEUE, Job, Store
from .events import Event, EventSink, RunSummary, StopReason
from .schedule import PollSchedule
from .settings import RunSettings

if TYPE_CHECKING:
    from .leasing import Lease

log = logging.getLogger("batchgen.runner")


class Fatal(Exception):
    """An account error that ends the run (its cause is what the run raises)."""


class RunCore:
    """Declares the run's shared state (``Runner.__init__`` sets it) and the few acts every part
    uses. Attribute names say whose they are: ``_followed`` are the jobs at the provider the run
    polls; ``_holding_slot`` those of them holding one of the provider's slots."""

    store: Store
    client: RunComfyClient
    settings: RunSettings
    cap: AdaptiveCap
    slots: Slots
    budget: Budget
    polls: PollSchedule
    cap_note: str
    _workdir: str
    _batches: list[str]
    _summary: RunSummary
    _on_event: EventSink | None
    _wake: asyncio.Event
    # Why the run stops: the first reason given wins (the summary's, so the exit code's); from
    # then on nothing is submitted. ``_stopping``, the one event every loop ends on: set by
    # stop() (polls and downloads end too, rather than finish) and at the run's end. The error
    # the run raises is kept beside the reason (a stop for another reason may have come first).
    _stop_reason: StopReason | None
    _stopping: asyncio.Event
    _error: BaseException | None
    _tasks: set[asyncio.Task[Any]]
    _submits: set[asyncio.Task[Any]]
    _timers: set[asyncio.Task[Any]]
    _followed: dict[int, Job]
    _holding_slot: set[int]
    _overdue: set[int]
    _testers: dict[int, int]
    _outage: Outage
    _streak: RefusalStreak[Job]
    _file_checks: FileChecks
    _file_threads: ThreadPoolExecutor
    _flusher: Flusher
    _unflushable: dict[tuple[int, int], str]
    _flush_error: StoreError | None
    _dl_session: aiohttp.ClientSession | None
    _dl_sem: asyncio.Semaphore
    _output_hosts: OutputHosts
    _from_earlier_run: set[int]
    _cancel_batches: set[str]
    _cancel_asked: set[int]
    # On a shared store, this run's lease (leasing.py); None on SQLite: one runner.
    lease: Lease | None = None

    @property
    def closing(self) -> bool:
        """The run's loops are ending (or ended): a stop was asked, or the run is draining."""
        return self._stopping.is_set()

    def wake(self) -> None:
        """Let the loops look again now (new work, a job taken back, a cancel)."""
        self._wake.set()

    def emit_note(self, message: str) -> None:
        self._emit("note", None, message)

    def stop(self, reason: StopReason = StopReason.INTERRUPTED) -> None:
        """Stop taking new work (Ctrl-C, SIGTERM, a deadline). Submits already on the wire are
        allowed to finish so their request ids are recorded; polls and downloads stop at once
        (both are safe to redo next run)."""
        if not self._stopping.is_set():
            self._stopping.set()
            self._give_reason(reason)
            self._emit("stop", None, f"stopping: {reason}")
        self._wake.set()

    def _end_submitting(self, reason: StopReason, message: str) -> None:
        """No more submits (a budget, the balance), but jobs in flight are followed to the end."""
        if self._give_reason(reason):
            self._emit("stop", None, message)
        self._wake.set()

    def _give_reason(self, reason: StopReason) -> bool:
        """Record why the run stops, unless a reason came first; whether this one is it."""
        if self._stop_reason is not None:
            return False
        self._stop_reason = self._summary.stop_reason = reason
        return True

    def _stop_on_error(self, exc: BaseException, *, over: bool = False) -> None:
        """Stop now, and raise ``exc`` at the end of the run: unless an error came first and
        ``over`` is false (the first error met is the one worth reading)."""
        if isinstance(exc, LeaseLost):
            # Not a failure to show: the other runners hold this one's jobs; running again joins them.
            log.error("%s", exc)
            self.stop(StopReason.LEASE_LOST)
            return
        if over or self._error is None:
            self._error = exc
        self.stop(StopReason.ERROR)

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
        if isinstance(exc, Fatal):  # the account's error: what the user must act on, first
            self._stop_on_error(exc.__cause__ or exc, over=True)
            return
        # A bug or a store failure: stop the run rather than go on with a store we cannot trust.
        # The run raises it, and the CLI reports it in one line: here only for -vv.
        if self._error is None:
            log.debug("internal error in a runner task", exc_info=exc)
        self._stop_on_error(exc)

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

    def _tuned(self, note: str) -> None:
        self.cap_note = note
        self._emit("tune", None, note)

    def _throttled(self) -> None:
        move = self.cap.on_throttle()
        if move is not None:
            self.cap_note = f"{move} (the provider is throttling)"
            self._emit("cap", None, self.cap_note)

    def _tester_answered(self, cap_at_submit: int | None, status: str, position: int | None) -> None:
        """A tester's first answer (AdaptiveCap.wants_tester): running (or done) or waiting
        decides the cap's next move."""
        if cap_at_submit is None:
            return
        in_flight = len(self._holding_slot)
        if status == IN_QUEUE:
            move = self.cap.on_wait(position, in_flight)
        else:
            move = self.cap.on_start(cap_at_submit, in_flight)
        if move is not None:
            self._tuned(str(move))
            if move.after > move.before:
                self.slots.changed()

    def _free_slot(self, job: Job) -> None:
        """The provider finished ``job``: its slot can take the next submit at once, before this
        job's result is fetched or recorded (those concern only this job, and are redone by a
        later run if a crash comes first). A freed slot is what keeps the provider busy."""
        if job.id in self._holding_slot:
            self._holding_slot.discard(job.id)
            self.slots.release()
            if self.lease is not None:  # the account's slot too, for every runner's claims
                self._spawn(self.lease.freed(job))

    def _schedule(self, job: Job, due: float) -> None:
        """Plan the next poll of ``job``; a job of a cancelled batch not yet asked is due now
        (the cancel goes with its next poll: polling.Polling._poll)."""
        if self._cancel_batches and job.batch in self._cancel_batches and job.id not in self._cancel_asked:
            due = 0.0
        self.polls.plan(job.id, due)
        self._wake.set()

    def _bring_forward(self, due: Callable[[Job], float | None]) -> None:
        """PollSchedule.bring_forward by job (``due(job) -> float | None``), for jobs followed."""
        followed = self._followed
        self.polls.bring_forward(lambda job_id: due(followed[job_id]) if job_id in followed else None)
        self._wake.set()

    def _leave_provider(self, job: Job) -> None:
        """``job`` is done at the provider (or certainly no longer followed)."""
        self._followed.pop(job.id, None)
        self._testers.pop(job.id, None)
        self._overdue.discard(job.id)
        self.budget.left(job.id)  # no-op once its result reported a cost
        self._stop_scouting(job)
        self._free_slot(job)

    def _stop_scouting(self, job: Job) -> None:
        self.polls.drop(job.id, self._followed.values(), self._overdue)
        self._wake.set()
