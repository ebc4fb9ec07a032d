"""The formats a report is written in: one registry that `report` itself, `batchgen report
--help` and the README's table are all derived from (tests/test_docs.py checks the README's).
No pandas here: the CLI builds its help from this module at every start."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReportFormat:
    """One format: its name (``--format`` word, and the file extension without its dot)."""

    name: str
    what: str  # what a file of it holds, for the README
    streams: bool  # written a chunk of jobs at a time, so it can go to a pipe (-o -)
    needs: str | None = None  # a package batchgen does not require (the `formats` extra)

    @property
    def ext(self) -> str:
        return "." + self.name


# In the order messages list them.
REPORT_FORMATS: dict[str, ReportFormat] = {f.name: f for f in (
    ReportFormat("csv", "comma-separated values, one row per job (the default on stdout)", streams=True),
    ReportFormat("json", "a list, one object per job", streams=False),
    ReportFormat("parquet", "Apache Parquet, typed columns", streams=False, needs="pyarrow"),
    ReportFormat("xlsx", "an Excel sheet named `jobs` (written whole)", streams=False, needs="openpyxl"),
    ReportFormat("jsonl", "JSON lines, one object per job a line", streams=True),
)}
# Their extensions, and those that can go to stdout.
EXTENSIONS = tuple(f.ext for f in REPORT_FORMATS.values())
STREAM_EXTENSIONS = tuple(f.ext for f in REPORT_FORMATS.values() if f.streams)


def by_extension(ext: str) -> ReportFormat | None:
    return REPORT_FORMATS.get(ext.lstrip("."))


def help_list() -> str:
    """The formats for --help: ``.csv, .json, .parquet (needs pyarrow), …``."""
    return ", ".join(f.ext + (f" (needs {f.needs})" if f.needs else "") for f in REPORT_FORMATS.values())


def readme_table() -> str:
    """The README's table of formats (its `batchgen report` section holds exactly this)."""
    rows = ["| format | holds | `-o -` (stdout) | needs |", "| --- | --- | --- | --- |"]
    for f in REPORT_FORMATS.values():
        needs = f"`{f.needs}` (`pip install '.[formats]'`)" if f.needs else ""
        rows.append(f"| `{f.ext}` | {f.what} | {'yes' if f.streams else 'no'} | {needs} |")
    return "\n".join(rows) + "\n"
