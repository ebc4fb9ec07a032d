"""What only the shared store does: migrations on PostgreSQL (the same numbers as SQLite's, a
newer store refused, concurrent migrators), leases (claims skip each other's rows, a dead
runner's jobs taken back or adopted), the account's cap and the request rate across runners."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import psycopg
import pytest
from conftest import Spec, add_jobs

from batchgen import store as S
from batchgen.errors import LeaseLost, StoreError
from batchgen.migrations import MIGRATIONS
from batchgen.pgmigrations import pg_migrate
from batchgen.store import Store
from batchgen.store.postgres import LEASE_TTL, PostgresStore


def _columns_pg(url: str) -> dict[str, set[str]]:
    with psycopg.connect(url) as c:
        rows = c.execute("SELECT table_name, column_name FROM information_schema.columns "
                         "WHERE table_schema = 'public'").fetchall()
    out: dict[str, set[str]] = {}
    for table, col in rows:
        out.setdefault(table, set()).add(col)
    return out


async def test_both_backends_have_the_same_tables_and_columns_at_every_migration(tmp_path, pg_url):
    await (await Store.open(pg_url)).close()
    await (await Store.open(tmp_path / "s.sqlite3")).close()
    with sqlite3.connect(tmp_path / "s.sqlite3") as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        lite = {t: {r[1] for r in db.execute(f"PRAGMA table_info({t})")} for t in tables}
        names = [r[0] for r in db.execute("SELECT name FROM migrations ORDER BY name")]
    pg = _columns_pg(pg_url)
    pg["job_attempts"].discard("rowid")  # SQLite's is implicit
    assert pg == lite
    with psycopg.connect(pg_url) as c:
        assert [r[0] for r in c.execute("SELECT name FROM migrations ORDER BY name")] == names
    assert names == [fn.__name__ for fn in MIGRATIONS]


async def test_an_older_postgres_store_is_upgraded_and_a_newer_one_refused(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as c:
        assert pg_migrate(c, MIGRATIONS[:4]) == [fn.__name__ for fn in MIGRATIONS[:4]]
        c.execute("INSERT INTO batches VALUES ('b', 'm/x', NULL, '{}', 0, 0)")
    async with await Store.open(pg_url) as store:  # the rest applied, data kept
        assert [b.name for b in await store.batches()] == ["b"]
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("INSERT INTO migrations VALUES ('m999_from_the_future', 0)")
    with pytest.raises(StoreError, match="newer batchgen.*m999_from_the_future"):
        await Store.open(pg_url)


async def test_a_failing_postgres_migration_is_rolled_back(pg_url, monkeypatch):
    from batchgen import pgmigrations

    monkeypatch.setitem(pgmigrations._OWN, "m002_history_by_trigger",
                        ("ALTER TABLE jobs ADD COLUMN detail TEXT", "SELECT no_such_function()"))
    with pytest.raises(StoreError, match="m002_history_by_trigger failed and was rolled back"):
        await Store.open(pg_url)
    assert "detail" not in _columns_pg(pg_url)["jobs"]


async def test_runners_migrating_one_new_store_at_once_apply_each_migration_once(pg_url):
    stores = await asyncio.gather(*(Store.open(pg_url) for _ in range(4)))
    for s in stores:
        await s.close()
    with psycopg.connect(pg_url) as c:
        assert c.execute("SELECT COUNT(*) FROM migrations").fetchone()[0] == len(MIGRATIONS)


@pytest.fixture
async def pair(pg_url):
    """Two runners' stores on one database, each with its lease; closed after the test."""
    api = "https://api.example/v1"
    stores = [await Store.open(pg_url, api=api), await Store.open(pg_url, api=api)]
    for s in stores:
        assert isinstance(s, PostgresStore)
        await s.register_runner()
    yield stores
    for s in stores:
        await s.close()


async def test_concurrent_claims_never_take_one_job_twice(pair):
    a, b = pair
    await a.upsert_batch("b", "m/x", None, {})
    await add_jobs(a, "b", [Spec(f"k{i}", i) for i in range(200)])
    got = await asyncio.gather(*(s.claim_many(["b"], time.time(), 7) for s in (a, b) * 20))
    ids = [j.id for jobs in got for j in jobs]
    assert len(ids) == len(set(ids)) == 200
    owners = {j.id: s.runner_id for s, jobs in zip((a, b) * 20, got, strict=True) for j in jobs}
    rows = await a._db.execute_fetchall("SELECT id, runner_id FROM jobs")
    assert dict(rows) == owners


