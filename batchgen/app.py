"""The core operations behind each command, free of any CLI concern.

``cli.py`` parses options into these dataclasses, calls one function and renders what comes back.
Tests call the same functions directly.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import constants as C
from . import store as S
from .client import RunComfyClient
from .downloads import discard_partials
from .errors import BatchgenError, ManifestError, UsageError
from .lock import WorkdirLock
from .manifest import is_loopback_host, load_manifest
from .runner import EventSink, Runner, RunSettings, RunSummary, local_file_resolver
from .schema import find_schema
from .store import Store
from .text import printable
from .validate import ValidationResult, validate_manifest

log = logging.getLogger(__name__)


@dataclass
class Target:
    """Where API calls go: the real API, or a simulator started for this run."""

    api_url: str | None = None
    token: str | None = None  # None: read RUNCOMFY_API_TOKEN
    simulate: bool = False
    sim_config: Any = None  # simulator.SimConfig when simulate


@dataclass
class RunOptions:
    workdir: Path = Path(C.DEFAULT_WORKDIR)
    manifest: Path | None = None  # None: resume every unfinished batch of the work directory
    batch: str | None = None  # the manifest's batch name override, or (no manifest) one batch to run
    # `batchgen retry`: jobs in these states go back to pending before the run starts ('overdue'
    # only with --force: the provider may still deliver them, and bills them).
    retry_states: tuple[str, ...] = ()
    schema: Path | None = None
    max_expand: int = C.DEFAULT_MAX_EXPAND  # most jobs the manifest may expand to
    target: Target = field(default_factory=Target)
    settings: RunSettings = field(default_factory=RunSettings)


@dataclass
class RunOutcome:
    batches: list[str]
    new_jobs: int
    summary: RunSummary
    counts: dict[str, dict[str, int]]
    # A retry without --force: overdue jobs left as they are (still followed, not resubmitted).
    overdue_kept: int = 0


def store_path(workdir: Path) -> Path:
    return Path(workdir) / C.STORE_FILENAME


def resolve_token(target: Target) -> str:
    token = target.token if target.token is not None else os.environ.get(C.TOKEN_ENV, "")
    token = token.strip()
    if not token:
        raise UsageError(
            f"no API token: set {C.TOKEN_ENV} in the environment (or use --simulate to run "
            "against the built-in simulator)"
        )
    return token


def resolve_api_url(target: Target) -> str:
    """The API's base URL; refused when the token would travel in clear text: plain http:// is
    only for loopback addresses (a simulator on this machine)."""
    url = (target.api_url or os.environ.get(C.API_URL_ENV) or C.DEFAULT_API_URL).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"API URL '{printable(url)}' is not an http(s) URL such as {C.DEFAULT_API_URL}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        raise UsageError(f"API URL '{printable(url)}' is plain http:// to a host that is not this machine: the API "
                         "token would cross the network readable by anyone on the way; use https://")
    return url


async def validate(
    manifest_path: Path, *, schema: Path | None = None, simulate: bool = False,
    batch: str | None = None, max_expand: int = C.DEFAULT_MAX_EXPAND,
) -> ValidationResult:
    """Expand and check a manifest; never submits anything."""
    manifest = load_manifest(manifest_path, batch=batch, schema_path=schema, max_expand=max_expand)
    return await validate_manifest(manifest, allow_local_files=simulate)


@asynccontextmanager
async def api_endpoint(target: Target, workdir: Path | None = None) -> AsyncIterator[tuple[str, str, Any]]:
    """(base_url, token, publish) for the run: a simulator started on a free loopback port under
    --simulate, else the configured API. ``publish`` serves local files (simulator only)."""
    if not target.simulate:
        yield resolve_api_url(target), resolve_token(target), None
        return
    from .simulator import SimConfig, Simulator

    config = target.sim_config or SimConfig()
    if config.token is None:
        # The in-process simulator accepts exactly one token of its own: the user's real token
        # (if any) is never sent to it. It is the same from run to run, with the simulator's
        # state kept in the work directory, so an interrupted --simulate run resumes its jobs.
        config.token = "batchgen-simulator"
    if workdir is not None and config.state_file is None:
        config.state_file = Path(workdir) / C.SIM_STATE_FILENAME
    sim = Simulator(config)
    await sim.start()
    try:
        yield sim.base_url, config.token, sim.publish_file
    finally:
        await sim.stop()


async def run(opts: RunOptions, on_event: EventSink | None = None,
              on_runner: Any = None) -> RunOutcome:
    """Validate (if a manifest is given), record, and run jobs to completion or a stop.

    ``on_runner(runner)`` is called once the runner exists, so the CLI can wire signals to it.
    """
    workdir = Path(opts.workdir)
    new_jobs = 0
    manifest = None
    if opts.manifest is not None:
        manifest = load_manifest(opts.manifest, batch=opts.batch, schema_path=opts.schema,
                                 max_expand=opts.max_expand)
        manifest.check_workdir(workdir)
        # One expansion serves both: jobs are kept as compact rows while they are checked, and
        # recorded only if the whole manifest passed.
        rows: list[tuple[Any, ...]] = []
        result = await validate_manifest(manifest, allow_local_files=opts.target.simulate,
                                         collect=lambda spec: rows.append(Store.job_row(spec)))
        if result.problems:
            raise ManifestError(result.problems)
    if not opts.target.simulate:
        resolve_api_url(opts.target)  # fail before taking the lock or touching the store
        resolve_token(opts.target)

    lock = WorkdirLock(workdir / C.LOCK_FILENAME)
    lock.acquire("run")
    try:
        async with await Store.open(store_path(workdir)) as store:
            if manifest is not None:
                await store.upsert_batch(
                    manifest.name, manifest.model_id, str(Path(opts.manifest).resolve()),
                    {"image_base_url": manifest.image_base_url},
                )
                new_jobs = await store.add_rows(manifest.name, rows)
                rows.clear()
                batches = [manifest.name]
            elif opts.batch is not None:
                await _require_batches(store, [opts.batch], workdir)
                batches = [opts.batch]
            else:
                counts = await store.counts()
                # Unfinished batches, and finished ones with files not yet known to be on disk:
                # after a restart of the machine, the run checks those and fetches what it lost.
                unflushed = set(await store.unsynced_batches())
                batches = [
                    b for b, per_state in counts.items()
                    if b in unflushed
                    or any(per_state.get(s, 0) for s in (S.PENDING, S.SUBMITTING, *S.FOLLOWED,
                                                         S.DOWNLOADING))
                ]
            overdue_kept = 0
            if opts.retry_states:
                for job in await store.jobs(batches, opts.retry_states):
                    await store.requeue(job, f"retry requested (was {job.state}: {job.error})")
                    discard_partials(workdir / job.batch, job.key)
                if S.OVERDUE not in opts.retry_states:
                    overdue_kept = len(await store.jobs(batches, [S.OVERDUE]))
            async with api_endpoint(opts.target, workdir) as (base_url, token, publish):
                async with RunComfyClient(base_url, token) as client:
                    price = None
                    if opts.settings.max_cost is not None:
                        price = await price_estimate(client, store, batches)
                    runner = Runner(
                        store, client, workdir, opts.settings,
                        resolve_inputs=local_file_resolver(publish), on_event=on_event,
                        price_estimate=price,
                        # A --simulate run's simulator listens on a new port each time: one API.
                        api_key="simulator" if opts.target.simulate else None,
                    )
                    if on_runner is not None:
                        on_runner(runner)
                    summary = await runner.run(batches)
            counts = await store.counts(batches)
    finally:
        lock.release()
    return RunOutcome(batches, new_jobs, summary, counts, overdue_kept)


async def price_estimate(client: RunComfyClient, store: Store, batches: list[str]) -> float | None:
    """A job's likely price for budgeting: the API's model info (seen in RunComfy's own nodes),
    else the bundled schema's, else None (the runner then learns it from the first result)."""
    prices = []
    for b in batches:
        batch = await store.batch(b)
        if batch is None:
            continue
        try:
            info = await client.model_info(batch.model_id)
            price = info.base_price_usd
        except BatchgenError as exc:
            log.info("no price from the API for %s: %s", batch.model_id, exc)
            price = None
        if price is None:
            schema = find_schema(batch.model_id)
            price = schema.base_price_usd if schema else None
        if price is not None:
            prices.append(price)
    return max(prices) if prices else None


@dataclass
class BatchStatus:
    name: str
    model_id: str
    counts: dict[str, int]
    failures: list[tuple[str, str, int]] = field(default_factory=list)  # (state, error, count)
    median_queue_s: float | None = None
    median_run_s: float | None = None
    spent_usd: float = 0.0
    next_steps: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "model": self.model_id, "total": self.total, "states": self.counts,
            "failures": [{"state": st, "error": err, "count": n} for st, err, n in self.failures],
            "median_queue_s": self.median_queue_s, "median_run_s": self.median_run_s,
            "spent_usd": round(self.spent_usd, 4), "next_steps": self.next_steps,
        }


