"""A batch's life after its first run: cancelled while a run goes on, retried with its history
kept. Real processes where the point is about processes: a `batchgen run` subprocess against a
simulator on loopback, and a `batchgen cancel` subprocess beside it."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from click.testing import CliRunner
from conftest import image_manifest

from batchgen import app
from batchgen import store as S
from batchgen.cli import main
from batchgen.retry import RetryPolicy
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


# --- retry keeps history ---


async def test_retry_goes_on_counting_and_the_report_lists_every_attempt(tmp_path, simulator):
    from batchgen.report import build_report

    # The first two submits make jobs that fail at the provider; the third is fine.
    sim = await simulator(duration=0.05, faults=["script.submit=fail,fail"])
    manifest = image_manifest(tmp_path, sim, "night", 1)
    work = tmp_path / "work"
    target = app.Target(api_url=sim.base_url, token="t")
    await app.run(app.RunOptions(workdir=work, manifest=manifest, target=target))
    for _ in range(2):
        await app.run(app.RunOptions(workdir=work, batch="night", target=target,
                                     retry_states=(S.FAILED, S.TIMED_OUT)))
    async with await Store.open(app.store_path(work)) as store:
        (job,) = await store.jobs(["night"])
        earlier = (await store.attempts([job.id]))[job.id]
    assert job.state == S.SUCCEEDED and job.attempts == 3
    assert [(a.attempt, a.state) for a in earlier] == [(1, S.FAILED), (2, S.FAILED)]
    rids = [r["request_id"] for r in sim.requests()["requests"]]
    assert [a.request_id for a in earlier] + [job.request_id] == rids
    assert all(a.error for a in earlier)
    (history,) = (await build_report(work, "night"))["history"]
    assert history.count("attempt ") == 3
    assert f"attempt 1: {rids[0]}, failed: " in history
    assert history.endswith(f"attempt 3: {rids[2]}, succeeded")


async def test_a_retried_job_gets_its_automatic_retries_again(tmp_path, simulator):
    # The automatic retries of a refused submit count the attempts of this round only: a job
    # retried by the user after using them all is not failed at its first 429.
    sim = await simulator(duration=0.05, faults=["script.submit=fail,429,429"])
    manifest = image_manifest(tmp_path, sim, "night", 1)
    work = tmp_path / "work"
    target = app.Target(api_url=sim.base_url, token="t")
    settings = app.RunSettings(policy=RetryPolicy(max_submit_attempts=2, base=0.01))
    await app.run(app.RunOptions(workdir=work, manifest=manifest, target=target, settings=settings))
    out = await app.run(app.RunOptions(workdir=work, batch="night", target=target, settings=settings,
                                       retry_states=(S.FAILED,)))
    assert out.counts["night"] == {S.FAILED: 1}  # 429 twice: this round's two attempts spent
    out = await app.run(app.RunOptions(workdir=work, batch="night", target=target, settings=settings,
                                       retry_states=(S.FAILED,)))
    assert out.counts["night"] == {S.SUCCEEDED: 1}
    async with await Store.open(app.store_path(work)) as store:
        (job,) = await store.jobs(["night"])
    assert job.attempts == 4


# --- retired jobs ---


def _manifest(path, seeds: list[int]):
    """A manifest of one job per seed on the quick start's street image."""
    import yaml

    path.write_text(yaml.safe_dump({
        "name": "night", "model": "bytedance/dreamina-3-0/pro/image-to-video",
        "defaults": {"image": "images/street.jpg", "prompt": "a street"},
        "jobs": [{"seed": s} for s in seeds],
    }))
    return path


