"""The runner end to end against the simulator over real loopback HTTP, with a real store file."""

from __future__ import annotations

import asyncio
import time

import pytest
from aiohttp import web
from conftest import add_jobs, claim_one, events
from simruns import (
    check_outputs_match,
    job_histories,
    manifest,
    options,
    outputs_by_job,
    settings,
    submissions_per_seed,
)

from batchgen import app
from batchgen import constants as C
from batchgen import store as S
from batchgen.errors import AccountError
from batchgen.retry import RetryPolicy
from batchgen.runner import RunSettings, StopReason
from batchgen.simulator import SimConfig, Simulator
from batchgen.store import SqliteStore, Store


async def test_quickstart_simulated_end_to_end_and_rerun_submits_nothing(samples, tmp_path):
    opts = app.RunOptions(workdir=tmp_path / "work", manifest=samples / "quickstart.yaml",
                          target=app.Target(simulate=True), settings=settings())
    first = await app.run(opts)
    assert first.new_jobs == 6 and first.summary.submitted == 6
    assert first.counts == {"quickstart": {"succeeded": 6}}
    files = sorted((tmp_path / "work" / "simulated" / "quickstart").glob("*.mp4"))
    assert len(files) == 6 and all(f.stat().st_size > 1000 for f in files)
    second = await app.run(opts)
    assert second.new_jobs == 0 and second.summary.submitted == 0
    assert second.counts == {"quickstart": {"succeeded": 6}}


async def test_run_against_a_simulator_counts_and_digests(simulator, tmp_path):
    sim = await simulator(concurrency=3, duration=0.1)
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 10)))
    assert out.counts == {"b": {"succeeded": 10}}
    assert submissions_per_seed(sim) == {i: 1 for i in range(10)}
    await check_outputs_match(sim, tmp_path / "work")


async def test_a_small_output_is_recorded_with_its_result_in_one_write(simulator, tmp_path):
    sim = await simulator(concurrency=3, duration=0.1)
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 4)))
    assert out.counts == {"b": {"succeeded": 4}}
    for states in (await job_histories(tmp_path / "work")).values():
        assert S.DOWNLOADING not in states and states[-1] == S.SUCCEEDED, states
    jobs = await outputs_by_job(tmp_path / "work")
    assert all(job.cost == 0.10 and job.finished_at and outs[0].size for job, outs in jobs.values())
    await check_outputs_match(sim, tmp_path / "work")


async def test_a_large_output_records_its_result_before_it_streams(simulator, tmp_path, monkeypatch):
    from batchgen import constants as C

    monkeypatch.setattr(C, "DOWNLOAD_IN_MEMORY", 0)  # every output counts as large
    sim = await simulator(concurrency=3, duration=0.1)
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 4)))
    assert out.counts == {"b": {"succeeded": 4}}
    for states in (await job_histories(tmp_path / "work")).values():
        assert states[-2:] == [S.DOWNLOADING, S.SUCCEEDED], states
    await check_outputs_match(sim, tmp_path / "work")


async def test_a_result_waiting_for_a_download_slot_is_recorded_meanwhile(simulator, tmp_path):
    # One download at a time, downloads slower than jobs: results arrive while the slot is taken.
    sim = await simulator(concurrency=4, duration=0.05, faults=["script.download=slow,slow,slow,slow"])
    sim.config.faults.slow_seconds = 0.3
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 4), download_concurrency=1))
    assert out.counts == {"b": {"succeeded": 4}}
    histories = (await job_histories(tmp_path / "work")).values()
    assert sum(S.DOWNLOADING in states for states in histories) >= 2
    await check_outputs_match(sim, tmp_path / "work")


async def test_stopped_part_way_then_resumed(simulator, tmp_path):
    sim = await simulator(concurrency=2, duration=0.3)
    path = manifest(tmp_path, sim, 8)
    submitted = []
    box = []

    def on_event(event):
        if event.kind == S.IN_QUEUE:
            submitted.append(event.job.key)
            if len(submitted) == 3:
                box[0].stop(StopReason.INTERRUPTED)

    first = await app.run(options(tmp_path, sim, path), on_event=on_event, on_runner=box.append)
    assert first.summary.stop_reason is StopReason.INTERRUPTED
    remaining = sum(n for s, n in first.counts["b"].items() if s != S.SUCCEEDED)
    assert remaining > 0
    # Nothing was lost: jobs at the provider kept their request ids.
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        active = await store.jobs(["b"], [S.IN_QUEUE, S.IN_PROGRESS, S.DOWNLOADING])
        assert all(j.request_id for j in active)
    second = await app.run(options(tmp_path, sim, path))
    assert second.counts == {"b": {"succeeded": 8}}
    assert submissions_per_seed(sim) == {i: 1 for i in range(8)}
    await check_outputs_match(sim, tmp_path / "work")


