"""A fake of the RunComfy Model API: a real aiohttp server on loopback, faithful to the protocol
in runcomfy-api.md, with faults on demand.

Time is computed, not slept: each token's queue advances lazily from timestamps whenever a call
looks at it, so 5,000 jobs cost no tasks and no timers. Output media are generated once per
(input image, model, frames) and served with Range support.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import heapq
import hmac
import json
import logging
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
from aiohttp import web

from ..constants import MAX_REQUEST_BYTES
from ..images import ImageInfo, ImageProbeError, probe_bytes, read_data_uri
from ..inline import describe_data_uri
from ..schema import ModelSchema, bundled_schemas, find_schema, job_price
from ..validate import media_facts
from .faults import BODIES, HOSTILE_TEXT, FaultConfig, FaultPicker
from .media import make_image, make_video

log = logging.getLogger(__name__)

# Undocumented by RunComfy: how it answers invalid input (400 or 422, which code). We answer 422
# with 422001; the client treats any 4xx with an error envelope as "refused, will not heal".
INVALID_INPUT = (422, 422001)

# Models the simulator's catalog offers that batchgen does not bundle (so the path from catalog to
# validated run is tested end to end), each with its catalog facts under "catalog".
CATALOG_DIR = Path(__file__).parent / "catalog"
# What GET /prod/v2/balance reports for an unlimited wallet (no --balance).
UNLIMITED_BALANCE = 1_000_000.0
# Entries the malformed fault adds to a catalog page: not mappings, ids of the wrong type, a
# schema that is not an object, and one whose schema is an object but not a usable one.
MALFORMED_ENTRIES: list[Any] = [
    42, "text", {"display_name": "no id"}, {"model_id": 7}, {"model_id": "bad/schema", "input_schema": "nope"},
    {"model_id": "broken/schema/image-to-video", "categories": ["image-to-video"], "base_price_usd": 0.1,
     "input_schema": {"type": "object", "properties": {"prompt": 5}}},
]


@cache
def catalog_only_models() -> dict[str, tuple[ModelSchema, dict[str, Any]]]:
    """model id -> (schema, catalog facts) of the simulator's extra models."""
    out: dict[str, tuple[ModelSchema, dict[str, Any]]] = {}
    for path in sorted(CATALOG_DIR.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        out[data["model_id"]] = (ModelSchema(data, str(path)), data.get("catalog") or {})
    return out


@dataclass
class SimConfig:
    token: str | None = None  # only this Bearer token is accepted; None: any non-empty one
    concurrency: int = 4  # jobs running at once per token (its hidden limit); the excess waits in_queue
    # Jobs a token may have waiting in_queue; a submit beyond them gets 429 (nothing created).
    # None: no limit, the queue grows as long as submits come.
    max_queued: int | None = None
    duration: float = 2.0  # seconds a job runs
    duration_jitter: float = 0.0  # +- this fraction
    price_usd: float = 0.10
    balance_usd: float | None = None  # None: unlimited
    extra_schemas: list[Path] = field(default_factory=list)
    validate_inputs: bool = True  # fetch and check input images, as the service does
    faults: FaultConfig = field(default_factory=FaultConfig)
    seed: int | None = None
    # Where accepted jobs are remembered across restarts (JSON lines), so a run interrupted under
    # --simulate finds its jobs again, as it would at the real service. None: memory only.
    state_file: Path | None = None


@dataclass
class _Job:
    id: str
    owner: str  # hash of the token, never the token
    model_id: str
    input: dict[str, Any]
    submitted_at: float
    duration: float
    will_fail: bool
    media_key: str
    started_at: float | None = None
    finished_at: float | None = None
    cancelled_at: float | None = None
    offhost: bool = False  # its output URL names another host (fault offhost)

    def status(self) -> str:
        if self.cancelled_at is not None:
            return "cancelled"
        if self.finished_at is not None:
            return "completed"
        if self.started_at is not None:
            return "in_progress"
        return "in_queue"


class _Queue:
    """One token's jobs: at most ``concurrency`` running, the rest waiting in order."""

    def __init__(self, concurrency: int):
        self.concurrency = concurrency
        self.waiting: deque[_Job] = deque()
        self.running: list[tuple[float, str]] = []  # heap of (end time, job id)

    def advance(self, now: float, jobs: dict[str, _Job]) -> None:
        while True:
            while self.waiting and self.waiting[0].cancelled_at is not None:
                self.waiting.popleft()
            if self.waiting and len(self.running) < self.concurrency:
                self._start(self.waiting.popleft(), now)
                continue
            if self.running and self.running[0][0] <= now:
                end, jid = heapq.heappop(self.running)
                jobs[jid].finished_at = end
                # The freed slot went to the next waiting job at the moment it freed.
                while self.waiting and self.waiting[0].cancelled_at is not None:
                    self.waiting.popleft()
                if self.waiting:
                    nxt = self.waiting.popleft()
                    self._start(nxt, max(end, nxt.submitted_at))
                continue
            return

    def _start(self, job: _Job, at: float) -> None:
        job.started_at = at
        heapq.heappush(self.running, (at + job.duration, job.id))

    def queued(self) -> int:
        """Jobs waiting (not cancelled)."""
        return sum(1 for j in self.waiting if j.cancelled_at is None)

    def position(self, job: _Job) -> int:
        """1 = next to start."""
        pos = 0
        for j in self.waiting:
            if j.cancelled_at is None:
                pos += 1
            if j is job:
                return pos
        return 0


class Simulator:
    """The fake API. ``await start()``, use ``base_url``, ``await stop()``."""

    def __init__(self, config: SimConfig | None = None):
        self.config = config or SimConfig()
        self.faults = FaultPicker(self.config.faults, self.config.seed)
        self._rng = random.Random(self.config.seed)
        self.jobs: dict[str, _Job] = {}
        self._order: list[str] = []
        self._queues: dict[str, _Queue] = {}
        self.calls = {"submit": 0, "status": 0, "result": 0, "cancel": 0, "download": 0, "model": 0,
                      "catalog": 0, "balance": 0}
        self._spent: dict[str, float] = {}
        self._published: dict[str, Path] = {}
        self._images: dict[str, tuple[bytes, ImageInfo] | str] = {}
        self._image_locks: dict[str, asyncio.Lock] = {}
        self._media: dict[str, bytes] = {}
        self._media_inputs: dict[str, tuple[str | None, str, int]] = {}
        self._media_image_bytes: dict[str, bytes] = {}
        self._media_locks: dict[str, asyncio.Lock] = {}
        self._secret = uuid.uuid4().bytes
        self._max_body = self.config.faults.max_body or MAX_REQUEST_BYTES
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.root_url = ""
        self.base_url = ""
        self._port = 0
        # Output downloads that carried an Authorization header: the token must never go there.
        self.output_auth_seen = 0
        # The most jobs one token had waiting in_queue right after a submit, and the submits
        # refused because of max_queued: how a client treats an account's queue.
        self.max_waiting = 0
        self.refused_queue_full = 0
        # The most jobs each token (by its hash) had at once, waiting or running, right after a
        # submit (when that number can grow): whether several runners kept one account's cap.
        self.max_in_flight: dict[str, int] = {}

    # ---- lifecycle -----------------------------------------------------------------------------

    def app(self) -> web.Application:
        # RunComfy's own client sends at most 64 MiB (local files inline as base64); past that
        # (or the max_body fault) aiohttp refuses the body, which _submit answers with a 413.
        app = web.Application(client_max_size=self._max_body)
        r = app.router
        r.add_post("/v1/models/{model_id:.+}", self._submit)
        r.add_get("/v1/models", self._catalog)
        r.add_get("/v1/models/categories", self._categories)  # before the model route, which would take it
        r.add_get("/v1/models/{model_id:.+}", self._model_info)
        r.add_get("/prod/v2/balance", self._balance)
        r.add_get("/v1/requests/{rid}/status", self._status)
        r.add_get("/v1/requests/{rid}/result", self._result)
        r.add_post("/v1/requests/{rid}/cancel", self._cancel)
        r.add_get("/_sim/requests", self._list)
        r.add_get("/_sim/stats", self._stats)
        r.add_get("/_sim/files/{rid}/{idx}/{name}", self._file)
        r.add_get("/_sim/uploads/{fid}/{name}", self._upload)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._load_state()
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        actual = self._port = sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        self.root_url = f"http://{shown}:{actual}"
        self.base_url = self.root_url + "/v1"

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def publish_file(self, path: str | Path) -> str:
        """Serve a local file at a URL of the simulator's own (tests and the benchmark give inputs
        as URLs this way); only such files are served."""
        path = Path(path).resolve()
        fid = hashlib.sha256(str(path).encode()).hexdigest()[:16]
        if fid not in self._published:
            self._published[fid] = path
            self._persist({"publish": fid, "path": str(path)})
        return f"{self.root_url}/_sim/uploads/{fid}/{quote(path.name)}"

    def requests(self) -> dict[str, Any]:
        now = time.time()
        self._advance_all(now)
        return {
            "requests": [self._describe(self.jobs[j]) for j in self._order],
            "calls": dict(self.calls),
            "max_waiting": self.max_waiting, "refused_queue_full": self.refused_queue_full,
        }

    # ---- helpers -------------------------------------------------------------------------------

    def _advance_all(self, now: float) -> None:
        for q in self._queues.values():
            q.advance(now, self.jobs)

    def _describe(self, job: _Job) -> dict[str, Any]:
        return {
            "request_id": job.id, "model_id": job.model_id, "input": job.input,
            "status": job.status(), "will_fail": job.will_fail,
            "submitted_at": job.submitted_at, "started_at": job.started_at,
            "finished_at": job.finished_at, "cancelled_at": job.cancelled_at,
        }

    def _error(self, status: int, code: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
        message = self._text(message)
        return web.json_response({"error_code": code, "error_message": message}, status=status, headers=headers)

    def _text(self, message: str) -> str:
        """An error message as the API writes it, or as a hostile one would (fault hostile_text)."""
        return HOSTILE_TEXT + message if self.config.faults.hostile_text else message

    def _auth(self, request: web.Request) -> str | web.Response:
        """The caller's identity (a hash of its token), or RunComfy's error: 400 + 400004."""
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header.lower().startswith("bearer ") else ""
        expected = self.config.token
        if not token or (expected is not None and not hmac.compare_digest(token, expected)):
            return self._error(400, 400004, "Invalid or missing API token (UserAccountError)")
        return hashlib.sha256(token.encode()).hexdigest()[:16]

    async def _fault(self, request: web.Request, endpoint: str) -> str | web.StreamResponse:
        """Apply the call's fault; returns the outcome to carry on with, or the response to send."""
        outcome = self.faults.pick(endpoint)
        if outcome == "slow":
            await asyncio.sleep(self.config.faults.slow_seconds)
            return "ok"
        if outcome == "429":
            headers = {}
            ra = self.config.faults.retry_after
            if ra == "date":
                headers["Retry-After"] = format_datetime(datetime.now(UTC), usegmt=True)
            elif ra is not None:
                headers["Retry-After"] = ra
            return self._error(429, 429001, "Too many requests, slow down", headers)
        if outcome == "5xx":
            return web.Response(status=502, text="<html><body>502 Bad Gateway</body></html>",
                                content_type="text/html")
        if outcome == "error200":
            return self._error(200, 500001, "Internal error, please try again")
        if outcome == "404":
            return self._error(404, 404001, "Request not found, deleted or expired")
        if outcome == "badjson":
            return web.Response(status=200, text='{"request_id": "', content_type="application/json")
        return outcome

    def _answer(self, body: dict[str, Any]) -> web.Response:
        """A /status or /result answer, with the faults that change what it says: a status word
        that never becomes final (``stuck``), fields set to raw JSON text (``garble.FIELD``)."""
        faults = self.config.faults
        if faults.stuck_status is not None:
            body["status"] = faults.stuck_status
            body.pop("output", None)
        if not faults.garble:
            return web.json_response(body)
        marks = {}
        for name, raw in faults.garble.items():
            mark = f"@@garble-{uuid.uuid4().hex}@@"
            body[name], marks[json.dumps(mark)] = mark, raw
        text = json.dumps(body)
        for mark, raw in marks.items():  # raw text: json.dumps cannot write 1e400 or Infinity as given
            text = text.replace(mark, raw)
        return web.Response(text=text, content_type="application/json")

    def _owned(self, request: web.Request, owner: str) -> _Job | web.Response:
        job = self.jobs.get(request.match_info["rid"])
        if job is None:
            return self._error(404, 404001, "Request not found, deleted or expired")
        if job.owner != owner:
            return self._error(403, 403001, "This request belongs to another user")
        return job

    def _urls(self, rid: str) -> dict[str, str]:
        base = f"{self.base_url}/requests/{rid}"
        return {"status_url": f"{base}/status", "result_url": f"{base}/result", "cancel_url": f"{base}/cancel"}

    # ---- input images --------------------------------------------------------------------------

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

    # ---- endpoints -----------------------------------------------------------------------------

    async def _submit(self, request: web.Request) -> web.StreamResponse:
        self.calls["submit"] += 1
        owner = self._auth(request)
        if isinstance(owner, web.Response):
            return owner
        outcome = await self._fault(request, "submit")
        if not isinstance(outcome, str):
            return outcome
        model_id = unquote(request.match_info["model_id"])
        schema = self._schema(model_id)
        if schema is None:
            return self._error(400, 400001, f"Unknown model '{model_id}' (InvalidResourceIdentifier)")
        try:
            body = await request.json()
        except web.HTTPRequestEntityTooLarge:
            return self._error(413, 413001, f"Request body too large: at most {self._max_body:,} bytes")
        except (ValueError, UnicodeDecodeError):
            return self._error(*INVALID_INPUT, "Request body must be a JSON object")
        if not isinstance(body, dict):
            return self._error(*INVALID_INPUT, "Request body must be a JSON object")
        image_bytes: bytes | None = None
        first_image: str | None = None
        if self.config.validate_inputs:
            images: dict[str, ImageInfo | str] = {}
            for name, is_list in schema.image_fields().items():
                value = body.get(name)
                for ref in (value if is_list and isinstance(value, list) else [value]):
                    if isinstance(ref, str):
                        got = await self._image(ref)
                        images[ref] = got if isinstance(got, str) else got[1]
                        if not isinstance(got, str) and image_bytes is None:
                            image_bytes, first_image = got[0], _identity(ref, got[0])
            problems = schema.check(body, images)
            for name, kind in schema.other_media_fields().items():
                value = body.get(name)
                for ref in (value if isinstance(value, list) else [value]):
                    if isinstance(ref, str) and ref.startswith("data:"):
                        facts = await asyncio.to_thread(media_facts, ref, kind)
                        assert facts is not None  # None only for a URL
                        found = [facts] if isinstance(facts, str) else schema.file_rule_failures(name, facts)
                        problems += [(name, f"{describe_data_uri(ref)}: {m}") for m in found]
            if problems:
                text = "; ".join(f"{f}: {m}" for f, m in problems)
                return self._error(*INVALID_INPUT, f"Invalid input: {text}")
        # Like the service, which stores inline files as hosted inputs: the job keeps no payload.
        body = {k: _without_payload(v) for k, v in body.items()}
        queue = self._queues.setdefault(owner, _Queue(self.config.concurrency))
        queue.advance(time.time(), self.jobs)
        max_queued = self.config.max_queued
        if (max_queued is not None and len(queue.running) >= queue.concurrency
                and queue.queued() >= max_queued):
            # Certainly refused: nothing created, nothing billed.
            self.refused_queue_full += 1
            return self._error(429, 429001, f"Too many queued requests (at most {max_queued}), slow down")
        price = self._price(model_id, body)
        if self.config.balance_usd is not None:
            spent = self._spent.get(owner, 0.0)
            if spent + price > self.config.balance_usd + 1e-9:
                return self._error(400, 400002, "Insufficient balance (InsufficientResources)")
            self._spent[owner] = spent + price
        now = time.time()
        jitter = self.config.duration_jitter
        duration = self.config.duration
        if jitter:
            duration *= 1 + jitter * (2 * self._rng.random() - 1)
        frames = body["frames"] if isinstance(body.get("frames"), int) else 121
        media_key = hashlib.sha256(
            f"{model_id}|{first_image}|{frames}|{schema.output_kind}".encode()
        ).hexdigest()[:20]
        if media_key not in self._media_inputs:
            self._media_inputs[media_key] = (first_image, schema.output_kind, frames)
            if image_bytes is not None:
                self._media_image_bytes[media_key] = image_bytes
        job = _Job(
            id=str(uuid.uuid4()), owner=owner, model_id=model_id, input=body, submitted_at=now,
            duration=max(0.0, duration), will_fail=outcome == "fail" or self.faults.job_fails(),
            media_key=media_key, offhost=self.faults.job_offhost(),
        )
        self.jobs[job.id] = job
        self._order.append(job.id)
        self._persist({"job": {
            "id": job.id, "owner": owner, "model_id": model_id, "input": body, "submitted_at": now,
            "duration": job.duration, "will_fail": job.will_fail, "media_key": media_key,
            "offhost": job.offhost,
            "media": list(self._media_inputs[media_key]), "image_path": self._local_path(first_image),
        }})
        queue.advance(now, self.jobs)
        queue.waiting.append(job)
        queue.advance(now, self.jobs)
        self.max_waiting = max(self.max_waiting, queue.queued())
        in_flight = len(queue.running) + queue.queued()
        self.max_in_flight[owner] = max(self.max_in_flight.get(owner, 0), in_flight)
        if outcome == "drop":
            # The job exists (and would be billed) but the answer never arrives.
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=200)
        if outcome in ("500_created", "error200_created"):
            # The job exists (and would be billed), then something failed on the way out: the
            # client gets a server error in RunComfy's own envelope, and no request id.
            status = 500 if outcome == "500_created" else 200
            return self._error(status, 500001, "Internal error, please try again")
        return web.json_response({"request_id": job.id, **self._urls(job.id)})

    def _local_path(self, url: str | None) -> str | None:
        own = self.root_url + "/_sim/uploads/"
        if url and url.startswith(own):
            path = self._published.get(url[len(own):].split("/", 1)[0])
            return str(path) if path else None
        return None

    def _persist(self, record: dict[str, Any]) -> None:
        if self.config.state_file is None:
            return
        self.config.state_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.config.state_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _load_state(self) -> None:
        """Replay the state file: jobs accepted by an earlier simulator process exist again, so
        their request ids keep working. Each keeps its own times: its queue is replayed as it
        would have run had the simulator never stopped (records are in the order they happened),
        so jobs of earlier runs are long finished, not queued again ahead of new ones: a run's
        makespan does not grow with the work directory's history, and no queue wait is made up."""
        path = self.config.state_file
        if path is None or not path.exists():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if "publish" in rec:
                self._published[rec["publish"]] = Path(rec["path"])
            elif "job" in rec:
                j = rec["job"]
                job = _Job(id=j["id"], owner=j["owner"], model_id=j["model_id"], input=j["input"],
                           submitted_at=j["submitted_at"], duration=j["duration"],
                           will_fail=j["will_fail"], media_key=j["media_key"],
                           offhost=j.get("offhost", False))
                self.jobs[job.id] = job
                self._order.append(job.id)
                first, kind, frames = j["media"]
                self._media_inputs.setdefault(job.media_key, (first, kind, frames))
                if j.get("image_path") and job.media_key not in self._media_image_bytes:
                    try:
                        self._media_image_bytes[job.media_key] = Path(j["image_path"]).read_bytes()
                    except OSError:
                        pass
                queue = self._queues.setdefault(job.owner, _Queue(self.config.concurrency))
                queue.advance(job.submitted_at, self.jobs)  # as _submit does, at its own moment
                queue.waiting.append(job)
                queue.advance(job.submitted_at, self.jobs)
            elif "cancel" in rec and rec["cancel"] in self.jobs:
                job = self.jobs[rec["cancel"]]
                self._queues[job.owner].advance(rec["at"], self.jobs)
                job.cancelled_at = rec["at"]

    def _schema(self, model_id: str) -> ModelSchema | None:
        for path in self.config.extra_schemas:
            s = find_schema(model_id, path)
            if s is not None and s.model_id == model_id:
                return s
        found = find_schema(model_id)
        if found is None and model_id in catalog_only_models():
            found = catalog_only_models()[model_id][0]
        return found

    def _price(self, model_id: str, inputs: dict[str, Any]) -> float:
        """What a job costs: --price for a bundled model; an extra model's own catalog price (per
        second of its duration when priced so)."""
        extra = catalog_only_models().get(model_id)
        if extra is None:
            return self.config.price_usd
        facts = extra[1]
        price = job_price(facts.get("base_price_usd"), facts.get("price_unit"), inputs)
        return price if price is not None else self.config.price_usd

    def catalog(self) -> list[dict[str, Any]]:
        """Every model's catalog entry with its input schema, as GET /models?include_schema=true."""
        schemas = [ModelSchema.load(p) for p in self.config.extra_schemas] + bundled_schemas()
        entries: dict[str, dict[str, Any]] = {}
        for schema in schemas:
            last = schema.model_id.rsplit("/", 1)[-1]
            entries.setdefault(schema.model_id, {
                "model_id": schema.model_id, "kind": "model", "display_name": schema.model_id,
                "categories": [last] if "-to-" in last else [], "base_price_usd": self.config.price_usd,
                "price_unit": "output", "pricing_note": "simulated price", "input_schema": schema.data["input"]})
        for model_id, (schema, facts) in catalog_only_models().items():
            entries.setdefault(model_id, {"model_id": model_id, "kind": "model", **facts,
                                          "input_schema": schema.data["input"]})
        return sorted(entries.values(), key=lambda e: e["model_id"])

    @staticmethod
    def _without_schema(entry: dict[str, Any], include: bool) -> dict[str, Any]:
        return entry if include else {k: v for k, v in entry.items() if k != "input_schema"}

    async def _admit(self, request: web.Request, endpoint: str) -> tuple[str, str] | web.StreamResponse:
        """Count the call, check its token, apply its fault: (owner, outcome), or the answer to send."""
        self.calls[endpoint] += 1
        owner = self._auth(request)
        if isinstance(owner, web.Response):
            return owner
        outcome = await self._fault(request, endpoint)
        return (owner, outcome) if isinstance(outcome, str) else outcome

    async def _catalog(self, request: web.Request) -> web.StreamResponse:
        admitted = await self._admit(request, "catalog")
        if not isinstance(admitted, tuple):
            return admitted
        outcome = admitted[1]
        q = request.query
        search, category = q.get("search", "").lower(), q.get("category", "")
        found = [e for e in self.catalog()
                 if (not search or search in e["model_id"].lower() or search in e["display_name"].lower())
                 and (not category or category in e["categories"])]
        try:
            limit = min(500, max(1, int(q.get("limit", "50"))))
            offset = max(0, int(q.get("offset", "0")))
        except ValueError:
            return self._error(*INVALID_INPUT, "limit and offset must be whole numbers")
        include = q.get("include_schema") == "true"
        page: list[Any] = [self._without_schema(e, include) for e in found[offset:offset + limit]]
        if outcome == "malformed":
            page += MALFORMED_ENTRIES
        return web.json_response({"models": page, "total": len(found)})

    async def _categories(self, request: web.Request) -> web.StreamResponse:
        owner = self._auth(request)
        if isinstance(owner, web.Response):
            return owner
        names = sorted({c for e in self.catalog() for c in e["categories"]})
        return web.json_response({"categories": names})

    async def _balance(self, request: web.Request) -> web.StreamResponse:
        """RunComfy's wallet (on its main API host, served here at the same path): what is left of
        --balance after this token's jobs; an unlimited wallet says UNLIMITED_BALANCE."""
        admitted = await self._admit(request, "balance")
        if not isinstance(admitted, tuple):
            return admitted
        owner = admitted[0]
        total = self.config.balance_usd
        left = UNLIMITED_BALANCE if total is None else max(0.0, total - self._spent.get(owner, 0.0))
        return web.json_response({"balance_usd": round(left, 6), "currency": "USD"})

    async def _model_info(self, request: web.Request) -> web.StreamResponse:
        self.calls["model"] += 1
        owner = self._auth(request)
        if isinstance(owner, web.Response):
            return owner
        model_id = unquote(request.match_info["model_id"])
        shown = self.config.faults.model_info
        entry = next((e for e in self.catalog() if e["model_id"] == model_id), None)
        if entry is None or shown == "404":
            return self._error(404, 400001, f"Unknown model '{model_id}'")
        body = self._without_schema(entry, request.query.get("include_schema") == "true")
        if shown == "noprice":
            body = {k: v for k, v in body.items() if k != "base_price_usd"}
        return web.json_response(body)

    async def _status(self, request: web.Request) -> web.StreamResponse:
        self.calls["status"] += 1
        owner = self._auth(request)
        if isinstance(owner, web.Response):
            return owner
        outcome = await self._fault(request, "status")
        if not isinstance(outcome, str):
            return outcome
        job = self._owned(request, owner)
        if isinstance(job, web.Response):
            return job
        queue = self._queues[job.owner]
        queue.advance(time.time(), self.jobs)
        body: dict[str, Any] = {"request_id": job.id, "status": job.status()}
        if body["status"] == "in_queue":
            body["queue_position"] = queue.position(job)
        urls = self._urls(job.id)
        body["status_url"], body["result_url"] = urls["status_url"], urls["result_url"]
        return self._answer(body)

    async def _result(self, request: web.Request) -> web.StreamResponse:
        self.calls["result"] += 1
        owner = self._auth(request)
        if isinstance(owner, web.Response):
            return owner
        outcome = await self._fault(request, "result")
        if not isinstance(outcome, str):
            return outcome
        job = self._owned(request, owner)
        if isinstance(job, web.Response):
            return job
        self._queues[job.owner].advance(time.time(), self.jobs)
        status = job.status()
        body: dict[str, Any] = {"request_id": job.id, "created_at": _iso(job.submitted_at),
                                "finished_at": _iso(job.finished_at or job.cancelled_at)}
        if status == "completed":
            if job.will_fail:
                body["status"] = "failed"
                body["error"] = self._text("Generation failed: the model could not produce a video for this input")
            else:
                body["status"] = "succeeded"
                kind = self._media_inputs[job.media_key][1]
                body["output"] = {kind: self._file_url(job, kind)}
        else:
            body["status"] = status
        if request.query.get("include_cost") == "true":
            body["model_id"] = job.model_id
            body["cost"] = self._price(job.model_id, job.input) if status == "completed" and not job.will_fail else 0.0
        return self._answer(body)

    def _file_url(self, job: _Job, kind: str) -> str:
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

    async def _cancel(self, request: web.Request) -> web.StreamResponse:
        self.calls["cancel"] += 1
        owner = self._auth(request)
        if isinstance(owner, web.Response):
            return owner
        outcome = await self._fault(request, "cancel")
        if not isinstance(outcome, str):
            return outcome
        job = self._owned(request, owner)
        if isinstance(job, web.Response):
            return job
        self._queues[job.owner].advance(time.time(), self.jobs)
        if job.status() == "in_queue":
            job.cancelled_at = time.time()
            self._persist({"cancel": job.id, "at": job.cancelled_at})
            result = "cancelled"
        else:
            result = "not_cancellable"
        return web.json_response({"request_id": job.id, "status": job.status(), "outcome": result},
                                 status=202)

    async def _list(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.requests())

    async def _stats(self, request: web.Request) -> web.StreamResponse:
        """Counters for tests and benchmarks: calls, and the most jobs in flight per token."""
        return web.json_response({"calls": self.calls, "max_in_flight": self.max_in_flight,
                                  "max_waiting": self.max_waiting})

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        path = self._published.get(request.match_info["fid"])
        if path is None or not path.exists():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    # ---- output files --------------------------------------------------------------------------

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

    def _signature_ok(self, job: _Job, request: web.Request) -> bool:
        if self.config.faults.expire_after is None:
            return True
        exp, sig = request.query.get("expires", ""), request.query.get("sig", "")
        if not exp.isdigit():
            return False
        want = hmac.new(self._secret, f"{job.id}|{exp}".encode(), "sha256").hexdigest()[:16]
        return hmac.compare_digest(sig, want) and time.time() * 1000 < int(exp)


@functools.cache
def _bomb() -> bytes:
    """64 MiB of zeros, gzipped to 64 KB: made once, 0.2 s."""
    return gzip.compress(bytes(64 << 20), 9)


def _identity(ref: str, data: bytes) -> str:
    """What names an input image in a media key: its URL, or an inline file's content hash."""
    return f"data:sha256:{hashlib.sha256(data).hexdigest()}" if ref.startswith("data:") else ref


def _without_payload(value: Any) -> Any:
    """A job's input as kept (in memory and in the state file): data: URIs shown, not held. So a
    simulator restarted before an inline input's output was made serves a plain output for it."""
    if isinstance(value, list):
        return [_without_payload(v) for v in value]
    return describe_data_uri(value) if isinstance(value, str) and value.startswith("data:") else value


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z") if ts is not None else None


async def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8787, ready: Any = None) -> None:
    """Run a simulator until cancelled (``batchgen simulate``). ``ready(sim)`` is called once it
    listens, e.g. to print its URL."""
    sim = Simulator(config)
    await sim.start(host, port)
    if ready is not None:
        ready(sim)
    try:
        await asyncio.Event().wait()
    finally:
        await sim.stop()


__all__ = ["FaultConfig", "SimConfig", "Simulator", "serve"]
