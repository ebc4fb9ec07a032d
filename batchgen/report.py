"""One batch as a table: a row per job joining its inputs, notes, timings, outputs and error.

The table is for people (a spreadsheet) and for scripts (pandas, jq), so every cell is a plain
scalar: lists are joined with " | " and nested notes are flattened to dotted column names.

Output paths are absolute: the report is usually written outside the work directory (``-o
~/reports/x.csv``) and read from yet another place, where a path relative to the work directory
would mean nothing. The store keeps them relative, so moving the work directory and running the
report again gives the new paths.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import functools
import json
import math
import os
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any, TextIO, TypeVar

import pandas as pd

from . import constants as C
from .app import open_batch
from .errors import UsageError
from .reportformats import EXTENSIONS, STREAM_EXTENSIONS, by_extension
from .store import SIMULATOR_API, Attempt, Job, Output, Store
from .text import _FORMULA_START as FORMULA_START
from .text import spreadsheet_cell

T = TypeVar("T")

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

# The extensions write_report understands (reportformats.py), in the order error messages list
# them; those written a chunk at a time, so a report can go to a pipe (-o -).
FORMATS, STREAM_FORMATS = EXTENSIONS, STREAM_EXTENSIONS


async def report_chunks(workdir: Path, batch: str, simulated: bool | None = None,
                        chunk: int = C.REPORT_CHUNK) -> AsyncGenerator[pd.DataFrame, None]:
    """The report of ``batch`` in ``workdir`` as frames of ``chunk`` jobs each, in manifest order,
    all with the same columns and column types (so they can be written one after the other).
    ``simulated``: the batch's --simulate results, or its results from an API (None: those from
    an API if it has any; app.open_batch).

    The columns (inputs and notes vary between jobs) and the kinds of value in each are learnt
    first from two queries (the input names and JSON types, the distinct notes); then the jobs
    are read and yielded a chunk at a time. A report of 100,000 jobs so holds one chunk of rows,
    never a frame of everything."""
    async with open_batch(Path(workdir), batch, simulated) as found:
        store, root, simulated = found.store, found.root, found.simulated
        kinds = dict(_FIXED_KINDS)
        for name, json_type in await store.input_kinds(batch):
            seen = kinds.setdefault(f"input.{name}", set())
            if json_type != "null":
                seen.add(_JSON_KINDS.get(json_type, str))  # lists and objects become text (_cell)
        for meta in await store.distinct_meta(batch):
            for name, value in _flatten(meta).items():
                seen = kinds.setdefault(f"meta.{name}", set())
                if value is not None:
                    seen.add(type(_cell(value)))
        columns = _columns(kinds)
        empty = True
        # aclosing, here and below: a reader that stops early (a closed pipe) must close the
        # reads ahead before the store closes, not leave them to the event loop's shutdown.
        async with contextlib.aclosing(_rows(store, batch, root, simulated, chunk)) as rows:
            async for part in rows:
                empty = False
                yield _frame(part, columns, kinds)
        if empty:
            yield _frame([], columns, kinds)


# What each fixed column holds (the kinds of value _row puts there): known from the store's
# schema, so only the inputs and notes need a look at the jobs.
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


async def _rows(store: Store, batch: str, root: Path, simulated: bool,
                chunk: int) -> AsyncGenerator[list[dict[str, Any]], None]:
    async with contextlib.aclosing(prefetched(store.iter_jobs_with_outputs(batch, chunk))) as parts:
        async for part in parts:
            earlier = await store.attempts([job.id for job, _ in part])
            yield [_row(job, outputs, root, simulated, earlier.get(job.id, [])) for job, outputs in part]


async def prefetched(source: AsyncIterator[T]) -> AsyncGenerator[T, None]:
    """``source``'s items, the next one already being read while this one is used: SQLite reads
    the next chunk in its thread while this one becomes rows (a third less wall time)."""
    ahead: asyncio.Future[T] = asyncio.ensure_future(anext(source))
    try:
        while True:
            try:
                item = await ahead
            except StopAsyncIteration:
                return
            ahead = asyncio.ensure_future(anext(source))
            yield item
    finally:
        ahead.cancel()
        with contextlib.suppress(BaseException):
            await ahead


async def build_report(workdir: Path, batch: str, simulated: bool | None = None) -> pd.DataFrame:
    """The whole report of ``batch`` as one frame (report_chunks, joined): for programs and
    small batches; the command streams."""
    parts = [df async for df in report_chunks(workdir, batch, simulated)]
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


def _row(job: Job, outputs: list[Output], root: Path, simulated: bool = False,
         earlier: list[Attempt] | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"batch": job.batch, "key": job.key, "output_name": job.file_stem, "seq": job.seq,
                           "source": job.source, "model": job.model_id}
    for name, value in sorted(job.inputs.items()):
        row[f"input.{name}"] = _cell(value)
    for name, value in sorted(_flatten(job.meta).items()):
        row[f"meta.{name}"] = _cell(value)
    done = [o for o in outputs if o.path is not None]
    row.update({
        # Every job of a --simulate run is the simulator's, submitted or not.
        "simulated": simulated,
        "api": SIMULATOR_API if simulated else job.api,
        "request_id": job.request_id,
        "state": job.state,
        "attempts": job.attempts,
        "created_at": _iso(job.created_at),
        "submitted_at": _iso(job.submitted_at),
        "started_at": _iso(job.started_at),
        "finished_at": _iso(job.finished_at),
        "queue_wait_s": _span(job.submitted_at, job.started_at),
        "run_s": _span(job.started_at, job.finished_at),
        "outputs": len(outputs),
        # os.path.join, not pathlib: 100,000 jobs' worth of Path objects cost a second.
        "output_paths": JOIN.join(os.path.join(root, o.path) for o in done if o.path) or None,
        "output_sha256": JOIN.join(o.sha256 for o in done if o.sha256) or None,
        "output_bytes": sum(o.size or 0 for o in done) if done else None,
        "cost": job.cost,
        "error": job.error,
        "error_code": job.error_code,
        "history": _history(job, earlier or []),
        # No longer in the manifest: kept for the record, outside the batch's counts.
        "retired": job.retired_at is not None,
    })
    return row


def _history(job: Job, earlier: list[Attempt]) -> str | None:
    """Every attempt of a job that was retried, oldest first: "attempt N: request, state: error"
    joined with JOIN (None: one round only, whose attempt the other columns describe)."""
    if not earlier:
        return None
    rounds = [(a.attempt, a.request_id, a.state, a.error) for a in earlier]
    if job.attempts > job.attempts_before or job.request_id:
        rounds.append((job.attempts, job.request_id, job.state, job.error))
    return JOIN.join(f"attempt {n}: {rid or 'no request id'}, {state}" + (f": {err}" if err else "")
                     for n, rid, state, err in rounds)


def _columns(kinds: dict[str, set[type]]) -> list[str]:
    # Input and note columns vary between jobs: all of them, sorted, between the fixed ones.
    variable = sorted((c for c in kinds if c.startswith(("input.", "meta."))),
                      key=lambda c: (not c.startswith("input."), c))
    return [*HEAD_COLUMNS, *variable, *TAIL_COLUMNS]


def _frame(rows: list[dict[str, Any]], columns: list[str], kinds: dict[str, set[type]]) -> pd.DataFrame:
    # Built as objects, then typed per column from the kinds of value the whole batch has there
    # (not this chunk's: every chunk must have the same types). pandas' own inference would turn
    # an integer column with one missing value into floats (41298.0 bytes).
    # A field absent from a job is None here, never pandas' NaN, so the typing below sees it.
    df = pd.DataFrame([[r.get(c) for c in columns] for r in rows], columns=columns, dtype=object)
    for col in df.columns:
        found = kinds.get(col, set())
        if not found:
            continue
        if found == {int}:
            # Nullable integers: a seed missing from one job stays 42 (not 42.0) in the others.
            df[col] = df[col].astype("Int64")
        elif found <= {int, float}:
            df[col] = df[col].astype("float64")
        elif found == {bool}:
            df[col] = df[col].astype("boolean")
        elif len(found) > 1:
            # A field holding a number in one job and text in another (CSV rows, notes) would
            # make a column that Parquet refuses: such a column becomes text throughout.
            # Kept as objects: pandas would infer its string type where the chunk has text and
            # not where it has none, and chunks must agree.
            df[col] = pd.Series([None if v is None else str(v) for v in df[col].tolist()], index=df.index,
                                dtype=object)
    return df


def write_report(df: pd.DataFrame, out: Path, fmt: str | None = None) -> None:
    """Write ``df`` as CSV, JSON (records), JSON lines, Parquet or Excel, by ``fmt`` or else by
    ``out``'s extension."""
    sink = open_sink(out, fmt)
    try:
        sink.write(df)
    except BaseException:
        sink.abort()
        raise
    sink.close()


