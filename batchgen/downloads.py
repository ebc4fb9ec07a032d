"""One output URL to one file on disk: resumable, verified, atomic, with its sha256.

A file appears under its final name only when complete: bytes go to ``<name>.part`` first (or, for
a small output, an unnamed file), a broken transfer resumes from its .part with a Range request (or
starts over when the server ignores ranges), and the length is checked against what the server
announced.

Small outputs (most images) are received in memory and written on the event loop's thread, where
that costs less than handing them to a thread (on Linux as an unnamed file linked into place once
written, elsewhere under .part and renamed). ``download`` returns as soon as such a file is in
place, not yet flushed to disk (``Downloaded.durable`` is False): the caller records it with a mark
and hands it to durability.Flusher, which flushes files in batches (see durability for why a
restart loses nothing). Larger outputs stream to their ``.part`` file and are fsynced before
``download`` returns; opening, fsync and rename happen in threads.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar
from urllib.parse import urlsplit

import aiohttp

from . import constants as C
from . import crashpoints
from .durability import fsync_dir, hash_file
from .errors import DownloadError

log = logging.getLogger(__name__)
T = TypeVar("T")

_DEFAULT_EXT = {"video": ".mp4", "image": ".png"}
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Downloaded:
    path: str
    size: int
    sha256: str
    resumed: bool
    durable: bool = True  # False: a small file in place but not flushed (see durability)


def output_name(key: str, idx: int, kind: str, url: str) -> str:
    """Stable file name of a job's output ``idx``: <key>.mp4, <key>-1.mp4, … (extension from
    the URL). One flat folder per batch: a file per output and no folder per job, which also
    halves the inodes a job costs the file system (on ext4 creating one is the dearest call
    batchgen makes). Keys are hex, so "<key>-1" cannot be another job's name."""
    # The URL's path (no query, no fragment, no host), read by hand: urlsplit and a PurePosixPath
    # per output were a measurable share of a fast batch's time.
    path = url.partition("?")[0].partition("#")[0]
    if _SCHEME.match(path):
        host_and_path = path.partition("//")[2]
        path = host_and_path[len(host_and_path.partition("/")[0]):]
    while path.endswith(("/", "/.")):  # as a path: "a/b.mp4/" and "a/b.mp4/." name b.mp4
        path = path[:-1] if path.endswith("/") else path[:-2]
    suffix = os.path.splitext(path.rpartition("/")[2])[1].lower()
    if not suffix or len(suffix) > 6 or not suffix[1:].isalnum():
        suffix = _DEFAULT_EXT.get(kind, ".bin")
    return (key if idx == 0 else f"{key}-{idx}") + suffix


