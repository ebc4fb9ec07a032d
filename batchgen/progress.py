"""What a run tells the person (or the log collector) watching it.

On a terminal: a live panel (rich) with jobs per state, throughput, ETA, the in-flight cap and
spend; lines worth keeping (a failure, a stop, the cap lowered) are printed above it, so they stay
in the scrollback, and its last frame is drawn from the same counts as the summary below it.
Anywhere else (cron, a pipe, CI): plain timestamped lines, one per state change worth knowing,
with no control characters, or JSON lines with --log-format json. A notice that repeats is said
once, then recapped (``RepeatedNotices``). A log file, when asked for, always gets every plain
(or JSON) line, whatever the terminal shows.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

from . import constants as C
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


# Run notices (no job) said once, then counted while they repeat (``RepeatedNotices``).
_REPEATING = {"cap", "tune", "note", "retry"}
_NUMBERS = re.compile(r"\d+(?:\.\d+)?")
_CAP_MOVE = re.compile(r"cap (\d+) -> (\d+)")


@dataclass
class _Repeats:
    first: Event
    first_at: float
    last: Event | None = None
    last_at: float = 0.0
    count: int = 1


class RepeatedNotices:
    """A notice said again and again (every 429 lowering the cap) fills a screen and pushes the
    lines that matter out of it. The first of a kind is shown at once; the same notice (its
    numbers aside) within ``window`` seconds is only counted, and when the window closes one
    recap says how often and what became of it: "provider throttling; cap 4 -> 1, 5 times in
    30 s". Job events are never held back: each is about its own job."""

    def __init__(self, window: float = C.NOTICE_REPEAT_WINDOW, clock: Callable[[], float] = time.monotonic):
        self.window = window
        self.clock = clock
        self._open: dict[tuple[str, str], _Repeats] = {}

    def offer(self, event: Event) -> list[Event]:
        """What to show now for ``event``: recaps of windows just closed, and the event itself
        unless it repeats one of a window still open."""
        shown = self.due()
        if event.job is not None or event.kind not in _REPEATING:
            return [*shown, event]
        key = (event.kind, _NUMBERS.sub("#", event.message))
        now = self.clock()
        seen = self._open.get(key)
        if seen is None:
            self._open[key] = _Repeats(event, now)
            return [*shown, event]
        seen.last, seen.last_at, seen.count = event, now, seen.count + 1
        return shown

    def due(self) -> list[Event]:
        """Recaps of the windows that have closed by now."""
        now = self.clock()
        return self._close([k for k, r in self._open.items() if now - r.first_at >= self.window])

    def flush(self) -> list[Event]:
        """Every open window's recap: the run is over."""
        return self._close(list(self._open))

    def _close(self, keys: list[tuple[str, str]]) -> list[Event]:
        recaps = []
        for key in keys:
            r = self._open.pop(key)
            if r.last is not None:
                recaps.append(Event(r.first.kind, None, _recap(r)))
        return recaps


def _recap(r: _Repeats) -> str:
    assert r.last is not None
    span = f"{r.count} times in {max(1, round(r.last_at - r.first_at))} s"
    first, last = _CAP_MOVE.search(r.first.message), _CAP_MOVE.search(r.last.message)
    if r.first.kind == "cap" and first and last:
        return f"provider throttling; cap {first.group(1)} -> {last.group(2)}, {span}"
    return f"{r.last.message} ({span})"


# What the panel prints above itself, to stay in the scrollback: what went wrong, and why the
# run is as it is.
_KEPT = {S.FAILED, S.UNKNOWN, S.TIMED_OUT, S.OVERDUE, "stop", "cap", "outage"}


class Panel:
    """The live view on a terminal (``stream``: stderr unless given). ``update(counts, ...)`` is
    called every PANEL_REFRESH_EVERY seconds, and once more with the run's final counts."""

    def __init__(self, stream: IO[str] | None = None, verbose: bool = False) -> None:
        from rich.console import Console
        from rich.live import Live

        self.console = Console(file=stream) if stream is not None else Console(stderr=True)
        self.kinds = _KEPT | _VERBOSE if verbose else _KEPT
        self.live = Live(console=self.console, refresh_per_second=4, transient=False)
        self.started = time.monotonic()
        self.done_at_start: int | None = None

    def __enter__(self) -> Panel:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def note(self, event: Event) -> None:
        """A line worth keeping, printed above the live area (where it stays in the scrollback),
        as plain text: never read as rich markup, its outside text already escaped."""
        if event.kind in self.kinds:
            from rich.text import Text

            self.console.print(Text(format_line(event, "text")), soft_wrap=True)

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
        from rich.text import Text

        # A Text, not a str: rich would read "[...]" in a batch name as markup.
        table = Table(title=Text(", ".join(counts) or "batchgen"), title_justify="left", expand=False)
        for label, _ in PANEL_STATES:
            table.add_column(label, justify="right")
        table.add_row(*[str(sum(per_state[s] for s in states)) for _, states in PANEL_STATES])
        footer = (f"{rate * 60:.1f} jobs/min   ETA {eta}   in-flight cap {cap}   "
                  f"spent ${spent:.2f}   {elapsed:.0f}s")
        from rich.console import Group

        parts: list[Any] = [table, Text(footer)]
        if cap_note:  # why the cap is what it is (--concurrency auto, or a 429)
            parts.append(Text(printable(cap_note), style="dim"))
        self.live.update(Group(*parts))


def stderr_is_tty() -> bool:
    return sys.stderr.isatty()
