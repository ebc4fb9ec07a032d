"""The simulator's jobs kept across restarts (``SimConfig.state_file``, JSON lines), so a run
interrupted under --simulate finds its jobs again, as it would at the real service."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .core import SimCore, SimJob, TokenQueue


class SavedState(SimCore):
    """Appends what changes to the state file; replays it when started."""

    def _persist(self, record: dict[str, Any]) -> None:
        if self.config.state_file is None:
            return
        self.config.state_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.config.state_file, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def _load_state(self) -> None:
        """Replay the state file: jobs accepted by an earlier simulator process exist again, so
        their request ids keep working. Each keeps its own times: its queue is replayed as it
        would have run had the simulator never stopped (records are in the order they happened),
        so jobs of earlier runs are long finished, not queued again ahead of new ones: a run's
        makespan does not grow with the work directory's history, and no queue wait is made up."""
        path = self.config.state_file
        if path is None or not path.exists():
            return
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if "publish" in rec:
                self._published[rec["publish"]] = Path(rec["path"])
            elif "job" in rec:
                j = rec["job"]
                job = SimJob(id=j["id"], owner=j["owner"], model_id=j["model_id"], input=j["input"],
                           submitted_at=j["submitted_at"], duration=j["duration"],
                           will_fail=j["will_fail"], media_key=j["media_key"],
                           offhost=j.get("offhost", False))
                self.jobs[job.id] = job
                self._order.append(job.id)
                first, kind, frames = j["media"]
                self._media_inputs.setdefault(job.media_key, (first, kind, frames))
                if j.get("image_path") and job.media_key not in self._media_image_bytes:
                    try:
                        self._media_image_bytes[job.media_key] = Path(j["image_path"]).read_bytes()
                    except OSError:
                        pass
                queue = self._queues.setdefault(job.owner, TokenQueue(self.config.concurrency))
                queue.advance(job.submitted_at, self.jobs)  # as _submit does, at its own moment
                queue.waiting.append(job)
                queue.advance(job.submitted_at, self.jobs)
            elif "cancel" in rec and rec["cancel"] in self.jobs:
                job = self.jobs[rec["cancel"]]
                self._queues[job.owner].advance(rec["at"], self.jobs)
                job.cancelled_at = rec["at"]
