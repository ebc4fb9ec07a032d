"""A batch's report as plain columns, a chunk of jobs at a time, made straight from the store's
rows (sql.REPORT_COLUMNS): no Job objects, no pandas, and the work done a column at a time.

Every cell is a plain scalar (lists joined with " | ", nested notes flattened to dotted column
names), typed for the whole batch: the kinds of value each column holds are learnt first from two
queries (the input names and JSON types, the distinct notes), so every chunk agrees. A number
column is ints or floats (None where missing), a column of true/false bools, any other text.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .store import SIMULATOR_API, Attempt, Store

# Several values in one cell (image lists, several outputs): a separator that never appears in
# a URL or a hex digest, and reads well in a spreadsheet.
JOIN = " | "

# The fixed columns, before and after the input.* and meta.* ones.
# output_name: what its files are called (its key unless the manifest named them; outputnames.py).
HEAD_COLUMNS = ("batch", "key", "output_name", "seq", "source", "model")
TAIL_COLUMNS = (
    "simulated", "api", "request_id", "state", "attempts", "created_at", "submitted_at", "started_at", "finished_at",
    "queue_wait_s", "run_s", "outputs", "output_paths", "output_sha256", "output_bytes", "cost",
    "error", "error_code", "history", "retired",
)

# What each fixed column holds: known from the store's schema, so only the inputs and notes need
# a look at the jobs.
_FIXED_KINDS: dict[str, set[type]] = {
    **{c: {str} for c in ("batch", "key", "output_name", "source", "model", "api", "request_id", "state", "created_at",
                          "submitted_at", "started_at", "finished_at", "output_paths", "output_sha256", "error",
                          "history")},
    **{c: {int} for c in ("seq", "attempts", "outputs", "output_bytes", "error_code")},
    **{c: {float} for c in ("queue_wait_s", "run_s", "cost")},
    "simulated": {bool},
    "retired": {bool},
}
# SQLite's json_each types, as the Python values json.loads makes of them.
_JSON_KINDS: dict[str, type] = {"integer": int, "real": float, "text": str, "true": bool, "false": bool}


@dataclass
class Chunk:
    """Some jobs' rows of the report, column by column: ``cells[i]`` are the values of
    ``columns[i]``, plain Python ones (None where missing); ``dtypes[i]`` its pandas type
    ("Int64", "float64", "boolean"), None for text (objects)."""

    columns: list[str]
    cells: list[list[Any]]
    dtypes: list[str | None]

    def __len__(self) -> int:
        return len(self.cells[0]) if self.cells else 0

    def column(self, name: str) -> list[Any]:
        return self.cells[self.columns.index(name)]


@dataclass(frozen=True)
class Layout:
    """A batch's columns and the kinds of value each holds, for the whole batch."""

    columns: list[str]
    kinds: dict[str, set[type]]

    @functools.cached_property
    def dtypes(self) -> list[str | None]:
        return [dtype(self.kinds.get(c, set())) for c in self.columns]


async def learn_layout(store: Store, batch: str) -> Layout:
    """The columns of ``batch``'s report (inputs and notes vary between jobs: all of them, sorted,
    between the fixed ones) and the kinds of value in each, from two queries."""
    kinds = dict(_FIXED_KINDS)
    for name, json_type in await store.input_kinds(batch):
        seen = kinds.setdefault(f"input.{name}", set())
        if json_type != "null":
            seen.add(_JSON_KINDS.get(json_type, str))  # lists and objects become text (cell)
    for meta in await store.distinct_meta(batch):
        for name, value in flatten(meta).items():
            seen = kinds.setdefault(f"meta.{name}", set())
            if value is not None:
                seen.add(type(cell(value)))
    variable = sorted((c for c in kinds if c.startswith(("input.", "meta."))),
                      key=lambda c: (not c.startswith("input."), c))
    return Layout([*HEAD_COLUMNS, *variable, *TAIL_COLUMNS], kinds)


def dtype(found: set[type]) -> str | None:
    """The pandas type of a column holding values of the kinds ``found``. A column whose values
    are ints (None where missing) is nullable integers, so a seed missing from one job stays 42
    (not 42.0) in the others; one holding a number in one job and text in another is text
    throughout (Parquet refuses a column of both)."""
    if found == {int}:
        return "Int64"
    if found and found <= {int, float}:
        return "float64"
    if found == {bool}:
        return "boolean"
    return None


