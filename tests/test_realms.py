"""Simulated results are never taken for real ones: the README's path from --simulate to the API,
a batch that follows one API, and a simulator that replays its saved jobs at their own times."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sqlite3
import sys
import time

import aiohttp
import pytest
from imagefactory import make_image

from batchgen import app
from batchgen.errors import UsageError
from batchgen.runner import RunSettings
from batchgen.simulator import SimConfig, Simulator

TOKEN = "user-token"


async def batchgen(*args: str, token: bool = False) -> tuple[int, str]:
    """`batchgen ARGS` as a user types it (a real process); (exit code, stdout + stderr)."""
    env = {**os.environ}
    if token:
        env["RUNCOMFY_API_TOKEN"] = TOKEN
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchgen.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode()


def fingerprint(folder):
    """Each output file's (name, inode, mtime, sha256): what must not change."""
    return sorted((p.name, p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
                  for p in folder.glob("*.mp4"))


async def test_the_quick_start_then_the_api_submits_everything_and_simulate_never_touches_real_outputs(
        samples, simulator):
    # The quick start exactly as the README has it: its local images go inline to the API.
    manifest = samples / "quickstart.yaml"
    api = await simulator(token=TOKEN, duration=0.2)  # a simulator started apart, as the API

    code, out = await batchgen("run", str(manifest), "--simulate", "-c", "6")
    assert code == 0 and "6 new job(s) recorded, 6 submitted" in out, out

    code, out = await batchgen("run", str(manifest), "--api-url", api.base_url, "-c", "6", token=True)
    assert code == 0, out
    assert "6 new job(s) recorded, 6 submitted" in out and "quickstart: 6 succeeded" in out
    assert api.calls["submit"] == 6
    real = fingerprint(samples.parent / "jobs" / "quickstart")
    assert len(real) == 6
    served = {hashlib.sha256(api.output_bytes(r["request_id"])).hexdigest()
              for r in api.requests()["requests"]}
    assert {f[3] for f in real} <= served

    code, out = await batchgen("run", str(manifest), "--simulate", "-c", "6")
    assert code == 0 and "0 submitted" in out, out
    assert fingerprint(samples.parent / "jobs" / "quickstart") == real
    code, out = await batchgen("run", str(manifest), "--api-url", api.base_url, token=True)
    assert code == 0 and "0 submitted" in out and api.calls["submit"] == 6, out

    # status, report and gallery say which results are simulated.
    code, out = await batchgen("status")
    assert code == 0, out
    real_part, sim_part = out.split("quickstart  (", 2)[1:]
    assert "$0.60 spent" in real_part and f"api: {api.base_url}" in real_part and "simulated" not in real_part
    assert "simulated: nothing spent" in sim_part
    assert "simulated: placeholder outputs of the built-in simulator, in jobs/simulated/quickstart" in sim_part
    data = json.loads((await batchgen("status", "--json"))[1])
    assert [(b["name"], b["simulated"], b["apis"]) for b in data["batches"]] == [
        ("quickstart", False, [api.base_url]), ("quickstart", True, ["simulator"])]

    code, out = await batchgen("report", "quickstart", "-o", "real.json")
    rows = json.loads((samples.parent / "real.json").read_text())
    assert code == 0 and {(r["simulated"], r["api"]) for r in rows} == {(False, api.base_url)}
    code, out = await batchgen("report", "quickstart", "--simulated", "-o", "sim.json")
    rows = json.loads((samples.parent / "sim.json").read_text())
    assert code == 0 and "simulated" in out and {(r["simulated"], r["api"]) for r in rows} == {(True, "simulator")}

    code, out = await batchgen("gallery", "quickstart")
    page = (samples.parent / "jobs" / "quickstart" / "gallery.html").read_text()
    # The page's script draws the cards, each with a "simulated" badge when its config says so.
    assert code == 0 and "Simulated:" not in page and _page_config(page)["simulated"] is False
    code, out = await batchgen("gallery", "quickstart", "--simulated")
    page = (samples.parent / "jobs" / "simulated" / "quickstart" / "gallery.html").read_text()
    assert code == 0 and "Simulated: every output on this page is a placeholder" in page
    assert _page_config(page)["simulated"] is True


async def test_an_api_url_without_its_v1_stops_at_the_first_submit_and_the_fixed_url_submits_each_job_once(
        samples, simulator):
    # The first real night's likeliest slip: the API's host without its /v1. Every submit meets a
    # bare 404 (no such endpoint): the run stops at once saying what to fix, nothing is failed,
    # and the run with the right URL submits every job, once.
    manifest = samples / "quickstart.yaml"
    api = await simulator(token=TOKEN, duration=0.2)
    assert api.base_url.endswith("/v1")
    code, out = await batchgen("run", str(manifest), "--api-url", api.base_url[:-3], "-c", "2", token=True)
    assert code == 6, out
    assert "check --api-url (the API's base, ending in /v1" in out and "the jobs are still pending" in out
    assert "Traceback" not in out and "failed" not in out.split("quickstart:")[-1], out
    assert api.calls["submit"] == 0
    code, out = await batchgen("run", str(manifest), "--api-url", api.base_url, "-c", "6", token=True)
    assert code == 0 and "quickstart: 6 succeeded" in out, out
    assert api.calls["submit"] == 6


async def test_a_batch_follows_one_api(tmp_path, simulator):
    """Request ids and results belong to the API that gave them: a run against another API
    neither counts them as done nor polls them there; it is refused before anything is sent."""
    first, other = await simulator(), await simulator()
    image = first.publish_file(make_image(tmp_path / "in.jpg", 640, 480))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: one\njobs:\n  - prompt: p\n    image: {image}\n")

    def opts(sim):
        return app.RunOptions(workdir=tmp_path / "work", manifest=manifest,
                              target=app.Target(api_url=sim.base_url, token="t"),
                              settings=RunSettings(concurrency=2))

    done = await app.run(opts(first))
    assert done.counts == {"one": {"succeeded": 1}}
    with pytest.raises(UsageError, match=f"1 job\\(s\\) were submitted to {first.base_url}, and this run is "
                                         f"against {other.base_url}"):
        await app.run(opts(other))
    assert other.calls["submit"] == 0 and other.calls["status"] == 0


async def test_a_restarted_simulator_replays_its_jobs_at_their_own_times(tmp_path):
    """32 jobs of earlier runs are long finished when the simulator starts again: a new job starts
    at once, and the old ones keep the times they had (no made-up queue wait)."""
    state = tmp_path / "simulator-state.jsonl"
    owner = hashlib.sha256(TOKEN.encode()).hexdigest()[:16]
    hour_ago = time.time() - 3600
    with state.open("w") as fh:
        for i in range(32):
            fh.write(json.dumps({"job": {
                "id": f"old-{i}", "owner": owner, "model_id": "bytedance/dreamina-3-0/pro/image-to-video",
                "input": {"prompt": f"p{i}"}, "submitted_at": hour_ago + i, "duration": 2.0,
                "will_fail": False, "media_key": "k", "media": [None, "video", 121], "image_path": None,
            }}) + "\n")
    sim = Simulator(SimConfig(token=TOKEN, concurrency=4, duration=2.0, state_file=state,
                              validate_inputs=False))
    await sim.start()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            async with http.post(f"{sim.base_url}/models/bytedance/dreamina-3-0/pro/image-to-video",
                                 json={"prompt": "new", "image_urls": ["https://x.example/a.jpg"]}) as r:
                rid = (await r.json())["request_id"]
            async with http.get(f"{sim.base_url}/requests/{rid}/status") as r:
                assert (await r.json())["status"] == "in_progress"  # not behind 32 old jobs
        listed = {r["request_id"]: r for r in sim.requests()["requests"]}
        for i in range(32):
            old = listed[f"old-{i}"]
            assert old["status"] == "completed"
            # One a second, four slots, two seconds each: every one started as it was submitted.
            assert old["started_at"] == pytest.approx(hour_ago + i)
            assert old["finished_at"] == pytest.approx(hour_ago + i + 2.0)
    finally:
        await sim.stop()


async def test_simulated_jobs_of_an_older_batchgen_in_the_apis_store_are_run_against_the_api(
        tmp_path, simulator):
    """Before simulated results were kept apart, --simulate shared the API's store: the jobs the
    simulator's saved state names are run again against the API, once."""
    api = await simulator()
    image = api.publish_file(make_image(tmp_path / "in.jpg", 640, 480))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"name: old\njobs:\n  - prompt: p\n    image: {image}\n  - prompt: q\n    image: {image}\n")
    work = tmp_path / "work"
    await app.run(app.RunOptions(workdir=work, manifest=manifest, target=app.Target(simulate=True),
                                 settings=RunSettings(concurrency=2)))
    # The layout of the older batchgen: everything in the work directory itself, no API recorded.
    for entry in (work / "simulated").iterdir():
        entry.rename(work / entry.name)
    with sqlite3.connect(work / "batchgen.sqlite3") as db:
        db.execute("UPDATE jobs SET api = NULL")
    db.close()

    opts = app.RunOptions(workdir=work, manifest=manifest, target=app.Target(api_url=api.base_url, token="t"),
                          settings=RunSettings(concurrency=2))
    done = await app.run(opts)
    assert done.summary.submitted == 2 == api.calls["submit"]
    assert done.counts == {"old": {"succeeded": 2}}
    assert not (work / "simulator-state.jsonl").exists()
    assert (await app.run(opts)).summary.submitted == 0


