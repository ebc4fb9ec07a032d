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
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict
from urllib.parse import quote, urlsplit

import aiohttp
from yarl import URL

from . import constants as C
from .errors import (
    AccountError,
    APIConnectionError,
    APIError,
    APIResponseLostError,
    APIStatusError,
    InsufficientBalanceError,
    InvalidRequestError,
    MalformedAnswerError,
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
    created_at: float | None  # the provider's clock, as epoch seconds; None when unreadable
    finished_at: float | None


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


@dataclass(frozen=True)
class ModelPage:
    """One page of the catalog, as answered: entries are checked by catalog.py, not here."""

    models: list[Any]
    total: int | None


@dataclass(frozen=True)
class Balance:
    balance_usd: float
    currency: str


# Hosts of RunComfy's own services: the one wallet behind every product answers here.
RUNCOMFY_DOMAINS = ("runcomfy.net", "runcomfy.com")


def token_may_go_to(url: str, api_url: str) -> bool:
    """Whether the API token may be sent to ``url`` (the balance endpoint): only to the API's own
    host, or over https to a RunComfy host. Anywhere else it could be stolen."""
    target, api = urlsplit(url), urlsplit(api_url)
    host = (target.hostname or "").lower()
    if not host:
        return False
    if host == (api.hostname or "").lower() and target.scheme == api.scheme:
        return True
    return target.scheme == "https" and any(host == d or host.endswith("." + d) for d in RUNCOMFY_DOMAINS)


@functools.lru_cache(maxsize=64)  # one model per batch, asked once per submit
def model_path(model_id: str) -> str:
    """A model id as a URL path: each segment escaped, so spaces and '%' survive."""
    return "/".join(quote(seg, safe="") for seg in model_id.strip("/").split("/"))


def parse_outputs(output: Any) -> list[tuple[str, str]]:
    """Every output URL of a result's ``output`` object, in a stable order. Anything that is not
    a plausible URL (not a string, empty, absurdly long) is ignored."""
    found: list[tuple[str, str]] = []
    if not isinstance(output, dict):
        return found
    for kind in OUTPUT_KINDS:
        value = output.get(kind)
        single = kind.rstrip("s")
        for url in (value if isinstance(value, list) else [value]):
            if isinstance(url, str) and 0 < len(url) <= C.MAX_OUTPUT_URL:
                found.append((single, url))
    return found


# ---- reading answers defensively ----------------------------------------------------------------
# An answer is data from the network: every field may be missing, of another type, or absurd
# (Infinity, NaN, 1e400, 2^64, megabytes of text). A field that is not essential is ignored when it
# cannot be read; an essential one (a status word) makes the call fail with MalformedAnswerError,
# which is retried like a lost answer. Nothing read here may crash the run or reach the store as a
# value SQLite cannot hold (integers beyond 2^63).


def _short(text: str) -> str:
    """A text from an answer, cut to a length a log line or a store row can carry."""
    return text if len(text) <= C.MAX_ANSWER_TEXT else text[:C.MAX_ANSWER_TEXT] + "…"


def _count(value: Any) -> int | None:
    """A small non-negative integer (a queue position), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value) if 0 <= value < 2**31 else None


def _usd(value: Any) -> float | None:
    """An amount of money (a cost, a price), or None when it is not a plausible one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        usd = float(value)  # an integer of 400 digits does not fit: OverflowError
    except OverflowError:
        return None
    return usd if math.isfinite(usd) and 0 <= usd <= C.MAX_JOB_COST_USD else None


def _when(value: Any) -> float | None:
    """A timestamp of the provider's (ISO 8601 text, or epoch seconds), as epoch seconds."""
    if isinstance(value, str) and len(value) <= 64:
        try:
            when = datetime.fromisoformat(value.strip().replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError, OSError):
            return None
    elif isinstance(value, int | float) and not isinstance(value, bool):
        when = float(value) if -1e300 < value < 1e300 else math.nan
    else:
        return None
    return when if math.isfinite(when) and 0 < when < 2**34 else None  # 1970 to year 2514


def _status_word(body: dict[str, Any], label: str) -> str:
    """The status of a /status or /result answer: essential, so an answer without a readable one
    is malformed (retried, and a job whose answers never have one is put aside)."""
    status = body.get("status")
    if not isinstance(status, str) or not status.strip():
        raise MalformedAnswerError(f"{label}: answer without a status word ({_short(repr(status))})")
    return normalize_status(_short(status))


def _error_message(body: Any) -> str | None:
    if isinstance(body, dict):
        for key in ("error_message", "message", "error", "detail"):
            value = body.get(key)
            if isinstance(value, str) and value:
                return _short(value)
            if isinstance(value, dict):
                inner = _error_message(value)
                if inner:
                    return inner
    return None


def _error_code(body: Any) -> int | None:
    """The envelope's code; -1 for one that is there but unreadable (text, Infinity, 2^64: it is
    kept in the store, which holds no integer beyond 2^63)."""
    if isinstance(body, dict) and "error_code" in body:
        value = body["error_code"]
        if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) < 10:
            return int(value)
        if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 10**9 \
                and float(value).is_integer():
            return int(value)
        return -1
    return None


