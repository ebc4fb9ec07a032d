"""The in-flight cap's rule (limits.AdaptiveCap), table-driven, apart from any network: what each
thing the runner sees does to the cap, and what it says about it."""

import pytest

from batchgen import constants as C
from batchgen.limits import AdaptiveCap, Move, headroom


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def play(cap, clock, events):
    """Apply (kind, args...) events; return the moves made, as the log would show them."""
    said = []
    for kind, *args in events:
        if kind == "wait_s":
            clock.t += args[0]
            continue
        move = {"start": cap.on_start, "wait": cap.on_wait, "429": cap.on_throttle,
                "ok": cap.on_success}[kind](*args)
        if move is not None:
            said.append(str(move))
    return said


# (start, ceiling, events, final cap, what was said)
AUTO_CASES = [
    # slow start: a tester that filled the cap and runs at once grows it by half
    (2, 256, [("start", 2, 2)], 3, ["cap 2 -> 3: jobs start at once"]),
    (8, 256, [("start", 8, 8)], 12, ["cap 8 -> 12: jobs start at once"]),
    (2, 256, [("start", 2, 2), ("start", 3, 3), ("start", 5, 5), ("start", 8, 8), ("start", 12, 12)], 18,
     ["cap 2 -> 3: jobs start at once", "cap 3 -> 5: jobs start at once", "cap 5 -> 8: jobs start at once",
      "cap 8 -> 12: jobs start at once", "cap 12 -> 18: jobs start at once"]),
    # a tester of an older cap, or a cap not in use, proves nothing about the current cap
    (8, 256, [("start", 8, 8), ("start", 8, 12)], 12, ["cap 8 -> 12: jobs start at once"]),
    (8, 256, [("start", 8, 5)], 8, []),
    # the ceiling (auto:N) is never passed
    (8, 10, [("start", 8, 8)], 10, ["cap 8 -> 10: jobs start at once"]),
    (10, 10, [("start", 10, 10)], 10, []),
    # a tester waiting at position 2 with 18 out: the account runs 16; up to 16 + 4 (a quarter)
    (18, 256, [("wait", 2, 18)], 18, ["cap held at 18: 2 jobs waiting at the provider"]),
    (27, 256, [("wait", 11, 27)], 20, ["cap 27 -> 20: 11 jobs waiting at the provider"]),
    # each wait reading is an upper bound on the limit (jobs may have finished unseen): the least
    # counts, until a cap wholly running proves more
    (18, 256, [("wait", 2, 18), ("wait", 2, 20)], 18, ["cap held at 18: 2 jobs waiting at the provider"]),
    (20, 256, [("wait", 2, 20), ("wait", 6, 20)], 18, ["cap held at 20: 2 jobs waiting at the provider",
                                                       "cap 20 -> 18: 6 jobs waiting at the provider"]),
    (20, 256, [("wait", 6, 20), ("wait", 2, 20)], 18, ["cap 20 -> 18: 6 jobs waiting at the provider",
                                                       "cap held at 18: 2 jobs waiting at the provider"]),
    # said once while it holds, not at every tester
    (18, 256, [("wait", 2, 18), ("wait", 2, 18), ("wait", 1, 18)], 18,
     ["cap held at 18: 2 jobs waiting at the provider"]),
    # a wait never raises the cap; a position not given counts as one (the tester itself)
    (4, 256, [("wait", 1, 4)], 4, ["cap held at 4: 1 job waiting at the provider"]),
    (4, 256, [("wait", None, 4)], 4, ["cap held at 4: 1 job waiting at the provider"]),
    # after a wait, growth is by one (the slow start is over)
    (18, 256, [("wait", 2, 18), ("start", 18, 18)], 19,
     ["cap held at 18: 2 jobs waiting at the provider", "cap 18 -> 19: jobs start at once"]),
    # a 429 halves, once per burst, and ends the slow start
    (16, 256, [("429",)], 8, ["cap 16 -> 8: 429"]),
    (16, 256, [("429",), ("wait_s", 0.5), ("429",)], 8, ["cap 16 -> 8: 429"]),
    (16, 256, [("429",), ("wait_s", 3), ("429",)], 4, ["cap 16 -> 8: 429", "cap 8 -> 4: 429"]),
    (16, 256, [("429",), ("start", 8, 8)], 9, ["cap 16 -> 8: 429", "cap 8 -> 9: jobs start at once"]),
    # accepted submits say nothing of room at the provider in auto mode
    (4, 256, [("ok",)] * 20, 4, []),
    # the floor
    (1, 256, [("429",)], 1, []),
    (3, 256, [("wait", 5, 3)], 2, ["cap 3 -> 2: 5 jobs waiting at the provider"]),
]