def make_session(limit: int = C.DEFAULT_DOWNLOAD_CONCURRENCY) -> aiohttp.ClientSession:
    """A session for output hosts: no Authorization header, ever (the token is for the API)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max(limit, 1)),
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=C.CONNECT_TIMEOUT,
                                      sock_read=C.DOWNLOAD_READ_TIMEOUT),
    )


def _expected_total(resp: aiohttp.ClientResponse) -> int | None:
    if resp.status == 206:
        content_range = resp.headers.get("Content-Range", "")
        total = content_range.rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = resp.headers.get("Content-Length")
    return int(length) if length and length.isdigit() else None


async def download(
    session: aiohttp.ClientSession, url: str, dest: str | os.PathLike[str], files: Executor | None = None,
    *, resume: bool = True,
    before_streaming: Callable[[], Awaitable[None]] | None = None,
) -> Downloaded:
    """Fetch ``url`` into ``dest``. Raises DownloadError (``expired`` for 403/404/410) and leaves
    any partial bytes in ``dest.part`` for the next try to resume.

    ``files``: the threads that open, fsync and rename (asyncio's default pool when None). Give
    it as many threads as downloads run at once: fsync waits on the disk, and the file system
    commits the fsyncs of many threads together, so a small pool would cap throughput.
    ``resume=False``: the caller knows no partial file of this output can exist (a first try,
    straight from a fresh result), so none is looked for; a file under that name is overwritten.
    (A job submitted again has its old partials removed: discard_partials.)
    ``before_streaming`` is awaited before a large output (not received in memory) starts to
    stream to disk: the runner records the job's result then, so that a long download never
    runs with nothing recorded."""
    loop = asyncio.get_running_loop()

    def in_thread(fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        return loop.run_in_executor(files, fn, *args)

    if not url.startswith(("https://", "http://")):  # the common case, without parsing
        scheme = urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise DownloadError(f"refusing to download a {scheme or 'relative'} URL: {url}")
    # Plain strings, not Paths: a fast batch downloads thousands of files a minute, and pathlib's
    # parsing was a measurable share of the work per file.
    dest = os.fspath(dest)
    folder = os.path.dirname(dest)
    part = dest + ".part"
    have = 0
    if resume:
        try:
            have = os.stat(part).st_size  # a lookup, not a write: cheap enough for the event loop
        except OSError:
            pass
    headers = {"Range": f"bytes={have}-"} if have else {}
    # Bytes received but not yet in a file: a small output whole (written in one go at the end),
    # or a large one's first chunks while its .part file is being opened in a thread. Reading
    # never waits for the disk: a connection that breaks while we wait takes its buffered bytes.
    buf = bytearray()
    fh: BinaryIO | None = None  # a large (or resumed) output's .part file, once open
    opening: asyncio.Future[BinaryIO] | None = None
    discard = False  # the partial file cannot be trusted: remove it
    try:
        async with session.get(url, headers=headers, allow_redirects=True) as resp:
            if resp.status in (403, 404, 410):
                raise DownloadError(f"output URL answered HTTP {resp.status} (expired or gone)",
                                    status=resp.status, expired=True)
            if resp.status == 416 and have:
                # Our partial file is longer than the object: it cannot be trusted. Start over.
                discard = True
                raise DownloadError("partial file longer than the output; restarting", status=416)
            if resp.status not in (200, 206):
                raise DownloadError(f"output URL answered HTTP {resp.status}", status=resp.status)
            resumed = resp.status == 206 and have > 0
            if resp.status == 206 and not resp.headers.get("Content-Range", "").startswith(
                f"bytes {have}-"
            ):
                discard = True
                raise DownloadError("server answered a different range than asked; restarting")
            total = _expected_total(resp)
            digest = None if resumed else hashlib.sha256()  # a resumed file is hashed at the end
            written = have if resumed else 0
            if resumed or total is None or total > C.DOWNLOAD_IN_MEMORY:
                if before_streaming is not None:
                    await before_streaming()
                opening = asyncio.ensure_future(in_thread(_open_part, folder, part, resumed))
            async for chunk in resp.content.iter_chunked(C.DOWNLOAD_CHUNK):
                if fh is None and opening is not None and opening.done():
                    fh = opening.result()
                    fh.write(buf)
                    buf.clear()
                if fh is not None:
                    fh.write(chunk)
                else:
                    buf += chunk
                if digest is not None:
                    digest.update(chunk)
                written += len(chunk)
                if (crashpoints.armed("download_partial") and total
                        and written >= total // 2 and written - len(chunk) < total // 2):
                    if fh is not None:
                        fh.flush()  # half the bytes on disk when the test kills us here
                    crashpoints.reached("download_partial")
        if total is not None and written != total:
            raise DownloadError(f"download incomplete: {written} of {total} bytes")
        if written == 0:
            discard = True
            raise DownloadError("output is empty (0 bytes)")
        # Complete. From here on the bytes are the final step's alone: the finally below must
        # not keep them as a partial file too, even if we are cancelled meanwhile.
        data, buf = buf, bytearray()
        if opening is None:
            # Small: written and put in place here (cheaper than a thread hop); not flushed.
            _write_file(dest, part, data)
            if have:  # a partial of an earlier try, which the server would not resume: obsolete
                _unlink(part)
            assert digest is not None  # a small output is never a resumed one
            return Downloaded(dest, written, digest.hexdigest(), False, durable=False)
        else:
            # Large: write what is pending, fsync, close, hash a resumed file, rename into
            # place, all in one thread hop, which finishes the file even if we are cancelled.
            final_fh = fh or await opening
            fh = opening = None
            sha256 = await in_thread(_finish, final_fh, part, dest, data, digest)
    except DownloadError:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise DownloadError(f"download broke: {type(exc).__name__}: {exc}") from exc
    finally:
        # What arrived of a broken transfer is kept, durably, for a Range resume.
        try:
            if opening is not None:
                fh = fh or await opening
                await in_thread(_close_part, fh, part, buf, discard)
            elif discard:
                await in_thread(_unlink, part)
            elif buf:
                await in_thread(_save_partial, folder, part, buf)
        except OSError as exc:  # the next try starts over; the error that matters is raised
            log.warning("could not keep or clean up %s: %s", part, exc)
    return Downloaded(dest, written, sha256, resumed)


def discard_partials(folder: str | os.PathLike[str], key: str) -> None:
    """Remove a job's partial files (``<key>.mp4.part``, ``<key>-1.png.part``, …): before a
    job is submitted again its next output is a different file, and resuming an old .part into
    it would splice two generations into one file under a digest that matches."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        if name.endswith(".part") and (name.startswith(key + ".") or name.startswith(key + "-")):
            _unlink(os.path.join(folder, name))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _open_part(folder: str, part: str, append: bool) -> BinaryIO:
    """Make the batch's folder and open its .part file: to append to (a resume) or afresh."""
    os.makedirs(folder or ".", exist_ok=True)
    return open(part, "ab" if append else "wb")  # noqa: SIM115 - closed by _close_part


def _close_part(fh: BinaryIO, part: str, pending: bytearray, discard: bool) -> None:
    """Write what is still pending and make the bytes durable before the file can be published
    and recorded (or drop them)."""
    if fh.closed:
        return
    try:
        if not discard:
            fh.write(pending)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        fh.close()
        if discard:
            _unlink(part)


def _save_partial(folder: str, part: str, data: bytearray) -> None:
    """Keep the bytes of a broken small transfer in its .part file, for a Range resume."""
    os.makedirs(folder or ".", exist_ok=True)
    with open(part, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _write_file(dest: str, part: str, data: bytearray) -> None:
    """A complete small output, under its final name only once whole (not yet durable). If that
    fails (disk full), nothing is left behind: the bytes were only ever in memory, and a leftover
    .part would make the next try ask for a range that does not exist."""
    folder = os.path.dirname(dest) or "."
    if _O_TMPFILE and folder not in _no_tmpfile and _write_unnamed(folder, dest, part, data):
        return
    try:
        with _in_folder(folder, lambda: open(part, "wb")) as fh:
            fh.write(data)
        os.replace(part, dest)
    except OSError:
        _unlink(part)
        raise


def _in_folder(folder: str, create: Callable[[], T]) -> T:
    """``create()`` a file in ``folder``, making the folder first if it is missing (the batch's
    first file: only then, since asking on every file would cost a system call each)."""
    try:
        return create()
    except FileNotFoundError:
        os.makedirs(folder, exist_ok=True)
        return create()


# Linux: an unnamed file (O_TMPFILE), linked into place once written. On ext4 that is half the
# directory work of a named .part file and a rename (31 vs 48 us a file in a microbenchmark,
# a tenth of a second on 5,000 files), and a crash leaves nothing to clean up. Folders whose
# file system cannot (or a system without /proc) use .part and rename instead.
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_no_tmpfile: set[str] = set()
# Errors that would fail a .part file just the same: raised, not a reason to fall back.
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


def _write_unnamed(folder: str, dest: str, part: str, data: bytearray) -> bool:
    """Write ``data`` to ``dest`` by way of an unnamed file; False: not possible in ``folder``."""
    try:
        fd = _in_folder(folder, lambda: os.open(folder, _O_TMPFILE | os.O_WRONLY, 0o666))
    except OSError as exc:
        if exc.errno in _NO_ROOM:
            raise
        _no_tmpfile.add(folder)  # no O_TMPFILE here (EOPNOTSUPP; EISDIR on kernels before it)
        return False
    with open(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        # linkat(AT_SYMLINK_FOLLOW) of /proc/self/fd/N names the open file. os.link only asks
        # for that flag when given a dir_fd (ignored for an absolute path, so any will do).
        src = f"/proc/self/fd/{fd}"
        try:
            os.link(src, dest, src_dir_fd=fd, follow_symlinks=True)
        except FileExistsError:  # a file of an earlier try: replaced, as a rename would
            _unlink(part)
            os.link(src, part, src_dir_fd=fd, follow_symlinks=True)
            try:
                os.replace(part, dest)
            except OSError:
                _unlink(part)
                raise
        except OSError as exc:
            if exc.errno in _NO_ROOM:
                raise
            # No /proc here, or a kernel or sandbox that will not link an unnamed file (EXDEV,
            # EPERM, ENOSYS, ...): the bytes are written again, under .part.
            _no_tmpfile.add(folder)
            return False
    return True


def _finish(fh: BinaryIO, part: str, dest: str, pending: bytearray, digest: Any) -> str:
    """The sha256 of a complete .part file, after making it durable under its final name."""
    _close_part(fh, part, pending, discard=False)
    if digest is None:
        digest = hash_file(part)
    _publish(part, dest)
    return digest.hexdigest()


def _publish(part: str, dest: str) -> None:
    os.replace(part, dest)
    fsync_dir(os.path.dirname(dest) or ".")