async def test_the_account_cap_holds_across_runners(pair, pg_url):
    a, b = pair
    a.account_cap = b.account_cap = 8
    await a.upsert_batch("b", "m/x", None, {})
    await add_jobs(a, "b", [Spec(f"k{i}", i) for i in range(50)])
    got = await asyncio.gather(*(s.claim_many(["b"], time.time(), 5) for s in (a, b, a, b)))
    assert sum(map(len, got)) == 8  # not 20: the other runner's claims count
    # Each job moved by the runner that claimed it (a runner writes only its own jobs).
    claimed = [(s, j) for s, jobs in zip((a, b, a, b), got, strict=True) for j in jobs]
    owner, job = claimed[0]
    await owner.transition(job, S.IN_QUEUE, request_id="r1")
    assert await b.claim_many(["b"], time.time(), 5) == []  # still at the provider
    await owner.transition(job, S.DOWNLOADING)
    assert len(await b.claim_many(["b"], time.time(), 5)) == 1  # its slot is free
    # The provider said one finished: its slot is free before its result is recorded.
    owner, job = claimed[1]
    await owner.transition(job, S.IN_PROGRESS, request_id="r2")
    await owner.mark_freed(job)
    assert len(await b.claim_many(["b"], time.time(), 5)) == 1
    # Another API (another account) has its own count.
    other = await Store.open(pg_url, api="https://other.example/v1")
    assert isinstance(other, PostgresStore)
    other.account_cap = 8
    try:
        assert len(await other.claim_many(["b"], time.time(), 5)) == 5
    finally:
        await other.close()


async def test_a_dead_runners_jobs_are_taken_back_sent_ones_unknown_others_adopted(pair, pg_url):
    dead, live = pair
    await dead.upsert_batch("b", "m/x", None, {})
    await add_jobs(dead, "b", [Spec(f"k{i}", i) for i in range(5)])
    never_sent, sent, queued, downloading = await dead.claim_many(["b"], time.time(), 4)
    await dead.mark_sent(sent)
    for job in (queued, downloading):
        await dead.mark_sent(job)
        await dead.transition(job, S.IN_QUEUE, request_id=f"r-{job.key}")
    await dead.transition(downloading, S.DOWNLOADING)
    # Alive: nothing of it is touched.
    assert await live.reap(["b"]) == (0, 0)
    assert await live.adopt(["b"]) == []
    assert await live.held_elsewhere(["b"]) == 4
    # Its lease runs out (it stopped renewing it).
    await dead.close()
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE runners SET expires_at = %s WHERE id = %s", (time.time() - 1, dead.runner_id))
    assert await live.reap(["b"]) == (1, 1)
    adopted = await live.adopt(["b"])
    assert sorted(j.key for j in adopted) == [queued.key, downloading.key]
    states = {j.key: j for j in await live.jobs(["b"])}
    assert states[never_sent.key].state == S.PENDING and states[never_sent.key].attempts == 0
    assert states[sent.key].state == S.UNKNOWN
    assert await live.held_elsewhere(["b"]) == 0
    assert await live.live_runners() == 1



async def test_a_runner_reaped_while_paused_claims_nothing_and_its_jobs_are_never_stranded(pair, pg_url):
    # Paused past its lease and reaped (its row deleted), it wakes and claims before its renewal
    # says it lost the lease: nothing is claimed. A job already naming a runner that is gone
    # (written before this check existed) is taken back all the same.
    paused, live = pair
    await live.upsert_batch("b", "m/x", None, {})
    await add_jobs(live, "b", [Spec(f"k{i}", i) for i in range(3)])
    [stranded] = await paused.claim_many(["b"], time.time(), 1)
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE runners SET expires_at = %s WHERE id = %s", (time.time() - 1, paused.runner_id))
    assert await live.reap(["b"]) == (1, 0)
    assert await paused.claim_many(["b"], time.time(), 3) == []
    assert {j.state for j in await live.jobs(["b"])} == {S.PENDING}
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE jobs SET state = 'submitting', runner_id = 'gone:1:x' WHERE id = %s", (stranded.id,))
    assert await live.held_elsewhere(["b"]) == 1
    assert await live.reap(["b"]) == (1, 0)
    assert await live.held_elsewhere(["b"]) == 0


