"""Output files: made once per (input, model, frames), served with Range support and signed URLs,
and the hostile bodies of the output_body and redirect faults."""

from __future__ import annotations

import asyncio
import functools
import gzip
import hmac
import time

from aiohttp import web

from .core import SimCore, SimJob
from .faults import BODIES
from .media import make_image, make_video


@functools.cache
def _bomb() -> bytes:
    """64 MiB of zeros, gzipped to 64 KB: made once, 0.2 s."""
    return gzip.compress(bytes(64 << 20), 9)


class OutputFiles(SimCore):
    """Output media: made, kept, and served (with their faults)."""

    def _file_url(self, job: SimJob, kind: str) -> str:
        faults = self.config.faults
        name = "output." + (faults.output_ext or ("mp4" if kind == "video" else "png"))
        root = f"http://{faults.offhost_host}:{self._port}" if job.offhost else self.root_url
        url = f"{root}/_sim/files/{job.id}/0/{name}"
        expire = self.config.faults.expire_after
        if expire is not None:
            exp = int((time.time() + expire) * 1000)  # milliseconds: sub-second expiries work
            sig = hmac.new(self._secret, f"{job.id}|{exp}".encode(), "sha256").hexdigest()[:16]
            url += f"?expires={exp}&sig={sig}"
        return url

    async def media(self, media_key: str) -> bytes:
        data = self._media.get(media_key)
        if data is not None:
            return data
        lock = self._media_locks.setdefault(media_key, asyncio.Lock())
        async with lock:
            if media_key not in self._media:
                _, kind, frames = self._media_inputs[media_key]
                image = self._media_image_bytes.get(media_key)
                # 24 frames for the 121-frame setting, 48 for 241: short, but visibly different.
                n = 24 if frames <= 121 else 48
                maker = (lambda: make_video(image, n)) if kind == "video" else (lambda: make_image(image))
                self._media[media_key] = await asyncio.to_thread(maker)
                # Made: the input is no longer needed (it may be a 4 MB inline file).
                self._media_image_bytes.pop(media_key, None)
            return self._media[media_key]

    def output_bytes(self, request_id: str) -> bytes | None:
        """What the simulator serves (or will serve) for a request, for tests' sha256 checks."""
        job = self.jobs.get(request_id)
        return self._media.get(job.media_key) if job else None

    async def _file(self, request: web.Request) -> web.StreamResponse:
        self.calls["download"] += 1
        if "Authorization" in request.headers:
            self.output_auth_seen += 1
        job = self.jobs.get(request.match_info["rid"])
        if job is None or job.finished_at is None or job.will_fail:
            raise web.HTTPNotFound()
        if self.config.faults.redirect and "hop" not in request.query:
            return self._redirect(request)
        outcome = self.faults.pick("download")
        if outcome == "expire" or not self._signature_ok(job, request):
            return web.Response(status=403, text="URL expired")
        if outcome == "slow":  # a slow file host
            await asyncio.sleep(self.config.faults.slow_seconds)
        data = await self.media(job.media_key)
        ctype = "video/mp4" if self._media_inputs[job.media_key][1] == "video" else "image/png"
        if outcome in BODIES:
            return await self._odd_body(request, outcome, data, ctype)
        start = 0
        status = 200
        headers = {"Accept-Ranges": "bytes", "Content-Type": ctype}
        rng = request.headers.get("Range", "")
        if rng.startswith("bytes="):
            first, _, last = rng[6:].partition("-")
            try:
                start = int(first)
                end = int(last) if last else len(data) - 1
            except ValueError:
                start, end = 0, len(data) - 1
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            end = min(end, len(data) - 1)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            data = data[start:end + 1]
        if request.method == "HEAD":
            return web.Response(status=status, headers={**headers, "Content-Length": str(len(data))})
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = len(data)
        await resp.prepare(request)
        if outcome == "truncate":
            await resp.write(data[: len(data) // 2])
            if request.transport is not None:
                request.transport.close()
            return resp
        await resp.write(data)
        await resp.write_eof()
        return resp

    def _redirect(self, request: web.Request) -> web.Response:
        """Fault redirect: to the same file once, to itself forever, or to another host."""
        target = self.config.faults.redirect
        hop = ("&" if request.query_string else "?") + "hop=1"
        if target == "loop":
            location = request.path_qs
        elif target == "same":
            location = request.path_qs + hop
        else:
            location = f"http://{target}:{self._port}{request.path_qs}{hop}"
        return web.Response(status=302, headers={"Location": location})

    async def _odd_body(self, request: web.Request, body: str, data: bytes, ctype: str) -> web.StreamResponse:
        """The hostile output bodies of faults.BODIES."""
        headers = {"Content-Type": ctype}
        if body in ("gzip", "gzip_forced", "bomb"):
            if body == "gzip" and "gzip" not in request.headers.get("Accept-Encoding", ""):
                return web.Response(body=data, headers=headers)
            headers["Content-Encoding"] = "gzip"
            return web.Response(body=_bomb() if body == "bomb" else gzip.compress(data), headers=headers)
        resp = web.StreamResponse(headers=headers)
        if body != "endless":
            resp.content_length = (3 << 30) if body == "huge" else len(data)
        await resp.prepare(request)
        try:
            if body == "trickle":  # about 2.5 KB/s: far under any least rate
                for i in range(0, len(data), 256):
                    await resp.write(data[i:i + 256])
                    await asyncio.sleep(0.1)
                await resp.write_eof()
                return resp
            if body == "huge":
                await resp.write(data)
            else:  # endless
                block = bytes(1 << 16)
                while True:
                    await resp.write(block)
        except ConnectionError:
            pass  # the client gave up, as it should
        if request.transport is not None:
            request.transport.close()
        return resp

    def _signature_ok(self, job: SimJob, request: web.Request) -> bool:
        if self.config.faults.expire_after is None:
            return True
        exp, sig = request.query.get("expires", ""), request.query.get("sig", "")
        if not exp.isdigit():
            return False
        want = hmac.new(self._secret, f"{job.id}|{exp}".encode(), "sha256").hexdigest()[:16]
        return hmac.compare_digest(sig, want) and time.time() * 1000 < int(exp)
