"""CSV rows: read as UTF-8 text line by line, blank lines skipped, every problem with its file
and row. Cells are typed by ``values.typed`` where the schema says what a field takes."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Problem
from ..schema import ModelSchema
from .imagerefs import LIST_SEPARATOR
from .problems import ProblemLog
from .values import Invalid, cast_error, typed


class _NotText(Exception):
    def __init__(self, lineno: int, reason: str):
        super().__init__(reason)
        self.lineno, self.reason = lineno, reason


def _decoded_lines(fh: Any) -> Iterator[str]:
    """A binary file's lines as text, decoded one by one so that a bad byte is reported with
    its line (a whole-file decoder would fail at some block boundary instead)."""
    for lineno, raw in enumerate(fh, 1):
        try:
            yield raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise _NotText(lineno, exc.reason) from None


def line_count(path: Path) -> int:
    """An upper bound of a CSV file's data rows, fast (a quoted cell may span lines)."""
    lines, last = 0, b"\n"
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                lines += block.count(b"\n")
                last = block[-1:]
    except OSError:
        return 0  # reported when the rows are read
    return max(0, lines + (last != b"\n") - 1)  # less the header


def row_count(path: Path) -> int:
    """A CSV file's data rows, blank lines left out, read as ``CsvRows`` reads them (without
    casting or expanding anything). What cannot be read counts as the rows before it: the
    reading itself reports it."""
    rows = -1  # the header
    try:
        with open(path, "rb") as fh:
            for row in csv.reader(_decoded_lines(fh)):
                if rows < 0 or any(cell.strip() for cell in row):
                    rows += 1
    except (OSError, csv.Error, _NotText):
        pass
    return max(0, rows)


def header_of(path: Path) -> list[str]:
    """A CSV file's column names, read ahead of its rows; [] if it has none to read (reading the
    rows reports why)."""
    try:
        with open(path, "rb") as fh:
            return [h.strip() for h in next(csv.reader(_decoded_lines(fh)), [])]
    except (OSError, csv.Error, _NotText):
        return []


@dataclass
class CsvRows:
    """One CSV file's rows as {column: typed value}, with their row numbers (the header is row 1).

    ``header`` holds the column names once the first row is read. Problems go to ``log``.
    """

    path: Path
    name: str  # as the manifest wrote it, for messages
    schema: ModelSchema | None
    log: ProblemLog
    header: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            fh = open(self.path, "rb")  # noqa: SIM115 - closed by the with below
        except OSError as exc:
            self._problem("", "", f"cannot read: {exc.strerror or exc}")
            return
        with fh:
            yield from self._rows(csv.reader(_decoded_lines(fh)))

    def _rows(self, reader: Iterator[list[str]]) -> Iterator[tuple[int, dict[str, Any]]]:
        rowno = 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except _NotText as exc:
                self._problem(f"line {exc.lineno}", "", f"not UTF-8 text ({exc.reason}); save the file as UTF-8 "
                              "(spreadsheets call it 'CSV UTF-8')")
                return
            except csv.Error as exc:
                self._problem(f"row {rowno + 1}", "", f"not valid CSV: {exc}")
                return
            rowno += 1
            if rowno == 1:
                self.header = [h.strip() for h in row]
                if not self._header_ok():
                    return
            elif any(cell.strip() for cell in row):  # else a blank line
                values = self._values(row, rowno)
                if values is not None:
                    yield rowno, values
        if rowno == 0:
            self._problem("", "", "the CSV file is empty (it needs a header row)")

    def _header_ok(self) -> bool:
        if not any(self.header):
            self._problem("row 1", "", "the header row is empty")
            return False
        seen: set[str] = set()
        for h in self.header:
            if h and h in seen:
                self._problem("row 1", h, "column appears twice")
                return False
            seen.add(h)
        return True

    def _values(self, row: list[str], rowno: int) -> dict[str, Any] | None:
        if len(row) > len(self.header):
            self._problem(f"row {rowno}", "", f"{len(row)} cells but the header has {len(self.header)} columns")
            return None
        values: dict[str, Any] = {}
        for col, cell in zip(self.header, row, strict=False):
            cell = cell.strip()
            if cell and col:
                values[col] = self._cast(col, cell, rowno)
            elif cell:
                self.log.add(Problem(self.name, f"row {rowno}", "",
                                     "a column without a header holds values; name it, or prefix it with _ "
                                     "to keep it as a note"), once_per=(self.name, "", "unnamed"))
        return values

    def _cast(self, col: str, cell: str, rowno: int) -> Any:
        """A cell as the type its field wants (the schema says integer, number, boolean, list)."""
        schema = self.schema
        if schema is None or col not in schema.properties:
            return cell
        t = schema.field_type(col)
        if t != "array":
            return self._cast_one(t, cell, col, rowno)
        items = [v.strip() for v in cell.split(LIST_SEPARATOR) if v.strip()]
        cast = [self._cast_one(schema.item_type(col), v, col, rowno) for v in items]
        return Invalid(cell) if any(isinstance(v, Invalid) for v in cast) else cast

    def _cast_one(self, t: str | None, cell: str, col: str, rowno: int) -> Any:
        try:
            return typed(t, cell)
        except ValueError:
            self._problem(f"row {rowno}", col, cast_error(t, cell))
            return Invalid(cell)

    def _problem(self, location: str, field_name: str, message: str) -> None:
        self.log.add(Problem(self.name, location, field_name, message))