async def test_another_runners_overdue_job_is_no_reason_to_wait(pair):
    # Given up on (overdue), it may stay at the provider for hours: two runners each holding one
    # must not wait for each other.
    a, b = pair
    await a.upsert_batch("b", "m/x", None, {})
    await add_jobs(a, "b", [Spec("k0", 0)])
    [job] = await a.claim_many(["b"], time.time(), 1)
    await a.mark_sent(job)
    await a.transition(job, S.IN_QUEUE, request_id="r0")
    assert await b.held_elsewhere(["b"]) == 1
    await a.transition(job, S.OVERDUE)
    assert await b.held_elsewhere(["b"]) == 0

async def test_a_lease_is_renewed_and_lost_once_expired(pair, pg_url):
    a, b = pair
    assert await a.renew_lease()
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE runners SET expires_at = %s WHERE id = %s", (time.time() - 1, a.runner_id))
    await b.reap(None)
    assert not await a.renew_lease()  # reaped: a runner must stop
    assert LEASE_TTL >= 5 * 2.0  # several renewals missed before a lease is lost


async def test_the_request_rate_is_split_evenly_between_live_runners(pg_url, tmp_path):
    from batchgen.client import RunComfyClient
    from batchgen.runner import Runner, RunSettings
    from batchgen.runner.leasing import leased

    stores = [await Store.open(pg_url) for _ in range(3)]
    runners = []
    for i, store in enumerate(stores):
        client = RunComfyClient("http://127.0.0.1:9", "t")
        runners.append((Runner(store, client, tmp_path / f"r{i}", RunSettings(rate=6.0)), client))
    try:
        async with leased(runners[0][0], True), leased(runners[1][0], True), leased(runners[2][0], True):
            # Each took its share as it started (1, 2, then 3 live runners)...
            assert [c.limiter.rate for _, c in runners] == pytest.approx([6.0, 3.0, 2.0])
            # ...and the renewal re-divides: 3 runners, 2 requests/s each, 6 together.
            for runner, _ in runners:
                await runner.lease._share_rate()
            assert [c.limiter.rate for _, c in runners] == pytest.approx([2.0, 2.0, 2.0])
    finally:
        for runner, client in runners:
            runner.close()
            await client.close()
        for store in stores:
            await store.close()


async def test_forget_leaves_a_job_another_runner_claimed_since_it_was_chosen(pair):
    a, b = pair
    await a.upsert_batch("b", "m/x", None, {})
    await add_jobs(a, "b", [Spec("k0", 0), Spec("k1", 1)])
    chosen = await a.jobs(["b"], [S.PENDING])  # what `forget` saw
    [claimed] = await b.claim_many(["b"], time.time(), 1)  # meanwhile, on another machine
    assert await a.forget(chosen) == 1
    [left] = await a.jobs(["b"])
    assert left.id == claimed.id and left.state == S.SUBMITTING


async def test_a_job_claimed_before_a_cancel_is_not_marked_sent_after_it(pair):
    a, b = pair
    await a.upsert_batch("b", "m/x", None, {})
    await add_jobs(a, "b", [Spec("k0", 0), Spec("k1", 1)])
    first, second = await a.claim_many(["b"], time.time(), 2)
    assert await a.mark_sent(first)  # on its way before the cancel
    await b.request_cancel("b")  # another machine
    assert not await a.mark_sent(second)  # waited for its turn: must not go now


