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

Contained: only allowed hosts (outputhosts.py), each redirect hop checked; at most
``DownloadLimits.max_bytes`` per output, declared or received; a host slower than the least rate
is left for a later try; bodies asked for unencoded (one sent gzipped anyway is decoded here,
within the cap); ``.part`` files never written through a symlink. What files are called
(extensions from a list of media types, never whatever a URL ends with) is outputnames.py's.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import logging
import os
import stat
import zlib
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

import aiohttp
from yarl import URL

from . import constants as C
from . import crashpoints
from .durability import fsync_dir, hash_file
from .errors import DownloadError
from .outputhosts import AddressRefused, OutputHosts
from .outputnames import composed, is_partial_of
from .ownfiles import create as _create
from .ownfiles import unlink as _unlink

log = logging.getLogger(__name__)
T = TypeVar("T")

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Outputs are asked for as they are: a gzipped body has a Content-Length of its own and could be
# a bomb. One sent encoded anyway is decoded here (_decoder), within the size cap.
_IDENTITY = {"Accept-Encoding": "identity"}
# Content-Encoding -> zlib's wbits: gzip framing, or zlib framing (what "deflate" means in HTTP).
_CODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


@dataclass(frozen=True)
class DownloadLimits:
    """How large an output may be, and how slowly it may arrive (batchgen.toml: max_output_size,
    min_download_rate, download_rate_window)."""

    max_bytes: int = C.MAX_OUTPUT_BYTES
    min_rate: float = C.MIN_DOWNLOAD_RATE  # bytes per second, over each window
    rate_window: float = C.DOWNLOAD_RATE_WINDOW  # seconds

    @functools.cached_property  # built once per settings: read on every download
    def timeout(self) -> aiohttp.ClientTimeout:
        # A host that sends nothing at all for a window is too slow as well.
        return aiohttp.ClientTimeout(total=None, sock_connect=C.CONNECT_TIMEOUT,
                                     sock_read=min(C.DOWNLOAD_READ_TIMEOUT, self.rate_window))


_LIMITS = DownloadLimits()


@dataclass(frozen=True)
class Downloaded:
    path: str
    size: int
    sha256: str
    resumed: bool
    durable: bool = True  # False: a small file in place but not flushed (see durability)


