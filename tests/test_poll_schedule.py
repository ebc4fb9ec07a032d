"""PollSchedule: when to ask about each job next (its heap, its scouts, its failed polls), on a
clock the test sets. No run, no network."""

from __future__ import annotations

import pytest

from batchgen import constants as C
from batchgen import store as S
from batchgen.client import Result
from batchgen.runner import PollPlanner, PollSchedule, RunSettings
from batchgen.runner.collecting import duration_of
from batchgen.runner.starts import Starts


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _job(i, submitted_at):
    return S.Job(i, "b", f"k{i}", i, "m", "s", {}, {}, S.IN_QUEUE, 1, f"r{i}", None, None,
                 None, None, None, 0, 0, submitted_at, None, None)


def test_due_polls_come_out_in_order_and_only_when_due():
    clock = Clock()
    polls = PollSchedule(RunSettings(), clock)
    polls.plan(2, clock.now + 2.0)
    polls.plan(1, clock.now + 1.0)
    assert polls.next_due() == clock.now + 1.0 and polls.pop_due() is None
    clock.now += 1.5
    assert polls.pop_due() == 1 and polls.pop_due() is None
    clock.now += 1.0
    assert polls.pop_due() == 2 and polls.next_due() is None


def test_eight_scouts_with_distinct_phases_and_a_heir_takes_the_free_slot():
    # SCOUTS scouts, each with its own slot; a scout that leaves without teaching a duration
    # hands its slot to the oldest job not scouting; the plan keeps one entry per job.
    clock = Clock()
    polls = PollSchedule(RunSettings(first_poll_delay=5.0), clock)
    jobs = [_job(i, clock.now - 0.5) for i in range(C.SCOUTS + 2)]
    for job in jobs:
        polls.enlist(job.id)
        polls.plan(job.id, clock.now + 5.0)
    assert sorted(polls.scouts.values()) == list(range(C.SCOUTS))
    assert set(polls.scouts) == {j.id for j in jobs[:C.SCOUTS]}
    # a non-scout waits for what the scouts teach (asked only at max_poll_interval, then at
    # twice its time out); a scout's first poll is its own moment
    assert polls.delay(jobs[-1].id, 0.0) == RunSettings().max_poll_interval
    assert polls.delay(jobs[-1].id, 100.0) == 100.0
    assert polls.delay(jobs[3].id, 0.0) < 0.02
    # scout 3 leaves without teaching a duration: the oldest non-scout inherits slot 3, and its
    # next poll comes forward to its scout's moment
    left = [j for j in jobs if j is not jobs[3]]
    polls.drop(jobs[3].id, left, skip=set())
    assert polls.scouts[jobs[C.SCOUTS].id] == 3
    assert sorted(polls.scouts.values()) == list(range(C.SCOUTS))
    assert polls.planned()[jobs[C.SCOUTS].id] < clock.now + 1.0
    assert sorted(polls.planned()) == sorted(j.id for j in jobs)  # one entry per job


def test_fewer_scouts_for_a_small_run_and_a_lone_scout_starts_later():
    polls = PollSchedule(RunSettings(), Clock())
    for job_id in range(C.SCOUTS):
        polls.enlist(job_id)
    polls.plan_scouts(todo=2 * C.SCOUT_JOBS_EACH)  # resumed scouts beyond the count leave
    assert polls.scouts == {0: 0, 1: 1}
    alone = PollSchedule(RunSettings(), Clock())
    alone.plan_scouts(todo=3)
    alone.enlist(7)
    assert alone.delay(7, 0.0) == pytest.approx(C.SCOUT_ALONE_FIRST_POLL)


def test_learning_the_duration_does_not_cut_short_a_retry_after():
    # Jobs throttled with Retry-After are polled no sooner than they were told, even when the
    # scout hands over or the first duration brings every other poll forward.
    clock = Clock()
    polls = PollSchedule(RunSettings(first_poll_delay=5.0), clock)
    jobs = [_job(i, clock.now - 0.5) for i in range(4)]
    scout, waiting, throttled, fresh = jobs
    polls.enlist(scout.id)
    assert polls.failed(throttled.id) == 1
    polls.plan(throttled.id, clock.now + 30.0)  # its Retry-After
    polls.plan(waiting.id, clock.now + 5.0)  # planned before any duration was known
    polls.plan(fresh.id, clock.now + 5.0)

    def due(job):
        return polls.planned()[job.id] - clock.now

    polls.drop(scout.id, jobs[1:], skip=set())  # the scout fails: another job takes over ...
    assert polls.scouts == {waiting.id: 0} and due(waiting) < 0.5 and due(throttled) == 30.0
    done = Result("r0", "succeeded", [], None, None, 1767225600.0, 1767225600.3)
    failed = Result("r0", "failed", [], "refused", None, 1767225600.0, 1767225600.0)
    assert duration_of(failed, clock.now - 1.0, clock.now) is None  # an instant failure teaches
    assert polls.observe(0.3, jobs[1:], skip=set())  # nothing of durations; a success does
    # The jobs have been out 0.5 s, longer than the 0.3 s learned: they are probably done, and
    # polled now, not after the interval of a job found unfinished (15 ms).
    assert due(fresh) < 0.01 and due(throttled) == 30.0
    assert sorted(polls.planned()) == [1, 2, 3]  # one entry per job
    assert duration_of(done, clock.now - 1.0, clock.now) == pytest.approx(0.3)


