"""Where a report goes: a file written beside its name and renamed when complete (or stdout), a
chunk of jobs at a time, as CSV, JSON, JSON lines, Parquet or Excel. CSV and JSON lines are
written from plain columns (reportrows.Chunk) without pandas; Parquet and Excel from frames."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .errors import UsageError
from .reportformats import EXTENSIONS, STREAM_EXTENSIONS, by_extension
from .reportrows import Chunk
from .text import _FORMULA_START as FORMULA_START
from .text import spreadsheet_cell

if TYPE_CHECKING:
    import pandas as pd

# The extensions a report is written in (reportformats.py), in the order error messages list
# them; those written a chunk at a time, so a report can go to a pipe (-o -).
FORMATS, STREAM_FORMATS = EXTENSIONS, STREAM_EXTENSIONS

# json.dumps(..., ensure_ascii=False) makes an encoder at every call: one for all the rows.
_JSON = json.JSONEncoder(ensure_ascii=False)


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
    """Where a report goes, one chunk or frame at a time; close() makes it complete, abort()
    removes it."""

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

    def write(self, part: Chunk | pd.DataFrame) -> None:
        if self.ext in (".parquet", ".xlsx"):
            self._write_frame(_frame(part))
        else:
            self._write_text(part if isinstance(part, Chunk) else _chunk(part))
        self.rows += len(part)

    def _write_text(self, chunk: Chunk) -> None:
        assert self.fh is not None
        first = self.rows == 0
        if self.ext == ".csv":
            # The csv module over plain values writes what DataFrame.to_csv would (floats by
            # repr, missing values empty), in a third of the time.
            writer = csv.writer(self.fh, lineterminator="\n")
            if first:
                writer.writerow(chunk.columns)
            writer.writerows(zip(*_spreadsheet_columns(chunk), strict=True))
            return
        columns = chunk.columns
        lines = [_JSON.encode(dict(zip(columns, values, strict=True))) for values in zip(*chunk.cells, strict=True)]
        if self.ext == ".jsonl":
            self.fh.writelines(line + "\n" for line in lines)
        elif lines:
            # json.dumps rather than DataFrame.to_json: the latter writes "file:\/\/\/..." and
            # 42.0 for nullable integers; here every missing value is null and every number
            # stays as recorded. One record a line, inside one array.
            self.fh.write(("[\n" if first else ",\n") + ",\n".join(lines))

    def _write_frame(self, df: pd.DataFrame) -> None:
        if self.ext == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, schema=_arrow_schema(df), preserve_index=False)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(str(self.tmp), table.schema)
            self._parquet.write_table(table)
        else:
            # Excel has no appending writer in pandas; a sheet holds a million rows at most anyway.
            self._excel.append(df)

    def close(self) -> None:
        try:
            if self.ext == ".json" and self.fh is not None:
                self.fh.write("\n]\n" if self.rows else "[]\n")
            if self._parquet is not None:
                self._parquet.close()
            if self._excel:
                import pandas as pd

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


def _frame(part: Chunk | pd.DataFrame) -> pd.DataFrame:
    if not isinstance(part, Chunk):
        return part
    from .reportframe import to_frame

    return to_frame(part)


def _chunk(df: pd.DataFrame) -> Chunk:
    from .reportframe import from_frame

    return from_frame(df)


def _arrow_schema(df: pd.DataFrame) -> Any:
    """The same Parquet schema for every chunk: from the column types, which reportrows fixes
    for the whole batch; a column of text (or of nothing at all) is a string column."""
    import pyarrow as pa

    types = {"Int64": pa.int64(), "float64": pa.float64(), "boolean": pa.bool_()}
    return pa.schema([(c, types.get(str(t), pa.string())) for c, t in df.dtypes.items()])


def _for_spreadsheets(df: pd.DataFrame) -> pd.DataFrame:
    """CSV and Excel files are opened in spreadsheets, which run a cell starting with '=' (an
    error message "=HYPERLINK(...)" from the API, a prompt) as a formula: text cells are made
    plain text there (text.spreadsheet_cell). Numbers stay numbers. JSON and Parquet are read by
    programs, which get the values as recorded."""
    import pandas as pd

    out = df.copy()
    for col in out.columns:
        if out[col].dtype == object and col not in _SAFE_COLUMNS:
            out[col] = pd.Series(_spreadsheet_cells(out[col].tolist()), index=out.index, dtype=object)
    return out


def _spreadsheet_columns(chunk: Chunk) -> list[list[Any]]:
    """``chunk``'s columns with their text made safe for a spreadsheet (_for_spreadsheets,
    without a frame)."""
    return [_spreadsheet_cells(values) if kind is None and col not in _SAFE_COLUMNS else values
            for col, values, kind in zip(chunk.columns, chunk.cells, chunk.dtypes, strict=True)]


def _spreadsheet_cells(values: list[Any]) -> list[Any]:
    # The usual cell (printable, no formula start) is kept without a call: 100,000 jobs have a
    # million text cells.
    return [v if v.__class__ is not str or (v.isprintable() and not v.startswith(FORMULA_START))
            else spreadsheet_cell(v) for v in values]


# Text that batchgen itself writes, never a formula: hex keys and digests, states, ISO times.
_SAFE_COLUMNS = frozenset({"key", "state", "created_at", "submitted_at", "started_at", "finished_at",
                           "output_sha256"})
