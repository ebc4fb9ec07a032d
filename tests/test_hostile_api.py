"""A hostile or broken API, scenario by scenario: each against the simulator (or a small server)
over real loopback HTTP, with a real store file. One section per area."""

from __future__ import annotations

import asyncio
import json
import time

import aiosqlite
import pytest
from aiohttp import web
from click.testing import CliRunner
from conftest import loopback, write_file
from imagefactory import make_image
from test_runner import check_outputs_match, manifest, options, submissions_per_seed

from batchgen import app, catalog
from batchgen import constants as C
from batchgen import store as S
from batchgen.cli import main
from batchgen.client import RunComfyClient
from batchgen.errors import MalformedAnswerError
from batchgen.migrations import MIGRATIONS, migrate
from batchgen.runner import RunSettings
from batchgen.store import Store

# --- polling and results ---
# Jobs at the provider that do not end as the protocol says they should: past their timeout and
# not cancellable (followed as 'overdue', never paid for twice), answers carrying absurd numbers
# or no readable status, a status that never becomes final, a request id unknown for a moment.


async def _jobs(workdir) -> list[S.Job]:
    async with await Store.open(workdir / "batchgen.sqlite3") as store:
        return await store.jobs()


async def _history(workdir, job_id: int) -> list[str]:
    async with await Store.open(workdir / "batchgen.sqlite3") as store:
        return [e[2] for e in await store.events(job_id)]


def _again(tmp_path, sim, **kw) -> app.RunOptions:
    """A later run of batch 'b' (no manifest), as `batchgen run --batch b` or `retry b` makes it."""
    retry_states = kw.pop("retry_states", ())
    opts = options(tmp_path, sim, None, **kw)
    opts.manifest, opts.batch, opts.retry_states = None, "b", retry_states
    return opts


async def test_a_job_past_its_timeout_that_cannot_be_cancelled_is_followed_not_paid_twice(simulator, tmp_path):
    # Issue 14, point 3: it keeps running (and is billed) at the provider, so it stays followed.
    sim = await simulator(duration=1.5)
    first = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 1), job_timeout=0.3))
    assert first.counts == {"b": {S.OVERDUE: 1}}
    (job,) = await _jobs(tmp_path / "work")
    assert "not cancelled (not_cancellable)" in job.error and "may still be delivered" in job.error
    (status,) = await app.status(tmp_path / "work")
    assert status.counts == {S.OVERDUE: 1}
    assert any("overdue" in step and "retry --force b" in step for step in status.next_steps)
    assert not any("are not finished" in step for step in status.next_steps)

    # `retry` leaves it alone (and says so); the run it starts follows it.
    retry = await app.run(_again(tmp_path, sim, retry_states=(S.FAILED, S.TIMED_OUT)))
    assert retry.overdue_kept == 1 and retry.summary.submitted == 0
    assert submissions_per_seed(sim) == {0: 1}

    await asyncio.sleep(1.5)  # it finishes at the provider; the next run downloads it
    later = await app.run(_again(tmp_path, sim))
    assert later.counts == {"b": {S.SUCCEEDED: 1}} and later.summary.submitted == 0
    assert submissions_per_seed(sim) == {0: 1}
    await check_outputs_match(sim, tmp_path / "work")
    (job,) = await _jobs(tmp_path / "work")
    assert job.error is None  # no longer says it is overdue


async def test_retry_force_submits_an_overdue_job_again(simulator, tmp_path):
    sim = await simulator(duration=30)
    await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 1), job_timeout=0.2))
    sim.config.duration = 0.05  # only new submits are quick
    forced = await app.run(_again(tmp_path, sim, retry_states=(S.FAILED, S.TIMED_OUT, S.OVERDUE)))
    assert forced.counts == {"b": {S.SUCCEEDED: 1}} and forced.overdue_kept == 0
    assert submissions_per_seed(sim) == {0: 2}  # paid twice, as asked


async def test_an_overdue_job_is_downloaded_by_the_run_it_finishes_in(simulator, tmp_path):
    # One job at a time, each given up on (overdue) before it finishes: while the next one keeps
    # the run going, the overdue one is still polled, and downloaded when it finishes. The last
    # one is left to the next run.
    sim = await simulator(concurrency=4, duration=1.0)
    path = manifest(tmp_path, sim, 3)
    first = await app.run(options(tmp_path, sim, path, concurrency=1, job_timeout=0.4,
                                  overdue_poll_interval=0.05))
    by_seq = {j.seq: j for j in await _jobs(tmp_path / "work")}
    assert by_seq[0].state == S.SUCCEEDED, first.counts
    assert S.OVERDUE in await _history(tmp_path / "work", by_seq[0].id)
    await asyncio.sleep(1.1)
    second = await app.run(_again(tmp_path, sim))
    assert second.counts == {"b": {S.SUCCEEDED: 3}} and second.summary.submitted == 0
    assert set(submissions_per_seed(sim).values()) == {1}
    await check_outputs_match(sim, tmp_path / "work")


