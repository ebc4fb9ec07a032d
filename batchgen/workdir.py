"""A work directory's layout: its realms, and the rule that a lost store is never silently
replaced by a new one.

A realm is one store with the outputs it records: the work directory itself for runs against an
API, its ``simulated/`` folder for --simulate runs. A simulated result is a placeholder: kept in
a realm of its own, it can never count as done for the API, nor be written over a real output
(ARCHITECTURE.md, "Realms").

The store is the only record of what was paid for. A realm whose store is missing or empty (zero
bytes: truncated) while the realm holds what earlier runs left (outputs, the lock file, the
store's log) has lost that record: a new store would submit, and pay for, every job again. That
is refused, and the message says how to start over on purpose.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from pathlib import Path

from . import constants as C
from .errors import StoreError


def realm(workdir: Path, simulated: bool) -> Path:
    """The folder holding the store and outputs of simulated runs, or of runs against an API."""
    return Path(workdir) / C.SIMULATED_DIR if simulated else Path(workdir)


def shared_store() -> str | None:
    """The shared store's URL (postgresql://…) if one is set (constants.STORE_ENV), else None:
    the work directory's SQLite file."""
    return os.environ.get(C.STORE_ENV) or None


def outputs_root(folder: Path) -> Path:
    """Where outputs go: the --outputs directory, else ``folder`` (the work directory's realm)."""
    given = os.environ.get(C.OUTPUTS_ENV)
    return Path(given) if given else Path(folder)


def store_path(folder: Path) -> Path:
    return Path(folder) / C.STORE_FILENAME


def leftovers(workdir: Path, simulated: bool) -> list[str]:
    """What earlier runs left in a realm's folder besides the store (names, for a message)."""
    folder = realm(workdir, simulated)
    store = C.STORE_FILENAME
    found = [name for name in (C.LOCK_FILENAME, f"{store}-wal", f"{store}-shm", C.SIM_STATE_FILENAME)
             if (folder / name).exists()]
    try:
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
    except OSError:
        subdirs = []
    for sub in subdirs:
        # The simulated realm is a realm of its own, and fixed/ holds copies of input images
        # (fiximages.py), made by validate and plan too: neither says anything of this store.
        if not simulated and sub.name in (C.SIMULATED_DIR, C.FIXED_DIR):
            continue
        with contextlib.suppress(OSError):
            if any(p.is_file() for p in sub.iterdir()):
                found.append(f"{sub.name}/")
    return found


def check_store(workdir: Path, simulated: bool) -> None:
    """Refuse a realm whose store is missing or empty while earlier runs' leftovers are there
    (StoreError: exit 70). A folder with nothing of an earlier run is fine: a store is created."""
    folder = realm(workdir, simulated)
    path = store_path(folder)
    try:
        size: int | None = path.stat().st_size
    except FileNotFoundError:
        size = None
    except OSError as exc:
        raise StoreError(f"cannot read the store {path}: {exc}") from exc
    if size:
        return
    left = leftovers(workdir, simulated)
    if not left:
        return
    state = "missing" if size is None else "empty (0 bytes)"
    aside = (f"rm -r {folder} (simulated results only)" if simulated
             else f"mv {workdir} {workdir}.old, or use another --workdir")
    raise StoreError(
        f"the store {path} is {state}, but {folder} holds what earlier runs left "
        f"({', '.join(left)}): a new store would submit, and pay for, every job again. Put the "
        f"store back (from a backup), or to start over on purpose: {aside}"
    )


def existing_store(workdir: Path, simulated: bool) -> Path | None:
    """The store of a realm for a command that only reads it (status, report, gallery), or None
    if it has none: never created, and an empty one is refused rather than given a new schema.
    A shared store (shared_store) is the one store, of every realm: its URL, as a Path."""
    if shared_store() is not None:
        return None if simulated else Path(C.SHARED_STORE_MARK)
    path = store_path(realm(workdir, simulated))
    check_store(workdir, simulated)
    if not path.exists():
        return None
    if path.stat().st_size == 0:
        raise StoreError(f"the store {path} is empty (0 bytes): it was truncated; put it back from a backup")
    return path


def legacy_simulated(workdir: Path) -> tuple[Path, set[str]] | None:
    """Before simulated results were kept apart, --simulate runs shared the API's store, and the
    in-process simulator kept its jobs in ``WORKDIR/simulator-state.jsonl``: that file, and the
    request ids it gave (jobs of the API realm with one of them ran on the simulator), or None."""
    path = Path(workdir) / C.SIM_STATE_FILENAME
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    ids = set()
    for line in lines:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            ids.add(json.loads(line)["job"]["id"])
    return path, ids


def create_store(path: Path) -> None:
    """Create an empty store file at ``path`` unless one is there, whole or not at all: a run
    killed while creating it must not leave a zero-byte store, which the next run would take
    for a truncated one (check_store)."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.new")
    try:
        conn = sqlite3.connect(tmp)
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # writes the file's header page
        finally:
            conn.close()
        with contextlib.suppress(FileExistsError):  # another process made it first: theirs
            os.link(tmp, path)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError(f"cannot create the store {path}: {exc}") from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
