"""Input images as the service reads them: fetched from their URL (once each) or decoded from a
``data:`` URI, then probed."""

from __future__ import annotations

import asyncio

import aiohttp

from ..images import ImageInfo, ImageProbeError, probe_bytes, read_data_uri
from .core import SimCore


class InputImages(SimCore):
    """A submit's input images, fetched and probed (a URL once; a ``data:`` URI each time)."""

    async def _image(self, url: str) -> tuple[bytes, ImageInfo] | str:
        if url.startswith("data:"):
            # Decoded per submit, never kept: each submit carries its file again, and keeping them
            # would hold every distinct input of a long run in memory.
            try:
                return await asyncio.to_thread(read_data_uri, url)
            except ImageProbeError as exc:
                return str(exc)
        cached = self._images.get(url)
        if cached is not None:
            return cached
        lock = self._image_locks.setdefault(url, asyncio.Lock())
        async with lock:
            if url in self._images:
                return self._images[url]
            result: tuple[bytes, ImageInfo] | str
            try:
                data = await self._fetch(url)
                result = (data, probe_bytes(data, len(data)))
            except ImageProbeError as exc:
                result = str(exc)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                result = f"could not fetch the image: {type(exc).__name__}"
            self._images[url] = result
            return result

    async def _fetch(self, url: str) -> bytes:
        own = self.root_url + "/_sim/uploads/"
        if url.startswith(own):
            # Our own published files: read them directly rather than over HTTP.
            fid = url[len(own):].split("/", 1)[0]
            path = self._published.get(fid)
            if path is None:
                raise ImageProbeError("image URL answered HTTP 404")
            return await asyncio.to_thread(path.read_bytes)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        # Like the service: a plain GET, no credentials of the caller.
        async with self._session.get(url) as resp:
            if resp.status != 200:
                raise ImageProbeError(f"image URL answered HTTP {resp.status}")
            return await resp.read()
