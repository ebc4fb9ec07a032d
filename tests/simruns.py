"""Runs against a simulator, as the runner's tests make them: quick settings, a manifest of
``n`` jobs on one image the simulator serves, the options of a run, and checks of what a run
left (outputs, submits per seed, each job's history). Shared by the test files of the runner,
durability, hostile answers, inline files, reports and the gallery."""

from __future__ import annotations

import hashlib

import yaml
from conftest import events
from imagefactory import make_image

from batchgen import app
from batchgen import store as S
from batchgen.retry import RetryPolicy
from batchgen.runner import RunSettings
from batchgen.store import Store

FAST = RetryPolicy(base=0.01, cap=0.05, retry_after_cap=0.05)


def settings(**kw) -> RunSettings:
    kw.setdefault("concurrency", 4)
    kw.setdefault("rate", 0)
    kw.setdefault("first_poll_delay", 0.05)
    kw.setdefault("min_poll_interval", 0.02)
    kw.setdefault("max_poll_interval", 0.2)
    return RunSettings(policy=kw.pop("policy", FAST), **kw)


def manifest(tmp_path, sim, n: int, name: str = "b") -> object:
    image = make_image(tmp_path / "in.jpg", 640, 480)
    url = sim.publish_file(image)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "defaults": {"image": url},
        "jobs": [{"prompt": f"job {i}", "seed": i} for i in range(n)],
    }))
    return path


def options(tmp_path, sim, path, **kw) -> app.RunOptions:
    return app.RunOptions(
        workdir=tmp_path / "work", manifest=path,
        target=app.Target(api_url=sim.base_url, token="t"), settings=settings(**kw),
    )


async def outputs_by_job(workdir):
    async with await Store.open(workdir / "batchgen.sqlite3") as store:
        jobs = await store.jobs()
        return {j.key: (j, await store.outputs(j.id)) for j in jobs}


def submissions_per_seed(sim) -> dict[int, int]:
    counts: dict[int, int] = {}
    for r in sim.requests()["requests"]:
        counts[r["input"]["seed"]] = counts.get(r["input"]["seed"], 0) + 1
    return counts


async def check_outputs_match(sim, workdir):
    served = {r["request_id"]: sim.output_bytes(r["request_id"]) for r in sim.requests()["requests"]}
    for job, outs in (await outputs_by_job(workdir)).values():
        if job.state != S.SUCCEEDED:
            continue
        assert outs, job.key
        for out in outs:
            data = (workdir / out.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == out.sha256 == hashlib.sha256(
                served[job.request_id]).hexdigest()


async def job_histories(workdir) -> dict[str, list[str]]:
    async with await Store.open(workdir / "batchgen.sqlite3") as store:
        return {j.key: [e[2] for e in await events(store, j.id)] for j in await store.jobs()}
