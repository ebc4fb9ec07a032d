"""A hostile or broken API, scenario by scenario: each against the simulator (or a small server)
over real loopback HTTP, with a real store file. One section per area."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiosqlite
import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner
from conftest import SAMPLES, events, image_manifest, loopback, write_file
from imagefactory import make_image
from simruns import check_outputs_match, manifest, options, outputs_by_job, settings, submissions_per_seed

from batchgen import app, catalog
from batchgen import constants as C
from batchgen import store as S
from batchgen.cli import EXIT_INTERRUPTED, EXIT_REFUSED, main
from batchgen.client import RunComfyClient
from batchgen.constants import DEFAULT_MODEL
from batchgen.downloads import DownloadLimits, download, make_session
from batchgen.errors import AccountError, APIResponseLostError, DownloadError, MalformedAnswerError
from batchgen.migrations import MIGRATIONS, migrate
from batchgen.outputhosts import OutputHosts
from batchgen.runner import Runner, RunSettings
from batchgen.schema import find_schema
from batchgen.simulator import FaultConfig, SimConfig, Simulator
from batchgen.store import Store
from batchgen.text import printable, spreadsheet_cell

# --- polling and results ---
# Jobs at the provider that do not end as the protocol says they should: past their timeout and
# not cancellable (followed as 'overdue', never paid for twice), answers carrying absurd numbers
# or no readable status, a status that never becomes final, a request id unknown for a moment.


async def _jobs(workdir) -> list[S.Job]:
    async with await Store.open(workdir / "batchgen.sqlite3") as store:
        return await store.jobs()


async def _history(workdir, job_id: int) -> list[str]:
    async with await Store.open(workdir / "batchgen.sqlite3") as store:
        return [e[2] for e in await events(store, job_id)]


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
    # Every answer about the job is an error envelope whose code SQLite could not hold: the run
    # goes on, and the job, which may be running and billed, is not failed (a `retry` would pay
    # twice) but asked again until its timeout, then set aside as overdue.
    sim = await simulator(duration=0.05, faults=[f"garble.error_code={2**64}"])
    out = await asyncio.wait_for(app.run(options(tmp_path, sim, manifest(tmp_path, sim, 1), job_timeout=1.0)), 30)
    assert out.counts == {"b": {S.OVERDUE: 1}}
    (job,) = await _jobs(tmp_path / "work")
    assert job.error_code in (None, -1)


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
        assert [e[2] for e in await events(store, running.id)] == [S.OVERDUE]


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


# --- hostile input and text ---


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """batchgen in its own process, as a user runs it: its logging set up as in real life."""
    return subprocess.run([sys.executable, "-m", "batchgen.cli", *args], capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if k != "BATCHGEN_TRACEBACK"})


def _inert(text: str) -> bool:
    """Nothing a terminal or a log tool would act on: no ESC, BEL, NUL, CSI (C1) or bidi control."""
    return not any(ch in text for ch in "\x1b\x07\x00\x9b\u202e")


def test_error_text_from_the_api_is_shown_never_obeyed(samples, tmp_path):
    """Every failed job's error, and the error envelope of a submit, carry a spreadsheet formula,
    colour, clear-screen, an OSC 8 link, a window title and a NUL (simulator fault hostile_text).
    None of it reaches the terminal, the log file, status or the gallery as control characters."""
    log = tmp_path / "logs" / "run.log"
    run = _run_cli("run", str(samples / "quickstart.yaml"), "--simulate", "-v", "--log-file", str(log),
                   "--sim-fault", "fail=1", "--sim-fault", "hostile_text=1", "--sim-fault", "script.submit=429")
    assert run.returncode == 1, run.stderr
    for text in (run.stdout, run.stderr, log.read_text()):
        assert _inert(text)
    # Shown as text: escaped, each message on its one line.
    assert "failed: =HYPERLINK(\"https://evil.example/x\",\"click\") \\x1b[31m\\x1b[2J\\x1b]8;;" in run.stderr
    assert "\\x1b]0;pwned\\x07\\x00 Too many requests, slow down" in run.stderr  # the envelope, in a retry

    runner = CliRunner()
    status = runner.invoke(main, ["status"], catch_exceptions=False)
    assert status.exit_code == 0 and _inert(status.output)
    assert "6 failed: =HYPERLINK" in status.output and "\\x1b[31m" in status.output
    as_json = runner.invoke(main, ["status", "--json"], catch_exceptions=False).output
    assert _inert(as_json) and json.loads(as_json)["batches"][0]["failures"][0]["error"].startswith("=HYPERLINK")

    page = runner.invoke(main, ["gallery", "quickstart"], catch_exceptions=False)
    html = (tmp_path / "jobs" / "simulated" / "quickstart" / "gallery.html").read_text()
    assert page.exit_code == 0 and _inert(html)
    # The jobs are in the page's data file, as text the page's script shows as text (textContent).
    from test_gallery import field, gallery_data

    data = (tmp_path / "jobs" / "simulated" / "quickstart" / "gallery-data.js").read_text()
    errors = [field(r, "error") for r in gallery_data(tmp_path / "jobs" / "simulated" / "quickstart" / "gallery.html")]
    assert _inert(data) and len(errors) == 6 and all(_inert(e) for e in errors)
    assert errors[0].startswith('=HYPERLINK("https://evil.example/x","click") \\x1b[31m')


async def test_account_error_text_is_shown_never_obeyed(samples, simulator):
    """The last line of a run the API stopped with its own words (a refused token) is escaped too."""
    sim = await simulator(token="the-right-one", faults=["hostile_text=1"])
    manifest = samples / "real.yaml"
    manifest.write_text("jobs: [{prompt: p, image: images/street.jpg}]\n")  # the image goes inline
    env = {**os.environ, "RUNCOMFY_API_TOKEN": "a-wrong-one", "RUNCOMFY_API_URL": sim.base_url}
    env.pop("BATCHGEN_TRACEBACK", None)
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "batchgen.cli", "run", str(manifest)],
                                     capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 5, result.stderr
    assert _inert(result.stderr) and "a-wrong-one" not in result.stderr
    assert "error: submit /models/bytedance/dreamina-3-0/pro/image-to-video: =HYPERLINK(" in result.stderr
    assert "\\x1b]0;pwned\\x07\\x00 Invalid or missing API token" in result.stderr


def test_printable_escapes_controls_and_keeps_text():
    assert printable("plain text, é, 日本") == "plain text, é, 日本"
    assert printable("\x1b[2J\x1b]8;;http://x\x07ok\x00\x9b1m\u202eevil\tand\r\nmore") == (
        "\\x1b[2J\\x1b]8;;http://x\\x07ok\\x00\\x9b1m\\u202eevil and  more")
    assert printable("two\nlines\x1b", keep_newlines=True) == "two\nlines\\x1b"
    assert [spreadsheet_cell(v) for v in ("=1", "+1", "-1", "-x", "@a", "\tb", "\rc", "ok", -1, 2.5, None)] == [
        "'=1", "+1", "-1", "'-x", "'@a", "' b", "' c", "ok", -1, 2.5, None]


# --- submit money ---


async def _recorded(path, jobs: list[dict], model_id: str = DEFAULT_MODEL) -> None:
    """A store holding batch 'b' with these jobs' inputs, recorded as a manifest would have been
    (without the validation, which would refuse what these tests want the API to refuse)."""
    async with await Store.open(path) as store:
        await store.upsert_batch("b", model_id, None, {})
        await store.add_rows("b", [(f"k{i}", i, model_id, f"row {i}", json.dumps(inputs), "{}", None)
                                   for i, inputs in enumerate(jobs)])


async def _run(path, base_url: str, **kw):
    """One run of batch 'b' of the store at ``path``: (summary, counts, attempts by job key)."""
    async with await Store.open(path) as store:
        async with RunComfyClient(base_url, "t") as client:
            summary = await Runner(store, client, path.parent, settings(**kw)).run(["b"])
        attempts = {j.key: j.attempts for j in await store.jobs(["b"])}
        return summary, (await store.counts(["b"]))["b"], attempts


def _schema_for(tmp_path, model_id: str):
    """A copy of the bundled schema under another model id: a model batchgen can validate for
    and the simulator does not know (unless given the file)."""
    data = json.loads(Path(find_schema(DEFAULT_MODEL).source).read_text())
    data["model_id"] = model_id
    path = tmp_path / f"{model_id.replace('/', '--')}.json"
    path.write_text(json.dumps(data))
    return path


def _closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused) until a test starts
    something there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("fault", ["500_created", "error200_created"])
async def test_a_submit_answered_with_a_server_error_body_is_not_sent_again(simulator, tmp_path, fault):
    # The provider created (and bills) the job, then failed to answer: a server error in
    # RunComfy's own error body, with HTTP 500 or 200. It says nothing of whether the job exists.
    sim = await simulator(duration=0, faults=[f"script.submit={fault}"])
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 3)))
    assert len(sim.requests()["requests"]) == 3  # the job behind the error exists ...
    assert submissions_per_seed(sim) == {0: 1, 1: 1, 2: 1}  # ... and was paid for once
    assert out.counts == {"b": {"succeeded": 2, "unknown": 1}}


@pytest.mark.parametrize("fault", ["model_info=404", "model_info=noprice"])
async def test_max_cost_without_a_known_price_sends_one_job_until_a_cost_is_known(
        simulator, tmp_path, fault):
    sim = await simulator(duration=0.2, price_usd=0.10, faults=[fault])
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 8), max_cost=0.35))
    sent = sorted(sim.requests()["requests"], key=lambda r: r["submitted_at"])
    # Nothing bounded the first job's price: it went alone, the next one only after it finished
    # (and its result reported the cost) ...
    assert sent[1]["submitted_at"] >= sent[0]["finished_at"]
    # ... and from then on the cap held: costs + 0.10 for each job out; a fourth would make 0.40.
    assert len(sent) == 3 and out.summary.spent_usd == pytest.approx(0.30)
    assert out.summary.stop_reason == "budget"
    assert out.counts == {"b": {"succeeded": 3, "pending": 5}}


async def test_an_unknown_model_stops_submitting_and_keeps_every_job_for_after_the_fix(simulator, tmp_path):
    model = "acme/retired-model"
    store = tmp_path / "s.sqlite3"
    await _recorded(store, [{"prompt": f"p{i}", "image_urls": ["https://x.test/a.jpg"]}
                            for i in range(6)], model)
    sim = await simulator(duration=0)
    summary, counts, attempts = await _run(store, sim.base_url, concurrency=2)
    assert summary.stop_reason == "refused" and model in summary.stop_message
    assert sim.calls["submit"] <= 2  # not one refusal per job
    assert counts == {"pending": 6} and set(attempts.values()) == {0}
    # Fixed (here: the service knows the model again): the same jobs go, each once.
    fixed = await simulator(duration=0, extra_schemas=[_schema_for(tmp_path, model)],
                            validate_inputs=False)
    summary, counts, attempts = await _run(store, fixed.base_url, concurrency=2)
    assert summary.stop_reason is None and counts == {"succeeded": 6}
    assert set(attempts.values()) == {1} and fixed.calls["submit"] == 6


@pytest.mark.parametrize("concurrency", [1, 4])
async def test_the_same_refusal_on_the_first_submits_stops_the_run(simulator, tmp_path, concurrency):
    # Every job's image is on a host the service cannot fetch from: each submit is refused with
    # the same code and message. Three in a row stop the run; no job has spent an attempt (with 4
    # at once, the fourth is refused after the stop, and two had failed before it).
    image = make_image(tmp_path / "in.jpg", 640, 480).read_bytes()
    host_up = False

    async def serve_image(request: web.Request) -> web.Response:
        if not host_up:
            raise web.HTTPNotFound()
        return web.Response(body=image, content_type="image/jpeg")

    image_host = web.Application()
    image_host.router.add_get("/in.jpg", serve_image)
    async with loopback(image_host) as root:
        store = tmp_path / "s.sqlite3"
        await _recorded(store, [{"prompt": f"p{i}", "image_urls": [f"{root}/in.jpg"]} for i in range(8)])
        sim = await simulator(duration=0)
        summary, counts, attempts = await _run(store, sim.base_url, concurrency=concurrency)
        assert summary.stop_reason == "refused" and not summary.finished
        assert "the first 3 submits" in summary.stop_message and "HTTP 404" in summary.stop_message
        assert sim.calls["submit"] == max(3, concurrency) and sim.requests()["requests"] == []
        assert counts == {"pending": 8} and set(attempts.values()) == {0}
        host_up = True  # the fix; a new simulator, since this one remembers what it fetched
        fixed = await simulator(duration=0)
        summary, counts, attempts = await _run(store, fixed.base_url, concurrency=2)
        assert counts == {"succeeded": 8} and set(attempts.values()) == {1}


async def test_refusals_of_different_jobs_for_their_own_reasons_fail_only_them(simulator, tmp_path):
    # Two refusals alike, then an accepted submit: the API takes this batch, so the refusals
    # were the jobs' own and they fail as before (nothing stops).
    sim = await simulator(duration=0)
    store = tmp_path / "s.sqlite3"
    good = {"prompt": "p", "image_urls": [sim.publish_file(make_image(tmp_path / "in.jpg", 640, 480))]}
    bad = {**good, "frames": 99}
    await _recorded(store, [bad, {**bad, "seed": 1}, good, {**bad, "seed": 2}, {**bad, "seed": 3}])
    summary, counts, _ = await _run(store, sim.base_url, concurrency=1)
    assert summary.stop_reason is None and counts == {"failed": 4, "succeeded": 1}


def _cli_manifest(tmp_path, **extra) -> str:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "street.jpg").write_bytes((SAMPLES / "images" / "street.jpg").read_bytes())
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "b", "jobs": [{"prompt": f"p{i}", "image": "street.jpg"}
                                                          for i in range(4)], **extra}))
    return str(path)


def test_cli_an_unknown_model_exits_6_with_one_line_and_status_says_run_again(tmp_path):
    schema = _schema_for(tmp_path, "acme/retired-model")
    cli = CliRunner()
    result = cli.invoke(main, ["run", _cli_manifest(tmp_path), "--schema", str(schema), "--simulate"])
    assert result.exit_code == EXIT_REFUSED, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "acme/retired-model" in errors[0] and "still pending" in errors[0]
    status = cli.invoke(main, ["status"]).output
    assert "4 job(s) are not finished: batchgen run --batch b" in status


async def test_an_api_outage_of_a_few_seconds_fails_no_job(tmp_path):
    port = _closed_port()
    store = tmp_path / "s.sqlite3"
    await _recorded(store, [{"prompt": f"p{i}", "image_urls": ["https://x.test/a.jpg"]} for i in range(6)])
    run = asyncio.ensure_future(_run(store, f"http://127.0.0.1:{port}/v1"))
    await asyncio.sleep(1.5)  # every submit meanwhile is refused a connection
    assert not run.done()
    sim = Simulator(SimConfig(duration=0, validate_inputs=False, faults=FaultConfig()))
    await sim.start(port=port)  # the API is back
    try:
        summary, counts, attempts = await asyncio.wait_for(run, 30)
    finally:
        await sim.stop()
    assert counts == {"succeeded": 6} and set(attempts.values()) == {1}
    assert summary.submitted == 6 and sim.calls["submit"] == 6


async def test_an_outage_longer_than_its_budget_stops_the_run_with_every_job_pending(tmp_path):
    store = tmp_path / "s.sqlite3"
    await _recorded(store, [{"prompt": f"p{i}", "image_urls": ["https://x.test/a.jpg"]} for i in range(5)])
    summary, counts, attempts = await asyncio.wait_for(
        _run(store, f"http://127.0.0.1:{_closed_port()}/v1", outage_budget=0.5), 30)
    assert summary.stop_reason == "outage" and "unreachable" in summary.stop_message
    assert counts == {"pending": 5} and set(attempts.values()) == {0}
    assert summary.submitted == 0


def test_cli_an_outage_past_its_budget_exits_3_with_one_line(tmp_path):
    path = _cli_manifest(tmp_path)  # its image goes inline
    result = CliRunner().invoke(main, [
        "run", path, "--api-url", f"http://127.0.0.1:{_closed_port()}/v1", "--outage-budget", "1s",
    ], env={"RUNCOMFY_API_TOKEN": "t"})
    assert result.exit_code == EXIT_INTERRUPTED, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unreachable" in errors[0] and "run again" in errors[0]


# --- downloads ---------------------------------------------------------------------------------
# Issue 14, "Downloads are contained": outputs only from allowed hosts (each redirect hop and the
# address actually connected to checked), a size cap and a least rate, bodies asked for unencoded,
# API answers read only up to a few MB, .part files never written through a symlink, extensions
# from a list of media types.

SMALL_CAP = DownloadLimits(max_bytes=1 << 20)


async def _run_downloads(tmp_path, sim, n=4, **kw):
    """Run ``n`` jobs against ``sim``; the outcome, each job with its outputs by key, the events."""
    events = []
    opts = options(tmp_path, sim, manifest(tmp_path, sim, n), **kw)
    out = await app.run(opts, on_event=events.append)
    return out, await outputs_by_job(tmp_path / "work"), events


def _offhost_by_job(sim) -> dict[str, bool]:
    return {rid: job.offhost for rid, job in sim.jobs.items()}


async def test_an_output_on_a_host_not_allowed_fails_its_job_alone(simulator, tmp_path):
    sim = await simulator(duration=0.05, faults=["offhost=0.5"], seed=3)
    out, jobs, _ = await _run_downloads(tmp_path, sim, n=8)
    offhost = _offhost_by_job(sim)
    assert 0 < sum(offhost.values()) < len(offhost)  # the seed gives both kinds
    for job, _outs in jobs.values():
        if offhost[job.request_id]:
            assert job.state == S.FAILED
            assert "'localhost'" in job.error and "output_hosts in batchgen.toml" in job.error
        else:
            assert job.state == S.SUCCEEDED, job.error
    # Refused before connecting: the simulator (which answers to 'localhost' too) served only the
    # allowed ones, once each.
    assert sim.calls["download"] == len(offhost) - sum(offhost.values())
    await check_outputs_match(sim, tmp_path / "work")


async def test_a_host_added_to_output_hosts_is_downloaded_from(simulator, tmp_path):
    sim = await simulator(duration=0.05, faults=["offhost=1"])
    out, _, _ = await _run_downloads(tmp_path, sim, n=3, output_hosts=("localhost",))
    assert out.counts == {"b": {"succeeded": 3}}
    await check_outputs_match(sim, tmp_path / "work")


def test_output_hosts_from_batchgen_toml(samples):
    from test_cli import cli

    work = samples.parent / "jobs"
    refused = cli("run", str(samples / "plain.csv"), "--simulate", "--sim-fault", "offhost=1")
    assert refused.exit_code == 1 and "output_hosts in batchgen.toml" in refused.output
    (work / "batchgen.toml").write_text('output_hosts = ["localhost"]\n')
    allowed = cli("retry", "plain", "--simulate", "--sim-fault", "offhost=1")
    assert allowed.exit_code == 0, allowed.output


async def test_redirects_are_followed_only_to_allowed_hosts_and_only_a_few_times(simulator, tmp_path):
    same = await simulator(duration=0.05, faults=["redirect=same"])
    out, _, _ = await _run_downloads(tmp_path / "same", same, n=2)
    assert out.counts == {"b": {"succeeded": 2}}
    assert same.calls["download"] == 4  # each output: the redirect, then the file
    assert same.output_auth_seen == 0  # the token never goes to an output host, nor on a redirect

    away = await simulator(duration=0.05, faults=["redirect=localhost"])
    out, jobs, _ = await _run_downloads(tmp_path / "away", away, n=2)
    assert out.counts == {"b": {"failed": 2}}
    assert all("'localhost' is not allowed" in job.error for job, _ in jobs.values())
    assert away.calls["download"] == 2  # the redirect was not followed

    loop = await simulator(duration=0.05, faults=["redirect=loop"])
    out, jobs, _ = await _run_downloads(tmp_path / "loop", loop, n=1)
    assert out.counts == {"b": {"failed": 1}}
    assert all("redirects more than" in job.error for job, _ in jobs.values())


@pytest.fixture
async def plain_host():
    """A loopback file host; ``hits`` counts the requests that reached it."""
    state = {"hits": 0}

    async def handler(request):
        state["hits"] += 1
        return web.Response(body=b"x" * 1000)

    app_ = web.Application()
    app_.router.add_get("/{name}", handler)
    async with loopback(app_) as root:
        state["port"] = int(root.rpartition(":")[2])
        yield state


class _Answers:
    """What DNS would answer: nothing on this machine can make a name resolve to chosen addresses
    (the one thing here that is not real)."""

    def __init__(self, *addresses: str):
        self.addresses = addresses

    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [{"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
                for a in self.addresses]

    async def close(self):
        pass


async def test_private_addresses_are_refused_unless_the_api_is_on_one(plain_host, tmp_path):
    port = plain_host["port"]
    # An API on a public address (never contacted): names that lead to loopback are refused, by
    # name (resolved at connect time) or as a literal address, even when the user allowed them.
    public_api = OutputHosts("http://1.1.1.1/v1", ["localhost", "127.0.0.1"])
    async with make_session(hosts=public_api) as session:
        with pytest.raises(DownloadError, match="'localhost' resolves to 127.0.0.1") as info:
            await download(session, f"http://localhost:{port}/a.png", tmp_path / "a.png", hosts=public_api)
        assert info.value.permanent
        with pytest.raises(DownloadError, match="'127.0.0.1' is a loopback"):
            await download(session, f"http://127.0.0.1:{port}/a.png", tmp_path / "a.png", hosts=public_api)
    assert plain_host["hits"] == 0
    # The API itself on loopback (the simulator): loopback outputs are fine.
    local_api = OutputHosts(f"http://127.0.0.1:{port + 1}/v1", ["localhost"])
    async with make_session(hosts=local_api) as session:
        got = await download(session, f"http://localhost:{port}/a.png", tmp_path / "a.png", hosts=local_api)
    assert got.size == 1000 and plain_host["hits"] == 1


async def test_the_address_checked_is_the_address_connected_to(plain_host, tmp_path):
    """DNS rebinding: an allowed name whose DNS answers 127.0.0.1 when the connection is made is
    refused by the session's resolver, whatever it answered earlier."""
    hosts = OutputHosts("http://1.1.1.1/v1")
    guarded = hosts.resolver(_Answers("127.0.0.1"))
    with pytest.raises(OSError, match="loopback"):
        await guarded.resolve("files.runcomfy.net", 80)
    # Both kinds in one answer: only the public one may be connected to.
    mixed = await hosts.resolver(_Answers("127.0.0.1", "104.18.0.1", "169.254.169.254")).resolve("a.runcomfy.com")
    assert [r["host"] for r in mixed] == ["104.18.0.1"]
    # End to end: the download never reaches the loopback host behind the allowed name.
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=guarded), auto_decompress=False)
    async with session:
        with pytest.raises(DownloadError, match="resolves to 127.0.0.1") as info:
            await download(session, f"http://files.runcomfy.net:{plain_host['port']}/a.png", tmp_path / "a.png",
                           hosts=hosts)
    assert info.value.permanent and plain_host["hits"] == 0


