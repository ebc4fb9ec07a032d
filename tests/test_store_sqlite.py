"""What is SQLite's own in the store: the file, its indexes and query plans."""

from __future__ import annotations

import sqlite3

import pytest

from batchgen.errors import StoreError
from batchgen.store import Store
from batchgen.workdir import create_store


async def test_the_runners_queries_search_an_index(tmp_path):
    # With the single-column indexes gone (m003), every hot query must still be a SEARCH on
    # (batch, state, seq), never a SCAN of a 100,000-job table.
    path = tmp_path / "s.sqlite3"
    await (await Store.open(path)).close()
    with sqlite3.connect(path) as db:
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'jobs'"
                                            " AND name NOT LIKE 'sqlite_autoindex%'")}
        # jobs_key: reuse's lookup across batches (a key never changes: no upkeep but the insert)
        assert indexes == {"jobs_batch_state_seq", "jobs_key"}
        for sql in (
            "SELECT id FROM jobs WHERE batch IN (?) AND state IN (?) AND (not_before IS NULL OR not_before <= ?) "
            "ORDER BY seq LIMIT ?",  # claim_many
            "SELECT id FROM jobs WHERE batch IN (?) AND state IN (?) AND batch NOT IN (SELECT name FROM batches "
            "WHERE cancel_requested_at IS NOT NULL) AND retired_at IS NULL "
            "AND (not_before IS NULL OR not_before <= ?) ORDER BY seq LIMIT ?",  # claim_many as it is
            "SELECT id FROM jobs WHERE batch IN (?, ?) AND state IN (?, ?) ORDER BY batch, seq",  # jobs()
            "SELECT COUNT(*), MIN(COALESCE(not_before, 0)) FROM jobs WHERE batch IN (?) AND state IN (?)",
        ):
            plan = " ".join(r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {sql}", [0] * sql.count("?")))
            assert "jobs_batch_state_seq" in plan and "SCAN jobs" not in plan, (sql, plan)


async def test_unopenable_store_is_a_store_error(tmp_path):
    (tmp_path / "dir.sqlite3").mkdir()
    with pytest.raises(StoreError):
        await Store.open(tmp_path / "dir.sqlite3")


def test_a_new_store_file_is_never_left_empty(tmp_path):
    path = tmp_path / "work" / "batchgen.sqlite3"
    create_store(path)
    assert path.stat().st_size > 0 and list(path.parent.iterdir()) == [path]
    before = path.read_bytes()
    create_store(path)  # there already: left alone
    assert path.read_bytes() == before
