"""One run per store: an advisory lock that dies with its process.

An flock() is released by the kernel when the holding process ends in any way (exit, kill -9,
OOM), so a lock left behind by a dead run never blocks the next one.

The lock is taken on the folder that holds the store, not on a file in it: a lock file can be
deleted while a run holds it, and the next run would then create a new one, lock it, and work the
same store alongside the first. The folder cannot be deleted while it holds the store, and a
second run that finds it locked stops, whatever became of the files in it. (Not the store file
itself: closing any other descriptor of an SQLite file drops SQLite's own POSIX locks on it in
that process.) The lock file beside the store is still locked too, for batchgen versions that
lock only it, and records who holds the folder, so that the second run can say whom it waits for.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from .errors import LockedError


class WorkdirLock:
    """``WorkdirLock(folder / LOCK_FILENAME)``: the lock of ``folder`` and the store in it."""

    def __init__(self, path: Path):
        self.path = path
        self._fds: list[int] = []  # the folder's, then the lock file's

    def acquire(self, command: str = "run") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            for target, flags in ((self.path.parent, os.O_RDONLY | os.O_DIRECTORY),
                                  (self.path, os.O_RDWR | os.O_CREAT)):
                fd = os.open(target, flags, 0o644)
                self._fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise self._held_error() from None
        except BaseException:
            self._close()
            raise
        info = {
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": command,
        }
        fd = self._fds[-1]
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)

    def _held_error(self) -> LockedError:
        holder = self.holder()
        pid = holder.get("pid")
        started = holder.get("started")
        who = (f"pid {pid}, started {started}" if pid else
               "its lock file was removed, so it cannot say which process")
        return LockedError(
            f"another batchgen {holder.get('command', 'run')} holds {self.path.parent} "
            f"({who}); wait for it to finish, or stop it",
            pid=pid if isinstance(pid, int) else None,
            started=started if isinstance(started, str) else None,
        )

    def holder(self) -> dict[str, object]:
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        if len(self._fds) == 2:
            # Truncate first so a reader never sees a stale holder attached to a free lock.
            os.ftruncate(self._fds[1], 0)
        self._close()

    def _close(self) -> None:
        for fd in reversed(self._fds):
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        self._fds = []

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