async def test_interrupted_submit_becomes_unknown_and_is_not_resubmitted(simulator, tmp_path):
    sim = await simulator(duration=0)
    path = manifest(tmp_path, sim, 3)
    # A run that died between recording its intent and getting an answer:
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        from batchgen.manifest import load_manifest

        m = load_manifest(path)
        await store.upsert_batch("b", m.model_id, str(path), {})
        await add_jobs(store, "b", m.iter_jobs())
        await claim_one(store, ["b"], now=1e12)
    out = await app.run(options(tmp_path, sim, path))
    assert out.counts == {"b": {"succeeded": 2, "unknown": 1}}
    assert len(sim.requests()["requests"]) == 2
    # Only the user can decide to pay for it again.
    retry = await app.run(app.RunOptions(
        workdir=tmp_path / "work", batch="b", retry_states=(S.UNKNOWN,),
        target=app.Target(api_url=sim.base_url, token="t"), settings=settings()))
    assert retry.counts == {"b": {"succeeded": 3}}


async def test_everything_at_once_ends_in_correct_terminal_states(simulator, tmp_path):
    sim = await simulator(
        concurrency=3, duration=0.05, seed=7,
        faults=["429=0.15", "retry_after=0", "5xx=0.05", "error200=0.05", "drop=0.05",
                "fail=0.1", "truncate=0.2", "expire=0.5", "slow=0.05", "slow_seconds=0.1"],
    )
    n = 40
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, n), concurrency=6))
    counts = out.counts["b"]
    assert sum(counts.values()) == n
    assert set(counts) <= {S.SUCCEEDED, S.FAILED, S.UNKNOWN}, counts
    per_seed = submissions_per_seed(sim)
    assert all(c == 1 for c in per_seed.values()), per_seed  # never paid twice
    jobs = await outputs_by_job(tmp_path / "work")
    by_rid = {r["request_id"]: r for r in sim.requests()["requests"]}
    for job, _ in jobs.values():
        if job.state == S.SUCCEEDED:
            assert not by_rid[job.request_id]["will_fail"]
        elif job.state == S.FAILED:
            assert job.error
            assert job.request_id is None or by_rid[job.request_id]["will_fail"], job.error
        else:  # unknown: its submit answer was lost; it may or may not exist at the provider
            assert job.request_id is None and job.error
    await check_outputs_match(sim, tmp_path / "work")


async def test_a_submit_refused_while_the_queue_is_read_is_not_left_pending(simulator, tmp_path):
    # The submit loop found nothing to claim and asks the store when the next pending job is
    # due; meanwhile the only submit in flight is refused (429) and puts its job back to pending.
    # The read did not see it, but the run must not end with that job pending.
    from batchgen.client import RunComfyClient
    from batchgen.manifest import load_manifest
    from batchgen.runner import Runner

    class SlowQueueRead(SqliteStore):
        async def next_pending_at(self, batches):
            answer = await super().next_pending_at(batches)
            await asyncio.sleep(0.3)
            return answer

    sim = await simulator(duration=0, faults=["script.submit=429"])
    m = load_manifest(manifest(tmp_path, sim, 1))
    async with await SlowQueueRead.open(tmp_path / "s.sqlite3") as store:
        await store.upsert_batch("b", m.model_id, None, {})
        await add_jobs(store, "b", m.iter_jobs())
        async with RunComfyClient(sim.base_url, "t") as client:
            await Runner(store, client, tmp_path, settings()).run(["b"])
        assert await store.counts(["b"]) == {"b": {"succeeded": 1}}
    assert sim.calls["submit"] == 2


async def test_bad_token_stops_the_run_with_nothing_submitted(simulator, tmp_path):
    sim = await simulator(token="right")
    opts = options(tmp_path, sim, manifest(tmp_path, sim, 5))
    opts.target.token = "wrong"
    with pytest.raises(AccountError):
        await app.run(opts)
    assert sim.requests()["requests"] == []
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        assert await store.counts() == {"b": {"pending": 5}}


async def test_insufficient_balance_stops_submitting_and_finishes_the_rest(simulator, tmp_path):
    sim = await simulator(balance_usd=0.35, duration=0.05)
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 6), concurrency=1))
    assert out.summary.stop_reason is StopReason.BALANCE and "balance" in out.summary.account_error.lower()
    assert out.counts == {"b": {"succeeded": 3, "pending": 3}}


