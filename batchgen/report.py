"""One batch as a table: a row per job joining its inputs, notes, timings, outputs and error.

The table is for people (a spreadsheet) and for scripts (pandas, jq), so every cell is a plain
scalar: lists are joined with " | " and nested notes are flattened to dotted column names
(reportrows.py makes the cells; reportsink.py writes them).

Output paths are absolute: the report is usually written outside the work directory (``-o
~/reports/x.csv``) and read from yet another place, where a path relative to the work directory
would mean nothing. The store keeps them relative, so moving the work directory and running the
report again gives the new paths.

No pandas at import: a CSV or JSON-lines report never needs it (it took a third of a second
and 90 MB to load); frames are made only for programs and for Parquet and Excel.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from . import constants as C
from .app import open_batch
from .reportrows import HEAD_COLUMNS, JOIN, TAIL_COLUMNS, Chunk, Layout, learn_layout, make_chunk
from .reportsink import FORMATS, STREAM_FORMATS, open_sink, report_format
from .store import Store

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["FORMATS", "HEAD_COLUMNS", "JOIN", "STREAM_FORMATS", "TAIL_COLUMNS", "build_report", "prefetched",
           "report_chunks", "report_format", "report_tables", "stream_report", "write_report"]

T = TypeVar("T")


async def report_tables(workdir: Path, batch: str, simulated: bool | None = None,
                        chunk: int = C.REPORT_CHUNK) -> AsyncGenerator[Chunk, None]:
    """The report of ``batch`` in ``workdir`` as chunks of ``chunk`` jobs each (plain columns,
    reportrows.Chunk), in manifest order, all with the same columns and column types (so they
    can be written one after the other). ``simulated``: the batch's --simulate results, or its
    results from an API (None: those from an API if it has any; app.open_batch).

    The columns and the kinds of value in each are learnt first (reportrows.learn_layout); then
    the jobs are read and yielded a chunk at a time. A report of 100,000 jobs so holds one chunk
    of rows, never all of them."""
    async with open_batch(Path(workdir), batch, simulated) as found:
        store, root, simulated = found.store, found.root, found.simulated
        layout = await learn_layout(store, batch)
        empty = True
        # aclosing, here and below: a reader that stops early (a closed pipe) must close the
        # reads ahead before the store closes, not leave them to the event loop's shutdown.
        async with contextlib.aclosing(_chunks(store, batch, root, simulated, chunk, layout)) as parts:
            async for part in parts:
                empty = False
                yield part
        if empty:
            yield make_chunk([], {}, {}, batch, root, simulated, layout)


async def report_chunks(workdir: Path, batch: str, simulated: bool | None = None,
                        chunk: int = C.REPORT_CHUNK) -> AsyncGenerator[pd.DataFrame, None]:
    """report_tables as pandas frames, each column of its type for the whole batch (nullable
    integers, floats, nullable booleans, text as Python objects)."""
    from .reportframe import to_frame

    async with contextlib.aclosing(report_tables(workdir, batch, simulated, chunk)) as parts:
        async for part in parts:
            yield to_frame(part)


async def _chunks(store: Store, batch: str, root: Path, simulated: bool, chunk: int,
                  layout: Layout) -> AsyncGenerator[Chunk, None]:
    async with contextlib.aclosing(prefetched(store.iter_report_rows(batch, chunk))) as parts:
        async for rows, outputs in parts:
            earlier = await store.attempts([r[0] for r in rows])
            yield make_chunk(rows, outputs, earlier, batch, root, simulated, layout)


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
    import pandas as pd

    parts = [df async for df in report_chunks(workdir, batch, simulated)]
    return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)


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


async def stream_report(chunks: AsyncGenerator[Chunk, None] | AsyncGenerator[pd.DataFrame, None],
                        out: Path | None, fmt: str | None = None) -> dict[str, int]:
    """Write the report's ``chunks`` (report_tables, or report_chunks' frames) one after the
    other to ``out`` (None: stdout, CSV or JSON lines only) and return the number of jobs per
    state. Nothing of a failed report is left: files are written beside and renamed at the end."""
    sink = open_sink(out, fmt)
    counts: Counter[str] = Counter()
    try:
        async with contextlib.aclosing(chunks):
            async for part in chunks:
                sink.write(part)
                states = part.column("state") if isinstance(part, Chunk) else part["state"].tolist()
                counts.update(map(str, states))
    except BaseException:
        sink.abort()
        raise
    sink.close()
    return dict(counts)
