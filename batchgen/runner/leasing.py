"""Leasing: several runners (processes, machines) share one queue on a shared store.

The claim-and-submit side of a run on PostgreSQL (store/postgres.py holds the SQL). Taken from
how procrastinate, pgqueuer and Oban run a queue on PostgreSQL (ARCHITECTURE.md, "Several
runners"):

- a runner holds a **lease** (id, host, pid, expiry) that it renews every LEASE_RENEW seconds;
  one that stops renewing may be reaped LEASE_TTL (30 s; ``BATCHGEN_LEASE_TTL`` for tests and
  tuning) seconds after its last renewal. Only a reap loses it: an expired lease nobody reaped
  yet (a store blip, a pause with no other runner about) is renewed, nothing having been taken;
- a runner's writes of its jobs name them as its own; a write refused because the runner was
  reaped (its jobs went to others) raises LeaseLost, and the run stops as lease_lost;
- **claims** lock the rows they take (``FOR UPDATE SKIP LOCKED``) and name the runner: two
  runners never submit one job;
- just before a submit goes on the wire its job is **marked sent**: when a runner's lease
  expires, its claimed-but-never-sent jobs go back to pending, those marked sent become
  ``unknown`` (the submit may have created a paid job: never resubmitted), and those it had at
  the provider or downloading are **adopted** by a live runner, which polls and downloads them;
- a runner with nothing left to claim stays while other runners hold unfinished jobs of its
  batches, to adopt them should their runner die;
- the **account's cap** (``--account-concurrency``) is kept by the claims, under an advisory
  lock (PostgresStore.claim_many); the **request rate** (``--rate``) is the account's, split
  evenly between the live runners, re-divided at every renewal;
- **LISTEN/NOTIFY**: new work, jobs taken back and cancels wake idle runners at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from ..store import Job
from .events import StopReason

if TYPE_CHECKING:
    from ..store.postgres import PostgresStore
    from .coordinator import Runner

log = logging.getLogger("batchgen.runner")

ACCOUNT_CONCURRENCY_ENV = "BATCHGEN_ACCOUNT_CONCURRENCY"


class Lease:
    """One runner's lease on a shared store, and what it does for the run (module docstring)."""

    # How often a runner with nothing to claim looks whether other runners still hold jobs.
    IDLE_CHECK = 0.2

    def __init__(self, store: PostgresStore, runner: Runner):
        self.store = store
        self.runner = runner
        self.rate = runner.settings.rate  # the account's request rate, shared by the live runners
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        from ..store.postgres import LEASE_RENEW

        await self.store.register_runner()
        cap = os.environ.get(ACCOUNT_CONCURRENCY_ENV)
        if cap:
            self.store.account_cap = int(cap)
        await self._share_rate()
        self._tasks = [asyncio.create_task(self._renew_every(LEASE_RENEW), name="lease"),
                       asyncio.create_task(self._listen(), name="listen")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.shield(self.store.end_lease())

    async def sent(self, job: Job) -> bool:
        """Mark ``job`` sent (see the module docstring), its rate token already taken; False: its
        batch was cancelled meanwhile, and it must not go."""
        return await self.store.mark_sent(job)

    async def freed(self, job: Job) -> None:
        """The provider finished ``job``: it no longer counts against the account's cap, though
        its result is still to be fetched and recorded."""
        await self.store.mark_freed(job)

    async def others_busy(self, batches: Sequence[str]) -> bool:
        """Whether other runners hold unfinished jobs of ``batches`` (then this one waits)."""
        return await self.store.held_elsewhere(batches) > 0

    async def adopt(self, batches: Sequence[str]) -> list[Job]:
        """Jobs at the provider or downloading that no live runner holds: this run's now."""
        await self.store.reap(batches)
        return await self.store.adopt(batches)

    async def _share_rate(self) -> None:
        limiter = self.runner.client.limiter
        if limiter is None or self.rate <= 0:
            return
        live = max(1, await self.store.live_runners())
        limiter.rate = self.rate / live
        limiter.burst = max(1.0, limiter.rate)

    async def _renew_every(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                if not await self.store.renew_lease():
                    # Reaped (a machine frozen past its TTL while another runner was about): its
                    # jobs were taken back, so this run must not go on with them.
                    log.error("this runner's lease expired; stopping")
                    self.runner.stop(StopReason.LEASE_LOST)
                    return
                await self._share_rate()
                # A run that is ending adopts nothing: no loop would follow what it took.
                adopted = [] if self.runner.closing else await self.adopt(self.runner.batches)
            except Exception as exc:  # noqa: BLE001 - a failed renewal is retried at the next tick
                log.warning("lease renewal failed: %s", exc)
                continue
            if adopted:
                self.runner.emit_note(f"{len(adopted)} job(s) of a runner that stopped renewing its "
                                      "lease adopted: polled and downloaded here")
                self.runner.follow_resumed(adopted, time.time())

    async def _listen(self) -> None:
        """Wake the run on the store's notifications (work added or taken back, a cancel)."""
        import psycopg

        from ..store import pgreconnect
        from ..store.postgres import CHANNEL, scrub

        waits = pgreconnect.RECONNECT_WAITS
        tries = 0
        while True:  # until the lease stops (cancelled); meanwhile the loops' 1 s naps find work
            try:
                async with await psycopg.AsyncConnection.connect(
                        self.store.url, autocommit=True, application_name="batchgen",
                        connect_timeout=pgreconnect.CONNECT_TIMEOUT, **pgreconnect.KEEPALIVES) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    if tries:
                        self.runner.wake()  # what was notified while not listening
                    tries = 0
                    async for _note in conn.notifies():
                        self.runner.wake()
            except psycopg.Error as exc:
                if tries == 0:
                    log.warning("cannot listen for the store's notifications (retrying): %s",
                                scrub(str(exc), self.store.url))
            tries += 1
            await asyncio.sleep(waits[min(tries - 1, len(waits) - 1)])


@contextlib.asynccontextmanager
async def leased(runner: Runner, shared: bool) -> AsyncIterator[None]:
    """Run ``runner`` under a lease when its store is shared; otherwise nothing changes."""
    if not shared:
        yield
        return
    from ..store.postgres import PostgresStore

    assert isinstance(runner.store, PostgresStore)
    lease = Lease(runner.store, runner)
    await lease.start()
    runner.lease = lease
    try:
        yield
    finally:
        runner.lease = None
        await lease.stop()

