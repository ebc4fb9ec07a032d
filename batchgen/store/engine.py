"""Group commit: the store's writes, many to a commit, each caller awaiting its own.

The SQLite store's writes are group-committed on a second, plain sqlite3 connection that is used
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
engine checks that its path still names the file it opened before every claim (check_file: a
claim is the step before money is spent) and, at most every STORE_CHECK_EVERY seconds, before a
group commit; once it is gone every write fails, and the run stops.

This is the one module that uses a private name of aiosqlite (``_execute``, in ``in_thread``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from ..constants import STORE_CHECK_EVERY
from ..errors import StoreError

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


class GroupCommit:
    """The writes (and transactions) of one store file: ``write`` for group-committed writes,
    ``atomic`` for a multi-statement transaction on aiosqlite's connection ``db``."""

    def __init__(self, db: aiosqlite.Connection, path: Path):
        self._db = db
        self.path = path
        self._w = _open_writer(path)  # the loop thread's connection for group commits
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
        """Commit what is queued and close the writer (aiosqlite's connection is the store's)."""
        # Writes already asked for are not lost, even if the committer was cancelled meanwhile.
        while self._group or (self._committer is not None and not self._committer.done()):
            self._start_committer()
            assert self._committer is not None
            await asyncio.shield(self._committer)
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        self._w.close()

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

    async def in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(connection, *args)`` in the connection's own thread: a whole operation of
        several statements costs one round trip. aiosqlite has no public call for this; its
        ``_execute`` (the primitive every public method uses) is the one private name used here."""
        return await self._db._execute(fn, self._db._conn, *args)  # type: ignore[no-untyped-call]  # private, unannotated

    async def write(self, fn: Callable[[sqlite3.Connection], Any], shield: str | None = None) -> Any:
        """Run ``fn(connection)`` in a group commit (see the module docstring) and return its result
        once committed. Inside the caller's own atomic() it simply joins that transaction.
        ``shield``: what the write does ("recording job … as in_queue (request …)"); given, the
        write is committed even if the caller is cancelled while it waits, and if it then fails,
        that is logged with this text. Otherwise a write whose caller is gone before its group
        starts is dropped."""
        if self._tx_owner is not None and self._tx_owner is asyncio.current_task():
            return await self.in_thread(fn)
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


def _file_identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _live(group: list[_Queued]) -> list[_Queued]:
    """The writes still to apply: those whose caller waits, and shielded ones whatever became
    of their caller."""
    return [w for w in group if w[2] is not None or not w[1].cancelled()]



def _open_writer(path: Path) -> sqlite3.Connection:
    """The connection group commits use, on the event loop's thread (see the module docstring)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        # No waiting inside SQLite: it would freeze the event loop. A group that finds the write
        # lock taken by another process is retried from the loop (GroupCommit._commit_groups).
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
