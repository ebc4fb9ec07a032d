"""The store's schema history: numbered migrations, applied in order, each in one transaction.

A migration is an async function named ``mNNN_what`` taking an aiosqlite connection, registered by
``@migration`` (which refuses a number out of turn, so none can be left out of ``MIGRATIONS``). It
runs inside the transaction that also records it in ``migrations``, so a failing migration leaves
the file as it was. Never edit a migration that has shipped: add a new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import aiosqlite

from .errors import StoreError

log = logging.getLogger(__name__)

Migration = Callable[[aiosqlite.Connection], Awaitable[None]]

# Every migration, in order: filled by @migration as this module is read.
MIGRATIONS: list[Migration] = []


def migration(fn: Migration) -> Migration:
    """Register ``fn`` as the next migration. Its name must be ``mNNN_what`` with NNN one more than
    the last one's, so a migration cannot be left out, nor two take the same number."""
    expected = f"m{len(MIGRATIONS) + 1:03d}_"
    if not fn.__name__.startswith(expected):
        raise RuntimeError(f"migration {fn.__name__} registered where {expected}… was due")
    MIGRATIONS.append(fn)
    return fn


async def _run(db: aiosqlite.Connection, *statements: str) -> None:
    # One statement at a time: executescript() would COMMIT first and break the transaction.
    for sql in statements:
        await db.execute(sql)


