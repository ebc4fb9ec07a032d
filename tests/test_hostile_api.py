"""Hostile and broken surroundings, one section per area: an API that misbehaves, a work
directory that is tampered with while runs use it."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys

import yaml
from imagefactory import make_image

# --- store and work directory ---
#
# A real `batchgen run` subprocess against a real simulator on loopback, while the test deletes
# files of its work directory under it.


async def _start_run(tmp_path, sim, manifest):
    env = {**os.environ, "RUNCOMFY_API_TOKEN": "t"}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "batchgen.cli", "run", str(manifest), "--api-url", sim.base_url,
        "--workdir", str(tmp_path / "work"), "--concurrency", "3", "-q",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )


def _manifest(tmp_path, sim, n=3):
    url = sim.publish_file(make_image(tmp_path / "in.jpg", 640, 480))
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tamper", "defaults": {"image": url},
        "jobs": [{"prompt": f"job {i}", "seed": i} for i in range(n)],
    }))
    return path


async def _until_submitted(tmp_path, n):
    """Wait until the running batch has ``n`` request ids in its store."""
    store = tmp_path / "work" / "batchgen.sqlite3"
    for _ in range(400):
        await asyncio.sleep(0.025)
        if not store.exists():
            continue
        try:
            with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
                got = db.execute("SELECT COUNT(*) FROM jobs WHERE request_id IS NOT NULL").fetchone()[0]
        except sqlite3.Error:
            continue
        if got >= n:
            return
    raise AssertionError("the run never submitted its jobs")


async def test_a_store_deleted_under_a_run_stops_it_with_exit_70_and_is_not_recreated(tmp_path, simulator):
    sim = await simulator(duration=2.0)
    manifest = _manifest(tmp_path, sim)
    proc = await _start_run(tmp_path, sim, manifest)
    await _until_submitted(tmp_path, 3)
    (tmp_path / "work" / "batchgen.sqlite3").unlink()
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 70, err.decode()
    assert "was deleted, replaced or emptied while this run was using it" in err.decode()
    assert "Traceback" not in err.decode()
    # The next run finds the work directory without its store: refused, nothing recreated, and
    # the jobs already paid for are not submitted again.
    again = await _start_run(tmp_path, sim, manifest)
    _, err = await asyncio.wait_for(again.communicate(), 30)
    assert again.returncode == 70 and "is missing" in err.decode() and "start over on purpose" in err.decode()
    assert not (tmp_path / "work" / "batchgen.sqlite3").exists()
    assert sim.calls["submit"] == 3


async def test_a_second_run_is_refused_though_the_lock_file_was_removed(tmp_path, simulator):
    sim = await simulator(duration=1.5)
    manifest = _manifest(tmp_path, sim)
    first = await _start_run(tmp_path, sim, manifest)
    await _until_submitted(tmp_path, 3)
    (tmp_path / "work" / "batchgen.lock").unlink()
    second = await _start_run(tmp_path, sim, manifest)
    _, err = await asyncio.wait_for(second.communicate(), 30)
    assert second.returncode == 4, err.decode()
    assert "another batchgen run holds" in err.decode()
    _, err = await asyncio.wait_for(first.communicate(), 30)
    assert first.returncode == 0, err.decode()
    assert sim.calls["submit"] == 3