def test_no_batch_can_take_the_simulated_runs_folder():
    from batchgen.manifest import batch_name_problem

    assert "reserved" in batch_name_problem("simulated") and "reserved" in batch_name_problem("Simulated")


def _page_config(page: str) -> dict[str, object]:
    import html
    import re

    found = re.search(r'<main id="grid" data-config="([^"]*)"', page)
    assert found, "no config on the page"
    return dict(json.loads(html.unescape(found.group(1))))


async def test_open_batch_opens_the_store_that_holds_it_real_results_first(tmp_path):
    # The one "open the store and require the batch" of report, gallery and forget.
    from batchgen.store import Store
    from batchgen.workdir import realm, store_path

    for simulated, names in ((False, ["a"]), (True, ["a", "s"])):
        async with await Store.open(store_path(realm(tmp_path, simulated))) as store:
            for name in names:
                await store.upsert_batch(name, "m/x", None, {})
    for batch, simulated, found_in in (("a", None, False), ("s", None, True), ("a", True, True)):
        async with app.open_batch(tmp_path, batch, simulated) as found:
            assert (found.batch.name, found.simulated) == (batch, found_in)
            assert found.root == realm(tmp_path, found_in).resolve()
            assert await found.store.counts([batch]) == {}  # open for the block
    with pytest.raises(UsageError, match=r"no batch named 'nope' .*known: a, a \(simulated\), s \(simulated\)"):
        async with app.open_batch(tmp_path, "nope"):
            pass
