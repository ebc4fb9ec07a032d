"""What an input image is (format, width, height, bytes), read from its header only.

Validation must not download every image in full: a local file is opened and only its header
parsed; a remote one is asked for its first 64 KiB (a Range request), its total size taken from
the response headers. Pillow parses headers without decoding pixels.
"""

from __future__ import annotations

import asyncio
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import IO
from urllib.parse import unquote, urlsplit

import aiohttp
from PIL import Image

from . import inline
from .errors import BatchgenError

log = logging.getLogger(__name__)

# What a remote probe asks for first: enough for the header of any common JPEG, PNG or WebP.
HEAD_BYTES = 1 << 16
# JPEGs with a large EXIF block, an embedded thumbnail or an ICC profile put the frame header
# (the size) further in; past this we give up rather than download a whole photo.
MAX_HEAD_BYTES = 1 << 20
# A probe that takes longer than this is reported as unreachable.
PROBE_TIMEOUT = 30.0
# Remote probes at once: image hosts are someone's CDN or bucket, not ours to hammer.
PROBE_CONCURRENCY = 8

# Pillow names a JPEG that carries extra pictures (many phone cameras write these) "MPO"; it is
# still a baseline JPEG to every decoder and to a service that asks for JPEG.
_FORMAT_ALIASES = {"mpo": "jpeg"}


class ImageProbeError(BatchgenError):
    """An input image could not be read: unreachable, not an image, or an HTTP error."""


@dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow's name, lower-cased: jpeg, png, webp, gif, ...
    width: int
    height: int
    size: int  # bytes


def _read_header(fp: IO[bytes]) -> tuple[str, int, int]:
    """(format, width, height) from an open binary file, reading only the header.

    Image.open would do, but it also applies Pillow's decompression-bomb limit: a warning (an
    error under pytest) above ~89 Mpx and a refusal above ~179 Mpx. We never decode pixels, and a
    huge photo deserves "too large: 12000x9000" rather than "not an image", so this walks Pillow's
    registry of format openers itself, as Image.open does.
    """
    # The common formats first: Image.init() imports every one of Pillow's plugins (~40 ms, a
    # tenth of a run's start-up); only an image none of the common ones recognises needs that.
    Image.preinit()
    prefix = fp.read(16)
    found, last = _open_header(fp, prefix)
    if found is None:
        Image.init()
        found, last = _open_header(fp, prefix)
    if found is None:
        raise ImageProbeError("not a readable image (JPEG, PNG, WebP, ...)") from last
    return found


def _open_header(fp: IO[bytes], prefix: bytes) -> tuple[tuple[str, int, int] | None, Exception | None]:
    last: Exception | None = None
    for name in list(Image.ID):
        factory, accept = Image.OPEN[name]
        try:
            verdict = accept(prefix) if accept else True
            if not verdict or isinstance(verdict, str):  # a str is Pillow's "looks like it, but..."
                continue
            fp.seek(0)
            im = factory(fp, "")
        except Exception as exc:  # any plugin failure means "not this format"
            last = exc
            continue
        fmt = (im.format or name).lower()
        return (_FORMAT_ALIASES.get(fmt, fmt), im.size[0], im.size[1]), None
    return None, last


def probe_bytes(head: bytes, total_size: int) -> ImageInfo:
    """Format and dimensions from the first bytes of an image; ``total_size`` is the file's size."""
    fmt, width, height = _read_header(io.BytesIO(head))
    return ImageInfo(fmt, width, height, total_size)


