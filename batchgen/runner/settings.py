"""A run's settings: limits, timeouts and polling bounds (the CLI and batchgen.toml fill them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .. import constants
from ..downloads import DownloadLimits
from ..retry import RetryPolicy


@dataclass
class RunSettings:
    # Fixed: the cap on jobs in flight. Auto (auto_concurrency): the ceiling of the cap found.
    concurrency: int = constants.DEFAULT_CONCURRENCY
    auto_concurrency: bool = False
    download_concurrency: int = constants.DEFAULT_DOWNLOAD_CONCURRENCY
    rate: float = constants.DEFAULT_RATE
    max_jobs: int | None = None  # submissions this run may start
    max_cost: float | None = None  # USD this run may commit to (actual costs + estimates in flight)
    deadline: float | None = None  # wall-clock time.time() at which the run stops
    # Seconds from submit before a job is given up on (cancelled, or else overdue); None: never.
    job_timeout: float | None = constants.DEFAULT_JOB_TIMEOUT
    overdue_poll_interval: float = constants.OVERDUE_POLL_INTERVAL
    not_found_grace: float = constants.NOT_FOUND_GRACE  # seconds after submit a 404001 is not believed
    outage_budget: float = constants.OUTAGE_BUDGET  # seconds the API may stay unreachable before the run stops
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    first_poll_delay: float = constants.FIRST_POLL_DELAY
    min_poll_interval: float = constants.MIN_POLL_INTERVAL
    max_poll_interval: float = constants.MAX_POLL_INTERVAL
    flush_every: float = constants.FLUSH_EVERY  # seconds between flushes of small files (durability.py)
    output_hosts: tuple[str, ...] = ()  # allowed besides RunComfy's and the API's (outputhosts.py)
    download_limits: DownloadLimits = field(default_factory=DownloadLimits)