async def stream_report(chunks: AsyncGenerator[pd.DataFrame, None], out: Path | None,
                        fmt: str | None = None) -> dict[str, int]:
    """Write the report's ``chunks`` one after the other to ``out`` (None: stdout, CSV or JSON
    lines only) and return the number of jobs per state. Nothing of a failed report is left:
    files are written beside and renamed at the end."""
    sink = open_sink(out, fmt)
    counts: dict[str, int] = {}
    try:
        async with contextlib.aclosing(chunks):
            async for df in chunks:
                sink.write(df)
                for state, n in df["state"].value_counts().items():
                    counts[str(state)] = counts.get(str(state), 0) + int(n)
    except BaseException:
        sink.abort()
        raise
    sink.close()
    return counts


def report_format(out: Path | None, fmt: str | None) -> str:
    """The format, as an extension, of a report written to ``out`` (None: stdout)."""
    if fmt is not None:
        ext = "." + fmt.lower().lstrip(".")
    elif out is None:
        ext = ".csv"
    else:
        ext = Path(out).suffix.lower()
    if ext not in FORMATS:
        name = ext if fmt is not None or ext else Path(out or "-").name
        raise UsageError(f"cannot write a report as '{name}'; use one of: {', '.join(FORMATS)}")
    if out is None and ext not in STREAM_FORMATS:
        raise UsageError(f"a report on stdout is one of: {', '.join(STREAM_FORMATS)} (not {ext})")
    return ext


