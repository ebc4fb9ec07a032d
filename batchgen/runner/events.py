"""What a run tells its caller: events as they happen, why it stopped, and a summary at its end."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from ..store import Job


class StopReason(enum.StrEnum):
    """Why a run stopped taking new work (a ``str``: it compares equal to its value, and is
    what the CLI prints). The only place these words are defined."""


    INTERRUPTED = "interrupted"  # Ctrl-C, SIGTERM: polls and downloads stop at once
    DEADLINE = "deadline"  # --deadline reached, or too near for another job to finish
    MAX_JOBS = "max_jobs"  # --max-jobs submits made
    BUDGET = "budget"  # --max-cost reached, or no longer keepable
    BALANCE = "balance"  # the account's balance is spent
    REFUSED = "refused"  # the API refuses every job alike (a bad token, an unknown model)
    OUTAGE = "outage"  # the API unreachable for longer than --outage-budget
    CANCELLED = "cancelled"  # `batchgen cancel` of every batch of the run
    ERROR = "error"  # a store or disk failure, or a bug: the run raises it
    # A shared store: this runner's lease expired while it lived (paused, cut off from the
    # database); the others took its jobs. Running again joins them.
    LEASE_LOST = "lease_lost"

    @property
    def resumable(self) -> bool:
        """Whether running the same command again simply goes on (the stop was the run's own
        limit or the user's wish, not something to fix first)."""
        return self in (StopReason.INTERRUPTED, StopReason.DEADLINE, StopReason.MAX_JOBS,
                        StopReason.BUDGET, StopReason.ERROR, StopReason.LEASE_LOST)


@dataclass(frozen=True)
class Event:
    """Something worth telling the user: a job changed state, or the run did something."""

    # A job state, or 'cap' (a 429 lowered the cap), 'tune' (--concurrency auto moved or held it),
    # 'stop', 'retry', 'note', 'outage' (the API unreachable, or back).
    kind: str
    job: Job | None
    message: str = ""


EventSink = Callable[[Event], None]


@dataclass
class RunSummary:
    submitted: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # terminal state -> count, this run
    stop_reason: StopReason | None = None  # None: the run did all it could
    account_error: str | None = None
    # For a stop the user must act on ('refused', 'outage'): what happened and what to do, one line.
    stop_message: str | None = None
    elapsed: float = 0.0
    api_calls: dict[str, int] = field(default_factory=dict)
    spent_usd: float = 0.0  # costs the API reported for jobs finished in this run
