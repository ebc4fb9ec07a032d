"""The group commit (store/engine.py) on a real SQLite file: many writes to a commit, each caller
awaiting its own; failures, cancellations, another process's lock, checkpoints, a file gone."""

from __future__ import annotations

import asyncio
import os
import sqlite3

import pytest
from conftest import Spec, add_jobs, events

from batchgen import constants as C
from batchgen import store as S
from batchgen.errors import StoreError
from batchgen.store import Store, engine


@pytest.fixture
def store_at(tmp_path):
    """The group commit is the SQLite backend's: its tests run on SQLite only."""
    return tmp_path / "store.sqlite3"


async def test_concurrent_transactions_do_not_mix(store):
    await store.upsert_batch("b", "m/x", None, {})

    async def failing():
        with pytest.raises(RuntimeError):
            async with store._engine.atomic() as db:
                await db.execute("INSERT INTO jobs (batch, key, seq, model_id, inputs_json, "
                                 "created_at, updated_at) VALUES ('b', 'bad', 0, 'm', '{}', 0, 0)")
                await asyncio.sleep(0.01)
                raise RuntimeError("roll me back")

    async def succeeding():
        await asyncio.sleep(0.001)
        await add_jobs(store, "b", [Spec("good", 1)])

    await asyncio.gather(failing(), succeeding())
    assert [j.key for j in await store.jobs(["b"])] == ["good"]


async def test_a_write_cancelled_before_its_commit_is_dropped(store):
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k1", 0)])
    job = (await store.jobs(["b"]))[0]
    task = asyncio.create_task(store.claim_many(["b"], now=0, limit=1))
    await asyncio.sleep(0)  # the claim is queued for the next group commit ...
    task.cancel()  # ... and its caller gives up before that commit starts
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.transition(job, S.FAILED, expect=(S.PENDING,))  # a later write still commits
    assert (await store.job(job.id)).state == S.FAILED
    assert [(e[1], e[2]) for e in await events(store, job.id)] == [("pending", "failed")]


async def test_a_shielded_write_is_committed_though_its_caller_is_cancelled(store):
    # The runner records a request id this way: the only handle on a paid job is never dropped.
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k1", 0)])
    [job] = await store.claim_many(["b"], now=0, limit=1)
    task = asyncio.create_task(store.transition(job, S.IN_QUEUE, expect=(S.SUBMITTING,),
                                                request_id="r-1", shield=True))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.transition(S.Job(**{**job.__dict__}), S.IN_PROGRESS, expect=(S.IN_QUEUE,))  # after it
    stored = await store.job(job.id)
    assert stored.state == S.IN_PROGRESS and stored.request_id == "r-1"


async def test_one_failing_write_in_a_group_leaves_the_others_committed(store):
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec(f"k{i}", i) for i in range(3)])
    jobs = await store.jobs(["b"])
    # Three writes issued in one turn of the loop share one group commit; the middle one is
    # refused (wrong expected state), which replays the group one savepoint per write.
    results = await asyncio.gather(
        store.transition(jobs[0], S.FAILED, expect=(S.PENDING,)),
        store.transition(jobs[1], S.FAILED, expect=(S.IN_QUEUE,)),
        store.transition(jobs[2], S.FAILED, expect=(S.PENDING,)),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], StoreError) and "expected one of" in str(results[1])
    assert [j.state for j in await store.jobs(["b"])] == [S.FAILED, S.PENDING, S.FAILED]
    # Each committed transition has its history row, the refused one none.
    assert [len(await events(store, j.id)) for j in jobs] == [1, 0, 1]


async def test_group_commit_waits_for_an_open_transaction(store):
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k1", 0)])
    [job] = await store.jobs(["b"])
    order = []

    async def long_transaction():
        async with store._engine.atomic() as db:
            await db.execute("UPDATE batches SET updated_at = 1 WHERE name = 'b'")
            await asyncio.sleep(0.05)  # a group commit asked for now must not block the loop
            order.append("atomic")

    async def write():
        await asyncio.sleep(0.01)
        await store.transition(job, S.FAILED, expect=(S.PENDING,))
        order.append("write")

    await asyncio.wait_for(asyncio.gather(long_transaction(), write()), 5)
    assert order == ["atomic", "write"]
    assert (await store.job(job.id)).state == S.FAILED


