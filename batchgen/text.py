"""Text that came from outside (the API's error messages, a manifest's cells) made safe to show.

Such text is data, never control: an error message carrying ``ESC [ 2 J`` would clear the
terminal of whoever runs ``batchgen status``, an OSC 8 sequence would plant a link, a NUL cuts a
log line short for some tools, and a cell starting with ``=`` is a formula to a spreadsheet.
Every place text leaves batchgen (terminal, log lines, log file, reports, gallery) passes it
through here.
"""

from __future__ import annotations

import re
from typing import Any

# C0 and C1 control characters (ESC, BEL, NUL, CSI as U+009B, ...), DEL, and the Unicode
# controls that reorder text as shown (bidi overrides and isolates: "Trojan Source").
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# Cells a spreadsheet reads as a formula (OWASP's "CSV injection"): =, +, -, @, and a leading
# tab or carriage return, which some spreadsheet programs skip before looking.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# ... but a number written as text is not a formula: "-1" stays "-1".
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in "\t\r\n":
        return " "  # one message, one line
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``): it prints as it
    reads and moves nothing on a terminal. Tabs and line breaks become spaces, so one message
    stays one line, unless ``keep_newlines`` (a message of several lines that batchgen wrote)."""
    if text.isprintable():  # the usual case, in C: no copy, no regex
        return text
    return (_CONTROL_BUT_NEWLINE if keep_newlines else _CONTROL).sub(_escape, text)


def spreadsheet_cell(value: Any) -> Any:
    """A report cell made safe for a spreadsheet: text with control characters escaped and, if
    it would start a formula, prefixed with ``'`` (which spreadsheets read as "this is text").
    Anything but text (numbers, missing values) is left as it is."""
    if not isinstance(value, str):
        return value
    if value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(value):
        value = "'" + value
    return printable(value)
