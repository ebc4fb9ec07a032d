"""The simulator speaks the protocol of runcomfy-api.md over real loopback HTTP."""

from __future__ import annotations

import asyncio
import io

import aiohttp
import av
import pytest
from imagefactory import make_image

from batchgen.constants import DEFAULT_MODEL
from batchgen.simulator import FaultConfig
from batchgen.simulator.faults import FAULTS, OUTCOMES, faults_help

H = {"Authorization": "Bearer t"}


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
def image(tmp_path):
    return make_image(tmp_path / "in.jpg", 640, 480)


async def submit(http, sim, image, headers=H, **extra):
    body = {"prompt": "p", "image_urls": [sim.publish_file(image)], **extra}
    async with http.post(f"{sim.base_url}/models/{DEFAULT_MODEL}", json=body, headers=headers) as r:
        return r.status, await r.json()


async def get(http, url, headers=H):
    async with http.get(url, headers=headers) as r:
        return r.status, await r.json()


async def test_submit_status_result_vocabularies(http, simulator, image):
    sim = await simulator(duration=0.2)
    status, body = await submit(http, sim, image)
    assert status == 200 and set(body) == {"request_id", "status_url", "result_url", "cancel_url"}
    assert body["status_url"].startswith("http://127.0.0.1:")
    _, st = await get(http, body["status_url"])
    assert st["status"] in ("in_queue", "in_progress")
    _, res = await get(http, body["result_url"])
    assert res["status"] in ("in_queue", "in_progress") and "output" not in res
    await asyncio.sleep(0.3)
    _, st = await get(http, body["status_url"])
    assert st["status"] == "completed"
    _, res = await get(http, body["result_url"] + "?include_cost=true")
    assert res["status"] == "succeeded" and res["cost"] == 0.1 and res["model_id"] == DEFAULT_MODEL
    assert res["created_at"] and res["finished_at"]
    async with http.get(res["output"]["video"]) as r:
        data = await r.read()
    with av.open(io.BytesIO(data)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == 24 and frames[0].width == 320


async def test_queue_position_and_concurrency(http, simulator, image):
    sim = await simulator(concurrency=2, duration=5)
    ids = [(await submit(http, sim, image, seed=i))[1]["request_id"] for i in range(4)]
    states = [await get(http, f"{sim.base_url}/requests/{i}/status") for i in ids]
    assert [s[1]["status"] for s in states] == ["in_progress", "in_progress", "in_queue", "in_queue"]
    assert [s[1].get("queue_position") for s in states] == [None, None, 1, 2]


async def test_max_queued_refuses_submits_beyond_the_queue_with_429(http, simulator, image):
    # An account running 2, with at most 2 waiting: the 5th submit is refused (nothing created).
    sim = await simulator(concurrency=2, max_queued=2, duration=5)
    answers = [await submit(http, sim, image, seed=i) for i in range(5)]
    assert [a[0] for a in answers] == [200, 200, 200, 200, 429]
    assert answers[4][1]["error_code"] == 429001
    assert len(sim.jobs) == 4 and sim.max_waiting == 2 and sim.refused_queue_full == 1


async def test_stats_report_the_most_jobs_in_flight_per_token(http, simulator, image):
    # Running or waiting both count; finished jobs do not; each token has its own count.
    sim = await simulator(concurrency=1, duration=0.2)
    for i in range(3):
        await submit(http, sim, image, seed=i)
    await asyncio.sleep(0.8)  # all three done
    await submit(http, sim, image, seed=9)
    await submit(http, sim, image, headers={"Authorization": "Bearer other"}, seed=1)
    _, stats = await get(http, f"{sim.root_url}/_sim/stats")
    assert sorted(stats["max_in_flight"].values()) == [1, 3]


async def test_duration_jitter_spreads_run_times_within_the_fraction(http, simulator, image):
    sim = await simulator(concurrency=20, duration=1.0, duration_jitter=0.2, seed=3)
    for i in range(20):
        await submit(http, sim, image, seed=i)
    durations = [j.duration for j in sim.jobs.values()]
    assert all(0.8 <= d <= 1.2 for d in durations)
    assert max(durations) - min(durations) > 0.2  # really spread, not all alike


async def test_cancel_only_while_queued(http, simulator, image):
    sim = await simulator(concurrency=1, duration=5)
    running = (await submit(http, sim, image))[1]
    queued = (await submit(http, sim, image, seed=2))[1]
    async with http.post(queued["cancel_url"], headers=H) as r:
        assert r.status == 202 and (await r.json())["outcome"] == "cancelled"
    async with http.post(running["cancel_url"], headers=H) as r:
        assert (await r.json())["outcome"] == "not_cancellable"
    assert (await get(http, queued["status_url"]))[1]["status"] == "cancelled"
    assert (await get(http, queued["result_url"]))[1]["status"] == "cancelled"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}])
async def test_bad_tokens_get_400004(http, simulator, image, headers):
    sim = await simulator(token="t")
    status, body = await submit(http, sim, image, headers=headers)
    assert status == 400 and body["error_code"] == 400004


