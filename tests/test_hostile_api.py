"""Hostile and broken surroundings, one section per area: an API that misbehaves, a work
directory that is tampered with while runs use it."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys

from conftest import image_manifest

# --- store and work directory ---
#
# A real `batchgen run` subprocess against a real simulator on loopback, while the test deletes
# a file of its work directory under it.


async def _start_run(tmp_path, sim, manifest):
    env = {**os.environ, "RUNCOMFY_API_TOKEN": "t"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchgen.cli", "run", str(manifest), "--api-url", sim.base_url,
        "--workdir", str(tmp_path / "work"), "--concurrency", "3", "-q",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


async def _remove_under_a_run(tmp_path, sim, name):
    """Start a run of 3 jobs; once all are submitted, delete ``name`` from its work directory.
    Returns the run (still going) and its manifest."""
    manifest = image_manifest(tmp_path, sim, "tamper", 3)
    proc = await _start_run(tmp_path, sim, manifest)
    store = tmp_path / "work" / "batchgen.sqlite3"
    for _ in range(400):
        await asyncio.sleep(0.025)
        try:
            with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
                if db.execute("SELECT COUNT(*) FROM jobs WHERE request_id IS NOT NULL").fetchone()[0] == 3:
                    break
        except sqlite3.Error:
            continue
    else:
        raise AssertionError("the run never submitted its jobs")
    (tmp_path / "work" / name).unlink()
    return proc, manifest


async def _ends(proc) -> tuple[int, str]:
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode, err.decode()


async def test_a_store_deleted_under_a_run_stops_it_with_exit_70_and_is_not_recreated(tmp_path, simulator):
    sim = await simulator(duration=2.0)
    proc, manifest = await _remove_under_a_run(tmp_path, sim, "batchgen.sqlite3")
    code, err = await _ends(proc)
    assert code == 70, err
    assert "was deleted, replaced or emptied while this run was using it" in err and "Traceback" not in err
    # The next run finds the work directory without its store: refused, nothing recreated, and
    # the jobs already paid for are not submitted again.
    code, err = await _ends(await _start_run(tmp_path, sim, manifest))
    assert code == 70 and "is missing" in err and "start over on purpose" in err
    assert not (tmp_path / "work" / "batchgen.sqlite3").exists()
    assert sim.calls["submit"] == 3


async def test_a_second_run_is_refused_though_the_lock_file_was_removed(tmp_path, simulator):
    sim = await simulator(duration=1.5)
    first, manifest = await _remove_under_a_run(tmp_path, sim, "batchgen.lock")
    code, err = await _ends(await _start_run(tmp_path, sim, manifest))
    assert code == 4 and "another batchgen run holds" in err, err
    code, err = await _ends(first)
    assert code == 0, err
    assert sim.calls["submit"] == 3