async def test_job_timeout_cancels_queued_jobs_and_follows_running_ones(simulator, tmp_path):
    sim = await simulator(concurrency=1, duration=30)
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 2), job_timeout=0.3))
    # The running one could not be cancelled: overdue, still followed (tests/test_hostile_api.py).
    assert out.counts == {"b": {"timed_out": 1, "overdue": 1}}
    statuses = sorted(r["status"] for r in sim.requests()["requests"])
    assert statuses == ["cancelled", "in_progress"]


async def test_max_jobs_budget(simulator, tmp_path):
    sim = await simulator(duration=0)
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 5), max_jobs=2))
    assert out.summary.stop_reason is StopReason.MAX_JOBS
    assert out.counts == {"b": {"succeeded": 2, "pending": 3}}


async def test_max_cost_budget(simulator, tmp_path):
    sim = await simulator(duration=0.05, price_usd=0.10)
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 8), max_cost=0.35))
    assert out.summary.stop_reason is StopReason.BUDGET
    assert out.counts == {"b": {"succeeded": 3, "pending": 5}}
    assert out.summary.spent_usd == pytest.approx(0.30)


async def test_deadline_stops_submitting_then_stops(simulator, tmp_path):
    import time

    sim = await simulator(concurrency=1, duration=0.4)
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 6), concurrency=1,
                                deadline=time.time() + 1.0))
    assert out.summary.stop_reason is StopReason.DEADLINE
    assert out.counts["b"].get(S.PENDING, 0) >= 2  # never submitted: left for the next run
    assert out.summary.elapsed < 3


async def test_a_cancel_of_every_batch_ends_the_run_as_cancelled(simulator, tmp_path, monkeypatch):
    # The one job out runs at once (so the provider will not cancel it) and holds the only slot
    # while `batchgen cancel` is recorded: the others are cancelled unsent, it is followed to its end.
    monkeypatch.setattr(C, "CANCEL_CHECK_EVERY", 0.02)
    sim = await simulator(concurrency=1, duration=2)
    box, asked = [], []

    def on_event(event):
        if event.kind == S.IN_QUEUE and not asked:
            asked.append(asyncio.ensure_future(box[0].store.request_cancel("b")))

    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 4), concurrency=1),
                        on_event=on_event, on_runner=box.append)
    assert out.summary.stop_reason is StopReason.CANCELLED
    assert out.counts == {"b": {"cancelled": 3, "succeeded": 1}}
    assert sim.calls["submit"] == 1 and sim.calls["cancel"] == 1


async def test_a_store_failure_stops_the_run_with_the_error_raised(simulator, tmp_path):
    from batchgen.errors import StoreError

    class FailingStore(SqliteStore):
        async def record_downloaded(self, *args, **kwargs):
            raise StoreError("disk gone")

    sim = await simulator(duration=0)
    path = manifest(tmp_path, sim, 3)
    seen = []
    async with await FailingStore.open(tmp_path / "s.sqlite3") as store:
        from batchgen.client import RunComfyClient
        from batchgen.manifest import load_manifest
        from batchgen.runner import Runner

        m = load_manifest(path)
        await store.upsert_batch("b", m.model_id, None, {})
        await add_jobs(store, "b", m.iter_jobs())
        async with RunComfyClient(sim.base_url, "t") as client:
            runner = Runner(store, client, tmp_path, settings(), on_event=seen.append)
            with pytest.raises(StoreError, match="disk gone"):
                await runner.run(["b"])
        assert (await store.counts(["b"]))["b"].get(S.SUCCEEDED, 0) == 0
    assert [e.message for e in seen if e.kind == "stop"] == ["stopping: error"]



async def test_a_request_id_the_store_cannot_record_is_said_in_the_log(simulator, tmp_path, caplog):
    # A shared store's server gone between a submit's answer and its record: the paid job's id
    # is then nowhere but in the log, so it must be there.
    from batchgen.errors import StoreError

    class FailingStore(SqliteStore):
        async def transition(self, job, state, **kwargs):
            if state == S.IN_QUEUE:
                raise StoreError("server closed the connection")
            return await super().transition(job, state, **kwargs)

    sim = await simulator(duration=0)
    path = manifest(tmp_path, sim, 1)
    async with await FailingStore.open(tmp_path / "s.sqlite3") as store:
        from batchgen.client import RunComfyClient
        from batchgen.manifest import load_manifest
        from batchgen.runner import Runner

        m = load_manifest(path)
        await store.upsert_batch("b", m.model_id, None, {})
        await add_jobs(store, "b", m.iter_jobs())
        [job] = await store.jobs(["b"])
        async with RunComfyClient(sim.base_url, "t") as client:
            runner = Runner(store, client, tmp_path, settings())
            with pytest.raises(StoreError, match="server closed"):
                await runner.run(["b"])
    [sent] = sim.requests()["requests"]
    assert (f"job {job.key} was submitted as request {sent['request_id']}, which could not be recorded: "
            "server closed the connection") in caplog.text