def probe_file(path: str | Path) -> ImageInfo:
    """Probe a local file from its header; the pixels are never read."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            fmt, width, height = _read_header(fh)
    except FileNotFoundError as exc:
        raise ImageProbeError(f"file not found: {path}") from exc
    except ImageProbeError as exc:
        raise ImageProbeError(f"not a readable image (JPEG, PNG, WebP, ...): {path.name}") from exc
    except OSError as exc:
        raise ImageProbeError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return ImageInfo(fmt, width, height, size)


def read_data_uri(uri: str) -> tuple[bytes, ImageInfo]:
    """The bytes and facts of an image written inline as a ``data:`` URI (its type from its
    content, which must agree with the type the URI declares)."""
    try:
        _, data = inline.read_data_uri(uri)
    except ValueError as exc:
        raise ImageProbeError(str(exc)) from None
    return data, probe_bytes(data, len(data))


def probe_data_uri(uri: str) -> ImageInfo:
    return read_data_uri(uri)[1]


def _total_size(resp: aiohttp.ClientResponse) -> int | None:
    """The whole file's size: from Content-Range of a 206 ("bytes 0-65535/3000000"), else from
    Content-Length of a 200 (a server that ignored the Range sends the whole file)."""
    if resp.status == 206:
        tail = resp.headers.get("Content-Range", "").rpartition("/")[2].strip()
        return int(tail) if tail.isdigit() else None
    length = resp.headers.get("Content-Length", "").strip()
    return int(length) if length.isdigit() else None


async def _fetch_head(session: aiohttp.ClientSession, url: str, nbytes: int) -> tuple[bytes, int | None, str]:
    """(first bytes, total size or None, content type) of a remote file; at most ``nbytes``."""
    headers = {"Range": f"bytes=0-{nbytes - 1}", "Accept-Encoding": "identity"}
    async with session.get(url, headers=headers, allow_redirects=True) as resp:
        if resp.status == 416:  # an empty file: no byte 0 to send
            return b"", 0, resp.headers.get("Content-Type", "")
        if resp.status in (401, 403):
            raise ImageProbeError(f"image URL answered HTTP {resp.status}: the service fetches inputs without "
                                  "any login, so the URL must be public")
        if resp.status not in (200, 206):
            raise ImageProbeError(f"image URL answered HTTP {resp.status}")
        total = _total_size(resp)
        chunks: list[bytes] = []
        got = 0
        # A server that ignores Range sends everything: read only what we need, then hang up.
        while got < nbytes:
            more = await resp.content.read(nbytes - got)
            if not more:
                break
            chunks.append(more)
            got += len(more)
        head = b"".join(chunks)
        if total is None and got < nbytes and resp.content.at_eof():
            total = got  # the body ended before our limit: that was the whole file
        if resp.status == 200 and not resp.content.at_eof():
            resp.close()  # drop the connection rather than drain the rest of the file
        return head, total, resp.headers.get("Content-Type", "")


async def _head_size(session: aiohttp.ClientSession, url: str) -> int | None:
    async with session.head(url, allow_redirects=True) as resp:
        length = resp.headers.get("Content-Length", "").strip()
        return int(length) if resp.status == 200 and length.isdigit() else None


async def probe_url(session: aiohttp.ClientSession, url: str) -> ImageInfo:
    """Probe a remote image from its first bytes, never the whole file.

    Image hosts are not the API: no credentials go to them. A session that carries an
    Authorization header (the API client's) is refused rather than used.
    """
    if "Authorization" in session.headers or getattr(session, "auth", None) is not None:
        raise ValueError("probe_url needs a session without credentials: image hosts must not see the API token")
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            return await _probe_url(session, url)
    except aiohttp.InvalidURL as exc:
        raise ImageProbeError(f"not a valid URL: {exc}") from exc
    except aiohttp.ClientConnectorError as exc:
        raise ImageProbeError(f"image host unreachable: {exc.os_error.strerror or exc}") from exc
    except aiohttp.ClientError as exc:
        raise ImageProbeError(f"cannot fetch image: {type(exc).__name__}: {exc}") from exc
    except TimeoutError as exc:
        raise ImageProbeError(f"image host did not answer within {PROBE_TIMEOUT:g} s") from exc


async def _probe_url(session: aiohttp.ClientSession, url: str) -> ImageInfo:
    nbytes = HEAD_BYTES
    while True:
        head, total, ctype = await _fetch_head(session, url, nbytes)
        try:
            info = probe_bytes(head, total if total is not None else len(head))
            break
        except ImageProbeError:
            complete = len(head) < nbytes or (total is not None and len(head) >= total)
            if complete:
                kind = ctype.split(";")[0].strip()
                why = f"the server sent {kind}" if kind and not kind.startswith("image/") else "unknown format"
                raise ImageProbeError(f"not a readable image ({why})") from None
            if nbytes >= MAX_HEAD_BYTES:
                raise ImageProbeError(f"no image header in the first {MAX_HEAD_BYTES:,} bytes (not an image, "
                                      "or a JPEG with an unusually large metadata block)") from None
            # Not decodable yet: a JPEG whose frame header comes after a large metadata block.
            nbytes = min(nbytes * 4, MAX_HEAD_BYTES)
            log.debug("image header of %s not in the first bytes; asking for %d", url, nbytes)
    if total is None:
        total = await _head_size(session, url)
    if total is None:
        raise ImageProbeError("the image host did not say how large the file is (no Content-Range or "
                              "Content-Length), so its size limit cannot be checked")
    return ImageInfo(info.format, info.width, info.height, total)


def _local_path(ref: str) -> Path:
    if ref.startswith("file://"):
        return Path(unquote(urlsplit(ref).path))
    return Path(ref)


class ImageProber:
    """Probes each file or URL once (thousands of jobs share a few images), a few URLs at a time.

    ``probe`` never raises for a bad image: it answers the ImageInfo or the problem as a string,
    which is what ``ModelSchema.check`` takes. Use as ``async with ImageProber() as prober``, or
    call ``close()``; a session passed in is the caller's to close.
    """

    def __init__(self, session: aiohttp.ClientSession | None = None, concurrency: int = PROBE_CONCURRENCY):
        self._session = session
        self._own_session = session is None
        self._url_slots = asyncio.Semaphore(concurrency)
        # One task per reference, kept as the cache: later callers await the same task.
        self._probes: dict[str, asyncio.Task[ImageInfo | str]] = {}

    async def __aenter__(self) -> ImageProber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for task in self._probes.values():
            task.cancel()
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            # Our own session: no default headers, so certainly no Authorization.
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT, sock_connect=10))
        return self._session

    async def probe(self, ref: str) -> ImageInfo | str:
        """ImageInfo, or what is wrong as a string. ``ref``: an http(s) URL, a data: URI, a file://
        URI or a path."""
        task = self._probes.get(ref)
        if task is None or task.cancelled():
            task = self._probes[ref] = asyncio.ensure_future(self._probe(ref))
        # shield: one caller giving up must not cancel the probe others are waiting for.
        return await asyncio.shield(task)

    async def _probe(self, ref: str) -> ImageInfo | str:
        try:
            if ref.startswith(("http://", "https://")):
                async with self._url_slots:
                    return await probe_url(self._get_session(), ref)
            if ref.startswith("data:"):
                return await asyncio.to_thread(probe_data_uri, ref)
            return await asyncio.to_thread(probe_file, _local_path(ref))
        except ImageProbeError as exc:
            return str(exc)

    def cached(self, ref: str) -> ImageInfo | str | None:
        """The finished probe of ``ref``, if there is one."""
        task = self._probes.get(ref)
        if task is None or not task.done() or task.cancelled():
            return None
        return task.result()