async def test_the_default_hosts_are_runcomfys_and_the_apis():
    from yarl import URL

    hosts = OutputHosts("https://model-api.runcomfy.net/v1", ["cdn.example.com", "*.example.net"])
    for url in ("https://files.runcomfy.net/x.mp4", "https://a.b.runcomfy.com/x", "https://model-api.runcomfy.net/o",
                "https://cdn.example.com/x", "https://x.example.net/x", "https://FILES.RUNCOMFY.NET./x"):
        assert await hosts.refusal(URL(url)) is None, url
    for url, why in [("https://evil.example.org/x", "not allowed"), ("https://runcomfy.net.evil.org/x", "not allowed"),
                     ("https://evilruncomfy.net/x", "not allowed"), ("http://files.runcomfy.net/x", "not https"),
                     ("https://169.254.169.254/latest", "not allowed"), ("https://example.com/x", "not allowed")]:
        assert why in (await hosts.refusal(URL(url)) or ""), url


async def test_a_declared_size_over_the_cap_is_refused_before_reading(simulator, tmp_path):
    sim = await simulator(duration=0.05, faults=["output_body=huge"])
    started = time.monotonic()
    out, jobs, _ = await _run_downloads(tmp_path, sim, n=2)
    assert out.counts == {"b": {"failed": 2}}
    assert all("over the size cap of 2,147,483,648 bytes (it declares 3,221,225,472)" in job.error
               for job, _ in jobs.values())
    assert sim.calls["download"] == 2 and time.monotonic() - started < 10  # one try each
    assert not list((tmp_path / "work" / "b").glob("*"))