async def _require_batches(store: Store, batches: list[str], workdir: Path) -> None:
    names = {b.name for b in await store.batches()}
    for b in batches:
        if b not in names:
            known_names = ", ".join(sorted(names)) or "none"
            raise UsageError(f"no batch named '{b}' in {workdir}; known: {known_names}")


def _existing_store(workdir: Path) -> Path:
    path = store_path(workdir)
    if not path.exists():
        raise UsageError(f"no batchgen store in {workdir} (run a manifest first, or pass --workdir)")
    return path


def _next_steps(name: str, counts: dict[str, int]) -> list[str]:
    steps = []
    if counts.get(S.UNKNOWN):
        steps.append(f"{counts[S.UNKNOWN]} job(s) have an unknown submit outcome (they may exist, and be "
                     f"billed, at the provider): batchgen retry --unknown {name}")
    failed = counts.get(S.FAILED, 0) + counts.get(S.TIMED_OUT, 0)
    if failed:
        steps.append(f"{failed} job(s) failed or timed out: batchgen retry {name}")
    if counts.get(S.OVERDUE):
        steps.append(f"{counts[S.OVERDUE]} job(s) are overdue, still at the provider (billed, and may still "
                     f"be delivered): batchgen run --batch {name} downloads them once they finish; "
                     f"batchgen retry --force {name} submits them again (paying again)")
    unfinished = sum(counts.get(s, 0) for s in S.STATES if s not in S.TERMINAL and s != S.OVERDUE)
    if unfinished:
        steps.append(f"{unfinished} job(s) are not finished: batchgen run --batch {name}")
    return steps


