"""A big batch in seconds: a real simulated run's store grown in SQLite to N jobs (every tenth
failed, the others sharing the real outputs of the first six), for galleries and reports of
10,000 or 100,000 jobs without running them."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def grow_batch(db: Path, n: int) -> None:
    """Add jobs 6..n-1 to the store ``db`` holding the 6 finished jobs of the quick start; job i
    copies job i % 6 with the prompt "scene <i> ..."."""
    conn = sqlite3.connect(db)
    try:
        with conn:
            conn.execute("""
                WITH RECURSIVE n(i) AS (SELECT 6 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
                INSERT INTO jobs (batch, key, seq, model_id, source, inputs_json, meta_json, state, attempts,
                                  request_id, error, error_code, cost, created_at, updated_at, submitted_at,
                                  started_at, finished_at, api)
                SELECT t.batch, printf('%016x', i), i, t.model_id, t.source,
                       json_set(t.inputs_json, '$.prompt',
                                'scene ' || i || ' ' || json_extract(t.inputs_json, '$.prompt')),
                       t.meta_json, CASE WHEN i % 10 = 0 THEN 'failed' ELSE 'succeeded' END, 1, 'req-' || i,
                       CASE WHEN i % 10 = 0 THEN 'Generation failed (simulated)' END,
                       CASE WHEN i % 10 = 0 THEN 500 END, t.cost, t.created_at, t.updated_at, t.submitted_at,
                       t.started_at, t.finished_at, t.api
                FROM n JOIN jobs t ON t.seq = i % 6
            """, (n - 1,))
            conn.execute("""
                INSERT INTO outputs (job_id, idx, kind, url, path, size, sha256, downloaded_at)
                SELECT j.id, o.idx, o.kind, o.url, o.path, o.size, o.sha256, o.downloaded_at
                FROM jobs j JOIN jobs t ON t.seq = j.seq % 6 AND t.batch = j.batch
                JOIN outputs o ON o.job_id = t.id
                WHERE j.seq >= 6 AND j.state = 'succeeded'
            """)
    finally:
        conn.close()
