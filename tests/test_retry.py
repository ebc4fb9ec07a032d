"""The retry policy, Retry-After parsing and the adaptive cap, from tables."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from batchgen.client import make_status_error
from batchgen.errors import (
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
from batchgen.limits import AdaptiveCap, Slots
from batchgen.retry import (
    Call,
    Decision,
    Outage,
    RefusalStreak,
    RetryPolicy,
    classify,
    parse_retry_after,
)

NOW = datetime(2026, 11, 25, 12, 0, 0, tzinfo=UTC)


def _status(cls, status, envelope=False, code=None):
    return cls("x", status=status, error_code=code, envelope=envelope)


CASES = [
    # (exception, call, decision)
    (APIConnectionError("refused"), Call.SUBMIT, Decision.UNREACHABLE),
    (APIConnectionError("refused"), Call.POLL, Decision.RETRY),
    (APIResponseLostError("timeout"), Call.SUBMIT, Decision.UNKNOWN),
    (APIResponseLostError("reset"), Call.POLL, Decision.RETRY),
    (_status(RateLimitError, 429), Call.SUBMIT, Decision.RETRY),
    (_status(RateLimitError, 408), Call.POLL, Decision.RETRY),
    (_status(ServerError, 502), Call.SUBMIT, Decision.UNKNOWN),
    (_status(ServerError, 500, envelope=True, code=500001), Call.SUBMIT, Decision.UNKNOWN),
    (_status(ServerError, 200, envelope=True, code=500001), Call.SUBMIT, Decision.UNKNOWN),
    (_status(ServerError, 503), Call.POLL, Decision.RETRY),
    (_status(AccountError, 400, True, 400004), Call.SUBMIT, Decision.FATAL),
    (_status(AccountError, 400, True, 400004), Call.POLL, Decision.FATAL),
    (_status(InsufficientBalanceError, 400, True, 400002), Call.SUBMIT, Decision.STOP_SUBMITTING),
    (_status(InvalidRequestError, 422, True, 422001), Call.SUBMIT, Decision.FAIL),
    (_status(InvalidRequestError, 400, True, 400001), Call.SUBMIT, Decision.STOP_SUBMITTING),
    # A refused question about a submitted job says nothing of the job: asked again (then
    # overdue at its timeout), never failed, which would let `retry` pay for it twice.
    (_status(InvalidRequestError, 400, True, 400001), Call.POLL, Decision.RETRY),
    (_status(APIStatusError, 418), Call.POLL, Decision.RETRY),
    (_status(NotFoundError, 404, True, 404001), Call.POLL, Decision.FAIL),
    # A bare 404 at submit: no such endpoint (--api-url without /v1), every job alike.
    (_status(NotFoundError, 404), Call.SUBMIT, Decision.STOP_SUBMITTING),
    (_status(NotFoundError, 404, True, 404001), Call.SUBMIT, Decision.FAIL),
    (DownloadError("gone", status=404, expired=True), Call.DOWNLOAD, Decision.REFRESH),
    (DownloadError("forbidden", status=403), Call.DOWNLOAD, Decision.REFRESH),
    (DownloadError("truncated"), Call.DOWNLOAD, Decision.RETRY),
    (DownloadError("busy", status=503), Call.DOWNLOAD, Decision.RETRY),
    (DownloadError("host not allowed", permanent=True), Call.DOWNLOAD, Decision.FAIL),
    (ValueError("a bug"), Call.POLL, Decision.FAIL),
]


@pytest.mark.parametrize(("exc", "call", "expected"), CASES, ids=lambda v: getattr(v, "name", None))
def test_classify(exc, call, expected):
    assert classify(exc, call) is expected


ERRORS = [
    # (HTTP status, body, expected class, envelope)
    (400, {"error_code": 400004, "error_message": "bad token"}, AccountError, True),
    (200, {"error_code": 400004, "error_message": "bad token"}, AccountError, True),
    (401, None, AccountError, False),
    (400, {"error_code": 400002, "error_message": "balance"}, InsufficientBalanceError, True),
    (402, None, InsufficientBalanceError, False),
    (429, None, RateLimitError, False),
    (200, {"error_code": 429001, "message": "slow down"}, RateLimitError, True),
    (404, {"error_code": 404001, "detail": "expired"}, NotFoundError, True),
    (500, None, ServerError, False),
    (200, {"error_code": 500001, "error": "busy"}, ServerError, True),
    (422, {"error_code": 422001, "error_message": "prompt too long"}, InvalidRequestError, True),
    (400, {"error_code": 400001, "error_message": "bad model"}, InvalidRequestError, True),
    # Another user's request: the token changed under the batch, an account matter.
    (403, {"error_code": 403001, "error_message": "belongs to another user"}, AccountError, True),
]


@pytest.mark.parametrize(("status", "body", "cls", "envelope"), ERRORS)
def test_error_mapping(status, body, cls, envelope):
    err = make_status_error(status, body, None, "call")
    assert type(err) is cls
    assert err.envelope is envelope


def test_error_message_taken_from_any_known_key():
    assert "expired" in str(make_status_error(404, {"error_code": 404001, "detail": "expired"}, None, "x"))
    assert "nested" in str(make_status_error(500, {"error": {"message": "nested"}}, None, "x"))


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("3", 3.0),
        ("1.5", 1.5),
        ("-4", 0.0),
        ("nan", None),
        ("soon", None),
        (format_datetime(NOW + timedelta(seconds=30), usegmt=True), 30.0),
        (format_datetime(NOW - timedelta(seconds=30), usegmt=True), 0.0),
    ],
)
def test_parse_retry_after(header, expected):
    assert parse_retry_after(header, now=NOW) == expected


@pytest.mark.parametrize(
    ("attempt", "rand", "expected"),
    [
        (1, 0.0, 0.25),  # base 0.5: half fixed, half random
        (1, 1.0, 0.5),
        (2, 1.0, 1.0),
        (3, 0.5, 1.5),
        (30, 1.0, 30.0),  # capped
        (30, 0.0, 15.0),
    ],
)
def test_backoff_is_capped_exponential_with_jitter(attempt, rand, expected):
    assert RetryPolicy().backoff(attempt, rand=lambda: rand) == pytest.approx(expected)


@pytest.mark.parametrize(("retry_after", "expected"), [(2.0, 2.0), (0.0, 0.0), (10_000.0, 120.0)])
def test_retry_after_wins_and_is_capped(retry_after, expected):
    assert RetryPolicy().delay(1, retry_after, rand=lambda: 1.0) == expected


def test_may_resubmit_counts_attempts():
    policy = RetryPolicy(max_submit_attempts=3)
    assert [policy.may_resubmit(n) for n in (1, 2, 3, 4)] == [True, True, False, False]


def _refusal(code=422001, message="image_urls: cannot fetch", envelope=True):
    return InvalidRequestError(f"submit: {message}", status=422, error_code=code, envelope=envelope)


@pytest.mark.parametrize(
    ("refusals", "stops_at"),
    [
        # (job id, refusal or "ok" for an accepted submit) ... -> index of the refusal that stops
        ([(1, _refusal()), (2, _refusal()), (3, _refusal())], 2),
        ([(1, _refusal()), (1, _refusal()), (2, _refusal())], None),  # one job twice is one job
        ([(1, _refusal()), (2, _refusal(message="other")), (3, _refusal()), (4, _refusal())], None),
        ([(1, _refusal()), (2, _refusal(code=422002)), (3, _refusal()), (4, _refusal()),
          (5, _refusal())], 4),  # a different code starts a new streak
        ([(1, _refusal()), (2, _refusal(envelope=False)), (3, _refusal()), (4, _refusal())], None),
        ([(1, "ok"), (2, _refusal()), (3, _refusal()), (4, _refusal())], None),  # accepted: settled
        ([(1, _refusal()), (2, _refusal()), (3, "ok"), (4, _refusal())], None),
    ],
)
def test_refusal_streak(refusals, stops_at):
    streak = RefusalStreak(needed=3)
    stopped = None
    for i, (job, what) in enumerate(refusals):
        if what == "ok":
            streak.accepted()
        elif streak.refused(job, f"job {job}", what) and stopped is None:
            stopped = i
    assert stopped == stops_at
    if stops_at is not None:
        assert streak.same(_refusal()) and not streak.same(_refusal(message="other"))
        assert len(streak.items) == 3
        assert not streak.refused(9, "job 9", _refusal())  # found once; later ones are same()
    else:
        assert not streak.same(_refusal())


def test_outage_waits_longer_as_it_lasts_and_ends_at_its_budget():
    clock = FakeClock()
    outage = Outage(budget=60.0, policy=RetryPolicy(base=0.5, cap=30.0), clock=clock)
    assert not outage.active and not outage.exhausted() and outage.wait() == 0
    outage.failed("refused")
    assert outage.active and outage.wait() == 0.5  # a blip: the next probe soon
    outage.probing()
    assert outage.wait() == float("inf")  # one probe at a time
    clock.t = 20.0
    outage.failed("refused")
    assert outage.wait() == 5.0 and outage.lasted() == 20.0  # a quarter of the outage so far
    clock.t = 59.0
    outage.failed("refused")
    assert outage.wait() == 14.75 and not outage.exhausted()
    clock.t = 200.0
    outage.failed("refused")
    assert outage.wait() == 30.0  # capped
    assert outage.exhausted()
    outage.ended()
    assert not outage.active and not outage.exhausted() and outage.wait() == 0


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


@pytest.mark.parametrize(
    ("events", "expected"),
    [
        # (event, seconds since the previous) ... -> cap after
        ([], 8),
        ([("throttle", 0)], 4),
        ([("throttle", 0), ("throttle", 0.5)], 4),  # one burst is one signal
        ([("throttle", 0), ("throttle", 3)], 2),
        ([("throttle", 0), ("throttle", 3), ("throttle", 3), ("throttle", 3)], 1),  # floor
        ([("throttle", 0)] + [("ok", 0)] * 3, 4),  # +1/cap each: 4.69 after 3
        ([("throttle", 0)] + [("ok", 0)] * 5, 5),  # about +1 per cap successes
        ([("throttle", 0)] + [("ok", 0)] * 100, 8),  # never above --concurrency
    ],
)
def test_adaptive_cap(events, expected):
    clock = FakeClock()
    cap = AdaptiveCap(8, clock=clock)
    for kind, dt in events:
        clock.t += dt
        cap.on_throttle() if kind == "throttle" else cap.on_success()
    assert cap.value == expected


async def test_slots_wait_wake_and_forget_a_cancelled_waiter():
    import asyncio

    cap = AdaptiveCap(2)
    slots = Slots(cap)
    await slots.acquire()
    await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    assert not waiter.done() and slots.free == 0
    waiter.cancel()  # a waiter that gives up is not a waiter any more ...
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not slots._waiters and slots.used == 2  # ... and took no slot
    second = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # a slot back: the waiter gets it
    await asyncio.wait_for(second, 1)
    assert slots.used == 2
    third = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0)
    slots.close()  # closing lets every waiter through (the runner checks and gives it back)
    await asyncio.wait_for(third, 1)


def test_backoff_never_overflows_however_many_retries():
    # A job asked about for hours through unreadable answers reaches retry numbers past 1,024.
    assert RetryPolicy().backoff(5_000, rand=lambda: 1.0) == RetryPolicy().cap