async def test_the_first_stop_reason_is_the_one_kept(make_runner):
    """A budget ends submitting; a Ctrl-C after it stops polls and downloads too, but the run
    still stopped for its budget (the first reason), and an error later is kept beside it."""
    runner = await make_runner(settings())
    runner._end_submitting(StopReason.BUDGET, "--max-cost reached")
    assert runner._stop_reason is StopReason.BUDGET and not runner._stopping.is_set()
    runner.stop(StopReason.INTERRUPTED)
    runner._stop_on_error(RuntimeError("later"))
    assert runner._stopping.is_set()
    assert runner._summary.stop_reason is StopReason.BUDGET
    assert str(runner._error) == "later"


async def test_retry_failed_jobs_keeps_history(simulator, tmp_path):
    sim = await simulator(duration=0, faults=["script.submit=fail,fail"])
    path = manifest(tmp_path, sim, 3)
    first = await app.run(options(tmp_path, sim, path))
    assert first.counts == {"b": {"succeeded": 1, "failed": 2}}
    retry = await app.run(app.RunOptions(
        workdir=tmp_path / "work", batch="b", retry_states=(S.FAILED, S.TIMED_OUT),
        target=app.Target(api_url=sim.base_url, token="t"), settings=settings()))
    assert retry.counts == {"b": {"succeeded": 3}} and retry.summary.submitted == 2
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        job = (await store.jobs(["b"]))[0]
        states = [e[2] for e in await events(store, job.id)]
    assert states.count(S.SUBMITTING) == 2 and S.FAILED in states


async def test_a_retried_job_never_resumes_the_partial_file_of_its_earlier_attempt(simulator, tmp_path):
    # The first attempt's output could not be downloaded (cut short, then expired): the job
    # failed with half a file in <key>.mp4.part. Retried, its result is asked for again (it was
    # paid for) and fetched whole: should the bytes served differ now, resuming the old .part
    # would splice two outputs into one file.
    sim = await simulator(duration=0, faults=["script.download=truncate,truncate,truncate,expire"])
    path = manifest(tmp_path, sim, 1)
    lossy = RetryPolicy(base=0.01, cap=0.05, retry_after_cap=0.05, max_call_retries=2)
    first = await app.run(options(tmp_path, sim, path, policy=lossy))
    assert first.counts == {"b": {"failed": 1}}
    assert list((tmp_path / "work" / "b").glob("*.part"))
    for media_key, data in list(sim._media.items()):
        sim._media[media_key] = bytes(reversed(data))  # the next generation of this job
    retry = await app.run(app.RunOptions(
        workdir=tmp_path / "work", batch="b", retry_states=(S.FAILED,),
        target=app.Target(api_url=sim.base_url, token="t"), settings=settings()))
    assert retry.counts == {"b": {"succeeded": 1}}
    assert sim.calls["submit"] == 1  # delivered once, paid once
    await check_outputs_match(sim, tmp_path / "work")  # the file is what the provider served
    assert not list((tmp_path / "work" / "b").glob("*.part"))


async def test_cancel_batch(simulator, tmp_path):
    sim = await simulator(concurrency=1, duration=30)
    path = manifest(tmp_path, sim, 5)
    box = []

    def on_event(event):
        if event.kind == S.IN_QUEUE and len(sim.requests()["requests"]) == 2:
            box[0].stop(StopReason.INTERRUPTED)

    await app.run(options(tmp_path, sim, path, concurrency=2), on_event=on_event, on_runner=box.append)
    report = await app.cancel(tmp_path / "work", "b", app.Target(api_url=sim.base_url, token="t"))
    assert (report.not_submitted, report.cancelled, report.not_cancellable) == (3, 1, 1)
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        counts = await store.counts(["b"])
    assert counts == {"b": {"cancelled": 4, "in_progress": 1}}


