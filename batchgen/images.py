"""What an input image is (format, width, height, bytes), read from its header only.

Validation must not download every image in full: a local file is opened and only its header
parsed; a remote one is asked for its first 64 KiB (a Range request) and its total size from the
response headers. Pillow parses headers without decoding pixels.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from PIL import Image, UnidentifiedImageError

from .errors import BatchgenError

log = logging.getLogger(__name__)

HEAD_BYTES = 1 << 16
# JPEGs with a large EXIF block (or an embedded thumbnail) put the size marker further in.
MAX_HEAD_BYTES = 1 << 20


class ImageProbeError(BatchgenError):
    """An input image could not be read: unreachable, not an image, or an HTTP error."""


@dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow's name, lower-cased: jpeg, png, webp, gif, ...
    width: int
    height: int
    size: int  # bytes


def probe_bytes(head: bytes, total_size: int) -> ImageInfo:
    """Read format and dimensions from the first bytes of an image."""
    try:
        with Image.open(io.BytesIO(head)) as img:
            fmt = (img.format or "").lower()
            width, height = img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageProbeError("not a readable image (JPEG, PNG, ...)") from exc
    if not fmt:
        raise ImageProbeError("not a readable image (unknown format)")
    return ImageInfo(fmt, width, height, total_size)


def probe_file(path: str | Path) -> ImageInfo:
    path = Path(path)
    try:
        size = path.stat().st_size
        with Image.open(path) as img:  # lazy: reads the header, not the pixels
            fmt = (img.format or "").lower()
            width, height = img.size
    except FileNotFoundError as exc:
        raise ImageProbeError(f"file not found: {path}") from exc
    except (UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise ImageProbeError(f"not a readable image: {path.name}") from exc
    except OSError as exc:
        raise ImageProbeError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return ImageInfo(fmt, width, height, size)


async def _fetch_head(session: aiohttp.ClientSession, url: str, nbytes: int) -> tuple[bytes, int | None]:
    headers = {"Range": f"bytes=0-{nbytes - 1}"}
    async with session.get(url, headers=headers, allow_redirects=True) as resp:
        if resp.status not in (200, 206):
            raise ImageProbeError(f"image URL answered HTTP {resp.status}")
        total: int | None = None
        if resp.status == 206:
            tail = resp.headers.get("Content-Range", "").rpartition("/")[2]
            total = int(tail) if tail.isdigit() else None
        else:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        # A server that ignores Range sends everything: read only what we need and hang up.
        head = await resp.content.read(nbytes)
        chunks = [head]
        while sum(map(len, chunks)) < nbytes:
            more = await resp.content.read(nbytes - sum(map(len, chunks)))
            if not more:
                break
            chunks.append(more)
        if resp.status == 200:
            resp.close()
        return b"".join(chunks), total


async def probe_url(session: aiohttp.ClientSession, url: str) -> ImageInfo:
    """Probe a remote image from its first bytes. Never sends credentials: the caller's session
    must carry no Authorization header (image hosts are not the API)."""
    nbytes = HEAD_BYTES
    try:
        while True:
            head, total = await _fetch_head(session, url, nbytes)
            complete = total is not None and len(head) >= total
            try:
                info = probe_bytes(head, total if total is not None else len(head))
            except ImageProbeError:
                if complete or len(head) < nbytes or nbytes >= MAX_HEAD_BYTES:
                    raise
                nbytes *= 4
                continue
            if total is None:
                raise ImageProbeError("image URL did not say how large the file is")
            return info
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ImageProbeError(f"cannot fetch image: {type(exc).__name__}: {exc}") from exc


class ImageProber:
    """Probes each file or URL once (thousands of jobs share a few images), a few at a time."""

    def __init__(self, session: aiohttp.ClientSession | None = None, concurrency: int = 8):
        self._session = session
        self._own = session is None
        self._sem = asyncio.Semaphore(concurrency)
        self._cache: dict[str, ImageInfo | str] = {}
        self._pending: dict[str, asyncio.Future[ImageInfo | str]] = {}

    async def close(self) -> None:
        if self._own and self._session is not None:
            await self._session.close()

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=30, sock_connect=10)
            )
        return self._session

    async def probe(self, ref: str) -> ImageInfo | str:
        """ImageInfo, or the error as a string. ``ref`` is a URL or a local path."""
        if ref in self._cache:
            return self._cache[ref]
        if ref in self._pending:
            return await self._pending[ref]
        fut: asyncio.Future[ImageInfo | str] = asyncio.get_running_loop().create_future()
        self._pending[ref] = fut
        try:
            async with self._sem:
                if ref.startswith(("http://", "https://")):
                    info: ImageInfo | str = await probe_url(self._get_session(), ref)
                else:
                    info = await asyncio.to_thread(probe_file, ref)
        except ImageProbeError as exc:
            info = str(exc)
        self._cache[ref] = info
        fut.set_result(info)
        del self._pending[ref]
        return info
