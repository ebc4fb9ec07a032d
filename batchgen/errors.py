"""One exception tree for batchgen; the CLI turns each into one line and an exit code."""

from __future__ import annotations

from dataclasses import dataclass


class BatchgenError(Exception):
    """Anything batchgen reports to the user as an error."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: where it is, which field, what is wrong and what is allowed."""

    file: str
    location: str  # "row 7", "line 12", or "" for the whole file
    field: str  # "" when the problem is not about one field
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.location:
            where += f", {self.location}"
        if self.field:
            where += f", field '{self.field}'"
        return f"{where}: {self.message}"


class ManifestError(BatchgenError):
    """The manifest cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem], hint: str | None = None):
        self.problems = list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in the manifest; nothing was submitted"
        tail = f"\n{hint}" if hint else ""  # one line after them all: what would get past them
        super().__init__(head + "\n" + "\n".join(f"  {p}" for p in self.problems) + tail)


class UsageError(BatchgenError):
    """Options that do not fit together, or a missing setting such as the API token."""


class StoreError(BatchgenError):
    """The SQLite store cannot be opened, migrated or written."""


class LeaseLost(StoreError):
    """A shared store: this runner's lease expired while it was alive (paused, or cut off from
    the database, past its TTL); other runners may hold its jobs now, so it must act on none."""


class LockedError(StoreError):
    """Another batchgen run holds the work directory."""

    def __init__(self, message: str, pid: int | None = None, started: str | None = None):
        super().__init__(message)
        self.pid = pid
        self.started = started


class APIError(BatchgenError):
    """Any failure talking to the RunComfy API."""


class APIConnectionError(APIError):
    """The request certainly never reached the server (refused, DNS): safe to retry, even a submit."""


class APIResponseLostError(APIError):
    """The request may have reached the server but no answer came back (timeout, reset, bad body)."""


class MalformedAnswerError(APIResponseLostError):
    """An answer came back but cannot be read (not JSON, a missing or absurd field): as good as lost."""


class APIStatusError(APIError):
    """The server answered with an error: an HTTP error status, or an error envelope with HTTP 200."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error_code: int | None = None,
        retry_after: float | None = None,
        envelope: bool = False,
    ):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.retry_after = retry_after
        # True when the body was RunComfy's error envelope: the API itself answered. With a 4xx
        # code the request was refused; with a 5xx one it failed, maybe after creating the job.
        self.envelope = envelope


class AccountError(APIStatusError):
    """The token is missing, wrong, expired or revoked, or the account is inactive (400004, 401)."""


class InsufficientBalanceError(APIStatusError):
    """The account's balance is too low to run more jobs (400002, 402)."""


class RateLimitError(APIStatusError):
    """The server asked us to slow down (429, 408)."""


class ServerError(APIStatusError):
    """The server failed (5xx); for a submit the job may or may not exist."""


class NotFoundError(APIStatusError):
    """The request id is unknown, deleted or expired (404001)."""


class InvalidRequestError(APIStatusError):
    """The server refused the request itself (bad input, bad model id, other 4xx): it will not heal."""


class DownloadError(BatchgenError):
    """An output file could not be downloaded intact."""

    def __init__(self, message: str, *, status: int | None = None, expired: bool = False,
                 permanent: bool = False):
        super().__init__(message)
        self.status = status
        self.expired = expired
        # Trying again cannot help (a host not allowed, an output over the size cap): the job fails.
        self.permanent = permanent
