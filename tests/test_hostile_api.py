"""Hostile and broken API scenarios, each against the simulator (or a port nobody answers on) over
real loopback HTTP, with a real store file. One section per area."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from click.testing import CliRunner
from conftest import SAMPLES, loopback
from imagefactory import make_image
from test_runner import manifest, options, settings, submissions_per_seed

from batchgen import app
from batchgen.cli import EXIT_INTERRUPTED, EXIT_REFUSED, main
from batchgen.client import RunComfyClient
from batchgen.constants import DEFAULT_MODEL
from batchgen.runner import Runner
from batchgen.schema import find_schema
from batchgen.simulator import FaultConfig, SimConfig, Simulator
from batchgen.store import Store

# --- submit money ---


async def _recorded(path, jobs: list[dict], model_id: str = DEFAULT_MODEL) -> None:
    """A store holding batch 'b' with these jobs' inputs, recorded as a manifest would have been
    (without the validation, which would refuse what these tests want the API to refuse)."""
    async with await Store.open(path) as store:
        await store.upsert_batch("b", model_id, None, {})
        await store.add_rows("b", [(f"k{i}", i, model_id, f"row {i}", json.dumps(inputs), "{}")
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
    path = _cli_manifest(tmp_path, image_base_url="https://cdn.example.com/in")
    result = CliRunner().invoke(main, [
        "run", path, "--api-url", f"http://127.0.0.1:{_closed_port()}/v1", "--outage-budget", "1s",
    ], env={"RUNCOMFY_API_TOKEN": "t"})
    assert result.exit_code == EXIT_INTERRUPTED, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "unreachable" in errors[0] and "run again" in errors[0]