@pytest.mark.parametrize("body", ["bomb", "endless"])
async def test_bytes_received_over_the_cap_are_refused_and_nothing_is_kept(simulator, tmp_path, body):
    sim = await simulator(duration=0.05, faults=[f"output_body={body}"])
    out, jobs, _ = await asyncio.wait_for(_run_downloads(tmp_path, sim, n=1, download_limits=SMALL_CAP), 30)
    assert out.counts == {"b": {"failed": 1}}
    assert all("over the size cap of 1,048,576 bytes (more arrived)" in job.error for job, _ in jobs.values())
    assert sim.calls["download"] == 1
    assert not list((tmp_path / "work" / "b").glob("*"))  # neither a file nor a .part


@pytest.mark.parametrize("body", ["gzip", "gzip_forced"])
async def test_a_gzip_encoded_output_is_downloaded_whole(simulator, tmp_path, body):
    sim = await simulator(duration=0.05, faults=[f"output_body={body}"])
    out, _, _ = await _run_downloads(tmp_path, sim, n=2)
    assert out.counts == {"b": {"succeeded": 2}}
    await check_outputs_match(sim, tmp_path / "work")


async def test_a_download_slower_than_the_least_rate_is_abandoned_and_tried_again(simulator, tmp_path):
    sim = await simulator(duration=0.05, faults=["script.download=trickle"])
    limits = DownloadLimits(min_rate=50_000, rate_window=0.3)
    started = time.monotonic()
    out, _, events = await _run_downloads(tmp_path, sim, n=1, download_limits=limits)
    assert out.counts == {"b": {"succeeded": 1}}
    assert any("download too slow" in e.message for e in events if e.kind == "retry")
    assert sim.calls["download"] == 2 and time.monotonic() - started < 5
    await check_outputs_match(sim, tmp_path / "work")


