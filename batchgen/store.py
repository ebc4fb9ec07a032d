"""The SQLite store: batches, jobs, their history and outputs, behind one narrow async interface.

The runner talks to the store only through ``Store``'s methods, never SQL, so that the same
interface can later sit on PostgreSQL for several runners sharing one queue.

Durability: WAL mode with synchronous=NORMAL keeps every committed transaction across a killed
process (kill -9, OOM); a power loss may lose the last commits but never corrupts the file. Every
state change is committed (with its history row) before the runner takes the step that follows.

Speed: the runner's writes are group-committed on a second, plain sqlite3 connection that is used
only on the event loop's thread. Writes requested meanwhile are applied together in one
transaction, at the next turn of the loop or, under load, up to 2 ms later (_GROUP_WINDOW): no
thread hop, no GIL hand-off (both cost more than the SQL itself), and in WAL mode with
synchronous=NORMAL a commit is an append to the log, tens of microseconds. A caller's await returns
only once its write is committed, so "commit, then act" holds for every job while many jobs share a
commit. If one write of a group fails, the group is rolled back and replayed with each write in its
own savepoint, so that one failure leaves the others alone (failures are rare; savepoints on every
write would double the statements). Checkpoints, which fsync, are taken off the loop: the writer
never checkpoints itself, aiosqlite's thread does it every so many writes (the one sync left on the
loop is SQLite's of the log's header when it starts the log over after a checkpoint: one per ~1,000
writes). Reads, and the multi-statement transactions of atomic(), stay on aiosqlite's connection; a
group commit never runs while one of those is open. A group that finds the write lock held by
another process waits for it with asyncio.sleep, never in SQLite's busy handler, which would freeze
the loop.

The file itself: a store deleted (or replaced, or truncated) under a running process goes on
working on the open, unlinked file, and everything recorded from then on is lost with it. So the
store checks that its path still names the file it opened before every claim (a claim is the
step before money is spent) and, at most every STORE_CHECK_EVERY seconds, before a group commit;
once it is gone every write fails, and the run stops.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from .constants import INSERT_CHUNK, STORE_CHECK_EVERY
from .errors import StoreError
from .jobkeys import canonical_json
from .migrations import migrate

log = logging.getLogger(__name__)

# A write waiting for a group commit: the write, its caller's future, and for a shielded write
# what it does (for the log), None for the others.
_Queued = tuple[Callable[[sqlite3.Connection], Any], asyncio.Future[Any], str | None]

# Group-committed writes between two checkpoints of the log (SQLite's own default is 1000 pages;
# a job's write touches a few).
_CHECKPOINT_EVERY = 1000
# How long group commits wait for another process's write lock before failing (seconds).
_BUSY_WAIT = 10.0
# Under load, at most one group commit per this many seconds: after a group of several writes, the
# writes of the next 2 ms join the next group. A lone write (after a quiet spell, or from a caller
# awaiting one write after another) is committed at the next turn of the loop. A commit costs
# about as much as its writes (BEGIN, then every touched page appended to the log): on 5,000
# instant jobs this took the store's share of the loop from 0.28 s to 0.21 s (1,400 groups became
# ~600), and the batch ~3% faster, though a write under load may wait 2 ms more.
_GROUP_WINDOW = 0.002

# Job states; see ARCHITECTURE.md for the diagram.
PENDING = "pending"
SUBMITTING = "submitting"
IN_QUEUE = "in_queue"
IN_PROGRESS = "in_progress"
# Past its job timeout (or its answers unreadable) and not cancelled: the provider may still
# deliver it, and bill it, so it is still followed (slowly by this run, again by the next), and
# `retry` leaves it alone unless --force.
OVERDUE = "overdue"
DOWNLOADING = "downloading"
SUCCEEDED = "succeeded"
FAILED = "failed"
UNKNOWN = "unknown"
CANCELLED = "cancelled"
TIMED_OUT = "timed_out"

STATES = (
    PENDING, SUBMITTING, IN_QUEUE, IN_PROGRESS, OVERDUE, DOWNLOADING,
    SUCCEEDED, FAILED, UNKNOWN, CANCELLED, TIMED_OUT,
)
# Jobs with a request id that the provider is still working on.
REMOTE_ACTIVE = (IN_QUEUE, IN_PROGRESS)
# Jobs with a request id whose result may still come: polled by every run.
FOLLOWED = (*REMOTE_ACTIVE, OVERDUE)
TERMINAL = (SUCCEEDED, FAILED, UNKNOWN, CANCELLED, TIMED_OUT)
# How a failed job whose result the provider delivered, but whose files could not be fetched
# (a host not allowed, a size cap), says so: `retry` follows it again instead of paying again.
OUTPUT_LOST = "output could not be downloaded"
# Jobs whose recorded inputs a rerun of the manifest refreshes: not at the provider, not done;
# their next submit (pending) or retry sends them.
REFRESHABLE = (PENDING, FAILED, UNKNOWN, CANCELLED, TIMED_OUT)

_JOB_COLUMNS = (
    "id, batch, key, seq, model_id, source, inputs_json, meta_json, state, attempts, request_id, "
    "queue_position, error, error_code, cost, not_before, created_at, updated_at, submitted_at, "
    "started_at, finished_at, api, attempts_before, retired_at"
)
# Columns a transition may set besides state.
_SETTABLE = {
    "attempts", "request_id", "queue_position", "error", "error_code", "cost", "not_before",
    "submitted_at", "started_at", "finished_at", "api", "attempts_before",
}


@dataclass
class Job:
    """One generation request of a batch, as recorded."""

    id: int
    batch: str
    key: str
    seq: int
    model_id: str
    source: str
    inputs: dict[str, Any]
    meta: dict[str, Any]
    state: str
    attempts: int
    request_id: str | None
    queue_position: int | None
    error: str | None
    error_code: int | None
    cost: float | None
    not_before: float | None
    created_at: float
    updated_at: float
    submitted_at: float | None
    started_at: float | None
    finished_at: float | None
    _: KW_ONLY  # from_row fills the fields above from one *row, these two by name
    # ``inputs`` as recorded: JSON text, which a submit sends as it is (None: not read from the
    # store, as in a job built by hand).
    inputs_json: str | None = None
    # The API it was submitted to: SIMULATOR_API or a base URL (None: not yet, or not recorded).
    api: str | None = None
    # The attempts it had before its latest `retry` (the automatic retries of a round count
    # ``attempts - attempts_before``; ``attempts`` goes on from one round to the next).
    attempts_before: int = 0
    # When its spec left the manifest (None: still in it). See m007.
    retired_at: float | None = None

    @property
    def round_attempts(self) -> int:
        """Attempts since the latest `retry` (or since it was recorded)."""
        return self.attempts - self.attempts_before

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Job:
        (id_, batch, key, seq, model_id, source, inputs_json, meta_json, *rest, api, before,
         retired_at) = row
        return cls(id_, batch, key, seq, model_id, source, json.loads(inputs_json),
                   json.loads(meta_json), *rest, inputs_json=inputs_json, api=api,
                   attempts_before=before, retired_at=retired_at)


@dataclass
class Output:
    """One output file of a job: its URL, and once downloaded, where it is and its digest."""

    job_id: int
    idx: int
    kind: str
    url: str
    path: str | None
    size: int | None
    sha256: str | None


@dataclass
class Attempt:
    """One earlier attempt of a job, put aside by a `retry`."""

    attempt: int
    request_id: str | None
    api: str | None
    state: str
    error: str | None
    error_code: int | None
    cost: float | None
    submitted_at: float | None
    finished_at: float | None


@dataclass
class Batch:
    name: str
    model_id: str
    manifest_path: str | None
    settings: dict[str, Any]
    created_at: float
    updated_at: float


# Job.api of a job run on the built-in simulator (--simulate); real APIs are named by base URL.
SIMULATOR_API = "simulator"


class Store:
    """The batchgen store on one SQLite file. Open with ``await Store.open(path)``."""

    def __init__(self, db: aiosqlite.Connection, path: Path, writer: sqlite3.Connection,
                 api: str | None = None):
        self._db = db
        self._w = writer  # the loop thread's connection for group commits
        self.path = path
        # The API this store's claims are for: written on every job it claims (Job.api).
        self.api = api
        self._identity = _file_identity(path)  # the file opened (device, inode)
        self._checked_at = time.monotonic()
        self._writes_since_checkpoint = 0
        self._checkpoint: asyncio.Task[None] | None = None
        self._tx_lock = asyncio.Lock()
        self._tx_owner: asyncio.Task[Any] | None = None
        self._group: list[_Queued] = []  # writes waiting for the next group commit
        self._committer: asyncio.Task[None] | None = None
        self._last_commit = 0.0  # time.monotonic() of the last group commit
        self._last_group = 0  # how many writes it had

    @classmethod
    async def open(cls, path: str | Path, *, api: str | None = None) -> Store:
        """Open (and migrate) the store at ``path``, creating it if missing. ``api``: the API the
        jobs this store claims are submitted to (see Job.api)."""
        path = Path(path)
        pending = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (atomic()), nothing implicit.
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
            writer = _open_writer(path)
        except StoreError:
            await db.close()
            raise
        except (aiosqlite.Error, sqlite3.Error) as exc:
            await db.close()
            raise StoreError(f"cannot use the store {path}: {exc}") from exc
        return cls(db, path, writer, api)

    def check_file(self) -> None:
        """Raise StoreError unless the store's path still names the file this store opened, with
        something in it (see the module docstring)."""
        self._checked_at = time.monotonic()
        try:
            st = os.stat(self.path)
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == self._identity and st.st_size > 0:
            return
        raise StoreError(
            f"the store {self.path} was deleted, replaced or emptied while this run was using it: "
            "nothing could be recorded any more, so the run stopped (jobs it submitted may still "
            "run, and be billed, at the provider; their request ids were in that store)"
        )

    async def close(self) -> None:
        # Writes already asked for are not lost, even if the committer was cancelled meanwhile.
        while self._group or (self._committer is not None and not self._committer.done()):
            self._start_committer()
            assert self._committer is not None
            await asyncio.shield(self._committer)
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        self._w.close()
        await self._db.close()  # the last connection to close checkpoints, in aiosqlite's thread

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def atomic(self) -> AsyncIterator[aiosqlite.Connection]:
        """One transaction: everything inside commits together or not at all.

        Many runner tasks share this one connection, so transactions are serialized with a lock:
        without it a second task's write would silently join (and roll back with) the first's.
        A nested atomic() in the same task joins the outer transaction.
        """
        task = asyncio.current_task()
        if self._tx_owner is task:
            yield self._db
            return
        async with self._tx_lock:
            self._tx_owner = task
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    await self._db.execute("ROLLBACK")
                    raise
                try:
                    await self._db.execute("COMMIT")
                except aiosqlite.Error as exc:
                    await self._db.execute("ROLLBACK")
                    raise StoreError(f"cannot commit to the store: {exc}") from exc
            finally:
                self._tx_owner = None

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(connection, *args)`` in the connection's own thread: a whole operation of
        several statements costs one round trip. aiosqlite has no public call for this; its
        ``_execute`` (the primitive every public method uses) is the one private name used here."""
        return await self._db._execute(fn, self._db._conn, *args)  # type: ignore[no-untyped-call]  # private, unannotated

    async def _write(self, fn: Callable[[sqlite3.Connection], Any], shield: str | None = None) -> Any:
        """Run ``fn(connection)`` in a group commit (see the module docstring) and return its result
        once committed. Inside the caller's own atomic() it simply joins that transaction.
        ``shield``: what the write does ("recording job … as in_queue (request …)"); given, the
        write is committed even if the caller is cancelled while it waits, and if it then fails,
        that is logged with this text. Otherwise a write whose caller is gone before its group
        starts is dropped."""
        if self._tx_owner is not None and self._tx_owner is asyncio.current_task():
            return await self._in_thread(fn)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # Shielded by the committer itself rather than asyncio.shield (a second future and two
        # callbacks per write, on the hot path): a cancelled caller cancels ``fut``, and the
        # committer still applies a shielded write whose future is cancelled.
        self._group.append((fn, fut, shield))
        self._start_committer()
        return await fut

    def _start_committer(self) -> None:
        """Start committing queued writes unless a committer is already at it."""
        if self._committer is None or self._committer.done():
            self._committer = asyncio.ensure_future(self._commit_groups())

    async def _commit_groups(self) -> None:
        while self._group:
            # Only when the last group had company: a caller awaiting one write after another
            # (a cancel of 100,000 jobs) has nothing to group with and must not wait each time.
            wait = self._last_commit + _GROUP_WINDOW - time.monotonic()
            if wait > 0 and self._last_group > 1:
                await asyncio.sleep(wait)  # see _GROUP_WINDOW
            # A write whose caller was cancelled before it went in is dropped, not committed
            # behind its back (a claim nobody will send would become 'unknown'), unless shielded.
            group = _live(self._group)
            self._group = []
            try:
                waited = 0.0
                while group:
                    async with self._tx_lock:  # never inside another task's open transaction
                        # Synchronous, on this thread: nothing else runs meanwhile, so no write can
                        # slip in between, and a cancellation cannot land halfway through.
                        try:
                            if time.monotonic() - self._checked_at >= STORE_CHECK_EVERY:
                                self.check_file()
                            results = _apply_group(self._w, [fn for fn, _, _ in group])
                        except Exception as exc:  # noqa: BLE001 - the file itself is unusable
                            err = exc if isinstance(exc, StoreError) else StoreError(f"store write failed: {exc}")
                            results = [(False, err)] * len(group)
                    if results is not None:
                        break
                    # Another process holds the write lock (a `batchgen retry`, an sqlite3 shell):
                    # wait for it here, not in SQLite's busy handler, which would freeze the loop.
                    if waited >= _BUSY_WAIT:
                        err = StoreError(f"cannot commit to the store: locked by another process for "
                                         f"{_BUSY_WAIT:g} s")
                        results = [(False, err)] * len(group)
                        break
                    delay = min(0.1, max(0.005, waited))  # 5 ms, doubling, at most 100 ms
                    await asyncio.sleep(delay)
                    waited += delay
                    group = _live(group)
            except asyncio.CancelledError:
                # Cancelled before the group was applied (it is applied synchronously, after the
                # awaits): its writes go back in the queue, for close() or the next committer.
                self._group[:0] = group
                raise
            self._last_commit, self._last_group = time.monotonic(), len(group)
            if not group:
                continue
            assert results is not None  # the loop above ends with results, or with no group left
            for (_, fut, what), (ok, value) in zip(group, results, strict=True):
                if fut.done():
                    # Its caller was cancelled meanwhile (the run is being torn down): the write
                    # is committed or, shielded and failed, logged, since nobody else will say.
                    if not ok and what is not None:
                        log.error("%s failed after the run stopped waiting for it: %s", what, value)
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
            self._writes_since_checkpoint += len(group)
            if self._writes_since_checkpoint >= _CHECKPOINT_EVERY and (
                self._checkpoint is None or self._checkpoint.done()
            ):
                self._writes_since_checkpoint = 0
                self._checkpoint = asyncio.ensure_future(self._checkpoint_wal())

    async def _checkpoint_wal(self) -> None:
        """Copy the log into the database file (and fsync) in aiosqlite's thread. PASSIVE: it
        never waits for other processes; what it cannot copy now, the next one does. It holds
        the transaction lock, since on aiosqlite's connection it must not run inside an open
        atomic() (group commits wait for it meanwhile, asynchronously: a few ms per 1,000)."""
        try:
            async with self._tx_lock:
                await self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except aiosqlite.Error as exc:
            log.warning("store checkpoint failed (the log grows until one succeeds): %s", exc)

    # ---- batches -------------------------------------------------------------------------------

    async def upsert_batch(
        self, name: str, model_id: str, manifest_path: str | None, settings: dict[str, Any]
    ) -> None:
        now = time.time()
        async with self.atomic() as db:
            await db.execute(
                """INSERT INTO batches (name, model_id, manifest_path, settings_json, created_at,
                                        updated_at)
                   VALUES (?, ?, ?, ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET model_id = excluded.model_id,
                       manifest_path = excluded.manifest_path,
                       settings_json = excluded.settings_json, updated_at = excluded.updated_at""",
                (name, model_id, manifest_path, json.dumps(settings, sort_keys=True), now, now),
            )

    async def batches(self) -> list[Batch]:
        async with self._db.execute(
            "SELECT name, model_id, manifest_path, settings_json, created_at, updated_at "
            "FROM batches ORDER BY created_at, name"
        ) as cur:
            rows = await cur.fetchall()
        return [Batch(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

    async def batch(self, name: str) -> Batch | None:
        for b in await self.batches():
            if b.name == name:
                return b
        return None

    # ---- learned caps --------------------------------------------------------------------------

    async def learned_cap(self, model_ids: Sequence[str], api: str) -> int | None:
        """The in-flight cap an earlier run found for these models at this API: the smallest of
        theirs (one cap serves the whole run), or None if none was learned."""
        if not model_ids:
            return None
        marks = ", ".join("?" * len(model_ids))
        async with self._db.execute(
            f"SELECT MIN(cap) FROM learned_caps WHERE api = ? AND model_id IN ({marks})",
            (api, *model_ids),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else int(row[0])

    async def remember_cap(self, model_ids: Sequence[str], api: str, cap: int, settled: bool) -> None:
        """Keep ``cap`` for the next run. A settled cap (the account's limit was seen) replaces
        what was known; an unsettled one (every job ran at once, the limit may be higher) only
        raises it, and never replaces a settled one with a lower value."""
        now = time.time()
        async with self.atomic() as db:
            for model_id in model_ids:
                await db.execute(
                    """INSERT INTO learned_caps (model_id, api, cap, settled, updated_at)
                       VALUES (?, ?, ?, ?, ?)
                       ON CONFLICT (model_id, api) DO UPDATE SET
                           cap = CASE WHEN excluded.settled THEN excluded.cap
                                      ELSE MAX(cap, excluded.cap) END,
                           settled = CASE WHEN excluded.settled THEN 1
                                          WHEN excluded.cap > cap THEN 0 ELSE settled END,
                           updated_at = excluded.updated_at""",
                    (model_id, api, int(cap), int(settled), now),
                )

    async def pending_at_least(self, batches: Sequence[str], n: int) -> int:
        """How many jobs of ``batches`` are pending, counting no further than ``n`` (cheap on a
        store of any size)."""
        where, args = _filters(batches, [PENDING])
        async with self._db.execute(
            f"SELECT COUNT(*) FROM (SELECT 1 FROM jobs {where} LIMIT ?)", (*args, n)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    # ---- recording jobs ------------------------------------------------------------------------

    @staticmethod
    def job_row(spec: Any) -> tuple[Any, ...]:
        """A manifest.JobSpec as the compact row add_rows() records (strings, not dicts: a
        100,000-job manifest is held this way between validation and recording)."""
        # Inputs and notes are recorded in the manifest's canonical JSON (the text job keys hash).
        inputs_json = spec.inputs_json if getattr(spec, "inputs_json", None) else canonical_json(spec.inputs)
        return (spec.key, spec.seq, spec.model_id, spec.source, inputs_json, canonical_json(spec.meta))

    async def add_jobs(self, batch: str, specs: Iterable[Any]) -> int:
        """Record a manifest's jobs; return how many were new. Jobs already known are untouched."""
        return await self.add_rows(batch, (self.job_row(s) for s in specs))

    async def add_rows(self, batch: str, rows: Iterable[tuple[Any, ...]]) -> int:
        """Record job rows (see job_row) in chunks, one transaction each; return how many were new.
        INSERT OR IGNORE on (batch, key): re-recording a grown manifest adds only its new jobs.
        A job already recorded that is not at the provider nor done (REFRESHABLE) takes the
        inputs the manifest now gives: the same key is the same generation (a local file is
        keyed by its content), but how it is sent (image_base_url, or inline) may have been
        fixed since, and its next submit or retry sends what the manifest says now."""
        added = 0
        now = time.time()
        chunk: list[tuple[Any, ...]] = []
        # A batch recorded for the first time has nothing to refresh: its rows skip that pass.
        rows_before = await self._db.execute_fetchall("SELECT 1 FROM jobs WHERE batch = ? LIMIT 1", (batch,))
        refresh_sql = (f"UPDATE jobs SET inputs_json = ?3 WHERE batch = ?1 AND key = ?2 AND inputs_json != ?3 "
                       f"AND state IN ({', '.join(repr(s) for s in REFRESHABLE)})")

        async def flush() -> None:
            nonlocal added
            if not chunk:
                return
            async with self.atomic() as db:
                before = db.total_changes
                await db.executemany(
                    """INSERT OR IGNORE INTO jobs (batch, key, seq, model_id, source, inputs_json,
                           meta_json, state, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)""",
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
        async with self.atomic() as db:
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

    # ---- reading jobs --------------------------------------------------------------------------

    async def job(self, job_id: int) -> Job:
        async with self._db.execute(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)) as c:
            row = await c.fetchone()
        if row is None:
            raise StoreError(f"no job with id {job_id}")
        return Job.from_row(row)

    async def jobs(
        self, batches: Sequence[str] | None = None, states: Sequence[str] | None = None, *,
        current: bool = False,
    ) -> list[Job]:
        """Jobs of ``batches`` in ``states`` (None: all), retired ones too unless ``current``."""
        where, args = _filters(batches, states)
        if current:
            where += " AND retired_at IS NULL"
        async with self._db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs {where} ORDER BY batch, seq", args
        ) as cur:
            return [Job.from_row(r) for r in await cur.fetchall()]

    async def iter_jobs_with_outputs(
        self, batch: str, chunk: int = 2000
    ) -> AsyncIterator[list[tuple[Job, list[Output]]]]:
        """``batch``'s jobs in manifest order with their outputs, ``chunk`` jobs at a time: reports
        and galleries of 100,000 jobs hold one chunk, and ask two queries per chunk, not one per job.
        One query read a chunk at a time: no index orders a batch by seq alone, so each page
        asked for apart would sort the whole batch again."""
        async with self._db.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE batch = ? ORDER BY seq, id", (batch,)
        ) as jobs_cur:
            while rows := await jobs_cur.fetchmany(chunk):
                jobs = [Job.from_row(r) for r in rows]
                found: dict[int, list[Output]] = {job.id: [] for job in jobs}
                # The ids as one JSON parameter: no limit on the number of SQL variables to meet.
                async with self._db.execute(
                    "SELECT job_id, idx, kind, url, path, size, sha256 FROM outputs WHERE job_id IN "
                    "(SELECT value FROM json_each(?)) ORDER BY job_id, idx",
                    (json.dumps(list(found)),),
                ) as cur:
                    for r in await cur.fetchall():
                        found[r[0]].append(Output(*r))
                yield [(job, found[job.id]) for job in jobs]

    async def input_kinds(self, batch: str) -> set[tuple[str, str]]:
        """Every (input name, JSON type) among ``batch``'s jobs, SQLite's json_each types
        ('integer', 'real', 'text', 'true', 'false', 'null', 'array', 'object'): a report's columns
        and their types without parsing 100,000 jobs in Python."""
        async with self._db.execute(
            "SELECT DISTINCT e.key, e.type FROM jobs j, json_each(j.inputs_json) e WHERE j.batch = ?", (batch,)
        ) as cur:
            return {(r[0], r[1]) for r in await cur.fetchall()}

    async def distinct_meta(self, batch: str) -> list[dict[str, Any]]:
        """The different notes of ``batch``'s jobs (most batches have few: matrix values, tags)."""
        async with self._db.execute("SELECT DISTINCT meta_json FROM jobs WHERE batch = ?", (batch,)) as cur:
            return [json.loads(r[0]) for r in await cur.fetchall()]

    async def counts(self, batches: Sequence[str] | None = None, *,
                     retired: bool | None = False) -> dict[str, dict[str, int]]:
        """{batch: {state: count}} over the given batches (all when None): of the jobs still in
        their manifest (``retired`` False), of the retired ones (True), or of all (None)."""
        where, args = _filters(batches, None)
        if retired is not None:
            where += " AND retired_at IS " + ("NOT NULL" if retired else "NULL")
        async with self._db.execute(
            f"SELECT batch, state, COUNT(*) FROM jobs {where} GROUP BY batch, state", args
        ) as cur:
            out: dict[str, dict[str, int]] = {}
            for batch, state, n in await cur.fetchall():
                out.setdefault(batch, {})[state] = n
        return out

    async def failure_groups(self, batch: str, limit: int = 10) -> list[tuple[str, str, int]]:
        """(state, error, count) of a batch's unsuccessful (or overdue) jobs, most common first."""
        async with self._db.execute(
            "SELECT state, COALESCE(error, ''), COUNT(*) FROM jobs WHERE batch = ? AND state IN "
            "(?, ?, ?, ?, ?) AND retired_at IS NULL GROUP BY state, error ORDER BY COUNT(*) DESC LIMIT ?",
            (batch, FAILED, UNKNOWN, TIMED_OUT, CANCELLED, OVERDUE, limit),
        ) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def timings(self, batch: str) -> tuple[list[float], list[float], float]:
        """Queue waits and run times (seconds) of a batch's started jobs, and its total cost."""
        async with self._db.execute(
            "SELECT started_at - submitted_at, finished_at - started_at FROM jobs WHERE batch = ? "
            "AND started_at IS NOT NULL AND submitted_at IS NOT NULL", (batch,),
        ) as cur:
            rows = await cur.fetchall()
        async with self._db.execute("SELECT COALESCE(SUM(cost), 0) FROM jobs WHERE batch = ?", (batch,)) as cur:
            (cost,) = await cur.fetchone()  # type: ignore[misc]
        waits = [r[0] for r in rows if r[0] is not None]
        runs = [r[1] for r in rows if r[1] is not None]
        return waits, runs, float(cost)

    async def apis(self, batches: Sequence[str] | None = None,
                   exclude: Sequence[str] = ()) -> dict[str, dict[str, int]]:
        """{batch: {api: jobs}}: the APIs the batches' jobs were submitted to (Job.api; jobs
        never submitted, or submitted before batchgen kept track, are not counted, nor jobs in
        the states ``exclude``)."""
        where, args = _filters(batches, None)
        if exclude:
            where += f" AND state NOT IN ({', '.join('?' * len(exclude))})"
            args.extend(exclude)
        rows = await self._db.execute_fetchall(
            f"SELECT batch, api, COUNT(*) FROM jobs {where} AND api IS NOT NULL GROUP BY batch, api",
            args,
        )
        out: dict[str, dict[str, int]] = {}
        for batch, api, n in rows:
            out.setdefault(batch, {})[api] = n
        return out

    async def existing_keys(self, batch: str, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(keys), 500):
            part = list(keys[i:i + 500])
            async with self._db.execute(
                f"SELECT key FROM jobs WHERE batch = ? AND key IN ({', '.join('?' * len(part))})",
                (batch, *part),
            ) as cur:
                found.update(r[0] for r in await cur.fetchall())
        return found

    # ---- the runner's transitions ----------------------------------------------------------------

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

    async def claim_pending(self, batches: Sequence[str] | None, now: float) -> Job | None:
        """Take the next pending job (manifest order) whose retry delay has passed, and record the
        intent to submit it: the job is 'submitting' once this returns. The caller must POST only
        after this commit."""
        jobs = await self.claim_many(batches, now, 1)
        return jobs[0] if jobs else None

    async def claim_many(self, batches: Sequence[str] | None, now: float, limit: int) -> list[Job]:
        """Like claim_pending for up to ``limit`` jobs at once, in manifest order. One statement
        (UPDATE … RETURNING): atomic, and one round trip however many slots just came free."""
        where, args = _filters(batches, [PENDING])
        # The API is part of the intent: whatever the submit leads to belongs to that API.
        # A batch whose cancel was requested is never claimed from: the request and the claim
        # are both writes, so SQLite orders them, and no job is sent after its cancel.
        sql = f"""UPDATE jobs SET state = 'submitting', attempts = attempts + 1, updated_at = ?,
                      detail = 'attempt ' || (attempts + 1), api = COALESCE(?, api)
                  WHERE id IN (SELECT id FROM jobs {where} AND {_NOT_CANCELLED} AND retired_at IS NULL
                               AND (not_before IS NULL OR not_before <= ?) ORDER BY seq LIMIT ?)
                  RETURNING {_JOB_COLUMNS}"""
        params = (now, self.api, *args, now, max(1, limit))

        def claim(conn: sqlite3.Connection) -> list[Any]:
            self.check_file()  # never claim (then pay for) a job into a store that is gone
            return conn.execute(sql, params).fetchall()

        rows = await self._write(claim)
        # RETURNING gives no order: put them back in manifest order.
        return sorted((Job.from_row(r) for r in rows), key=lambda j: j.seq)

    async def next_pending_at(self, batches: Sequence[str] | None) -> float | None:
        """When the earliest pending job may be tried (0 for now), or None if none is pending."""
        where, args = _filters(batches, [PENDING])
        async with self._db.execute(
            f"SELECT COUNT(*), MIN(COALESCE(not_before, 0)) FROM jobs {where} AND {_NOT_CANCELLED} "
            "AND retired_at IS NULL",
            args
        ) as cur:
            n, earliest = await cur.fetchone()  # type: ignore[misc]
        return None if n == 0 else float(earliest)

    async def transition(
        self,
        job: Job,
        state: str,
        *,
        expect: Sequence[str] | None = None,
        detail: str | None = None,
        shield: bool = False,
        **fields: Any,
    ) -> None:
        """Move ``job`` to ``state`` (setting ``fields``) and append the history row, in one
        transaction. With ``expect``, refuse unless the stored state is one of those: that catches
        two actors racing on one job. ``job`` is updated in place. ``shield``: committed even if the
        caller is cancelled while it waits, and logged if it then fails (see _write)."""
        if not _SETTABLE.issuperset(fields):
            raise ValueError(f"not settable: {sorted(set(fields) - _SETTABLE)}")
        now = time.time()
        sql, params = _transition_sql(job.id, state, now, detail, fields, expect)
        # One statement; the jobs_history trigger appends the history row in the same statement.
        what = (f"recording job {job.key} as {state}" + (f" ({detail})" if detail else "")) if shield else None
        await self._write(lambda conn: _apply_transition(conn, job.key, job.id, sql, params, expect), what)
        job.state = state
        job.updated_at = now
        for k, v in fields.items():
            setattr(job, k, v)

    async def update_fields(self, job: Job, **fields: Any) -> None:
        """Change bookkeeping fields (queue position, …) without a state change or history row."""
        bad = set(fields) - _SETTABLE
        if bad or not fields:
            raise ValueError(f"not settable: {sorted(bad)}")
        sql = f"UPDATE jobs SET {', '.join(f'{k} = ?' for k in fields)} WHERE id = ?"
        params = (*fields.values(), job.id)
        await self._write(lambda conn: conn.execute(sql, params))
        for k, v in fields.items():
            setattr(job, k, v)

    async def events(self, job_id: int) -> list[tuple[float, str | None, str, str | None]]:
        async with self._db.execute(
            "SELECT at, from_state, to_state, detail FROM job_events WHERE job_id = ? ORDER BY id",
            (job_id,),
        ) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def requeue(self, job: Job, detail: str, *, expect: Sequence[str] = (*TERMINAL, OVERDUE)) -> None:
        """Put a finished (or overdue: `retry --force`) job, one in ``expect``, back to pending for
        a user-requested retry. Its history stays: the attempt it ended with is kept in
        ``job_attempts`` (attempts()) and its attempt count goes on; its request id, API, outputs
        and error are cleared so the next submit starts afresh."""
        async with self.atomic() as db:
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

    async def refollow(self, job: Job, detail: str) -> None:
        """Put a failed job whose output was lost (``OUTPUT_LOST``) back among the jobs at the
        provider, request id kept: the next run asks its result again and downloads it, under
        the settings of now. Submitting it again would pay for it twice."""
        await self.transition(job, IN_QUEUE, expect=(FAILED,), detail=detail, error=None,
                              error_code=None, finished_at=None)

    async def attempts(self, job_ids: Sequence[int]) -> dict[int, list[Attempt]]:
        """{job id: its earlier attempts, oldest first} (those a `retry` put aside)."""
        out: dict[int, list[Attempt]] = {}
        for i in range(0, len(job_ids), 500):
            part = list(job_ids[i:i + 500])
            rows = await self._db.execute_fetchall(
                "SELECT job_id, attempt, request_id, api, state, error, error_code, cost, "
                f"submitted_at, finished_at FROM job_attempts WHERE job_id IN ({', '.join('?' * len(part))}) "
                "ORDER BY job_id, rowid", part)
            for job_id, *rest in rows:
                out.setdefault(job_id, []).append(Attempt(*rest))
        return out

    async def succeeded_elsewhere(self, batch: str, keys: Sequence[str]) -> dict[str, Job]:
        """{key: a succeeded job with that key in another batch than ``batch``} (the latest)."""
        found: dict[str, Job] = {}
        for i in range(0, len(keys), 500):
            part = list(keys[i:i + 500])
            rows = await self._db.execute_fetchall(
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE key IN ({', '.join('?' * len(part))}) "
                "AND batch != ? AND state = 'succeeded' ORDER BY finished_at", (*part, batch))
            found.update((job.key, job) for job in map(Job.from_row, rows))
        return found

    async def record_reused(self, job: Job, source: Job, outputs: Sequence[Output]) -> None:
        """Pending ``job`` takes ``source``'s result: its outputs (files already in place) and
        its success, in one transaction. Nothing was paid for it (cost 0)."""
        now = time.time()
        async with self.atomic() as db:
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
        async with self.atomic() as db:
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

        return int(await self._write(apply))

    async def cancel_pending(self, batches: Sequence[str]) -> int:
        """Pending jobs of ``batches`` become cancelled (never submitted); returns how many. A group
        write (not atomic()): the runner calls it from a task that may be cancelled."""
        return int(await self._write(self._cancel_pending_sql(batches)))

    @staticmethod
    def _cancel_pending_sql(batches: Sequence[str]) -> Callable[[sqlite3.Connection], int]:
        where, args = _filters(batches, [PENDING])
        sql = (f"UPDATE jobs SET state = 'cancelled', updated_at = ?, error = 'cancelled before submit', "
               f"detail = 'cancelled by the user before submit' {where}")
        return lambda conn: conn.execute(sql, (time.time(), *args)).rowcount

    async def cancel_requests(self, batches: Sequence[str] | None = None) -> dict[str, float]:
        """{batch: when its cancel was requested} of ``batches`` (None: all) with one waiting."""
        where, args = _filters(batches, None)
        rows = await self._db.execute_fetchall(
            f"SELECT name, cancel_requested_at FROM batches {where.replace('batch IN', 'name IN')} "
            "AND cancel_requested_at IS NOT NULL", args)
        return {name: at for name, at in rows}

    async def clear_cancel(self, batches: Sequence[str]) -> None:
        """The cancel requests of ``batches`` are carried out (or withdrawn by a `retry`)."""
        where, args = _filters(batches, None)
        sql = f"UPDATE batches SET cancel_requested_at = NULL {where.replace('batch IN', 'name IN')}"
        await self._write(lambda conn: conn.execute(sql, args))

    # ---- outputs -------------------------------------------------------------------------------

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
        fields = _result_fields(job, cost, finished_at)
        if job.state != DOWNLOADING:
            move = _transition_sql(job.id, DOWNLOADING, now, f"{len(outputs)} output(s)", fields, None)

        def apply(conn: sqlite3.Connection) -> None:
            conn.executemany(
                """INSERT INTO outputs (job_id, idx, kind, url) VALUES (?, ?, ?, ?)
                   ON CONFLICT (job_id, idx) DO UPDATE SET url = excluded.url, kind = excluded.kind
                   WHERE outputs.sha256 IS NULL""",
                rows,
            )
            if move is not None:
                _apply_transition(conn, job.key, job.id, *move, None)

        await self._write(apply)  # outputs and the state change: one savepoint, all or nothing
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
        fields = _result_fields(job, cost, finished_at)
        move = _transition_sql(job.id, SUCCEEDED, now, f"{len(outputs)} output(s) downloaded", fields,
                               FOLLOWED)

        def apply(conn: sqlite3.Connection) -> None:
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
            _apply_transition(conn, job.key, job.id, *move, FOLLOWED)

        await self._write(apply)
        job.state, job.updated_at = SUCCEEDED, now
        job.cost, job.finished_at = cost, finished_at

    async def outputs(self, job_id: int) -> list[Output]:
        rows = await self._db.execute_fetchall(
            "SELECT job_id, idx, kind, url, path, size, sha256 FROM outputs WHERE job_id = ? "
            "ORDER BY idx", (job_id,),
        )
        return [Output(*r) for r in rows]

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
            move = _transition_sql(job_done.id, SUCCEEDED, now, None, {}, (DOWNLOADING,))

        def apply(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE outputs SET path = ?, size = ?, sha256 = ?, downloaded_at = ?, "
                         "unsynced_boot = ? WHERE job_id = ? AND idx = ?", params)
            if job_done is not None and move is not None:
                _apply_transition(conn, job_done.key, job_done.id, *move, (DOWNLOADING,))

        await self._write(apply)
        out.path, out.size, out.sha256 = path, size, sha256
        if job_done is not None:
            job_done.state, job_done.updated_at = SUCCEEDED, now

    async def mark_synced(self, keys: Sequence[tuple[int, int]]) -> None:
        """Outputs (job id, idx) whose files a flush has put on disk."""
        rows = list(keys)

        def apply(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE outputs SET unsynced_boot = NULL WHERE job_id = ? AND idx = ? "
                             "AND unsynced_boot IS NOT NULL", rows)

        await self._write(apply)

    async def unsynced_outputs(self, batches: Sequence[str] | None = None) -> list[tuple[Job, Output, str]]:
        """The outputs (of ``batches``; None: all) recorded but not yet known to be on disk:
        (job, output, the boot id their file was written under)."""
        where, args = _filters(batches, None)
        rows = await self._db.execute_fetchall(UNSYNCED_SQL.format(where=where), args)
        n = _JOB_COLUMNS.count(",") + 1
        return [(Job.from_row(r[:n]), Output(r[0], *r[n:n + 6]), r[n + 6]) for r in rows]

    async def unsynced_batches(self) -> list[str]:
        """Batches with outputs not yet known to be on disk."""
        rows = await self._db.execute_fetchall(UNSYNCED_BATCHES_SQL)
        return [r[0] for r in rows]

    async def output_lost(self, job: Job, idxs: Sequence[int], why: str) -> None:
        """Some of a job's recorded output files are gone or damaged: forget those files (their
        URLs stay) and put a succeeded job back to downloading, in one write."""
        now = time.time()
        move = None
        if job.state == SUCCEEDED:
            move = _transition_sql(job.id, DOWNLOADING, now, why, {}, (SUCCEEDED,))
        rows = [(job.id, idx) for idx in idxs]

        def apply(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE outputs SET path = NULL, size = NULL, sha256 = NULL, "
                             "downloaded_at = NULL, unsynced_boot = NULL WHERE job_id = ? AND idx = ?",
                             rows)
            if move is not None:
                _apply_transition(conn, job.key, job.id, *move, (SUCCEEDED,))

        await self._write(apply)
        if move is not None:
            job.state, job.updated_at = DOWNLOADING, now


# Outputs first, through their partial index (a handful of rows however large the store), then
# each one's job: a plan that scanned the batch's jobs would cost every start a full pass.
_UNSYNCED_FROM = "FROM outputs o INDEXED BY outputs_unsynced CROSS JOIN jobs ON jobs.id = o.job_id "
UNSYNCED_SQL = (
    f"SELECT {_JOB_COLUMNS}, o.idx, o.kind, o.url, o.path, o.size, o.sha256, o.unsynced_boot "
    + _UNSYNCED_FROM + "{where} AND o.unsynced_boot IS NOT NULL ORDER BY o.job_id, o.idx"
)
UNSYNCED_BATCHES_SQL = (
    "SELECT DISTINCT jobs.batch " + _UNSYNCED_FROM
    + "WHERE o.unsynced_boot IS NOT NULL ORDER BY jobs.batch"
)


# Jobs of batches whose cancel was requested are never claimed (see claim_many).
_NOT_CANCELLED = ("batch NOT IN (SELECT name FROM batches WHERE cancel_requested_at IS NOT NULL)")


def _file_identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _result_fields(job: Job, cost: float | None, finished_at: float | None) -> dict[str, Any]:
    """The fields a result sets. An overdue job that finally delivers loses the error that said
    it was overdue."""
    if job.state == OVERDUE:
        job.error = None
        return {"cost": cost, "finished_at": finished_at, "error": None}
    return {"cost": cost, "finished_at": finished_at}


def _live(group: list[_Queued]) -> list[_Queued]:
    """The writes still to apply: those whose caller waits, and shielded ones whatever became
    of their caller."""
    return [w for w in group if w[2] is not None or not w[1].cancelled()]


def _filters(
    batches: Sequence[str] | None, states: Sequence[str] | None
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if batches is not None:
        clauses.append(f"batch IN ({', '.join('?' * len(batches))})" if batches else "0")
        args.extend(batches)
    if states is not None:
        clauses.append(f"state IN ({', '.join('?' * len(states))})" if states else "0")
        args.extend(states)
    return ("WHERE " + " AND ".join(clauses) if clauses else "WHERE 1"), args


def _transition_sql(
    job_id: int, state: str, now: float, detail: str | None, fields: dict[str, Any],
    expect: Sequence[str] | None,
) -> tuple[str, list[Any]]:
    params: list[Any] = [state, now, detail, *fields.values(), job_id]
    if expect:
        params.extend(expect)
    return _transition_statement(tuple(fields), len(expect) if expect else 0), params


@functools.lru_cache(maxsize=64)
def _transition_statement(field_names: tuple[str, ...], n_expect: int) -> str:
    """The UPDATE of a transition (a handful of shapes, each written thousands of times)."""
    sets = "".join(f", {k} = ?" for k in field_names)
    sql = f"UPDATE jobs SET state = ?, updated_at = ?, detail = ?{sets} WHERE id = ?"
    if n_expect:
        sql += f" AND state IN ({', '.join('?' * n_expect)})"
    return sql


def _apply_transition(
    conn: sqlite3.Connection, key: str, job_id: int, sql: str, params: list[Any],
    expect: Sequence[str] | None,
) -> None:
    if conn.execute(sql, params).rowcount != 1:
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"no job with id {job_id}")
        raise StoreError(f"job {key} is '{row[0]}', expected one of {list(expect or [])}")


def _open_writer(path: Path) -> sqlite3.Connection:
    """The connection group commits use, on the event loop's thread (see the module docstring)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        # No waiting inside SQLite: it would freeze the event loop. A group that finds the write
        # lock taken by another process is retried from the loop (Store._commit_groups).
        conn.execute("PRAGMA busy_timeout=0")
        conn.execute("PRAGMA wal_autocheckpoint=0")  # checkpoints fsync: not on the loop
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _apply_group(
    conn: sqlite3.Connection, fns: list[Callable[[sqlite3.Connection], Any]]
) -> list[tuple[bool, Any]] | None:
    """One group commit: all writes in one transaction. If one fails, the transaction is rolled
    back and replayed with each write in its own savepoint, so that only that one is undone.
    None: another process holds the write lock; nothing was done."""
    if not _begin(conn):
        return None
    try:
        try:
            out = [(True, fn(conn)) for fn in fns]
        except Exception:  # noqa: BLE001 - replayed below, where it is reported to its caller
            conn.execute("ROLLBACK")
            return _apply_one_by_one(conn, fns)
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        return _group_failed(conn, exc, len(fns))
    return out


def _begin(conn: sqlite3.Connection) -> bool:
    """BEGIN IMMEDIATE (take the write lock); False if another process holds it. Other errors
    (a broken file) are raised as StoreError."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
            return False
        raise StoreError(f"cannot commit to the store: {exc}") from exc
    return True


def _apply_one_by_one(
    conn: sqlite3.Connection, fns: list[Callable[[sqlite3.Connection], Any]]
) -> list[tuple[bool, Any]] | None:
    out: list[tuple[bool, Any]] = []
    if not _begin(conn):  # another process took the lock in the moment since our rollback
        return None
    try:
        for fn in fns:
            conn.execute("SAVEPOINT w")
            try:
                out.append((True, fn(conn)))
            except Exception as exc:  # noqa: BLE001 - handed to that write's caller
                conn.execute("ROLLBACK TO w")
                out.append((False, exc if isinstance(exc, StoreError) else StoreError(f"store write failed: {exc}")))
            conn.execute("RELEASE w")
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        return _group_failed(conn, exc, len(fns))
    return out


def _group_failed(conn: sqlite3.Connection, exc: sqlite3.Error, n: int) -> list[tuple[bool, Any]]:
    """The transaction itself failed (disk full, store locked too long): every write fails."""
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    except sqlite3.Error:
        pass
    return [(False, StoreError(f"cannot commit to the store: {exc}"))] * n
