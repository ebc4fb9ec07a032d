"""Image probing: local files read by header, remote ones by their first bytes only, against a
real aiohttp server on loopback that can honour Range or ignore it."""

from __future__ import annotations

import asyncio
import struct
import zlib

import aiohttp
import pytest
from aiohttp import web
from conftest import loopback
from imagefactory import head_padding, image_bytes, make_image, pad

from batchgen.images import ImageInfo, ImageProbeError, ImageProber, probe_bytes, probe_file, probe_url


class ImageHost:
    """A loopback image host. Per file: honour Range or not, send Content-Length or not."""

    def __init__(self) -> None:
        self.files: dict[str, tuple[bytes, str]] = {}
        self.ranges = True
        self.length = True  # Content-Length on full (non-Range) answers
        self.sent: list[int] = []  # body bytes actually written, per GET
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.delay = 0.0
        self.status: dict[str, int] = {}  # name -> an error status to answer instead
        self.in_flight = 0
        self.max_in_flight = 0
        self.url = ""

    def add(self, name: str, data: bytes, ctype: str = "image/jpeg") -> str:
        self.files[name] = (data, ctype)
        return f"{self.url}/{name}"

    async def handler(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.method, dict(request.headers)))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            return await self._answer(request)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["name"] in self.status:
            return web.Response(status=self.status[request.match_info["name"]], text="no")
        entry = self.files.get(request.match_info["name"])
        if entry is None:
            return web.Response(status=404, text="no such file")
        data, ctype = entry
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data)), "Content-Type": ctype})
        rng = request.headers.get("Range")
        if rng and self.ranges:
            start, _, end = rng.removeprefix("bytes=").partition("-")
            first, last = int(start), min(int(end), len(data) - 1)
            chunk = data[first:last + 1]
            self.sent.append(len(chunk))
            return web.Response(status=206, body=chunk, content_type=ctype,
                                headers={"Content-Range": f"bytes {first}-{last}/{len(data)}"})
        resp = web.StreamResponse(headers={"Content-Type": ctype})
        if self.length:
            resp.content_length = len(data)
        else:
            resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        try:
            for i in range(0, len(data), 16384):
                await resp.write(data[i:i + 16384])
                sent += len(data[i:i + 16384])
                await asyncio.sleep(0.002)  # give a client that hung up time to be noticed
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError, aiohttp.ClientConnectionResetError):
            pass
        self.sent.append(sent)
        return resp


@pytest.fixture
async def host():
    h = ImageHost()
    app = web.Application()
    app.router.add_route("*", "/{name}", h.handler)
    async with loopback(app) as h.url:
        yield h


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as s:
        yield s


# ---- local files ------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "name"), [("JPEG", "jpeg"), ("PNG", "png"), ("GIF", "gif"), ("WEBP", "webp")])
def test_local_probe_reads_format_size_and_bytes(tmp_path, fmt, name):
    path = make_image(tmp_path / f"a.{fmt.lower()}", 640, 480, fmt)
    assert probe_file(path) == ImageInfo(name, 640, 480, path.stat().st_size)