async def test_throttling_lowers_the_cap_then_it_recovers(simulator, tmp_path):
    sim = await simulator(duration=0.05, faults=["script.submit=" + ",".join(["429"] * 6), "retry_after=0"])
    caps = []
    box = []

    def on_event(event):
        if box:
            caps.append(box[0].cap.value)

    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 12), concurrency=8),
                        on_event=on_event, on_runner=box.append)
    assert out.counts == {"b": {"succeeded": 12}}
    assert min(caps) < 8  # the provider said slow down: the in-flight cap went down on its own
    assert submissions_per_seed(sim) == {i: 1 for i in range(12)}


async def test_the_request_rate_paces_every_api_call_of_a_run(simulator, tmp_path):
    sim = await simulator(concurrency=6, duration=0)
    started = time.monotonic()
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 6), rate=5))
    elapsed = time.monotonic() - started
    assert out.counts == {"b": {"succeeded": 6}}
    calls = sum(sim.calls[k] for k in ("submit", "status", "result"))
    assert calls >= 12 and elapsed >= (calls - 5) / 5 * 0.9  # a burst of 5, then 5 a second


async def test_a_stop_sends_none_of_the_claimed_jobs_still_waiting_for_their_turn(simulator, tmp_path):
    # Money: 12 jobs are claimed at once, then each waits for the request rate's token (2 a
    # second). Ctrl-C after the first submit must send none of the others: they were claimed,
    # never sent, and go back to pending (this used to send every claimed job, seconds later).
    sim = await simulator(concurrency=16, duration=5.0)
    path = manifest(tmp_path, sim, 12)
    box = []

    def on_event(event):
        if event.kind == S.IN_QUEUE:
            box[0].stop(StopReason.INTERRUPTED)

    first = await app.run(options(tmp_path, sim, path, concurrency=16, rate=2.0), on_event=on_event,
                          on_runner=box.append)
    assert first.summary.stop_reason is StopReason.INTERRUPTED
    sent = len(sim.requests()["requests"])
    assert 1 <= sent <= 3, sent  # the first, and at most the tokens already in hand
    assert first.summary.submitted == sent
    assert first.counts["b"].get(S.PENDING) == 12 - sent
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        assert all(j.attempts == 0 for j in await store.jobs(["b"], [S.PENDING]))  # no attempt spent
    second = await app.run(options(tmp_path, sim, path, concurrency=16))
    assert second.counts == {"b": {"succeeded": 12}}
    assert submissions_per_seed(sim) == {i: 1 for i in range(12)}


async def test_interrupted_simulated_run_resumes_its_jobs(samples, tmp_path):
    """Under --simulate the simulator is started anew by each run; it keeps its jobs in the work
    directory, so a resumed run polls them as it would at the real service."""
    box = []

    def on_event(event):
        if event.kind == S.IN_QUEUE:
            box[0].stop(StopReason.INTERRUPTED)

    opts = app.RunOptions(workdir=tmp_path / "work", manifest=samples / "quickstart.yaml",
                          target=app.Target(simulate=True), settings=settings())
    first = await app.run(opts, on_event=on_event, on_runner=box.append)
    assert first.summary.stop_reason is StopReason.INTERRUPTED
    assert sum(first.counts["quickstart"].get(st, 0) for st in S.REMOTE_ACTIVE) >= 1  # at the provider's
    opts.target = app.Target(simulate=True)
    second = await app.run(opts)
    assert second.counts == {"quickstart": {"succeeded": 6}}
    state = (tmp_path / "work" / "simulated" / "simulator-state.jsonl").read_text().splitlines()
    assert sum('"job"' in line for line in state) == 6  # each job submitted once, across both runs


async def test_a_partial_file_left_by_a_killed_run_is_not_left_behind(simulator, tmp_path):
    # A run killed after keeping a broken download's bytes (<key>.mp4.part) but before recording
    # the result leaves the job at the provider's in the store. The next run fetches the result
    # afresh: it must resume from (or replace) that partial file, and leave no .part behind.
    sim = await simulator(concurrency=4, duration=0.3)
    box = []

    def on_event(event):
        if event.kind == S.IN_QUEUE and box:
            box[0].stop(StopReason.INTERRUPTED)

    path = manifest(tmp_path, sim, 1)
    first = await app.run(options(tmp_path, sim, path), on_event=on_event, on_runner=box.append)
    assert first.counts["b"].get(S.IN_QUEUE) == 1
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        (job,) = await store.jobs(["b"])
    part = tmp_path / "work" / "b" / f"{job.key}.mp4.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.sleep(0.4)  # the job is done at the provider when the next run asks
    media = await sim.media(sim.jobs[job.request_id].media_key)
    part.write_bytes(media[:100])  # the first bytes, as a broken try keeps them
    second = await app.run(options(tmp_path, sim, path))
    assert second.counts == {"b": {"succeeded": 1}}
    assert not list((tmp_path / "work").rglob("*.part"))
    assert (tmp_path / "work" / "b" / f"{job.key}.mp4").read_bytes() == media


