"""The worker pool that runs a batch's jobs (see coordinator.py), in parts: submitting,
polling (and its schedule), collecting, recovery, cancelling."""

from __future__ import annotations

from .coordinator import Runner
from .events import Event, EventSink, RunSummary, StopReason
from .schedule import PollPlanner, PollSchedule
from .settings import RunSettings

__all__ = ["Event", "EventSink", "PollPlanner", "PollSchedule", "RunSettings", "RunSummary", "Runner",
           "StopReason"]