class Sink:
    """Where a report goes, one frame at a time; close() makes it complete, abort() removes it."""

    def __init__(self, out: Path | None, ext: str):
        self.out, self.ext = out, ext
        self.rows = 0
        self._parquet: Any = None
        self._excel: list[pd.DataFrame] = []
        if out is None:
            self.tmp: Path | None = None
            self.fh: TextIO | None = sys.stdout
            return
        out.parent.mkdir(parents=True, exist_ok=True)
        # Write beside, then rename: a reader (or a crash) never sees half a report.
        # The temporary name keeps the extension: pandas picks the Excel engine by it.
        self.tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
        self.fh = None if ext in (".parquet", ".xlsx") else self.tmp.open("w", encoding="utf-8", newline="")

    def write(self, df: pd.DataFrame) -> None:
        first = self.rows == 0
        if self.ext == ".csv":
            assert self.fh is not None
            # The csv module over plain values writes what DataFrame.to_csv would (floats by
            # repr, missing values empty), in a third of the time.
            writer = csv.writer(self.fh, lineterminator="\n")
            if first:
                writer.writerow(df.columns)
            writer.writerows(zip(*_plain_columns(df, spreadsheet=True), strict=True))
        elif self.ext in (".json", ".jsonl"):
            assert self.fh is not None
            columns = list(df.columns)
            lines = [json.dumps(dict(zip(columns, values, strict=True)), ensure_ascii=False)
                     for values in zip(*_plain_columns(df), strict=True)]
            if self.ext == ".jsonl":
                self.fh.writelines(line + "\n" for line in lines)
            elif lines:
                # json.dumps rather than DataFrame.to_json: the latter writes "file:\/\/\/..." and
                # 42.0 for nullable integers; here every missing value is null and every number
                # stays as recorded. One record a line, inside one array.
                self.fh.write(("[\n" if first else ",\n") + ",\n".join(lines))
        elif self.ext == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, schema=_arrow_schema(df), preserve_index=False)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(str(self.tmp), table.schema)
            self._parquet.write_table(table)
        else:
            # Excel has no appending writer in pandas; a sheet holds a million rows at most anyway.
            self._excel.append(df)
        self.rows += len(df)

    def close(self) -> None:
        try:
            if self.ext == ".json" and self.fh is not None:
                self.fh.write("\n]\n" if self.rows else "[]\n")
            if self._parquet is not None:
                self._parquet.close()
            if self._excel:
                assert self.tmp is not None  # Excel never goes to stdout (STREAM_FORMATS)
                df = self._excel[0] if len(self._excel) == 1 else pd.concat(self._excel, ignore_index=True)
                _for_spreadsheets(df).to_excel(self.tmp, index=False, sheet_name="jobs")
            if self.out is None:
                assert self.fh is not None
                self.fh.flush()
                return
            if self.fh is not None:
                self.fh.close()
            assert self.tmp is not None
            self.tmp.replace(self.out)
        except OSError as exc:
            self.abort()
            raise UsageError(f"cannot write {self.out or 'stdout'}: {exc}") from exc

    def abort(self) -> None:
        if self.out is None:
            return
        if self.fh is not None:
            self.fh.close()
        if self._parquet is not None:
            with contextlib.suppress(Exception):
                self._parquet.close()
        assert self.tmp is not None
        self.tmp.unlink(missing_ok=True)