class _StatusFields(TypedDict):
    """The keyword arguments every APIStatusError subclass takes."""

    status: int
    error_code: int | None
    envelope: bool
    retry_after: float | None


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
    kwargs: _StatusFields = dict(status=status, error_code=code, envelope=envelope,
                                 retry_after=parse_retry_after(retry_after))
    family = code // 1000 if code and code > 0 else status
    # 403001 ("this request belongs to another user") says the token is not the one that
    # submitted: an account matter for the whole run, never a verdict on the job.
    if code == 400004 or family == 403 or (not envelope and status in (401, 403)):
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


async def _read_answer(resp: aiohttp.ClientResponse, what: str, max_bytes: int = C.MAX_API_ANSWER) -> bytes:
    """The body of an API answer, refused (not read whole) past ``max_bytes``: a broken or hostile
    server could otherwise stream gigabytes into memory. For a submit that is a lost answer (the
    job may exist), for other calls one more retry."""
    length = resp.content_length
    if length is not None and length > max_bytes:
        raise APIResponseLostError(f"{what}: answer of {length:,} bytes, more than the {max_bytes:,} allowed")
    if length is not None and "Content-Encoding" not in resp.headers:
        return await resp.read()  # the usual case: a small, plain, announced body
    body = bytearray()
    async for chunk in resp.content.iter_any():  # decoded bytes, counted as they arrive
        body += chunk
        if len(body) > max_bytes:
            raise APIResponseLostError(f"{what}: answer longer than the {max_bytes:,} bytes allowed")
    return bytes(body)


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
        self.calls: dict[str, int] = {"submit": 0, "status": 0, "result": 0, "cancel": 0, "model": 0,
                                      "catalog": 0, "balance": 0}

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

    async def submit(self, model_id: str, inputs: dict[str, Any] | str | InlineBody, *,
                     paced: bool = True) -> Submitted:
        """``inputs``: a dict, the same already encoded as JSON text, or a body that streams local
        files in as data: URIs (inline.py). ``paced=False``: the caller has already taken this
        call's token from the limiter."""
        path = f"/models/{model_path(model_id)}"
        if isinstance(inputs, str):
            body = await self._call("submit", "POST", path, json_text=inputs, paced=paced)
        elif isinstance(inputs, InlineBody):
            body = await self._call("submit", "POST", path, payload=inputs, paced=paced)
        else:
            body = await self._call("submit", "POST", path, json_body=inputs, paced=paced)
        request_id = body.get("request_id") if isinstance(body, dict) else None
        if not isinstance(request_id, str) or not request_id or len(request_id) > C.MAX_REQUEST_ID:
            # A 200 without a usable request id: the job may exist, and we cannot find it. Unknown.
            raise MalformedAnswerError(f"submit to {model_id}: answer without a usable request_id")
        return Submitted(request_id, body.get("status_url"), body.get("result_url"),
                         body.get("cancel_url"))

    async def status(self, request_id: str, *, paced: bool = True) -> Status:
        """``paced=False``: the caller has already taken this call's token from the limiter."""
        path = f"/requests/{quote(request_id, safe='')}/status"
        body = await self._call("status", "GET", path, paced=paced)
        # The request id asked about, not the answer's: that one is only an echo, and may be anything.
        return Status(request_id, _status_word(body, _label("status", path)),
                      _count(body.get("queue_position")))

    async def result(self, request_id: str, include_cost: bool = True) -> Result:
        path = f"/requests/{quote(request_id, safe='')}/result"
        body = await self._call("result", "GET", path + "?include_cost=true" if include_cost else path)
        error = body.get("error")
        if error is not None and not isinstance(error, str):
            error = _error_message({"error": error}) or json.dumps(error)
        return Result(
            request_id=request_id,
            status=_status_word(body, _label("result", path)),
            outputs=parse_outputs(body.get("output")),
            error=_short(error) if error else None,
            cost=_usd(body.get("cost")),
            created_at=_when(body.get("created_at")),
            finished_at=_when(body.get("finished_at")),
        )

    async def cancel(self, request_id: str) -> CancelOutcome:
        body = await self._call("cancel", "POST", f"/requests/{quote(request_id, safe='')}/cancel")
        outcome, status = body.get("outcome"), body.get("status")
        return CancelOutcome(
            request_id=request_id,
            status=normalize_status(_short(status)) if isinstance(status, str) else "",
            outcome=_short(outcome) if isinstance(outcome, str) else "",
        )

    async def model_info(self, model_id: str) -> ModelInfo:
        body = await self._call("model", "GET", f"/models/{model_path(model_id)}")
        unit, note = body.get("price_unit"), body.get("pricing_note")
        return ModelInfo(
            model_id=model_id,
            base_price_usd=_usd(body.get("base_price_usd")),
            price_unit=_short(unit) if isinstance(unit, str) else None,
            pricing_note=_short(note) if isinstance(note, str) else None,
        )

    async def list_models(self, offset: int, limit: int) -> ModelPage:
        """One page of RunComfy's catalog, every entry with its input schema."""
        body = await self._call("catalog", "GET", f"/models?include_schema=true&limit={limit}&offset={offset}",
                                max_bytes=C.CATALOG_MAX_PAGE_BYTES)
        models, total = body.get("models"), body.get("total")
        return ModelPage(models if isinstance(models, list) else [],
                         total if isinstance(total, int) and not isinstance(total, bool) else None)

    async def model_entry(self, model_id: str) -> dict[str, Any]:
        """One model's catalog entry with its input schema, as answered (checked by catalog.py)."""
        return await self._call("catalog", "GET", f"/models/{model_path(model_id)}?include_schema=true",
                                max_bytes=C.CATALOG_MAX_PAGE_BYTES)

    async def balance(self, url: str) -> Balance:
        """The account's balance from ``url`` (RunComfy's wallet, a host apart from the API's).
        Raises APIError, without calling, for a host the token must not go to."""
        if not token_may_go_to(url, self.base_url):
            raise APIError(f"balance URL {url} is neither the API's host nor a RunComfy host over https: "
                           "the token is not sent there")
        body = await self._call("balance", "GET", "", url=URL(url), max_bytes=C.BALANCE_MAX_BYTES)
        value = body.get("balance_usd")
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                value = None
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise APIError("balance: the answer has no balance_usd number")
        currency = body.get("currency")
        return Balance(float(value), currency if isinstance(currency, str) and currency else "USD")

    # ---- transport -----------------------------------------------------------------------------

    async def _call(
        self, what: str, method: str, path: str, *, json_body: Any = None, json_text: str | None = None,
        payload: InlineBody | None = None, paced: bool = True, url: URL | None = None,
        max_bytes: int = C.MAX_API_ANSWER,
    ) -> dict[str, Any]:
        """``path``: already escaped, with its query string if any. The body, if any: a value to
        send as JSON (``json_body``), JSON text (``json_text``), or a streamed ``payload``.
        ``url``: an absolute URL instead of base + path (the balance, on RunComfy's other host).
        ``max_bytes``: refuse a longer answer unread (catalog pages may be larger than job answers)."""
        session = self._ensure_session()
        if paced and self.limiter is not None:
            await self.limiter.take()
        self.calls[what] += 1
        if url is None:
            url = URL(self.base_url + path, encoded=True)
        else:
            path = url.path
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
                raw = await _read_answer(resp, what, max_bytes)
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
        except (ValueError, RecursionError):  # RecursionError: '[[[[…' nested beyond Python's stack
            body = None
        if status >= 400 or _error_code(body) is not None:
            raise make_status_error(status, body, resp.headers.get("Retry-After"), _label(what, path))
        if 300 <= status < 400:
            raise ServerError(f"{_label(what, path)}: unexpected redirect (HTTP {status}); not followed",
                              status=status)
        if not isinstance(body, dict):
            raise MalformedAnswerError(f"{_label(what, path)}: HTTP {status} with a body that is not a JSON object")
        return body