def _cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_a_job_left_out_of_the_manifest_is_retired(samples):
    manifest = _manifest(samples / "night.yaml", [1, 2, 3])
    first = _cli("run", str(manifest), "--simulate", "-c", "1", "--sim-fault", "script.submit=ok,fail")
    assert first.exit_code == 1 and "1 failed" in first.output, first.output
    _manifest(manifest, [1, 3, 4])  # the failed one (seed 2) is dropped, seed 4 added
    again = _cli("run", str(manifest), "--simulate")
    # The failed job is neither submitted again nor counted: the batch is what the manifest says.
    assert again.exit_code == 0, again.output
    assert "1 job(s) no longer in the manifest retired" in again.output
    assert "1 submitted" in again.output and "night: 3 succeeded" in again.output
    status = _cli("status", "night").output
    assert "succeeded         3" in status and "failed" not in status and "next:" not in status
    assert "retired           1  (no longer in the manifest; --all lists them)" in status
    assert "retired (no longer in the manifest):\n    failed          1" in _cli("status", "--all").output
    retry = _cli("retry", "night", "--simulate")
    assert retry.exit_code == 0 and "0 submitted" in retry.output
    report = _cli("report", "night", "-o", "night.csv")
    assert report.exit_code == 0
    import pandas as pd

    df = pd.read_csv("night.csv")
    assert sorted(zip(df["input.seed"], df["retired"], strict=True)) == [
        (1, False), (2, True), (3, False), (4, False)]
    # Put back, it is part of the batch again (and retry would take it).
    _manifest(manifest, [1, 2, 3, 4])
    back = _cli("run", str(manifest), "--simulate")
    assert "1 retired job(s) back in the manifest" in back.output and back.exit_code == 1


def test_a_retired_job_at_the_provider_is_still_followed_and_downloaded(samples):
    manifest = _manifest(samples / "night.yaml", [1, 2])
    first = _cli("run", str(manifest), "--simulate", "--max-runtime", "1s")
    assert first.exit_code == 3, first.output  # stopped with both jobs at the provider
    _manifest(manifest, [1])
    again = _cli("run", str(manifest), "--simulate")
    assert again.exit_code == 0, again.output
    import sqlite3

    with sqlite3.connect("jobs/simulated/batchgen.sqlite3") as db:
        rows = db.execute("SELECT state, retired_at IS NOT NULL FROM jobs ORDER BY seq").fetchall()
    assert rows == [("succeeded", 0), ("succeeded", 1)]  # paid for, so downloaded
    assert len(list(Path("jobs/simulated/night").glob("*.mp4"))) == 2


# --- settings that do not change what a job generates ---


async def test_a_fixed_manifest_is_what_a_retry_sends(tmp_path, simulator):
    """Night one publishes the image through image_base_url, and the job fails; the manifest then
    sends it inline. Same job (its key is the file's content), and the retry sends it inline,
    to the API given now."""
    from imagefactory import make_image

    first, second = await simulator(faults=["script.submit=fail"]), await simulator()
    url = first.publish_file(make_image(tmp_path / "in.jpg", 640, 480))
    base = url.rsplit("/", 1)[0]
    manifest = tmp_path / "m.yaml"

    def write(extra: str) -> None:
        manifest.write_text(f"name: night\n{extra}jobs:\n  - prompt: p\n    image: in.jpg\n    seed: 1\n")

    write(f"image_base_url: {base}\n")
    work = tmp_path / "work"
    out = await app.run(app.RunOptions(workdir=work, manifest=manifest,
                                       target=app.Target(api_url=first.base_url, token="t")))
    assert out.counts["night"] == {S.FAILED: 1}
    (sent,) = first.requests()["requests"]
    assert sent["input"]["image_urls"] == [url]
    write("")  # fixed: the file goes inline
    target = app.Target(api_url=second.base_url, token="t")
    again = await app.run(app.RunOptions(workdir=work, manifest=manifest, target=target))
    assert again.new_jobs == 0 and again.counts["night"] == {S.FAILED: 1}  # the same job
    done = await app.run(app.RunOptions(workdir=work, batch="night", target=target,
                                        retry_states=(S.FAILED, S.TIMED_OUT)))
    assert done.counts["night"] == {S.SUCCEEDED: 1}
    (resent,) = second.requests()["requests"]
    assert resent["input"]["image_urls"][0].startswith("data:image/jpeg;base64,")