def make_session(limit: int = C.DEFAULT_DOWNLOAD_CONCURRENCY,
                 hosts: OutputHosts | None = None) -> aiohttp.ClientSession:
    """A session for output hosts: no Authorization header, ever (the token is for the API).
    With ``hosts``, it connects only to the addresses they allow (outputhosts.py). Bodies are
    never decoded by aiohttp: download() asks for none and decodes a stray one within its cap."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=max(limit, 1),
                                       resolver=hosts.resolver() if hosts is not None else None),
        timeout=_LIMITS.timeout, auto_decompress=False,
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
    hosts: OutputHosts | None = None, limits: DownloadLimits = _LIMITS,
) -> Downloaded:
    """Fetch ``url`` into ``dest``. Raises DownloadError (``expired`` for 403/404/410,
    ``permanent`` when no later try can succeed) and leaves any partial bytes in ``dest.part``
    for the next try to resume.

    ``files``: the threads that open, fsync and rename (asyncio's default pool when None). Give
    it as many threads as downloads run at once: fsync waits on the disk, and the file system
    commits the fsyncs of many threads together, so a small pool would cap throughput.
    ``resume=False``: the caller knows no partial file of this output can exist (a first try,
    straight from a fresh result), so none is looked for; a file under that name is overwritten.
    (A job submitted again has its old partials removed: discard_partials.)
    ``before_streaming`` is awaited before a large output (not received in memory) starts to
    stream to disk: the runner records the job's result then, so that a long download never
    runs with nothing recorded.
    ``hosts``: where the URL and every redirect may lead (the runner always gives them; None:
    anywhere, for tests and tools); give the same to make_session so addresses are checked too.
    ``limits``: the size cap and the least rate."""
    loop = asyncio.get_running_loop()

    def in_thread(fn: Callable[..., T], *args: Any) -> Awaitable[T]:
        return loop.run_in_executor(files, fn, *args)

    try:
        target = URL(url)  # parsed once: aiohttp takes it as it is
    except (ValueError, TypeError) as exc:
        raise DownloadError(f"not a URL: {url!r}", permanent=True) from exc
    if target.scheme not in ("https", "http"):
        raise DownloadError(f"refusing to download a {target.scheme or 'relative'} URL: {url}", permanent=True)
    # Plain strings, not Paths: a fast batch downloads thousands of files a minute, and pathlib's
    # parsing was a measurable share of the work per file.
    dest = os.fspath(dest)
    folder = os.path.dirname(dest)
    part = dest + ".part"
    have = 0
    leftover = False  # something under the .part name: removed once the file is in place
    if resume:
        try:
            # A lookup, not a write: cheap enough for the event loop. lstat: only a plain file of
            # our own is resumed; a symlink (or a hard link) under our name is replaced, never
            # appended to (ownfiles.create).
            st = os.lstat(part)
            leftover = True
            if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
                have = st.st_size
        except OSError:
            pass
    headers = {**_IDENTITY, "Range": f"bytes={have}-"} if have else _IDENTITY
    max_bytes = limits.max_bytes
    # Bytes received but not yet in a file: a small output whole (written in one go at the end),
    # or a large one's first chunks while its .part file is being opened in a thread. Reading
    # never waits for the disk: a connection that breaks while we wait takes its buffered bytes.
    buf = bytearray()
    fh: BinaryIO | None = None  # a large (or resumed) output's .part file, once open
    opening: asyncio.Future[BinaryIO] | None = None
    discard = False  # the partial file cannot be trusted: remove it
    try:
        resp = await _get(session, target, headers, hosts, limits)
        async with resp:
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
            if total is not None and total > max_bytes:
                discard = True
                raise _too_large(max_bytes, f"it declares {total:,}")
            decoder = _decoder(resp)
            if decoder is not None:
                # Encoded despite our asking: the declared length is the encoded one, and a
                # range would be one of encoded bytes, so its partial bytes are never kept.
                discard = True
                if resp.status == 206:
                    raise DownloadError("server answered a range of an encoded output; restarting")
            digest = None if resumed else hashlib.sha256()  # a resumed file is hashed at the end
            written = have if resumed else 0
            received = 0  # bytes off the wire, this try
            if resumed or total is None or total > C.DOWNLOAD_IN_MEMORY or decoder is not None:
                if before_streaming is not None:
                    await before_streaming()
                opening = asyncio.ensure_future(in_thread(_open_part, folder, part, resumed))
            # The least rate, checked once per window at the chunk that closes it (a host that
            # sends nothing at all is stopped by the read timeout of the same length).
            window_end = loop.time() + limits.rate_window
            window_from = 0
            async for chunk in resp.content.iter_chunked(C.DOWNLOAD_CHUNK):
                received += len(chunk)
                if decoder is not None:
                    try:
                        # At most one byte over the room left: enough to know it is too large,
                        # so a bomb never expands in memory (or on disk) past the cap.
                        chunk = decoder.decompress(chunk, max_bytes - written + 1)
                    except zlib.error as exc:
                        raise DownloadError(f"output's encoded body is damaged: {exc}") from exc
                if written + len(chunk) > max_bytes:
                    discard = True
                    raise _too_large(max_bytes, "more arrived")
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
                if loop.time() >= window_end:
                    _check_rate(received - window_from, limits)
                    window_end = loop.time() + limits.rate_window
                    window_from = received
        if decoder is None:
            if total is not None and written != total:
                raise DownloadError(f"download incomplete: {written} of {total} bytes")
        elif (total is not None and received != total) or not decoder.eof:
            raise DownloadError(f"download incomplete: encoded body cut short at {received} bytes")
        if written == 0:
            discard = True
            raise DownloadError("output is empty (0 bytes)")
        # Complete. From here on the bytes are the final step's alone: the finally below must
        # not keep them as a partial file too, even if we are cancelled meanwhile.
        data, buf = buf, bytearray()
        discard = False
        if opening is None:
            # Small: written and put in place here (cheaper than a thread hop); not flushed.
            _write_file(dest, part, data)
            if leftover:  # a partial of an earlier try (empty, or not resumed): obsolete
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
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, AddressRefused):
            raise DownloadError(str(exc.os_error), permanent=True) from exc
        raise DownloadError(f"download broke: {type(exc).__name__}: {exc}") from exc
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


async def _get(session: aiohttp.ClientSession, url: URL, headers: dict[str, str],
               hosts: OutputHosts | None, limits: DownloadLimits) -> aiohttp.ClientResponse:
    """The response to GET ``url``, after following its redirects by hand: each hop is checked
    against ``hosts`` before anything is sent to it, and there are at most a few."""
    timeout = limits.timeout
    for _hop in range(C.MAX_OUTPUT_REDIRECTS + 1):
        if hosts is not None:
            refusal = await hosts.refusal(url)
            if refusal is not None:
                raise DownloadError(refusal, permanent=True)
        resp = await session.get(url, headers=headers, allow_redirects=False, timeout=timeout)
        if resp.status not in _REDIRECTS:
            return resp
        location = resp.headers.get("Location")
        resp.release()
        try:
            url = resp.url.join(URL(location or ""))
        except (ValueError, TypeError):
            location = None
        if not location:
            raise DownloadError(f"output URL answered HTTP {resp.status} with no usable Location",
                                status=resp.status)
        if url.scheme not in ("https", "http"):
            raise DownloadError(f"output URL redirects to a {url.scheme or 'relative'} URL; refused",
                                permanent=True)
    raise DownloadError(f"output URL redirects more than {C.MAX_OUTPUT_REDIRECTS} times")


def _decoder(resp: aiohttp.ClientResponse) -> Any:
    """A zlib decoder for a body sent with Content-Encoding, else None (the usual case)."""
    coding = resp.headers.get("Content-Encoding")
    if coding is None:
        return None
    coding = coding.strip().lower()
    if coding in ("", "identity"):
        return None
    wbits = _CODINGS.get(coding)
    if wbits is None:
        raise DownloadError(f"output sent with Content-Encoding '{coding}', which batchgen does not "
                            "decode (it asks for none)", permanent=True)
    return zlib.decompressobj(wbits)


def _too_large(max_bytes: int, detail: str) -> DownloadError:
    return DownloadError(f"output is over the size cap of {max_bytes:,} bytes ({detail}); refused "
                         "(raise max_output_size in batchgen.toml if it is genuine)", permanent=True)


def _check_rate(got: int, limits: DownloadLimits) -> None:
    """A download that received less than the least rate over the window just closed is left
    for a later try (its bytes are kept for a Range resume): a trickling host must not hold a
    download slot for hours."""
    if got < limits.min_rate * limits.rate_window:
        raise DownloadError(f"download too slow: {got / limits.rate_window:,.0f} bytes/s over "
                            f"{limits.rate_window:g} s (the least is {limits.min_rate:,.0f}); will try again")


def discard_partials(folder: str | os.PathLike[str], stem: str) -> None:
    """Remove a job's partial files (``<stem>.mp4.part``, ``<stem>-1.png.part``, …; ``stem``:
    ``Job.file_stem``): before a job is submitted again its next output is a different file, and
    resuming an old .part into it would splice two generations into one file under a digest
    that matches."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for name in names:
        if is_partial_of(composed(name), stem):  # a name listed in NFD is the same one on macOS
            _unlink(os.path.join(folder, name))


def _open_part(folder: str, part: str, append: bool) -> BinaryIO:
    """Make the batch's folder and open its .part file: to append to (a resume) or afresh."""
    os.makedirs(folder or ".", exist_ok=True)
    return _create(part, append)


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
    with _create(part) as fh:
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
        with _in_folder(folder, lambda: _create(part)) as fh:
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


def _finish(fh: BinaryIO, part: str, dest: str, pending: bytearray, digest: hashlib._Hash | None) -> str:
    """The sha256 of a complete .part file, after making it durable under its final name."""
    _close_part(fh, part, pending, discard=False)
    if digest is None:
        digest = hash_file(part)
    _publish(part, dest)
    return digest.hexdigest()


def _publish(part: str, dest: str) -> None:
    os.replace(part, dest)
    fsync_dir(os.path.dirname(dest) or ".")