async def test_the_log_is_checkpointed_as_writes_accumulate(store, monkeypatch):
    monkeypatch.setattr(engine, "_CHECKPOINT_EVERY", 20)
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec(f"k{i}", i) for i in range(50)])
    wal = store.path.with_name(store.path.name + "-wal")
    for job in await store.jobs(["b"]):
        await store.transition(job, S.FAILED, expect=(S.PENDING,))
    assert store._engine._checkpoint is not None
    await store._engine._checkpoint
    # Everything written so far is in the database file itself: a reader that ignores the log
    # (opened on a copy of the main file alone) sees it.
    copy = store.path.with_name("copy.sqlite3")
    copy.write_bytes(store.path.read_bytes())
    with sqlite3.connect(copy) as db:
        failed = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'failed'").fetchone()[0]
    assert failed >= 20 and wal.exists()


async def test_another_process_holding_the_lock_does_not_freeze_the_loop(store, monkeypatch):
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k1", 0)])
    [job] = await store.jobs(["b"])
    # Another process (say an sqlite3 shell) holds the write lock for 0.5 s.
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    asyncio.get_running_loop().call_later(0.5, holder.execute, "COMMIT")
    ticks = []

    async def ticker():  # the loop keeps turning while the write waits
        while True:
            ticks.append(asyncio.get_running_loop().time())
            await asyncio.sleep(0.01)

    t = asyncio.create_task(ticker())
    try:
        await store.transition(job, S.FAILED, expect=(S.PENDING,))
    finally:
        t.cancel()
        holder.close()
    assert (await store.job(job.id)).state == S.FAILED
    gaps = [b - a for a, b in zip(ticks, ticks[1:], strict=False)]
    # A frozen loop could not even run the holder's COMMIT: its gap would span the whole wait
    # (0.5 s and more). The bound leaves room for a machine under load (0.24 s seen beside two
    # CPU burners), not for a freeze.
    assert len(ticks) > 20 and max(gaps) < 0.45

    # Held for longer than the store waits: the write fails with a StoreError, nothing hangs.
    monkeypatch.setattr(engine, "_BUSY_WAIT", 0.2)
    holder = sqlite3.connect(store.path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StoreError, match="locked by another process"):
            await store.transition(job, S.PENDING, expect=(S.FAILED,))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert (await store.job(job.id)).state == S.FAILED


async def test_commits_under_load_are_at_most_one_per_window_and_lone_writes_wait_for_none(
        store, monkeypatch):
    monkeypatch.setattr(engine, "_GROUP_WINDOW", 0.3)  # long, so that timing cannot blur the test
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec(f"k{i}", i) for i in range(36)])
    jobs = await store.jobs(["b"])
    groups = []
    apply_group = engine._apply_group
    monkeypatch.setattr(engine, "_apply_group", lambda conn, fns: groups.append(len(fns)) or apply_group(conn, fns))
    loop = asyncio.get_running_loop()

    async def timed(*writes):
        t = loop.time()
        await asyncio.gather(*writes)
        return loop.time() - t

    # One write after another (a cancel of a whole batch): nothing to group, no wait at all.
    assert await timed(store.transition(jobs[0], S.FAILED)) < 0.15
    assert await timed(store.transition(jobs[1], S.FAILED)) < 0.15
    # Writes asked for together share a commit, at once.
    assert await timed(*(store.transition(j, S.FAILED) for j in jobs[2:4])) < 0.15

    async def write(job, turns):  # under load: writes asked for over several turns of the loop ...
        for _ in range(turns):
            await asyncio.sleep(0)
        await store.transition(job, S.FAILED)

    await asyncio.gather(*(write(job, i % 5) for i, job in enumerate(jobs[4:34])))
    assert groups == [1, 1, 2, 30]  # ... share one commit, the window after the last group
    assert await timed(store.transition(jobs[34], S.FAILED)) >= 0.25  # the window after a group
    await asyncio.sleep(0.35)
    assert await timed(store.transition(jobs[35], S.FAILED)) < 0.15  # quiet again: at once
    assert {j.state for j in await store.jobs(["b"])} == {S.FAILED}


async def test_a_cancelled_shielded_write_does_not_stop_its_group(store):
    # Its caller gone, its future is cancelled: the committer must skip handing it the result and
    # go on to the rest of the group, not stop there and leave the others waiting for ever.
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k1", 0), Spec("k2", 1)])
    first, second = await store.claim_many(["b"], now=0, limit=2)
    gone = asyncio.create_task(store.transition(first, S.IN_QUEUE, request_id="r-1", shield=True))
    waiting = asyncio.create_task(store.transition(second, S.IN_QUEUE, request_id="r-2"))
    await asyncio.sleep(0)  # both in one group ...
    gone.cancel()  # ... and the first's caller leaves
    await asyncio.wait_for(waiting, 5)
    assert gone.cancelled()
    assert [(j.state, j.request_id) for j in await store.jobs(["b"])] == [
        (S.IN_QUEUE, "r-1"), (S.IN_QUEUE, "r-2")]
    assert store._engine._committer.done() and store._engine._committer.exception() is None


