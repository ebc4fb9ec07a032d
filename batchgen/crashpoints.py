"""Named moments where a test can make batchgen kill itself with SIGKILL, to prove that a crash
at exactly that instant loses nothing and pays for nothing twice.

Off unless ``BATCHGEN_CRASH_AT=name:n`` is set (die at the n-th time ``name`` is reached), so
production runs pay one dictionary lookup per checkpoint.
"""

from __future__ import annotations

import os
import signal

_spec = os.environ.get("BATCHGEN_CRASH_AT", "")
_name, _, _count = _spec.partition(":")
_remaining = int(_count) if _count.isdigit() else 1
_seen = 0

# The checkpoints, in the order a job meets them.
POINTS = (
    "claimed",  # intent to submit committed, nothing sent yet
    "submit_answered",  # the API gave a request id, not yet recorded
    "submit_recorded",  # request id committed
    "status_answered",  # a poll answered, its news not yet recorded
    "result_recorded",  # outputs' URLs committed, nothing downloaded
    "download_partial",  # half of an output written to its .part file
    "download_done",  # a file complete on disk, not yet recorded in the store
    "job_succeeded",  # the job's success committed
)


def armed(name: str) -> bool:
    """Whether a test asked to die at ``name`` (for work done only to set up that moment)."""
    return name == _name


def reached(name: str) -> None:
    global _seen
    if not _name or name != _name:
        return
    _seen += 1
    if _seen == _remaining:
        os.kill(os.getpid(), signal.SIGKILL)