class _ResultSaysLittleUntilDone(Simulator):
    """A provider whose /result, for an unfinished job, answers a status word batchgen does not
    know, or a 404: the protocol does not promise either never happens."""

    def __init__(self, config, unfinished: str):
        super().__init__(config)
        self.unfinished = unfinished
        self.odd_answers = 0

    async def _result(self, request):
        job = self.jobs.get(request.match_info["rid"])
        if job is not None:
            self._queues[job.owner].advance(time.time(), self.jobs)
            if job.status() in ("in_queue", "in_progress"):
                self.odd_answers += 1
                if self.unfinished == "404":
                    return self._error(404, 404001, "Result not ready")
                return web.json_response({"request_id": job.id, "status": "pending"})
        return await super()._result(request)


@pytest.mark.parametrize("unfinished", ["unknown word", "404"])
async def test_result_polling_never_fails_a_job_that_is_still_running(tmp_path, unfinished):
    # Durations vary around the median the planner learns, so about half the jobs are asked
    # /result before they are done: they must be asked /status then, not failed.
    sim = _ResultSaysLittleUntilDone(SimConfig(duration=0.3, duration_jitter=0.6, seed=4), unfinished)
    await sim.start()
    try:
        path = manifest(tmp_path, sim, 12)
        out = await app.run(options(tmp_path, sim, path, concurrency=3))
        assert out.counts == {"b": {"succeeded": 12}}
        assert sim.odd_answers > 0  # the case was really met
        assert set(submissions_per_seed(sim).values()) == {1}
        await check_outputs_match(sim, tmp_path / "work")
    finally:
        await sim.stop()


async def test_a_scout_learns_the_duration_so_the_first_jobs_are_not_held(simulator, tmp_path):
    # Before any job has finished, jobs are first polled after first_poll_delay (5 s here); the
    # scouts are polled from 10 ms on instead, and once one has taught how long jobs take (0.1 s)
    # every other job's first poll is brought forward. Without the scouts this run takes > 5 s.
    sim = await simulator(concurrency=4, duration=0.1)
    started = time.monotonic()
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 8),
                                first_poll_delay=5.0, min_poll_interval=0.25, max_poll_interval=5.0))
    assert out.counts == {"b": {"succeeded": 8}}
    assert time.monotonic() - started < 3.0
    calls = sim.requests()["calls"]
    # The scouts' polls are the only extra calls. Each polls at most at 10 ms x 1.25^k, k = 0, 1,
    # ..., until it is seen finished: 0.1 s out, plus up to 0.1 s in the simulator's queue (it runs
    # 4 at a time) is k <= 14, for at most C.SCOUTS (8) scouts.
    assert calls["status"] + calls["result"] <= 8 + 8 * 15


async def test_runner_sends_the_recorded_text_and_downloads_wait_for_submits(simulator, tmp_path):
    # Wired in: every submit sends the job's recorded JSON text, and every finished job's
    # download first lets the submits ahead of it go.
    sim = await simulator(concurrency=4, duration=0.05)
    sent, waits = [], []

    def on_runner(runner):
        real_submit, real_wait = runner.client.submit, runner.gate.wait

        async def submit(model_id, inputs, **kw):
            sent.append(inputs)
            return await real_submit(model_id, inputs, **kw)

        async def submits_first():
            waits.append(1)
            await real_wait()

        runner.client.submit = submit
        runner.gate.wait = submits_first

    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 6)), on_runner=on_runner)
    assert out.counts == {"b": {"succeeded": 6}}
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        recorded = sorted(j.inputs_json for j in await store.jobs())
    assert all(isinstance(x, str) for x in sent)
    assert sorted(sent) == recorded
    assert len(waits) == 6




def _job(i, now):
    return S.Job(i, "b", f"k{i}", i, "m", "s", {}, {}, S.IN_QUEUE, 1, f"r{i}", None, None,
                 None, None, None, 0, 0, now - 0.5, None, None)


