"""The RunComfy Model API client: one method per endpoint, typed results, errors from errors.py.

Protocol notes (../shared/runcomfy-api.md): errors may come with HTTP 200, so a 200 is a success
only without ``error_code``; ``/status`` and ``/result`` speak different status vocabularies;
model ids are paths (slashes, even spaces) escaped per segment. The token goes only to the API
base URL's host: URLs are always built from the base, never taken from responses, and redirects
are not followed.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
from yarl import URL

from . import constants as C
from .errors import (
    AccountError,
    APIConnectionError,
    APIResponseLostError,
    APIStatusError,
    InsufficientBalanceError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ServerError,
)
from .inline import InlineBody, InputFileError
from .limits import TokenBucket
from .retry import parse_retry_after

log = logging.getLogger(__name__)

# Status words, both vocabularies, folded to one: 'canceled' is seen in RunComfy's own clients.
_STATUS_ALIASES = {"canceled": "cancelled", "queued": "in_queue", "running": "in_progress"}
FINISHED_STATUSES = frozenset({"completed", "succeeded", "failed", "cancelled"})
OUTPUT_KINDS = ("image", "video", "images", "videos")


def normalize_status(status: Any) -> str:
    s = str(status or "").strip().lower()
    return _STATUS_ALIASES.get(s, s)


@dataclass(frozen=True)
class Submitted:
    request_id: str
    status_url: str | None
    result_url: str | None
    cancel_url: str | None


@dataclass(frozen=True)
class Status:
    request_id: str
    status: str  # normalized: in_queue, in_progress, completed, succeeded, failed, cancelled
    queue_position: int | None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED_STATUSES


@dataclass(frozen=True)
class Result:
    request_id: str
    status: str  # normalized: succeeded, failed, cancelled, in_queue, in_progress
    outputs: list[tuple[str, str]]  # [(kind, url)], kind 'image' or 'video'
    error: str | None
    cost: float | None
    created_at: str | None
    finished_at: str | None


@dataclass(frozen=True)
class CancelOutcome:
    request_id: str
    status: str
    outcome: str  # 'cancelled' or 'not_cancellable'


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    base_price_usd: float | None
    price_unit: str | None
    pricing_note: str | None


@functools.lru_cache(maxsize=64)  # one model per batch, asked once per submit
def model_path(model_id: str) -> str:
    """A model id as a URL path: each segment escaped, so spaces and '%' survive."""
    return "/".join(quote(seg, safe="") for seg in model_id.strip("/").split("/"))


def parse_outputs(output: Any) -> list[tuple[str, str]]:
    """Every output URL of a result's ``output`` object, in a stable order."""
    found: list[tuple[str, str]] = []
    if not isinstance(output, dict):
        return found
    for kind in OUTPUT_KINDS:
        value = output.get(kind)
        single = kind.rstrip("s")
        if isinstance(value, str) and value:
            found.append((single, value))
        elif isinstance(value, list):
            found.extend((single, v) for v in value if isinstance(v, str) and v)
    return found


def _error_message(body: Any) -> str | None:
    if isinstance(body, dict):
        for key in ("error_message", "message", "error", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict):
                inner = _error_message(value)
                if inner:
                    return inner
    return None


def _error_code(body: Any) -> int | None:
    if isinstance(body, dict) and "error_code" in body:
        try:
            return int(body["error_code"])
        except (TypeError, ValueError):
            return -1
    return None


def make_status_error(
    status: int, body: Any, retry_after: str | None, what: str
) -> APIStatusError:
    """Turn an HTTP status and (maybe) an error envelope into the right exception class.

    The envelope's code wins over the HTTP status: RunComfy answers a bad token with 400 (not
    401), and some of its APIs answer errors with 200.
    """
    code = _error_code(body)
    envelope = code is not None
    message = _error_message(body) or (f"HTTP {status}" if status >= 400 else "error")
    text = f"{what}: {message}" + (f" (error_code {code})" if code not in (None, -1) else "")
    if status < 400 and not envelope:
        status = 500
    kwargs = dict(status=status, error_code=code, envelope=envelope,
                  retry_after=parse_retry_after(retry_after))
    family = code // 1000 if code and code > 0 else status
    if code == 400004 or (not envelope and status in (401, 403)):
        return AccountError(text, **kwargs)
    if code == 400002 or status == 402 or family == 402:
        return InsufficientBalanceError(text, **kwargs)
    if family in (408, 429) or (not envelope and status in (408, 429)):
        return RateLimitError(text, **kwargs)
    if family == 404 or code == 404001:
        return NotFoundError(text, **kwargs)
    if 500 <= family < 600 or (not envelope and status >= 500):
        return ServerError(text, **kwargs)
    if 400 <= family < 500:
        return InvalidRequestError(text, **kwargs)
    return APIStatusError(text, **kwargs)


def _label(what: str, path: str) -> str:
    """How errors name a call: the endpoint, not its query string."""
    return f"{what} {path.partition('?')[0]}"


