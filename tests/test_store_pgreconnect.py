"""The shared store across a lost connection and a frozen runner: backends terminated from an
admin connection (as a server restart or a TCP reset would), a COMMIT cut off, the server
refusing connections for a while, a row lock held by an idle transaction. Real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import psycopg
import pytest
from conftest import Spec, add_jobs, claim_one, image_manifest
from test_scaleout import _batchgen, _reap

from batchgen import store as S
from batchgen.errors import StoreError
from batchgen.store import Store, pgreconnect
from batchgen.store.postgres import PostgresStore

# This test's database only: connections of other tests' stores (one closing late) are not ours.
_KILL = ("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
         "WHERE application_name = 'batchgen' AND datname = current_database() AND pid <> pg_backend_pid()")


def _kill_backends(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as admin:
        row = admin.execute(_KILL).fetchone()
    return int(row[0]) if row else 0


async def _open(url: str) -> PostgresStore:
    store = await Store.open(url)
    assert isinstance(store, PostgresStore)
    return store


async def test_after_its_backends_are_terminated_the_store_reads_and_writes(pg_url):
    async with await _open(pg_url) as store:
        await store.upsert_batch("b", "m/x", None, {})
        await add_jobs(store, "b", [Spec(f"k{i}", i) for i in range(3)])
        assert _kill_backends(pg_url) == 2  # the write and the read connection
        await store._engine.write(lambda c: c.execute("UPDATE jobs SET error = 'after' WHERE seq = 0"))
        assert (await store.counts(["b"]))["b"][S.PENDING] == 3
        assert _kill_backends(pg_url) == 2  # both were connected again
        assert [j.error for j in await store.jobs(["b"]) if j.seq == 0] == ["after"]
        await store._engine.write(lambda c: c.execute("UPDATE jobs SET error = 'again' WHERE seq = 0"))
        assert [j.error for j in await store.jobs(["b"]) if j.seq == 0] == ["again"]


async def test_a_request_id_answered_while_the_server_refuses_connections_is_recorded_once_it_is_back(pg_url):
    db = psycopg.conninfo.conninfo_to_dict(pg_url)["dbname"]
    async with await _open(pg_url) as store:
        await store.upsert_batch("b", "m/x", None, {})
        await add_jobs(store, "b", [Spec("k", 1)])
        job = await claim_one(store, ["b"], time.time())
        other_db = psycopg.conninfo.make_conninfo(pg_url, dbname="postgres")
        with psycopg.connect(other_db, autocommit=True) as admin:
            admin.execute(f'ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS false')
            try:
                admin.execute(_KILL.replace("current_database()", f"'{db}'"))
                record = asyncio.ensure_future(store.transition(
                    job, S.IN_QUEUE, expect=(S.SUBMITTING, S.UNKNOWN), request_id="req-1",
                    submitted_at=time.time(), shield=True))
                await asyncio.sleep(1.5)  # the write retries its connection meanwhile
                assert not record.done()
            finally:
                admin.execute(f'ALTER DATABASE "{db}" WITH ALLOW_CONNECTIONS true')
        await asyncio.wait_for(record, 30)
        got = await store.job(job.id)
        assert (got.state, got.request_id) == (S.IN_QUEUE, "req-1")


def _counter(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as c:
        c.execute("CREATE TABLE paid (n int)")
        c.execute("INSERT INTO paid VALUES (0)")


def _paid(url: str) -> int:
    with psycopg.connect(url) as c:
        row = c.execute("SELECT n FROM paid").fetchone()
    return int(row[0]) if row else -1


async def test_a_write_whose_backend_dies_at_commit_is_applied_exactly_once(pg_url):
    # A deferred trigger runs at COMMIT: the first time, it terminates its own backend there.
    async with await _open(pg_url) as store:
        _counter(pg_url)
        with psycopg.connect(pg_url, autocommit=True) as c:
            c.execute("CREATE SEQUENCE once")
            c.execute("""CREATE FUNCTION die_once() RETURNS trigger LANGUAGE plpgsql AS $$
                         BEGIN IF nextval('once') = 1 THEN PERFORM pg_terminate_backend(pg_backend_pid());
                         END IF; RETURN NULL; END $$""")
            c.execute("CREATE CONSTRAINT TRIGGER at_commit AFTER UPDATE ON paid DEFERRABLE INITIALLY DEFERRED "
                      "FOR EACH ROW EXECUTE FUNCTION die_once()")
        await store._engine.write(lambda c: c.execute("UPDATE paid SET n = n + 1"))
        assert _paid(pg_url) == 1


async def test_a_write_committed_whose_answer_is_lost_is_not_applied_again(pg_url, monkeypatch):
    # The server committed; the answer to COMMIT never came back (the connection dropped then).
    async with await _open(pg_url) as store:
        _counter(pg_url)
        real_exit = psycopg.Transaction.__exit__
        cut = []

        def exit_then_drop(tx, *exc):  # type: ignore[no-untyped-def]
            out = real_exit(tx, *exc)
            if not tx.savepoint_name and exc[0] is None and not cut:
                cut.append(1)
                tx.connection.close()
                raise psycopg.OperationalError("server closed the connection unexpectedly")
            return out

        monkeypatch.setattr(psycopg.Transaction, "__exit__", exit_then_drop)
        await store._engine.write(lambda c: c.execute("UPDATE paid SET n = n + 1"))
        assert cut and _paid(pg_url) == 1


async def test_a_row_locked_by_a_frozen_transaction_holds_other_writes_up_briefly(pg_url, monkeypatch):
    monkeypatch.setattr(pgreconnect, "LOCK_TIMEOUT_MS", 300)
    monkeypatch.setattr(pgreconnect, "IDLE_IN_TRANSACTION_TIMEOUT_MS", 2000)
    async with await _open(pg_url) as store:
        await store.upsert_batch("b", "m/x", None, {})
        await add_jobs(store, "b", [Spec("k", 1)])
        job = await claim_one(store, ["b"], time.time())
        frozen = pgreconnect.connect(pg_url)  # a runner's connection, frozen inside a transaction
        frozen.execute("BEGIN")
        frozen.execute("SELECT id FROM jobs WHERE id = %s FOR UPDATE", (job.id,))
        started = time.monotonic()
        with pytest.raises(StoreError, match="lock timeout"):
            await asyncio.wait_for(store.transition(job, S.IN_QUEUE, expect=(S.SUBMITTING,), request_id="r"), 10)
        assert time.monotonic() - started < 3
        await asyncio.sleep(2.5)  # past the idle-in-transaction timeout: the server ends it
        with pytest.raises(psycopg.errors.IdleInTransactionSessionTimeout):
            frozen.execute("SELECT 1")
        frozen.close()
        await asyncio.wait_for(store.transition(job, S.IN_QUEUE, expect=(S.SUBMITTING,), request_id="r"), 10)
        assert (await store.job(job.id)).request_id == "r"


@pytest.mark.timeout(300)
async def test_a_run_whose_store_connections_are_cut_again_and_again_submits_every_job_once(
        tmp_path, simulator, pg_url):
    sim = await simulator(concurrency=8, duration=0.2)
    manifest = image_manifest(tmp_path, sim, "cut", 60)
    outputs = tmp_path / "shared-outputs"
    proc = await _batchgen(pg_url, outputs, "run", str(manifest), "--api-url", sim.base_url,
                           "--workdir", str(tmp_path / "w"), "--concurrency", "8", "-q")
    kills = 0
    try:
        while proc.returncode is None and kills < 200:
            await asyncio.sleep(0.3)
            kills += await asyncio.to_thread(_kill_backends, pg_url)
            try:
                await asyncio.wait_for(proc.wait(), 0.01)
            except TimeoutError:
                pass
        [(code, err)] = await _reap([proc])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert kills >= 5, kills  # the run was cut off several times while it ran
    assert code == 0, err
    sent = Counter(r["input"]["seed"] for r in sim.requests()["requests"])
    assert len(sent) == 60 and max(sent.values()) == 1
    async with await Store.open(pg_url) as store:
        assert (await store.counts(["cut"]))["cut"] == {S.SUCCEEDED: 60}
        by_id = {r["request_id"]: r["input"]["seed"] for r in sim.requests()["requests"]}
        for job in await store.jobs(["cut"]):
            assert by_id[job.request_id] == job.inputs["seed"]


async def test_a_runner_listens_again_after_its_listen_connection_is_cut(pg_url):
    from types import SimpleNamespace

    from batchgen.runner.leasing import Lease

    woken = asyncio.Event()
    runner = SimpleNamespace(settings=SimpleNamespace(rate=0), wake=woken.set)
    async with await _open(pg_url) as store:
        lease = Lease(store, runner)  # type: ignore[arg-type]
        listening = asyncio.ensure_future(lease._listen())
        try:
            for _ in range(3):
                await asyncio.sleep(0.5)
                woken.clear()
                with psycopg.connect(pg_url, autocommit=True) as admin:
                    killed = admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE query LIKE 'LISTEN%%' AND datname = current_database()").fetchone()
                assert killed == (1,)
                await asyncio.sleep(1.5)  # listening again (and woken once for what it missed)
                woken.clear()
                await store.notify("work")
                await asyncio.wait_for(woken.wait(), 5)
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)


async def test_an_atomic_block_cut_off_fails_and_the_next_one_commits(pg_url):
    async with await _open(pg_url) as store:
        _counter(pg_url)
        with pytest.raises(StoreError):
            async with store._engine.atomic() as db:
                await db.execute("UPDATE paid SET n = n + 1")
                await asyncio.to_thread(_kill_backends, pg_url)
                try:
                    await db.execute("UPDATE paid SET n = n + 1")
                except StoreError:
                    pass  # swallowed by the block: its COMMIT must still not pass for done
        async with store._engine.atomic() as db:
            await db.execute("UPDATE paid SET n = n + 10")
        assert _paid(pg_url) == 10
