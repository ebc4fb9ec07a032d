"""One output URL to one file on disk: resumable, verified, atomic, with its sha256.

A file appears under its final name only when complete: bytes go to ``<name>.part`` first, a
broken transfer resumes from there with a Range request (or starts over when the server ignores
ranges), and the length is checked against what the server announced. So a path recorded in the
store always points at a whole file.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import aiohttp

from . import constants as C
from . import crashpoints
from .errors import DownloadError

log = logging.getLogger(__name__)

_DEFAULT_EXT = {"video": ".mp4", "image": ".png"}


@dataclass(frozen=True)
class Downloaded:
    path: Path
    size: int
    sha256: str
    resumed: bool


def output_name(idx: int, kind: str, url: str) -> str:
    """Stable file name of output ``idx``: output.mp4, output-1.mp4, … (extension from the URL)."""
    suffix = PurePosixPath(urlsplit(url).path).suffix.lower()
    if not suffix or len(suffix) > 6 or not suffix[1:].isalnum():
        suffix = _DEFAULT_EXT.get(kind, ".bin")
    return ("output" if idx == 0 else f"output-{idx}") + suffix


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


async def download(session: aiohttp.ClientSession, url: str, dest: Path) -> Downloaded:
    """Fetch ``url`` into ``dest``. Raises DownloadError (``expired`` for 403/404/410) and leaves
    any partial bytes in ``dest.part`` for the next try to resume."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise DownloadError(f"refusing to download a {scheme or 'relative'} URL: {url}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        async with session.get(url, headers=headers, allow_redirects=True) as resp:
            if resp.status in (403, 404, 410):
                raise DownloadError(f"output URL answered HTTP {resp.status} (expired or gone)",
                                    status=resp.status, expired=True)
            if resp.status == 416 and have:
                # Our partial file is longer than the object: it cannot be trusted. Start over.
                part.unlink(missing_ok=True)
                raise DownloadError("partial file longer than the output; restarting", status=416)
            if resp.status not in (200, 206):
                raise DownloadError(f"output URL answered HTTP {resp.status}", status=resp.status)
            resumed = resp.status == 206 and have > 0
            if resp.status == 206 and not resp.headers.get("Content-Range", "").startswith(
                f"bytes {have}-"
            ):
                part.unlink(missing_ok=True)
                raise DownloadError("server answered a different range than asked; restarting")
            total = _expected_total(resp)
            digest = await asyncio.to_thread(_hash_file, part) if resumed else hashlib.sha256()
            written = have if resumed else 0
            # Plain blocking writes of 64 KiB chunks to a local disk cost microseconds; the slow
            # parts (fsync, hashing a resumed prefix) run in a thread.
            with open(part, "ab" if resumed else "wb") as fh:  # noqa: ASYNC230
                async for chunk in resp.content.iter_chunked(C.DOWNLOAD_CHUNK):
                    fh.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    if total and written >= total // 2 and written - len(chunk) < total // 2:
                        fh.flush()
                        crashpoints.reached("download_partial")
                fh.flush()
                await asyncio.to_thread(os.fsync, fh.fileno())
    except DownloadError:
        raise
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise DownloadError(f"download broke: {type(exc).__name__}: {exc}") from exc
    if total is not None and written != total:
        raise DownloadError(f"download incomplete: {written} of {total} bytes")
    if written == 0:
        part.unlink(missing_ok=True)
        raise DownloadError("output is empty (0 bytes)")
    await asyncio.to_thread(_publish, part, dest)
    return Downloaded(dest, written, digest.hexdigest(), resumed)


def _hash_file(path: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest


def _publish(part: Path, dest: Path) -> None:
    os.replace(part, dest)
    _fsync_dir(dest.parent)


def _fsync_dir(path: Path) -> None:
    # Make the rename itself durable; not all platforms allow opening a directory.
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
