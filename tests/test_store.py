"""The store's contract, on a fresh store from the ``store`` fixture: idempotent recording, claims,
transitions, results and files, recovery. Nothing here knows the backend is SQLite (a second backend
would be tested by parametrising ``open_store``); SQLite's own matters are in test_store_sqlite.py,
the group commit in test_store_engine.py, migrations in test_migrations.py."""

from __future__ import annotations

import json
import time

import pytest
from conftest import Spec, add_jobs, claim_one, events

from batchgen import store as S
from batchgen.errors import StoreError
from batchgen.store import Store
from batchgen.store import sqlite as sqlite_store
from batchgen.store.sql import REPORT_COLUMNS


async def test_add_jobs_is_idempotent(store):
    await store.upsert_batch("b", "m/x", "t.yaml", {})
    assert await add_jobs(store, "b", [Spec("k1", 0), Spec("k2", 1)]) == 2
    assert await add_jobs(store, "b", [Spec("k1", 0), Spec("k2", 1), Spec("k3", 2)]) == 1
    assert [j.key for j in await store.jobs(["b"])] == ["k1", "k2", "k3"]
    assert await store.counts() == {"b": {"pending": 3}}


async def test_add_jobs_in_chunks(store, monkeypatch):
    monkeypatch.setattr(sqlite_store, "INSERT_CHUNK", 7)
    await store.upsert_batch("b", "m/x", None, {})
    assert await add_jobs(store, "b", (Spec(f"k{i}", i) for i in range(50))) == 50


async def test_claim_records_intent_and_history(store):
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k2", 1), Spec("k1", 0)])
    job = await claim_one(store, ["b"], now=0)
    assert job.key == "k1" and job.state == S.SUBMITTING and job.attempts == 1
    assert (await store.job(job.id)).state == S.SUBMITTING
    await store.transition(job, S.IN_QUEUE, expect=(S.SUBMITTING,), request_id="r1", submitted_at=1.0)
    history = await events(store, job.id)
    assert [(e[1], e[2]) for e in history] == [("pending", "submitting"), ("submitting", "in_queue")]
    with pytest.raises(StoreError, match="expected one of"):
        await store.transition(job, S.SUCCEEDED, expect=(S.DOWNLOADING,))


async def test_claim_respects_retry_delay(store):
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k1", 0)])
    job = await claim_one(store, ["b"], now=0)
    await store.transition(job, S.PENDING, not_before=100.0)
    assert await claim_one(store, ["b"], now=50.0) is None
    assert await store.next_pending_at(["b"]) == 100.0
    assert (await claim_one(store, ["b"], now=100.0)).key == "k1"


async def test_claim_many_takes_ready_jobs_in_manifest_order(store):
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec(f"k{i}", i) for i in (4, 3, 2, 1, 0)])
    first = await claim_one(store, ["b"], now=0)  # k0
    await store.transition(first, S.PENDING, not_before=100.0)  # waiting for a retry
    jobs = await store.claim_many(["b"], now=50.0, limit=3)
    assert [j.key for j in jobs] == ["k1", "k2", "k3"]
    assert all(j.state == S.SUBMITTING and j.attempts == 1 for j in jobs)
    assert [j.key for j in await store.claim_many(["b"], now=50.0, limit=10)] == ["k4"]
    assert await store.claim_many(["b"], now=50.0, limit=10) == []
    assert await store.counts() == {"b": {"pending": 1, "submitting": 4}}
    for job in jobs:
        assert [(e[1], e[2]) for e in await events(store, job.id)] == [("pending", "submitting")]


async def test_interrupted_submit_becomes_unknown(tmp_path):
    path = tmp_path / "s.sqlite3"
    s = await Store.open(path)
    await s.upsert_batch("b", "m/x", None, {})
    await add_jobs(s, "b", [Spec("k1", 0), Spec("k2", 1)])
    await claim_one(s, ["b"], now=0)
    await s.close()  # the run dies here
    s = await Store.open(path)
    stuck = await s.recover_interrupted(["b"])
    assert [j.key for j in stuck] == ["k1"]
    assert await s.counts() == {"b": {"unknown": 1, "pending": 1}}
    await s.close()


