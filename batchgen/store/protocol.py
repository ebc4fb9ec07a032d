"""The store's contract: what the runner and the commands ask of a store, whatever holds it.

``Store`` is a ``Protocol`` (as arq's ``typing.py``): ``SqliteStore`` (sqlite.py) meets it, and a
second backend (PostgreSQL, several runners sharing one queue) must meet it too. Everything the
rest of batchgen calls on a store is declared here, and only that: mypy checks every caller
against this class, since they name their store ``Store``.

The contract every backend keeps, beyond each method's own:

- **Commit, then act.** A write's ``await`` returns only once it is durable (committed); the
  runner takes the step that follows (a POST that costs money, a file deleted) only after that.
- **Jobs in place.** A write that changes a job (``transition``, ``record_result``, …) changes
  the ``Job`` passed in the same way once committed, and leaves it untouched if it fails.
- **Failures are ``StoreError``** (errors.py), with a message fit for a user; a refused write
  changed nothing.
- **History.** Every state change appends a history row (from, to, detail) in the same commit.
- **States** are ``models.JobState`` words; a job's API (``Job.api``) is written with its claim.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..constants import SHARED_STORE_MARK, STORE_ENV
from ..jobkeys import canonical_json
from .models import OVERDUE, TERMINAL, Attempt, Batch, Job, Output


def job_row(spec: Any) -> tuple[Any, ...]:
    """A manifest.JobSpec as the compact row ``Store.add_rows`` records: (key, seq, model_id,
    source, inputs JSON, notes JSON, output name or None). Strings, not dicts: a 100,000-job
    manifest is held this way between validation and recording. Inputs and notes are in the
    manifest's canonical JSON (the text job keys hash). The output name is the one the manifest
    asks for: ``app`` makes it unique in its batch (outputnames.NameBook) before recording."""
    inputs_json = spec.inputs_json if getattr(spec, "inputs_json", None) else canonical_json(spec.inputs)
    return (spec.key, spec.seq, spec.model_id, spec.source, inputs_json, canonical_json(spec.meta),
            getattr(spec, "output_name", None))


class Store(Protocol):
    """A batchgen store. ``await Store.open(path)`` opens one; ``async with`` closes it."""

    @classmethod
    async def open(cls, path: str | Path, *, api: str | None = None) -> Store:
        """Open (creating and migrating it if needed) the store at ``path``: a file (SQLite), or
        a ``postgresql://`` URL (PostgreSQL, shared by several runners). ``api``: the API the
        jobs this store claims are submitted to (written on each claim: ``Job.api``)."""
        if str(path) == SHARED_STORE_MARK:  # workdir.existing_store of a shared store
            path = os.environ.get(STORE_ENV, "")
        if isinstance(path, str) and path.startswith(("postgresql://", "postgres://")):
            from .postgres import PostgresStore  # psycopg is imported only for a shared store

            return await PostgresStore.open(path, api=api)
        from .sqlite import SqliteStore

        return await SqliteStore.open(path, api=api)

    async def close(self) -> None:
        """Commit every write already asked for (even one whose caller was cancelled), then
        release the store."""
        ...

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- batches and learned caps ----------------------------------------------------------------

    async def upsert_batch(
        self, name: str, model_id: str, manifest_path: str | None, settings: dict[str, Any]
    ) -> None:
        """Record batch ``name`` (or update its model, manifest and settings)."""
        ...

    async def batches(self) -> list[Batch]:
        """Every batch, oldest first."""
        ...

    async def batch(self, name: str) -> Batch | None:
        """Batch ``name``, or None."""
        ...

    async def learned_cap(self, model_ids: Sequence[str], api: str) -> int | None:
        """The smallest in-flight cap learned for these models at ``api``, or None."""
        ...

    async def remember_cap(self, model_ids: Sequence[str], api: str, cap: int, settled: bool) -> None:
        """Keep ``cap`` per model at ``api``: a settled cap replaces what was known; an unsettled
        one only raises it, and never lowers a settled one."""
        ...

    # ---- recording a manifest ----------------------------------------------------------------------

    async def add_rows(self, batch: str, rows: Iterable[tuple[Any, ...]]) -> int:
        """Record rows (``job_row``) as pending jobs of ``batch``; return how many were new.
        Idempotent on (batch, key): a known key is not added again, but a known job in
        ``REFRESHABLE`` takes the row's inputs (never its output name: that is fixed when the
        job is first recorded). Memory stays flat for any number of rows."""
        ...

    async def output_names(self, batch: str) -> dict[str, str | None]:
        """Every job of ``batch`` (retired ones too): key -> its recorded output name (None: it
        is named by its key)."""
        ...

    async def retire_missing(self, batch: str, keys: Iterable[str]) -> tuple[int, int]:
        """``batch``'s manifest now has exactly ``keys``: retire its other jobs, bring retired
        ones with those keys back. Returns (retired now, brought back)."""
        ...

    async def existing_keys(self, batch: str, keys: Sequence[str]) -> set[str]:
        """Those of ``keys`` that ``batch`` has a job for."""
        ...

    # ---- the runner's writes: money depends on these ------------------------------------------------

    async def claim_many(self, batches: Sequence[str] | None, now: float, limit: int) -> list[Job]:
        """Take up to ``limit`` pending, current (not retired) jobs of ``batches`` (None: all) whose
        ``not_before`` has passed (<= ``now``), in manifest order (``seq``), from batches with no
        cancel request, and record the intent to submit them, atomically: each becomes
        ``submitting`` with ``attempts`` + 1 and ``api`` = this store's API. The caller POSTs
        only after this returns. No job is ever returned to two claimers (one statement here; a
        shared backend must lock the rows it takes, e.g. FOR UPDATE SKIP LOCKED). A store whose
        file is gone refuses (StoreError) rather than claim into nothing."""
        ...

    async def transition(
        self,
        job: Job,
        state: str,
        *,
        expect: Sequence[str] | None = None,
        detail: str | None = None,
        shield: bool = False,
        **fields: Any,
    ) -> None:
        """Move ``job`` to ``state``, setting ``fields`` (only settable columns: attempts,
        request_id, queue_position, error, error_code, cost, not_before, submitted_at,
        started_at, finished_at, api, attempts_before; others raise ValueError), with its history
        row, in one commit. ``expect``: refuse (StoreError, nothing changed) unless the stored
        state is one of these; this is how two actors racing on one job are caught (a request id
        is never written over a job that left ``submitting``). ``shield``: the write is committed
        even if the caller is cancelled while it waits (a request id must never be dropped), and
        logged if it then fails."""
        ...

    async def update_fields(self, job: Job, **fields: Any) -> None:
        """Change bookkeeping fields (queue position, …): no state change, no history row."""
        ...

    async def recover_interrupted(self, batches: Sequence[str] | None = None) -> list[Job]:
        """Jobs of ``batches`` left in ``submitting`` by a run that died become ``unknown``
        (their submit may have created a paid job): never resubmitted automatically. Returns them."""
        ...

    async def record_result(
        self, job: Job, outputs: Sequence[tuple[str, str]], *, cost: float | None,
        finished_at: float | None,
    ) -> None:
        """A succeeded result: record its outputs [(kind, url)] and move the job to
        ``downloading`` (with ``cost`` and ``finished_at``; an overdue job's error cleared), in
        one commit. Again on a job already ``downloading`` (expired URLs): replaces the URLs of
        outputs not yet downloaded, keeps finished files."""
        ...

    async def record_downloaded(
        self, job: Job, outputs: Sequence[Output], *, cost: float | None, finished_at: float | None,
        unsynced_boot: str | None = None,
    ) -> None:
        """A result whose outputs are already whole on disk (path, size, sha256 set): the outputs
        and the job's success (from ``FOLLOWED`` only, else StoreError) in one commit.
        ``unsynced_boot``: the files are not flushed yet (durability.py)."""
        ...

    async def output_downloaded(
        self, out: Output, path: str, size: int, sha256: str, *, job_done: Job | None = None,
        unsynced_boot: str | None = None,
    ) -> None:
        """One output's file is complete. ``job_done``: it was that job's last one, so the job
        goes from ``downloading`` to ``succeeded`` in the same commit."""
        ...

    async def output_lost(self, job: Job, idxs: Sequence[int], why: str) -> None:
        """These outputs' files are gone or damaged: forget the files (URLs stay), and a
        succeeded job goes back to ``downloading``, in one commit."""
        ...

    async def mark_synced(self, keys: Sequence[tuple[int, int]]) -> None:
        """Outputs (job id, idx) whose files a flush has put on disk."""
        ...

    async def cancel_pending(self, batches: Sequence[str]) -> int:
        """Pending jobs of ``batches`` become ``cancelled`` (never submitted); returns how many."""
        ...

    # ---- the commands' writes -----------------------------------------------------------------------

    async def requeue(self, job: Job, detail: str, *, expect: Sequence[str] = (*TERMINAL, OVERDUE)) -> None:
        """`retry`: a job in ``expect`` goes back to pending; the attempt it ended is kept
        (``attempts``), its request id, API, outputs and error are cleared, ``attempts`` goes on
        and ``attempts_before`` marks where the new round begins. One commit."""
        ...

    async def refollow(self, job: Job, detail: str) -> None:
        """A failed job whose output was lost (``OUTPUT_LOST``) is followed again, request id
        kept: its result is fetched again, never paid for again."""
        ...

    async def record_reused(self, job: Job, source: Job, outputs: Sequence[Output]) -> None:
        """Pending ``job`` takes ``source``'s result (files already in place) and succeeds, cost
        0, in one commit."""
        ...

    async def forget(self, jobs: Sequence[Job]) -> int:
        """Remove ``jobs`` with their history, outputs and attempts, and each batch left empty;
        the caller checked none is at the provider. Returns how many were removed."""
        ...

    async def request_cancel(self, batch: str) -> int:
        """Record a cancel request for ``batch`` and cancel its pending jobs, in one commit:
        ordered against every claim, so no job of it is claimed after. Returns jobs cancelled."""
        ...

    async def clear_cancel(self, batches: Sequence[str], *, carried_out: bool = False) -> None:
        """The cancel requests of ``batches`` are withdrawn, or (``carried_out``) done: then a
        batch with a job pending or being submitted (requeued meanwhile) keeps its request."""
        ...

    # ---- reads ----------------------------------------------------------------------------------------

    async def job(self, job_id: int) -> Job:
        """Job ``job_id``; StoreError if there is none."""
        ...

    async def jobs(
        self, batches: Sequence[str] | None = None, states: Sequence[str] | None = None, *,
        current: bool = False,
    ) -> list[Job]:
        """Jobs of ``batches`` in ``states`` (None: all) by batch and manifest order; retired ones
        too unless ``current``."""
        ...

    def iter_jobs_with_outputs(
        self, batch: str, chunk: int = 2000
    ) -> AsyncIterator[list[tuple[Job, list[Output]]]]:
        """``batch``'s jobs (retired too) in manifest order with their outputs, ``chunk`` at a
        time: the one batch-wide read of reports and galleries (memory: one chunk)."""
        ...

    def iter_report_rows(
        self, batch: str, chunk: int = 2000
    ) -> AsyncIterator[tuple[list[tuple[Any, ...]], dict[int, list[tuple[Any, ...]]]]]:
        """``batch``'s jobs (retired too) in manifest order as rows of sql.REPORT_COLUMNS,
        ``chunk`` at a time, with {job id: its outputs as (path, size, sha256)}: a report's read."""
        ...

    async def outputs(self, job_id: int) -> list[Output]:
        """A job's outputs by index."""
        ...

    async def attempts(self, job_ids: Sequence[int]) -> dict[int, list[Attempt]]:
        """{job id: its earlier attempts (put aside by `retry`), oldest first}."""
        ...

    async def counts(self, batches: Sequence[str] | None = None, *,
                     retired: bool | None = False) -> dict[str, dict[str, int]]:
        """{batch: {state: jobs}}: of current jobs (``retired`` False), retired ones (True), all (None)."""
        ...

    async def pending_at_least(self, batches: Sequence[str], n: int) -> int:
        """Pending jobs of ``batches``, counted no further than ``n``."""
        ...

    async def next_pending_at(self, batches: Sequence[str] | None) -> float | None:
        """When the earliest claimable pending job may be tried (0: now); None if none."""
        ...

    async def failure_groups(self, batch: str, limit: int = 10) -> list[tuple[str, str, int]]:
        """(state, error, jobs) of ``batch``'s current unsuccessful or overdue jobs, commonest first."""
        ...

    async def timings(self, batch: str) -> tuple[list[float], list[float], float]:
        """Queue waits and run times (seconds) of ``batch``'s started jobs, and its total cost."""
        ...

    async def apis(self, batches: Sequence[str] | None = None,
                   exclude: Sequence[str] = ()) -> dict[str, dict[str, int]]:
        """{batch: {api: jobs}} of jobs with a recorded API, not in the states ``exclude``."""
        ...

    async def input_kinds(self, batch: str) -> set[tuple[str, str]]:
        """Every (input name, JSON type) among ``batch``'s jobs (SQLite json_each type words)."""
        ...

    async def distinct_meta(self, batch: str) -> list[dict[str, Any]]:
        """The different notes of ``batch``'s jobs."""
        ...

    async def succeeded_elsewhere(self, batch: str, keys: Sequence[str]) -> dict[str, Job]:
        """{key: the latest succeeded job with that key in another batch}."""
        ...

    async def cancel_requests(self, batches: Sequence[str] | None = None) -> dict[str, float]:
        """{batch: when its cancel was requested} of those with one waiting."""
        ...

    async def unsynced_outputs(self, batches: Sequence[str] | None = None) -> list[tuple[Job, Output, str]]:
        """(job, output, boot id) of outputs recorded but not known to be flushed to disk."""
        ...

    async def unsynced_batches(self) -> list[str]:
        """Batches with outputs not known to be flushed to disk."""
        ...