@pytest.fixture
async def api_answers():
    """A loopback 'API' whose /status answers ``kind``: endless, declared huge, or a gzip bomb."""
    state = {"kind": "endless"}

    async def status(request):
        kind = state["kind"]
        if kind == "declared":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 100 << 20
            await resp.prepare(request)
            await resp.write(b'{"status": "in_queue", "pad": "')
            return resp
        if kind == "bomb":
            from batchgen.simulator.outputs import _bomb

            return web.Response(body=_bomb(), headers={"Content-Encoding": "gzip",
                                                       "Content-Type": "application/json"})
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            await resp.write(b'{"status": "in_queue", "pad": "')
            while True:
                await resp.write(b"x" * 65536)
        except ConnectionError:
            return resp

    app_ = web.Application()
    app_.router.add_get("/v1/requests/{rid}/status", status)
    async with loopback(app_) as root:
        state["url"] = root + "/v1"
        yield state


@pytest.mark.parametrize("kind", ["endless", "declared", "bomb"])
async def test_an_api_answer_of_more_than_a_few_mb_is_refused_not_read_whole(api_answers, kind):
    api_answers["kind"] = kind
    async with RunComfyClient(api_answers["url"], "t") as client:
        with pytest.raises(APIResponseLostError, match="more than the|longer than the"):
            await asyncio.wait_for(client.status("r1"), 20)


