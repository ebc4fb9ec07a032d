"""Connections to the shared store's server that notice a dead server and come back after one.

A submit's answer (the request id, the only handle on a paid job) is recorded by a write that
must outlive a server restart, a failover or a TCP reset. So:

- every connection is opened with a connect timeout and TCP keepalives: a server that vanished
  without closing the socket is noticed in bounded time, not at the next OS timeout (hours);
- session settings bound what one runner can do to the others: a runner frozen mid-transaction
  (SIGSTOP, a long pause) has its transaction aborted and its row locks released, and a write
  waits a bounded time for a lock, then fails and is retried by its caller as any failed write;
- ``Link`` holds one connection and opens a new one when it is broken, retrying for a bounded
  time with backoff before giving up with a StoreError that says why (without the password).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import psycopg

from ..errors import StoreError

log = logging.getLogger(__name__)

# A server that does not answer a connect in this long is treated as down (and retried).
CONNECT_TIMEOUT = 10
# Keepalives: a silent peer is probed after 10 s idle, every 5 s, and declared dead after 3
# unanswered probes: about 25 s to notice a server gone without a FIN (a failover, a cut cable).
KEEPALIVES: dict[str, Any] = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3}
# How long a broken connection is retried before the store gives up (a restart or failover
# usually takes seconds), and the backoff between tries.
RECONNECT_FOR = 45.0
RECONNECT_WAITS = (0.2, 0.5, 1.0, 2.0, 4.0)
# Session settings (milliseconds). A transaction left open this long (its runner frozen) is
# aborted by the server, releasing its locks: the other runners' writes, lease renewals
# included, then go on. Longer than any transaction batchgen holds open on purpose.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 30_000
# A write waits at most this long for a row lock, then fails (retried by its caller).
LOCK_TIMEOUT_MS = 10_000
# A generous ceiling on one statement: none of batchgen's should take a minute.
STATEMENT_TIMEOUT_MS = 300_000


def session_settings() -> dict[str, int]:
    return {"idle_in_transaction_session_timeout": IDLE_IN_TRANSACTION_TIMEOUT_MS,
            "lock_timeout": LOCK_TIMEOUT_MS, "statement_timeout": STATEMENT_TIMEOUT_MS}


def connect(url: str, *, settings: bool = True) -> psycopg.Connection[Any]:
    """A new autocommit connection to ``url`` named ``batchgen``; with ``settings``, the session
    settings above applied (a migration, which may wait its turn on a lock, goes without)."""
    conn = psycopg.connect(url, autocommit=True, application_name="batchgen",
                           connect_timeout=CONNECT_TIMEOUT, **KEEPALIVES)
    if settings:
        apply_settings(conn)
    return conn


def apply_settings(conn: psycopg.Connection[Any]) -> None:
    for name, value in session_settings().items():
        conn.execute(f"SET {name} = {int(value)}")


def is_broken(conn: psycopg.Connection[Any]) -> bool:
    return bool(conn.closed or conn.broken)


def connection_lost(exc: BaseException, conn: psycopg.Connection[Any]) -> bool:
    """Whether ``exc`` means the connection is gone (as opposed to a refused statement). By the
    connection's state, not the error's class: a server ending a session says why in several
    classes (AdminShutdown, IdleInTransactionSessionTimeout, a plain OperationalError)."""
    return isinstance(exc, psycopg.Error) and is_broken(conn)


class Link:
    """One connection to ``url``, replaced by a new one when broken (blocking: call in a thread)."""

    def __init__(self, conn: psycopg.Connection[Any], url: str | None):
        self.conn = conn
        self.url = url  # None: no reconnect (a connection handed in by a test)

    def ensure(self) -> psycopg.Connection[Any]:
        """The connection, reconnected first if it is broken; StoreError when the server stays
        unreachable for RECONNECT_FOR seconds."""
        if not is_broken(self.conn):
            return self.conn
        if self.url is None:
            raise StoreError("the store's connection was lost")
        from .postgres import redact, scrub

        deadline = time.monotonic() + RECONNECT_FOR
        tries = 0
        while True:
            try:
                self.conn = connect(self.url)
            except psycopg.Error as exc:
                if time.monotonic() >= deadline:
                    raise StoreError(f"lost the connection to the store {redact(self.url)} and could not "
                                     f"reconnect for {RECONNECT_FOR:.0f} s: {scrub(str(exc), self.url)}".strip()
                                     ) from None
                time.sleep(RECONNECT_WAITS[min(tries, len(RECONNECT_WAITS) - 1)])
                tries += 1
                continue
            log.warning("reconnected to the store %s", redact(self.url))
            return self.conn


def committed(link: Link, xid: int, deadline: float) -> bool:
    """Whether transaction ``xid``, whose COMMIT's answer was lost, committed (asked on a
    new connection; a backend still ending it is waited for)."""
    while True:
        conn = link.ensure()
        try:
            row = conn.execute("SELECT txid_status(%s)", (xid,)).fetchone()
        except psycopg.Error:
            if not is_broken(conn):
                raise
            row = ("in progress",)
        status = row[0] if row else None
        if status == "committed":
            return True
        if status == "aborted":
            return False
        if status is None or time.monotonic() >= deadline:
            raise StoreError(f"a write's COMMIT was cut off by a lost connection and its outcome "
                             f"is unknown (transaction {xid}: {status})")
        time.sleep(0.1)