# --- forget ---


def test_forget_removes_records_not_at_the_provider(samples):
    manifest = _manifest(samples / "night.yaml", [1, 2, 3])
    assert _cli("run", str(manifest), "--simulate", "-c", "1",
                "--sim-fault", "script.submit=ok,fail").exit_code == 1
    _manifest(manifest, [2, 3])  # seed 1 (succeeded) retired
    assert _cli("run", str(manifest), "--simulate").exit_code == 1  # seed 2 still failed
    import sqlite3

    def rows():
        with sqlite3.connect("jobs/simulated/batchgen.sqlite3") as db:
            return db.execute("SELECT key, state, retired_at IS NOT NULL FROM jobs ORDER BY seq").fetchall()

    (retired, failed, done) = rows()
    files = sorted(p.name for p in Path("jobs/simulated/night").glob("*.mp4"))
    assert files == sorted([f"{retired[0]}.mp4", f"{done[0]}.mp4"])
    # A job that is done is not forgotten by key; nothing is removed then.
    refused = _cli("forget", "night", "--key", done[0], "--yes")
    assert refused.exit_code == 2 and "done: not forgotten" in refused.output
    # Without --yes it asks; declined, nothing changes.
    asked = CliRunner().invoke(main, ["forget", "night"], input="n\n")
    assert "forget 2 job(s) (1 failed, 1 retired succeeded)" in asked.output and "Forget them?" in asked.output
    assert len(rows()) == 3
    out = _cli("forget", "night", "--state", "retired", "--yes")
    assert out.exit_code == 0 and "1 job(s) forgotten" in out.output
    assert rows() == [failed, done] and Path(f"jobs/simulated/night/{retired[0]}.mp4").exists()
    out = _cli("forget", "night", "--state", "failed", "--yes", "--delete-files")
    assert out.exit_code == 0 and rows() == [done]
    status = _cli("status", "night").output
    assert "failed" not in status and "retired" not in status and "succeeded         1" in status
    # A forgotten job still in the manifest is recorded anew by the next run, and submitted.
    again = _cli("run", str(manifest), "--simulate")
    assert again.exit_code == 0 and "1 new job(s) recorded, 1 submitted" in again.output


# --- batch names that differ only by case ---


def test_a_new_batch_named_like_another_but_for_case_is_refused(samples):
    manifest = _manifest(samples / "night.yaml", [1])
    assert _cli("run", str(manifest), "--simulate").exit_code == 0
    twin = _copy_batch(samples, manifest, "Night")
    for command in ("plan", "run"):
        out = _cli(command, str(twin), "--simulate")
        assert out.exit_code == 2, out.output
        assert ("batch name 'Night' differs only in case from the batch 'night' already in this work directory"
                in out.output and "Use 'night' to add to that batch, or choose another name" in out.output)
    # Nothing recorded, no folder made; the batch itself still runs.
    assert "Night" not in _cli("status", "--all").output
    assert not Path("jobs/simulated/Night").exists()
    assert _cli("run", str(manifest), "--simulate").exit_code == 0


def test_a_store_that_already_holds_twins_keeps_working(samples):
    # Recorded before names were compared without case: both keep running; only a new one is refused.
    import sqlite3

    manifest = _manifest(samples / "night.yaml", [1])
    assert _cli("run", str(manifest), "--simulate").exit_code == 0
    other = _copy_batch(samples, manifest, "dawn")
    assert _cli("run", str(other), "--simulate").exit_code == 0
    with sqlite3.connect("jobs/simulated/batchgen.sqlite3") as db:
        db.execute("PRAGMA foreign_keys = OFF")
        db.execute("UPDATE batches SET name = 'NIGHT' WHERE name = 'dawn'")
        db.execute("UPDATE jobs SET batch = 'NIGHT' WHERE batch = 'dawn'")
    for name in ("night", "NIGHT"):
        again = _cli("run", str(_copy_batch(samples, manifest, name)), "--simulate")
        assert again.exit_code == 0, again.output
    refused = _cli("run", str(_copy_batch(samples, manifest, "Night")), "--simulate")
    assert refused.exit_code == 2 and "differs only in case from the batch 'night'" in refused.output