def test_replan_leaves_overdue_jobs_and_answered_jobs_come_back():
    clock = Clock()
    polls = PollSchedule(RunSettings(), clock)
    overdue, late = _job(1, clock.now - 10), _job(2, clock.now - 10)
    polls.plan(overdue.id, clock.now + 300)
    polls.failed(late.id)
    polls.plan(late.id, clock.now + 300)
    polls.answered(late.id)  # its failures are over: it may be brought forward again
    polls.observe(1.0, [overdue, late], skip={overdue.id})
    assert polls.planned() == {overdue.id: clock.now + 300, late.id: pytest.approx(clock.now + C.POLL_MARGIN_MIN)}


def test_a_duration_is_read_from_the_providers_timestamps_unless_they_are_absurd():
    def result(created, finished):
        return Result("r", "succeeded", [("video", "u")], None, None, created, finished)

    assert duration_of(result(100.0, 102.0), submitted_at=1.0, now=11.0) == 2.0
    assert duration_of(result(100.0, 99.0), submitted_at=1.0, now=11.0) == 10.0  # finish first
    assert duration_of(result(100.0, 150.0), submitted_at=1.0, now=11.0) == 10.0  # longer than ours
    assert duration_of(result(None, None), submitted_at=None, now=10.0) is None


# --- PollPlanner -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("observed", "elapsed", "expected"),
    [
        ([], 0.0, 1.0),  # nothing learned: the first poll after first_poll_delay
        ([], 1.0, 0.25),  # then a quarter of the time the job has been out ...
        ([], 10.0, 2.5),
        ([], 200.0, 30.0),  # ... capped
        ([3.0, 3.0, 3.0], 0.0, 3.006),  # learned: a hair after the expected finish
        ([3.0, 3.0, 3.0], 2.0, 1.006),
        ([3.0, 3.0, 3.0], 3.1, 0.3),  # late: every tenth of the expected time while few are known ...
        ([3.0, 3.0, 3.0], 5.0, 1.0),  # ... or half the lateness, once more (it likely waited first)
        ([3.0, 3.0, 3.0], 100.0, 30.0),  # ... capped
        ([0.0, 0.0], 0.0, 0.002),  # instant jobs: poll almost at once after the submit ...
        ([0.0, 0.0], 0.01, 0.05),  # ... and, if that found it unfinished, every 50 ms
        ([1.0, 2.0, 100.0], 0.0, 2.004),  # the median, not the mean
    ],
)
def test_poll_planner(observed, elapsed, expected):
    planner = PollPlanner(RunSettings())
    for seconds in observed:
        planner.observe(seconds)
    assert planner.next_delay(elapsed) == pytest.approx(expected)


def test_poll_planner_median_follows_the_window():
    import random
    import statistics
    from collections import deque

    rng = random.Random(5)
    for window in (1, 2, 7, 50):
        planner, recent = PollPlanner(RunSettings(), window=window), deque(maxlen=window)
        for _ in range(300):  # repeats included: the oldest copy of a value must leave, not another
            seconds = rng.choice([rng.random(), 1.0, 0.0, 2.5])
            planner.observe(seconds)
            recent.append(seconds)
            assert planner.expected == statistics.median(recent)
    planner.observe(-1.0)  # a clock step backwards teaches nothing
    assert planner.expected == statistics.median(recent)