async def test_outputs_recorded_then_downloaded(store):
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k1", 0)])
    job = await claim_one(store, ["b"], now=0)
    await store.transition(job, S.IN_QUEUE, request_id="r")
    await store.record_result(job, [("video", "http://h/a.mp4")], cost=0.1, finished_at=5.0)
    assert job.state == S.DOWNLOADING
    (out,) = await store.outputs(job.id)
    await store.output_downloaded(out, "b/k1/output.mp4", 10, "ab" * 32)
    # A refreshed result does not overwrite a finished output's URL.
    await store.record_result(job, [("video", "http://h/new.mp4")], cost=0.1, finished_at=5.0)
    (out,) = await store.outputs(job.id)
    assert out.url == "http://h/a.mp4" and out.sha256 == "ab" * 32


async def test_last_file_and_success_in_one_write_or_neither(store):
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k1", 0)])
    job = await claim_one(store, ["b"], now=0)
    await store.transition(job, S.IN_QUEUE, expect=(S.SUBMITTING,), request_id="r1")
    await store.record_result(job, [("video", "http://h/a.mp4")], cost=0.1, finished_at=5.0)
    [out] = await store.outputs(job.id)

    # A job that is not downloading any more (say a user cancelled it meanwhile): refused, and
    # the file is not recorded either.
    stale = S.Job(**{**job.__dict__, "state": S.DOWNLOADING})
    await store.transition(job, S.FAILED, expect=(S.DOWNLOADING,))
    with pytest.raises(StoreError, match="expected one of"):
        await store.output_downloaded(out, "b/k1/output.mp4", 10, "ab" * 32, job_done=stale)
    assert (await store.outputs(job.id))[0].sha256 is None

    await store.transition(job, S.DOWNLOADING, expect=(S.FAILED,))
    await store.output_downloaded(out, "b/k1/output.mp4", 10, "ab" * 32, job_done=job)
    assert job.state == S.SUCCEEDED and (await store.job(job.id)).state == S.SUCCEEDED
    assert (await store.outputs(job.id))[0].sha256 == "ab" * 32
    assert [e[2] for e in await events(store, job.id)][-1] == S.SUCCEEDED


async def test_one_output_recorded_with_its_file_and_success_in_one_write(store):
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k1", 0), Spec("k2", 1)])
    jobs = await store.claim_many(["b"], now=0, limit=2)
    for job in jobs:
        await store.transition(job, S.IN_QUEUE, expect=(S.SUBMITTING,), request_id=f"r-{job.key}")
    job, other = jobs
    out = S.Output(job.id, 0, "video", "http://h/a.mp4", "b/k1.mp4", 10, "ab" * 32)
    await store.record_downloaded(job, [out], cost=0.25, finished_at=5.0)
    stored = await store.job(job.id)
    assert (stored.state, stored.cost, stored.finished_at) == (S.SUCCEEDED, 0.25, 5.0)
    assert await store.outputs(job.id) == [out]
    assert [(e[1], e[2]) for e in await events(store, job.id)][-1] == (S.IN_QUEUE, S.SUCCEEDED)
    # Only a job still at the provider's: one already recorded (or finished) is refused whole.
    await store.transition(other, S.FAILED)
    with pytest.raises(StoreError, match="expected one of"):
        await store.record_downloaded(other, [S.Output(other.id, 0, "video", "u", "b/k2.mp4", 1, "cd" * 32)],
                                      cost=0.25, finished_at=5.0)
    assert await store.outputs(other.id) == [] and (await store.job(other.id)).state == S.FAILED


async def test_a_claim_records_the_api_and_a_retry_forgets_it(tmp_path):
    async with await Store.open(tmp_path / "s.sqlite3", api="https://api.example/v1") as store:
        await store.upsert_batch("b", "m/x", None, {})
        await add_jobs(store, "b", [Spec("k1", 0), Spec("k2", 1)])
        (job,) = await store.claim_many(["b"], now=0, limit=1)
        assert job.api == "https://api.example/v1" == (await store.job(job.id)).api
        assert await store.apis(["b"]) == {"b": {"https://api.example/v1": 1}}  # k2: never sent
        await store.transition(job, S.FAILED, error="no")
        await store.requeue(job, "retry")
        assert (await store.job(job.id)).api is None and await store.apis() == {}