@pytest.mark.parametrize(("start", "ceiling", "events", "final", "said"), AUTO_CASES)
def test_auto_cap(start, ceiling, events, final, said):
    clock = FakeClock()
    cap = AdaptiveCap(ceiling, clock=clock, auto=True, start=start)
    assert play(cap, clock, events) == said
    assert cap.value == final


# (events, final cap) for a fixed --concurrency 8: the old rule, unchanged
FIXED_CASES = [
    ([("429",)], 4),
    ([("429",), ("ok",), ("ok",), ("ok",)], 4),
    ([("429",)] + [("ok",)] * 5, 5),
    ([("429",)] + [("ok",)] * 100, 8),
    ([("start", 8, 8), ("wait", 3, 8)], 8),  # testers mean nothing to a fixed cap
]


@pytest.mark.parametrize(("events", "final"), FIXED_CASES)
def test_fixed_cap(events, final):
    clock = FakeClock()
    cap = AdaptiveCap(8, clock=clock)
    play(cap, clock, events)
    assert cap.value == final
    assert not cap.wants_tester(100) and cap.learned() is None


@pytest.mark.parametrize(("limit", "room"), [(1, 1), (2, 1), (4, 1), (5, 2), (16, 4), (64, 16)])
def test_headroom_is_a_quarter_of_the_limit_at_least_one(limit, room):
    assert headroom(limit) == room


def test_a_tester_is_the_job_that_fills_the_cap():
    cap = AdaptiveCap(256, auto=True, start=4)
    assert [cap.wants_tester(n) for n in (1, 3, 4, 5)] == [False, False, True, True]


@pytest.mark.parametrize(
    ("events", "learned"),
    [
        ([], None),  # nothing seen: nothing to remember
        ([("start", 2, 2), ("start", 3, 3)], (3, False)),  # only a cap that all ran: it may be higher
        ([("start", 2, 2), ("start", 3, 3), ("wait", 1, 5)], (5, True)),  # the limit was seen: 4 + 1
        ([("429",)], (1, True)),
    ],
)
def test_what_a_run_remembers(events, learned):
    clock = FakeClock()
    cap = AdaptiveCap(256, clock=clock, auto=True, start=2)
    play(cap, clock, events)
    assert cap.learned() == learned


def test_a_learned_start_is_kept_within_the_bounds():
    cap = AdaptiveCap(10, auto=True)
    assert cap.value == C.AUTO_START
    cap.start_at(500)
    assert cap.value == 10
    cap.start_at(0)
    assert cap.value == 1


def test_move_wording():
    assert str(Move(8, 12, "jobs start at once")) == "cap 8 -> 12: jobs start at once"
    assert str(Move(16, 16, "3 jobs waiting at the provider")) == "cap held at 16: 3 jobs waiting at the provider"


# --- TokenBucket ------------------------------------------------------------------------------------


class FakeTime:
    """A clock the bucket reads, and the sleep it waits with: sleeping moves the clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_rate_limit_spaces_api_calls():
    from batchgen.limits import TokenBucket

    time = FakeTime()
    bucket = TokenBucket(rate=20, burst=1, clock=time, sleep=time.sleep)
    for _ in range(11):
        await bucket.take()
    assert time.now == pytest.approx(0.5)  # one at once, then 10 at 20 a second
    assert time.slept == pytest.approx([0.05] * 10)
    unlimited = TokenBucket(rate=0, clock=time, sleep=time.sleep)
    for _ in range(1000):
        await unlimited.take()
    assert time.now == pytest.approx(0.5)


async def test_try_take_takes_only_a_spare_token():
    import asyncio

    from batchgen.limits import TokenBucket

    time = FakeTime()
    bucket = TokenBucket(rate=1, burst=4, clock=time)
    assert [bucket.try_take(reserve=2) for _ in range(3)] == [True, True, False]  # 2 stay
    assert [bucket.try_take() for _ in range(3)] == [True, True, False]
    waiter = asyncio.ensure_future(bucket.take())  # queued for the next token (sleeps for real)
    await asyncio.sleep(0.01)
    time.now += 4.0  # the bucket is full again ...
    assert not bucket.try_take()  # ... but someone is waiting: nothing is spare
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert TokenBucket(rate=0).try_take(reserve=100)