async def test_other_users_requests_are_forbidden(http, simulator, image):
    sim = await simulator()
    rid = (await submit(http, sim, image))[1]["request_id"]
    status, body = await get(http, f"{sim.base_url}/requests/{rid}/status", {"Authorization": "Bearer other"})
    assert status == 403 and body["error_code"] == 403001
    status, body = await get(http, f"{sim.base_url}/requests/nope/status")
    assert status == 404 and body["error_code"] == 404001


async def test_model_ids_with_slashes_and_spaces(http, simulator, tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text('{"model_id": "minimax/Hailuo Video 01 Live", "input": {"type": "object", '
                      '"properties": {"prompt": {"type": "string"}}}}')
    sim = await simulator(extra_schemas=[schema])
    async with http.post(f"{sim.base_url}/models/minimax/Hailuo%20Video%2001%20Live",
                         json={"prompt": "p"}, headers=H) as r:
        assert r.status == 200
    status, body = await get(http, f"{sim.base_url}/models/minimax/Hailuo%20Video%2001%20Live")
    assert body["model_id"] == "minimax/Hailuo Video 01 Live" and body["base_price_usd"] == 0.1
    async with http.post(f"{sim.base_url}/models/nobody/nothing", json={}, headers=H) as r:
        assert r.status == 400 and (await r.json())["error_code"] == 400001


async def test_input_validated_like_the_service(http, simulator, tmp_path):
    sim = await simulator()
    small = make_image(tmp_path / "small.jpg", 320, 480)
    status, body = await submit(http, sim, small)
    assert status == 422 and "320 pixels" in body["error_message"]
    status, body = await submit(http, sim, small, frames=99)
    assert "frames" in body["error_message"]


async def test_faults_from_a_script(http, simulator, image):
    sim = await simulator(faults=["script.submit=429,5xx,error200,drop,ok", "retry_after=3"])
    url = f"{sim.base_url}/models/{DEFAULT_MODEL}"
    body = {"prompt": "p", "image_urls": [sim.publish_file(image)]}
    async with http.post(url, json=body, headers=H) as r:
        assert r.status == 429 and r.headers["Retry-After"] == "3"
    async with http.post(url, json=body, headers=H) as r:
        assert r.status == 502 and "html" in r.headers["Content-Type"]
    async with http.post(url, json=body, headers=H) as r:
        assert r.status == 200 and (await r.json())["error_code"] == 500001
    with pytest.raises(aiohttp.ClientError):
        async with http.post(url, json=body, headers=H) as r:
            await r.read()
    async with http.post(url, json=body, headers=H) as r:
        assert r.status == 200
    listed = sim.requests()
    # Only the dropped submit and the good one created jobs.
    assert len(listed["requests"]) == 2 and listed["calls"]["submit"] == 5


async def test_failed_jobs_truncated_and_expiring_downloads(http, simulator, image):
    sim = await simulator(duration=0, faults=["fail=1"])
    rid = (await submit(http, sim, image))[1]["request_id"]
    _, res = await get(http, f"{sim.base_url}/requests/{rid}/result")
    assert res["status"] == "failed" and res["error"] and "output" not in res

    sim = await simulator(duration=0, faults=["script.download=truncate", "expire=1"])
    rid = (await submit(http, sim, image))[1]["request_id"]
    _, res = await get(http, f"{sim.base_url}/requests/{rid}/result")
    url = res["output"]["video"]
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.get(url) as r:
            await r.read()
    async with http.get(url, headers={"Range": "bytes=10-"}) as r:
        assert r.status == 206 and r.headers["Content-Range"].startswith("bytes 10-")
    await asyncio.sleep(1.1)
    async with http.get(url) as r:
        assert r.status == 403
    _, res = await get(http, f"{sim.base_url}/requests/{rid}/result")
    async with http.get(res["output"]["video"]) as r:
        assert r.status == 200


async def test_insufficient_balance(http, simulator, image):
    sim = await simulator(balance_usd=0.25)
    codes = [(await submit(http, sim, image, seed=i))[1].get("error_code") for i in range(3)]
    assert codes == [None, None, 400002]


@pytest.mark.parametrize(
    ("spec", "message"),
    [("429", "NAME=VALUE"), ("429=2", "between 0 and 1"), ("nope=1", "unknown fault"),
     ("script.submit=boom", "unknown outcome"), ("slow=x", "not a number")],
)
def test_bad_fault_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        FaultConfig.parse([spec])


@pytest.mark.parametrize("fault", FAULTS, ids=lambda f: f.name)
def test_every_fault_listed_is_one_the_parser_reads(fault):
    """FAULTS is what `--help` lists and what the parser accepts: each example changes the config."""
    assert FaultConfig.parse([fault.example]) != FaultConfig()
    assert f"{fault.name}={fault.value}" in faults_help(200)


def test_a_fault_not_listed_is_refused_with_the_list():
    with pytest.raises(ValueError, match="unknown fault 'slowness'") as caught:
        FaultConfig.parse(["slowness=1"])
    assert all(f.name in str(caught.value) for f in FAULTS)
    assert all(o in faults_help(200) for o in OUTCOMES)
