"""What a run shows: the live panel on a terminal (driven here with a stream that says it is a
terminal), and repeated notices coalesced."""

from __future__ import annotations

import io
from types import SimpleNamespace

from conftest import panel_rows, terminal_screen

from batchgen import store as S
from batchgen.progress import Panel, RepeatedNotices
from batchgen.runner import Event
from batchgen.store import Job


class Terminal(io.StringIO):
    """A stream rich takes for a 120-column terminal."""

    def isatty(self) -> bool:
        return True


def job(key: str, state: str) -> Job:
    """What the view reads of a job (a store's Job has twenty more fields)."""
    return SimpleNamespace(batch="b", key=key, state=state, request_id=None)  # type: ignore[return-value]


def test_failure_lines_stay_above_the_panel_in_the_scrollback():
    term = Terminal()
    with Panel(term) as panel:
        for i in range(13):
            panel.note(Event(S.FAILED, job(f"k{i}", S.FAILED), "Generation failed"))
            panel.update({"b": {S.FAILED: i + 1, S.PENDING: 12 - i}}, 4, 0.0)
            panel.live.refresh()
    screen = terminal_screen(term.getvalue())
    failures = [line for line in screen if "failed: Generation failed" in line]
    assert len(failures) == 13
    # Above the panel's last frame, not inside it: nothing follows the frame but its footer.
    last_header = max(i for i, line in enumerate(screen) if "┃ pending" in line)
    assert all(screen.index(line) < last_header for line in failures)


def test_the_last_frame_shows_the_last_counts_given():
    term = Terminal()
    with Panel(term) as panel:
        panel.update({"b": {S.IN_QUEUE: 4, S.SUCCEEDED: 28}}, 4, 0.0)
        panel.live.refresh()
        panel.update({"b": {S.SUCCEEDED: 32}}, 4, 0.0)
    rows = panel_rows(terminal_screen(term.getvalue()))
    assert rows[-1]["done"] == 32 and rows[-1]["in queue"] == 0


def test_text_from_the_api_is_neither_markup_nor_terminal_control():
    term = Terminal()
    with Panel(term) as panel:
        panel.note(Event(S.FAILED, job("k", S.FAILED), "[bold red]boom[/] \x1b[2J\x1b]0;pwned\x07"))
        panel.update({"[b]": {S.FAILED: 1}}, 4, 0.0, cap_note="cap \x1b[31m")
    out = term.getvalue()
    assert "[bold red]boom[/] \\x1b[2J\\x1b]0;pwned\\x07" in out and "[b]" in out
    assert "\x1b[2J" not in out and "\x1b]0;" not in out and "\\x1b[31m" in out


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_repeated_notice_is_said_once_then_recapped():
    clock = Clock()
    notices = RepeatedNotices(window=30, clock=clock)
    shown: list[Event] = []
    for i, (before, after) in enumerate([(4, 2), (2, 1), (2, 1), (2, 1), (2, 1)]):
        clock.now = i * 6.0
        shown += notices.offer(Event("cap", None, f"cap {before} -> {after}: 429 (the provider is throttling)"))
    assert [e.message for e in shown] == ["cap 4 -> 2: 429 (the provider is throttling)"]
    # Job events are never held back, nor is a different notice.
    assert len(notices.offer(Event(S.FAILED, job("k", S.FAILED), "x"))) == 1
    assert len(notices.offer(Event("outage", None, "API unreachable"))) == 1
    clock.now = 30.0
    (recap,) = notices.due()
    assert recap.kind == "cap" and recap.message == "provider throttling; cap 4 -> 1, 5 times in 24 s"
    assert notices.due() == [] and notices.flush() == []
    # After the window, the notice is news again.
    assert len(notices.offer(Event("cap", None, "cap 2 -> 1: 429 (the provider is throttling)"))) == 1


def test_the_end_of_a_run_recaps_what_is_still_held_back():
    clock = Clock()
    notices = RepeatedNotices(window=30, clock=clock)
    notices.offer(Event("note", None, "3 output file(s) missing"))
    clock.now = 2
    assert notices.offer(Event("note", None, "4 output file(s) missing")) == []
    (recap,) = notices.flush()
    assert recap.message == "4 output file(s) missing (2 times in 2 s)"
