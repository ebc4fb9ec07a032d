"""Migrations: registered by decorator, applied in order, each in one transaction."""

from __future__ import annotations

import re
import sqlite3

import aiosqlite
import pytest

from batchgen import migrations as M
from batchgen.errors import StoreError
from batchgen.migrations import MIGRATIONS, migrate
from batchgen.store import SIMULATOR_API, Store


def _tables(path):
    with sqlite3.connect(path) as db:
        return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_every_migration_function_is_registered_in_order():
    # A migration written but not registered would never run: every mNNN_ function of the module
    # is in MIGRATIONS, numbered 1, 2, 3, … in the order they are applied.
    defined = [name for name in vars(M) if re.fullmatch(r"m\d{3}_\w+", name)]
    assert sorted(defined) == [m.__name__ for m in MIGRATIONS]
    assert [int(m.__name__[1:4]) for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


def test_a_migration_out_of_turn_is_refused(monkeypatch):
    monkeypatch.setattr(M, "MIGRATIONS", list(MIGRATIONS))
    n = len(MIGRATIONS)

    async def skipped(db):
        pass

    for name in (f"m{n:03d}_same_number", f"m{n + 2:03d}_one_left_out", "add_note"):
        skipped.__name__ = name
        with pytest.raises(RuntimeError, match="registered where"):
            M.migration(skipped)
    skipped.__name__ = f"m{n + 1:03d}_next"
    assert M.migration(skipped) is skipped and M.MIGRATIONS[-1] is skipped


async def test_blank_file_reaches_current_schema(tmp_path):
    path = tmp_path / "s.sqlite3"
    s = await Store.open(path)
    await s.close()
    assert {"batches", "jobs", "job_events", "outputs", "migrations"} <= _tables(path)
    with sqlite3.connect(path) as db:
        names = [r[0] for r in db.execute("SELECT name FROM migrations ORDER BY name")]
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert names == [m.__name__ for m in MIGRATIONS]


async def test_old_store_moves_forward_and_keeps_data(tmp_path):
    path = tmp_path / "s.sqlite3"
    async with aiosqlite.connect(path, isolation_level=None) as db:
        await migrate(db, MIGRATIONS[:1])
        await db.execute(
            "INSERT INTO batches VALUES ('b', 'm', NULL, '{}', 0, 0)"
        )

    async def m999_add_note(db):
        await db.execute("ALTER TABLE batches ADD COLUMN note TEXT")

    async with aiosqlite.connect(path, isolation_level=None) as db:
        applied = await migrate(db, [*MIGRATIONS, m999_add_note])
        assert applied == [m.__name__ for m in MIGRATIONS[1:]] + ["m999_add_note"]
        async with db.execute("SELECT name, note FROM batches") as cur:
            assert await cur.fetchall() == [("b", None)]
        # Applying again is a no-op.
        assert await migrate(db, [*MIGRATIONS, m999_add_note]) == []


async def test_failing_migration_rolls_back(tmp_path):
    path = tmp_path / "s.sqlite3"

    async def m900_half_done(db):
        await db.execute("CREATE TABLE half (x)")
        raise RuntimeError("boom")

    async with aiosqlite.connect(path, isolation_level=None) as db:
        with pytest.raises(StoreError, match="m900_half_done failed and was rolled back"):
            await migrate(db, [*MIGRATIONS, m900_half_done])
    tables = _tables(path)
    assert "half" not in tables and "jobs" in tables
    with sqlite3.connect(path) as db:
        assert ("m900_half_done",) not in db.execute("SELECT name FROM migrations").fetchall()


async def test_an_old_store_gains_the_api_column_with_its_jobs_unmarked(tmp_path):
    path = tmp_path / "s.sqlite3"
    async with aiosqlite.connect(path, isolation_level=None) as db:
        await migrate(db, MIGRATIONS[:4])
        await db.execute("INSERT INTO batches VALUES ('b', 'm', NULL, '{}', 0, 0)")
        await db.execute("INSERT INTO jobs (batch, key, seq, model_id, inputs_json, state, request_id, "
                         "created_at, updated_at) VALUES ('b', 'k', 0, 'm', '{}', 'succeeded', 'r', 0, 0)")
    async with await Store.open(path, api=SIMULATOR_API) as store:
        (job,) = await store.jobs(["b"])
        assert job.api is None and job.request_id == "r"  # submitted before batchgen kept track


async def test_jobs_recorded_before_m009_keep_their_key_as_their_name(tmp_path):
    path = tmp_path / "s.sqlite3"
    before = [m.__name__ for m in MIGRATIONS].index("m009_output_names")
    async with aiosqlite.connect(path, isolation_level=None) as db:
        await migrate(db, MIGRATIONS[:before])
        await db.execute("INSERT INTO batches (name, model_id, created_at, updated_at) VALUES ('b', 'm', 0, 0)")
        await db.execute("INSERT INTO jobs (batch, key, seq, model_id, inputs_json, state, created_at, "
                         "updated_at) VALUES ('b', '0123456789abcdef', 0, 'm', '{}', 'succeeded', 0, 0)")
    async with await Store.open(path) as store:
        (job,) = await store.jobs(["b"])
        assert job.output_name is None and job.file_stem == "0123456789abcdef"  # its files: as named then
