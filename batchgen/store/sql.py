"""SQL the SQLite store's reads and writes share: the job columns, the filters every query of
jobs uses, and the one-statement state change (its history row written by a trigger, m002)."""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from typing import Any

from ..errors import StoreError
from .models import OVERDUE, Job

JOB_COLUMNS = (
    "id, batch, key, seq, model_id, source, inputs_json, meta_json, state, attempts, request_id, "
    "queue_position, error, error_code, cost, not_before, created_at, updated_at, submitted_at, "
    "started_at, finished_at, api, attempts_before, retired_at, output_name"
)
# What a report reads of each job (reportrows.py makes its cells from these rows): no Job
# objects, whose making (two json.loads each, a dataclass) was a third of a 100,000-job report.
REPORT_COLUMNS = (
    "id, key, seq, source, model_id, inputs_json, meta_json, state, attempts, request_id, error, error_code, "
    "cost, created_at, submitted_at, started_at, finished_at, api, attempts_before, retired_at, output_name"
)
# Columns a transition may set besides state.
SETTABLE = {
    "attempts", "request_id", "queue_position", "error", "error_code", "cost", "not_before",
    "submitted_at", "started_at", "finished_at", "api", "attempts_before",
}

# Outputs first, through their partial index (a handful of rows however large the store), then
# each one's job: a plan that scanned the batch's jobs would cost every start a full pass.
_UNSYNCED_FROM = "FROM outputs o INDEXED BY outputs_unsynced CROSS JOIN jobs ON jobs.id = o.job_id "
UNSYNCED_SQL = (
    f"SELECT {JOB_COLUMNS}, o.idx, o.kind, o.url, o.path, o.size, o.sha256, o.unsynced_boot "
    + _UNSYNCED_FROM + "{where} AND o.unsynced_boot IS NOT NULL ORDER BY o.job_id, o.idx"
)
UNSYNCED_BATCHES_SQL = (
    "SELECT DISTINCT jobs.batch " + _UNSYNCED_FROM
    + "WHERE o.unsynced_boot IS NOT NULL ORDER BY jobs.batch"
)


# Jobs of batches whose cancel was requested are never claimed (see SqliteStore.claim_many).
NOT_CANCELLED = ("batch NOT IN (SELECT name FROM batches WHERE cancel_requested_at IS NOT NULL)")


def result_fields(job: Job, cost: float | None, finished_at: float | None) -> dict[str, Any]:
    """The fields a result sets. An overdue job that finally delivers loses the error that said
    it was overdue."""
    if job.state == OVERDUE:
        job.error = None
        return {"cost": cost, "finished_at": finished_at, "error": None}
    return {"cost": cost, "finished_at": finished_at}


def filters(
    batches: Sequence[str] | None, states: Sequence[str] | None
) -> tuple[str, list[Any]]:
    """``WHERE …`` naming ``batches`` and ``states`` (None: any), and its parameters."""
    clauses: list[str] = []
    args: list[Any] = []
    if batches is not None:
        clauses.append(f"batch IN ({', '.join('?' * len(batches))})" if batches else "FALSE")
        args.extend(batches)
    if states is not None:
        clauses.append(f"state IN ({', '.join('?' * len(states))})" if states else "FALSE")
        args.extend(states)
    return ("WHERE " + " AND ".join(clauses) if clauses else "WHERE TRUE"), args


def transition_sql(
    job_id: int, state: str, now: float, detail: str | None, fields: dict[str, Any],
    expect: Sequence[str] | None,
) -> tuple[str, list[Any]]:
    params: list[Any] = [state, now, detail, *fields.values(), job_id]
    if expect:
        params.extend(expect)
    return transition_statement(tuple(fields), len(expect) if expect else 0), params


@functools.lru_cache(maxsize=64)
def transition_statement(field_names: tuple[str, ...], n_expect: int) -> str:
    """The UPDATE of a transition (a handful of shapes, each written thousands of times)."""
    sets = "".join(f", {k} = ?" for k in field_names)
    sql = f"UPDATE jobs SET state = ?, updated_at = ?, detail = ?{sets} WHERE id = ?"
    if n_expect:
        sql += f" AND state IN ({', '.join('?' * n_expect)})"
    return sql


def apply_transition(
    conn: sqlite3.Connection, key: str, job_id: int, sql: str, params: list[Any],
    expect: Sequence[str] | None,
) -> None:
    if conn.execute(sql, params).rowcount != 1:
        row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"no job with id {job_id}")
        raise StoreError(f"job {key} is '{row[0]}', expected one of {[str(s) for s in expect or []]}")