def test_formats_beyond_the_common_ones_are_still_recognised(tmp_path):
    # Only the common formats' plugins are loaded at first; a WebP or TIFF makes the probe load
    # the rest. In a fresh process, since a test before this one may have loaded them all.
    import subprocess
    import sys

    webp = make_image(tmp_path / "a.webp", 64, 48, "WEBP")
    tiff = make_image(tmp_path / "a.tif", 64, 48, "TIFF")
    code = ("import sys; from batchgen.images import probe_file; "
            "print(probe_file(sys.argv[1]).format, probe_file(sys.argv[2]).format)")
    out = subprocess.run([sys.executable, "-c", code, str(webp), str(tiff)], capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["webp", "tiff"]


def test_local_probe_errors(tmp_path):
    (tmp_path / "notes.jpg").write_text("not an image, just text")
    with pytest.raises(ImageProbeError, match="not a readable image"):
        probe_file(tmp_path / "notes.jpg")
    with pytest.raises(ImageProbeError, match="file not found"):
        probe_file(tmp_path / "missing.jpg")


def test_header_only_even_for_huge_dimensions():
    # A PNG that claims 30000x30000 pixels (900 Mpx) with no pixel data to speak of: the probe
    # answers its size from the header, with no decompression-bomb warning or refusal.
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    idat = struct.pack(">I", 4) + b"IDAT" + b"\0" * 4 + struct.pack(">I", zlib.crc32(b"IDAT\0\0\0\0"))
    head = b"\x89PNG\r\n\x1a\n" + chunk + idat
    assert probe_bytes(head, 123_456_789) == ImageInfo("png", 30000, 30000, 123_456_789)


def test_probe_bytes_needs_the_frame_header():
    data = head_padding(image_bytes(640, 480), 200_000)
    with pytest.raises(ImageProbeError):
        probe_bytes(data[:65536], len(data))
    assert probe_bytes(data[:262144], len(data)) == ImageInfo("jpeg", 640, 480, len(data))


# ---- remote URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize("ranges", [True, False])
async def test_remote_probe_reads_only_the_head(host, session, ranges):
    host.ranges = ranges
    url = host.add("big.png", pad(image_bytes(2000, 1500, "PNG"), 3_000_000, "PNG"), "image/png")
    info = await probe_url(session, url)
    assert info == ImageInfo("png", 2000, 1500, 3_000_000)
    await asyncio.sleep(0.1)  # let the server notice the hang-up and record what it sent
    assert len(host.sent) == 1
    if ranges:
        assert host.sent == [65536]
        assert host.requests[0][1]["Range"] == "bytes=0-65535"
    else:
        assert host.sent[0] < 1_500_000, host.sent  # far from the whole 3 MB


@pytest.mark.parametrize("ranges", [True, False])
async def test_large_exif_asks_for_more(host, session, ranges):
    host.ranges = ranges
    # The frame header at ~150 KB of a 600 KB file: found with the second, larger range.
    data = pad(head_padding(image_bytes(640, 480), 150_000), 600_000, "JPEG")
    info = await probe_url(session, host.add("exif.jpg", data))
    assert info == ImageInfo("jpeg", 640, 480, len(data))
    if ranges:
        assert host.sent == [65536, 262144]


async def test_header_beyond_one_mebibyte_gives_up(host, session):
    data = head_padding(image_bytes(640, 480), 1_200_000)
    with pytest.raises(ImageProbeError, match="no image header in the first 1,048,576 bytes"):
        await probe_url(session, host.add("huge-exif.jpg", data))
    assert host.sent == [65536, 262144, 1048576]


async def test_small_file_without_range_or_length(host, session):
    host.ranges, host.length = False, False
    data = image_bytes(400, 400)
    assert await probe_url(session, host.add("small.jpg", data)) == ImageInfo("jpeg", 400, 400, len(data))


async def test_size_from_head_when_the_get_does_not_say(host, session):
    host.ranges, host.length = False, False
    data = pad(image_bytes(400, 400), 500_000, "JPEG")
    assert await probe_url(session, host.add("big.jpg", data)) == ImageInfo("jpeg", 400, 400, 500_000)
    assert [m for m, _ in host.requests] == ["GET", "HEAD"]


async def test_remote_errors_are_clear(host, session):
    with pytest.raises(ImageProbeError, match="^image URL answered HTTP 404$"):
        await probe_url(session, host.url + "/nope.jpg")
    page = host.add("page.jpg", b"<html>Sign in to continue</html>", "text/html")
    with pytest.raises(ImageProbeError, match=r"not a readable image \(the server sent text/html\)"):
        await probe_url(session, page)
    host.status["private.jpg"] = 403
    with pytest.raises(ImageProbeError, match="HTTP 403: the service fetches inputs without any login"):
        await probe_url(session, host.url + "/private.jpg")
    with pytest.raises(ImageProbeError, match="unreachable"):
        await probe_url(session, "http://127.0.0.1:9/x.jpg")  # discard port: nothing listens


async def test_no_credentials_go_to_image_hosts(host):
    url = host.add("a.jpg", image_bytes(400, 400))
    async with ImageProber() as prober:
        assert isinstance(await prober.probe(url), ImageInfo)
    assert all("Authorization" not in headers for _, headers in host.requests)
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer secret"}) as api_session:
        with pytest.raises(ValueError, match="without credentials"):
            await probe_url(api_session, url)
    assert len(host.requests) == 1


# ---- the caching prober -----------------------------------------------------------------------


async def test_prober_probes_each_reference_once(host, tmp_path):
    url = host.add("a.jpg", image_bytes(640, 480))
    path = make_image(tmp_path / "b.png", 480, 640, "PNG")
    async with ImageProber() as prober:
        results = await asyncio.gather(*(prober.probe(url) for _ in range(20)))
        local = await prober.probe(str(path))
        by_uri = await prober.probe(path.as_uri())
        missing = await prober.probe(host.url + "/missing.jpg")
    assert all(r == ImageInfo("jpeg", 640, 480, results[0].size) for r in results)
    assert len([m for m, _ in host.requests if m == "GET"]) == 2  # a.jpg once, missing once
    assert local == by_uri == ImageInfo("png", 480, 640, path.stat().st_size)
    assert missing == "image URL answered HTTP 404"  # an error comes back as a message


async def test_prober_bounds_concurrency(host):
    host.delay = 0.05
    urls = [host.add(f"{i}.jpg", image_bytes(400, 400)) for i in range(12)]
    async with ImageProber(concurrency=3) as prober:
        results = await asyncio.gather(*(prober.probe(u) for u in urls))
    assert all(isinstance(r, ImageInfo) for r in results)
    assert host.max_in_flight == 3


async def test_probe_errors_are_subclasses_of_batchgen_error():
    from batchgen.errors import BatchgenError

    assert issubclass(ImageProbeError, BatchgenError)
    with pytest.raises(ImageProbeError, match="not a valid URL|unreachable|cannot fetch"):
        async with aiohttp.ClientSession() as s:
            await probe_url(s, "http://[::1")
