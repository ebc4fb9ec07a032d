"""Getting finished files onto the disk, and knowing which ones are.

A small output (received in memory) is recorded as soon as it is written, before the kernel has
written it back. That is safe against everything but a restart of the machine: a killed process
leaves its written files in the page cache, where the kernel writes them back on its own. So such
an output is recorded with the id of the running boot (``unsynced_boot``) and handed to the
``Flusher``, which makes everything handed in durable every so often (one ``syncfs`` on Linux)
and then clears the mark. At the next run's start, outputs still marked by an *earlier* boot
(the machine went down before their flush) are checked against their recorded size and sha256:
a file the restart lost or cut short is downloaded again (the job's result is kept: nothing is
submitted or paid twice). Outputs marked by the current boot are only looked for at their
size (the page cache still holds what was written; a file removed since is fetched again) and
flushed.

Waiting for each file to reach the disk before recording it cost a fast batch a tenth of its
speed (the flushes stall the creation of the next files), for a failure that a check at start
repairs. Streamed (large) outputs are still fsynced before they are recorded: one fsync per
large file costs nothing next to its transfer.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import logging
import os
import sys
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor

from . import constants as C

log = logging.getLogger(__name__)

_BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"


def _read_boot_id() -> str:
    """This boot's id. Where the system does not tell it, one of our own per process: outputs left
    unflushed by any earlier process are then always checked (never wrongly trusted)."""
    try:
        with open(_BOOT_ID_FILE, encoding="ascii") as fh:
            value = fh.read().strip()
    except OSError:
        value = ""
    return value or f"process-{uuid.uuid4()}"


BOOT_ID = _read_boot_id()


def _load_syncfs() -> Callable[[int], int] | None:
    """Linux's syncfs(2): flush one file system (data and journal) in one call. Python's os
    module does not have it; elsewhere each file is fsynced instead."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_syncfs = _load_syncfs()


def make_durable(paths: list[str]) -> None:
    """Flush complete files, and the links or renames that put them in place, to disk."""
    if _syncfs is None:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:  # removed since (by its owner): nothing left to flush
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            fsync_dir(os.path.dirname(path) or ".")
        return
    # One syncfs per file system: folders are opened once each, not every file stat'ed.
    flushed: set[int] = set()
    for folder in dict.fromkeys(os.path.dirname(p) or "." for p in paths):
        try:
            fd = os.open(folder, os.O_RDONLY)
        except FileNotFoundError:  # removed since, files and all: nothing left to flush
            continue
        try:
            device = os.fstat(fd).st_dev
            if device in flushed:
                continue
            if _syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"syncfs: {os.strerror(err)}")
            flushed.add(device)
        finally:
            os.close(fd)


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable; not all platforms allow opening a directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def hash_file(path: str) -> hashlib._Hash:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest


def file_intact(path: str, size: int | None, sha256: str | None, *, digest: bool = True) -> bool:
    """Whether ``path`` holds exactly the bytes recorded for it (size first: after a crash a
    file the kernel had not written back is usually missing or empty). ``digest=False``: the
    size alone (enough while the page cache that holds the file is the one that wrote it)."""
    try:
        if os.stat(path).st_size != size:
            return False
        return not digest or hash_file(path).hexdigest() == sha256
    except OSError:
        return False


Key = tuple[int, int]  # (job id, output idx)


class Flusher:
    """Makes the files handed in durable every ``every`` seconds, then has ``mark`` record them
    as such. One per runner. A file handed in must already be recorded (with this boot's mark):
    the flush that follows then covers it, and clearing the mark cannot race its recording.

    Nothing waits for a flush: a run that ends first leaves its last files marked, and the next
    run either finds the page cache intact (same boot) or checks them (see the module).

    A flush that fails calls ``on_failure`` with its files ({key: path}), which are never marked
    as flushed: Linux reports a write-back error once, so a second flush would succeed while the
    bytes that failed are still not on disk. Recording that is the caller's job."""

    def __init__(self, mark: Callable[[list[Key]], Awaitable[None]],
                 on_failure: Callable[[dict[Key, str], Exception], Awaitable[None]],
                 files: Executor | None = None, every: float = C.FLUSH_EVERY, *,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self._mark = mark
        self._on_failure = on_failure
        self._files = files
        self._every = every
        self._sleep = sleep  # tests pass their own, and say when a period ends
        self._pending: dict[Key, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._soon: asyncio.Future[None] | None = None
        self._flushing: asyncio.Future[None] | None = None

    def add(self, key: Key, path: str) -> None:
        self._pending[key] = path
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def flush(self) -> None:
        """Flush what was handed in now, not at the end of the period (one flush at a time)."""
        while self._flushing is not None and not self._flushing.done():
            await asyncio.shield(self._flushing)
        if self._pending:
            self._flushing = asyncio.ensure_future(self._flush())
            await asyncio.shield(self._flushing)

    def flush_soon(self) -> None:
        """Flush what was handed in now, in the background. A syncfs waits for every dirty page
        of the file system, other programs' too, so nothing that starts a run awaits one."""
        if self._pending and (self._soon is None or self._soon.done()):
            self._soon = asyncio.ensure_future(self.flush())

    async def _run(self) -> None:
        while self._pending:
            await self._sleep(self._every)
            await self.flush()

    async def _flush(self) -> None:
        batch, self._pending = self._pending, {}
        try:
            await asyncio.get_running_loop().run_in_executor(self._files, make_durable, list(batch.values()))
        except Exception as exc:  # noqa: BLE001 - the caller decides what becomes of the files
            try:
                await self._on_failure(batch, exc)
            except Exception as also:  # noqa: BLE001 - nobody awaits a periodic flush: say it here
                log.error("a flush of %d file(s) failed (%s), and so did handling it: %s",
                          len(batch), exc, also)
            return
        # A key handed in again meanwhile is a newer file, which this flush may have missed: its
        # mark stays for the next one.
        keys = [key for key in batch if key not in self._pending]
        try:
            await self._mark(keys)
        except Exception as exc:  # noqa: BLE001 - the marks stay: the files are checked again
            log.warning("could not record %d file(s) as flushed (checked again at the next start): %s",
                        len(keys), exc)

    async def close(self) -> None:
        """Stop. A flush under way finishes (its thread cannot be stopped, and its files should
        get their marks cleared); files still waiting keep their marks."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._soon is not None:  # a flush asked for at once: let it finish, like any other
            await asyncio.gather(self._soon, return_exceptions=True)
        if self._flushing is not None:
            await asyncio.gather(self._flushing, return_exceptions=True)

    @property
    def pending(self) -> int:
        return len(self._pending)
