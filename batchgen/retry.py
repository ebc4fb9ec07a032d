"""The pure retry policy: what a failure means for the job, and how long to wait before trying again.

Nothing here does I/O or sleeps, so every rule is tested from a table (tests/test_retry.py).
The one rule that matters most: a submit is retried only when it certainly did not create a job,
because the API has no idempotency and a second submit may be a second charge.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from . import constants as C
from .errors import (
    AccountError,
    APIConnectionError,
    APIResponseLostError,
    APIStatusError,
    DownloadError,
    InsufficientBalanceError,
    InvalidRequestError,
    NotFoundError,
    RateLimitError,
    ServerError,
)


class Call(enum.Enum):
    SUBMIT = "submit"
    POLL = "poll"  # status, result and cancel: reads, or idempotent
    DOWNLOAD = "download"


class Decision(enum.Enum):
    RETRY = "retry"  # try the same call again after a delay
    UNKNOWN = "unknown"  # a submit that may have created a job: never resubmit on our own
    FAIL = "fail"  # will not heal: the job fails with the error kept
    STOP_SUBMITTING = "stop_submitting"  # the account cannot start more jobs; finish what runs
    FATAL = "fatal"  # the account is unusable: stop the whole run now
    REFRESH = "refresh"  # an output URL stopped working: ask /result for a fresh one


def classify(exc: BaseException, call: Call) -> Decision:
    """What a failure of ``call`` means. Unknown exception types are failures of the job, never
    silently retried."""
    if isinstance(exc, AccountError):
        return Decision.FATAL
    if isinstance(exc, InsufficientBalanceError):
        return Decision.STOP_SUBMITTING if call is Call.SUBMIT else Decision.RETRY
    if isinstance(exc, APIConnectionError):
        # Never reached the server: safe even for a submit.
        return Decision.RETRY
    if isinstance(exc, APIResponseLostError):
        return Decision.UNKNOWN if call is Call.SUBMIT else Decision.RETRY
    if isinstance(exc, RateLimitError):
        # The server refused the request: nothing was created.
        return Decision.RETRY
    if isinstance(exc, ServerError):
        if call is not Call.SUBMIT:
            return Decision.RETRY
        # A RunComfy error envelope means the API itself refused the submit; a bare 5xx (a proxy
        # page, an empty body) may have come after the job was created.
        return Decision.RETRY if getattr(exc, "envelope", False) else Decision.UNKNOWN
    if isinstance(exc, NotFoundError | InvalidRequestError):
        return Decision.FAIL
    if isinstance(exc, APIStatusError):
        return Decision.FAIL
    if isinstance(exc, DownloadError):
        if exc.permanent:
            return Decision.FAIL
        if exc.expired:
            return Decision.REFRESH
        if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (408, 429):
            return Decision.REFRESH
        return Decision.RETRY
    return Decision.FAIL


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date. None when the
    header is absent or unreadable; never negative. Capping is the policy's job."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN/inf
            return None
        return max(0.0, seconds)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """Capped exponential backoff with jitter, and how many tries a call gets."""

    base: float = C.BACKOFF_BASE
    cap: float = C.BACKOFF_CAP
    retry_after_cap: float = C.RETRY_AFTER_CAP
    max_submit_attempts: int = C.MAX_SUBMIT_ATTEMPTS
    max_call_retries: int = C.MAX_CALL_RETRIES

    def backoff(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Delay before retry number ``attempt`` (1 for the first retry). Half fixed, half random
        ("equal jitter"): spreads a crowd of retries without ever retrying at once."""
        ceiling = min(self.cap, self.base * (2 ** max(0, attempt - 1)))
        return ceiling / 2 + rand() * ceiling / 2

    def delay(
        self, attempt: int, retry_after: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """The wait before the next try: the server's Retry-After when it gave one (capped, so one
        absurd header cannot stall a nightly run), else the backoff."""
        if retry_after is not None:
            return min(max(0.0, retry_after), self.retry_after_cap)
        return self.backoff(attempt, rand)

    def may_resubmit(self, attempts_so_far: int) -> bool:
        return attempts_so_far < self.max_submit_attempts
