"""Templates: string values such as ``"{subject}, golden hour"`` filled from a job's variables.

Python's format syntax (``{seed:04d}`` works); ``{{`` and ``}}`` are literal braces. Only plain
names: ``{a.b}`` or ``{a[0]}`` would reach into values, which a manifest has no need for.
"""

from __future__ import annotations

import string
from functools import lru_cache
from typing import Any

Parts = tuple[tuple[str, str | None, str | None, str | None], ...]


class TemplateError(ValueError):
    """A template that cannot be rendered; ``missing`` names an undefined variable."""

    def __init__(self, message: str, missing: str | None = None):
        super().__init__(message)
        self.missing = missing


@lru_cache(maxsize=4096)
def _parse(text: str) -> Parts | str | None:
    """The parts of a template, None for plain text, or the syntax error as a string. Cached:
    the same template (from defaults) is used by every row."""
    if "{" not in text and "}" not in text:
        return None
    try:
        parts = tuple(string.Formatter().parse(text))
    except ValueError as exc:
        return f"bad template ({exc}); write {{{{ and }}}} for literal braces"
    for _, name, _, _ in parts:
        if name is not None and (name == "" or "." in name or "[" in name):
            return (f"bad template field {{{name}}}: use a plain name such as {{subject}}; "
                    "write {{ and }} for literal braces")
    return parts


def template_names(value: Any) -> set[str]:
    """Variables a value (a string, or a list of them) uses."""
    if isinstance(value, list):
        return set().union(*(template_names(v) for v in value)) if value else set()
    if not isinstance(value, str):
        return set()
    parts = _parse(value)
    if not isinstance(parts, tuple):
        return set()
    return {name for _, name, _, _ in parts if name}


def needs_rendering(value: Any) -> bool:
    """Whether ``value`` may hold a template. Plain text and plain values (most of a large
    matrix) need no template work; nor a list of strings without braces (image URLs)."""
    if isinstance(value, str):
        return "{" in value or "}" in value
    if not isinstance(value, list):
        return False
    for v in value:
        if type(v) is not str or "{" in v or "}" in v:
            return True
    return False


def render(value: Any, variables: dict[str, Any]) -> Any:
    """``value`` with every ``{name}`` replaced (format specs such as ``{seed:04d}`` work)."""
    if isinstance(value, list):
        return [render(v, variables) for v in value]
    if not isinstance(value, str):
        return value
    parts = _parse(value)
    if parts is None:
        return value
    if isinstance(parts, str):
        raise TemplateError(parts)
    out = []
    for literal, name, spec, conversion in parts:
        out.append(literal)
        if name is None:
            continue
        if name not in variables:
            raise TemplateError(f"template uses {{{name}}}, which this job does not define", missing=name)
        out.append(_format(name, variables[name], spec, conversion))
    return "".join(out)


def _format(name: str, value: Any, spec: str | None, conversion: str | None) -> str:
    if conversion == "r":
        value = repr(value)
    elif conversion == "s":
        value = str(value)
    elif conversion == "a":
        value = ascii(value)
    try:
        return format(value, spec or "")
    except (ValueError, TypeError) as exc:
        raise TemplateError(f"template {{{name}:{spec}}} cannot format {value!r}: {exc}") from exc
