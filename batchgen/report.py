"""One batch as a table: a row per job joining its inputs, notes, timings, outputs and error.

The table is for people (a spreadsheet) and for scripts (pandas, jq), so every cell is a plain
scalar: lists are joined with " | " and nested notes are flattened to dotted column names.

Output paths are absolute: the report is usually written outside the work directory (``-o
~/reports/x.csv``) and read from yet another place, where a path relative to the work directory
would mean nothing. The store keeps them relative, so moving the work directory and running the
report again gives the new paths.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from .app import find_batch
from .errors import UsageError
from .store import SIMULATOR_API, Attempt, Job, Output, Store
from .text import spreadsheet_cell

# Several values in one cell (image lists, several outputs): a separator that never appears in
# a URL or a hex digest, and reads well in a spreadsheet.
JOIN = " | "

# The fixed columns, before and after the input.* and meta.* ones.
HEAD_COLUMNS = ("batch", "key", "seq", "source", "model")
TAIL_COLUMNS = (
    "simulated", "api", "request_id", "state", "attempts", "created_at", "submitted_at", "started_at", "finished_at",
    "queue_wait_s", "run_s", "outputs", "output_paths", "output_sha256", "output_bytes", "cost",
    "error", "error_code", "history", "retired",
)

# The extensions write_report understands, in the order error messages list them.
FORMATS = (".csv", ".json", ".parquet", ".xlsx")


async def build_report(workdir: Path, batch: str, simulated: bool | None = None) -> pd.DataFrame:
    """The report of ``batch`` in ``workdir``: one row per job, in manifest order. ``simulated``:
    the batch's --simulate results, or its results from an API (None: those from an API if it
    has any; app.find_batch)."""
    workdir = Path(workdir)
    path, simulated = await find_batch(workdir, batch, simulated)
    async with await Store.open(path) as store:
        jobs = await store.jobs([batch])
        # One query per job: fine for thousands of jobs; a store method returning a batch's
        # outputs at once would be the step up if reports of 100,000 jobs become common.
        outputs = {job.id: await store.outputs(job.id) for job in jobs}
        earlier = await store.attempts([job.id for job in jobs])
    root = path.parent.resolve()  # outputs' recorded paths are relative to their store's folder
    rows = [_row(job, outputs[job.id], root, simulated, earlier.get(job.id, [])) for job in jobs]
    return _frame(rows)


def _row(job: Job, outputs: list[Output], root: Path, simulated: bool = False,
         earlier: list[Attempt] | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"batch": job.batch, "key": job.key, "seq": job.seq, "source": job.source,
                           "model": job.model_id}
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
        "output_paths": JOIN.join(str(root / o.path) for o in done if o.path) or None,
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


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    # Input and note columns vary between jobs: all of them, sorted, between the fixed ones.
    variable = sorted({c for r in rows for c in r if c.startswith(("input.", "meta."))},
                      key=lambda c: (not c.startswith("input."), c))
    columns = [*HEAD_COLUMNS, *variable, *TAIL_COLUMNS]
    # Built as objects, then typed per column from the values themselves: pandas' own inference
    # would turn an integer column with one missing value into floats (41298.0 bytes).
    # A field absent from a job is None here, never pandas' NaN, so the typing below sees it.
    df = pd.DataFrame([[r.get(c) for c in columns] for r in rows], columns=columns, dtype=object)
    for col in df.columns:
        kinds = {type(v) for v in df[col] if v is not None}
        if not kinds:
            continue
        if kinds == {int}:
            # Nullable integers: a seed missing from one job stays 42 (not 42.0) in the others.
            df[col] = df[col].astype("Int64")
        elif kinds <= {int, float}:
            df[col] = df[col].astype("float64")
        elif len(kinds) > 1:
            # A field holding a number in one job and text in another (CSV rows, notes) would
            # make a column that Parquet refuses: such a column becomes text throughout.
            df[col] = df[col].map(lambda v: None if v is None else str(v))
    return df


def write_report(df: pd.DataFrame, out: Path) -> None:
    """Write ``df`` as CSV, JSON (records), Parquet or Excel, by ``out``'s extension."""
    out = Path(out)
    ext = out.suffix.lower()
    writers: dict[str, tuple[str | None, Callable[[pd.DataFrame, Path], None]]] = {
        ".csv": (None, lambda d, p: _for_spreadsheets(d).to_csv(p, index=False)),
        ".json": (None, _write_json),
        ".parquet": ("pyarrow", lambda d, p: d.to_parquet(p, index=False)),
        ".xlsx": ("openpyxl", lambda d, p: _for_spreadsheets(d).to_excel(p, index=False, sheet_name="jobs")),
    }
    if ext not in writers:
        raise UsageError(f"cannot write a report as '{ext or out.name}'; use one of: {', '.join(FORMATS)}")
    package, write = writers[ext]
    if package is not None:
        try:
            __import__(package)
        except ImportError as exc:
            raise UsageError(f"writing {ext} needs the {package} package: pip install {package}") from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    # Write beside, then rename: a reader (or a crash) never sees half a report.
    # The temporary name keeps the extension: pandas picks the Excel engine by it.
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    try:
        write(df, tmp)
        tmp.replace(out)
    except OSError as exc:
        raise UsageError(f"cannot write {out}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _for_spreadsheets(df: pd.DataFrame) -> pd.DataFrame:
    """CSV and Excel files are opened in spreadsheets, which run a cell starting with '=' (an
    error message "=HYPERLINK(...)" from the API, a prompt) as a formula: text cells are made
    plain text there (text.spreadsheet_cell). Numbers stay numbers. JSON and Parquet are read by
    programs, which get the values as recorded."""
    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object:
            out[col] = out[col].map(spreadsheet_cell)
    return out


def _write_json(df: pd.DataFrame, path: Path) -> None:
    # json.dumps rather than DataFrame.to_json: the latter writes "file:\/\/\/..." and 42.0 for
    # nullable integers; here every missing value is null and every number stays as recorded.
    records = [{k: _plain(v) for k, v in rec.items()} for rec in df.to_dict(orient="records")]
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _plain(value: Any) -> Any:
    if value is None or _missing(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return value


def _missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


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


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="milliseconds")


def _span(start: float | None, end: float | None) -> float | None:
    if start is None or end is None or math.isnan(end - start):
        return None
    return round(end - start, 3)