async def test_an_output_url_ending_in_sh_is_saved_as_media(simulator, tmp_path):
    sim = await simulator(duration=0.05, faults=["output_ext=sh"])
    out, jobs, _ = await _run_downloads(tmp_path, sim, n=2)
    assert out.counts == {"b": {"succeeded": 2}}
    names = sorted(p.name for p in (tmp_path / "work" / "b").iterdir())
    assert names == sorted(f"{job.key}.mp4" for job, _ in jobs.values())
    await check_outputs_match(sim, tmp_path / "work")


def test_download_settings_in_batchgen_toml(tmp_path):
    from batchgen.config import load_config, parse_size
    from batchgen.errors import UsageError

    assert parse_size("2GiB") == 2 << 30 and parse_size("500 MB") == 500_000_000 and parse_size(10) == 10
    (tmp_path / "batchgen.toml").write_text(
        'output_hosts = ["cdn.example.com", "*.example.net"]\nmax_output_size = "1MiB"\n'
        'min_download_rate = "5KB"\ndownload_rate_window = 30\n')
    settings, _ = load_config(None, tmp_path)
    assert settings == {"output_hosts": ("cdn.example.com", "*.example.net"), "max_output_size": 1 << 20,
                        "min_download_rate": 5000, "download_rate_window": 30}
    for bad in ('output_hosts = "cdn.example.com"', 'output_hosts = ["https://cdn.example.com/"]',
                'max_output_size = "lots"', "max_output_size = 0", "download_rate_window = 0"):
        (tmp_path / "batchgen.toml").write_text(bad + "\n")
        with pytest.raises(UsageError):
            load_config(None, tmp_path)


