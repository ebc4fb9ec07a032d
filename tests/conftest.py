"""Shared fixtures: every test runs in its own directory with no token or API URL from the
environment, and can start real simulators on free loopback ports."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from aiohttp import web
from imagefactory import make_image
from pgserver import pg_server, pg_url  # noqa: F401 - fixtures: the PostgreSQL backend's server

from batchgen.simulator import FaultConfig, SimConfig, Simulator

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "sample_manifests"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test touches real state: cwd, token and API URL all point at nothing of the user's."""
    monkeypatch.chdir(tmp_path)
    for name in ("RUNCOMFY_API_TOKEN", "RUNCOMFY_TOKEN", "RUNCOMFY_API_URL", "RUNCOMFY_BALANCE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("BATCHGEN_TRACEBACK", raising=False)
    return tmp_path


@pytest.fixture
async def make_runner(tmp_path):
    """Factory: ``runner = await make_runner(settings)``, a Runner over a real store file and a
    client of ``api_url`` (by default a loopback port nothing listens on: a call made fails at
    once, which is how a test sees that it was made). Everything it opened is closed after the
    test, even when an assert fails."""
    from contextlib import AsyncExitStack

    from batchgen.client import RunComfyClient
    from batchgen.runner import Runner
    from batchgen.store import Store

    async with AsyncExitStack() as stack:
        async def make(settings=None, api_url: str = "http://127.0.0.1:9"):
            store = await stack.enter_async_context(await Store.open(tmp_path / "runner.sqlite3"))
            client = await stack.enter_async_context(RunComfyClient(api_url, "t"))
            runner = Runner(store, client, tmp_path, settings)
            stack.callback(runner.close)
            return runner

        yield make


@pytest.fixture
async def simulator():
    """Factory: ``sim = await simulator(duration=0.2, faults=["429=0.1"])`` starts one."""
    started: list[Simulator] = []

    async def make(faults: list[str] | None = None, **config) -> Simulator:
        config.setdefault("duration", 0.2)
        sim = Simulator(SimConfig(faults=FaultConfig.parse(faults or []), **config))
        await sim.start()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        await sim.stop()


@pytest.fixture
def samples(tmp_path) -> Path:
    """A copy of sample_manifests/ that a test may change."""
    dest = tmp_path / "samples"
    shutil.copytree(SAMPLES, dest)
    return dest


def image_manifest(tmp_path: Path, sim: Simulator, name: str, n: int) -> Path:
    """A manifest of ``n`` jobs on one image that ``sim`` serves, for runs against it as an API."""
    url = sim.publish_file(make_image(tmp_path / "in.jpg", 640, 480))
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "defaults": {"image": url},
        "jobs": [{"prompt": f"job {i}", "seed": i} for i in range(n)],
    }))
    return path


@asynccontextmanager
async def loopback(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port for the block; yields its root URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def write_file(path: Path, text: str) -> Path:
    """Write ``text`` (dedented) to ``path``, making its folder; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path
def local_ref(path: Path) -> str:
    """What a manifest records for a local file: its file:// URI with its sha256, size and type."""
    import hashlib

    from batchgen.inline import FileRef, sniff_mime

    path = Path(path).resolve()
    data = path.read_bytes()
    return FileRef(str(path), hashlib.sha256(data).hexdigest(), len(data), sniff_mime(data[:64])).uri


# ---- the store as tests drive it (what batchgen itself never needs) -------------------------------

@dataclass
class Spec:
    """A job spec as the store records one (manifest.JobSpec's fields that it reads)."""

    key: str
    seq: int
    model_id: str = "m/x"
    source: str = "t.yaml, line 1"
    inputs: dict = field(default_factory=lambda: {"prompt": "p"})
    meta: dict = field(default_factory=dict)


@pytest.fixture(params=["sqlite", "postgres"])
def store_at(request, tmp_path):
    """Where a fresh store goes, once per backend: a SQLite file, a PostgreSQL database."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")
    return tmp_path / "store.sqlite3"


@pytest.fixture
async def store(store_at):
    """A fresh store of each backend, closed after the test (the store tests' one way to get one)."""
    from batchgen.store import Store

    s = await Store.open(store_at)
    yield s
    await s.close()


async def add_jobs(store, batch: str, specs) -> int:
    """Record specs (anything with key, seq, model_id, source, inputs, meta) as jobs of ``batch``."""
    from batchgen.store import job_row

    return await store.add_rows(batch, (job_row(s) for s in specs))


async def claim_one(store, batches, now: float):
    """The next claimable job of ``batches`` (claimed: 'submitting'), or None."""
    jobs = await store.claim_many(batches, now, 1)
    return jobs[0] if jobs else None


async def events(store, job_id: int) -> list[tuple]:
    """A job's history: (at, from_state, to_state, detail), oldest first."""
    rows = await store._db.execute_fetchall(
        "SELECT at, from_state, to_state, detail FROM job_events WHERE job_id = ? ORDER BY id", (job_id,))
    return [tuple(r) for r in rows]


def run_in_terminal(*args: str, timeout: float = 120) -> tuple[int, str]:
    """``batchgen ARGS`` in a pseudo-terminal, as a user at a terminal runs it: (exit code, every
    byte it wrote, escapes included). 160 columns, so no line wraps."""
    import os
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    env = {**os.environ, "COLUMNS": "160", "LINES": "50", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([sys.executable, "-m", "batchgen.cli", *args], stdin=slave, stdout=slave,
                            stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out = bytearray()
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    return proc.wait(timeout=timeout), out.decode("utf-8", "replace")


def terminal_screen(raw: str) -> list[str]:
    """The lines a terminal holds (scrollback included) once ``raw`` is written to it: enough of
    a VT100 for rich's live display (cursor up, erase line, carriage return); colours ignored."""
    import re

    lines, row, col = [""], 0, 0
    for m in re.finditer(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b\][^\x07]*\x07|\n|\r|[^\x1b\r\n]+", raw):
        token = m.group()
        if m.group(2):
            n = int(m.group(1) or 1) if m.group(1).isdigit() else 1
            if m.group(2) == "A":
                row = max(0, row - n)
            elif m.group(2) == "B":
                row += n
            elif m.group(2) == "K":
                lines[row] = "" if m.group(1) == "2" else lines[row][:col]
        elif token == "\n":
            row, col = row + 1, 0
        elif token == "\r":
            col = 0
        elif not token.startswith("\x1b"):
            line = lines[row]
            lines[row] = line[:col].ljust(col) + token + line[col + len(token):]
            col += len(token)
        while row >= len(lines):
            lines.append("")
    return [line.rstrip() for line in lines]


def panel_rows(lines: list[str]) -> list[dict[str, int]]:
    """Every frame's counts left on the screen, by column name."""
    rows = []
    for i, line in enumerate(lines):
        if "┃ pending" in line:
            names = [c.strip() for c in line.strip("┃ ").split("┃")]
            values = [int(c) for c in lines[i + 2].strip("│ ").split("│")]
            rows.append(dict(zip(names, values, strict=True)))
    return rows
