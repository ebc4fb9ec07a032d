"""The SQLite store's reads: jobs, batches, outputs, and the counts, failure groups and timings
that status, plan, report and gallery show. Nothing here writes."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiosqlite

from ..errors import StoreError
from .models import CANCELLED, FAILED, OVERDUE, PENDING, TIMED_OUT, UNKNOWN, Attempt, Batch, Job, Output
from .sql import JOB_COLUMNS, NOT_CANCELLED, REPORT_COLUMNS, UNSYNCED_BATCHES_SQL, UNSYNCED_SQL, filters


class StoreReads:
    """The read-only half of ``SqliteStore``, on aiosqlite's connection ``_db``."""

    _db: aiosqlite.Connection

    async def batches(self) -> list[Batch]:
        async with self._db.execute(
            "SELECT name, model_id, manifest_path, settings_json, created_at, updated_at "
            "FROM batches ORDER BY created_at, name"
        ) as cur:
            rows = await cur.fetchall()
        return [Batch(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in rows]

    async def batch(self, name: str) -> Batch | None:
        for b in await self.batches():
            if b.name == name:
                return b
        return None

    async def learned_cap(self, model_ids: Sequence[str], api: str) -> int | None:
        """The in-flight cap an earlier run found for these models at this API: the smallest of
        theirs (one cap serves the whole run), or None if none was learned."""
        if not model_ids:
            return None
        marks = ", ".join("?" * len(model_ids))
        async with self._db.execute(
            f"SELECT MIN(cap) FROM learned_caps WHERE api = ? AND model_id IN ({marks})",
            (api, *model_ids),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None or row[0] is None else int(row[0])

    async def pending_at_least(self, batches: Sequence[str], n: int) -> int:
        """How many jobs of ``batches`` are pending, counting no further than ``n`` (cheap on a
        store of any size)."""
        where, args = filters(batches, [PENDING])
        async with self._db.execute(
            f"SELECT COUNT(*) FROM (SELECT 1 FROM jobs {where} LIMIT ?) AS p", (*args, n)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def job(self, job_id: int) -> Job:
        async with self._db.execute(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?", (job_id,)) as c:
            row = await c.fetchone()
        if row is None:
            raise StoreError(f"no job with id {job_id}")
        return Job.from_row(row)

    async def jobs(
        self, batches: Sequence[str] | None = None, states: Sequence[str] | None = None, *,
        current: bool = False,
    ) -> list[Job]:
        """Jobs of ``batches`` in ``states`` (None: all), retired ones too unless ``current``."""
        where, args = filters(batches, states)
        if current:
            where += " AND retired_at IS NULL"
        async with self._db.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs {where} ORDER BY batch, seq", args
        ) as cur:
            return [Job.from_row(r) for r in await cur.fetchall()]

    async def iter_jobs_with_outputs(
        self, batch: str, chunk: int = 2000
    ) -> AsyncIterator[list[tuple[Job, list[Output]]]]:
        """``batch``'s jobs in manifest order with their outputs, ``chunk`` jobs at a time: reports
        and galleries of 100,000 jobs hold one chunk, and ask two queries per chunk, not one per job.
        One query read a chunk at a time: no index orders a batch by seq alone, so each page
        asked for apart would sort the whole batch again."""
        async with self._db.execute(
            f"SELECT {JOB_COLUMNS} FROM jobs WHERE batch = ? ORDER BY seq, id", (batch,)
        ) as jobs_cur:
            while rows := await jobs_cur.fetchmany(chunk):
                jobs = [Job.from_row(r) for r in rows]
                found: dict[int, list[Output]] = {job.id: [] for job in jobs}
                # The ids as one JSON parameter: no limit on the number of SQL variables to meet.
                async with self._db.execute(
                    "SELECT job_id, idx, kind, url, path, size, sha256 FROM outputs WHERE job_id IN "
                    "(SELECT value FROM json_each(?)) ORDER BY job_id, idx",
                    (json.dumps(list(found)),),
                ) as cur:
                    for r in await cur.fetchall():
                        found[r[0]].append(Output(*r))
                yield [(job, found[job.id]) for job in jobs]

    async def iter_report_rows(
        self, batch: str, chunk: int = 2000
    ) -> AsyncIterator[tuple[list[tuple[Any, ...]], dict[int, list[tuple[Any, ...]]]]]:
        """``batch``'s jobs in manifest order as rows of REPORT_COLUMNS, ``chunk`` at a time, each
        chunk with {job id: its outputs as (path, size, sha256), by index} (jobs without any are
        absent): iter_jobs_with_outputs without the Job and Output objects, for reports."""
        async with self._db.execute(
            f"SELECT {REPORT_COLUMNS} FROM jobs WHERE batch = ? ORDER BY seq, id", (batch,)
        ) as jobs_cur:
            while rows := await jobs_cur.fetchmany(chunk):
                found: dict[int, list[tuple[Any, ...]]] = {}
                async with self._db.execute(
                    "SELECT job_id, path, size, sha256 FROM outputs WHERE job_id IN "
                    "(SELECT value FROM json_each(?)) ORDER BY job_id, idx",
                    (json.dumps([r[0] for r in rows]),),
                ) as cur:
                    for job_id, *output in await cur.fetchall():
                        found.setdefault(job_id, []).append(tuple(output))
                yield [tuple(r) for r in rows], found

    async def input_kinds(self, batch: str) -> set[tuple[str, str]]:
        """Every (input name, JSON type) among ``batch``'s jobs, SQLite's json_each types
        ('integer', 'real', 'text', 'true', 'false', 'null', 'array', 'object'): a report's columns
        and their types without parsing 100,000 jobs in Python."""
        async with self._db.execute(
            "SELECT DISTINCT e.key, e.type FROM jobs j, json_each(j.inputs_json) e WHERE j.batch = ?", (batch,)
        ) as cur:
            return {(r[0], r[1]) for r in await cur.fetchall()}

    async def distinct_meta(self, batch: str) -> list[dict[str, Any]]:
        """The different notes of ``batch``'s jobs (most batches have few: matrix values, tags)."""
        async with self._db.execute("SELECT DISTINCT meta_json FROM jobs WHERE batch = ?", (batch,)) as cur:
            return [json.loads(r[0]) for r in await cur.fetchall()]

    async def counts(self, batches: Sequence[str] | None = None, *,
                     retired: bool | None = False) -> dict[str, dict[str, int]]:
        """{batch: {state: count}} over the given batches (all when None): of the jobs still in
        their manifest (``retired`` False), of the retired ones (True), or of all (None)."""
        where, args = filters(batches, None)
        if retired is not None:
            where += " AND retired_at IS " + ("NOT NULL" if retired else "NULL")
        async with self._db.execute(
            f"SELECT batch, state, COUNT(*) FROM jobs {where} GROUP BY batch, state", args
        ) as cur:
            out: dict[str, dict[str, int]] = {}
            for batch, state, n in await cur.fetchall():
                out.setdefault(batch, {})[state] = n
        return out

    async def failure_groups(self, batch: str, limit: int = 10) -> list[tuple[str, str, int]]:
        """(state, error, count) of a batch's unsuccessful (or overdue) jobs, most common first."""
        async with self._db.execute(
            "SELECT state, COALESCE(error, ''), COUNT(*) FROM jobs WHERE batch = ? AND state IN "
            "(?, ?, ?, ?, ?) AND retired_at IS NULL GROUP BY state, error ORDER BY COUNT(*) DESC LIMIT ?",
            (batch, FAILED, UNKNOWN, TIMED_OUT, CANCELLED, OVERDUE, limit),
        ) as cur:
            return [tuple(r) for r in await cur.fetchall()]

    async def timings(self, batch: str) -> tuple[list[float], list[float], float]:
        """Queue waits and run times (seconds) of a batch's started jobs, and its total cost."""
        async with self._db.execute(
            "SELECT started_at - submitted_at, finished_at - started_at FROM jobs WHERE batch = ? "
            "AND started_at IS NOT NULL AND submitted_at IS NOT NULL", (batch,),
        ) as cur:
            rows = await cur.fetchall()
        async with self._db.execute("SELECT COALESCE(SUM(cost), 0) FROM jobs WHERE batch = ?", (batch,)) as cur:
            (cost,) = await cur.fetchone()  # type: ignore[misc]
        waits = [r[0] for r in rows if r[0] is not None]
        runs = [r[1] for r in rows if r[1] is not None]
        return waits, runs, float(cost)

    async def apis(self, batches: Sequence[str] | None = None,
                   exclude: Sequence[str] = ()) -> dict[str, dict[str, int]]:
        """{batch: {api: jobs}}: the APIs the batches' jobs were submitted to (Job.api; jobs
        never submitted, or submitted before batchgen kept track, are not counted, nor jobs in
        the states ``exclude``)."""
        where, args = filters(batches, None)
        if exclude:
            where += f" AND state NOT IN ({', '.join('?' * len(exclude))})"
            args.extend(exclude)
        rows = await self._db.execute_fetchall(
            f"SELECT batch, api, COUNT(*) FROM jobs {where} AND api IS NOT NULL GROUP BY batch, api",
            args,
        )
        out: dict[str, dict[str, int]] = {}
        for batch, api, n in rows:
            out.setdefault(batch, {})[api] = n
        return out

    async def existing_keys(self, batch: str, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(keys), 500):
            part = list(keys[i:i + 500])
            async with self._db.execute(
                f"SELECT key FROM jobs WHERE batch = ? AND key IN ({', '.join('?' * len(part))})",
                (batch, *part),
            ) as cur:
                found.update(r[0] for r in await cur.fetchall())
        return found

    async def output_names(self, batch: str) -> dict[str, str | None]:
        rows = await self._db.execute_fetchall("SELECT key, output_name FROM jobs WHERE batch = ?", (batch,))
        return {key: name for key, name in rows}

    async def next_pending_at(self, batches: Sequence[str] | None) -> float | None:
        """When the earliest pending job may be tried (0 for now), or None if none is pending."""
        where, args = filters(batches, [PENDING])
        async with self._db.execute(
            f"SELECT COUNT(*), MIN(COALESCE(not_before, 0)) FROM jobs {where} AND {NOT_CANCELLED} "
            "AND retired_at IS NULL",
            args
        ) as cur:
            n, earliest = await cur.fetchone()  # type: ignore[misc]
        return None if n == 0 else float(earliest)

    async def attempts(self, job_ids: Sequence[int]) -> dict[int, list[Attempt]]:
        """{job id: its earlier attempts, oldest first} (those a `retry` put aside)."""
        out: dict[int, list[Attempt]] = {}
        for i in range(0, len(job_ids), 500):
            part = list(job_ids[i:i + 500])
            rows = await self._db.execute_fetchall(
                "SELECT job_id, attempt, request_id, api, state, error, error_code, cost, "
                f"submitted_at, finished_at FROM job_attempts WHERE job_id IN ({', '.join('?' * len(part))}) "
                "ORDER BY job_id, rowid", part)
            for job_id, *rest in rows:
                out.setdefault(job_id, []).append(Attempt(*rest))
        return out

    async def succeeded_elsewhere(self, batch: str, keys: Sequence[str]) -> dict[str, Job]:
        """{key: a succeeded job with that key in another batch than ``batch``} (the latest)."""
        found: dict[str, Job] = {}
        for i in range(0, len(keys), 500):
            part = list(keys[i:i + 500])
            # NULLs first on both backends (PostgreSQL sorts them last by default, SQLite first),
            # so that the latest finished one wins on either.
            rows = await self._db.execute_fetchall(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE key IN ({', '.join('?' * len(part))}) "
                "AND batch != ? AND state = 'succeeded' ORDER BY finished_at IS NOT NULL, finished_at",
                (*part, batch))
            found.update((job.key, job) for job in map(Job.from_row, rows))
        return found

    async def cancel_requests(self, batches: Sequence[str] | None = None) -> dict[str, float]:
        """{batch: when its cancel was requested} of ``batches`` (None: all) with one waiting."""
        where, args = filters(batches, None)
        rows = await self._db.execute_fetchall(
            f"SELECT name, cancel_requested_at FROM batches {where.replace('batch IN', 'name IN')} "
            "AND cancel_requested_at IS NOT NULL", args)
        return {name: at for name, at in rows}

    async def outputs(self, job_id: int) -> list[Output]:
        rows = await self._db.execute_fetchall(
            "SELECT job_id, idx, kind, url, path, size, sha256 FROM outputs WHERE job_id = ? "
            "ORDER BY idx", (job_id,),
        )
        return [Output(*r) for r in rows]

    async def unsynced_outputs(self, batches: Sequence[str] | None = None) -> list[tuple[Job, Output, str]]:
        """The outputs (of ``batches``; None: all) recorded but not yet known to be on disk:
        (job, output, the boot id their file was written under)."""
        where, args = filters(batches, None)
        rows = await self._db.execute_fetchall(UNSYNCED_SQL.format(where=where), args)
        n = JOB_COLUMNS.count(",") + 1
        return [(Job.from_row(r[:n]), Output(r[0], *r[n:n + 6]), r[n + 6]) for r in rows]

    async def unsynced_batches(self) -> list[str]:
        """Batches with outputs not yet known to be on disk."""
        rows = await self._db.execute_fetchall(UNSYNCED_BATCHES_SQL)
        return [r[0] for r in rows]