# --- --reuse ---


def test_a_renamed_batch_reuses_what_was_already_paid_for(samples):
    manifest = _manifest(samples / "night.yaml", [1, 2, 3])
    assert _cli("run", str(manifest), "--simulate").exit_code == 0
    # The same manifest under a new name, with one job of random seed and one new job.
    import yaml

    data = yaml.safe_load(manifest.read_text())
    data["name"] = "night-copy"
    data["jobs"] += [{"seed": 4}]
    copy = samples / "night-copy.yaml"
    copy.write_text(yaml.safe_dump(data))
    plan = _cli("plan", str(copy), "--simulate")
    assert "identical to jobs already succeeded in other batches: 3 (run --reuse" in plan.output
    told = _cli("run", str(copy), "--simulate", "--dry-run")
    assert told.exit_code == 0
    run = _cli("run", str(copy), "--simulate", "--reuse")
    assert run.exit_code == 0, run.output
    assert "3 job(s) reused from other batches" in run.output and "1 submitted" in run.output
    import sqlite3

    with sqlite3.connect("jobs/simulated/batchgen.sqlite3") as db:
        pairs = db.execute(
            "SELECT c.path, o.path FROM jobs jc JOIN outputs c ON c.job_id = jc.id "
            "LEFT JOIN jobs j ON j.key = jc.key AND j.batch = 'night' LEFT JOIN outputs o ON o.job_id = j.id "
            "WHERE jc.batch = 'night-copy' ORDER BY jc.seq").fetchall()
        costs = db.execute("SELECT cost FROM jobs WHERE batch = 'night-copy' ORDER BY seq").fetchall()
    # The three already paid for: the same files, linked (no second copy on disk); the new one its own.
    assert [orig is not None for _, orig in pairs] == [True, True, True, False]
    for path, orig in pairs[:3]:
        assert os.path.samefile(f"jobs/simulated/{path}", f"jobs/simulated/{orig}")
    assert [c for (c,) in costs][:3] == [0.0, 0.0, 0.0]


def _copy_batch(samples, manifest, name: str):
    """``manifest`` under another batch name: its jobs identical to the first's."""
    import yaml

    data = yaml.safe_load(manifest.read_text())
    data["name"] = name
    copy = samples / f"{name}.yaml"
    copy.write_text(yaml.safe_dump(data))
    return copy


def test_reuse_never_writes_through_what_is_planted_at_an_output_name(samples, tmp_path):
    manifest = _manifest(samples / "night.yaml", [1, 2, 3, 4])
    assert _cli("run", str(manifest), "--simulate").exit_code == 0
    names = sorted(os.listdir("jobs/simulated/night"))
    assert len(names) == 4
    # Under the new batch's output names, before --reuse links them: a dangling symlink, a
    # symlink to a file outside the batch, a stray file with other bytes, and a copy of the
    # right bytes (a link made before a crash, say).
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.mp4").write_bytes(b"not yours")
    folder = Path("jobs/simulated/night-copy")
    folder.mkdir()
    (folder / names[0]).symlink_to(outside / "dangling.mp4")
    (folder / names[1]).symlink_to(outside / "victim.mp4")
    (folder / names[2]).write_bytes(b"a stray file")
    (folder / names[3]).write_bytes(Path("jobs/simulated/night", names[3]).read_bytes())
    kept = (folder / names[3]).stat().st_ino
    run = _cli("run", str(_copy_batch(samples, manifest, "night-copy")), "--simulate", "--reuse")
    assert run.exit_code == 0, run.output
    assert "4 job(s) reused from other batches" in run.output and "0 submitted" in run.output
    # Nothing written outside the batch; every name now the output itself.
    assert sorted(os.listdir(outside)) == ["victim.mp4"]
    assert (outside / "victim.mp4").read_bytes() == b"not yours"
    for name in names[:3]:
        assert not (folder / name).is_symlink()
        assert os.path.samefile(folder / name, Path("jobs/simulated/night", name))
    assert (folder / names[3]).stat().st_ino == kept  # the right bytes already: left as they were
    assert sorted(os.listdir(folder)) == names  # no .part left behind
    assert "succeeded         4" in _cli("status", "night-copy").output