def test_the_job_timeout_has_a_default():
    # Issue 14, point 7: without one, a job that never ends is polled forever.
    assert RunSettings().job_timeout == C.DEFAULT_JOB_TIMEOUT == 6 * 3600


async def test_a_status_that_never_becomes_final_ends_overdue_with_a_clear_error(simulator, tmp_path):
    sim = await simulator(duration=0.1, faults=["stuck=processing"])
    path = manifest(tmp_path, sim, 2)
    first = await asyncio.wait_for(app.run(options(tmp_path, sim, path, job_timeout=0.5)), 20)
    assert first.counts == {"b": {S.OVERDUE: 2}}
    for job in await _jobs(tmp_path / "work"):
        assert "job timeout (0.5s; its last status was 'processing')" in job.error
    sim.config.faults.stuck_status = None  # the provider's answers make sense again
    second = await app.run(_again(tmp_path, sim))
    assert second.counts == {"b": {S.SUCCEEDED: 2}}
    assert set(submissions_per_seed(sim).values()) == {1}


async def test_polls_that_fail_forever_end_at_the_job_timeout(simulator, tmp_path):
    sim = await simulator(duration=30, faults=["script.status=" + ",".join(["5xx"] * 100_000)])
    out = await asyncio.wait_for(app.run(options(tmp_path, sim, manifest(tmp_path, sim, 1),
                                                 job_timeout=0.5)), 20)
    assert out.counts == {"b": {S.OVERDUE: 1}}
    (job,) = await _jobs(tmp_path / "work")
    assert "job timeout (0.5s; poll failed (" in job.error and "HTTP 502" in job.error


@pytest.mark.parametrize("grace, state", [(C.NOT_FOUND_GRACE, S.SUCCEEDED), (0.0, S.FAILED)])
async def test_a_404_right_after_submit_is_not_believed_at_once(simulator, tmp_path, grace, state):
    # Issue 14, point 8: a request id handed out milliseconds ago may be unknown for a moment.
    sim = await simulator(duration=0.2, faults=["script.status=404,404,404"])
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 1), not_found_grace=grace))
    assert out.counts == {"b": {state: 1}}
    if state == S.FAILED:  # past the grace, 404001 means what it says
        (job,) = await _jobs(tmp_path / "work")
        assert job.error_code == 404001 and "not found" in job.error


@pytest.mark.parametrize("field, raw", [
    ("queue_position", "Infinity"), ("queue_position", "NaN"), ("queue_position", "1e300"),
    ("queue_position", str(2**64)), ("created_at", "12345"), ("finished_at", "[1]"),
    ("cost", "1e400"), ("cost", "1" + "0" * 400), ("cost", "-5"),
])
async def test_absurd_numbers_in_answers_are_ignored(simulator, tmp_path, field, raw):
    # Issue 14, point 6: each of these crashed the run (and every rerun) or reached the store.
    sim = await simulator(concurrency=1, duration=0.05, faults=[f"garble.{field}={raw}"])
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 3)))
    assert out.counts == {"b": {S.SUCCEEDED: 3}}
    await check_outputs_match(sim, tmp_path / "work")
    for job in await _jobs(tmp_path / "work"):
        assert job.queue_position is None or 0 <= job.queue_position < 2**31
        if field == "cost":
            assert job.cost is None  # not believed, rather than 1e400 or -5 USD


async def test_an_unreadable_error_code_never_reaches_the_store(simulator, tmp_path):
    # Every answer is an error envelope whose code SQLite could not hold: the job fails, the run does not.
    sim = await simulator(duration=0.05, faults=[f"garble.error_code={2**64}"])
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 1)))
    assert out.counts == {"b": {S.FAILED: 1}}
    (job,) = await _jobs(tmp_path / "work")
    assert job.error_code == -1


async def test_answers_without_a_readable_status_put_the_job_aside(simulator, tmp_path):
    sim = await simulator(duration=0.05, faults=["garble.status=123"])
    out = await asyncio.wait_for(app.run(options(tmp_path, sim, manifest(tmp_path, sim, 1))), 20)
    assert out.counts == {"b": {S.OVERDUE: 1}}
    (job,) = await _jobs(tmp_path / "work")
    assert "answers in a row about it could not be read" in job.error and "without a status" in job.error
    assert submissions_per_seed(sim) == {0: 1}


