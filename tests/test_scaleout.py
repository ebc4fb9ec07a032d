"""Several `batchgen run` processes on one PostgreSQL store and one simulator account (issue 20):
a runner killed mid-batch, a cancel from another process, the account's cap across runners, and
every command against the shared store. Real processes, a real server, a real simulator."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import image_manifest
from test_batch_lifecycle import _until

from batchgen import store as S
from batchgen.store import Store

CAP = 16  # the account: jobs at once at the simulator, and the cap every runner shares
# The runners' lease TTL: shorter than the real one (a killed or paused runner's jobs are taken
# back that much sooner), still five missed renewals on a busy test machine.
TTL = 10


def _env() -> dict[str, str]:
    return {**os.environ, "RUNCOMFY_API_TOKEN": "t", "BATCHGEN_LEASE_TTL": str(TTL)}


async def _batchgen(url: str, outputs: Path, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchgen.cli", "--store", url, "--outputs", str(outputs), *args,
        env=_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def _runners(n: int, url: str, outputs: Path, manifest: Path, sim, tmp_path: Path):
    return [await _batchgen(url, outputs, "--account-concurrency", str(CAP), "run", str(manifest),
                            "--api-url", sim.base_url, "--workdir", str(tmp_path / f"w{i}"),
                            "--concurrency", str(CAP), "-q") for i in range(n)]


async def _reap(procs) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = await asyncio.wait_for(p.communicate(), 240)
        finally:
            if p.returncode is None:
                p.kill()
                await p.wait()
        out.append((p.returncode, err.decode()))
    return out


@pytest.mark.timeout(400)
async def test_three_runners_one_killed_finish_every_job_once_within_the_account_cap(tmp_path, simulator, pg_url):
    sim = await simulator(concurrency=CAP, duration=0.3)
    manifest = image_manifest(tmp_path, sim, "fleet", 300)
    outputs = tmp_path / "shared-outputs"
    procs = await _runners(3, pg_url, outputs, manifest, sim, tmp_path)
    try:
        await _until(lambda: len(sim.requests()["requests"]) >= 60, 120, "60 submits")
        procs[0].send_signal(signal.SIGKILL)  # not restarted
        results = await _reap(procs[1:])
        await procs[0].wait()
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    for code, err in results:
        assert code in (0, 1), err  # 1: some job ended unknown (caught mid-submit by the kill)

    async with await Store.open(pg_url) as store:
        counts = (await store.counts(["fleet"]))["fleet"]
        jobs = await store.jobs(["fleet"])
        unknown = counts.get(S.UNKNOWN, 0)
        assert counts.get(S.SUCCEEDED, 0) + unknown == 300, counts
        assert unknown <= CAP  # at most the killed runner's submits on the wire
        # Each job submitted at most once, per the simulator; each succeeded one exactly once.
        sent = Counter(r["input"]["seed"] for r in sim.requests()["requests"])
        assert max(sent.values()) == 1
        by_id = {r["request_id"]: r for r in sim.requests()["requests"]}
        for job in jobs:
            if job.state == S.SUCCEEDED:
                assert job.request_id in by_id
                assert by_id[job.request_id]["input"]["seed"] == job.inputs["seed"]
        # Every output whole under the shared root, as recorded.
        checked = 0
        for job in jobs:
            for out in await store.outputs(job.id):
                if job.state != S.SUCCEEDED:
                    continue
                data = (outputs / out.path).read_bytes()
                assert len(data) == out.size and hashlib.sha256(data).hexdigest() == out.sha256
                checked += 1
        assert checked >= 300 - unknown
    # The account's cap held across the three runners (and the kill).
    assert max(sim.max_in_flight.values()) <= CAP


@pytest.mark.timeout(300)
async def test_cancel_from_a_fourth_process_stops_every_runners_submits_within_two_seconds(
        tmp_path, simulator, pg_url):
    sim = await simulator(concurrency=CAP, duration=1.0)
    manifest = image_manifest(tmp_path, sim, "night", 300)
    outputs = tmp_path / "out"
    procs = await _runners(3, pg_url, outputs, manifest, sim, tmp_path)
    try:
        await _until(lambda: len(sim.requests()["requests"]) >= 2 * CAP, 120, "two waves of submits")
        cancel = await _batchgen(pg_url, outputs, "cancel", "night", "--api-url", sim.base_url,
                                 "--workdir", str(tmp_path / "w9"))
        out, err = await asyncio.wait_for(cancel.communicate(), 60)
        asked = time.time()
        assert cancel.returncode == 0, err.decode()
        assert "not submitted and cancelled" in out.decode()
        results = await _reap(procs)
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
    requests = sim.requests()["requests"]
    assert max(r["submitted_at"] for r in requests) < asked + 2.0
    assert len(requests) < 300
    for code, err in results:
        assert code in (0, 1, 3), err  # 3: stopped by the cancel, as a run on SQLite
    async with await Store.open(pg_url) as store:
        counts = (await store.counts(["night"]))["night"]
    assert counts.get(S.CANCELLED, 0) >= 300 - len(requests)
    assert set(counts) <= {S.SUCCEEDED, S.CANCELLED}


async def _cli(url: str, outputs: Path, *args: str) -> tuple[int, str]:
    proc = await _batchgen(url, outputs, *args)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode() + err.decode()


async def test_every_command_works_on_the_shared_store_from_another_work_directory(tmp_path, simulator, pg_url):
    sim = await simulator(concurrency=4, duration=0.1, faults=["fail=0.5"], seed=3)
    manifest = image_manifest(tmp_path, sim, "small", 6)
    outputs = tmp_path / "shared"
    api = ["--api-url", sim.base_url]
    here, there = ["--workdir", str(tmp_path / "machine-a")], ["--workdir", str(tmp_path / "machine-b")]
    code, out = await _cli(pg_url, outputs, "validate", str(manifest))
    assert code == 0 and "6 job(s), all valid" in out, out
    code, out = await _cli(pg_url, outputs, "plan", str(manifest), *api, *here)
    assert code == 0 and "would submit: 6" in out, out
    code, out = await _cli(pg_url, outputs, "run", str(manifest), *api, *here, "-q")
    assert code == 1 and "failed" in out, out  # half the jobs fail at the provider
    # Another machine (work directory) sees the same store and the same files.
    code, out = await _cli(pg_url, outputs, "status", *there)
    assert code == 0 and "small" in out and f"outputs: {outputs / 'small'}" in out, out
    code, out = await _cli(pg_url, outputs, "report", "small", "-o", str(tmp_path / "r.csv"), *there)
    assert code == 0 and "6 job(s) of small" in out, out
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 7
    code, out = await _cli(pg_url, outputs, "gallery", "small", *there)
    assert code == 0 and (outputs / "small" / "gallery.html").exists(), out
    code, out = await _cli(pg_url, outputs, "retry", "small", *api, *there, "-q")
    assert code in (0, 1) and "submitted" in out, out
    code, out = await _cli(pg_url, outputs, "forget", "small", "--state", "failed", "--yes", *there)
    assert code == 0, out
    async with await Store.open(pg_url) as store:
        counts = (await store.counts(["small"]))["small"]
        assert set(counts) == {S.SUCCEEDED}
        for job in await store.jobs(["small"]):
            for o in await store.outputs(job.id):
                assert hashlib.sha256((outputs / o.path).read_bytes()).hexdigest() == o.sha256
        assert await store.live_runners() == 0  # every run ended its lease


async def test_the_store_and_outputs_can_come_from_batchgen_toml(tmp_path, simulator, pg_url):
    sim = await simulator(concurrency=4, duration=0.1)
    manifest = image_manifest(tmp_path, sim, "conf", 3)
    work = tmp_path / "w"
    work.mkdir()
    (work / "batchgen.toml").write_text(f'store = "{pg_url}"\noutputs = "{tmp_path / "shared"}"\n')
    env = {k: v for k, v in _env().items() if not k.startswith("BATCHGEN_")}
    for args in (["run", str(manifest), "--api-url", sim.base_url, "-q"], ["status"]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "batchgen.cli", *args, "--workdir", str(work), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, err.decode()
        assert f"outputs: {tmp_path / 'shared' / 'conf'}" in out.decode()
    assert not (work / "batchgen.sqlite3").exists()  # nothing went to the work directory's store
    async with await Store.open(pg_url) as store:
        assert (await store.counts(["conf"]))["conf"] == {S.SUCCEEDED: 3}


@pytest.mark.timeout(300)
async def test_a_runner_paused_past_its_lease_stops_on_waking_and_no_job_is_paid_twice(tmp_path, simulator, pg_url):
    # A laptop lid closed, a VM frozen: SIGSTOP past the lease's TTL. The other runner takes
    # its jobs; on waking, the paused one must send and record nothing of them, and stop
    # (exit 3: running again joins the others).
    cap = 8
    sim = await simulator(concurrency=cap, duration=1.5)
    manifest = image_manifest(tmp_path, sim, "lid", 160)
    outputs = tmp_path / "out"
    procs = [await _batchgen(pg_url, outputs, "--account-concurrency", str(cap), "run", str(manifest),
                             "--api-url", sim.base_url, "--workdir", str(tmp_path / f"w{i}"),
                             "--concurrency", str(cap), "-q") for i in range(2)]
    try:
        await _until(lambda: len(sim.requests()["requests"]) >= 2 * cap, 120, "two waves of submits")
        procs[0].send_signal(signal.SIGSTOP)
        await asyncio.sleep(TTL + 4)
        procs[0].send_signal(signal.SIGCONT)
        results = await _reap(procs)
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                await p.wait()
    (paused, paused_err), (other, other_err) = results
    assert paused == 3, paused_err
    assert "lease" in paused_err and "Traceback" not in paused_err, paused_err
    assert other in (0, 1), other_err
    sent = Counter(r["input"]["seed"] for r in sim.requests()["requests"])
    assert max(sent.values()) == 1  # never paid twice
    async with await Store.open(pg_url) as store:
        counts = (await store.counts(["lid"]))["lid"]
        assert counts.get(S.SUCCEEDED, 0) + counts.get(S.UNKNOWN, 0) == 160, counts
        assert counts.get(S.UNKNOWN, 0) <= cap  # at most what the paused runner had on the wire
        by_id = {r["request_id"]: r for r in sim.requests()["requests"]}
        for job in await store.jobs(["lid"]):
            if job.state == S.SUCCEEDED:
                assert by_id[job.request_id]["input"]["seed"] == job.inputs["seed"]
                for o in await store.outputs(job.id):
                    assert hashlib.sha256((outputs / o.path).read_bytes()).hexdigest() == o.sha256
        assert await store.live_runners() == 0


async def test_a_shared_store_without_outputs_warns_that_other_machines_will_not_see_the_files(
        tmp_path, simulator, pg_url):
    sim = await simulator(concurrency=4, duration=0.05)
    manifest = image_manifest(tmp_path, sim, "local", 2)
    env = {k: v for k, v in _env().items() if k != "BATCHGEN_OUTPUTS"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchgen.cli", "--store", pg_url, "run", str(manifest), "--api-url", sim.base_url,
        "--workdir", str(tmp_path / "w"), "-q", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()
    assert f"warning: a shared store (--store) with outputs in this machine's work directory ({tmp_path / 'w'})" \
        in err.decode()
    assert "pass --outputs DIR" in err.decode()
    # With --outputs, nothing to warn about.
    code, out = await _cli(pg_url, tmp_path / "shared", "run", str(manifest), "--api-url", sim.base_url,
                           "--workdir", str(tmp_path / "w"), "-q")
    assert code == 0 and "warning" not in out, out
