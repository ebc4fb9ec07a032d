"""What the store holds, as every layer sees it: a job's states, ``Job``, ``Output``, ``Attempt``,
``Batch``. Importing this module imports no store (no SQLite, no aiosqlite)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    """A job's state; see ARCHITECTURE.md for the diagram. A StrEnum: each equals the word the
    store records (``JobState.PENDING == "pending"``), so rows read back as plain strings compare
    equal to these."""

    PENDING = "pending"
    SUBMITTING = "submitting"
    IN_QUEUE = "in_queue"
    IN_PROGRESS = "in_progress"
    # Past its job timeout (or its answers unreadable) and not cancelled: the provider may still
    # deliver it, and bill it, so it is still followed (slowly by this run, again by the next),
    # and `retry` leaves it alone unless --force.
    OVERDUE = "overdue"
    DOWNLOADING = "downloading"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    UNKNOWN = "unknown"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


# The states by their old names, which the rest of batchgen uses (``store.PENDING``).
PENDING = JobState.PENDING
SUBMITTING = JobState.SUBMITTING
IN_QUEUE = JobState.IN_QUEUE
IN_PROGRESS = JobState.IN_PROGRESS
OVERDUE = JobState.OVERDUE
DOWNLOADING = JobState.DOWNLOADING
SUCCEEDED = JobState.SUCCEEDED
FAILED = JobState.FAILED
UNKNOWN = JobState.UNKNOWN
CANCELLED = JobState.CANCELLED
TIMED_OUT = JobState.TIMED_OUT

# Every state, in the order of a job's life (status tables list them so).
STATES = tuple(JobState)
# Jobs with a request id that the provider is still working on.
REMOTE_ACTIVE = (IN_QUEUE, IN_PROGRESS)
# Jobs with a request id whose result may still come: polled by every run.
FOLLOWED = (*REMOTE_ACTIVE, OVERDUE)
TERMINAL = (SUCCEEDED, FAILED, UNKNOWN, CANCELLED, TIMED_OUT)
# How a failed job whose result the provider delivered, but whose files could not be fetched
# (a host not allowed, a size cap), says so: `retry` follows it again instead of paying again.
OUTPUT_LOST = "output could not be downloaded"
# Jobs whose recorded inputs a rerun of the manifest refreshes: not at the provider, not done;
# their next submit (pending) or retry sends them.
REFRESHABLE = (PENDING, FAILED, UNKNOWN, CANCELLED, TIMED_OUT)

@dataclass
class Job:
    """One generation request of a batch, as recorded."""

    id: int
    batch: str
    key: str
    seq: int
    model_id: str
    source: str
    inputs: dict[str, Any]
    meta: dict[str, Any]
    state: str
    attempts: int
    request_id: str | None
    queue_position: int | None
    error: str | None
    error_code: int | None
    cost: float | None
    not_before: float | None
    created_at: float
    updated_at: float
    submitted_at: float | None
    started_at: float | None
    finished_at: float | None
    _: KW_ONLY  # from_row fills the fields above from one *row, these by name
    # ``inputs`` as recorded: JSON text, which a submit sends as it is (None: not read from the
    # store, as in a job built by hand).
    inputs_json: str | None = None
    # The API it was submitted to: SIMULATOR_API or a base URL (None: not yet, or not recorded).
    api: str | None = None
    # The attempts it had before its latest `retry` (the automatic retries of a round count
    # ``attempts - attempts_before``; ``attempts`` goes on from one round to the next).
    attempts_before: int = 0
    # When its spec left the manifest (None: still in it). See m007.
    retired_at: float | None = None
    # The stem of its files from the manifest's output_name, fixed when it was recorded (None:
    # its key). See outputnames.py and m009.
    output_name: str | None = None

    @property
    def file_stem(self) -> str:
        """What its output files are called, before ``-1`` and the extension (outputnames.py)."""
        return self.output_name or self.key

    @property
    def round_attempts(self) -> int:
        """Attempts since the latest `retry` (or since it was recorded)."""
        return self.attempts - self.attempts_before

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Job:
        (id_, batch, key, seq, model_id, source, inputs_json, meta_json, *rest, api, before,
         retired_at, output_name) = row
        return cls(id_, batch, key, seq, model_id, source, json.loads(inputs_json),
                   json.loads(meta_json), *rest, inputs_json=inputs_json, api=api,
                   attempts_before=before, retired_at=retired_at, output_name=output_name)


@dataclass
class Output:
    """One output file of a job: its URL, and once downloaded, where it is and its digest."""

    job_id: int
    idx: int
    kind: str
    url: str
    path: str | None
    size: int | None
    sha256: str | None


@dataclass
class Attempt:
    """One earlier attempt of a job, put aside by a `retry`."""

    attempt: int
    request_id: str | None
    api: str | None
    state: str
    error: str | None
    error_code: int | None
    cost: float | None
    submitted_at: float | None
    finished_at: float | None


@dataclass
class Batch:
    """A named run of one manifest: its model, manifest and batch-level settings."""

    name: str
    model_id: str
    manifest_path: str | None
    settings: dict[str, Any]
    created_at: float
    updated_at: float


# Job.api of a job run on the built-in simulator (--simulate); real APIs are named by base URL.
SIMULATOR_API = "simulator"

