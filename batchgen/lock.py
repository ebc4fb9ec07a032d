"""One run per work directory: an advisory lock that dies with its process.

An flock() is released by the kernel when the holding process ends in any way (exit, kill -9,
OOM), so a lock left behind by a dead run never blocks the next one. The file also records who
holds it, so the second run can say whom it is waiting for.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from .errors import LockedError


class WorkdirLock:
    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def acquire(self, command: str = "run") -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            os.close(fd)
            pid = holder.get("pid")
            started = holder.get("started")
            raise LockedError(
                f"another batchgen {holder.get('command', 'run')} holds {self.path.parent} "
                f"(pid {pid}, started {started}); wait for it to finish, or stop it",
                pid=pid if isinstance(pid, int) else None,
                started=started if isinstance(started, str) else None,
            ) from None
        info = {
            "pid": os.getpid(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "command": command,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def holder(self) -> dict[str, object]:
        try:
            data = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def release(self) -> None:
        if self._fd is not None:
            # Truncate first so a reader never sees a stale holder attached to a free lock.
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
