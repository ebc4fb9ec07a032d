"""The store: batches, jobs, their history and outputs, behind one narrow async interface.

- ``models``: what it holds (``Job``, ``Output``, ``Attempt``, ``Batch``, ``JobState`` and the
  sets of states); importing it imports no database.
- ``protocol``: ``Store``, the contract every backend meets, and ``Store.open``.
- ``sqlite``: ``SqliteStore`` on one SQLite file (reads in ``queries``, the runner's writes in
  ``transitions``, SQL they share in ``sql``), group-committed by ``engine``.

The runner talks to the store only through ``Store``'s methods, never SQL.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import StoreError
from .models import (
    CANCELLED,
    DOWNLOADING,
    FAILED,
    FOLLOWED,
    IN_PROGRESS,
    IN_QUEUE,
    OUTPUT_LOST,
    OVERDUE,
    PENDING,
    REFRESHABLE,
    REMOTE_ACTIVE,
    SIMULATOR_API,
    STATES,
    SUBMITTING,
    SUCCEEDED,
    TERMINAL,
    TIMED_OUT,
    UNKNOWN,
    Attempt,
    Batch,
    Job,
    JobState,
    Output,
)
from .protocol import Store, job_row

if TYPE_CHECKING:
    from .sql import UNSYNCED_BATCHES_SQL, UNSYNCED_SQL
    from .sqlite import SqliteStore

__all__ = [
    "CANCELLED", "DOWNLOADING", "FAILED", "FOLLOWED", "IN_PROGRESS", "IN_QUEUE", "OUTPUT_LOST",
    "OVERDUE", "PENDING", "REFRESHABLE", "REMOTE_ACTIVE", "SIMULATOR_API", "STATES", "SUBMITTING",
    "SUCCEEDED", "TERMINAL", "TIMED_OUT", "UNKNOWN", "UNSYNCED_BATCHES_SQL", "UNSYNCED_SQL",
    "Attempt", "Batch", "Job", "JobState", "Output", "SqliteStore", "Store", "StoreError", "job_row",
]

# The SQLite backend is imported when first named, so that ``batchgen.store.models`` stays free
# of aiosqlite for whoever needs only the models.
_LAZY = {"SqliteStore": "sqlite", "UNSYNCED_SQL": "sql", "UNSYNCED_BATCHES_SQL": "sql"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