async def test_under_a_rate_a_scout_polls_only_on_a_spare_token(make_runner):
    # A scout's early polls are extras: with the bucket short, its moment is skipped (no call, no
    # token, the next moment planned); with tokens to spare, it polls (here the call fails:
    # nothing listens on port 9, which is how we see that it was made).
    from batchgen.limits import TokenBucket

    runner = await make_runner(settings(rate=10))
    clock = [0.0]
    runner.client.limiter = bucket = TokenBucket(rate=10, burst=10, clock=lambda: clock[0])
    scout = _job(1, time.time())
    runner.polls.enlist(scout.id)
    for _ in range(5):
        assert bucket.try_take()
    assert bucket.tokens == 5.0  # exactly half the bucket: nothing to spare above it
    await runner._poll(scout)
    assert runner.client.calls["status"] == 0 and runner.polls.failures(scout.id) == 0
    assert list(runner.polls.planned()) == [scout.id]  # its next moment planned instead
    assert bucket.tokens == 5.0
    clock[0] = 0.5  # five tokens more
    await runner._poll(scout)
    assert runner.client.calls["status"] == 1 and runner.polls.failures(scout.id) == 1
    assert bucket.tokens == 9.0  # one token, not two


async def test_a_claim_that_finds_nothing_lets_a_waiting_download_go_at_once(make_runner, monkeypatch):
    # A claim that finds nothing to submit lets the downloads waiting for it go at once, not at
    # the backstop.
    monkeypatch.setattr(C, "SUBMITS_FIRST_MAX", 5.0)  # the backstop must not be what ends the wait
    runner = await make_runner(settings())
    answer, claim_many = asyncio.Event(), runner.store.claim_many

    async def claim_when_told(*args):
        await answer.wait()
        return await claim_many(*args)

    runner.store.claim_many = claim_when_told
    run = asyncio.ensure_future(runner.run(["b"]))  # no such batch: every claim finds nothing
    while not runner.gate.claiming:
        await asyncio.sleep(0.001)
    download = asyncio.ensure_future(runner.gate.wait())
    await asyncio.sleep(0.01)
    assert not download.done()  # waits for the claim ...
    started = time.monotonic()
    answer.set()
    await asyncio.wait_for(download, 2.0)
    assert time.monotonic() - started < 1.0  # ... and goes as soon as it found nothing
    await asyncio.wait_for(run, 5.0)


# --- --concurrency auto ---------------------------------------------------------------------------


def _cap_notes(events) -> list[str]:
    return [e.message for e in events if e.kind in ("tune", "cap")]


async def test_auto_finds_a_hidden_limit_of_16_and_keeps_the_queue_short(simulator, tmp_path):
    # No number given: the cap starts small, grows while testers run at once, and stops when one
    # waits, so the account is kept busy while its queue stays short. Nothing is sent twice.
    sim = await simulator(concurrency=16, duration=1.0)
    events = []
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 48), concurrency=256,
                                auto_concurrency=True), on_event=events.append)
    assert out.counts == {"b": {"succeeded": 48}}
    notes = _cap_notes(events)
    assert notes[0] == "cap 2 -> 3: jobs start at once"
    most = max(int(n.split(" -> ")[1].split(":")[0]) for n in notes if " -> " in n)
    assert most >= 12
    assert any("waiting at the provider" in n for n in notes)
    assert sim.max_waiting <= 8  # the account's queue never flooded (a fixed 48 would queue 32)
    assert submissions_per_seed(sim) == {i: 1 for i in range(48)}


async def test_a_fixed_concurrency_neither_probes_nor_moves_without_a_429(simulator, tmp_path):
    sim = await simulator(concurrency=16, duration=0.3)
    events = []
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 12), concurrency=4),
                        on_event=events.append)
    assert out.counts == {"b": {"succeeded": 12}}
    assert _cap_notes(events) == []
    assert sim.max_waiting == 0


async def test_auto_halves_on_429_from_a_full_queue_and_resubmits_nothing(simulator, tmp_path):
    # An account that refuses (429) any submit beyond 2 running and none queued: certain
    # refusals, retried; the cap halves and nothing is created twice.
    sim = await simulator(concurrency=2, max_queued=0, duration=0.3)
    events = []
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 10), concurrency=256,
                                auto_concurrency=True, policy=RetryPolicy(base=0.05, cap=0.1, max_submit_attempts=50)),
                        on_event=events.append)
    assert out.counts == {"b": {"succeeded": 10}}
    assert sim.refused_queue_full > 0
    assert any(n.endswith(": 429 (the provider is throttling)") for n in _cap_notes(events))
    assert submissions_per_seed(sim) == {i: 1 for i in range(10)}


