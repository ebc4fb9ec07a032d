"""A fake of the RunComfy Model API: a real aiohttp server on loopback, faithful to the protocol
in runcomfy-api.md, with faults on demand.

Time is computed, not slept: each token's queue advances lazily from timestamps whenever a call
looks at it, so 5,000 jobs cost no tasks and no timers. Output media are generated once per
(input image, model, frames) and served with Range support.

``Simulator`` holds the server and the job endpoints (submit, status, result, cancel); its
parts are mixins of ``core.SimCore``: ``savedstate`` (jobs kept across restarts), ``inputs``
(input images fetched and probed), ``catalogapi`` (catalog, model info, balance), ``outputs``
(output files and their faults).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import aiohttp
from aiohttp import web

from ..constants import MAX_REQUEST_BYTES
from ..images import ImageInfo
from ..inline import describe_data_uri
from ..validate import media_facts
from .catalogapi import CatalogEndpoints
from .core import INVALID_INPUT, SimConfig, SimJob, TokenQueue
from .faults import FaultConfig, FaultPicker
from .inputs import InputImages
from .outputs import OutputFiles
from .savedstate import SavedState

log = logging.getLogger(__name__)

# How long a stopping simulator lets the requests under way finish before it cuts them (aiohttp
# waits 60 s): a slow fault or an endless body would otherwise hold a Ctrl-C that long.
SHUTDOWN_GRACE = 1.0


class Simulator(SavedState, InputImages, CatalogEndpoints, OutputFiles):
    """The fake API. ``await start()``, use ``base_url``, ``await stop()``."""

    def __init__(self, config: SimConfig | None = None):
        self.config = config or SimConfig()
        self.faults = FaultPicker(self.config.faults, self.config.seed)
        self._rng = random.Random(self.config.seed)
        self.jobs: dict[str, SimJob] = {}
        self._order: list[str] = []
        self._queues: dict[str, TokenQueue] = {}
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
        self._runner = web.AppRunner(self.app(), access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
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










    # ---- input images --------------------------------------------------------------------------



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
        queue = self._queues.setdefault(owner, TokenQueue(self.config.concurrency))
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
        job = SimJob(
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


async def serve(config: SimConfig, host: str = "127.0.0.1", port: int = 8787, ready: Any = None,
                stop: asyncio.Event | None = None) -> None:
    """Run a simulator until ``stop`` is set, or cancelled (``batchgen simulate``). ``ready(sim)``
    is called once it listens, e.g. to print its URL."""
    sim = Simulator(config)
    await sim.start(host, port)
    if ready is not None:
        ready(sim)
    try:
        await (stop or asyncio.Event()).wait()
    finally:
        await sim.stop()


__all__ = ["FaultConfig", "SimConfig", "Simulator", "serve"]
