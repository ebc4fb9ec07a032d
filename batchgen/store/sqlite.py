"""The SQLite store: batches, jobs, their history and outputs, on one file.

``SqliteStore`` meets the store's contract (``protocol.Store``); the runner never sees SQL.
Its reads are in queries.py, the runner's writes (a job's moves, results, files) in
transitions.py, the group commit they go through in engine.py; here: opening the file, and the
writes of the commands (recording a manifest, retry, reuse, forget, cancel).

Durability: WAL mode with synchronous=NORMAL keeps every committed transaction across a killed
process (kill -9, OOM); a power loss may lose the last commits but never corrupts the file. Every
state change is committed (with its history row) before the runner takes the step that follows.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from ..constants import INSERT_CHUNK
from ..errors import StoreError
from ..migrations import migrate
from .engine import GroupCommit
from .models import OVERDUE, PENDING, REFRESHABLE, SUBMITTING, SUCCEEDED, TERMINAL, UNKNOWN, Job, Output
from .protocol import Store
from .queries import StoreReads
from .sql import filters
from .transitions import Transitions

# REFRESHABLE as SQL: a list of quoted words (a StrEnum's repr is not its word).
_REFRESHABLE_SQL = ", ".join(f"'{s}'" for s in REFRESHABLE)


class SqliteStore(StoreReads, Transitions, Store):
    """The batchgen store on one SQLite file. Open with ``await Store.open(path)``."""

    def __init__(self, db: aiosqlite.Connection, path: Path, engine: GroupCommit,
                 api: str | None = None):
        self._db = db
        self._engine = engine
        self.path = path
        # The API this store's claims are for: written on every job it claims (Job.api).
        self.api = api

    @classmethod
    async def open(cls, path: str | Path, *, api: str | None = None) -> SqliteStore:
        """Open (and migrate) the store at ``path``, creating it if missing. ``api``: the API the
        jobs this store claims are submitted to (see Job.api)."""
        path = Path(path)
        pending = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (GroupCommit.atomic), nothing implicit.
            pending = aiosqlite.connect(path, isolation_level=None)
            db = await pending
        except (OSError, aiosqlite.Error) as exc:
            # A failed connect stops aiosqlite's thread, which then calls back into this loop:
            # wait for it, or it may find the loop closed (a thread exception at exit).
            thread = getattr(pending, "_thread", None)
            if thread is not None:
                await asyncio.to_thread(thread.join, 5)
            raise StoreError(f"cannot open the store {path}: {exc}") from exc
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a killed process loses nothing committed; only a power loss can
            # drop the last transactions, and the file stays consistent either way.
            await db.execute("PRAGMA synchronous=NORMAL")
            await db.execute("PRAGMA foreign_keys=ON")
            # Another process (a status command during a run) may hold the write lock briefly.
            await db.execute("PRAGMA busy_timeout=10000")
            await migrate(db)
            engine = GroupCommit(db, path)
        except StoreError:
            await db.close()
            raise
        except (aiosqlite.Error, sqlite3.Error) as exc:
            await db.close()
            raise StoreError(f"cannot use the store {path}: {exc}") from exc
        return cls(db, path, engine, api)

    async def close(self) -> None:
        await self._engine.close()  # writes already asked for are committed first
        await self._db.close()  # the last connection to close checkpoints, in aiosqlite's thread

    # ---- the commands' writes ------------------------------------------------------------------

    async def upsert_batch(
        self, name: str, model_id: str, manifest_path: str | None, settings: dict[str, Any]
    ) -> None:
        now = time.time()
        async with self._engine.atomic() as db:
            await db.execute(
                """INSERT INTO batches (name, model_id, manifest_path, settings_json, created_at,
                                        updated_at)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET model_id = excluded.model_id,
                       manifest_path = excluded.manifest_path,
                       settings_json = excluded.settings_json, updated_at = excluded.updated_at""",
                (name, model_id, manifest_path, json.dumps(settings, sort_keys=True), now, now),
            )

    async def remember_cap(self, model_ids: Sequence[str], api: str, cap: int, settled: bool) -> None:
        """Keep ``cap`` for the next run. A settled cap (the account's limit was seen) replaces
        what was known; an unsettled one (every job ran at once, the limit may be higher) only
        raises it, and never replaces a settled one with a lower value."""
        now = time.time()
        async with self._engine.atomic() as db:
            for model_id in model_ids:
                await db.execute(
                    """INSERT INTO learned_caps (model_id, api, cap, settled, updated_at)
                       VALUES (?, ?, ?, ?, ?)
                       ON CONFLICT (model_id, api) DO UPDATE SET
                           cap = CASE WHEN excluded.settled <> 0 THEN excluded.cap
                                      ELSE MAX(learned_caps.cap, excluded.cap) END,
                           settled = CASE WHEN excluded.settled <> 0 THEN 1
                                          WHEN excluded.cap > learned_caps.cap THEN 0
                                          ELSE learned_caps.settled END,
                           updated_at = excluded.updated_at""",
                    (model_id, api, int(cap), int(settled), now),
                )

    async def add_rows(self, batch: str, rows: Iterable[tuple[Any, ...]]) -> int:
        """Record job rows (see job_row) in chunks, one transaction each; return how many were new.
        INSERT OR IGNORE on (batch, key): re-recording a grown manifest adds only its new jobs.
        A job already recorded that is not at the provider nor done (REFRESHABLE) takes the
        inputs the manifest now gives: the same key is the same generation (a local file is
        keyed by its content), but how it is sent (image_base_url, or inline) may have been
        fixed since, and its next submit or retry sends what the manifest says now. Its output
        name stays: a name is fixed when the job is first recorded (outputnames.py)."""
        added = 0
        now = time.time()
        chunk: list[tuple[Any, ...]] = []
        # A batch recorded for the first time has nothing to refresh: its rows skip that pass.
        rows_before = await self._db.execute_fetchall("SELECT 1 FROM jobs WHERE batch = ? LIMIT 1", (batch,))
        refresh_sql = (f"UPDATE jobs SET inputs_json = ?3 WHERE batch = ?1 AND key = ?2 AND inputs_json != ?3 "
                       f"AND state IN ({_REFRESHABLE_SQL})")

        async def flush() -> None:
            nonlocal added
            if not chunk:
                return
            async with self._engine.atomic() as db:
                before = db.total_changes
                await db.executemany(
                    """INSERT OR IGNORE INTO jobs (batch, key, seq, model_id, source, inputs_json,
                           meta_json, output_name, state, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)""",
                    chunk,
                )
                added += db.total_changes - before
                if rows_before:
                    await db.executemany(refresh_sql, ((r[0], r[1], r[5]) for r in chunk))
            chunk.clear()

        for row in rows:
            chunk.append((batch, *row, now, now))
            if len(chunk) >= INSERT_CHUNK:
                await flush()
        await flush()
        return added

    async def retire_missing(self, batch: str, keys: Iterable[str]) -> tuple[int, int]:
        """The manifest of ``batch`` now has exactly ``keys``: its other jobs are retired, and
        retired ones whose key is back are current again. Returns (retired now, brought back)."""
        now = time.time()
        async with self._engine.atomic() as db:
            await db.execute("CREATE TEMP TABLE IF NOT EXISTS manifest_keys (key TEXT PRIMARY KEY)")
            await db.execute("DELETE FROM manifest_keys")
            await db.executemany("INSERT OR IGNORE INTO manifest_keys (key) VALUES (?)",
                                 ((k,) for k in keys))
            cur = await db.execute(
                "UPDATE jobs SET retired_at = ?1, updated_at = ?1, detail = 'retired: no longer in the manifest' "
                "WHERE batch = ?2 AND retired_at IS NULL AND key NOT IN (SELECT key FROM manifest_keys)",
                (now, batch))
            retired = cur.rowcount
            cur = await db.execute(
                "UPDATE jobs SET retired_at = NULL, updated_at = ?, detail = 'back in the manifest' "
                "WHERE batch = ? AND retired_at IS NOT NULL AND key IN (SELECT key FROM manifest_keys)",
                (now, batch))
            back = cur.rowcount
            await db.execute("DELETE FROM manifest_keys")
        return retired, back

    async def requeue(self, job: Job, detail: str, *, expect: Sequence[str] = (*TERMINAL, OVERDUE)) -> None:
        """Put a finished (or overdue: `retry --force`) job, one in ``expect``, back to pending for
        a user-requested retry. Its history stays: the attempt it ended with is kept in
        ``job_attempts`` (attempts()) and its attempt count goes on; its request id, API, outputs
        and error are cleared so the next submit starts afresh."""
        async with self._engine.atomic() as db:
            if job.attempts > 0 or job.request_id is not None:
                await db.execute(
                    """INSERT INTO job_attempts (job_id, attempt, request_id, api, state, error,
                           error_code, cost, submitted_at, finished_at, retried_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                    (job.id, job.attempts, job.request_id, job.api, job.state, job.error,
                     job.error_code, job.cost, job.submitted_at, job.finished_at, time.time()),
                )
            await db.execute("DELETE FROM outputs WHERE job_id = ?", (job.id,))
            await self.transition(
                job, PENDING, expect=expect, detail=detail, attempts_before=job.attempts,
                request_id=None, queue_position=None, error=None, error_code=None, cost=None,
                not_before=None, submitted_at=None, started_at=None, finished_at=None, api=None,
            )

    async def record_reused(self, job: Job, source: Job, outputs: Sequence[Output]) -> None:
        """Pending ``job`` takes ``source``'s result: its outputs (files already in place) and
        its success, in one transaction. Nothing was paid for it (cost 0)."""
        now = time.time()
        async with self._engine.atomic() as db:
            await db.executemany(
                "INSERT INTO outputs (job_id, idx, kind, url, path, size, sha256, downloaded_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(job.id, o.idx, o.kind, o.url, o.path, o.size, o.sha256, now) for o in outputs])
            await self.transition(
                job, SUCCEEDED, expect=(PENDING,), detail=f"reused: the result of job {source.key} of "
                f"batch {source.batch} (request {source.request_id})", cost=0.0, api=source.api,
                submitted_at=source.submitted_at, started_at=source.started_at,
                finished_at=source.finished_at)

    async def forget(self, jobs: Sequence[Job]) -> int:
        """Remove the records of ``jobs`` (their history, outputs and earlier attempts with
        them), and of their batch once it has no job left; the caller checked that none is at the
        provider. Returns how many jobs were removed."""
        ids = [(j.id,) for j in jobs]
        batches = sorted({j.batch for j in jobs})
        async with self._engine.atomic() as db:
            for table in ("job_events", "outputs", "job_attempts"):
                await db.executemany(f"DELETE FROM {table} WHERE job_id = ?", ids)
            before = db.total_changes
            await db.executemany("DELETE FROM jobs WHERE id = ?", ids)
            removed = db.total_changes - before
            await db.executemany("DELETE FROM batches WHERE name = ? AND NOT EXISTS "
                                 "(SELECT 1 FROM jobs WHERE batch = batches.name)", [(b,) for b in batches])
        return removed

    # ---- cancel requests (from another process, while a run holds the work directory) ------------

    async def request_cancel(self, batch: str) -> int:
        """Record that ``batch`` is cancelled, and cancel its pending jobs, in one transaction:
        from then on no run claims a job of it (claim_many), and a run following its jobs
        cancels them at the provider (cancel_requests). Returns the pending jobs cancelled."""
        now = time.time()
        cancel = self._cancel_pending_sql([batch])

        def apply(conn: sqlite3.Connection) -> int:
            conn.execute("UPDATE batches SET cancel_requested_at = ? WHERE name = ?", (now, batch))
            return cancel(conn)

        return int(await self._engine.write(apply))

    async def cancel_pending(self, batches: Sequence[str]) -> int:
        """Pending jobs of ``batches`` become cancelled (never submitted); returns how many. A group
        write (not atomic()): the runner calls it from a task that may be cancelled."""
        return int(await self._engine.write(self._cancel_pending_sql(batches)))

    @staticmethod
    def _cancel_pending_sql(batches: Sequence[str]) -> Callable[[sqlite3.Connection], int]:
        where, args = filters(batches, [PENDING])
        sql = (f"UPDATE jobs SET state = 'cancelled', updated_at = ?, error = 'cancelled before submit', "
               f"detail = 'cancelled by the user before submit' {where}")
        return lambda conn: conn.execute(sql, (time.time(), *args)).rowcount

    async def clear_cancel(self, batches: Sequence[str], *, carried_out: bool = False) -> None:
        """The cancel requests of ``batches`` are withdrawn (a `retry`), or with ``carried_out``
        done: then a batch with a job pending or being submitted keeps its request."""
        where, args = filters(batches, None)
        sql = f"UPDATE batches SET cancel_requested_at = NULL {where.replace('batch IN', 'name IN')}"
        if carried_out:
            # On a shared store another runner may put a refused submit (a 429) back to pending
            # after this runner cancelled the pending jobs and saw no other runner busy: cleared
            # then, the request would leave that job to be submitted later. One statement: the
            # job is pending or submitting in whatever snapshot it reads, so it is always seen.
            sql += (" AND NOT EXISTS (SELECT 1 FROM jobs WHERE jobs.batch = batches.name "
                    "AND jobs.state IN ('pending', 'submitting'))")
        await self._engine.write(lambda conn: conn.execute(sql, args))

    async def recover_interrupted(self, batches: Sequence[str] | None = None) -> list[Job]:
        """Jobs left in 'submitting' by a run that died: their submit may have created a paid job
        that nothing can find, so they become 'unknown', never resubmitted automatically."""
        stuck = await self.jobs(batches, [SUBMITTING])
        for job in stuck:
            await self.transition(
                job, UNKNOWN, expect=(SUBMITTING,),
                detail="interrupted between submit and its answer; outcome unknown",
                error="the run stopped while this job was being submitted: it may or may not "
                      "exist (and be billed) at the provider",
            )
        return stuck