def make_chunk(rows: Sequence[tuple[Any, ...]], outputs: dict[int, list[tuple[Any, ...]]],
               earlier: dict[int, list[Attempt]], batch: str, root: Path, simulated: bool,
               layout: Layout) -> Chunk:
    """The report of ``rows`` (sql.REPORT_COLUMNS) with their ``outputs`` (path, size, sha256)
    and ``earlier`` attempts; output paths made absolute under ``root``."""
    n = len(rows)
    (ids, keys, seqs, sources, models, inputs_json, metas_json, states, attempts, request_ids, errors,
     error_codes, costs, created, submitted, started, finished, apis, befores, retired,
     names) = zip(*rows, strict=True) if rows else ((),) * 21
    # One json.loads for the chunk's inputs: a hundred thousand calls cost more than the parsing.
    inputs: list[dict[str, Any]] = json.loads("[" + ",".join(inputs_json) + "]")
    metas = [_meta_cells(m) for m in metas_json]
    outs = [outputs.get(i, []) for i in ids]
    done = [[o for o in found if o[0] is not None] for found in outs]
    base = os.fspath(root)
    fixed: dict[str, list[Any]] = {
        "batch": [batch] * n,
        "key": list(keys),
        "output_name": [name or key for name, key in zip(names, keys, strict=True)],
        "seq": list(seqs),
        "source": list(sources),
        "model": list(models),
        # Every job of a --simulate run is the simulator's, submitted or not.
        "simulated": [simulated] * n,
        "api": [SIMULATOR_API] * n if simulated else list(apis),
        "request_id": list(request_ids),
        "state": list(states),
        "attempts": list(attempts),
        "created_at": [_iso(t) for t in created],
        "submitted_at": [_iso(t) for t in submitted],
        "started_at": [_iso(t) for t in started],
        "finished_at": [_iso(t) for t in finished],
        "queue_wait_s": [_span(a, b) for a, b in zip(submitted, started, strict=True)],
        "run_s": [_span(a, b) for a, b in zip(started, finished, strict=True)],
        "outputs": [len(found) for found in outs],
        # os.path.join on text, not pathlib: 100,000 jobs' worth of Path objects cost a second.
        "output_paths": [JOIN.join(os.path.join(base, o[0]) for o in d if o[0]) or None for d in done],
        "output_sha256": [JOIN.join(o[2] for o in d if o[2]) or None for d in done],
        "output_bytes": [sum(o[1] or 0 for o in d) if d else None for d in done],
        "cost": list(costs),
        "error": list(errors),
        "error_code": list(error_codes),
        "history": [_history(earlier[i], *job) if i in earlier else None
                    for i, job in zip(ids, zip(attempts, befores, request_ids, states, errors, strict=True),
                                      strict=True)],
        # No longer in the manifest: kept for the record, outside the batch's counts.
        "retired": [at is not None for at in retired],
    }
    cells = []
    for column, kind in zip(layout.columns, layout.dtypes, strict=True):
        if column in fixed:
            values = fixed[column]
        elif column.startswith("input."):
            name = column[len("input."):]
            values = [v if v.__class__ not in _NESTED else cell(v) for v in (d.get(name) for d in inputs)]
        else:
            name = column[len("meta."):]
            values = [m.get(name) for m in metas]
        cells.append(_typed(values, kind, layout.kinds.get(column, set())))
    return Chunk(list(layout.columns), cells, list(layout.dtypes))


_NESTED = (list, tuple, dict)


def _typed(values: list[Any], kind: str | None, found: set[type]) -> list[Any]:
    """``values`` as their column's type makes them: floats in a float column (3 there is 3.0),
    text in a column of mixed kinds; NaN is a missing value."""
    if kind == "float64":
        return [None if v is None or v != v else float(v) for v in values]
    if kind is None and len(found) > 1:
        return [None if v is None else str(v) for v in values]
    return values


def _history(earlier: list[Attempt], attempts: int, before: int, request_id: str | None, state: str,
             error: str | None) -> str | None:
    """Every attempt of a job that was retried, oldest first: "attempt N: request, state: error"
    joined with JOIN (None: one round only, whose attempt the other columns describe)."""
    if not earlier:
        return None
    rounds = [(a.attempt, a.request_id, a.state, a.error) for a in earlier]
    if attempts > before or request_id:
        rounds.append((attempts, request_id, state, error))
    return JOIN.join(f"attempt {n}: {rid or 'no request id'}, {st}" + (f": {err}" if err else "")
                     for n, rid, st, err in rounds)


@functools.lru_cache(maxsize=1024)  # most batches have a few different notes (matrix values, tags)
def _meta_cells(meta_json: str) -> dict[str, Any]:
    return {name: cell(value) for name, value in flatten(json.loads(meta_json)).items()}


def flatten(meta: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"matrix": {"frames": 121}} -> {"matrix.frames": 121}: one column per note."""
    flat: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, dict) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def cell(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return JOIN.join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return value


@functools.lru_cache(maxsize=4096)  # a batch's jobs are mostly recorded at one time
def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def _span(start: float | None, end: float | None) -> float | None:
    if start is None or end is None or math.isnan(end - start):
        return None
    return round(end - start, 3)