def test_reuse_stops_with_a_clear_error_when_a_folder_holds_an_output_name(samples):
    manifest = _manifest(samples / "night.yaml", [1])
    assert _cli("run", str(manifest), "--simulate").exit_code == 0
    (name,) = os.listdir("jobs/simulated/night")
    Path("jobs/simulated/night-copy", name).mkdir(parents=True)
    run = _cli("run", str(_copy_batch(samples, manifest, "night-copy")), "--simulate", "--reuse")
    assert run.exit_code != 0 and "Traceback" not in run.output
    assert f"jobs/simulated/night-copy/{name}: cannot put the output of night/{name} there" in run.output
    assert "move what is in the way and run again" in run.output
    assert "pending           1" in _cli("status", "night-copy").output  # nothing paid, nothing recorded
    assert os.listdir(f"jobs/simulated/night-copy/{name}") == []


def test_reuse_copies_an_output_on_another_file_system(samples, tmp_path):
    # The first batch's folder moved to another file system (tmpfs), a symlink left in its place:
    # a hard link cannot cross, so the file is copied (EXDEV), durably, under the new name.
    other = Path("/dev/shm")
    if not other.is_dir() or os.stat(other).st_dev == os.stat(tmp_path).st_dev:
        import pytest

        pytest.skip("no second file system to copy across")
    manifest = _manifest(samples / "night.yaml", [1, 2])
    assert _cli("run", str(manifest), "--simulate").exit_code == 0
    import shutil
    import tempfile

    moved = Path(tempfile.mkdtemp(dir=other)) / "night"
    try:
        shutil.move("jobs/simulated/night", moved)
        os.symlink(moved, "jobs/simulated/night")
        names = sorted(os.listdir(moved))
        folder = Path("jobs/simulated/night-copy")
        folder.mkdir()
        (folder / names[0]).symlink_to(tmp_path / "dangling.mp4")
        run = _cli("run", str(_copy_batch(samples, manifest, "night-copy")), "--simulate", "--reuse")
        assert run.exit_code == 0, run.output
        assert "2 job(s) reused" in run.output and "0 submitted" in run.output
        assert not (tmp_path / "dangling.mp4").exists()
        for name in names:
            copied = folder / name
            assert not copied.is_symlink() and copied.stat().st_dev != moved.stat().st_dev
            assert copied.read_bytes() == (moved / name).read_bytes()
        assert sorted(os.listdir(folder)) == names
    finally:
        shutil.rmtree(moved.parent)


def test_random_seed_jobs_are_new_generations(samples):
    manifest = _manifest(samples / "night.yaml", [-1, 7])
    assert _cli("run", str(manifest), "--simulate").exit_code == 0
    import yaml

    data = yaml.safe_load(manifest.read_text())
    data["name"] = "again"
    copy = samples / "again.yaml"
    copy.write_text(yaml.safe_dump(data))
    plan = _cli("plan", str(copy), "--simulate").output
    assert "succeeded in other batches: 1 (run --reuse" in plan
    assert "repeating earlier requests with a random seed: 1 (new generations, paid for)" in plan
    run = _cli("run", str(copy), "--simulate", "--reuse")
    assert run.exit_code == 0 and "1 job(s) reused" in run.output and "1 submitted" in run.output