# --- catalog and balance ---------------------------------------------------------------------------

WAN = "sim/wan-like/image-to-video"


def catalog_manifest(folder, model: str):
    make_image(folder / "a.jpg", 640, 480)
    return write_file(folder / "m.yaml", f"model: {model}\n"
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


# --- inline files ---------------------------------------------------------------------------------


async def test_a_service_with_a_lower_body_limit_fails_the_job_without_an_unknown(tmp_path, simulator):
    """A 413 is a refusal: the job fails once, it is neither unknown nor submitted again."""
    sim = await simulator(faults=["max_body=100000"], duration=0.05)
    make_image(tmp_path / "big.jpg", 640, 480, nbytes=200_000)
    make_image(tmp_path / "small.jpg", 640, 480)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "lim", "jobs": [{"prompt": "big", "image": "big.jpg"},
                                                            {"prompt": "small", "image": "small.jpg"}]}))
    out = await app.run(app.RunOptions(workdir=tmp_path / "work", manifest=path,
                                       target=app.Target(api_url=sim.base_url, token="t"), settings=settings()))
    assert out.summary.finished == {S.FAILED: 1, S.SUCCEEDED: 1}
    assert sim.calls["submit"] == 2
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        (failed,) = await store.jobs(["lim"], [S.FAILED])
    assert failed.inputs["prompt"] == "big" and failed.attempts == 1
    assert "Request body too large: at most 100,000 bytes (error_code 413001)" in (failed.error or "")