@migration
async def m001_initial(db: aiosqlite.Connection) -> None:
    await _run(
        db,
        # One row per manifest run under a name. settings_json keeps what the manifest said at the
        # batch level (image_base_url, schema path) so a resume without the manifest still works.
        """CREATE TABLE batches (
            name TEXT PRIMARY KEY,
            model_id TEXT NOT NULL,
            manifest_path TEXT,
            settings_json TEXT NOT NULL DEFAULT '{}',
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        # A job is unique by (batch, key): the key hashes model + canonical inputs + repeat index,
        # so re-recording a grown manifest only adds the new rows (INSERT OR IGNORE).
        # request_id is the only handle on a paid job: it is written in the same transaction that
        # leaves 'submitting', and a job with one is never submitted again.
        """CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            batch TEXT NOT NULL REFERENCES batches(name),
            key TEXT NOT NULL,
            seq INTEGER NOT NULL,
            model_id TEXT NOT NULL,
            source TEXT NOT NULL DEFAULT '',
            inputs_json TEXT NOT NULL,
            meta_json TEXT NOT NULL DEFAULT '{}',
            state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0,
            request_id TEXT,
            queue_position INTEGER,
            error TEXT,
            error_code INTEGER,
            cost REAL,
            not_before REAL,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            submitted_at REAL,
            started_at REAL,
            finished_at REAL,
            UNIQUE (batch, key)
        )""",
        # The runner's hot queries: next pending job of a batch in manifest order, jobs to follow.
        "CREATE INDEX jobs_batch_state_seq ON jobs (batch, state, seq)",
        "CREATE INDEX jobs_state ON jobs (state)",
        "CREATE INDEX jobs_request_id ON jobs (request_id)",
        # Every state change, for post-mortems and reports; never updated, only appended.
        """CREATE TABLE job_events (
            id INTEGER PRIMARY KEY,
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            at REAL NOT NULL,
            from_state TEXT,
            to_state TEXT NOT NULL,
            detail TEXT
        )""",
        "CREATE INDEX job_events_job ON job_events (job_id)",
        # One row per output URL of a job's result. path/size/sha256 are set only once the file is
        # complete on disk, so a row without sha256 is an output still to fetch.
        """CREATE TABLE outputs (
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            idx INTEGER NOT NULL,
            kind TEXT NOT NULL,
            url TEXT NOT NULL,
            path TEXT,
            size INTEGER,
            sha256 TEXT,
            downloaded_at REAL,
            PRIMARY KEY (job_id, idx)
        )""",
    )


@migration
async def m002_history_by_trigger(db: aiosqlite.Connection) -> None:
    await _run(
        db,
        # The detail of the latest change, written by the same UPDATE that changes the state.
        "ALTER TABLE jobs ADD COLUMN detail TEXT",
        # A state change and its history row used to be two statements in a transaction (four
        # round trips to the database thread, with a lock held across them); a trigger makes it
        # one UPDATE that is atomic on its own. It fires only when state or detail is set, so
        # bookkeeping updates (queue position) leave no history.
        """CREATE TRIGGER jobs_history AFTER UPDATE OF state, detail ON jobs
           WHEN NEW.state IS NOT OLD.state OR NEW.detail IS NOT NULL
           BEGIN
             INSERT INTO job_events (job_id, at, from_state, to_state, detail)
             VALUES (NEW.id, NEW.updated_at, OLD.state, NEW.state, NEW.detail);
           END""",
    )


@migration
async def m003_drop_unused_indexes(db: aiosqlite.Connection) -> None:
    await _run(
        db,
        # Every query of jobs names its batches, so (batch, state, seq) serves them all; these two
        # were only upkeep: each state change and each request id rewrote an index entry (about a
        # tenth of a job's store time, measured on a fast batch).
        "DROP INDEX IF EXISTS jobs_state",
        "DROP INDEX IF EXISTS jobs_request_id",
    )


@migration
async def m004_unsynced_outputs(db: aiosqlite.Connection) -> None:
    await _run(
        db,
        # The boot id of the machine whose page cache held an output's file when it was recorded,
        # until a flush put it on disk (NULL: durable). See durability.py.
        "ALTER TABLE outputs ADD COLUMN unsynced_boot TEXT",
        # Partial: holds only the few outputs still waiting for a flush, so a start finds them at
        # once however large the store.
        "CREATE INDEX outputs_unsynced ON outputs (job_id) WHERE unsynced_boot IS NOT NULL",
    )


@migration
async def m005_overdue_jobs_are_followed(db: aiosqlite.Connection) -> None:
    await _run(
        db,
        # 'timed_out' used to mean "given up" whatever the provider said to the cancel that came
        # with it, so a job it could not cancel kept running, was billed, and was never downloaded
        # (and `retry` submitted it again). Such jobs are 'overdue' now: followed by the next run,
        # left alone by `retry`. Only the cancel's answer, kept in the error text, tells them from
        # the jobs really cancelled at the provider, which stay 'timed_out' (safe to retry). The
        # state change writes a history row (m002's trigger) saying why.
        """UPDATE jobs SET state = 'overdue', updated_at = (julianday('now') - 2440587.5) * 86400.0,
               detail = 'timed out but not cancelled at the provider: followed again (migration 5)'
           WHERE state = 'timed_out' AND request_id IS NOT NULL
             AND COALESCE(error, '') NOT LIKE '%(cancel: cancelled)'""",
    )


@migration
async def m006_job_api(db: aiosqlite.Connection) -> None:
    await _run(
        db,
        # The API a job was submitted to: "simulator" (the built-in one, --simulate) or the API's
        # base URL. Written with the claim, before the submit, so a job's request id and result
        # always come with the API they belong to; a request id means nothing to another API.
        # NULL: not submitted yet, or submitted before batchgen kept track (migration 6).
        # Simulated and real jobs live in separate stores (ARCHITECTURE.md, "Realms"): within one
        # store the column lets a run refuse to follow, or count as done, another API's jobs.
        "ALTER TABLE jobs ADD COLUMN api TEXT",
    )


@migration
async def m007_cancel_requests_attempts_retired(db: aiosqlite.Connection) -> None:
    await _run(
        db,
        # `batchgen cancel` while a run holds the work directory: it records the request here
        # (no lock needed: one write through SQLite's own locking), claims never take a job of
        # a batch with a request, and the running process cancels its queued jobs at the
        # provider. NULL: no cancel waiting for a run to carry it out.
        "ALTER TABLE batches ADD COLUMN cancel_requested_at REAL",
        # The attempts a job had before its latest `retry`: the automatic retry policy counts
        # only this round's (attempts - attempts_before), while `attempts` goes on counting.
        "ALTER TABLE jobs ADD COLUMN attempts_before INTEGER NOT NULL DEFAULT 0",
        # One row per finished attempt that a `retry` put aside: what it was sent as, where it
        # went and how it ended, so the report lists every attempt, not only the last.
        """CREATE TABLE job_attempts (
            job_id INTEGER NOT NULL REFERENCES jobs(id),
            attempt INTEGER NOT NULL,
            request_id TEXT,
            api TEXT,
            state TEXT NOT NULL,
            error TEXT,
            error_code INTEGER,
            cost REAL,
            submitted_at REAL,
            finished_at REAL,
            retried_at REAL NOT NULL
        )""",
        "CREATE INDEX job_attempts_job ON job_attempts (job_id)",
        # A job whose spec left the manifest (run again without it): retired, when. Not a state:
        # a retired job at the provider is still followed and downloaded (it is paid for); it is
        # never submitted or retried, and counts, exit codes and advice leave it out. NULL: the
        # manifest still has it.
        "ALTER TABLE jobs ADD COLUMN retired_at REAL",
        # Jobs by key across batches: the same request already succeeded in another batch
        # (reuse.py). A key never changes, so the index costs only the insert of a job.
        "CREATE INDEX jobs_key ON jobs (key)",
    )


@migration
async def m008_learned_caps(db: aiosqlite.Connection) -> None:
    await _run(
        db,
        # The in-flight cap `--concurrency auto` found for a model at an API (limits.AdaptiveCap),
        # so that the next run starts near it instead of finding it again. `settled`: the
        # account's limit was seen (jobs waited), not only a cap that all ran.
        """CREATE TABLE learned_caps (
            model_id TEXT NOT NULL,
            api TEXT NOT NULL,
            cap INTEGER NOT NULL,
            settled INTEGER NOT NULL,
            updated_at REAL NOT NULL,
            PRIMARY KEY (model_id, api)
        )""",
    )


@migration
async def m009_output_names(db: aiosqlite.Connection) -> None:
    await _run(
        db,
        # The stem of a job's output files when the manifest names them (`output_name`,
        # outputnames.py); NULL: the job's key, as every job recorded before this was named. Set
        # once, when the job is first recorded (unique in its batch then), and never updated:
        # files already downloaded keep their names whatever the manifest says later. No index:
        # it is read per batch, once per run that records a manifest with names.
        "ALTER TABLE jobs ADD COLUMN output_name TEXT",
    )


@migration
async def m010_runner_leases(db: aiosqlite.Connection) -> None:
    await _run(
        db,
        # Several runners on one shared store (PostgreSQL, runner/leasing.py): each holds a lease
        # (id, host, pid, expiry) it renews, and the jobs it claimed or follows name it. A job
        # whose runner's lease expired is taken back (never sent: pending; caught mid-submit:
        # unknown; at the provider: adopted by a live runner). `sent_at`: its submit was about
        # to reach the wire. SQLite's store has one runner (the work-directory lock), so these
        # stay empty there; the columns keep both schemas the same at every migration.
        """CREATE TABLE runners (id TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,
                                 started_at REAL NOT NULL, expires_at REAL NOT NULL)""",
        "ALTER TABLE jobs ADD COLUMN runner_id TEXT",
        "ALTER TABLE jobs ADD COLUMN sent_at REAL",
        # The provider said the job finished: its slot is free for the account's cap across
        # runners, though its result may still be downloading.
        "ALTER TABLE jobs ADD COLUMN freed_at REAL",
        # (PostgreSQL's store also indexes jobs by runner; here it would be upkeep for nothing.)
    )


def refuse_newer(done: set[str], what: str) -> None:
    """A store whose recorded migrations include one this code does not know was upgraded by a
    newer batchgen: refuse it (StoreError) rather than misread or damage it."""
    known = {fn.__name__ for fn in MIGRATIONS}
    newer = sorted(done - known)
    if newer:
        raise StoreError(f"{what} was upgraded by a newer batchgen (migration {newer[-1]}); "
                         "upgrade batchgen to use it")


async def migrate(db: aiosqlite.Connection, migrations: list[Migration] | None = None) -> list[str]:
    """Apply every migration not yet recorded; return the names applied."""
    migrations = MIGRATIONS if migrations is None else migrations
    await db.execute(
        "CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    async with db.execute("SELECT name FROM migrations") as cur:
        done = {row[0] for row in await cur.fetchall()}
    refuse_newer(done - {fn.__name__ for fn in migrations}, "the store")
    applied = []
    for fn in migrations:
        name = fn.__name__
        if name in done:
            continue
        # IMMEDIATE: take the write lock up front so two processes opening a fresh store at once
        # cannot both run the same migration.
        await db.execute("BEGIN IMMEDIATE")
        try:
            async with db.execute("SELECT 1 FROM migrations WHERE name = ?", (name,)) as cur:
                if await cur.fetchone():
                    await db.execute("ROLLBACK")
                    continue
            await fn(db)
            await db.execute(
                "INSERT INTO migrations (name, applied_at) VALUES (?, ?)", (name, time.time())
            )
            await db.execute("COMMIT")
        except BaseException as exc:
            await db.execute("ROLLBACK")
            if isinstance(exc, Exception):
                raise StoreError(f"migration {name} failed and was rolled back: {exc}") from exc
            raise
        log.info("applied store migration %s", name)
        applied.append(name)
    return applied
