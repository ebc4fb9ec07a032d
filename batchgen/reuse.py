"""Jobs already generated in another batch of the work directory (a renamed batch, a copied
manifest): found by their key, and with --reuse linked instead of paid for again.

A job's key hashes its model, its inputs (a local file by its content) and its repeat index, so
the same key in another batch is the same request. It is the same *result* only with an explicit
seed: a job whose seed is random (RANDOM_SEED, or none given) is a new generation every time it
runs, and is never reused.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .outputnames import file_name
from .store import Job, Output, Store

# The seed RunComfy's models read as "pick one at random".
RANDOM_SEED = -1


def explicit_seed(inputs: dict[str, Any]) -> bool:
    """Whether ``inputs`` fix the seed, so that the same request gives the same result."""
    seed = inputs.get("seed")
    return isinstance(seed, int) and not isinstance(seed, bool) and seed != RANDOM_SEED


@dataclass
class Matches:
    """Jobs of a batch identical to jobs already succeeded in other batches."""

    reusable: dict[int, Job]  # job id -> the succeeded job of another batch (explicit seed)
    random_seed: int = 0  # identical requests whose seed is random: new generations


async def find(store: Store, batch: str, jobs: list[Job]) -> Matches:
    """The matches of ``jobs`` (of ``batch``) among other batches' succeeded jobs."""
    found = await store.succeeded_elsewhere(batch, [j.key for j in jobs])
    matches = Matches({})
    for job in jobs:
        source = found.get(job.key)
        if source is None:
            continue
        if explicit_seed(job.inputs):
            matches.reusable[job.id] = source
        else:
            matches.random_seed += 1
    return matches


async def link(store: Store, root: Path, job: Job, source: Job) -> bool:
    """Give pending ``job`` the outputs of ``source`` (a hard link to each file, a copy across
    file systems) and record it succeeded. False, and nothing recorded, if a file of ``source``
    is missing or not the size recorded (the job stays pending, and is submitted as usual)."""
    outputs = await store.outputs(source.id)
    if not outputs or any(o.path is None or o.sha256 is None for o in outputs):
        return False
    linked = await asyncio.to_thread(_place, root, job, outputs)
    if linked is None:
        return False
    await store.record_reused(job, source, linked)
    return True


def _place(root: Path, job: Job, outputs: list[Output]) -> list[Output] | None:
    """The files of ``outputs`` under ``job``'s names in its batch's folder, on disk; None if one
    is missing or not its recorded size."""
    linked: list[Output] = []
    folder = root / job.batch
    folder.mkdir(parents=True, exist_ok=True)
    for o in outputs:
        assert o.path is not None
        src = root / o.path
        try:
            if src.stat().st_size != o.size:
                return None
        except OSError:
            return None
        name = file_name(job.file_stem, o.idx, o.kind, o.url)
        dst = folder / name
        if not dst.exists():
            try:
                os.link(src, dst)
            except OSError:  # another file system: a copy, flushed
                shutil.copyfile(src, dst)
                with open(dst, "rb+") as fh:
                    os.fsync(fh.fileno())
        linked.append(Output(job.id, o.idx, o.kind, o.url, f"{job.batch}/{name}", o.size, o.sha256))
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)  # the new names, on disk before the record
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return linked