# --- store and work directory ---
#
# A real `batchgen run` subprocess against a real simulator on loopback, while the test deletes
# a file of its work directory under it.


async def _start_run(tmp_path, sim, manifest):
    env = {**os.environ, "RUNCOMFY_API_TOKEN": "t"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchgen.cli", "run", str(manifest), "--api-url", sim.base_url,
        "--workdir", str(tmp_path / "work"), "--concurrency", "3", "-q",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def _remove_under_a_run(tmp_path, sim, name):
    """Start a run of 3 jobs; once all are submitted, delete ``name`` from its work directory.
    Returns the run (still going) and its manifest."""
    manifest = image_manifest(tmp_path, sim, "tamper", 3)
    proc = await _start_run(tmp_path, sim, manifest)
    store = tmp_path / "work" / "batchgen.sqlite3"
    for _ in range(1200):  # up to 30 s: a loaded machine starts Python slowly
        await asyncio.sleep(0.025)
        try:
            with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
                if db.execute("SELECT COUNT(*) FROM jobs WHERE request_id IS NOT NULL").fetchone()[0] == 3:
                    break
        except sqlite3.Error:
            continue
    else:
        raise AssertionError("the run never submitted its jobs")
    (tmp_path / "work" / name).unlink()
    return proc, manifest


async def _ends(proc) -> tuple[int, str]:
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, err.decode()


async def test_a_store_deleted_under_a_run_stops_it_with_exit_70_and_is_not_recreated(tmp_path, simulator):
    sim = await simulator(duration=2.0)
    proc, manifest = await _remove_under_a_run(tmp_path, sim, "batchgen.sqlite3")
    code, err = await _ends(proc)
    assert code == 70, err
    assert "was deleted, replaced or emptied while this run was using it" in err and "Traceback" not in err
    # The next run finds the work directory without its store: refused, nothing recreated, and
    # the jobs already paid for are not submitted again.
    code, err = await _ends(await _start_run(tmp_path, sim, manifest))
    assert code == 70 and "is missing" in err and "start over on purpose" in err
    assert not (tmp_path / "work" / "batchgen.sqlite3").exists()
    assert sim.calls["submit"] == 3


async def test_a_second_run_is_refused_though_the_lock_file_was_removed(tmp_path, simulator):
    sim = await simulator(duration=4.0)  # the first run outlasts the second one's start
    first, manifest = await _remove_under_a_run(tmp_path, sim, "batchgen.lock")
    code, err = await _ends(await _start_run(tmp_path, sim, manifest))
    assert code == 4 and "another batchgen run holds" in err, err
    code, err = await _ends(first)
    assert code == 0, err
    assert sim.calls["submit"] == 3


# --- found in review: money paths between the merged changes -------------------------------------


async def test_a_delivered_job_whose_output_was_refused_is_fetched_again_by_retry_not_paid_again(
        simulator, tmp_path):
    """An output on a host not allowed fails its job; once the host is allowed, `retry` asks the
    provider for the result again (request id kept) instead of submitting and paying again."""
    sim = await simulator(duration=0.05, faults=["offhost=1"])
    out, _, _ = await _run_downloads(tmp_path, sim, n=3)
    assert out.counts == {"b": {"failed": 3}}
    opts = options(tmp_path, sim, None, output_hosts=("localhost",))
    opts.batch, opts.retry_states = "b", (S.FAILED,)
    again = await app.run(opts)
    assert again.counts == {"b": {"succeeded": 3}}
    assert sim.calls["submit"] == 3 and set(submissions_per_seed(sim).values()) == {1}
    await check_outputs_match(sim, tmp_path / "work")


async def _counts_of(workdir) -> dict[str, int]:
    async with await Store.open(workdir / "batchgen.sqlite3") as store:
        return (await store.counts()).get("b", {})


async def test_another_users_request_stops_the_run_and_leaves_its_jobs_followed(simulator, tmp_path):
    """A 403001 on a poll (the token is not the one that submitted) is an account matter: the run
    stops (exit 5) with the jobs still at the provider, so no `retry` pays for them again; the
    right token then downloads them."""
    sim = await simulator(duration=1.0)
    path = manifest(tmp_path, sim, 3)
    first = options(tmp_path, sim, path)
    first.settings.deadline = time.time() + 0.4  # stops after submitting, before any finish
    out = await app.run(first)
    assert out.counts == {"b": {"in_queue": 3}} or set(out.counts["b"]) <= {"in_queue", "in_progress"}
    other = options(tmp_path, sim, None)
    other.target.token = "someone-else"
    with pytest.raises(AccountError, match="another user"):  # the CLI's exit 5
        await app.run(other)
    assert set(await _counts_of(tmp_path / "work")) <= {"in_queue", "in_progress"}
    done = await app.run(options(tmp_path, sim, None))
    assert done.counts == {"b": {"succeeded": 3}} and sim.calls["submit"] == 3


@pytest.mark.parametrize("fault", ['garble.cost="n/a"', "model_info=noprice"])
async def test_a_job_ending_without_a_cost_still_counts_against_max_cost(simulator, tmp_path, fault):
    """No readable cost in a result: the job counts at the price when one is known; with no
    price at all, no sum is sure to stay under the cap, so nothing more is sent."""
    faults = [fault] if fault.startswith("garble") else [fault, 'garble.cost="n/a"']
    sim = await simulator(duration=0.05, price_usd=0.10, faults=faults)
    out = await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 6), concurrency=1, max_cost=0.25))
    assert out.summary.stop_reason == "budget"
    assert sim.calls["submit"] == (2 if fault.startswith("garble") else 1)


async def test_an_overdue_job_with_no_price_known_does_not_hold_the_run(simulator, tmp_path):
    """With no price known a capped run waits for a cost; an overdue job will not bring one soon,
    so it ends the wait (and the submits, since its cost is unknown) instead of hanging."""
    sim = await simulator(duration=0.05, faults=["model_info=noprice", "stuck=processing"])
    out = await asyncio.wait_for(app.run(options(
        tmp_path, sim, manifest(tmp_path, sim, 4), max_cost=5.0, job_timeout=0.5)), 30)
    assert out.summary.stop_reason == "budget" and sim.calls["submit"] == 1
