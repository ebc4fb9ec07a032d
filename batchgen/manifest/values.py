"""Values of a manifest typed as their fields want: CSV cells (always text), and YAML values
written as text or as a float where the schema wants a number.

One rule for both, so that one job written two ways is one job (one key): a CSV cell ``121``, a
CSV cell ``121.0`` (what pandas and spreadsheets write for an integer column with blanks), YAML
``121`` and YAML ``"121"`` are all the integer 121 where the schema wants an integer.
"""

from __future__ import annotations

import math
from typing import Any

_WANTED = {"integer": "a whole number", "number": "a number", "boolean": "true or false"}
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0")


class Invalid(str):
    """A value that failed its cast (already reported); it makes the job invalid."""


def typed(t: str | None, text: str) -> Any:
    """``text`` as JSON Schema type ``t`` wants it; ValueError (with what is allowed) if it
    cannot be. Text for any other type."""
    if t == "integer":
        return _integer(text)
    if t == "number":
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    if t == "boolean":
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(text)
    return text


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        value = float(text)  # '121.0' and '1.21e2' are whole numbers too; '121.5' is not
        if not value.is_integer():
            raise ValueError(text) from None
        return int(value)


def cast_error(t: str | None, text: str) -> str:
    """The message for a cell that ``typed`` refused."""
    return f"'{text}' is not {_WANTED.get(t or '', 'a valid value')}"


def coerce(t: str | None, value: Any) -> Any:
    """A YAML (or rendered template) value as a numeric field wants it, when it plainly is one:
    ``"121"`` and ``121.0`` for an integer, ``"2.5"`` for a number. Anything else is returned as
    it is, for the schema's check to report with what is allowed."""
    if t == "integer":
        if type(value) is float and value.is_integer():
            return int(value)
        if type(value) is str:
            try:
                return _integer(value.strip())
            except ValueError:
                return value
    elif t == "number" and type(value) is str:
        try:
            number = float(value.strip())
        except ValueError:
            return value
        return number if math.isfinite(number) else value
    return value


def json_problem(value: Any) -> str | None:
    """Why ``value`` cannot be sent as JSON, if it cannot."""
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} is not a number JSON can carry"
    if isinstance(value, list):
        return next((p for p in map(json_problem, value) if p), None)
    if isinstance(value, dict):
        return next((p for p in map(json_problem, value.values()) if p), None)
    return f"a {type(value).__name__} value cannot be sent; quote it to make it text"