async def status(workdir: Path, batches: list[str] | None = None) -> list[BatchStatus]:
    import statistics  # here: 3 ms of imports that `batchgen run` would pay at every start

    async with await Store.open(_existing_store(workdir)) as store:
        known = await store.batches()
        await _require_batches(store, batches or [], workdir)
        counts = await store.counts(batches)
        out = []
        for b in known:
            if batches is not None and b.name not in batches:
                continue
            c = counts.get(b.name, {})
            waits, runs, cost = await store.timings(b.name)
            out.append(BatchStatus(
                b.name, b.model_id, c, failures=await store.failure_groups(b.name),
                median_queue_s=statistics.median(waits) if waits else None,
                median_run_s=statistics.median(runs) if runs else None,
                spent_usd=cost, next_steps=_next_steps(b.name, c),
            ))
        return out


@dataclass
class CancelReport:
    not_submitted: int = 0  # pending jobs marked cancelled
    cancelled: int = 0  # queued jobs the provider cancelled
    not_cancellable: int = 0  # already running or done: still followed by the next run
    errors: list[str] = field(default_factory=list)


async def cancel(workdir: Path, batch: str, target: Target) -> CancelReport:
    """Cancel a batch: pending jobs never get submitted; queued jobs are cancelled at the provider.
    Jobs the provider will not cancel (already running) keep being followed, so what they cost is
    still downloaded."""
    report = CancelReport()
    path = _existing_store(workdir)
    lock = WorkdirLock(Path(workdir) / C.LOCK_FILENAME)
    lock.acquire("cancel")
    try:
        async with await Store.open(path) as store:
            await _require_batches(store, [batch], workdir)
            await store.recover_interrupted([batch])
            for job in await store.jobs([batch], [S.PENDING]):
                await store.transition(job, S.CANCELLED, expect=(S.PENDING,),
                                       detail="cancelled by the user before submit",
                                       error="cancelled before submit")
                report.not_submitted += 1
            remote = await store.jobs([batch], S.FOLLOWED)
            if not remote:
                return report
            async with api_endpoint(target, Path(workdir)) as (base_url, token, _publish):
                async with RunComfyClient(base_url, token) as client:
                    for job in remote:
                        assert job.request_id is not None
                        try:
                            answer = await client.cancel(job.request_id)
                        except BatchgenError as exc:
                            report.errors.append(f"{job.key}: {exc}")
                            continue
                        if answer.outcome == "cancelled":
                            await store.transition(job, S.CANCELLED, detail="cancelled by the user",
                                                   error="cancelled by the user",
                                                   finished_at=time.time())
                            report.cancelled += 1
                        else:
                            # An overdue job stays overdue: it was given up on once already.
                            now_state = (answer.status if answer.status in S.REMOTE_ACTIVE
                                         and job.state != S.OVERDUE else job.state)
                            await store.transition(
                                job, now_state, detail=f"cancel answered {answer.outcome or '?'}"
                            )
                            report.not_cancellable += 1
    finally:
        lock.release()
    return report


