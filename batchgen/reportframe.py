"""A report's chunk (reportrows.Chunk) as a pandas frame and back: for programs (build_report)
and the formats pandas or pyarrow write (Parquet, Excel). CSV and JSON lines never import pandas."""

from __future__ import annotations

from typing import Any

import pandas as pd

from .reportrows import Chunk


def to_frame(chunk: Chunk) -> pd.DataFrame:
    """The frame of ``chunk``: each column of its type (a text column of Python objects, None
    where missing, never pandas' NaN), so every chunk of a batch gives the same column types."""
    return pd.DataFrame({column: pd.Series(values, dtype=kind or object)
                         for column, values, kind in zip(chunk.columns, chunk.cells, chunk.dtypes, strict=True)},
                        columns=chunk.columns)


def from_frame(df: pd.DataFrame) -> Chunk:
    """``df``'s columns as plain Python values, every missing one None: what json.dumps writes
    as recorded (DataFrame.to_json would write "file:\\/\\/\\/..." and 42.0 for nullable integers).
    Column by column: a cell at a time through pandas costs seconds for 100,000 jobs."""
    cells: list[list[Any]] = []
    dtypes: list[str | None] = []
    for col in df.columns:
        series = df[col]
        values = series.tolist()  # Python ints, floats and bools, never numpy scalars
        if series.dtype == object:
            # Objects are text or None here (reportrows), never NaN: no mask to compute.
            cells.append(values)
            dtypes.append(None)
            continue
        missing = series.isna().tolist()
        cells.append([None if m else v for v, m in zip(values, missing, strict=True)])
        dtypes.append(str(series.dtype))
    return Chunk([str(c) for c in df.columns], cells, dtypes)
