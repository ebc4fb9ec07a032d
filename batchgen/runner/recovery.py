"""Recovery: what a run finds at its start from earlier runs (jobs caught mid-submit, jobs still
at the provider, results not yet downloaded, files recorded before they reached the disk), and
what it does when the disk refuses a flush."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import TYPE_CHECKING

from ..durability import BOOT_ID, file_intact
from ..errors import StoreError
from ..store import DOWNLOADING, FOLLOWED, OVERDUE, Job
from .core import RunCore, log


class Recovery(RunCore):
    """Resume and the checks of unflushed outputs (see the module docstring)."""

    if TYPE_CHECKING:  # from the other parts of the run
        async def _poll(self, job: Job) -> None: ...
        async def _download_job(self, job: Job) -> None: ...

    async def _resume(self) -> None:
        """Pick up where an earlier run stopped."""
        for job in await self.store.recover_interrupted(self._batches):
            self._finished(job, "submit interrupted by an earlier run; outcome unknown")
        now = time.time()
        if self.lease is not None:
            # A shared store: only the jobs no live runner holds are this run's (leasing.py).
            # Unflushed outputs are not checked: they may be another live machine's, whose
            # files this one cannot judge (its page cache is not ours).
            self.follow_resumed(await self.lease.adopt(self._batches), now)
            return
        self.follow_resumed(await self.store.jobs(self._batches, FOLLOWED), now)
        await self._check_unflushed()
        self.follow_resumed(await self.store.jobs(self._batches, [DOWNLOADING]), now)

    def follow_resumed(self, jobs: list[Job], now: float) -> None:
        """Follow jobs an earlier run (or a runner that died) left at the provider, and download
        those whose result was recorded. In the order they were sent: the provider starts them
        in that order (polls.sent)."""
        for job in sorted(jobs, key=lambda j: j.submitted_at or 0.0):
            if job.state == DOWNLOADING:
                self._spawn(self._download_job(job))
                continue
            if job.state == OVERDUE:
                # Given up on by an earlier run, but it may still be delivered: asked at once (the
                # run waits for that answer), then at the slow pace while the run has other work.
                self._followed[job.id] = job
                self._overdue.add(job.id)
                self._from_earlier_run.add(job.id)
                self._spawn(self._poll(job))
                continue
            # Already at the provider: it holds one of the provider's slots until it finishes.
            self.slots.used += 1
            self._holding_slot.add(job.id)
            self._followed[job.id] = job
            self._from_earlier_run.add(job.id)
            self.polls.enlist(job.id)
            self.polls.sent(job.id, job.submitted_at or now)
            self._schedule(job, now)

    async def _check_unflushed(self) -> None:
        """Outputs recorded before their files were flushed (durability.py), in every batch of
        the store, not only this run's. Under this boot the page cache still holds them (an
        earlier run was killed, or ended before its next flush): each file that is still there,
        at its size, is flushed, in the background. Under an earlier boot the machine went down
        first, so each file is checked against its size and sha256. A file that is gone or
        damaged is forgotten: its job goes back to downloading (this run downloads it if the job
        is in one of its batches; nothing is resubmitted)."""
        unflushed = await self.store.unsynced_outputs()
        if not unflushed:
            return
        paths = [os.path.join(self._workdir, out.path or "") for _job, out, _boot in unflushed]
        fine = await asyncio.get_running_loop().run_in_executor(self._file_threads, lambda: [
            file_intact(path, out.size, out.sha256, digest=boot != BOOT_ID)
            for path, (_job, out, boot) in zip(paths, unflushed, strict=True)])
        checked, lost = [], []
        for path, (job, out, boot), ok in zip(paths, unflushed, fine, strict=True):
            if not ok:
                lost.append((job.id, out.idx))
            elif boot == BOOT_ID:
                self._flusher.add((job.id, out.idx), path)
            else:
                checked.append((job.id, out.idx))
        self._flusher.flush_soon()  # while the run goes on; its end waits for it
        if checked:
            await self.store.mark_synced(checked)
        if lost:
            await self._forget_outputs(lost, "was missing or damaged (the machine restarted before "
                                       "it reached the disk, or it was removed); downloading it again")
            self._emit("note", None, f"{len(lost)} output file(s) missing or damaged since they were "
                       "written, before they reached the disk: their jobs are downloading again")

    async def _forget_outputs(self, keys: list[tuple[int, int]], why: str) -> None:
        """Forget the files of outputs (job id, idx): one write per job, read afresh (a job with
        several such outputs must not be moved twice)."""
        by_job: dict[int, list[int]] = {}
        for job_id, idx in keys:
            by_job.setdefault(job_id, []).append(idx)
        for job_id, idxs in by_job.items():
            job = await self.store.job(job_id)
            await self.store.output_lost(job, idxs, f"output {', '.join(map(str, idxs))} {why}")

    async def _flush_failed(self, files: dict[tuple[int, int], str], exc: Exception) -> None:
        """The disk refused to flush these files. They may never reach it, and Linux reports such
        an error only once (a later flush would look fine), so they must not be trusted: the run
        stops (every further file would go to the same disk), and once every task is done their
        outputs are forgotten, to be downloaded again (_forget_unflushable). Not here: a download
        still running could meanwhile record a job's last output and call the job succeeded."""
        self._unflushable.update(files)
        if self._flush_error is None:
            self._flush_error = StoreError(f"cannot flush downloaded files to disk: {exc}")
        self._stop_on_error(self._flush_error)

    async def _forget_unflushable(self) -> None:
        if not self._unflushable:
            return
        files, self._unflushable = self._unflushable, {}
        err = self._flush_error
        assert err is not None
        try:
            await self._forget_outputs(list(files), "could not be flushed to disk; downloading it again")
            what = f"{len(files)} output file(s) will be downloaded again by the next run"
        except Exception as exc:  # noqa: BLE001 - the store is likely on the same failing disk
            # The files keep this boot's marks, which a run under this boot trusts if the files
            # are there at their size: remove them, so that it fetches them again instead.
            for path in files.values():
                with contextlib.suppress(OSError):
                    os.unlink(path)
            what = (f"recording that failed too ({exc}); their {len(files)} file(s) were removed, "
                    "so the next run downloads them again")
        # The same exception object, whichever path raises it (it may be on its way already).
        err.args = (f"{err.args[0]} ({what})",)
        if self._error is not err:  # another error stopped the run first and is the one raised
            log.error("%s", err)
