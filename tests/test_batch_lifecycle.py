"""A batch's life after its first run: cancelled while a run goes on, retried with its history
kept. Real processes where the point is about processes: a `batchgen run` subprocess against a
simulator on loopback, and a `batchgen cancel` subprocess beside it."""

from __future__ import annotations

import asyncio
import os
import sys
import time

from conftest import image_manifest

from batchgen import app
from batchgen import store as S
from batchgen.store import Store


def _env() -> dict[str, str]:
    return {**os.environ, "RUNCOMFY_API_TOKEN": "t"}


async def _batchgen(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchgen.cli", *args, env=_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def _until(cond, seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


# --- cancel during a run ---


async def test_cancel_from_a_second_process_reaches_the_running_run(tmp_path, simulator):
    # Two jobs run at a time at the provider; the run keeps three in flight, so one waits in the
    # provider's queue and three are still pending when the cancel comes.
    sim = await simulator(concurrency=2, duration=4.0)
    manifest = image_manifest(tmp_path, sim, "night", 6)
    work = str(tmp_path / "work")
    run = await _batchgen("run", str(manifest), "--api-url", sim.base_url, "--workdir", work,
                          "--concurrency", "3", "-q")
    try:
        await _until(lambda: len(sim.requests()["requests"]) == 3, 30, "three submits")
        cancel = await _batchgen("cancel", "night", "--api-url", sim.base_url, "--workdir", work)
        out, err = await asyncio.wait_for(cancel.communicate(), 30)
        assert cancel.returncode == 0, err.decode()
        assert "3 not submitted and cancelled" in out.decode()
        asked = time.monotonic()
        # The running process cancels the queued job at the provider within two seconds.
        await _until(lambda: any(r["status"] == "cancelled" for r in sim.requests()["requests"]),
                     10, "the queued job cancelled at the provider")
        assert time.monotonic() - asked < 2.5
        _, err = await asyncio.wait_for(run.communicate(), 60)
    finally:
        if run.returncode is None:
            run.kill()
            await run.wait()
    assert run.returncode == 1, err.decode()  # cancelled jobs are not a success
    assert len(sim.requests()["requests"]) == 3  # nothing submitted after the cancel
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        counts = (await store.counts(["night"]))["night"]
        assert await store.cancel_requests() == {}  # carried out: a retry starts afresh
    # The two already running are followed to their end (they are paid for).
    assert counts == {S.SUCCEEDED: 2, S.CANCELLED: 4}


async def test_a_cancelled_batch_is_resumed_by_retry_cancelled(tmp_path, simulator):
    sim = await simulator(concurrency=2, duration=0.1)
    manifest = image_manifest(tmp_path, sim, "night", 4)
    work = str(tmp_path / "work")
    async with await Store.open(app.store_path(tmp_path / "work")) as store:
        await store.upsert_batch("night", "m", None, {})
        # A cancel recorded while no job ran yet (as a `batchgen cancel` beside a run leaves it).
        await store.request_cancel("night")
    run = await _batchgen("run", str(manifest), "--api-url", sim.base_url, "--workdir", work, "-q")
    _, err = await asyncio.wait_for(run.communicate(), 60)
    # The request is read at once: every job of the batch is cancelled, none submitted.
    assert run.returncode == 1, err.decode()
    assert sim.requests()["requests"] == []
    retry = await _batchgen("retry", "night", "--cancelled", "--api-url", sim.base_url,
                            "--workdir", work, "-q")
    _, err = await asyncio.wait_for(retry.communicate(), 60)
    assert retry.returncode == 0, err.decode()
    assert len(sim.requests()["requests"]) == 4
