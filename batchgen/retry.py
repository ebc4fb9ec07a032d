"""The pure retry policy: what a failure means for the job, and how long to wait before trying again.

Nothing here does I/O or sleeps, so every rule is tested from a table (tests/test_retry.py).
The one rule that matters most: a submit is retried only when it certainly did not create a job,
because the API has no idempotency and a second submit may be a second charge.
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Generic, TypeVar

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

# RunComfy's InvalidResourceIdentifier: the model id names no model (runcomfy-api.md, Errors).
UNKNOWN_MODEL = 400001


class Call(enum.Enum):
    SUBMIT = "submit"
    POLL = "poll"  # status, result and cancel: reads, or idempotent
    DOWNLOAD = "download"


class Decision(enum.Enum):
    RETRY = "retry"  # try the same call again after a delay
    UNKNOWN = "unknown"  # a submit that may have created a job: never resubmit on our own
    FAIL = "fail"  # will not heal: the job fails with the error kept
    # No job can start as things are (the balance is spent, the model is unknown): this one goes
    # back to pending untouched, no more submits, jobs already out are finished.
    STOP_SUBMITTING = "stop_submitting"
    UNREACHABLE = "unreachable"  # a submit that never left: wait for the API, the try does not count
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
        # Never reached the server: safe even for a submit, and no fault of the job's.
        return Decision.UNREACHABLE if call is Call.SUBMIT else Decision.RETRY
    if isinstance(exc, APIResponseLostError):
        return Decision.UNKNOWN if call is Call.SUBMIT else Decision.RETRY
    if isinstance(exc, RateLimitError):
        # The server refused the request: nothing was created.
        return Decision.RETRY
    if isinstance(exc, ServerError):
        # A server error says nothing of whether the job was created before it failed: a bare
        # 5xx (a proxy's page) as little as one in RunComfy's envelope (even with HTTP 200).
        return Decision.UNKNOWN if call is Call.SUBMIT else Decision.RETRY
    if call is Call.SUBMIT and getattr(exc, "error_code", None) == UNKNOWN_MODEL:
        # InvalidResourceIdentifier: every job of this model would be refused the same way.
        return Decision.STOP_SUBMITTING
    if call is Call.SUBMIT and isinstance(exc, NotFoundError) and not getattr(exc, "envelope", True):
        # A bare 404 (no RunComfy error body): the URL is no endpoint of the API (an --api-url
        # without its /v1, a model path it does not serve). Nothing was created, and every job
        # would meet it: stop submitting, the jobs stay pending for a run with the URL fixed.
        return Decision.STOP_SUBMITTING
    if isinstance(exc, NotFoundError):
        return Decision.FAIL
    if isinstance(exc, APIStatusError) and call is Call.POLL:
        # Any other refusal of a question about a job we submitted says nothing of the job, which
        # may still be running and billed: failing it would invite `retry` to pay twice. It is
        # asked again, and past its job timeout it is set aside as overdue (still followed).
        return Decision.RETRY
    if isinstance(exc, InvalidRequestError | APIStatusError):
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
        # The exponent is capped: a float power overflows past 2**1023, and a job polled through
        # a long outage of readable answers can reach such retry numbers before its timeout.
        ceiling = min(self.cap, self.base * (2.0 ** min(max(0, attempt - 1), 64)))
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


T = TypeVar("T")


class RefusalStreak(Generic[T]):
    """Notices, from a run's first submits, a refusal that every job will meet: the same error
    code and message for ``needed`` different jobs in a row, before any submit was accepted (a
    field the service now requires, an image host it cannot reach). Once a submit is accepted,
    the API takes these jobs, and a later refusal is that job's own."""

    def __init__(self, needed: int = C.SAME_REFUSALS_TO_STOP):
        self.needed = needed
        self.settled = False  # a submit was accepted: refusals from now on are each job's own
        self.found = False  # the streak was long enough: its refusal is every job's
        self._key: tuple[int | None, str] | None = None
        self.items: dict[int, T] = {}  # the streak's refused jobs, by id

    def accepted(self) -> None:
        self.settled = True
        if not self.found:  # found, it stays so: submitting has stopped on it
            self._key, self.items = None, {}

    def refused(self, job_id: int, item: T, exc: BaseException) -> bool:
        """Count a refusal that fails its job; True (once) when the streak says every job will
        meet it. Afterwards ``same`` recognises that refusal."""
        if self.settled or self.found:
            return False
        if not (isinstance(exc, InvalidRequestError) and exc.envelope):
            self._key, self.items = None, {}  # not an answer about the input: the streak is broken
            return False
        key = (exc.error_code, str(exc))
        if key != self._key:
            self._key, self.items = key, {}
        self.items[job_id] = item
        self.found = len(self.items) >= self.needed
        return self.found

    def same(self, exc: BaseException) -> bool:
        """``exc`` is the refusal the streak found to be every job's."""
        return (self.found and isinstance(exc, InvalidRequestError)
                and (exc.error_code, str(exc)) == self._key)


class Outage:
    """The API unreachable, as submits find it (connections refused, DNS failing): since when,
    and when to try again. Such a submit sent nothing, so its job simply waits, attempts
    untouched; one probe at a time finds out when the API is back, and once the outage has
    lasted ``budget`` seconds the run gives up."""

    def __init__(self, budget: float, policy: RetryPolicy,
                 clock: Callable[[], float] = time.monotonic):
        self.budget = budget
        self.policy = policy
        self._clock = clock
        self.since: float | None = None
        self.next_try = 0.0
        self.last_error = ""

    @property
    def active(self) -> bool:
        return self.since is not None

    def failed(self, error: str) -> None:
        now = self._clock()
        if self.since is None:
            self.since = now
        self.last_error = error
        # A quarter of the outage so far between probes, within the backoff's bounds: prompt
        # after a blip, one call every BACKOFF_CAP seconds through a long outage.
        self.next_try = now + min(self.policy.cap, max(self.policy.base, (now - self.since) / 4))

    def probing(self) -> None:
        """A probe is on its way: no other submit until it is answered (or fails)."""
        self.next_try = math.inf

    def ended(self) -> None:
        """The API answered a submit (even with a refusal): it is reachable."""
        self.since, self.next_try = None, 0.0

    def wait(self) -> float:
        return max(0.0, self.next_try - self._clock())

    def lasted(self) -> float:
        return 0.0 if self.since is None else self._clock() - self.since

    def exhausted(self) -> bool:
        return self.since is not None and self.lasted() >= self.budget
