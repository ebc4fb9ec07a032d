"""The runner's writes to the SQLite store: a job's moves through its states (claims first), its
result and its files. Each is one group-committed write (engine.py); each job changed in the store
is changed in place too, once committed."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from ..errors import StoreError
from .engine import GroupCommit
from .models import DOWNLOADING, FAILED, FOLLOWED, IN_QUEUE, PENDING, SUCCEEDED, Job, Output
from .sql import (
    JOB_COLUMNS,
    NOT_CANCELLED,
    SETTABLE,
    apply_transition,
    filters,
    result_fields,
    transition_sql,
)


class Transitions:
    """The runner's writes: part of ``SqliteStore``."""

    _engine: GroupCommit
    api: str | None

    def owner_clause(self) -> tuple[str, tuple[Any, ...]]:
        """SQL (and its parameters) a runner's transition adds to say the job is still its own:
        nothing on SQLite, where the work-directory lock makes one runner (PostgresStore: leases)."""
        return "", ()

    async def _owned_write(self, fn: Any, what: str | None = None) -> Any:
        """``self._engine.write(fn, what)`` for a write confined by ``owner_clause``: the place a
        shared store turns a refusal into LeaseLost (PostgresStore)."""
        return await self._engine.write(fn, what)

    def _check_owned(self, conn: sqlite3.Connection, job_id: int) -> None:
        """Refuse (StoreError, the savepoint undone) a write of a job's outputs when the job is no
        longer this runner's (``owner_clause``): outputs have no runner of their own."""
        owned, owner = self.owner_clause()
        if owned and conn.execute(f"SELECT 1 FROM jobs WHERE id = ?{owned}", (job_id, *owner)).fetchone() is None:
            raise StoreError(f"job {job_id} is held by another runner")

    def _owned(self, move: tuple[str, list[Any]]) -> tuple[str, list[Any]]:
        """A transition's SQL confined to the jobs this runner holds (``owner_clause``)."""
        owned, owner = self.owner_clause()
        return (move[0] + owned, [*move[1], *owner]) if owned else move

    async def claim_many(self, batches: Sequence[str] | None, now: float, limit: int) -> list[Job]:
        """Like claim_pending for up to ``limit`` jobs at once, in manifest order. One statement
        (UPDATE … RETURNING): atomic, and one round trip however many slots just came free."""
        where, args = filters(batches, [PENDING])
        # The API is part of the intent: whatever the submit leads to belongs to that API.
        # A batch whose cancel was requested is never claimed from: the request and the claim
        # are both writes, so SQLite orders them, and no job is sent after its cancel.
        sql = f"""UPDATE jobs SET state = 'submitting', attempts = attempts + 1, updated_at = ?,
                      detail = 'attempt ' || (attempts + 1), api = COALESCE(?, api)
                  WHERE id IN (SELECT id FROM jobs {where} AND {NOT_CANCELLED} AND retired_at IS NULL
                               AND (not_before IS NULL OR not_before <= ?) ORDER BY seq LIMIT ?)
                  RETURNING {JOB_COLUMNS}"""
        params = (now, self.api, *args, now, max(1, limit))

        def claim(conn: sqlite3.Connection) -> list[Any]:
            self._engine.check_file()  # never claim (then pay for) a job into a store that is gone
            return conn.execute(sql, params).fetchall()

        rows = await self._engine.write(claim)
        # RETURNING gives no order: put them back in manifest order.
        return sorted((Job.from_row(r) for r in rows), key=lambda j: j.seq)

    async def transition(self, job: Job, state: str, *, expect: Sequence[str] | None = None,
                         detail: str | None = None, shield: bool = False, **fields: Any) -> None:
        """Move ``job`` to ``state`` (setting ``fields``) and append the history row, in one
        transaction. With ``expect``, refuse unless the stored state is one of those: that catches
        two actors racing on one job. ``job`` is updated in place. ``shield``: committed even if the
        caller is cancelled while it waits, and logged if it then fails (see _write)."""
        if not SETTABLE.issuperset(fields):
            raise ValueError(f"not settable: {sorted(set(fields) - SETTABLE)}")
        now = time.time()
        sql, params = self._owned(transition_sql(job.id, state, now, detail, fields, expect))
        # One statement; the jobs_history trigger appends the history row in the same statement.
        what = (f"recording job {job.key} as {state}" + (f" ({detail})" if detail else "")) if shield else None
        await self._owned_write(lambda conn: apply_transition(conn, job.key, job.id, sql, params, expect), what)
        job.state = state
        job.updated_at = now
        for k, v in fields.items():
            setattr(job, k, v)

    async def update_fields(self, job: Job, **fields: Any) -> None:
        """Change bookkeeping fields (queue position, …) without a state change or history row."""
        bad = set(fields) - SETTABLE
        if bad or not fields:
            raise ValueError(f"not settable: {sorted(bad)}")
        owned, owner = self.owner_clause()
        sql = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?{owned}"
        params = (*fields.values(), job.id, *owner)

        def apply(conn: sqlite3.Connection) -> None:
            if conn.execute(sql, params).rowcount != 1 and owned:
                raise StoreError(f"job {job.key} is held by another runner")

        await self._owned_write(apply)
        for k, v in fields.items():
            setattr(job, k, v)

    async def refollow(self, job: Job, detail: str) -> None:
        """Put a failed job whose output was lost (``OUTPUT_LOST``) back among the jobs at the
        provider, request id kept: the next run asks its result again and downloads it, under
        the settings of now. Submitting it again would pay for it twice."""
        await self.transition(job, IN_QUEUE, expect=(FAILED,), detail=detail, error=None,
                              error_code=None, finished_at=None)

    async def record_result(
        self, job: Job, outputs: Sequence[tuple[str, str]], *, cost: float | None,
        finished_at: float | None,
    ) -> None:
        """Record a succeeded result's output URLs [(kind, url)] and move the job to downloading,
        in one transaction. A refreshed result (expired URLs) replaces URLs of outputs not yet
        downloaded and keeps finished files as they are."""
        rows = [(job.id, idx, kind, url) for idx, (kind, url) in enumerate(outputs)]
        move = None
        now = time.time()
        fields = result_fields(job, cost, finished_at)
        if job.state != DOWNLOADING:
            move = self._owned(transition_sql(job.id, DOWNLOADING, now, f"{len(outputs)} output(s)", fields,
                                              None))

        def apply(conn: sqlite3.Connection) -> None:
            self._check_owned(conn, job.id)
            conn.executemany(
                """INSERT INTO outputs (job_id, idx, kind, url) VALUES (?, ?, ?, ?)
                   ON CONFLICT (job_id, idx) DO UPDATE SET url = excluded.url, kind = excluded.kind
                   WHERE outputs.sha256 IS NULL""",
                rows,
            )
            if move is not None:
                apply_transition(conn, job.key, job.id, *move, None)

        await self._owned_write(apply)  # outputs and the state change: one savepoint, all or nothing
        if move is not None:
            job.state, job.updated_at = DOWNLOADING, now
            job.cost, job.finished_at = cost, finished_at

    async def record_downloaded(
        self, job: Job, outputs: Sequence[Output], *, cost: float | None, finished_at: float | None,
        unsynced_boot: str | None = None,
    ) -> None:
        """A succeeded result whose outputs are already whole in place (``outputs`` with path,
        size and sha256 set): the outputs, their files and the job's success in one write, where
        record_result and output_downloaded would take two. The job must still be followed at the
        provider's (in_queue, in_progress or overdue) in the store. ``unsynced_boot``: the files are not
        flushed yet (durability.py)."""
        now = time.time()
        rows = [(job.id, o.idx, o.kind, o.url, o.path, o.size, o.sha256, now, unsynced_boot)
                for o in outputs]
        fields = result_fields(job, cost, finished_at)
        move = self._owned(transition_sql(job.id, SUCCEEDED, now, f"{len(outputs)} output(s) downloaded",
                                          fields, FOLLOWED))

        def apply(conn: sqlite3.Connection) -> None:
            self._check_owned(conn, job.id)
            for row in rows:
                conn.execute(
                    """INSERT INTO outputs (job_id, idx, kind, url, path, size, sha256, downloaded_at,
                                           unsynced_boot)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT (job_id, idx) DO UPDATE SET kind = excluded.kind, url = excluded.url,
                           path = excluded.path, size = excluded.size, sha256 = excluded.sha256,
                           downloaded_at = excluded.downloaded_at,
                           unsynced_boot = excluded.unsynced_boot""",
                    row,
                )
            apply_transition(conn, job.key, job.id, *move, FOLLOWED)

        await self._owned_write(apply)
        job.state, job.updated_at = SUCCEEDED, now
        job.cost, job.finished_at = cost, finished_at

    async def output_downloaded(
        self, out: Output, path: str, size: int, sha256: str, *, job_done: Job | None = None,
        unsynced_boot: str | None = None,
    ) -> None:
        """Record a complete file. ``job_done``: it was the job's last missing output, so the job
        becomes 'succeeded' in the same write. ``unsynced_boot``: as for record_downloaded."""
        now = time.time()
        params = (path, size, sha256, now, unsynced_boot, out.job_id, out.idx)
        move = None
        if job_done is not None:
            move = self._owned(transition_sql(job_done.id, SUCCEEDED, now, None, {}, (DOWNLOADING,)))

        def apply(conn: sqlite3.Connection) -> None:
            self._check_owned(conn, out.job_id)
            conn.execute("UPDATE outputs SET path = ?, size = ?, sha256 = ?, downloaded_at = ?, "
                         "unsynced_boot = ? WHERE job_id = ? AND idx = ?", params)
            if job_done is not None and move is not None:
                apply_transition(conn, job_done.key, job_done.id, *move, (DOWNLOADING,))

        await self._owned_write(apply)
        out.path, out.size, out.sha256 = path, size, sha256
        if job_done is not None:
            job_done.state, job_done.updated_at = SUCCEEDED, now

    async def mark_synced(self, keys: Sequence[tuple[int, int]]) -> None:
        """Outputs (job id, idx) whose files a flush has put on disk."""
        rows = list(keys)
        # Only this runner's jobs: another's may have rewritten the files since (not flushed yet).
        owned, owner = self.owner_clause()
        mine = f" AND job_id IN (SELECT id FROM jobs WHERE TRUE{owned})" if owned else ""
        rows = [(*k, *owner) for k in rows]

        def apply(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE outputs SET unsynced_boot = NULL WHERE job_id = ? AND idx = ? "
                             f"AND unsynced_boot IS NOT NULL{mine}", rows)

        await self._engine.write(apply)

    async def output_lost(self, job: Job, idxs: Sequence[int], why: str) -> None:
        """Some of a job's recorded output files are gone or damaged: forget those files (their
        URLs stay) and put a succeeded job back to downloading, in one write."""
        now = time.time()
        move = None
        if job.state == SUCCEEDED:
            move = self._owned(transition_sql(job.id, DOWNLOADING, now, why, {}, (SUCCEEDED,)))
        rows = [(job.id, idx) for idx in idxs]

        def apply(conn: sqlite3.Connection) -> None:
            self._check_owned(conn, job.id)
            conn.executemany("UPDATE outputs SET path = NULL, size = NULL, sha256 = NULL, "
                             "downloaded_at = NULL, unsynced_boot = NULL WHERE job_id = ? AND idx = ?",
                             rows)
            if move is not None:
                apply_transition(conn, job.key, job.id, *move, (SUCCEEDED,))

        await self._owned_write(apply)
        if move is not None:
            job.state, job.updated_at = DOWNLOADING, now


# Outputs first, through their partial index (a handful of rows however large the store), then
