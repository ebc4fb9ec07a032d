"""Jobs already generated in another batch of the work directory (a renamed batch, a copied
manifest): found by their key, and with --reuse linked instead of paid for again.

A job's key hashes its model, its inputs (a local file by its content) and its repeat index, so
the same key in another batch is the same request. It is the same *result* only with an explicit
seed: a job whose seed is random (RANDOM_SEED, or none given) is a new generation every time it
runs, and is never reused.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import ownfiles
from .durability import file_intact, fsync_dir
from .errors import BatchgenError
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
    is missing or not the size recorded (the job stays pending, and is submitted as usual).
    Raises BatchgenError if a file cannot be put in place (the run stops before paying for it)."""
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
    is missing, not a plain file, or not its recorded size."""
    linked: list[Output] = []
    folder = root / job.batch
    folder.mkdir(parents=True, exist_ok=True)
    for o in outputs:
        assert o.path is not None and o.sha256 is not None
        src = os.fspath(root / o.path)
        try:
            st = os.lstat(src)  # a symlink there is not a file we wrote: never followed
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size != o.size:
            return None
        name = file_name(job.file_stem, o.idx, o.kind, o.url)
        dst = os.path.join(folder, name)
        try:
            _put(src, st, dst, o)
        except OSError as exc:
            raise BatchgenError(f"{dst}: cannot put the output of {o.path} there ({exc.strerror or exc}); "
                                "move what is in the way and run again") from exc
        linked.append(Output(job.id, o.idx, o.kind, o.url, f"{job.batch}/{name}", o.size, o.sha256))
    fsync_dir(os.fspath(folder))  # the new names, on disk before the record
    return linked


def _put(src: str, src_st: os.stat_result, dst: str, o: Output) -> None:
    """``src`` (of ``src_st``) under ``dst``. A plain file already there is kept if it holds the
    output's bytes (a link made before a crash, say). Anything else under the name, a symlink (by
    the link, never what it points at) or a stray file with other bytes, is replaced as a download
    would replace it: by a new file renamed over it, never written through."""
    try:
        st: os.stat_result | None = os.lstat(dst)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode) and (
            os.path.samestat(st, src_st) or file_intact(dst, o.size, o.sha256)):
        return
    part = dst + ".part"  # a partial file of the job's: obsolete once it succeeds
    ownfiles.unlink(part)
    try:
        os.link(src, part)  # never follows a link at ``part``: that would be EEXIST
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        ownfiles.copy(src, part)  # another file system: a copy, made durable
    try:
        os.replace(part, dst)
    except OSError:
        ownfiles.unlink(part)
        raise