@dataclass
class PlanReport:
    batch: str
    model_id: str
    jobs: int
    duplicates: int
    new: int
    recorded: dict[str, int]  # jobs of the manifest already in the store, by state
    price_usd: float | None  # per job, when known
    median_run_s: float | None  # from earlier runs of this batch

    @property
    def estimated_cost(self) -> float | None:
        return None if self.price_usd is None else self.price_usd * self.to_submit

    @property
    def to_submit(self) -> int:
        return self.new + self.recorded.get(S.PENDING, 0)

    def estimated_duration(self, concurrency: int) -> float | None:
        if self.median_run_s is None or not self.to_submit:
            return None
        return -(-self.to_submit // max(1, concurrency)) * self.median_run_s


async def plan(opts: RunOptions) -> PlanReport:
    """What `run` would do with this manifest, without submitting or recording anything."""
    assert opts.manifest is not None
    manifest = load_manifest(opts.manifest, batch=opts.batch, schema_path=opts.schema,
                                 max_expand=opts.max_expand)
    manifest.check_workdir(opts.workdir)
    result = await validate_manifest(manifest, allow_local_files=opts.target.simulate)
    if result.problems:
        raise ManifestError(result.problems)
    recorded: dict[str, int] = {}
    median_run = None
    path = store_path(opts.workdir)
    keys = [spec.key for spec in manifest.iter_jobs()]
    if path.exists():
        async with await Store.open(path) as store:
            existing = await store.existing_keys(manifest.name, keys)
            if existing:
                for job in await store.jobs([manifest.name]):
                    if job.key in existing:
                        recorded[job.state] = recorded.get(job.state, 0) + 1
            _, runs, _ = await store.timings(manifest.name)
            import statistics  # see status()

            median_run = statistics.median(runs) if runs else None
    price = manifest.schema.base_price_usd if manifest.schema else None
    if price is None and (opts.target.simulate or opts.target.token or os.environ.get(C.TOKEN_ENV)):
        try:
            async with api_endpoint(opts.target) as (base_url, token, _publish):
                async with RunComfyClient(base_url, token) as client:
                    price = (await client.model_info(manifest.model_id)).base_price_usd
        except BatchgenError as exc:
            log.info("no price for %s: %s", manifest.model_id, exc)
    return PlanReport(manifest.name, manifest.model_id, len(keys), manifest.duplicates,
                      len(keys) - sum(recorded.values()), recorded, price, median_run)