async def test_the_client_reads_every_field_defensively():
    # What each endpoint answers: raw text, so that Infinity, 1e400, 2^64 and broken JSON go out
    # as a server could send them.
    answers = {
        "status": '{"request_id": 123, "status": "in_queue", "queue_position": Infinity}',
        "result": ('{"request_id": ["x"], "status": "succeeded", "cost": 1e400, "created_at": 5, '
                   '"finished_at": "garbage", "error": {"message": "m"}, '
                   '"output": {"video": 123, "videos": ["https://h/a.mp4", 5, "' + "u" * 20_000 + '"]}}'),
        "model": '{"model_id": 1, "base_price_usd": ' + "9" * 400 + ', "price_unit": 5}',
        "submit": '{"request_id": "' + "r" * 1000 + '"}',
        "deep": "[" * 100_000 + "]" * 100_000,
        "wordless": '{"status": 5}',
        "code": '{"error_code": Infinity, "error_message": "odd"}',
    }

    def answer(name):
        async def handler(request):
            return web.Response(text=answers[name], content_type="application/json")
        return handler

    a = web.Application()
    a.router.add_get("/v1/requests/ok/status", answer("status"))
    a.router.add_get("/v1/requests/ok/result", answer("result"))
    a.router.add_get("/v1/models/m", answer("model"))
    a.router.add_post("/v1/models/m", answer("submit"))
    a.router.add_get("/v1/requests/deep/status", answer("deep"))
    a.router.add_get("/v1/requests/wordless/status", answer("wordless"))
    a.router.add_get("/v1/requests/code/status", answer("code"))
    async with loopback(a) as url, RunComfyClient(url + "/v1", "t") as client:
        status = await client.status("ok")
        assert (status.request_id, status.status, status.queue_position) == ("ok", "in_queue", None)
        result = await client.result("ok")
        assert result.request_id == "ok" and result.cost is None and result.error == "m"
        assert result.created_at == 5.0 and result.finished_at is None
        assert result.outputs == [("video", "https://h/a.mp4")]
        info = await client.model_info("m")
        assert (info.model_id, info.base_price_usd, info.price_unit) == ("m", None, None)
        with pytest.raises(MalformedAnswerError, match="usable request_id"):
            await client.submit("m", {})  # a MalformedAnswerError is a lost answer: 'unknown'
        with pytest.raises(MalformedAnswerError, match="not a JSON object"):
            await client.status("deep")
        with pytest.raises(MalformedAnswerError, match="without a status word"):
            await client.status("wordless")
        with pytest.raises(Exception) as err:
            await client.status("code")
        assert getattr(err.value, "error_code", None) == -1


async def test_old_timed_out_jobs_that_were_not_cancelled_become_overdue(tmp_path):
    # Before m005 'timed_out' also held jobs the provider would not cancel: still running, billed.
    path = tmp_path / "s.sqlite3"
    async with aiosqlite.connect(path, isolation_level=None) as db:
        await migrate(db, MIGRATIONS[:4])
        await db.execute("INSERT INTO batches VALUES ('b', 'm', NULL, '{}', 0, 0)")
        for key, rid, error in [
            ("running", "r1", "no result within --job-timeout 60s (cancel: not_cancellable)"),
            ("cancelled", "r2", "no result within --job-timeout 60s (cancel: cancelled)"),
            ("unasked", "r3", "no result within --job-timeout 60s (cancel: cancel failed: HTTP 502)"),
        ]:
            await db.execute(
                "INSERT INTO jobs (batch, key, seq, model_id, inputs_json, state, request_id, error, "
                "created_at, updated_at) VALUES ('b', ?, 0, 'm', '{}', 'timed_out', ?, ?, 0, 0)",
                (key, rid, error))
    async with await Store.open(path) as store:
        states = {j.key: j.state for j in await store.jobs()}
        assert states == {"running": S.OVERDUE, "cancelled": S.TIMED_OUT, "unasked": S.OVERDUE}
        running = next(j for j in await store.jobs() if j.key == "running")
        assert [e[2] for e in await store.events(running.id)] == [S.OVERDUE]