async def test_the_learned_cap_is_stored_and_the_next_run_starts_there(simulator, tmp_path):
    sim = await simulator(concurrency=8, duration=0.6)
    await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 30, name="night1"), concurrency=256,
                          auto_concurrency=True))
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        learned = await store.learned_cap([C.DEFAULT_MODEL], sim.base_url)
        assert await store.learned_cap([C.DEFAULT_MODEL], "https://elsewhere/v1") is None
    # the limit, plus two of headroom, plus the jobs (of 0.6 s here) that finish before we notice
    assert learned is not None and 8 <= learned <= 14
    events = []
    first_burst = len(sim.requests()["requests"])
    await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 20, name="night2"), concurrency=256,
                          auto_concurrency=True), on_event=events.append)
    assert _cap_notes(events)[0] == f"cap starts at {learned}: learned by an earlier run"
    # the second night's first submits went out together, up to the learned cap
    second = sorted(r["submitted_at"] for r in sim.requests()["requests"][first_burst:])
    assert sum(1 for t in second if t - second[0] < 0.1) >= min(learned, 20) - 1


def test_every_stop_says_whether_running_again_goes_on():
    # One list of stop words: the CLI's exit code reads it instead of keeping its own copy.
    assert {r for r in StopReason if r.resumable} == {
        StopReason.INTERRUPTED, StopReason.DEADLINE, StopReason.MAX_JOBS, StopReason.BUDGET, StopReason.ERROR,
        StopReason.LEASE_LOST}
    assert StopReason.BUDGET == "budget" and f"{StopReason.MAX_JOBS}" == "max_jobs"


async def test_jobs_running_at_the_provider_count_as_running_not_queued(simulator, tmp_path):
    # Issue 18: most jobs are asked about once, at their expected end, so a job that runs used
    # to show 'in queue' until then. A job said to be in_progress means every job sent before it
    # has started (the provider starts them in order): they are recorded in_progress at once,
    # each truly started at the provider by then, and never more than it runs.
    sim = await simulator(concurrency=8, duration=1.5)
    inferred, running_at_sim = [], []

    def on_event(event):
        if event.kind == S.IN_PROGRESS and event.message.startswith("started"):
            inferred.append(event.job.request_id)
            described = {r["request_id"]: r for r in sim.requests()["requests"]}
            running_at_sim.append(described[event.job.request_id]["started_at"] is not None)

    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 16), concurrency=64,
                                auto_concurrency=True, max_poll_interval=30), on_event=on_event)
    assert out.counts == {"b": {"succeeded": 16}}
    assert len(inferred) >= 3 and all(running_at_sim)
    assert len(set(inferred)) == len(inferred)  # once each
    assert submissions_per_seed(sim) == {i: 1 for i in range(16)}
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        for job in await store.jobs():
            if job.request_id in inferred:
                states = [state for _t, _from, state, _d in await events(store, job.id)]
                assert S.IN_PROGRESS in states and states[-1] == S.SUCCEEDED, states


# --- polling economy (issue 17): at most 3 status/result calls a job plus 20 a run ---------------


async def _economy(simulator, tmp_path, n: int, **sim_config) -> tuple[int, dict[str, int], Simulator]:
    """A run of ``n`` jobs of 5 s as a user starts it (no flag: --concurrency auto, the default
    request rate and poll settings): the status and result calls the simulator counted."""
    sim = await simulator(duration=5.0, seed=1, **sim_config)
    opts = app.RunOptions(workdir=tmp_path / "work", manifest=manifest(tmp_path, sim, n),
                          target=app.Target(api_url=sim.base_url, token="t"),
                          settings=RunSettings(concurrency=C.AUTO_CEILING, auto_concurrency=True))
    out = await app.run(opts)
    assert out.counts == {"b": {"succeeded": n}}
    calls = sim.requests()["calls"]
    return calls["status"] + calls["result"], calls, sim


async def test_ten_jobs_of_5s_cost_at_most_3_calls_a_job_plus_20(simulator, tmp_path):
    made, calls, _ = await _economy(simulator, tmp_path, 10, concurrency=16)
    assert calls["result"] >= 10 and made <= 3 * 10 + 20, calls


async def test_jobs_that_wait_in_the_providers_queue_cost_no_more(simulator, tmp_path):
    # An account running 4, 12 jobs of 5 s ± 20%: most jobs wait in the provider's queue first
    # and then run a whole run time. Counted from its submit, such a job was asked about again
    # and again until it finished (5-8 calls a job); counted from its start at the provider
    # (the jobs sent before it, the slots they free), it costs about two.
    made, calls, sim = await _economy(simulator, tmp_path, 12, concurrency=4, duration_jitter=0.2)
    assert sim.max_waiting >= 1 and made <= 3 * 12 + 20, calls
