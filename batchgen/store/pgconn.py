"""The SQLite store's SQL and connection calls, carried out on PostgreSQL.

The store's reads (queries.py), the runner's writes (transitions.py) and the commands' writes
(sqlite.py) are written once, in the SQL both databases share, against two small interfaces: an
aiosqlite-like connection (``execute`` as an awaitable and async context manager, ``executemany``,
``execute_fetchall``, ``total_changes``) and an engine (``write(fn)`` running ``fn(conn)`` on a
sqlite3-like connection in a transaction, ``atomic()``, ``check_file()``). This module gives both
on psycopg 3, so PostgresStore reuses that code instead of a second copy of it:

- ``pg_sql`` rewrites the few dialect differences (placeholders, ``INSERT OR IGNORE``, scalar
  ``MAX``, ``INDEXED BY``, ``json_each`` of a parameter), once per statement shape (cached);
- psycopg's blocking connections run in threads: one for writes (serialised by an asyncio lock,
  each ``write`` its own transaction), one for reads (autocommit); both reconnect when their
  connection breaks (pgreconnect.py), and a group whose COMMIT was cut off is not applied twice.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg

from ..errors import StoreError
from .pgreconnect import RECONNECT_FOR, Link, committed, connection_lost, is_broken

log = logging.getLogger(__name__)

_PLACEHOLDER = re.compile(r"\?(\d*)")
_REWRITES = (
    (re.compile(r"\bINDEXED BY \w+ "), ""),
    # SQLite's CROSS JOIN … ON fixes the join order (a planner hint); PostgreSQL plans it itself.
    (re.compile(r"\bCROSS JOIN (\w+) ON "), r"JOIN \1 ON "),
    (re.compile(r"\bMAX\(([\w.]+), "), r"GREATEST(\1, "),
    # A JSON list of ids as one parameter (no limit on the number of parameters to meet).
    (re.compile(r"SELECT value FROM json_each\(\?\)"),
     "SELECT value::bigint FROM json_array_elements_text(?::json) AS t(value)"),
)


@functools.lru_cache(maxsize=512)
def pg_sql(sql: str) -> tuple[str, tuple[int, ...] | None]:
    """``sql`` (SQLite's dialect, as the store writes it) in PostgreSQL's, and for numbered
    placeholders (``?1``) the order to take the parameters in (None: as given)."""
    ignore = sql.lstrip().upper().startswith("INSERT OR IGNORE")
    if ignore:
        sql = re.sub(r"(?i)INSERT OR IGNORE", "INSERT", sql, count=1) + " ON CONFLICT DO NOTHING"
    for pattern, repl in _REWRITES:
        sql = pattern.sub(repl, sql)
    sql = sql.replace("%", "%%")
    order: list[int] = []
    numbered = False

    def mark(m: re.Match[str]) -> str:
        nonlocal numbered
        if m.group(1):
            numbered = True
            order.append(int(m.group(1)) - 1)
        else:
            order.append(len(order))
        return "%s"

    sql = _PLACEHOLDER.sub(mark, sql)
    return sql, (tuple(order) if numbered else None)


def _args(order: tuple[int, ...] | None, params: Sequence[Any]) -> Sequence[Any]:
    return params if order is None else [params[i] for i in order]


def _store_error(exc: psycopg.Error) -> StoreError:
    return StoreError(f"store write failed: {exc}")


class SyncConn:
    """A psycopg connection with sqlite3's calls (what a store write ``fn(conn)`` uses)."""

    def __init__(self, conn: psycopg.Connection[Any], url: str | None = None):
        self.link = Link(conn, url)
        self.total_changes = 0

    @property
    def conn(self) -> psycopg.Connection[Any]:
        return self.link.conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        text, order = pg_sql(sql)
        cur = self.conn.execute(text, _args(order, params) or None)
        if cur.rowcount > 0 and cur.description is None:
            self.total_changes += cur.rowcount
        return cur

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> psycopg.Cursor[Any]:
        text, order = pg_sql(sql)
        cur = self.conn.cursor()
        cur.executemany(text, [_args(order, r) for r in rows])
        if cur.rowcount > 0:
            self.total_changes += cur.rowcount
        return cur


class _Result:
    """``await conn.execute(...)`` or ``async with conn.execute(...) as cur``, as in aiosqlite."""

    def __init__(self, run: Callable[[], Awaitable[_Cursor]]):
        self._run = run

    def __await__(self) -> Generator[Any, None, _Cursor]:
        return self._run().__await__()

    async def __aenter__(self) -> _Cursor:
        return await self._run()

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Cursor:
    """A finished statement's rows (fetched in its thread), with aiosqlite's cursor calls."""

    def __init__(self, rows: list[Any], rowcount: int):
        self._rows = rows
        self._at = 0
        self.rowcount = rowcount

    async def fetchall(self) -> list[Any]:
        rows, self._at = self._rows[self._at:], len(self._rows)
        return rows

    async def fetchone(self) -> Any:
        rows = self._rows[self._at:self._at + 1]
        self._at += len(rows)
        return rows[0] if rows else None

    async def fetchmany(self, n: int) -> list[Any]:
        rows = self._rows[self._at:self._at + n]
        self._at += len(rows)
        return rows


class AsyncConn:
    """aiosqlite's calls over a ``SyncConn``, each statement in a worker thread under ``lock``."""

    def __init__(self, conn: SyncConn, lock: asyncio.Lock | None = None):
        self.sync = conn
        self._lock = lock  # None: the caller holds the connection (inside atomic())

    @property
    def total_changes(self) -> int:
        return self.sync.total_changes

    async def _call(self, fn: Callable[[], Any]) -> Any:
        if self._lock is None:  # inside atomic(): the transaction is gone with its connection
            try:
                return await asyncio.to_thread(fn)
            except psycopg.Error as exc:
                raise StoreError(f"store query failed: {exc}") from exc
        async with self._lock:
            return await asyncio.to_thread(self._retrying, fn)

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        """``fn`` on the read connection, run again on a new one if the connection was lost
        (a read, or a NOTIFY, is safe to repeat)."""
        deadline = time.monotonic() + RECONNECT_FOR
        while True:
            self.sync.link.ensure()
            try:
                return fn()
            except psycopg.Error as exc:
                if not connection_lost(exc, self.sync.conn) or time.monotonic() >= deadline:
                    raise StoreError(f"store query failed: {exc}") from exc
                log.warning("the store's connection was lost during a read; reconnecting")

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Result:
        def run() -> _Cursor:
            cur = self.sync.execute(sql, params)
            return _Cursor(cur.fetchall() if cur.description is not None else [], cur.rowcount)

        async def go() -> _Cursor:
            return await self._call(run)  # type: ignore[no-any-return]

        return _Result(go)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        batch = list(rows)
        await self._call(lambda: self.sync.executemany(sql, batch))

    async def execute_fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        cur = await self.execute(sql, params)
        return await cur.fetchall()


class PgEngine:
    """The write side of the PostgreSQL store, with the GroupCommit calls the shared code uses.

    Group commit, as on SQLite (engine.py): writes asked for while one group is being committed
    are applied together, one thread hop and one COMMIT for all, each in its own savepoint so
    that one refused write (a transition whose ``expect`` fails) leaves the others alone. A
    caller's await returns once its write is committed."""

    def __init__(self, conn: psycopg.Connection[Any], url: str | None = None):
        self._w = SyncConn(conn, url)
        self._lock = asyncio.Lock()  # the connection: a group, or an atomic() block
        self._tx_owner: asyncio.Task[Any] | None = None
        self._group: list[tuple[Callable[[Any], Any], asyncio.Future[Any], str | None]] = []
        self._committer: asyncio.Task[None] | None = None

    def check_file(self) -> None:
        """A server has no file to lose under the run: nothing to check."""

    async def write(self, fn: Callable[[Any], Any], shield: str | None = None) -> Any:
        """``fn(conn)`` committed in the next group (or in the caller's atomic()). ``shield``: as
        GroupCommit.write, committed even if the caller is cancelled meanwhile, and logged if
        it then fails; otherwise a write whose caller is gone before its group starts is dropped."""
        if self._tx_owner is not None and self._tx_owner is asyncio.current_task():
            return await asyncio.to_thread(fn, self._w)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._group.append((fn, fut, shield))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.ensure_future(self._commit_groups())
        return await fut

    async def _commit_groups(self) -> None:
        while self._group:
            async with self._lock:
                group = [w for w in self._group if w[2] is not None or not w[1].cancelled()]
                self._group = []
                if not group:
                    continue
                try:
                    results = await asyncio.shield(asyncio.to_thread(self._apply, [w[0] for w in group]))
                except psycopg.Error as exc:  # the COMMIT itself: every write of the group failed
                    results = [(False, _store_error(exc))] * len(group)
                except StoreError as exc:  # the server stayed unreachable
                    results = [(False, exc)] * len(group)
            for (_, fut, what), (ok, value) in zip(group, results, strict=True):
                if fut.done():
                    if not ok and what is not None:
                        log.error("%s failed after the run stopped waiting for it: %s", what, value)
                elif ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

    def _apply(self, fns: list[Callable[[Any], Any]]) -> list[tuple[bool, Any]]:
        """The group in one transaction, again on a new connection if the connection was lost:
        lost before COMMIT was sent, nothing was committed; lost during COMMIT, the server says
        (by the transaction's id) whether it committed, so the group is applied exactly once."""
        deadline = time.monotonic() + RECONNECT_FOR
        while True:
            conn = self._w.link.ensure()
            xid: int | None = None
            committing = False
            try:
                with conn.transaction():
                    row = conn.execute("SELECT txid_current()").fetchone()
                    xid = int(row[0]) if row else None
                    out = self._apply_each(fns)
                    if is_broken(conn):  # each write failed on the lost connection
                        raise psycopg.OperationalError("the connection was lost")
                    committing = True
                return out
            except psycopg.Error:
                if not is_broken(conn):
                    raise
                if committing and xid is not None and committed(self._w.link, xid, deadline):
                    return out
            if time.monotonic() >= deadline:
                raise StoreError("the store's connection was lost and a write could not be "
                                 f"applied for {RECONNECT_FOR:.0f} s")
            log.warning("the store's connection was lost during a write (not committed); applying it again")

    def _apply_each(self, fns: list[Callable[[Any], Any]]) -> list[tuple[bool, Any]]:
        out: list[tuple[bool, Any]] = []
        for fn in fns:
            try:
                with self._w.conn.transaction():  # a savepoint: this write alone on failure
                    out.append((True, fn(self._w)))
            except psycopg.Error as exc:
                out.append((False, _store_error(exc)))
            except Exception as exc:  # noqa: BLE001 - handed to that write's caller
                out.append((False, exc))
        return out

    @asynccontextmanager
    async def atomic(self) -> AsyncIterator[AsyncConn]:
        """One transaction over several awaited statements (as GroupCommit.atomic)."""
        task = asyncio.current_task()
        if self._tx_owner is task:
            yield AsyncConn(self._w)
            return
        async with self._lock:
            self._tx_owner = task
            try:
                tx = psycopg.Transaction(await asyncio.to_thread(self._w.link.ensure))
                await asyncio.to_thread(tx.__enter__)
                try:
                    yield AsyncConn(self._w)
                except BaseException as exc:
                    await asyncio.to_thread(tx.__exit__, type(exc), exc, exc.__traceback__)
                    raise
                try:
                    if is_broken(tx.connection):  # psycopg would leave it silently uncommitted
                        raise psycopg.OperationalError("the connection was lost")
                    await asyncio.to_thread(tx.__exit__, None, None, None)
                except psycopg.Error as exc:
                    raise StoreError(f"cannot commit to the store: {exc}") from exc
            finally:
                self._tx_owner = None

    async def close(self) -> None:
        """Commit what is queued (even for callers cancelled meanwhile), then close."""
        while self._group or (self._committer is not None and not self._committer.done()):
            if self._committer is None or self._committer.done():
                self._committer = asyncio.ensure_future(self._commit_groups())
            await asyncio.shield(self._committer)
        await asyncio.to_thread(self._w.conn.close)


