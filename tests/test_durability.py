"""Small outputs recorded before they are flushed: the Flusher, and the check after a restart.

A restart of the machine cannot be run in a test, so the runs here leave their marks as a run
under another boot would: the store's unsynced_boot column is rewritten to a boot id that is not
this one, which is exactly what a run before a reboot leaves behind."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import hashlib
import sqlite3

import pytest
from simruns import check_outputs_match, job_histories, manifest, options, outputs_by_job

from batchgen import app, durability
from batchgen import store as S
from batchgen.durability import BOOT_ID, Flusher, file_intact, make_durable


def test_the_boot_id_is_the_kernels_or_one_that_matches_no_other_process():
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            assert BOOT_ID == fh.read().strip()
    except OSError:
        assert BOOT_ID.startswith("process-")


@pytest.mark.parametrize("syncfs", ["syncfs", "fsync each file"])
def test_flushing_works_with_and_without_syncfs(tmp_path, monkeypatch, syncfs):
    if syncfs == "syncfs" and durability._syncfs is None:
        pytest.skip("no syncfs on this platform")
    if syncfs != "syncfs":
        monkeypatch.setattr(durability, "_syncfs", None)
    paths = []
    for i in range(3):
        (tmp_path / f"d{i}").mkdir()
        paths.append(str(tmp_path / f"d{i}" / "f"))
        (tmp_path / f"d{i}" / "f").write_bytes(b"x")
    make_durable(paths)  # several folders, one file system
    (tmp_path / "d1" / "f").unlink()  # removed by someone meanwhile: nothing to flush, no error
    (tmp_path / "d2" / "f").unlink()
    (tmp_path / "d2").rmdir()  # a batch folder removed, files and all
    make_durable(paths)


def test_file_intact_compares_size_and_digest(tmp_path):
    f = tmp_path / "out.mp4"
    f.write_bytes(b"abcdef")
    digest = hashlib.sha256(b"abcdef").hexdigest()
    assert file_intact(str(f), 6, digest)
    assert not file_intact(str(f), 7, digest)  # cut short (or the record is of another file)
    f.write_bytes(b"abcdeX")
    assert not file_intact(str(f), 6, digest)  # same length, other bytes
    assert file_intact(str(f), 6, digest, digest=False)  # the size alone
    f.unlink()
    assert not file_intact(str(f), 6, digest)


async def _never_fails(keys, exc):
    raise AssertionError(f"unexpected flush failure: {exc}")


class Periods:
    """A Flusher's sleep that ends when the test says (``end()``), so no test waits for a timer
    that a loaded machine may fire late."""

    def __init__(self):
        self._sleepers: asyncio.Queue[asyncio.Future] = asyncio.Queue()

    async def sleep(self, seconds: float) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._sleepers.put_nowait(waiter)
        await waiter

    async def end(self) -> None:
        """End the period the flusher sleeps in now (waiting for it to start one)."""
        while True:
            waiter = await self._sleepers.get()
            if not waiter.done():  # not one a close() cancelled
                waiter.set_result(None)
                return


class Marks:
    """``mark`` for a Flusher: records each call, and lets a test await the next one."""

    def __init__(self):
        self.calls: list[list] = []
        self._new: asyncio.Queue[None] = asyncio.Queue()

    async def __call__(self, keys) -> None:
        self.calls.append(sorted(keys))
        self._new.put_nowait(None)

    async def next(self) -> list:
        await asyncio.wait_for(self._new.get(), 30)
        return self.calls[-1]


async def test_the_flusher_flushes_what_was_handed_in_then_marks_it(tmp_path, monkeypatch):
    flushed = []
    monkeypatch.setattr(durability, "make_durable", lambda paths: flushed.append(sorted(paths)))
    periods, marked = Periods(), Marks()
    flusher = Flusher(marked, _never_fails, every=5, sleep=periods.sleep)
    flusher.add((1, 0), "a")
    flusher.add((2, 0), "b")
    assert flushed == []  # nothing waits for a flush: it comes later, for all of them at once
    await periods.end()
    assert await marked.next() == [(1, 0), (2, 0)]
    assert flushed == [["a", "b"]] and flusher.pending == 0
    flusher.add((3, 0), "c")  # a quiet flusher starts again when handed more
    await periods.end()
    assert await marked.next() == [(3, 0)] and flushed[-1] == ["c"]
    flusher.add((4, 0), "d")
    await flusher.flush()  # at once, not at the end of the period
    assert flushed[-1] == ["d"] and marked.calls[-1] == [(4, 0)]
    await marked.next()
    flusher.add((6, 0), "f")
    flusher.flush_soon()  # at once too, without waiting for it
    assert flushed[-1] == ["d"]
    assert await marked.next() == [(6, 0)] and flushed[-1] == ["f"]
    flusher.add((5, 0), "e")
    await flusher.close()  # a run ending before the next flush: the file keeps its mark
    assert flushed[-1] == ["f"] and flusher.pending == 1


async def test_a_failed_flush_never_marks_its_files_and_says_so(tmp_path, monkeypatch):
    if durability._syncfs is None:
        pytest.skip("no syncfs on this platform")
    calls = []

    def syncfs(fd):  # a disk that refuses the write-back once, then looks fine again
        calls.append(fd)
        if len(calls) == 1:
            ctypes.set_errno(errno.EIO)
            return -1
        return 0

    monkeypatch.setattr(durability, "_syncfs", syncfs)
    (tmp_path / "f").write_bytes(b"x")
    marked = Marks()
    failed: asyncio.Queue = asyncio.Queue()

    async def on_failure(keys, exc):
        failed.put_nowait((keys, str(exc)))

    periods = Periods()
    flusher = Flusher(marked, on_failure, every=5, sleep=periods.sleep)
    flusher.add((1, 0), str(tmp_path / "f"))
    await periods.end()
    # Linux reports a write-back error once: a second syncfs would succeed with the bytes still
    # not on disk, so the files of a failed flush are handed back, never flushed again and marked.
    assert await asyncio.wait_for(failed.get(), 30) == (
        {(1, 0): str(tmp_path / "f")}, "[Errno 5] syncfs: Input/output error")
    await flusher.close()
    assert marked.calls == [] and len(calls) == 1 and flusher.pending == 0


async def test_a_close_during_a_flush_waits_for_it(monkeypatch):
    import threading

    started, release = threading.Event(), threading.Event()

    def make_durable(paths):
        started.set()
        release.wait(30)

    monkeypatch.setattr(durability, "make_durable", make_durable)
    periods, marked = Periods(), Marks()
    flusher = Flusher(marked, _never_fails, every=5, sleep=periods.sleep)
    flusher.add((1, 0), "a")
    await periods.end()
    assert await asyncio.to_thread(started.wait, 30)  # the flush is in its thread now
    closing = asyncio.ensure_future(flusher.close())
    await asyncio.sleep(0.05)  # time for a close that would not wait to be done
    assert not closing.done()
    release.set()
    await closing
    assert marked.calls == [[(1, 0)]]


def _refusing_syncfs(fd):  # a disk that refuses the write-back, as syncfs(2) reports it
    ctypes.set_errno(errno.EIO)
    return -1


def unsynced(workdir) -> dict[tuple[int, int], str | None]:
    with sqlite3.connect(workdir / "batchgen.sqlite3") as db:
        return {(j, i): b for j, i, b in db.execute("SELECT job_id, idx, unsynced_boot FROM outputs")}


async def test_small_outputs_are_recorded_unflushed_then_marked_by_the_flush(simulator, tmp_path):
    sim = await simulator(concurrency=4, duration=0.05)
    path = manifest(tmp_path, sim, 4)
    out = await app.run(options(tmp_path, sim, path, flush_every=60))  # the run ends before it
    assert out.counts == {"b": {"succeeded": 4}}
    assert set(unsynced(tmp_path / "work").values()) == {BOOT_ID}
    # The next run (same boot: the page cache holds the files) trusts them once it has seen
    # them at their size, downloads none of them again, and flushes them, even with nothing else
    # to do (in the background: the run's end waits for it).
    downloads = sim.calls["download"]
    again = await app.run(options(tmp_path, sim, path, flush_every=60))
    assert again.summary.submitted == 0 and sim.calls["download"] == downloads
    assert set(unsynced(tmp_path / "work").values()) == {None}


async def test_a_large_output_is_recorded_as_on_disk(simulator, tmp_path, monkeypatch):
    from batchgen import constants as C

    monkeypatch.setattr(C, "DOWNLOAD_IN_MEMORY", 0)
    sim = await simulator(concurrency=4, duration=0.05)
    await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 2), flush_every=60))
    assert set(unsynced(tmp_path / "work").values()) == {None}  # fsynced before it was recorded


async def test_files_a_restart_lost_are_downloaded_again_and_nothing_is_resubmitted(simulator, tmp_path):
    sim = await simulator(concurrency=4, duration=0.05)
    path = manifest(tmp_path, sim, 5)
    work = tmp_path / "work"
    await app.run(options(tmp_path, sim, path, flush_every=60))
    jobs = await outputs_by_job(work)
    # The machine went down before the flush: every output carries another boot's mark, and the
    # disk lost some of the files: one is gone, one is empty, one has the right length and
    # wrong bytes (a file system that updated the size before the data).
    with sqlite3.connect(work / "batchgen.sqlite3") as db:
        db.execute("UPDATE outputs SET unsynced_boot = 'an-earlier-boot'")
    files = {key: work / outs[0].path for key, (_job, outs) in sorted(jobs.items())}
    gone, empty, garbled, *intact = files
    files[gone].unlink()
    files[empty].write_bytes(b"")
    files[garbled].write_bytes(b"\0" * files[garbled].stat().st_size)
    submits, downloads = sim.calls["submit"], sim.calls["download"]

    events = []
    again = await app.run(options(tmp_path, sim, path, flush_every=0.01), on_event=events.append)
    assert again.counts == {"b": {"succeeded": 5}}
    assert sim.calls["submit"] == submits  # nothing paid twice
    assert sim.calls["download"] == downloads + 3  # only the three damaged files
    await check_outputs_match(sim, work)
    marks = unsynced(work)
    assert all(marks[(jobs[key][0].id, 0)] is None for key in intact)  # checked: on disk
    assert set(marks.values()) <= {None, BOOT_ID}  # the new files: this boot's, or flushed
    histories = await job_histories(work)
    for key, states in histories.items():
        after = states[states.index(S.SUCCEEDED) + 1:]  # what the second run did to the job
        assert after == ([S.DOWNLOADING, S.SUCCEEDED] if key in (gone, empty, garbled) else []), states
    assert any("3 output file(s) missing or damaged" in e.message for e in events)


@pytest.mark.parametrize("sql", [S.UNSYNCED_SQL.format(where="WHERE batch IN ('b')"),
                                 S.UNSYNCED_SQL.format(where="WHERE 1"), S.UNSYNCED_BATCHES_SQL])
async def test_the_unflushed_outputs_queries_read_only_their_partial_index(tmp_path, sql):
    # Every start asks: it must cost the handful of marked outputs, not a pass over the jobs.
    async with await S.Store.open(tmp_path / "s.sqlite3") as store:
        rows = await store._db.execute_fetchall("EXPLAIN QUERY PLAN " + sql)
    plan = [r[-1] for r in rows]
    assert plan[0] == "SCAN o USING INDEX outputs_unsynced", plan
    assert plan[1].startswith("SEARCH jobs USING INTEGER PRIMARY KEY"), plan


async def test_a_plain_run_after_a_restart_checks_finished_batches_too(simulator, tmp_path):
    sim = await simulator(concurrency=4, duration=0.05)
    work = tmp_path / "work"
    await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 3), flush_every=60))
    with sqlite3.connect(work / "batchgen.sqlite3") as db:
        db.execute("UPDATE outputs SET unsynced_boot = 'an-earlier-boot'")
    lost = sorted((work / "b").iterdir())[0]
    lost.unlink()
    downloads = sim.calls["download"]
    # No manifest, no --batch: the batch is finished, yet it still has files to check.
    again = await app.run(app.RunOptions(workdir=work, target=app.Target(api_url=sim.base_url, token="t"),
                                         settings=options(tmp_path, sim, None).settings))
    assert again.batches == ["b"] and again.counts == {"b": {"succeeded": 3}}
    assert sim.calls["download"] == downloads + 1 and lost.exists()
    await check_outputs_match(sim, work)


async def test_a_job_that_lost_several_outputs_gets_them_all_back(simulator, tmp_path):
    sim = await simulator(concurrency=4, duration=0.05)
    work = tmp_path / "work"
    path = manifest(tmp_path, sim, 1)
    await app.run(options(tmp_path, sim, path, flush_every=60))
    (job, [first]), = (await outputs_by_job(work)).values()
    # A second output of the same job (the simulator makes one; the real API can make more).
    second = work / f"b/{job.key}-1.mp4"
    second.write_bytes((work / first.path).read_bytes())
    with sqlite3.connect(work / "batchgen.sqlite3") as db:
        db.execute("INSERT INTO outputs (job_id, idx, kind, url, path, size, sha256, downloaded_at) "
                   "VALUES (?, 1, ?, ?, ?, ?, ?, 0)",
                   (job.id, first.kind, first.url, f"b/{second.name}", first.size, first.sha256))
        db.execute("UPDATE outputs SET unsynced_boot = 'an-earlier-boot'")
    (work / first.path).unlink()
    second.unlink()
    downloads = sim.calls["download"]
    again = await app.run(options(tmp_path, sim, path, flush_every=60))
    assert again.counts == {"b": {"succeeded": 1}} and sim.calls["download"] == downloads + 2
    assert (work / first.path).read_bytes() == second.read_bytes()
    assert hashlib.sha256(second.read_bytes()).hexdigest() == first.sha256
    assert (await job_histories(work))[job.key][-2:] == [S.DOWNLOADING, S.SUCCEEDED]


def flush_at_first_success() -> dict:
    """app.run's hooks that flush the files written so far when the first job succeeds: a
    flush in the middle of the run, whatever the machine's load (a short flush tick may not
    come before a quick run ends)."""
    runners = []

    def on_event(event):
        if event.kind == S.SUCCEEDED and runners:
            runners.pop().flush_files()

    return {"on_runner": runners.append, "on_event": on_event}


async def test_a_disk_that_refuses_a_flush_stops_the_run_and_loses_nothing(simulator, tmp_path, monkeypatch):
    if durability._syncfs is None:
        pytest.skip("no syncfs on this platform")
    sim = await simulator(concurrency=1, duration=0.1)  # one at a time: flushes come between jobs
    work = tmp_path / "work"
    path = manifest(tmp_path, sim, 3)
    monkeypatch.setattr(durability, "_syncfs", _refusing_syncfs)
    with pytest.raises(S.StoreError, match="cannot flush downloaded files to disk: .*Input/output error"):
        await app.run(options(tmp_path, sim, path, flush_every=60), **flush_at_first_success())
    jobs = await outputs_by_job(work)
    # Whatever a failed flush covered is no longer trusted: downloaded again, never resubmitted.
    forgotten = [key for key, (_job, outs) in jobs.items() if outs and outs[0].sha256 is None]
    assert forgotten and all(jobs[key][0].state == S.DOWNLOADING for key in forgotten)
    submits = sim.calls["submit"]
    monkeypatch.undo()
    again = await app.run(options(tmp_path, sim, path, flush_every=0.01))
    assert again.counts == {"b": {"succeeded": 3}}
    submitted_before = sum(job.request_id is not None for job, _outs in jobs.values())
    assert sim.calls["submit"] == submits + (3 - submitted_before)  # none of them twice
    await check_outputs_match(sim, work)


async def test_a_start_does_not_wait_for_the_flush_of_earlier_files(simulator, tmp_path, monkeypatch):
    import threading

    sim = await simulator(concurrency=2, duration=0.05)
    await app.run(options(tmp_path, sim, manifest(tmp_path, sim, 2), flush_every=60))
    release = threading.Event()
    real = durability.make_durable
    monkeypatch.setattr(durability, "make_durable", lambda paths: (release.wait(10), real(paths)))
    run = asyncio.ensure_future(app.run(options(tmp_path, sim, manifest(tmp_path, sim, 4), flush_every=60)))
    # A syncfs waits for every dirty page of the file system, other programs' too: the new jobs
    # are submitted while the flush of the earlier run's files is still under way.
    for _ in range(500):
        if sim.calls["submit"] == 4 or run.done():
            break
        await asyncio.sleep(0.01)
    assert sim.calls["submit"] == 4 and not run.done()  # the run's end waits for the flush
    release.set()
    await run
    assert set(unsynced(tmp_path / "work").values()) <= {None, BOOT_ID}
    assert all(v is None for k, v in unsynced(tmp_path / "work").items() if k[0] <= 2)


async def test_a_file_gone_under_this_boot_is_downloaded_again(simulator, tmp_path):
    sim = await simulator(concurrency=4, duration=0.05)
    work = tmp_path / "work"
    path = manifest(tmp_path, sim, 2)
    await app.run(options(tmp_path, sim, path, flush_every=60))
    gone = sorted((work / "b").iterdir())[0]
    gone.unlink()  # removed before its flush (by a failing earlier run, or by hand)
    downloads = sim.calls["download"]
    again = await app.run(options(tmp_path, sim, path, flush_every=60))
    assert again.counts == {"b": {"succeeded": 2}} and sim.calls["download"] == downloads + 1
    await check_outputs_match(sim, work)


async def test_when_forgetting_unflushable_files_fails_too_they_are_removed(simulator, tmp_path, monkeypatch):
    if durability._syncfs is None:
        pytest.skip("no syncfs on this platform")
    async def store_fails_too(self, job, idxs, why):  # the store is on the same failing disk
        raise S.StoreError("disk I/O error")

    sim = await simulator(concurrency=1, duration=0.1)
    work = tmp_path / "work"
    path = manifest(tmp_path, sim, 3)
    monkeypatch.setattr(durability, "_syncfs", _refusing_syncfs)
    monkeypatch.setattr(S.SqliteStore, "output_lost", store_fails_too)
    with pytest.raises(S.StoreError, match=r"recording that failed too .*were removed"):
        await app.run(options(tmp_path, sim, path, flush_every=60), **flush_at_first_success())
    # Their marks still say "this boot": a run under this boot trusts a marked file that is
    # there at its size, so the files themselves were removed, and the next run fetches them.
    marks = unsynced(work)
    assert BOOT_ID in marks.values()
    jobs = await outputs_by_job(work)
    assert any(not (work / outs[0].path).exists() for _job, outs in jobs.values() if outs and outs[0].path)
    monkeypatch.undo()
    submits = sim.calls["submit"]
    again = await app.run(options(tmp_path, sim, path, flush_every=0.01))
    assert again.counts == {"b": {"succeeded": 3}}
    submitted_before = sum(job.request_id is not None for job, _outs in jobs.values())
    assert sim.calls["submit"] == submits + (3 - submitted_before)
    await check_outputs_match(sim, work)
