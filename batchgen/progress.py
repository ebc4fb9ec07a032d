"""What a run tells the person (or the log collector) watching it.

On a terminal: a live panel (rich) with jobs per state, throughput, ETA, the in-flight cap and
spend. Anywhere else (cron, a pipe, CI): plain timestamped lines, one per state change worth
knowing, with no control characters, or JSON lines with --log-format json. A log file, when
asked for, always gets the plain (or JSON) lines, whatever the terminal shows.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from typing import IO, Any

from . import store as S
from .runner import Event
from .text import printable

# Which events a line is written for, by verbosity: quiet (-q), normal, verbose (-v).
_NORMAL = {S.IN_QUEUE, S.SUCCEEDED, S.FAILED, S.UNKNOWN, S.CANCELLED, S.TIMED_OUT, S.OVERDUE, "stop", "cap",
           "outage"}
_VERBOSE = _NORMAL | {S.IN_PROGRESS, S.DOWNLOADING, "retry", "note", "tune"}
_QUIET = {"stop", S.UNKNOWN, S.OVERDUE}  # money that may be at stake

# The columns of the live panel, in job order.
PANEL_STATES = [
    ("pending", (S.PENDING, S.SUBMITTING)),
    ("in queue", (S.IN_QUEUE,)),
    ("running", (S.IN_PROGRESS,)),
    ("overdue", (S.OVERDUE,)),
    ("downloading", (S.DOWNLOADING,)),
    ("done", (S.SUCCEEDED,)),
    ("failed", (S.FAILED, S.TIMED_OUT, S.CANCELLED)),
    ("unknown", (S.UNKNOWN,)),
]


def event_record(event: Event) -> dict[str, Any]:
    rec: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "event": event.kind}
    if event.job is not None:
        rec.update(batch=event.job.batch, job=event.job.key, state=event.job.state)
        if event.job.request_id:
            rec["request_id"] = event.job.request_id
    if event.message:
        # Often the API's own words (an error message): shown as text, never obeyed by a terminal.
        rec["message"] = printable(event.message)
    return rec


def format_line(event: Event, fmt: str) -> str:
    rec = event_record(event)
    if fmt == "json":
        return json.dumps(rec, ensure_ascii=False)
    text = f"{rec['time']} "
    if event.job is not None:
        text += f"{event.job.batch}/{event.job.key} {event.kind}"
        if event.message:
            text += f": {rec['message']}"
    else:
        text += rec.get("message") or event.kind
    return text


class LineLog:
    """Event lines to a stream (stderr) and/or a log file."""

    def __init__(self, stream: IO[str] | None, fmt: str = "text", verbosity: int = 1,
                 log_file: IO[str] | None = None):
        self.stream = stream
        self.fmt = fmt
        self.kinds = _QUIET if verbosity <= 0 else (_VERBOSE if verbosity >= 2 else _NORMAL)
        self.log_file = log_file

    def __call__(self, event: Event) -> None:
        line = None
        if self.log_file is not None:
            line = format_line(event, self.fmt)
            self.log_file.write(line + "\n")
            self.log_file.flush()
        if self.stream is not None and event.kind in self.kinds:
            self.stream.write((line or format_line(event, self.fmt)) + "\n")
            self.stream.flush()


class Panel:
    """The live view on a terminal. ``update(counts, runner)`` is called about twice a second."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(stderr=True)
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.started = time.monotonic()
        self.done_at_start: int | None = None
        self.recent: list[str] = []

    def __enter__(self) -> Panel:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def note(self, event: Event) -> None:
        if event.kind in (S.FAILED, S.UNKNOWN, S.TIMED_OUT, S.OVERDUE, "stop", "cap", "outage"):
            self.recent = (self.recent + [format_line(event, "text")])[-5:]

    def update(self, counts: dict[str, dict[str, int]], cap: int, spent: float, cap_note: str = "") -> None:
        from rich.table import Table

        per_state: Counter[str] = Counter()
        for states in counts.values():
            per_state.update(states)
        done = per_state[S.SUCCEEDED]
        if self.done_at_start is None:
            self.done_at_start = done
        elapsed = time.monotonic() - self.started
        rate = (done - self.done_at_start) / elapsed if elapsed > 0 else 0.0
        left = sum(per_state[s] for s in S.STATES if s not in S.TERMINAL)
        eta = f"{left / rate / 60:.1f} min" if rate > 0 and left else ("-" if left else "done")
        table = Table(title=", ".join(counts) or "batchgen", title_justify="left", expand=False)
        for label, _ in PANEL_STATES:
            table.add_column(label, justify="right")
        table.add_row(*[str(sum(per_state[s] for s in states)) for _, states in PANEL_STATES])
        footer = (f"{rate * 60:.1f} jobs/min   ETA {eta}   in-flight cap {cap}   "
                  f"spent ${spent:.2f}   {elapsed:.0f}s")
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = [table, Text(footer)]
        if cap_note:  # why the cap is what it is (--concurrency auto, or a 429)
            parts.append(Text(cap_note, style="dim"))
        parts += [Text(line, style="dim") for line in self.recent]
        self.live.update(Group(*parts))


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