async def test_a_runner_paused_past_its_lease_sends_and_records_nothing_another_holds(pair, pg_url):
    # Money: runner A is paused (SIGSTOP, a laptop asleep) past its lease; B takes its unsent job
    # back, claims it and sends it. A, resumed, must neither send it too nor undo B's claim.
    a, b = pair
    await a.upsert_batch("b", "m/x", None, {})
    await add_jobs(a, "b", [Spec("k0", 0), Spec("k1", 1)])
    mine, also_mine = await a.claim_many(["b"], time.time(), 2)
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE runners SET expires_at = expires_at - 3600 WHERE id = %s", (a.runner_id,))
    assert await b.reap(["b"]) == (2, 0)
    (taken, _) = await b.claim_many(["b"], time.time(), 2)
    assert await b.mark_sent(taken)
    with pytest.raises(StoreError, match="lease expired"):
        await a.mark_sent(mine)  # nothing goes on the wire
    with pytest.raises(StoreError, match="lease expired"):
        await a.transition(mine, S.PENDING, expect=(S.SUBMITTING,))  # A's drain leaves it alone
    await b.transition(taken, S.IN_QUEUE, expect=(S.SUBMITTING,), request_id="r-b")  # B's still works
    jobs = {j.key: j for j in await b.jobs(["b"])}
    assert jobs[taken.key].request_id == "r-b" and jobs[taken.key].state == S.IN_QUEUE


async def test_leases_are_timed_by_the_database_clock_not_the_hosts(pair, monkeypatch):
    # Two machines whose clocks disagree by an hour: neither reaps the other's live lease.
    a, b = pair
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this host runs an hour ahead
    assert await b.reap(None) == (0, 0)
    assert await a.renew_lease() and await b.renew_lease()
    assert await a.live_runners() == 2


def test_a_store_url_password_never_reaches_a_message():
    from batchgen.store.postgres import redact, scrub

    url = "postgresql://bg:S3cret%zzPW@db.example/rv"
    assert "S3cret" not in redact(url)
    assert "S3cret" not in scrub('invalid percent-encoded token: "S3cret%zzPW"', url)
    assert scrub("connection refused", url) == "connection refused"


async def test_jobs_no_live_runner_holds_do_not_hold_the_accounts_slots(pair, pg_url):
    # A runner of batch "a" fills the account's cap and is killed; nobody runs "a" again. The
    # runners of batch "b" must not wait for those slots forever.
    dead, live = pair
    dead.account_cap = live.account_cap = 4
    for name in ("a", "b"):
        await dead.upsert_batch(name, "m/x", None, {})
    await add_jobs(dead, "a", [Spec(f"a{i}", i) for i in range(4)])
    await add_jobs(dead, "b", [Spec(f"b{i}", i) for i in range(4)])
    for job in await dead.claim_many(["a"], time.time(), 4):
        await dead.mark_sent(job)
        await dead.transition(job, S.IN_QUEUE, request_id=f"r-{job.key}")
    assert await live.claim_many(["b"], time.time(), 4) == []  # a live runner's: they count
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE runners SET expires_at = expires_at - 3600 WHERE id = %s", (dead.runner_id,))
    await live.reap(["b"])
    assert len(await live.claim_many(["b"], time.time(), 4)) == 4


async def _expire(pg_url, runner_id):
    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("UPDATE runners SET expires_at = expires_at - 3600 WHERE id = %s", (runner_id,))


async def test_a_runner_paused_past_its_lease_records_no_result_over_the_adopters(pair, pg_url):
    # A has a job at the provider, is paused past its lease; B reaps, adopts it and records its
    # result. A, resumed, must not move it back nor overwrite its outputs, and stops as lease_lost.
    a, b = pair
    await a.upsert_batch("b", "m/x", None, {})
    await add_jobs(a, "b", [Spec("k0", 0)])
    [job] = await a.claim_many(["b"], time.time(), 1)
    assert await a.mark_sent(job)
    await a.transition(job, S.IN_QUEUE, expect=(S.SUBMITTING,), request_id="r-1")
    await _expire(pg_url, a.runner_id)
    await b.reap(["b"])
    [theirs] = await b.adopt(["b"])
    await b.record_result(theirs, [("image", "http://h/b.png")], cost=0.1, finished_at=5.0)
    out = S.Output(job.id, 0, "image", "http://h/a.png", "a.png", 3, "f" * 64)
    with pytest.raises(LeaseLost):
        await a.record_result(job, [("image", "http://h/a.png")], cost=0.2, finished_at=6.0)
    with pytest.raises(LeaseLost):
        await a.record_downloaded(job, [out], cost=0.2, finished_at=6.0)
    with pytest.raises(LeaseLost):
        await a.output_downloaded(out, "a.png", 3, "f" * 64, job_done=theirs)
    with pytest.raises(LeaseLost):
        await a.update_fields(job, queue_position=3)
    [row] = await b.jobs(["b"])
    assert (row.state, row.cost, row.queue_position) == (S.DOWNLOADING, 0.1, None)
    [kept] = await b.outputs(job.id)
    assert (kept.url, kept.path) == ("http://h/b.png", None)
    await b.output_downloaded(kept, "b.png", 3, "e" * 64, job_done=theirs)  # B's still works
    with pytest.raises(LeaseLost):
        await a.output_lost(theirs, [0], "gone")
    [row] = await b.jobs(["b"])
    assert row.state == S.SUCCEEDED and (await b.outputs(job.id))[0].path == "b.png"


