"""The store's models and contract, apart from any backend."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

from batchgen import store as S
from batchgen.store.protocol import Store


def test_the_models_import_no_database():
    # Every layer may import Job, Output, JobState… without the store (aiosqlite, sqlite3).
    code = ("import sys, batchgen.store.models as m; "
            "print(sorted(n for n in ('aiosqlite', 'sqlite3', 'batchgen.store.sqlite') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_job_states_are_the_words_the_store_records():
    assert [str(s) for s in S.JobState] == [
        "pending", "submitting", "in_queue", "in_progress", "overdue", "downloading",
        "succeeded", "failed", "unknown", "cancelled", "timed_out"]
    assert S.STATES == tuple(S.JobState) and S.PENDING is S.JobState.PENDING
    assert S.PENDING == "pending" and {"pending": 1}[S.PENDING] == 1 and f"{S.FAILED}" == "failed"
    assert json.dumps([S.UNKNOWN]) == '["unknown"]'
    assert set(S.TERMINAL) | set(S.FOLLOWED) | {S.PENDING, S.SUBMITTING, S.DOWNLOADING} == set(S.JobState)


def test_the_sqlite_store_implements_every_method_of_the_contract():
    # A method the backend forgot would be inherited from the protocol: a body of `...` that
    # returns None and records nothing. Every one is the backend's own, with the same parameters.
    from batchgen.store.sqlite import SqliteStore

    concrete = {"open", "__aenter__", "__aexit__"}  # the protocol's own, shared by every backend
    declared = [n for n, v in vars(Store).items() if inspect.isfunction(v) and not n.startswith("_")
                or n in concrete]
    assert {"claim_many", "transition", "record_result", "record_downloaded"} <= set(declared)
    for name in declared:
        if name in concrete:
            continue
        mine = getattr(SqliteStore, name)
        assert mine is not vars(Store)[name], f"SqliteStore does not implement {name}"
        assert list(inspect.signature(mine).parameters) == list(inspect.signature(vars(Store)[name]).parameters), name
