"""The gallery page after a real simulated run: its HTML, then the page itself in a real headless
Chromium driven over the DevTools protocol (videos load, no console error, the filter works)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import struct
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from bigbatch import grow_batch
from imagefactory import make_image
from PIL import Image
from simruns import settings

from batchgen import app
from batchgen.errors import UsageError
from batchgen.gallery import RECORD_FIELDS, build_gallery
from batchgen.simulator import FaultConfig, SimConfig

CHROMIUM = Path("/usr/bin/chromium")
# CI sets BATCHGEN_REQUIRE_CHROMIUM=1 so that a failed install fails the test instead of skipping it.
REQUIRED = bool(os.environ.get("BATCHGEN_REQUIRE_CHROMIUM"))
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists() and not REQUIRED,
    reason="needs /usr/bin/chromium (apt-get install chromium; .ci/run installs it)",
)
WAIT = 30.0  # every wait on the browser is bounded by this many seconds

NASTY = 'A <b>bold</b> & "quoted" street <script>window.pwned = 1</script> at dusk'


async def simulated_batch(samples: Path, workdir: Path, faults: list[str]) -> Path:
    """Run the quick start under --simulate, with its first prompt made of HTML and a note."""
    path = samples / "quickstart.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["jobs"][0]["prompt"] = NASTY
    doc["jobs"][0]["_note"] = "<i>take 2</i>"
    path.write_text(yaml.safe_dump(doc))
    target = app.Target(simulate=True, sim_config=SimConfig(duration=0.1, faults=FaultConfig.parse(faults)))
    await app.run(app.RunOptions(workdir=workdir, manifest=path, target=target, settings=settings()))
    return workdir


# ---- the HTML, without a browser ----------------------------------------------------------------


def gallery_data(page: Path) -> list[list[Any]]:
    """The job records of a page's data file (gallery.RECORD_FIELDS), every chunk joined."""
    records: list[list[Any]] = []
    for line in page.with_name("gallery-data.js").read_text().splitlines():
        m = re.fullmatch(r"window\.batchgenGallery\.push\(JSON\.parse\((\".*\")\)\);", line)
        if m:
            records += json.loads(json.loads(m.group(1)))
    return records


def field(record: list[Any], name: str) -> Any:
    return record[RECORD_FIELDS.index(name)]


async def test_page_and_data_file_with_text_as_text_and_relative_links(samples, tmp_path):
    # The first two submits fail: a failed and a succeeded card on the same page.
    work = await simulated_batch(samples, tmp_path / "work", ["script.submit=fail,fail"])
    page = await build_gallery(work, "quickstart")
    assert page == (tmp_path / "work" / "simulated" / "quickstart" / "gallery.html").resolve()
    text = page.read_text()
    records = gallery_data(page)
    assert sorted(field(r, "state") for r in records) == ["failed"] * 2 + ["succeeded"] * 4
    # Nothing the manifest says reaches the page as markup: the page holds no job at all, and the
    # data is JSON in a string that the page's script puts in as text.
    assert "pwned" not in text and "take 2" not in text
    assert field(records[0], "prompt") == NASTY and ["_note", "<i>take 2</i>"] in field(records[0], "settings")
    assert "<script>" not in page.with_name("gallery-data.js").read_text()
    # Self-contained: one inline script and style, the data file beside it, nothing from anywhere.
    assert text.count("<script>") == 1 and re.findall(r'<script src="([^"]+)"', text) == ["gallery-data.js"]
    assert "<link" not in text and not re.search(r"""(src|href)="(https?:)?//""", text)
    # Outputs by relative paths that resolve to real files; inputs as thumbnails beside the page.
    videos = [o[0] for r in records for o in field(r, "outputs")]
    assert len(videos) == 4 and all((page.parent / v).is_file() for v in videos)
    inputs = {u for r in records for u in field(r, "inputs")}
    assert inputs and all(u.startswith("thumbs/") and u.endswith(".jpg") for u in inputs)
    for u in inputs:
        with Image.open(page.parent / u) as img:
            assert img.format == "JPEG" and max(img.size) <= 320
    assert sum(1 for r in records if (field(r, "error") or "").startswith("Generation failed")) == 2
    settings = dict(tuple(kv) for kv in field(records[0], "settings"))
    assert settings["seed"] == "42" and settings["frames"] == "121"