async def test_an_expired_lease_no_reap_took_is_renewed_and_a_reaped_one_is_lost(pair, pg_url):
    # A store blip longer than the TTL: a lone runner's lease expired, but nobody reaped it, so
    # nothing was taken from it: it renews and goes on sending.
    a, b = pair
    await a.upsert_batch("b", "m/x", None, {})
    await add_jobs(a, "b", [Spec("k0", 0), Spec("k1", 1)])
    first, second = await a.claim_many(["b"], time.time(), 2)
    await _expire(pg_url, a.runner_id)
    assert await a.mark_sent(first)  # the lease, not reaped, is taken up again
    await _expire(pg_url, a.runner_id)
    assert await a.renew_lease()
    assert await a.mark_sent(second)
    await a.transition(second, S.IN_QUEUE, expect=(S.SUBMITTING,), request_id="r-2")
    # Reaped: lost for good.
    await _expire(pg_url, a.runner_id)
    await b.reap(["b"])
    assert not await a.renew_lease()
    with pytest.raises(LeaseLost):
        await a.transition(first, S.IN_QUEUE, expect=(S.SUBMITTING,), request_id="r-1")


async def test_a_renewal_racing_a_reap_either_keeps_every_job_or_loses_the_lease(pair, pg_url):
    # The renewal commits while the reap waits for the runner's row: the reap must then take
    # nothing from it (a live lease whose jobs were taken back would send them twice).
    a, b = pair
    await a.upsert_batch("b", "m/x", None, {})
    await add_jobs(a, "b", [Spec("k0", 0)])
    [job] = await a.claim_many(["b"], time.time(), 1)
    await _expire(pg_url, a.runner_id)
    with psycopg.connect(pg_url) as renewal:  # a transaction: holds the row until the commit
        renewal.execute("UPDATE runners SET expires_at = expires_at + 7200 WHERE id = %s", (a.runner_id,))
        reap = asyncio.ensure_future(b.reap(["b"]))
        await asyncio.sleep(0.5)
        renewal.commit()
    assert await reap == (0, 0)
    assert await a.mark_sent(job)
    [row] = await a.jobs(["b"])
    assert row.state == S.SUBMITTING


async def test_a_cancel_is_not_cleared_under_a_job_another_runner_puts_back_to_pending(pair):
    # A ends: cancels the batch's pending jobs, sees no other runner busy, clears the request.
    # Meanwhile B's submit was refused (a 429) and its job went back to pending: the request
    # must stay, or that job would be submitted later in a cancelled batch.
    a, b = pair
    await a.upsert_batch("b", "m/x", None, {})
    await add_jobs(a, "b", [Spec("k0", 0)])
    [job] = await b.claim_many(["b"], time.time(), 1)
    await a.request_cancel("b")
    await a.cancel_pending(["b"])  # A's _cancel_done: J is still B's, submitting
    await b.transition(job, S.PENDING, expect=(S.SUBMITTING,), not_before=0.0)  # the 429
    assert await a.held_elsewhere(["b"]) == 0
    await a.clear_cancel(["b"], carried_out=True)
    assert await b.cancel_requests(["b"])
    assert await b.claim_many(["b"], time.time(), 1) == []
    await a.clear_cancel(["b"])  # a `retry` withdraws it all the same
    assert not await a.cancel_requests(["b"])