def test_the_cli_reports_overdue_jobs_and_keeps_them_from_retry(samples):
    def cli(*args):
        return CliRunner().invoke(main, list(args), catch_exceptions=False)

    # The simulator's jobs take 2 s and run 4 at a time: the jobs running when their 0.5 s run out
    # are overdue, those queued behind them are cancelled (timed_out).
    run = cli("run", str(samples / "quickstart.yaml"), "--simulate", "--job-timeout", "0.5s", "--rate", "0", "-q")
    assert run.exit_code == 1, run.output  # jobs that need attention, not a crash or "run again"
    states = json.loads(cli("status", "--json").output)["batches"][0]
    overdue = states["states"][S.OVERDUE]
    assert overdue >= 1 and f"{overdue} overdue" in run.output
    assert any("retry --force quickstart" in step for step in states["next_steps"])
    retry = cli("retry", "quickstart", "--simulate", "--max-jobs", "0", "-q")
    assert f"{overdue} overdue job(s) not submitted again: they may still be delivered and are billed" in retry.output


def test_the_cli_survives_absurd_numbers(samples):
    started = time.monotonic()
    result = CliRunner().invoke(main, [
        "run", str(samples / "quickstart.yaml"), "--simulate", "-q",
        "--sim-fault", "garble.queue_position=Infinity", "--sim-fault", f"garble.cost={'9' * 400}",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert time.monotonic() - started < 60


# --- catalog and balance ---------------------------------------------------------------------------

WAN = "sim/wan-like/image-to-video"


def catalog_manifest(folder, model: str):
    make_image(folder / "a.jpg", 640, 480)
    return write_file(folder / "m.yaml", f"model: {model}\nimage_base_url: https://cdn.example.com\n"
                                         "jobs: [{prompt: p, image: a.jpg}]\n")


async def check_catalog_model(folder, model: str, target: app.Target) -> list[str]:
    opts = app.RunOptions(workdir=folder / "work", manifest=catalog_manifest(folder, model), target=target)
    return [str(p) for p in (await app.validate(opts)).problems]


async def test_malformed_catalog_entries_are_skipped_and_a_broken_schema_is_a_problem(simulator, tmp_path):
    sim = await simulator(faults=["script.catalog=malformed"])
    target = app.Target(api_url=sim.base_url, token="t")
    found, note = await app.open_catalog(target, tmp_path / "work")
    # Not mappings, ids that are not text, a schema that is not an object: skipped, the rest kept.
    assert note == "" and found.skipped == 5
    assert {WAN, "broken/schema/image-to-video"} <= set(found.entries)
    assert catalog.load_cache(tmp_path / "work", sim.base_url).skipped == 0  # only what parsed is cached
    (problem,) = await check_catalog_model(tmp_path, "broken/schema/image-to-video", target)
    assert problem == ("m.yaml, line 1, field 'model': model 'broken/schema/image-to-video': RunComfy's catalog "
                       "schema cannot be used: catalog:broken/schema/image-to-video: input 'properties' must map "
                       "field names to schemas")
    assert await check_catalog_model(tmp_path, WAN, target) == []


async def test_an_oversized_catalog_answer_is_refused(simulator, tmp_path, monkeypatch):
    sim = await simulator()
    monkeypatch.setattr(C, "CATALOG_MAX_PAGE_BYTES", 1000)
    (problem,) = await check_catalog_model(tmp_path, WAN, app.Target(api_url=sim.base_url, token="t"))
    assert "RunComfy's catalog could not be fetched: catalog: answer of " in problem
    assert "bytes, more than the 1,000 allowed" in problem


def hostile_catalog(page, balance: bytes = b'{"balance_usd": 1}') -> web.Application:
    """A catalog served as ``page(offset, limit)`` says (a body, streamed without a length), and
    a balance answering ``balance``."""
    api = web.Application()

    async def models(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(page(int(request.query["offset"]), int(request.query["limit"])))
        await resp.write_eof()
        return resp

    async def wallet(request: web.Request) -> web.Response:
        return web.Response(body=balance, content_type="application/json")

    api.router.add_get("/v1/models", models)
    api.router.add_get("/prod/v2/balance", wallet)
    return api


async def test_a_streamed_oversized_page_and_endless_pages_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "CATALOG_PAGE_SIZE", 2)
    monkeypatch.setattr(C, "CATALOG_MAX_PAGES", 5)

    def endless(offset: int, limit: int) -> bytes:  # always a full page, never a total
        ids = ", ".join(f'{{"model_id": "m/{offset + i}"}}' for i in range(limit))
        return f'{{"models": [{ids}]}}'.encode()

    async with loopback(hostile_catalog(endless)) as root, RunComfyClient(root + "/v1", "t") as client:
        found = await catalog.fetch(client)
        assert len(found.entries) == 10 and client.calls["catalog"] == 5
    monkeypatch.setattr(C, "CATALOG_MAX_PAGE_BYTES", 100)
    async with loopback(hostile_catalog(lambda o, n: b" " * 1000)) as root:
        got, note = await app.open_catalog(app.Target(api_url=root + "/v1", token="t"), tmp_path)
    assert got is None and note.endswith("catalog: answer longer than the 100 bytes allowed")


async def test_a_catalog_of_the_wrong_shape_is_an_empty_catalog_not_a_crash(tmp_path):
    for body in (b'{"models": "all of them", "total": "many"}', b'{"models": [null, [], {"model_id": ""}]}'):
        async with loopback(hostile_catalog(lambda o, n, b=body: b)) as root:
            got, note = await app.open_catalog(app.Target(api_url=root + "/v1", token="t"), tmp_path / "w")
        assert note == "" and got.entries == {}
    async with loopback(hostile_catalog(lambda o, n: b"<html>maintenance</html>")) as root:
        got, note = await app.open_catalog(app.Target(api_url=root + "/v1", token="t"), tmp_path / "x")
    assert got is None and "HTTP 200 with a body that is not a JSON object" in note


async def test_a_balance_answer_that_is_no_number_is_a_warning(tmp_path):
    for body, error in ((b'{"currency": "USD"}', "balance: the answer has no balance_usd number"),
                        (b'{"balance_usd": NaN}', "balance: the answer has no balance_usd number"),
                        (b'{"balance_usd": true}', "balance: the answer has no balance_usd number"),
                        (b"x" * 100_000, "balance: answer of 100,000 bytes, more than the 65,536 allowed")):
        async with loopback(hostile_catalog(lambda o, n: b"", balance=body)) as root:
            async with RunComfyClient(root + "/v1", "t") as client:
                info = await app.account_balance(client, app.Target())
        assert info.balance_usd is None and info.error == error
    async with loopback(hostile_catalog(lambda o, n: b"", balance=b'{"balance_usd": "12.5"}')) as root:
        async with RunComfyClient(root + "/v1", "t") as client:
            assert (await app.account_balance(client, app.Target())).balance_usd == 12.5


async def test_the_token_is_never_sent_to_a_balance_url_on_another_host(simulator):
    sim = await simulator()
    seen: list[str] = []
    spy = web.Application()

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"balance_usd": 1})

    spy.router.add_get("/b", record)
    async with loopback(spy) as root:
        elsewhere = root.replace("127.0.0.1", "localhost") + "/b"  # another host name than the API's
        async with RunComfyClient(sim.base_url, "t") as client:
            info = await app.account_balance(client, app.Target(balance_url=elsewhere))
    assert seen == [] and info.balance_usd is None
    assert info.error == (f"balance URL {elsewhere} is neither the API's host nor a RunComfy host over https: "
                          "the token is not sent there")