def test_scouts_poll_on_their_own_schedule_and_together_finely():
    import itertools
    import math

    planner = PollPlanner(RunSettings())
    schedules = []
    for slot in range(C.SCOUTS):
        phase = planner.scout_phase(slot)
        elapsed, moments = 0.0, []
        while elapsed < 20.0:
            # Each answer arrives some way after its poll (up to 20 ms here): the next poll is
            # still the scout's next moment, not an interval counted from the answer.
            elapsed += planner.scout_delay(elapsed, phase)
            moments.append(elapsed)
            elapsed += 0.02 * ((len(moments) * 7 + slot) % 5) / 4
        schedules.append(moments)
        expected = [C.SCOUT_FIRST_POLL * C.SCOUT_GROWTH ** (k + phase) for k in range(200)]
        assert all(any(math.isclose(m, e, rel_tol=1e-9) for e in expected) for m in moments), slot
        assert moments[0] == pytest.approx(C.SCOUT_FIRST_POLL * C.SCOUT_GROWTH ** phase)
    # Alone, each scout polls a quarter later each time (from 10 ms: about 30 polls to 20 s) ...
    assert all(len(m) <= 1 + math.log(20.0 / C.SCOUT_FIRST_POLL, C.SCOUT_GROWTH) for m in schedules)
    # ... together they poll every 2.8% of the time out, so a finish after 0.5 s is seen within
    # 2.8% of its time.
    together = sorted(m for moments in schedules for m in moments if m > 0.5)
    assert max(b / a for a, b in itertools.pairwise(together)) < 1.029
    # The schedule is capped like any other poll interval.
    assert planner.scout_delay(1000.0, 0.5) == RunSettings().max_poll_interval


def test_scout_delay_is_never_zero_at_one_of_its_own_moments():
    # At an elapsed time equal (in floating point) to a scout's moment, floor(log(...)) can
    # round down to this very moment: its next poll must still be the next moment, not now.
    planner = PollPlanner(RunSettings(max_poll_interval=1e9))
    zero = []
    for slot in range(C.SCOUTS):
        phase = planner.scout_phase(slot)
        for k in range(60):
            moment = C.SCOUT_FIRST_POLL * C.SCOUT_GROWTH ** (k + phase)
            if planner.scout_delay(moment, phase) <= 0.0:
                zero.append((slot, k))
    assert not zero, f"{len(zero)} moments give a 0 delay, e.g. {zero[:5]}"


# --- Starts: when each job starts at the provider ---------------------------------------------------


def _starts(script):
    """Starts after a script of (what, job, at[, position or end]) steps."""
    starts = Starts()
    for step in script:
        what, job, at, *more = step
        if what == "sent":
            starts.sent(job, at)
        elif what == "waiting":
            starts.waiting(job, at, *more)
        elif what == "running":
            starts.running(job, at)
        elif what == "finished":
            starts.finished(job, at, 5.0)
        elif what == "gone":
            starts.gone(job, at)
    return starts


FOUR_OUT = [("sent", j, 0.0) for j in range(1, 5)]


@pytest.mark.parametrize(
    ("script", "job", "now", "start", "limit"),
    [
        # no job has waited: every job starts when it was sent
        ([*FOUR_OUT, ("sent", 5, 1.0)], 5, None, 1.0, None),
        # seen waiting at 2.0: not before then (limit told: 4 sent before it, out, none waiting ahead)
        ([*FOUR_OUT, ("sent", 5, 1.0), ("waiting", 5, 2.0, 1)], 5, None, 5.0, 4),
        # ... and the sixth waits for the second slot to free (each of the first four ends at 5.0)
        ([*FOUR_OUT, ("sent", 5, 1.0), ("waiting", 5, 2.0, 1), ("sent", 6, 2.5)], 6, None, 5.0, 4),
        # a job that ended early frees its slot then: the one behind starts at that end
        ([*FOUR_OUT, ("sent", 5, 1.0), ("waiting", 5, 2.0, 1), ("finished", 2, 3.0)], 5, None, 3.0, 4),
        # an end known later shows that a job counted out at the sighting was done: the limit
        # is counted again (here 3: job 4 had ended before job 5 was seen waiting)
        ([*FOUR_OUT, ("sent", 5, 1.0), ("waiting", 5, 2.0, 1), ("finished", 4, 1.5)], 5, None, 2.0, 3),
        # position 2: one of the jobs ahead is waiting too, so one fewer runs
        ([*FOUR_OUT, ("sent", 5, 1.0), ("sent", 6, 1.0), ("waiting", 6, 2.0, 2)], 6, None, 5.0, 4),
        # seen running at 3.0: started by then, whatever the slots say; so did every job before it
        ([*FOUR_OUT, ("sent", 5, 1.0), ("waiting", 5, 2.0, 1), ("sent", 6, 2.0), ("running", 6, 3.0)], 5, None, 3.0, 4),
        # a plan (now given): a job out past its expected end frees its slot no earlier than now
        ([*FOUR_OUT, ("sent", 5, 1.0), ("waiting", 5, 2.0, 1)], 5, 7.0, 7.0, 4),
        # a job that left with nothing learned (failed) frees its slot when it left
        ([*FOUR_OUT, ("sent", 5, 1.0), ("waiting", 5, 2.0, 1), ("gone", 1, 2.5)], 5, None, 2.5, 4),
    ],
)
def test_starts(script, job, now, start, limit):
    starts = _starts(script)
    assert starts.start(job, 5.0, now) == pytest.approx(start)
    assert starts.limit == limit


