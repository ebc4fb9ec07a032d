"""``ProblemLog``: the problems a manifest and its validation collect, each reported once.

The same problem is met many times: every matrix and repeat copy of a job meets its job's,
every row meets a wrong column or a template the defaults hold, and every job sharing an image
meets that image's. A user wants each one once, in the order met.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

from ..errors import Problem


class ProblemLog:
    """Problems in the order first met, without repeats.

    ``once_per`` names what a problem is about when it shows in many places (a CSV column, a
    template): the first place is reported, the others are not.
    """

    def __init__(self) -> None:
        self._problems: list[Problem] = []
        self._seen: set[Hashable] = set()

    def add(self, problem: Problem, *, once_per: Hashable | None = None) -> None:
        key = ("once", once_per)
        if problem in self._seen or (once_per is not None and key in self._seen):
            return
        self._seen.add(problem)
        if once_per is not None:
            self._seen.add(key)
        self._problems.append(problem)

    def clear(self) -> None:
        self._problems.clear()
        self._seen.clear()

    def __iter__(self) -> Iterator[Problem]:
        return iter(self._problems)

    def __len__(self) -> int:
        return len(self._problems)

    def __contains__(self, problem: object) -> bool:
        return problem in self._seen

    def as_list(self) -> list[Problem]:
        return list(self._problems)


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    """' (did you mean 'x'?)' for the closest of ``candidates``, or ''. difflib is imported only
    when a manifest has a word to correct."""
    import difflib

    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