class RunComfyClient:
    """Calls the API at ``base_url`` with ``token``. Use as an async context manager, or pass a
    session you own (it will not be closed)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = C.REQUEST_TIMEOUT,
        connect_timeout: float = C.CONNECT_TIMEOUT,
        limit: int = 100,
        limiter: TokenBucket | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self._token = token
        self._session = session
        self._own_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
        # Built once: a dict per call is measurable at thousands of calls a second.
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._limit = limit
        # Paces every call (the run's --rate); None: no limit. Set by the runner.
        self.limiter = limiter
        self.calls: dict[str, int] = {"submit": 0, "status": 0, "result": 0, "cancel": 0, "model": 0}

    def __repr__(self) -> str:  # never show the token
        return f"RunComfyClient({self.base_url!r})"

    async def __aenter__(self) -> RunComfyClient:
        self._ensure_session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit),
                timeout=self._timeout,
            )
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # ---- endpoints -----------------------------------------------------------------------------

    async def submit(self, model_id: str, inputs: dict[str, Any] | str | InlineBody) -> Submitted:
        """``inputs``: a dict, the same already encoded as JSON text, or a body that streams local
        files in as data: URIs (inline.py)."""
        path = f"/models/{model_path(model_id)}"
        if isinstance(inputs, str):
            body = await self._call("submit", "POST", path, json_text=inputs)
        elif isinstance(inputs, InlineBody):
            body = await self._call("submit", "POST", path, payload=inputs)
        else:
            body = await self._call("submit", "POST", path, json_body=inputs)
        request_id = body.get("request_id") if isinstance(body, dict) else None
        if not isinstance(request_id, str) or not request_id:
            # A 200 without a request id: the job may exist, and we cannot find it. Unknown.
            raise APIResponseLostError(f"submit to {model_id}: answer without a request_id")
        return Submitted(request_id, body.get("status_url"), body.get("result_url"),
                         body.get("cancel_url"))

    async def status(self, request_id: str, *, paced: bool = True) -> Status:
        """``paced=False``: the caller has already taken this call's token from the limiter."""
        body = await self._call("status", "GET", f"/requests/{quote(request_id, safe='')}/status",
                                paced=paced)
        pos = body.get("queue_position")
        return Status(
            request_id=str(body.get("request_id") or request_id),
            status=normalize_status(body.get("status")),
            queue_position=int(pos) if isinstance(pos, int | float) else None,
        )

    async def result(self, request_id: str, include_cost: bool = True) -> Result:
        path = f"/requests/{quote(request_id, safe='')}/result"
        body = await self._call("result", "GET", path + "?include_cost=true" if include_cost else path)
        cost = body.get("cost")
        error = body.get("error")
        if error is not None and not isinstance(error, str):
            error = _error_message({"error": error}) or json.dumps(error)
        return Result(
            request_id=str(body.get("request_id") or request_id),
            status=normalize_status(body.get("status")),
            outputs=parse_outputs(body.get("output")),
            error=error,
            cost=float(cost) if isinstance(cost, int | float) else None,
            created_at=body.get("created_at"),
            finished_at=body.get("finished_at"),
        )

    async def cancel(self, request_id: str) -> CancelOutcome:
        body = await self._call("cancel", "POST", f"/requests/{quote(request_id, safe='')}/cancel")
        return CancelOutcome(
            request_id=str(body.get("request_id") or request_id),
            status=normalize_status(body.get("status")),
            outcome=str(body.get("outcome") or ""),
        )

    async def model_info(self, model_id: str) -> ModelInfo:
        body = await self._call("model", "GET", f"/models/{model_path(model_id)}")
        price = body.get("base_price_usd")
        return ModelInfo(
            model_id=str(body.get("model_id") or model_id),
            base_price_usd=float(price) if isinstance(price, int | float) else None,
            price_unit=body.get("price_unit"),
            pricing_note=body.get("pricing_note"),
        )

    # ---- transport -----------------------------------------------------------------------------

    async def _call(
        self, what: str, method: str, path: str, *, json_body: Any = None, json_text: str | None = None,
        payload: InlineBody | None = None, paced: bool = True,
    ) -> dict[str, Any]:
        """``path``: already escaped, with its query string if any. The body, if any: a value to
        send as JSON (``json_body``), JSON text (``json_text``), or a streamed ``payload``."""
        session = self._ensure_session()
        if paced and self.limiter is not None:
            await self.limiter.take()
        self.calls[what] += 1
        url = URL(self.base_url + path, encoded=True)
        headers = self._headers
        data: bytes | InlineBody | None = None
        if json_text is not None:
            data, headers = json_text.encode(), self._json_headers
        elif payload is not None:
            data, headers = payload, self._json_headers
        try:
            async with session.request(
                method, url, json=json_body, data=data, headers=headers, allow_redirects=False
            ) as resp:
                raw = await resp.read()
        except aiohttp.ClientConnectorError as exc:
            # The TCP/TLS connection was never made: the server cannot have seen the request.
            raise APIConnectionError(
                f"{_label(what, path)}: cannot connect to {self.base_url}: {exc.os_error}") from exc
        except aiohttp.ConnectionTimeoutError as exc:
            raise APIConnectionError(f"{_label(what, path)}: timed out connecting to {self.base_url}") from exc
        except TimeoutError as exc:
            raise APIResponseLostError(
                f"{_label(what, path)}: no answer within {self._timeout.total:g} s") from exc
        except aiohttp.ClientError as exc:
            if isinstance(exc.__cause__, InputFileError):
                # A local file was not what was validated: the body stopped short of its end, so
                # the server never had a whole request to act on.
                raise exc.__cause__ from None
            # Reset, disconnect, malformed response: the server may well have acted on it.
            raise APIResponseLostError(
                f"{_label(what, path)}: connection lost: {type(exc).__name__}: {exc}") from exc
        status = resp.status
        try:
            body = json.loads(raw) if raw else None  # blank: ValueError, None as well
        except ValueError:
            body = None
        if status >= 400 or _error_code(body) is not None:
            raise make_status_error(status, body, resp.headers.get("Retry-After"), _label(what, path))
        if 300 <= status < 400:
            raise ServerError(f"{_label(what, path)}: unexpected redirect (HTTP {status}); not followed",
                              status=status)
        if not isinstance(body, dict):
            raise APIResponseLostError(f"{_label(what, path)}: HTTP {status} with a body that is not JSON")
        return body