def open_sink(out: Path | None, fmt: str | None = None) -> Sink:
    ext = report_format(out, fmt)
    known = by_extension(ext)
    package = known.needs if known is not None else None
    if package is not None:
        try:
            __import__(package)
        except ImportError as exc:
            raise UsageError(f"writing {ext} needs the {package} package: pip install {package}") from exc
    try:
        return Sink(None if out is None else Path(out), ext)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc}") from exc


def _arrow_schema(df: pd.DataFrame) -> Any:
    """The same Parquet schema for every chunk: from the column types, which report_chunks fixes
    for the whole batch; a column of text (or of nothing at all) is a string column."""
    import pyarrow as pa

    types = {"Int64": pa.int64(), "float64": pa.float64(), "boolean": pa.bool_()}
    return pa.schema([(c, types.get(str(t), pa.string())) for c, t in df.dtypes.items()])


def _for_spreadsheets(df: pd.DataFrame) -> pd.DataFrame:
    """CSV and Excel files are opened in spreadsheets, which run a cell starting with '=' (an
    error message "=HYPERLINK(...)" from the API, a prompt) as a formula: text cells are made
    plain text there (text.spreadsheet_cell). Numbers stay numbers. JSON and Parquet are read by
    programs, which get the values as recorded."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object and col not in _SAFE_COLUMNS:
            out[col] = pd.Series(_spreadsheet_cells(out[col].tolist()), index=out.index, dtype=object)
    return out


def _spreadsheet_cells(values: list[Any]) -> list[Any]:
    # The usual cell (printable, no formula start) is kept without a call: 100,000 jobs have a
    # million text cells.
    return [v if v.__class__ is not str or (v.isprintable() and not v.startswith(FORMULA_START))
            else spreadsheet_cell(v) for v in values]


# Text that batchgen itself writes, never a formula: hex keys and digests, states, ISO times.
_SAFE_COLUMNS = frozenset({"key", "state", "created_at", "submitted_at", "started_at", "finished_at",
                           "output_sha256"})


def _plain_columns(df: pd.DataFrame, spreadsheet: bool = False) -> list[list[Any]]:
    """Each column as plain Python values, every missing one None: what json.dumps writes as
    recorded (DataFrame.to_json would write "file:\\/\\/\\/..." and 42.0 for nullable integers);
    with ``spreadsheet``, text made safe for one (_for_spreadsheets, without copying the frame).
    Column by column: a cell at a time through pandas costs seconds for 100,000 jobs."""
    columns = []
    for col in df.columns:
        series = df[col]
        values = series.tolist()  # Python ints, floats and bools, never numpy scalars
        if series.dtype == object:
            # Objects are text or None here (_frame), never NaN: no mask to compute.
            if spreadsheet and col not in _SAFE_COLUMNS:
                values = _spreadsheet_cells(values)
            columns.append(values)
            continue
        missing = series.isna().tolist()
        columns.append([None if m else v for v, m in zip(values, missing, strict=True)])
    return columns


def _flatten(meta: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"matrix": {"frames": 121}} -> {"matrix.frames": 121}: one column per note."""
    flat: dict[str, Any] = {}
    for k, v in meta.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _cell(value: Any) -> Any:
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
