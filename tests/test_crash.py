"""Pull the plug: a real `batchgen run` subprocess is killed with SIGKILL at exact moments and at
random times, restarted each time, and must end with every job done exactly once."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import sys

import pytest
from conftest import image_manifest

from batchgen import crashpoints
from batchgen import store as S
from batchgen.store import Store

N = 6


async def start_run(tmp_path, sim, manifest, crash: str | None = None, *extra: str):
    env = {**os.environ, "RUNCOMFY_API_TOKEN": "t", "BATCHGEN_CRASH_AT": crash or ""}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchgen.cli", "run", str(manifest), "--api-url", sim.base_url,
        "--workdir", str(tmp_path / "work"), "--concurrency", "3", "-q", *extra,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


def write_manifest(tmp_path, sim):
    return image_manifest(tmp_path, sim, "crash", N)


async def finish(tmp_path, sim, manifest):
    """Run until a run ends on its own; return its exit code."""
    for _ in range(5):
        proc = await start_run(tmp_path, sim, manifest)
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        if proc.returncode in (0, 1):
            return proc.returncode, err.decode()
    raise AssertionError(f"run did not finish: {proc.returncode} {err.decode()}")


async def check_invariants(tmp_path, sim, expect_unknown: int, never_sent: int | None = 0):
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        jobs = await store.jobs(["crash"])
        counts = await store.counts(["crash"])
        outs = {j.key: await store.outputs(j.id) for j in jobs}
    assert counts["crash"].get(S.UNKNOWN, 0) == expect_unknown, counts
    assert counts["crash"].get(S.SUCCEEDED, 0) == N - expect_unknown, counts
    per_seed: dict[int, int] = {}
    for r in sim.requests()["requests"]:
        per_seed[r["input"]["seed"]] = per_seed.get(r["input"]["seed"], 0) + 1
    assert all(n == 1 for n in per_seed.values()), per_seed  # never submitted twice
    if never_sent is not None:
        assert len(per_seed) == N - never_sent
    for job in jobs:
        if job.state != S.SUCCEEDED:
            continue
        (out,) = outs[job.key]
        data = (tmp_path / "work" / out.path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == out.sha256
        assert out.sha256 == hashlib.sha256(sim.output_bytes(job.request_id)).hexdigest()
        assert not list((tmp_path / "work").rglob("*.part"))


# 'result_recorded' is not on a job's usual route (one output, a download slot free: the file is
# fetched first, then recorded with the result in one write); the next test takes it.
@pytest.mark.parametrize("point", [p for p in crashpoints.POINTS if p != "result_recorded"])
@pytest.mark.parametrize("nth", [1, 3])
async def test_sigkill_at_each_moment(tmp_path, simulator, point, nth):
    sim = await simulator(concurrency=2, duration=0.2)
    await sigkill_and_finish(tmp_path, sim, point, nth)


@pytest.mark.parametrize("point", ["result_recorded", "download_done", "job_succeeded"])
@pytest.mark.parametrize("nth", [1, 3])
async def test_sigkill_after_a_failed_download(tmp_path, simulator, point, nth):
    """The other route to a file: the result recorded first ('downloading'), then the file, then
    the job's success. Every job's first download breaks off half way (all six finish together,
    long before the first retry), which sends each down this route."""
    sim = await simulator(concurrency=N, duration=0.2, faults=[f"script.download={','.join(['truncate'] * N)}"])
    await sigkill_and_finish(tmp_path, sim, point, nth, "--concurrency", str(N), recorded_route=True)


async def sigkill_and_finish(tmp_path, sim, point: str, nth: int, *extra: str,
                             recorded_route: bool = False) -> None:
    manifest = write_manifest(tmp_path, sim)
    proc = await start_run(tmp_path, sim, manifest, f"{point}:{nth}", *extra)
    await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -signal.SIGKILL, f"{point}:{nth} was never reached"
    if recorded_route:  # the kill found results recorded ahead of their files
        assert await jobs_in(tmp_path, S.DOWNLOADING) >= 1
    # Jobs caught between their committed intent and a recorded request id: their submit may or
    # may not have reached the API, so the next run must make them unknown, not resubmit them.
    caught = await jobs_in(tmp_path, S.SUBMITTING)
    if point in ("claimed", "submit_answered"):
        assert caught >= 1
    code, err = await finish(tmp_path, sim, manifest)
    assert code == (1 if caught else 0), err
    await check_invariants(tmp_path, sim, caught, never_sent=None)


async def jobs_in(tmp_path, state: str) -> int:
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        return (await store.counts(["crash"])).get("crash", {}).get(state, 0)


async def test_sigkill_at_random_times(tmp_path, simulator):
    rng = random.Random(1234)
    # Jobs long enough that the batch outlives several kills (each run polls sooner than the
    # last, having learned the duration, so short jobs would finish before the third kill).
    sim = await simulator(concurrency=2, duration=0.8)
    manifest = write_manifest(tmp_path, sim)
    kills = 0
    for _ in range(8):
        proc = await start_run(tmp_path, sim, manifest)
        try:
            await asyncio.wait_for(proc.wait(), rng.uniform(0.2, 1.2))
            break  # finished before the kill
        except TimeoutError:
            proc.kill()
            await proc.wait()
            kills += 1
    await finish(tmp_path, sim, manifest)
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        unknown = (await store.counts(["crash"]))["crash"].get(S.UNKNOWN, 0)
    assert kills >= 3
    await check_invariants(tmp_path, sim, unknown, never_sent=None)


async def test_sigint_stops_promptly_and_resumes(tmp_path, simulator):
    sim = await simulator(concurrency=2, duration=1.0)
    manifest = write_manifest(tmp_path, sim)
    proc = await start_run(tmp_path, sim, manifest)
    while len(sim.requests()["requests"]) < 2:
        await asyncio.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 3, err.decode()
    code, _ = await finish(tmp_path, sim, manifest)
    assert code == 0
    await check_invariants(tmp_path, sim, 0)


async def test_second_run_on_the_same_workdir_is_refused(tmp_path, simulator):
    sim = await simulator(concurrency=1, duration=2.0)
    manifest = write_manifest(tmp_path, sim)
    first = await start_run(tmp_path, sim, manifest)
    while not sim.requests()["requests"]:
        await asyncio.sleep(0.05)
    second = await start_run(tmp_path, sim, manifest)
    _, err = await asyncio.wait_for(second.communicate(), 30)
    assert second.returncode == 4
    assert f"pid {first.pid}" in err.decode() and "holds" in err.decode()
    first.kill()
    await first.wait()
    # The dead run's lock does not block the next one.
    code, _ = await finish(tmp_path, sim, manifest)
    assert code == 0


async def test_second_sigint_exits_at_once(tmp_path, simulator):
    import time

    sim = await simulator(duration=0.2, faults=["script.submit=slow", "slow_seconds=5"])
    manifest = write_manifest(tmp_path, sim)
    proc = await start_run(tmp_path, sim, manifest)
    while not sim.calls["submit"]:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # the first waits for the submit on the wire (5 s) ...
    await asyncio.sleep(0.3)
    assert proc.returncode is None
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)  # ... the second does not
    await asyncio.wait_for(proc.wait(), 5)
    assert proc.returncode == 3 and time.monotonic() - started < 2
    await asyncio.sleep(5)  # the slow submit completes at the provider anyway
    code, _ = await finish(tmp_path, sim, manifest)
    assert code == 1  # that job's outcome was lost with the process: unknown, not resubmitted
    await check_invariants(tmp_path, sim, expect_unknown=1, never_sent=None)