def test_starts_learn_the_run_time_from_the_start_and_forget_old_jobs():
    starts = _starts([*FOUR_OUT, ("sent", 5, 1.0), ("waiting", 5, 2.0, 1)])
    assert starts.start(5, None) is None  # the jobs ahead have no end known nor expected
    assert [starts.finished(j, 4.0 + j / 10, 5.0) for j in (1, 2)] == pytest.approx([4.1, 4.2])
    # job 5 waited: it started when job 1 ended (4.1), so it ran 5.0 s, not the 8.1 s it was out
    assert starts.finished(5, 9.1, 5.0) == pytest.approx(5.0)
    assert starts.limit == 4  # remembered after its sighting's jobs are forgotten
    starts.finished(3, 9.2, 5.0)
    starts.finished(4, 9.3, 5.0)
    assert len(starts) == 0  # nothing out: every job ended before any job out was sent
    assert starts.finished(99, 1.0, 5.0) is None  # not known


def test_a_finish_brings_forward_the_poll_of_the_job_that_starts_behind_it():
    clock = Clock(0.0)
    polls = PollSchedule(RunSettings(), clock)
    polls.planner.observe(5.0)
    for j in range(1, 6):
        polls.sent(j, 0.0)
        polls.plan(j, 5.01)
    polls.seen(5, "in_queue", 0.5, 1)  # the account runs 4: job 5 starts when one of them ends
    polls.plan(5, 10.01)
    clock.now = 2.0
    assert polls.elapsed(5, clock.now, 0.0) == pytest.approx(2.0 - 5.0)  # starts in 3 s
    assert polls.finished(2, 2.0, 2.0) == pytest.approx(2.0)
    # job 2 ended at 2.0 (a run time learned as 5.0 here, so that no other plan moves): job 5
    # starts then
    assert polls.observe(5.0, [], skip=set())
    assert polls.planned()[5] == pytest.approx(2.0 + polls.planner.until_expected(0.0))
    assert polls.planned()[1] == 5.01  # the others keep their plans


@pytest.mark.parametrize(
    ("observed", "elapsed", "expected"),
    [
        # late, with longer run times seen: at the middle of those longer than it has run
        ([4.0, 4.5, 5.0, 5.5, 6.0, 6.5], 5.3, 6.0 - 5.3),
        ([4.0, 4.5, 5.0, 5.5, 6.0, 6.5], 6.2, 6.5 - 6.2),
        # ... never sooner than a twentieth of the expected time
        ([4.0, 4.5, 5.0, 5.0, 5.01, 5.02], 5.0, 0.25),
        # fewer than five known: the first known are the shortest; at least a tenth
        ([4.0], 4.1, 0.4),
    ],
)
def test_late_polls_follow_the_spread_of_run_times(observed, elapsed, expected):
    planner = PollPlanner(RunSettings())
    for seconds in observed:
        planner.observe(seconds)
    assert planner.next_delay(elapsed) == pytest.approx(expected)


def test_starts_keep_a_bounded_record_while_one_job_stays_out(monkeypatch):
    # One job stuck at the provider for hours: the jobs finished since are forgotten past KEEP,
    # and a sighting they could have been out for no longer tells the limit.
    from batchgen.runner import starts as starts_module

    monkeypatch.setattr(starts_module, "KEEP", 8)
    starts = Starts()
    starts.sent(0, 0.0)  # stuck
    for j in range(1, 4):
        starts.sent(j, 0.0)
    starts.sent(4, 0.5)
    starts.waiting(4, 1.0, 1)
    assert starts.limit == 4
    for j in range(5, 40):
        starts.sent(j, float(j))
        starts.finished(j, j + 0.5, 5.0)
    assert len(starts) <= 8
    assert starts.limit == 4  # its sighting's jobs are forgotten: the last count stands
    assert starts.start(0, 5.0) == 0.0