async def test_remote_input_images_are_linked_by_their_url(simulator, tmp_path):
    sim = await simulator(duration=0.05)
    url = sim.publish_file(make_image(tmp_path / "in.jpg", 640, 480))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({"name": "remote", "jobs": [{"prompt": "p", "image": url}]}))
    await app.run(app.RunOptions(workdir=tmp_path / "work", manifest=manifest,
                                 target=app.Target(api_url=sim.base_url, token="t"), settings=settings()))
    (record,) = gallery_data(await build_gallery(tmp_path / "work", "remote"))
    assert field(record, "inputs") == [url]


async def test_unknown_batch_or_missing_store_is_a_usage_error(samples, tmp_path):
    with pytest.raises(UsageError, match="no batchgen store"):
        await build_gallery(tmp_path / "nothing", "quickstart")
    work = await simulated_batch(samples, tmp_path / "work", [])
    with pytest.raises(UsageError, match="no batch named 'nope'.*known: quickstart"):
        await build_gallery(work, "nope")


# ---- the page in a real browser -----------------------------------------------------------------


class CDP:
    """A minimal Chrome DevTools Protocol client on one websocket: commands and their answers,
    and every event kept in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self._pending:
                self._pending.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)
                self._changed.set()
        for fut in self._pending.values():
            fut.set_exception(ConnectionError("the browser closed the DevTools connection"))

    async def send(self, method: str, params: dict[str, Any] | None = None,
                   session: str | None = None) -> dict[str, Any]:
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        await self.ws.send_str(json.dumps(msg))
        answer = await asyncio.wait_for(fut, WAIT)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    async def wait_event(self, method: str, after: int = 0) -> dict[str, Any]:
        async def find() -> dict[str, Any]:
            while True:
                for ev in self.events[after:]:
                    if ev.get("method") == method:
                        return ev
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(find(), WAIT)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self.ws.close()


class Page:
    """One tab of the browser, attached through a flat session."""

    def __init__(self, cdp: CDP, session: str):
        self.cdp = cdp
        self.session = session

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.cdp.send(method, params, self.session)

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                      "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, what: str) -> Any:
        """Poll ``expression`` until it is truthy; fail after WAIT seconds saying ``what``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if loop.time() > deadline:
                raise AssertionError(f"timed out after {WAIT:.0f} s waiting for {what}")
            await asyncio.sleep(0.1)

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and browser-logged errors seen so far."""
        found = []
        for ev in self.cdp.events:
            method, params = ev.get("method"), ev.get("params", {})
            if ev.get("sessionId") != self.session:
                continue
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description")))
                                                    for a in params.get("args", [])))
            elif method == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append("exception: " + str(details.get("exception", {}).get("description")
                                                 or details.get("text")))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                entry = params["entry"]
                found.append(f"log: {entry.get('text')} {entry.get('url', '')}".strip())
        return found

    async def click(self, selector: str) -> None:
        """A real mouse click (pressed, released) at the middle of the element."""
        box = await self.evaluate(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1],
                                                         "button": "left", "clickCount": 1})


@contextlib.asynccontextmanager
async def chromium(profile: Path):
    """Headless Chromium on a free DevTools port; always killed (its whole process group) on exit."""
    assert CHROMIUM.exists(), f"BATCHGEN_REQUIRE_CHROMIUM is set but {CHROMIUM} is missing"
    profile.mkdir(parents=True, exist_ok=True)
    proc = await asyncio.create_subprocess_exec(
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}", "--remote-debugging-port=0",
        "--autoplay-policy=no-user-gesture-required", "about:blank",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, start_new_session=True,
    )
    session: aiohttp.ClientSession | None = None
    cdp: CDP | None = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = asyncio.get_running_loop().time() + WAIT
        while not (port_file.exists() and len(port_file.read_text().splitlines()) >= 2):
            if proc.returncode is not None or asyncio.get_running_loop().time() > deadline:
                err = (await proc.stderr.read()).decode(errors="replace") if proc.returncode is not None else ""
                raise AssertionError(f"Chromium did not start its DevTools server: {err[-2000:]}")
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().splitlines()[:2]
        session = aiohttp.ClientSession()
        ws = await asyncio.wait_for(session.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0), WAIT)
        cdp = CDP(ws)
        yield cdp
    finally:
        if cdp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(cdp.send("Browser.close"), 5)
            await cdp.close()
        if session is not None:
            await session.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group this test started, renderers included
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), 10)


async def open_page(cdp: CDP, url: str, width: int = 1280, height: int = 900) -> Page:
    target = await cdp.send("Target.createTarget", {"url": "about:blank"})
    attached = await cdp.send("Target.attachToTarget", {"targetId": target["targetId"], "flatten": True})
    page = Page(cdp, attached["sessionId"])
    for domain in ("Runtime", "Log", "Page"):
        await page.send(f"{domain}.enable")
    await page.send("Emulation.setDeviceMetricsOverride",
                    {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    mark = len(cdp.events)
    answer = await page.send("Page.navigate", {"url": url})
    assert "errorText" not in answer, answer
    await cdp.wait_event("Page.loadEventFired", after=mark)
    return page


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


VIDEO_STATES = """Array.from(document.querySelectorAll('.card[data-state="succeeded"] video')).map(v =>
    ({src: v.getAttribute('src'), ready: v.readyState, error: v.error && v.error.code,
      message: v.error && v.error.message, width: v.videoWidth, duration: v.duration}))"""
VISIBLE_STATES = """Array.from(document.querySelectorAll('.card'))
    .filter(c => getComputedStyle(c).display !== 'none' && c.getClientRects().length > 0)
    .map(c => c.dataset.state)"""


@needs_chromium
async def test_gallery_in_headless_chromium(samples, tmp_path):
    work = await simulated_batch(samples, tmp_path / "work", ["script.submit=fail,fail"])
    page_path = await build_gallery(work, "quickstart")
    async with chromium(tmp_path / "profile") as cdp:
        page = await open_page(cdp, page_path.as_uri())
        # Every succeeded job's video reaches loadedmetadata: the file is found and Chromium can
        # read the simulator's MP4 (H.264).
        videos = await page.evaluate(VIDEO_STATES)
        assert len(videos) == 4
        try:
            await page.wait_for(
                "Array.from(document.querySelectorAll('.card[data-state=\"succeeded\"] video'))"
                ".every(v => v.readyState >= 1)", "every video's metadata")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {await page.evaluate(VIDEO_STATES)}") from None
        videos = await page.evaluate(VIDEO_STATES)
        assert all(v["error"] is None and v["width"] > 0 and v["duration"] > 0 for v in videos), videos
        # Input images load too (naturalWidth is 0 for a broken image).
        await page.wait_for("Array.from(document.images).every(i => i.complete)", "images")
        broken = await page.evaluate(
            "Array.from(document.images).filter(i => i.naturalWidth === 0).map(i => i.src)")
        assert broken == []
        # The manifest's HTML is shown as text, never run.
        assert await page.evaluate("window.pwned === undefined")
        assert await page.evaluate("document.querySelector('.card .prompt').textContent") == NASTY
        assert await page.evaluate("document.querySelectorAll('.card .badge.sim').length") == 6

        png = tmp_path / "gallery.png"
        shot = await page.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        png.write_bytes(base64.b64decode(shot["data"]))
        width, height = png_size(png.read_bytes())
        assert width >= 1200 and height >= 600 and png.stat().st_size > 20_000  # less a scrollbar
        if os.environ.get("BATCHGEN_SCREENSHOTS"):  # to look at it: BATCHGEN_SCREENSHOTS=/some/dir
            shutil.copy(png, Path(os.environ["BATCHGEN_SCREENSHOTS"]) / "gallery.png")

        assert sorted(await page.evaluate(VISIBLE_STATES)) == ["failed"] * 2 + ["succeeded"] * 4
        await page.click('button[data-filter="failed"]')
        await page.wait_for(f"(() => {{ const s = {VISIBLE_STATES}; return s.length === 2 && "
                            "s.every(x => x === 'failed'); })()", "only failed cards")
        assert await page.evaluate(
            "document.querySelector('button[data-filter=\"failed\"]').getAttribute('aria-pressed')") == "true"
        errors = await page.evaluate("Array.from(document.querySelectorAll('.card:not([hidden]) .error'))"
                                     ".map(e => e.textContent)")
        assert len(errors) == 2 and all(e.startswith("Generation failed") for e in errors)
        shot = await page.send("Page.captureScreenshot", {"format": "png"})
        if os.environ.get("BATCHGEN_SCREENSHOTS"):
            (Path(os.environ["BATCHGEN_SCREENSHOTS"]) / "gallery-failed.png").write_bytes(
                base64.b64decode(shot["data"]))

        await page.click('button[data-filter="all"]')
        await page.wait_for(f"{VISIBLE_STATES}.length === 6", "all cards again")
        assert page.errors() == []


CARDS = "document.querySelectorAll('.card').length"


@needs_chromium
async def test_ten_thousand_jobs_draw_only_the_cards_in_view_and_survive_a_move(samples, tmp_path):
    """10,000 jobs: the page holds a few dozen cards at most; search, filter and scrolling work on
    the data; and the work directory moved elsewhere (the manifest's images gone) still shows
    every thumbnail and video."""
    work = await simulated_batch(samples, tmp_path / "work", [])
    grow_batch(work / "simulated" / "batchgen.sqlite3", 10_000)
    await build_gallery(work, "quickstart")
    moved = tmp_path / "moved" / "work"
    shutil.move(work, moved)
    shutil.rmtree(samples / "images")
    page_path = moved / "simulated" / "quickstart" / "gallery.html"
    async with chromium(tmp_path / "profile") as cdp:
        page = await open_page(cdp, page_path.as_uri())
        await page.wait_for(f"{CARDS} > 0", "the first cards")
        assert 0 < await page.evaluate(CARDS) <= 60
        # Thumbnails and videos of the cards in view load from the moved directory.
        await page.wait_for("Array.from(document.images).every(i => i.complete)", "images")
        assert await page.evaluate("document.images.length") > 0
        assert await page.evaluate("Array.from(document.images).filter(i => i.naturalWidth === 0).length") == 0
        await page.wait_for("Array.from(document.querySelectorAll('video')).every(v => v.readyState >= 1)",
                            "every video's metadata")

        await page.evaluate("(() => { const s = document.getElementById('search'); s.value = 'scene 4242 ';"
                            " s.dispatchEvent(new Event('input')); })()")
        await page.wait_for(f"{CARDS} === 1", "one card for the search")
        assert (await page.evaluate("document.querySelector('.card .prompt').textContent")).startswith("scene 4242 ")
        await page.evaluate("(() => { const s = document.getElementById('search'); s.value = '';"
                            " s.dispatchEvent(new Event('input')); })()")

        await page.click('button[data-filter="failed"]')
        await page.wait_for("document.getElementById('shown').textContent === '999 shown'", "999 failed jobs")
        assert set(await page.evaluate(VISIBLE_STATES)) == {"failed"}
        # Every tenth job added failed (10, 20, ... 9990). Scrolled to the end: the last one is drawn,
        # and still only the cards in view.
        await page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        last = f"{9990:016x}"
        await page.wait_for(f"document.querySelector('.card[data-key=\"{last}\"]') !== null", "the last card")
        assert 0 < await page.evaluate(CARDS) <= 60
        assert page.errors() == []


def test_thumbnails_from_files_and_data_uris_are_made_once_by_digest(tmp_path):
    """A local file reference and a data: URI of the same image make one small JPEG named by the
    image's sha256; the data: URI's payload never becomes the thumbnail's URL."""
    import hashlib

    from batchgen.inline import FileRef
    from batchgen.thumbs import Thumbnails

    src = make_image(tmp_path / "big.png", 1600, 1200)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    ref = FileRef(str(src), digest, src.stat().st_size, "image/png").uri
    data_uri = "data:image/png;base64," + base64.b64encode(src.read_bytes()).decode()
    thumbs = Thumbnails(tmp_path / "page")
    assert thumbs.url(ref) == thumbs.url(data_uri) == f"thumbs/{digest}.jpg"
    made = tmp_path / "page" / "thumbs" / f"{digest}.jpg"
    with Image.open(made) as img:
        assert img.format == "JPEG" and img.size == (320, 240)
    assert made.stat().st_size < 30_000
    assert thumbs.url("data:image/png;base64,bm90IGFuIGltYWdl") is None  # not an image: no thumbnail
    assert thumbs.url("https://example.com/a.jpg") is None