async def test_a_catalog_schema_referring_elsewhere_or_to_itself_is_a_problem_not_a_crash(tmp_path):
    fetched: list[str] = []
    spy = web.Application()

    async def record(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.json_response({"type": "string"})

    spy.router.add_get("/s.json", record)
    async with loopback(spy) as elsewhere:
        entry = {"model_id": "odd/refs/image-to-video", "input_schema": {"type": "object", "properties": {
            "prompt": {"type": "string"}, "remote": {"$ref": f"{elsewhere}/s.json"},
            "loop": {"$ref": "#/properties/loop"}, "nowhere": {"$ref": "#/$defs/nope"}}}}
        body = f'{{"models": [{json.dumps(entry)}]}}'.encode()
        async with loopback(hostile_catalog(lambda o, n: body)) as root:
            target = app.Target(api_url=root + "/v1", token="t")
            for field, value, said in (("remote", "1", f"refers to '{elsewhere}/s.json', which it does not hold"),
                                       ("loop", "x", "refers to itself without end"),
                                       ("nowhere", "x", "refers to '/$defs/nope', which it does not hold")):
                write_file(tmp_path / "m.yaml",
                           f"model: odd/refs/image-to-video\njobs: [{{prompt: p, {field}: {value}}}]\n")
                opts = app.RunOptions(workdir=tmp_path / "work", manifest=tmp_path / "m.yaml", target=target)
                problems = [str(p) for p in (await app.validate(opts)).problems]
                assert problems == [f"m.yaml, line 2: the model's schema cannot be applied: it {said}"]
    assert fetched == []  # a reference to another document is never fetched