async def test_a_shielded_write_outlasts_another_process_lock_and_its_caller(store):
    # The committer waits (asynchronously) for another process's write lock; the caller of a
    # shielded write is cancelled meanwhile. Once the lock is free the write must still go in.
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k1", 0)])
    [job] = await store.claim_many(["b"], now=0, limit=1)
    other = sqlite3.connect(store.path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        task = asyncio.create_task(store.transition(job, S.IN_QUEUE, request_id="r-1", shield=True))
        await asyncio.sleep(0.03)  # the committer has met the lock and waits for it ...
        task.cancel()  # ... when the run gives up on this write
        with pytest.raises(asyncio.CancelledError):
            await task
        other.execute("COMMIT")
    finally:
        other.close()
    for _ in range(100):
        if store._engine._committer.done():
            break
        await asyncio.sleep(0.02)
    stored = await store.job(job.id)
    assert (stored.state, stored.request_id) == (S.IN_QUEUE, "r-1")


async def test_a_shielded_write_failing_with_nobody_waiting_is_logged(store, caplog):
    # The request id is the only handle on a paid job: if recording it fails after the run
    # stopped waiting, the log must say so (nobody else will).
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k1", 0)])
    [job] = await store.claim_many(["b"], now=0, limit=1)
    task = asyncio.create_task(store.transition(job, S.IN_QUEUE, expect=(S.PENDING,),  # fails
                                                detail="request r-1", request_id="r-1", shield=True))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await store.transition(S.Job(**{**job.__dict__}), S.FAILED)  # a later write: the group is done
    assert f"recording job {job.key} as in_queue (request r-1) failed" in caplog.text
    assert "expected one of ['pending']" in caplog.text


async def test_close_commits_writes_whose_committer_was_cancelled(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "_GROUP_WINDOW", 0.3)
    store = await Store.open(tmp_path / "store.sqlite3")
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k1", 0), Spec("k2", 1)])
    first, second = await store.jobs(["b"])
    await store.transition(first, S.FAILED)
    waiting = asyncio.create_task(store.transition(second, S.FAILED, shield=True))
    await asyncio.sleep(0.01)  # queued; the committer sleeps out the window ...
    store._engine._committer.cancel()  # ... and is cancelled (a torn-down loop cancels every task)
    await asyncio.sleep(0)
    await store.close()
    await asyncio.sleep(0)
    assert waiting.done()  # not left hanging
    await waiting
    reopened = await Store.open(tmp_path / "store.sqlite3")
    try:
        assert [j.state for j in await reopened.jobs(["b"])] == [S.FAILED, S.FAILED]
    finally:
        await reopened.close()


async def test_writes_survive_a_committer_cancelled_while_it_waits_for_the_lock(tmp_path):
    store = await Store.open(tmp_path / "store.sqlite3")
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k1", 0)])
    [job] = await store.jobs(["b"])
    release = asyncio.Event()

    async def hold():  # another task's transaction (atomic(), a checkpoint) holds the lock
        async with store._engine.atomic():
            await release.wait()

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(store.transition(job, S.FAILED, shield=True))
    await asyncio.sleep(0.01)  # the committer has taken the write and waits for the lock ...
    store._engine._committer.cancel()  # ... when it is cancelled
    await asyncio.sleep(0)
    release.set()
    await holder
    await store.close()
    await asyncio.sleep(0)
    assert waiting.done()
    await waiting
    reopened = await Store.open(tmp_path / "store.sqlite3")
    try:
        assert (await reopened.job(job.id)).state == S.FAILED
    finally:
        await reopened.close()


@pytest.mark.parametrize("damage", ["delete", "replace", "truncate"])
async def test_a_store_whose_file_is_gone_refuses_every_claim_and_then_every_write(tmp_path, damage):
    path = tmp_path / "s.sqlite3"
    store = await Store.open(path)
    try:
        await store.upsert_batch("b", "m/x", None, {})
        await add_jobs(store, "b", [Spec("k1", 0), Spec("k2", 1)])
        (job,) = await store.claim_many(["b"], now=0, limit=1)
        if damage == "delete":
            path.unlink()
        elif damage == "replace":
            path.rename(tmp_path / "old.sqlite3")
            path.write_bytes((tmp_path / "old.sqlite3").read_bytes())
        else:
            os.truncate(path, 0)
        with pytest.raises(StoreError, match="deleted, replaced or emptied while this run was using it"):
            await store.claim_many(["b"], now=0, limit=1)
        # Other writes go on only until the next periodic check.
        store._engine._checked_at -= C.STORE_CHECK_EVERY
        with pytest.raises(StoreError, match="deleted, replaced or emptied"):
            await store.transition(job, S.IN_QUEUE, request_id="r")
    finally:
        await store.close()
