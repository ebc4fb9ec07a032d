"""What every part of the simulator shares: its configuration, a job and a token's queue, and
``SimCore`` (the state, and authenticating, faulting and answering a call)."""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import hmac
import json
import random
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from ..images import ImageInfo
from .faults import HOSTILE_TEXT, FaultConfig, FaultPicker

# Undocumented by RunComfy: how it answers invalid input (400 or 422, which code). We answer 422
# with 422001; the client treats any 4xx with an error envelope as "refused, will not heal".
INVALID_INPUT = (422, 422001)


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
class SimJob:
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

class TokenQueue:
    """One token's jobs: at most ``concurrency`` running, the rest waiting in order."""

    def __init__(self, concurrency: int):
        self.concurrency = concurrency
        self.waiting: deque[SimJob] = deque()
        self.running: list[tuple[float, str]] = []  # heap of (end time, job id)

    def advance(self, now: float, jobs: dict[str, SimJob]) -> None:
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

    def _start(self, job: SimJob, at: float) -> None:
        job.started_at = at
        heapq.heappush(self.running, (at + job.duration, job.id))

    def queued(self) -> int:
        """Jobs waiting (not cancelled)."""
        return sum(1 for j in self.waiting if j.cancelled_at is None)

    def position(self, job: SimJob) -> int:
        """1 = next to start."""
        pos = 0
        for j in self.waiting:
            if j.cancelled_at is None:
                pos += 1
            if j is job:
                return pos
        return 0

class SimCore:
    """Declares the simulator's state (``Simulator.__init__`` sets it) and the acts every part of
    it uses: authenticate a call, apply its fault, answer or refuse it. The parts (saved state,
    input images, catalog, output files) are its mixins; ``server.Simulator`` brings them together
    with the job endpoints."""

    config: SimConfig
    faults: FaultPicker
    jobs: dict[str, SimJob]
    calls: dict[str, int]
    root_url: str
    base_url: str
    output_auth_seen: int
    _rng: random.Random
    _order: list[str]
    _queues: dict[str, TokenQueue]
    _spent: dict[str, float]
    _published: dict[str, Path]
    _images: dict[str, tuple[bytes, ImageInfo] | str]
    _image_locks: dict[str, asyncio.Lock]
    _media: dict[str, bytes]
    _media_inputs: dict[str, tuple[str | None, str, int]]
    _media_image_bytes: dict[str, bytes]
    _media_locks: dict[str, asyncio.Lock]
    _secret: bytes
    _session: aiohttp.ClientSession | None
    _port: int

    def _advance_all(self, now: float) -> None:
        for q in self._queues.values():
            q.advance(now, self.jobs)

    def _describe(self, job: SimJob) -> dict[str, Any]:
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

    def _owned(self, request: web.Request, owner: str) -> SimJob | web.Response:
        job = self.jobs.get(request.match_info["rid"])
        if job is None:
            return self._error(404, 404001, "Request not found, deleted or expired")
        if job.owner != owner:
            return self._error(403, 403001, "This request belongs to another user")
        return job

    def _urls(self, rid: str) -> dict[str, str]:
        base = f"{self.base_url}/requests/{rid}"
        return {"status_url": f"{base}/status", "result_url": f"{base}/result", "cancel_url": f"{base}/cancel"}

    async def _admit(self, request: web.Request, endpoint: str) -> tuple[str, str] | web.StreamResponse:
        """Count the call, check its token, apply its fault: (owner, outcome), or the answer to send."""
        self.calls[endpoint] += 1
        owner = self._auth(request)
        if isinstance(owner, web.Response):
            return owner
        outcome = await self._fault(request, endpoint)
        return (owner, outcome) if isinstance(outcome, str) else outcome
