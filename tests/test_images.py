"""Image probing: local files read by header, remote ones by their first bytes only."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from imagefactory import make_image

from batchgen.images import ImageProber, probe_file


async def _serve(files: dict[str, bytes], ranges: bool, log: list):
    async def handler(request):
        data = files.get(request.match_info["name"])
        if data is None:
            return web.Response(status=404)
        rng = request.headers.get("Range")
        if rng and ranges:
            start, _, end = rng.removeprefix("bytes=").partition("-")
            start, end = int(start), min(int(end), len(data) - 1)
            chunk = data[start:end + 1]
            log.append(len(chunk))
            return web.Response(status=206, body=chunk,
                                headers={"Content-Range": f"bytes {start}-{end}/{len(data)}"})
        resp = web.StreamResponse()
        resp.content_length = len(data)
        await resp.prepare(request)
        sent = 0
        try:
            for i in range(0, len(data), 65536):
                await resp.write(data[i:i + 65536])
                sent += len(data[i:i + 65536])
                await asyncio.sleep(0.005)  # let a client that hung up be noticed
        except (ConnectionResetError, RuntimeError):
            pass
        log.append(sent)
        return resp

    app = web.Application()
    app.router.add_get("/{name}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("ranges", [True, False])
async def test_remote_probe_reads_only_the_head(tmp_path, ranges):
    big = make_image(tmp_path / "big.png", 2000, 1500, "PNG", nbytes=3_000_000).read_bytes()
    log: list[int] = []
    runner, url = await _serve({"big.png": big}, ranges, log)
    prober = ImageProber()
    try:
        info = await prober.probe(url + "/big.png")
        again = await prober.probe(url + "/big.png")
    finally:
        await prober.close()
        await runner.cleanup()
    assert (info.format, info.width, info.height, info.size) == ("png", 2000, 1500, 3_000_000)
    assert again is info  # cached: one probe per URL
    if ranges:
        assert log == [65536]
    else:
        assert len(log) <= 1 and (not log or log[0] < 3_000_000)


async def test_remote_errors_are_messages(tmp_path):
    log: list[int] = []
    runner, url = await _serve({"junk.jpg": b"not an image at all" * 10}, True, log)
    prober = ImageProber()
    try:
        missing = await prober.probe(url + "/nope.jpg")
        junk = await prober.probe(url + "/junk.jpg")
    finally:
        await prober.close()
        await runner.cleanup()
    assert missing == "image URL answered HTTP 404"
    assert "not a readable image" in junk


def test_local_probe(tmp_path):
    path = make_image(tmp_path / "a.jpg", 640, 480)
    info = probe_file(path)
    assert (info.format, info.width, info.height, info.size) == ("jpeg", 640, 480, path.stat().st_size)
