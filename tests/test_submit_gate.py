"""SubmitGate: a download waits for the submits claimed before it, and no longer."""

from __future__ import annotations

import asyncio
import time

from batchgen import constants as C
from batchgen import store as S
from batchgen.runner.submitting import SubmitGate


async def settled(task, turns=20):
    for _ in range(turns):
        await asyncio.sleep(0)
    return task.done()


def _claimed(i):
    return S.Job(i, "b", f"k{i}", i, "m", "s", {}, {}, S.SUBMITTING, 1, None, None, None,
                 None, None, None, 0, 0, None, None, None)


async def test_a_download_waits_for_the_submits_claimed_before_it():
    # When jobs finish together, the submits that refill their slots go first: a download
    # waits while a claim is in flight or claimed jobs are unsent, and no longer.
    gate = SubmitGate()
    assert await settled(asyncio.ensure_future(gate.wait()), turns=2)  # nothing being submitted

    # A claim in flight, then its job claimed but unsent: the download waits ...
    gate.claiming = True
    waiting = asyncio.ensure_future(gate.wait())
    assert not await settled(waiting)
    job = _claimed(1)
    gate.claimed([job])
    gate.claiming = False
    gate.open_if_sent()
    assert not await settled(waiting)
    # ... until the submit takes the job.
    gate.sending(job)
    assert await settled(waiting, turns=3)


async def test_a_download_waits_at_most_the_backstop(monkeypatch):
    monkeypatch.setattr(C, "SUBMITS_FIRST_MAX", 0.05)
    gate = SubmitGate()
    gate.claiming = True
    started = time.monotonic()
    await gate.wait()
    assert 0.04 < time.monotonic() - started < 1.0


async def test_open_lets_every_waiting_download_go():
    gate = SubmitGate()
    gate.claimed([_claimed(1)])
    waiters = [asyncio.ensure_future(gate.wait()) for _ in range(3)]
    assert not await settled(waiters[0])
    gate.open()  # the run ends: nobody waits for submits that will not come
    assert all([await settled(w, turns=2) for w in waiters])
