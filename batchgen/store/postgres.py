"""``PostgresStore``: the store on a PostgreSQL server, shared by several runners on several
machines (``--store postgresql://user@host/db``).

It is the SQLite store's code (reads, transitions, the commands' writes) run through pgconn.py,
plus what only a shared store needs, all used by runner/leasing.py:

- claims take rows with ``FOR UPDATE SKIP LOCKED`` (two runners never take one job) and name the
  claiming runner (``jobs.runner_id``);
- the account's cap: with ``account_cap`` set, a claim first takes a transaction-level advisory
  lock for the API, counts the jobs at the provider across every runner, and claims no more than
  the room left, so N runners together keep at most ``account_cap`` jobs there;
- runner leases (``runners``: id, host, pid, expiry), renewed by each runner; an expired one's
  row is deleted and its jobs taken back in one transaction (``reap``: never sent, pending;
  ``sent_at`` set, unknown) or adopted (``adopt``: at the provider or downloading). A runner
  whose row still exists has lost nothing, expired or not: it renews and carries on (a store
  blip longer than the TTL stops nobody that no other runner reaped);
- a runner's every write of a job or its outputs names the job as its own (``owner_clause``);
  refused because its lease is gone, it raises LeaseLost (the run stops as lease_lost);
- ``freed_at``: the provider finished the job, so it no longer counts against the account;
- NOTIFY on the ``batchgen`` channel when work is added or a batch cancelled.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import time
import uuid
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psycopg

from ..constants import SHARED_STORE_MARK
from ..errors import LeaseLost, StoreError
from ..pgmigrations import pg_migrate
from . import pgreconnect
from .models import DOWNLOADING, FOLLOWED, PENDING, REMOTE_ACTIVE, SUBMITTING, UNKNOWN, Job
from .pgconn import AsyncConn, PgEngine, SyncConn
from .sql import JOB_COLUMNS, NOT_CANCELLED, filters
from .sqlite import SqliteStore

CHANNEL = "batchgen"
# A runner's lease: renewed every LEASE_RENEW seconds, reapable LEASE_TTL seconds after its last
# renewal. 30 s: a database failover or a VPN drop of a few seconds stops no runner.
LEASE_RENEW = 2.0
LEASE_TTL = 30.0
# For tests and tuning only: the TTL (seconds) of the leases this process starts from now on.
LEASE_TTL_ENV = "BATCHGEN_LEASE_TTL"
# Leases are written and compared on the database's clock, never a host's: machines whose clocks
# disagree by more than the TTL would otherwise reap each other's live leases.
_DB_NOW = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
# Advisory lock key of lease reaping (one reaper at a time); account locks hash the API.
_REAP_LOCK = 0x62677270  # "bgrp"
# Jobs at the provider for the account cap: claimed (about to be sent) or there.
_AT_PROVIDER = (SUBMITTING, *REMOTE_ACTIVE)
# Expiry and existence. Reap deletes a runner's row and takes back its jobs in one transaction,
# and deletes the row first: the DELETE locks the row, so a renewal (an UPDATE of the same row)
# either commits before it (the DELETE re-checks the expiry, finds it live and leaves it and its
# jobs alone) or waits for it and finds no row (lease lost). Hence a runner whose row exists has
# lost no job, expired or not: renewals, the after-a-refusal check (_lease_alive), the account's
# count and reap's ``dead`` all go by existence. mark_sent (money) locks the runner's row and, if
# it exists, renews it in the same transaction, so no reap can come between it and the send.
# Claims alone still want an unexpired lease: an expired runner (paused, cut off) takes no new
# work until its renewal says it may; at worst a claim reads a row a reap deletes just after,
# and its jobs, naming a runner that is gone, are taken back by the next reap.
# A claim takes nothing for a runner whose lease is not live (a runner reaped while paused that
# claims before its renewal tells it so): its jobs would name a runner nobody takes back from.
# A claim without a lease (runner_id NULL) is a command's, not a runner's.
_LIVE_LEASE = f"(CAST(? AS TEXT) IS NULL OR EXISTS (SELECT 1 FROM runners WHERE id = ? AND expires_at > {_DB_NOW}))"


def redact(url: str) -> str:
    """The URL without its password (for messages)."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error:
        return "the PostgreSQL store"
    return f"postgresql://{info.get('user', '')}@{info.get('host', '')}/{info.get('dbname', '')}"


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's message about ``url``) without the URL's password, as written or
    decoded: libpq quotes the piece of a URL it cannot parse."""
    found = re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:([^@/]*)@", url)
    if not found or not found.group(1):
        return text
    for secret in {found.group(1), unquote(found.group(1))}:
        for piece in {secret, *secret.split("%")}:
            if len(piece) >= 3:
                text = text.replace(piece, "***")
    return text


def account_lock_key(api: str) -> int:
    return zlib.crc32(f"batchgen account {api}".encode())


class PostgresStore(SqliteStore):
    """The batchgen store on PostgreSQL. Open with ``await Store.open("postgresql://…")``."""

    _db: AsyncConn  # type: ignore[assignment]
    _engine: PgEngine  # type: ignore[assignment]

    def __init__(self, db: AsyncConn, url: str, engine: PgEngine, api: str | None = None):
        self._db = db
        self._engine = engine
        self.url = url
        self.path = Path(SHARED_STORE_MARK)  # no file (the URL may hold a password)
        self.api = api
        self.runner_id: str | None = None  # set by a runner's lease: claims name it
        self.account_cap: int | None = None  # jobs at the provider for the account, all runners
        self._account_full_until = 0.0

    @classmethod
    async def open(cls, path: str | Path, *, api: str | None = None) -> PostgresStore:
        url = str(path)

        def connect() -> tuple[psycopg.Connection[Any], psycopg.Connection[Any]]:
            # The migration goes without the session timeouts: it may wait its turn on a lock.
            w = pgreconnect.connect(url, settings=False)
            try:
                pg_migrate(w)
                pgreconnect.apply_settings(w)
                r = pgreconnect.connect(url)
            except BaseException:
                w.close()
                raise
            return w, r

        try:
            w, r = await asyncio.to_thread(connect)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the store {redact(url)}: {scrub(str(exc), url)}".strip()) from None
        return cls(AsyncConn(SyncConn(r, url), asyncio.Lock()), url, PgEngine(w, url), api)

    async def close(self) -> None:
        await self._engine.close()
        await asyncio.to_thread(self._db.sync.conn.close)

    # ---- the dialect's own --------------------------------------------------------------------

    async def input_kinds(self, batch: str) -> set[tuple[str, str]]:
        rows = await self._db.execute_fetchall(
            """SELECT DISTINCT e.key, CASE jsonb_typeof(e.value)
                   WHEN 'number' THEN CASE WHEN e.value::text ~ '^-{0,1}[0-9]+$' THEN 'integer' ELSE 'real' END
                   WHEN 'string' THEN 'text' WHEN 'boolean' THEN e.value::text
                   ELSE jsonb_typeof(e.value) END
               FROM jobs j, jsonb_each(j.inputs_json::jsonb) e WHERE j.batch = ?""", (batch,))
        return {(r[0], r[1]) for r in rows}

    async def add_rows(self, batch: str, rows: Iterable[tuple[Any, ...]]) -> int:
        added = await super().add_rows(batch, rows)
        if added:
            await self.notify("work")
        return added

    async def request_cancel(self, batch: str) -> int:
        n = await super().request_cancel(batch)
        await self.notify(f"cancel {batch}")
        return n

    async def requeue(self, job: Job, detail: str, **kw: Any) -> None:
        await super().requeue(job, detail, **kw)
        await self.notify("work")

    async def forget(self, jobs: Sequence[Job]) -> int:
        """As SqliteStore.forget, but only jobs still in the state they were chosen in, read
        under a row lock in the same transaction: on a shared store no lock keeps the runners
        away, and one may have claimed a pending job since (its record must never go)."""
        async with self._engine.atomic() as db:
            keep = []
            for job in jobs:
                rows = await db.execute_fetchall("SELECT state FROM jobs WHERE id = ? FOR UPDATE", (job.id,))
                if rows and rows[0][0] == job.state:
                    keep.append(job)
            return await super().forget(keep)  # joins this transaction (atomic() nests)

    async def notify(self, what: str) -> None:
        await self._engine.write(lambda c: c.execute(f"NOTIFY {CHANNEL}, '{what.replace(chr(39), '')}'"))

    # ---- claims ---------------------------------------------------------------------------------

    async def claim_many(self, batches: Sequence[str] | None, now: float, limit: int) -> list[Job]:
        """As SqliteStore.claim_many, with row locks that other claimers skip, the claiming
        runner recorded, and the account's cap kept across every runner (see the module docstring)."""
        where, args = filters(batches, [PENDING])
        claim = f"""UPDATE jobs SET state = 'submitting', attempts = attempts + 1, updated_at = ?,
                        detail = 'attempt ' || (attempts + 1), api = COALESCE(?, api), runner_id = ?,
                        sent_at = NULL, freed_at = NULL
                    WHERE {_LIVE_LEASE}
                      AND id IN (SELECT id FROM jobs {where} AND {NOT_CANCELLED} AND retired_at IS NULL
                                 AND (not_before IS NULL OR not_before <= ?) ORDER BY seq LIMIT ?
                                 FOR UPDATE SKIP LOCKED)
                    RETURNING {JOB_COLUMNS}"""
        cap, api = self.account_cap, self.api

        def apply(conn: SyncConn) -> list[Any]:
            n = max(1, limit)
            if cap is not None:
                conn.execute("SELECT pg_advisory_xact_lock(?)", (account_lock_key(api or ""),))
                marks = ", ".join("?" * len(_AT_PROVIDER))
                # Only jobs of a runner whose row exists (expired but not reaped: its jobs are
                # still its own, at the provider): one left by a runner that died or stopped, in a
                # batch no runner is running now, would otherwise hold its slot for good (and
                # the runners of other batches would wait forever). At worst such a job still
                # runs at the provider, which then queues one more: a wait, never a payment.
                row = conn.execute(f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks}) AND freed_at IS NULL "
                                   "AND api IS NOT DISTINCT FROM ? AND runner_id IN (SELECT id FROM runners)",
                                   (*_AT_PROVIDER, api)).fetchone()
                n = min(n, cap - int(row[0] if row else 0))
                if n <= 0:
                    return []
            rid = self.runner_id
            return conn.execute(claim, (now, api, rid, rid, rid, *args, now, n)).fetchall()

        rows = await self._engine.write(apply)
        if not rows and cap is not None:
            # Full at the provider: the next try waits a moment (or a NOTIFY), not a busy loop.
            self._account_full_until = time.time() + 0.1
        return sorted((Job.from_row(r) for r in rows), key=lambda j: j.seq)

    async def next_pending_at(self, batches: Sequence[str] | None) -> float | None:
        when = await super().next_pending_at(batches)
        if when is not None and self._account_full_until > time.time():
            return max(when, self._account_full_until)
        return when

    # ---- leases (runner/leasing.py) ------------------------------------------------------------

    lease_ttl = LEASE_TTL  # this runner's (register_runner reads LEASE_TTL_ENV)

    async def register_runner(self) -> str:
        """Start this process's lease; its id names the jobs it claims from now on."""
        rid = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_ttl = ttl = float(os.environ.get(LEASE_TTL_ENV) or LEASE_TTL)
        await self._engine.write(lambda c: c.execute(
            f"INSERT INTO runners (id, host, pid, started_at, expires_at) VALUES (?, ?, ?, {_DB_NOW}, {_DB_NOW} + ?)",
            (rid, socket.gethostname(), os.getpid(), ttl)))
        self.runner_id = rid
        return rid

    async def renew_lease(self) -> bool:
        """Push this runner's expiry on; False if the lease was lost (reaped). An expired lease
        not reaped yet is renewed: nothing was taken from it (see _LIVE_LEASE's comment)."""
        rid, ttl = self.runner_id, self.lease_ttl
        n = await self._engine.write(lambda c: c.execute(
            f"UPDATE runners SET expires_at = {_DB_NOW} + ? WHERE id = ?", (ttl, rid)).rowcount)
        return bool(n)

    async def end_lease(self) -> None:
        """This runner stops cleanly: its jobs no longer name it, its lease is gone."""
        rid = self.runner_id

        def apply(c: SyncConn) -> None:
            c.execute("UPDATE jobs SET runner_id = NULL WHERE runner_id = ?", (rid,))
            c.execute("DELETE FROM runners WHERE id = ?", (rid,))

        await self._engine.write(apply)
        self.runner_id = None

    async def live_runners(self) -> int:
        rows = await self._db.execute_fetchall(f"SELECT COUNT(*) FROM runners WHERE expires_at > {_DB_NOW}", ())
        return int(rows[0][0])

    async def mark_sent(self, job: Job) -> bool:
        """``job``'s submit is about to reach the wire: if this runner dies from here on, the job
        becomes unknown rather than pending. False (nothing marked): its batch was cancelled
        since it was claimed, and it must not be sent. Raises LeaseLost if this runner was reaped
        or no longer holds the job (it was paused past its lease, and another runner may have the
        job now): sending it could pay for it twice. An expired lease no reap took is renewed
        here, under the row lock that keeps any reap waiting until the mark is committed."""
        now = time.time()
        rid, ttl = self.runner_id, self.lease_ttl

        def apply(c: SyncConn) -> int:
            # The runner's row first, locked and renewed: from here to the commit no reap can
            # take this job back, and an expired lease that no reap took is this runner's again.
            alive = c.execute(f"UPDATE runners SET expires_at = {_DB_NOW} + ? WHERE id = ?", (ttl, rid)).rowcount
            row = c.execute("SELECT runner_id FROM jobs WHERE id = ? FOR UPDATE", (job.id,)).fetchone()
            if not alive or row is None or row[0] != rid:
                raise LeaseLost(self._lost("; nothing more is sent from here: run again to join the others"))
            return int(c.execute(
                f"UPDATE jobs SET sent_at = ? WHERE id = ? AND state = 'submitting' AND {NOT_CANCELLED}",
                (now, job.id)).rowcount)

        return bool(await self._engine.write(apply))

    def _lost(self, then: str) -> str:
        return (f"this runner's lease expired (it was paused or cut off from the store for over "
                f"{self.lease_ttl:g} s) and its jobs went to other runners{then}")

    async def _owned_write(self, fn: Any, what: str | None = None) -> Any:
        # A write refused (owner_clause, or a state another runner moved the job to) by a runner
        # whose lease is gone: its jobs were taken back, and the run stops as lease_lost.
        try:
            return await super()._owned_write(fn, what)
        except StoreError as exc:
            if isinstance(exc, LeaseLost) or self.runner_id is None or await self._lease_alive():
                raise
            raise LeaseLost(self._lost(": run again to join them")) from None

    async def _lease_alive(self) -> bool:
        """This runner's row exists: no reap took its jobs (see _LIVE_LEASE's comment)."""
        rows = await self._db.execute_fetchall("SELECT 1 FROM runners WHERE id = ?", (self.runner_id,))
        return bool(rows)

    def owner_clause(self) -> tuple[str, tuple[Any, ...]]:
        # A runner's writes touch only jobs it holds, or that no runner holds (a command's, or one
        # taken back from a dead runner): a runner paused past its lease cannot undo or record
        # over the jobs another runner has taken since.
        if self.runner_id is None:
            return "", ()
        return " AND (runner_id = ? OR runner_id IS NULL)", (self.runner_id,)

    async def mark_freed(self, job: Job) -> None:
        """The provider finished ``job`` (its slot is free): the account's count leaves it out."""
        now = time.time()
        await self._engine.write(lambda c: c.execute(
            "UPDATE jobs SET freed_at = ? WHERE id = ? AND freed_at IS NULL", (now, job.id)))

    async def reap(self, batches: Sequence[str] | None) -> tuple[int, int]:
        """Take back the jobs of runners whose lease expired, under one advisory lock: claimed
        but never sent go back to pending; caught mid-submit become unknown (their submit may
        have created a paid job). Jobs they had at the provider or downloading are left without
        a runner, for ``adopt``. Returns (back to pending, unknown)."""
        now = time.time()

        def apply(c: SyncConn) -> tuple[int, int]:
            row = c.execute("SELECT pg_try_advisory_xact_lock(?)", (_REAP_LOCK,)).fetchone()
            if not row or not row[0]:
                return 0, 0
            # The expired runners' rows go first: the DELETE locks them, so a renewal racing this
            # reap either commits first (the row is re-checked, live, and stays) or finds no row
            # after it (see _LIVE_LEASE's comment).
            c.execute(f"DELETE FROM runners WHERE expires_at < {_DB_NOW}", ())
            # A job whose runner has no row has nobody to answer for it: its lease expired (just
            # deleted), its row was gone already (a runner reaped while paused that claimed before
            # it learnt so), or it was claimed without a lease (runner_id NULL).
            dead = "(runner_id IS NULL OR runner_id NOT IN (SELECT id FROM runners))"
            back = c.execute(
                f"UPDATE jobs SET state = 'pending', attempts = GREATEST(attempts - 1, 0), updated_at = ?, "
                f"detail = 'claimed by a runner that died before sending it', runner_id = NULL "
                f"WHERE state = 'submitting' AND sent_at IS NULL AND {dead}", (now,)).rowcount
            lost = c.execute(
                f"UPDATE jobs SET state = 'unknown', updated_at = ?, "
                f"detail = 'its runner died between submit and its answer; outcome unknown', "
                f"error = 'the runner submitting this job died: it may or may not exist (and be billed) "
                f"at the provider', runner_id = NULL "
                f"WHERE state = 'submitting' AND {dead}", (now,)).rowcount
            c.execute(f"UPDATE jobs SET runner_id = NULL WHERE runner_id IS NOT NULL AND {dead}", ())
            if back:
                c.execute(f"NOTIFY {CHANNEL}, 'work'")
            return back, lost

        result: tuple[int, int] = await self._engine.write(apply)
        return result

    async def adopt(self, batches: Sequence[str] | None) -> list[Job]:
        """Jobs of ``batches`` at the provider or downloading that no runner holds (their runner
        died, or stopped): this runner's from now on. Rows another adopter holds are skipped."""
        where, args = filters(batches, [*FOLLOWED, DOWNLOADING])
        sql = (f"UPDATE jobs SET runner_id = ? WHERE id IN (SELECT id FROM jobs {where} AND runner_id IS NULL "
               f"FOR UPDATE SKIP LOCKED) RETURNING {JOB_COLUMNS}")
        rid = self.runner_id
        rows = await self._engine.write(lambda c: c.execute(sql, (rid, *args)).fetchall())
        return sorted((Job.from_row(r) for r in rows), key=lambda j: (j.batch, j.seq))

    async def held_elsewhere(self, batches: Sequence[str] | None) -> int:
        """Jobs of ``batches`` that other runners hold (claimed, at the provider, downloading):
        while there are any, a runner with nothing to do waits, to adopt them if their runner dies."""
        # Not overdue jobs: given up on, they are no reason to stay (two runners each holding
        # one would wait for each other for as long as the provider keeps them).
        where, args = filters(batches, [SUBMITTING, *REMOTE_ACTIVE, DOWNLOADING])
        rows = await self._db.execute_fetchall(
            f"SELECT COUNT(*) FROM jobs {where} AND (runner_id IS NULL OR runner_id != ?)",
            (*args, self.runner_id or ""))
        return int(rows[0][0])

    async def recover_interrupted(self, batches: Sequence[str] | None = None) -> list[Job]:
        """On a shared store the jobs caught mid-submit are those of dead runners (reap); the
        'submitting' jobs of live runners are theirs."""
        before = {j.id for j in await self.jobs(batches, [UNKNOWN])}
        await self.reap(batches)
        return [j for j in await self.jobs(batches, [UNKNOWN]) if j.id not in before]