async def test_a_job_done_or_at_the_provider_keeps_the_inputs_it_was_sent_with(store):
    await store.upsert_batch("b", "m", None, {})
    await store.add_rows("b", [("k1", 0, "m", "", '{"image":"old"}', "{}", None),
                               ("k2", 1, "m", "", '{"image":"old"}', "{}", None)])
    (done, waiting) = await store.jobs(["b"])
    await store.transition(done, S.SUCCEEDED)
    assert await store.add_rows("b", [("k1", 0, "m", "", '{"image":"new"}', "{}", None),
                                      ("k2", 1, "m", "", '{"image":"new"}', "{}", None)]) == 0
    assert [j.inputs for j in await store.jobs(["b"])] == [{"image": "old"}, {"image": "new"}]


async def test_an_output_name_is_fixed_when_the_job_is_first_recorded(store):
    await store.upsert_batch("b", "m", None, {})
    await store.add_rows("b", [("k1", 0, "m", "", "{}", "{}", "fox_1"), ("k2", 1, "m", "", "{}", "{}", None)])
    # Recorded again with other names (a template changed): done or not, nothing is renamed.
    assert await store.add_rows("b", [("k1", 0, "m", "", "{}", "{}", "renamed"),
                                      ("k2", 1, "m", "", "{}", "{}", "renamed_too"),
                                      ("k3", 2, "m", "", "{}", "{}", "new_one")]) == 1
    jobs = await store.jobs(["b"])
    assert [(j.key, j.output_name, j.file_stem) for j in jobs] == [
        ("k1", "fox_1", "fox_1"), ("k2", None, "k2"), ("k3", "new_one", "new_one")]
    claimed = await store.claim_many(["b"], time.time(), 3)  # every way a job is read carries it
    assert sorted(j.file_stem for j in claimed) == ["fox_1", "k2", "new_one"]
    assert (await store.job(jobs[0].id)).output_name == "fox_1"
    assert await store.output_names("b") == {"k1": "fox_1", "k2": None, "k3": "new_one"}
    assert await store.output_names("other") == {}


async def test_the_latest_success_elsewhere_is_found_on_either_backend(store):
    # PostgreSQL sorts NULLs last and SQLite first: a success with no finish time recorded must
    # not win over the latest finished one on either (it is what --reuse links).
    for i, (batch, finished) in enumerate([("old", 5.0), ("none", None), ("new", 9.0)]):
        await store.upsert_batch(batch, "m/x", None, {})
        await add_jobs(store, batch, [Spec("k", 0)])
        (job,) = await store.jobs([batch])
        await store.transition(job, S.SUCCEEDED, request_id=f"r{i}", finished_at=finished)
    found = await store.succeeded_elsewhere("b", ["k"])
    assert found["k"].batch == "new"


async def test_report_rows_are_the_jobs_and_outputs_a_report_reads(store):
    """iter_report_rows (the report's read, no Job objects) holds what iter_jobs_with_outputs
    does, in the same order and chunks, on either backend."""
    await store.upsert_batch("b", "m/x", None, {})
    await add_jobs(store, "b", [Spec("k2", 2, inputs={"prompt": "two", "seed": 7}), Spec("k0", 0),
                                Spec("k1", 1, meta={"matrix": {"seed": 1}})])
    done = await claim_one(store, ["b"], now=0)
    await store.transition(done, S.IN_QUEUE, request_id="r")
    await store.record_result(done, [("video", "http://h/a.mp4"), ("video", "http://h/b.mp4")], cost=0.1,
                              finished_at=5.0)
    first, _ = await store.outputs(done.id)
    await store.output_downloaded(first, "b/k0/output.mp4", 10, "ab" * 32)
    columns = [c.strip() for c in REPORT_COLUMNS.split(",")]
    chunks = [part async for part in store.iter_report_rows("b", chunk=2)]
    expected = [part async for part in store.iter_jobs_with_outputs("b", chunk=2)]
    assert [len(rows) for rows, _ in chunks] == [len(part) for part in expected] == [2, 1]
    for (rows, outputs), part in zip(chunks, expected, strict=True):
        for row, (job, outs) in zip(rows, part, strict=True):
            got = dict(zip(columns, row, strict=True))
            assert {c: getattr(job, c) for c in columns if not c.endswith("_json")} == {
                c: v for c, v in got.items() if not c.endswith("_json")}
            assert (json.loads(got["inputs_json"]), json.loads(got["meta_json"])) == (job.inputs, job.meta)
            assert outputs.get(job.id, []) == [(o.path, o.size, o.sha256) for o in outs]
    assert chunks[0][1][done.id] == [("b/k0/output.mp4", 10, "ab" * 32), (None, None, None)]
