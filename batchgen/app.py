"""The core operations behind each command, free of any CLI concern.

``cli.py`` parses options into these dataclasses, calls one function and renders what comes back.
Tests call the same functions directly.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from . import catalog as catalog_mod
from . import constants as C
from . import outputnames, reuse
from . import store as S
from .catalog import Catalog
from .client import RunComfyClient
from .downloads import discard_partials
from .errors import BatchgenError, LockedError, ManifestError, UsageError
from .fiximages import FixHints, FixOptions, ImageFixer
from .lock import WorkdirLock
from .manifest import Manifest, batch_name_clash, is_loopback_host, load_manifest
from .runner import EventSink, Runner, RunSettings, RunSummary
from .runner.leasing import leased
from .schema import ModelSchema, SchemaError, find_schema, job_price
from .store import SIMULATOR_API, Store
from .text import printable
from .validate import ValidationResult, validate_manifest
from .workdir import check_store, create_store, existing_store, legacy_simulated, outputs_root, realm, shared_store
from .workdir import store_path as realm_store

log = logging.getLogger(__name__)


@dataclass
class Target:
    """Where API calls go: the real API, or a simulator started for this run."""

    api_url: str | None = None
    token: str | None = None  # None: read RUNCOMFY_API_TOKEN, else RUNCOMFY_TOKEN
    simulate: bool = False
    sim_config: Any = None  # simulator.SimConfig when simulate
    balance_url: str | None = None  # None: RUNCOMFY_BALANCE_URL, else derived (resolve_balance_url)


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
    # A model with no schema anywhere (bundled, catalog, --schema) runs with its inputs unchecked
    # instead of being refused. A model that has a schema is still checked against it.
    no_schema: bool = False
    target: Target = field(default_factory=Target)
    settings: RunSettings = field(default_factory=RunSettings)
    # Jobs identical to ones already succeeded in another batch (explicit seed) take their
    # outputs (linked) instead of being paid for again (reuse.py).
    reuse: bool = False
    # `validate --fix`, `run --fix-images`: local images failing only on format or size are sent
    # as compliant copies made in WORKDIR/fixed/ (fiximages.py). None: they stay problems.
    fix: FixOptions | None = None


@dataclass
class RunOutcome:
    batches: list[str]
    new_jobs: int
    summary: RunSummary
    counts: dict[str, dict[str, int]]
    # A retry without --force: overdue jobs left as they are (still followed, not resubmitted).
    overdue_kept: int = 0


def store_path(workdir: Path, simulated: bool = False) -> Path:
    """The store of runs against an API (or, ``simulated``, of --simulate runs) in ``workdir``."""
    return realm_store(realm(workdir, simulated))


def token_source(target: Target) -> tuple[str, str]:
    """(token, where it came from) — the name of the variable, never the value; ("", "") if none."""
    if target.token is not None:
        return target.token.strip(), "the caller"
    for name in (C.TOKEN_ENV, C.TOKEN_ENV_FALLBACK):
        token = os.environ.get(name, "").strip()
        if token:
            return token, name
    return "", ""


_TOLD_SOURCES: set[str] = set()  # said once per process: a command may open the API twice


def _say_token_source(source: str) -> None:
    if source not in _TOLD_SOURCES:
        _TOLD_SOURCES.add(source)
        log.info("API token from %s", source)


def has_token(target: Target) -> bool:
    return bool(token_source(target)[0])


def resolve_token(target: Target) -> str:
    token, _ = token_source(target)
    if not token:
        raise UsageError(
            f"no API token: set {C.TOKEN_ENV} (or {C.TOKEN_ENV_FALLBACK}) in the environment (or use "
            "--simulate to run against the built-in simulator)"
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


def api_identity(target: Target) -> str:
    """What a job records as the API it ran against (Job.api)."""
    return SIMULATOR_API if target.simulate else resolve_api_url(target)


def resolve_balance_url(target: Target, api_url: str) -> str:
    """The balance endpoint: given (option, config, RUNCOMFY_BALANCE_URL), else, for an API on a
    loopback address (a standalone simulator), the same origin at RunComfy's path, else RunComfy's."""
    given = target.balance_url or os.environ.get(C.BALANCE_URL_ENV)
    if given:
        return given
    parts = urlsplit(api_url)
    if is_loopback_host(parts.hostname):
        return f"{parts.scheme}://{parts.netloc}{C.BALANCE_PATH}"
    return C.DEFAULT_BALANCE_URL


# ---- model schemas: bundled, else RunComfy's catalog ----------------------------------------------


@dataclass
class ModelLookup:
    """Where a model's schema was found, if anywhere, and what the user should be told."""

    model_id: str
    schema: ModelSchema | None
    catalog: Catalog | None = None
    note: str = ""  # why the catalog is stale or missing
    error: str = ""  # the catalog's schema for it exists but cannot be used

    def problem(self) -> str:
        """The manifest problem when no schema was found."""
        if self.error:
            return f"model '{self.model_id}': {self.error}"
        return f"unknown model '{self.model_id}'" + catalog_mod.unknown_model_note(
            self.model_id, self.catalog, self.note)


@asynccontextmanager
async def catalog_client(target: Target) -> AsyncIterator[tuple[RunComfyClient | None, str, bool]]:
    """(client or None without a token, API URL, whether to cache): the catalog is read from the
    API the run would use. The in-process simulator's catalog is not cached."""
    if not target.simulate and not has_token(target):
        yield None, resolve_api_url(target), True
        return
    async with api_endpoint(target) as (base_url, token):
        async with RunComfyClient(base_url, token) as client:
            yield client, base_url, not target.simulate


async def open_catalog(target: Target, workdir: Path, refresh: bool = False) -> tuple[Catalog | None, str]:
    """The catalog (cached, or fetched when stale or on ``refresh``) and a note if it is not fresh."""
    async with catalog_client(target) as (client, api_url, cache):
        return await catalog_mod.current(client, workdir if cache else None, api_url, refresh)


async def find_model(model_id: str, target: Target, workdir: Path, refresh: bool = False) -> ModelLookup:
    """The model's schema: bundled (no network), else from RunComfy's catalog (cached for a day),
    else from the model's own catalog entry (a model newer than the cache)."""
    bundled = find_schema(model_id)
    if bundled is not None and not refresh:
        return ModelLookup(model_id, bundled)
    async with catalog_client(target) as (client, api_url, cache):
        catalog, note = await catalog_mod.current(client, workdir if cache else None, api_url, refresh)
        if bundled is not None:
            return ModelLookup(model_id, bundled, catalog, note)
        entry = catalog.entries.get(model_id) if catalog is not None else None
        if entry is None and client is not None:  # newer than the cache, or the listing failed
            try:
                entry = await catalog_mod.model_entry(client, model_id)
            except BatchgenError as exc:
                log.info("no catalog entry of its own for %s: %s", model_id, exc)
    if entry is None:
        return ModelLookup(model_id, None, catalog, note)
    try:
        return ModelLookup(model_id, entry.schema(), catalog, note)
    except SchemaError as exc:
        return ModelLookup(model_id, None, catalog, note, error=f"RunComfy's catalog schema cannot be used: {exc}")


async def prepare_manifest(path: Path, *, batch: str | None, schema: Path | None, target: Target,
                           workdir: Path, max_expand: int = C.DEFAULT_MAX_EXPAND,
                           ) -> tuple[Manifest, ModelLookup | None]:
    """Load a manifest and give it its model's schema: a schema file or a bundled one as loaded,
    else the catalog's. The lookup is returned when the catalog was asked (for its problem and
    notes), None when the manifest had its schema without it."""
    manifest = load_manifest(path, batch=batch, schema_path=schema, max_expand=max_expand)
    manifest.check_workdir(workdir)
    if manifest.schema is not None or schema is not None or any(
            p.field in ("schema", "model") for p in manifest.problems):
        return manifest, None
    found = await find_model(manifest.model_id, target, workdir)
    if found.schema is not None:
        manifest.use_schema(found.schema)
        if found.note:  # a stale cache served; without a schema the manifest's problem says it
            log.warning("%s", found.note)
    return manifest, found


async def check_manifest(opts: RunOptions, **kw: Any) -> tuple[Manifest, ValidationResult]:
    """``prepare_manifest`` then ``validate_manifest`` (``kw`` goes to the latter)."""
    assert opts.manifest is not None
    manifest, found = await prepare_manifest(opts.manifest, batch=opts.batch, schema=opts.schema,
                                             target=opts.target, workdir=Path(opts.workdir),
                                             max_expand=opts.max_expand)
    fixer = hints = None
    if opts.fix is not None and manifest.schema is not None:  # the schema's rules say what to fix
        # Set once the schema is final (prepare_manifest may have swapped it): the copies are
        # what the jobs send, so they are what the job keys and validation see.
        fixer = manifest.images.fixer = ImageFixer(manifest.schema, Path(opts.workdir) / C.FIXED_DIR, opts.fix)
    elif manifest.schema is not None:  # no --fix: only noted, for a hint if there are problems
        hints = manifest.images.fixer = FixHints(manifest.schema)
    result = await validate_manifest(
        manifest, no_schema=opts.no_schema,
        model_problem=found.problem() if found is not None and found.schema is None else None, **kw)
    if fixer is not None:
        result.fixed = fixer.changes()
    if hints is not None and result.problems:
        result.hint = hints.hint(opts.manifest)
    return manifest, result


async def validate(opts: RunOptions) -> ValidationResult:
    """Expand and check a manifest; never submits anything. Needs the network only for a model
    batchgen does not bundle whose catalog entry is not cached."""
    return (await check_manifest(opts))[1]


# ---- the account -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BalanceInfo:
    """The account's balance, or why it is unknown."""

    balance_usd: float | None
    currency: str = "USD"
    error: str | None = None

    def describe(self, cost: float | None) -> tuple[str, str | None]:
        """(the balance line, a warning or None) beside an estimated cost."""
        if self.balance_usd is None:
            return "balance: unknown", f"could not read the account's balance: {self.error}"
        line = f"balance: ${self.balance_usd:,.2f} {self.currency}"
        if cost is None:
            return line, None
        if cost > self.balance_usd + 1e-9:
            return line, (f"the balance (${self.balance_usd:,.2f}) cannot cover the estimated cost "
                          f"(${cost:,.2f}): jobs beyond it will be refused")
        return line + f", covers the estimated ${cost:,.2f}", None


async def account_balance(client: RunComfyClient, target: Target) -> BalanceInfo:
    """The balance from RunComfy's wallet endpoint; a failure is a BalanceInfo with its error
    (a warning for the user), never an exception: the run does not depend on it."""
    url = resolve_balance_url(target, client.base_url)
    try:
        answer = await client.balance(url)
    except BatchgenError as exc:
        return BalanceInfo(None, error=str(exc))
    return BalanceInfo(answer.balance_usd, answer.currency)


@asynccontextmanager
async def api_endpoint(target: Target, workdir: Path | None = None) -> AsyncIterator[tuple[str, str]]:
    """(base_url, token) for the run: a simulator started on a free loopback port under
    --simulate, else the configured API. Local files reach both the same way: inline."""
    if not target.simulate:
        token = resolve_token(target)
        _say_token_source(token_source(target)[1])
        yield resolve_api_url(target), token
        return
    from .simulator import SimConfig, Simulator

    config = target.sim_config or SimConfig()
    if config.token is None:
        # The in-process simulator accepts exactly one token of its own: the user's real token
        # (if any) is never sent to it. It is the same from run to run, with the simulator's
        # state kept in the work directory, so an interrupted --simulate run resumes its jobs.
        config.token = "batchgen-simulator"
    if workdir is not None and config.state_file is None:
        config.state_file = realm(workdir, True) / C.SIM_STATE_FILENAME
    sim = Simulator(config)
    await sim.start()
    try:
        yield sim.base_url, config.token
    finally:
        await sim.stop()


async def run(opts: RunOptions, on_event: EventSink | None = None,
              on_runner: Any = None, on_notice: Any = None) -> RunOutcome:
    """Validate (if a manifest is given), record, and run jobs to completion or a stop.

    ``on_runner(runner)`` is called once the runner exists, so the CLI can wire signals to it.
    ``on_notice(text, warning)`` shows what the user should know before jobs go (the balance).
    """
    workdir = Path(opts.workdir)
    new_jobs = 0
    manifest = None
    schemas: dict[str, ModelSchema | None] = {}
    if opts.manifest is not None:
        # One expansion serves both: jobs are kept as compact rows while they are checked, and
        # recorded only if the whole manifest passed.
        rows: list[tuple[Any, ...]] = []
        manifest, result = await check_manifest(opts, collect=lambda spec: rows.append(S.job_row(spec)))
        if on_notice is not None:
            for change in result.fixed:
                on_notice(f"fixed {change}", False)
        if result.problems:
            raise ManifestError(result.problems, result.hint)
        schemas[manifest.name] = manifest.schema
        if manifest.schema is None and on_notice is not None:
            on_notice(f"{manifest.name}: model {manifest.model_id} has no schema: its inputs are NOT "
                      "checked (--no-schema)", True)
    simulated = opts.target.simulate
    if not simulated:
        resolve_api_url(opts.target)  # fail before taking the lock or touching the store
        resolve_token(opts.target)
    api = api_identity(opts.target)
    folder = realm(workdir, simulated)  # simulated results live apart: workdir.py
    shared = shared_store()
    if shared is None:
        check_store(workdir, simulated)  # a lost store is never silently replaced
    # The work-directory lock is SQLite's: on a shared store, many runners are the point.
    lock = WorkdirLock(folder / C.LOCK_FILENAME) if shared is None else None
    if lock is not None:
        lock.acquire("run")
    try:
        if shared is None:
            create_store(realm_store(folder))
        async with await Store.open(shared or realm_store(folder), api=api) as store:
            if not simulated:
                await _forget_legacy_simulated(store, workdir)
            if manifest is not None:
                assert opts.manifest is not None  # the manifest was read from it
                await _refuse_case_twin(store, manifest.name)
                await store.upsert_batch(
                    manifest.name, manifest.model_id, str(Path(opts.manifest).resolve()),
                    {"image_base_url": manifest.image_base_url},
                )
                keys = [row[0] for row in rows]
                await _name_outputs(store, folder / manifest.name, manifest.name, rows)
                new_jobs = await store.add_rows(manifest.name, rows)
                rows.clear()
                # The manifest says what the batch is: jobs recorded by an earlier version of it
                # are retired (never submitted or retried; followed if at the provider).
                retired, back = await store.retire_missing(manifest.name, keys)
                if (retired or back) and on_notice is not None:
                    on_notice(f"{manifest.name}: " + ", ".join(
                        part for part in (
                            f"{retired} job(s) no longer in the manifest retired" if retired else "",
                            f"{back} retired job(s) back in the manifest" if back else "") if part),
                        False)
                await _reuse(store, outputs_root(folder), manifest.name, opts.reuse, on_notice)
                batches = [manifest.name]
            elif opts.batch is not None:
                await _require_batches(store, [opts.batch], folder)
                batches = [opts.batch]
            else:
                counts = await store.counts(retired=None)  # a retired job may still be followed
                # Unfinished batches, and finished ones with files not yet known to be on disk:
                # after a restart of the machine, the run checks those and fetches what it lost.
                unflushed = set(await store.unsynced_batches())
                batches = [
                    b for b, per_state in counts.items()
                    if b in unflushed
                    or any(per_state.get(s, 0) for s in (S.PENDING, S.SUBMITTING, *S.FOLLOWED,
                                                         S.DOWNLOADING))
                ]
            # Jobs about to go back to pending (a retry) may go to another API than their first.
            await _require_own_api(store, batches, api, ignore=opts.retry_states)
            overdue_kept = 0
            if opts.retry_states:
                await store.clear_cancel(batches)  # a retry resumes a cancelled batch
                for job in await store.jobs(batches, opts.retry_states, current=True):
                    # Half-downloaded files of the earlier try are never spliced into a new one.
                    discard_partials(outputs_root(folder) / job.batch, job.file_stem)
                    if (job.state == S.FAILED and job.request_id is not None
                            and (job.error or "").startswith(S.OUTPUT_LOST)):
                        # Delivered and paid for: fetched again, never submitted again.
                        await store.refollow(job, f"retry requested: output fetched again ({job.error})")
                        continue
                    await store.requeue(job, f"retry requested (was {job.state}: {job.error})")
                if S.OVERDUE not in opts.retry_states:
                    overdue_kept = len(await store.jobs(batches, [S.OVERDUE], current=True))
            async with api_endpoint(opts.target, workdir) as (base_url, token):
                async with RunComfyClient(base_url, token) as client:
                    price = None
                    # The account preflight: a real account only (the in-process simulator has
                    # none), and only a warning: the API itself refuses what the wallet cannot pay.
                    preflight = not opts.target.simulate and on_notice is not None
                    if opts.settings.max_cost is not None or preflight:
                        cost, price = await pending_cost(client, store, batches, schemas)
                        if preflight:
                            line, warning = (await account_balance(client, opts.target)).describe(cost)
                            on_notice(line + ("" if cost is not None else " (estimated cost unknown)"), False)
                            if warning:
                                on_notice(warning, True)
                    runner = Runner(
                        store, client, outputs_root(folder), opts.settings,
                        on_event=on_event,
                        price_estimate=price,
                        # A --simulate run's simulator listens on a new port each time: one API.
                        api_key=cap_key(opts.target),
                    )
                    if on_runner is not None:
                        on_runner(runner)
                    async with leased(runner, shared is not None):
                        summary = await runner.run(batches)
            # `batchgen run` alone answers for the whole work directory, as a run of each manifest
            # answers for its batch: a batch with nothing left to run still counts (its failed
            # jobs make the exit code 1 either way).
            whole = manifest is None and opts.batch is None
            counts = await store.counts(None if whole else batches)
    finally:
        if lock is not None:
            lock.release()
    return RunOutcome(batches, new_jobs, summary, counts, overdue_kept)


async def model_price(client: RunComfyClient, model_id: str,
                      schema: ModelSchema | None) -> tuple[float | None, str | None]:
    """(price, price_unit) of a model: the API's model info (seen in RunComfy's own nodes), else
    the schema's (bundled, or the catalog's), else (None, None)."""
    try:
        info = await client.model_info(model_id)
        if info.base_price_usd is not None:
            return info.base_price_usd, info.price_unit
    except BatchgenError as exc:
        log.info("no price from the API for %s: %s", model_id, exc)
    schema = schema if schema is not None else find_schema(model_id)
    if schema is not None and schema.base_price_usd is not None:
        return schema.base_price_usd, schema.price_unit
    return None, None


async def pending_cost(client: RunComfyClient, store: Store, batches: list[str],
                       schemas: dict[str, ModelSchema | None]) -> tuple[float | None, float | None]:
    """(what the batches' pending jobs will likely cost, or None if any price is unknown; the
    likeliest price of one job for budgeting, or None, then the runner learns it from the first
    result). A per-second price is applied to each job's own duration."""
    total: float | None = 0.0
    most: float | None = None
    counts = await store.counts(batches)
    for b in batches:
        batch = await store.batch(b)
        if batch is None:
            continue
        price, unit = await model_price(client, batch.model_id, schemas.get(b))
        pending = counts.get(b, {}).get(S.PENDING, 0)
        if price is None:
            total = None if pending else total
            continue
        if unit == "second":
            for job in await store.jobs([b], [S.PENDING, *S.REMOTE_ACTIVE]):
                each = job_price(price, unit, job.inputs)
                if each is not None:
                    most = max(most or 0.0, each)
                if job.state == S.PENDING and total is not None:
                    total = None if each is None else total + each
        else:
            each = job_price(price, unit, {})
            if each is None:
                total = None if pending else total
                continue
            most = max(most or 0.0, each)
            if total is not None:
                total += each * pending
    return total, most


async def _reuse(store: Store, folder: Path, batch: str, link: bool, on_notice: Any) -> None:
    """Pending jobs of ``batch`` identical to jobs succeeded in other batches: linked (``link``),
    or said (--reuse would)."""
    if len(await store.batches()) < 2:
        return  # no other batch: nothing to look up
    matches = await reuse.find(store, batch, await store.jobs([batch], [S.PENDING], current=True))
    say = on_notice or (lambda text, warning: log.info("%s", text))
    if matches.random_seed:
        say(f"{batch}: {matches.random_seed} job(s) repeat earlier requests with a random seed "
            f"({reuse.RANDOM_SEED}, or none): each is a new generation, submitted", False)
    if not matches.reusable:
        return
    if not link:
        say(f"{batch}: {len(matches.reusable)} job(s) are identical to jobs already succeeded in other "
            "batches (same model, inputs and seed): --reuse links their outputs instead of paying again",
            False)
        return
    linked = 0
    for job in await store.jobs([batch], [S.PENDING], current=True):
        source = matches.reusable.get(job.id)
        if source is not None and await reuse.link(store, folder, job, source):
            linked += 1
    say(f"{batch}: {linked} job(s) reused from other batches (their outputs linked, nothing paid)", False)


async def _name_outputs(store: Store, folder: Path, batch: str, rows: list[tuple[Any, ...]]) -> None:
    """Give the rows (``S.job_row``) that ask for an output name one unique in their batch,
    in place (outputnames.assign). Nothing to do, and nothing read, for a manifest without names."""
    if not any(row[6] for row in rows):
        return
    names = outputnames.assign(((row[0], row[6]) for row in rows), await store.output_names(batch),
                               outputnames.stems_in(folder))
    for i, row in enumerate(rows):
        name = names.get(row[0])
        if name != row[6]:
            rows[i] = (*row[:6], name)


async def _forget_legacy_simulated(store: Store, workdir: Path) -> None:
    """A work directory of a batchgen that kept --simulate results in the API's store: the jobs
    the simulator ran there are put back to pending, so that the API runs them (their
    placeholder files are replaced as the API's results arrive). Once: the simulator's old state
    file is then renamed."""
    legacy = legacy_simulated(workdir)
    if legacy is None:
        return
    path, ids = legacy
    for job in await store.jobs():
        if job.request_id in ids and job.api is None:
            await store.requeue(job, "ran on the built-in simulator before batchgen kept simulated "
                                     "results apart: to be run against the API", expect=S.STATES)
            discard_partials(Path(workdir) / job.batch, job.file_stem)
    path.rename(path.with_name(path.name + ".forgotten"))


async def _require_own_api(store: Store, batches: list[str], api: str,
                           ignore: tuple[str, ...] = ()) -> None:
    """A run follows, and counts as done, only jobs submitted to its own API: a request id means
    nothing to another one. A batch with jobs of another API is refused, not mixed. Jobs with
    nothing left at their API do not count (pending: a refused submit records its API; failed,
    cancelled, timed out: ended without a result), nor jobs in ``ignore`` (being retried): their
    next submit, if any, goes to this run's API."""
    done_with = (S.PENDING, S.FAILED, S.CANCELLED, S.TIMED_OUT, *ignore)
    for batch, per_api in (await store.apis(batches, exclude=done_with)).items():
        other = {a: n for a, n in per_api.items() if a != api}
        if other:
            (first, n), *_ = sorted(other.items())
            raise UsageError(
                f"batch '{batch}': {n} job(s) were submitted to {first}, and this run is against "
                f"{api}; a batch follows one API. Run it against {first} (--api-url {first}), "
                "or give the other API its own --workdir (or --batch name)"
            )


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
    look: list[str] = field(default_factory=list)  # where to see its finished jobs (look_steps)
    # Run with --simulate: every result is the built-in simulator's placeholder, not the API's.
    simulated: bool = False
    apis: list[str] = field(default_factory=list)  # the APIs its jobs were submitted to
    folder: Path | None = None  # where its outputs are
    # Jobs no longer in the manifest, by state: outside ``counts``, its advice and exit codes.
    retired: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "model": self.model_id, "simulated": self.simulated,
            "apis": self.apis, "outputs": str(self.folder) if self.folder else None,
            "total": self.total, "states": self.counts, "retired": self.retired,
            "failures": [{"state": st, "error": err, "count": n} for st, err, n in self.failures],
            "median_queue_s": self.median_queue_s, "median_run_s": self.median_run_s,
            "spent_usd": round(self.spent_usd, 4), "next_steps": self.next_steps, "look": self.look,
        }


async def _refuse_case_twin(store: Store, batch: str) -> None:
    """A new batch whose name differs from a recorded one's only by case is refused: on macOS
    and Windows the two would share a folder (manifest.batch_name_clash)."""
    clash = batch_name_clash(batch, [b.name for b in await store.batches()])
    if clash is not None:
        raise UsageError(clash)


async def _require_batches(store: Store, batches: list[str], workdir: Path) -> None:
    names = {b.name for b in await store.batches()}
    for b in batches:
        if b not in names:
            known_names = ", ".join(sorted(names)) or "none"
            raise UsageError(f"no batch named '{b}' in {workdir}; known: {known_names}")


def _existing_store(workdir: Path, simulated: bool) -> Path:
    path = existing_store(workdir, simulated)
    if path is None:
        what = "no store of --simulate runs" if simulated else "no batchgen store"
        raise UsageError(f"{what} in {workdir} (run a manifest first, or pass --workdir)")
    return path


def _outputs_of(path: Path, workdir: Path) -> Path:
    """Where the outputs of the store at ``path`` are: beside it (or --outputs); a shared
    store's, under --outputs or else the work directory."""
    if str(path) == C.SHARED_STORE_MARK:
        return outputs_root(Path(workdir))
    return outputs_root(path.parent)


def _stores(workdir: Path) -> list[tuple[Path, bool]]:
    """(store, simulated) of each realm of ``workdir`` that has one: runs against an API first."""
    found = [(p, sim) for sim in (False, True) if (p := existing_store(workdir, sim)) is not None]
    if not found:
        raise UsageError(f"no batchgen store in {workdir} (run a manifest first, or pass --workdir)")
    return found


@dataclass
class FoundBatch:
    """A batch in the store that holds it, open (``open_batch``)."""

    store: Store
    batch: S.Batch
    path: Path  # the store's file
    simulated: bool  # the store of --simulate runs
    workdir: Path = Path(C.DEFAULT_WORKDIR)

    @property
    def root(self) -> Path:
        """Where the outputs' recorded paths start: the store's folder (a shared store: the
        --outputs directory, which every machine mounts)."""
        return _outputs_of(self.path, self.workdir).resolve()


@asynccontextmanager
async def open_batch(workdir: Path, batch: str, simulated: bool | None = None) -> AsyncIterator[FoundBatch]:
    """Open the store holding ``batch`` for the block, or raise UsageError naming the batches
    there are. ``simulated`` None: the store of runs against an API if it has the batch, else
    that of --simulate runs."""
    known: list[str] = []
    stores = _stores(workdir) if simulated is None else [(_existing_store(workdir, simulated), simulated)]
    for path, sim in stores:
        store = await Store.open(path)
        try:
            info = await store.batch(batch)
            if info is not None:
                yield FoundBatch(store, info, path, sim, workdir)
                return
            known += [f"{b.name} (simulated)" if sim else b.name for b in await store.batches()]
        finally:
            await store.close()
    raise UsageError(f"no batch named '{batch}' in {workdir}; known: {', '.join(known) or 'none'}")


async def find_batch(workdir: Path, batch: str, simulated: bool | None = None) -> tuple[Path, bool]:
    """(store, simulated) of ``batch`` (see open_batch)."""
    async with open_batch(workdir, batch, simulated) as found:
        return found.path, found.simulated


@dataclass(frozen=True)
class Again:
    """What a command pasted from a `next:` line needs of the options the user gave: the work
    directory, the simulator or the API, the settings file."""

    workdir: Path | None = None  # None: the default one
    simulate: bool = False
    api_url: str | None = None  # None: the default (or RUNCOMFY_API_URL)
    config: Path | None = None  # batchgen --config FILE

    def command(self, words: str, reads_only: bool = False) -> str:
        """``batchgen WORDS`` with these options, quoted for a shell. ``reads_only``: a command
        that reads the store and calls no API (report, gallery), which takes no --api-url."""
        head = "batchgen" + (f" --config {shlex.quote(str(self.config))}" if self.config else "")
        tail = (f" --workdir {shlex.quote(str(self.workdir))}" if self.workdir is not None else "") + (
            " --simulate" if self.simulate else "") + (
            f" --api-url {shlex.quote(self.api_url)}" if self.api_url and not self.simulate
            and not reads_only else "")
        return f"{head} {words}{tail}"

    def for_batch(self, simulated: bool, apis: list[str]) -> Again:
        """These options for a batch run with --simulate or not, against ``apis``: a batch of one
        API other than the default is continued there."""
        api = self.api_url
        if api is None and len(apis) == 1 and apis[0] not in (SIMULATOR_API, C.DEFAULT_API_URL):
            api = apis[0]
        return replace(self, simulate=simulated, api_url=api)


def next_steps(name: str, counts: dict[str, int], again: Again) -> list[str]:
    """What to do about a batch's jobs, each with a command to paste as it is."""
    steps = []
    n = shlex.quote(name)
    if counts.get(S.UNKNOWN):
        steps.append(f"{counts[S.UNKNOWN]} job(s) have an unknown submit outcome (they may exist, and be "
                     f"billed, at the provider): {again.command(f'retry --unknown {n}')}")
    failed = counts.get(S.FAILED, 0) + counts.get(S.TIMED_OUT, 0)
    if failed:
        steps.append(f"{failed} job(s) failed or timed out: {again.command(f'retry {n}')}")
    if counts.get(S.OVERDUE):
        steps.append(f"{counts[S.OVERDUE]} job(s) are overdue, still at the provider (billed, and may still "
                     f"be delivered): {again.command(f'run --batch {n}')} downloads them once they finish; "
                     f"{again.command(f'retry --force {n}')} submits them again (paying again)")
    if counts.get(S.CANCELLED):
        steps.append(f"{counts[S.CANCELLED]} job(s) were cancelled: {again.command(f'retry --cancelled {n}')} "
                     "submits them again")
    unfinished = sum(counts.get(s, 0) for s in S.STATES if s not in S.TERMINAL and s != S.OVERDUE)
    if unfinished:
        steps.append(f"{unfinished} job(s) are not finished: {again.command(f'run --batch {n}')}")
    return steps


def look_steps(name: str, counts: dict[str, int], again: Again) -> list[str]:
    """Where to look at a batch's finished jobs, each a command to paste: its page, its table."""
    if not any(counts.get(st) for st in (*S.TERMINAL, S.OVERDUE)):
        return []
    n = shlex.quote(name)
    table = shlex.quote(f"{name}.csv")
    return [f"every job on one page: {again.command(f'gallery {n}', reads_only=True)}",
            f"one row per job: {again.command(f'report {n} -o {table}', reads_only=True)}"]


async def status(workdir: Path, batches: list[str] | None = None, again: Again | None = None) -> list[BatchStatus]:
    """Each batch of ``workdir``: those of runs against an API, then those of --simulate runs
    (a batch run both ways appears twice). ``again``: the options the user gave, for the
    commands of the next steps."""
    again = again or Again()
    import statistics  # here: 3 ms of imports that `batchgen run` would pay at every start

    out: list[BatchStatus] = []
    seen: set[str] = set()
    for path, simulated in _stores(workdir):
        async with await Store.open(path) as store:
            known = await store.batches()
            seen.update(b.name for b in known)
            counts = await store.counts(batches)
            retired = await store.counts(batches, retired=True)
            apis = await store.apis(batches)
            for b in known:
                if batches is not None and b.name not in batches:
                    continue
                c = counts.get(b.name, {})
                waits, runs, cost = await store.timings(b.name)
                out.append(BatchStatus(
                    b.name, b.model_id, c, failures=await store.failure_groups(b.name),
                    median_queue_s=statistics.median(waits) if waits else None,
                    median_run_s=statistics.median(runs) if runs else None,
                    spent_usd=cost,
                    next_steps=next_steps(b.name, c, again.for_batch(simulated, sorted(apis.get(b.name, {})))),
                    look=look_steps(b.name, c, again.for_batch(simulated, [])),
                    simulated=simulated, apis=sorted(apis.get(b.name, {})),
                    folder=_outputs_of(path, workdir) / b.name,
                    retired=retired.get(b.name, {}),
                ))
    missing = [b for b in batches or [] if b not in seen]
    if missing:
        raise UsageError(f"no batch named '{missing[0]}' in {workdir}; known: "
                         f"{', '.join(sorted(seen)) or 'none'}")
    return out


SHARED = "shared store"  # CancelReport.handed_to: the runners of a shared store carry it out


@dataclass
class CancelReport:
    not_submitted: int = 0  # pending jobs marked cancelled
    cancelled: int = 0  # queued jobs the provider cancelled
    not_cancellable: int = 0  # already running or done: still followed by the next run
    errors: list[str] = field(default_factory=list)
    # A run held the work directory: the request is in the store, and that run (this pid)
    # cancels the batch's queued jobs at the provider (Runner._cancel_watch).
    handed_to: int | str | None = None


async def cancel(workdir: Path, batch: str, target: Target) -> CancelReport:
    """Cancel a batch: pending jobs never get submitted; queued jobs are cancelled at the provider.
    Jobs the provider will not cancel (already running) keep being followed, so what they cost is
    still downloaded."""
    report = CancelReport()
    path = _existing_store(workdir, target.simulate)
    lock = WorkdirLock(path.parent / C.LOCK_FILENAME)
    try:
        if shared_store() is not None:  # runners may be at it on any machine: through the store
            raise LockedError("the store is shared")
        lock.acquire("cancel")
    except LockedError as exc:
        # A run holds the work directory: the cancel goes through the store, which it reads.
        async with await Store.open(path) as store:
            await _require_batches(store, [batch], workdir)
            report.not_submitted = await store.request_cancel(batch)
        report.handed_to = SHARED if shared_store() is not None else (exc.pid or "?")
        return report
    try:
        async with await Store.open(path, api=api_identity(target)) as store:
            await _require_batches(store, [batch], workdir)
            await _require_own_api(store, [batch], api_identity(target))
            await store.recover_interrupted([batch])
            for job in await store.jobs([batch], [S.PENDING]):
                await store.transition(job, S.CANCELLED, expect=(S.PENDING,),
                                       detail="cancelled by the user before submit",
                                       error="cancelled before submit")
                report.not_submitted += 1
            remote = await store.jobs([batch], S.FOLLOWED)
            if not remote:
                return report
            async with api_endpoint(target, Path(workdir)) as (base_url, token):
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
    price_usd: float | None  # per job, or per second with price_unit "second", when known
    median_run_s: float | None  # from earlier runs of this batch
    price_unit: str | None = None
    cost_usd: float | None = None  # the jobs to submit, those with a known price
    unpriced: int = 0  # jobs to submit whose cost cannot be estimated (a per-second job without duration)
    schema_origin: str = ""  # "bundled", "catalog", "file", or "" (none: --no-schema)
    reusable: int = 0  # jobs to submit identical to ones succeeded in other batches (run --reuse)
    random_seed: int = 0  # jobs to submit repeating earlier requests with a random seed
    balance: BalanceInfo | None = None  # with a token, not under --simulate
    fixed: list[str] = field(default_factory=list)  # plan --fix: the copies made, what each changed
    learned_cap: int | None = None  # the cap --concurrency auto found for the model at this API

    @property
    def estimated_cost(self) -> float | None:
        return self.cost_usd

    @property
    def to_submit(self) -> int:
        return self.new + self.recorded.get(S.PENDING, 0)

    def estimated_duration(self, concurrency: int) -> float | None:
        if self.median_run_s is None or not self.to_submit:
            return None
        return -(-self.to_submit // max(1, concurrency)) * self.median_run_s

    def concurrency(self, auto: bool, limit: int) -> int | None:
        """Jobs at once a run would keep out: ``limit`` when fixed; with auto (``limit`` its
        ceiling), the cap an earlier run found for the model at this API (None: none yet)."""
        if not auto:
            return limit
        return None if self.learned_cap is None else min(limit, self.learned_cap)


def cap_key(target: Target) -> str:
    """Where a cap --concurrency auto found is kept: per API (the simulator of a --simulate run
    is one API whatever its port), the API's base URL as the client has it."""
    return "simulator" if target.simulate else resolve_api_url(target)


async def plan(opts: RunOptions) -> PlanReport:
    """What `run` would do with this manifest, without submitting or recording anything."""
    manifest, result = await check_manifest(opts)
    if result.problems:
        raise ManifestError(result.problems, result.hint)
    schema = manifest.schema
    price, unit = (schema.base_price_usd, schema.price_unit) if schema else (None, None)
    balance = None
    if opts.target.simulate or has_token(opts.target):
        try:
            async with api_endpoint(opts.target) as (base_url, token):
                async with RunComfyClient(base_url, token) as client:
                    if price is None:
                        price, unit = await model_price(client, manifest.model_id, schema)
                    if not opts.target.simulate:
                        balance = await account_balance(client, opts.target)
        except BatchgenError as exc:
            log.info("no price for %s: %s", manifest.model_id, exc)
    recorded: dict[str, int] = {}
    median_run = None
    path = existing_store(opts.workdir, opts.target.simulate)
    keys: list[str] = []
    costs: dict[str, float | None] = {}  # per job, only when the price depends on the job
    seeded: set[str] = set()  # keys of jobs with an explicit seed (reuse.explicit_seed)
    for spec in manifest.iter_jobs():
        keys.append(spec.key)
        if reuse.explicit_seed(spec.inputs):
            seeded.add(spec.key)
        if unit == "second":
            costs[spec.key] = job_price(price, unit, spec.inputs)
    waiting: set[str] = set()  # recorded, still pending: the run would submit them
    if path is not None:
        async with await Store.open(path) as store:
            await _refuse_case_twin(store, manifest.name)  # as run would
            existing = await store.existing_keys(manifest.name, keys)
            if existing:
                for job in await store.jobs([manifest.name]):
                    if job.key in existing:
                        recorded[job.state] = recorded.get(job.state, 0) + 1
                        if job.state == S.PENDING:
                            waiting.add(job.key)
            else:
                existing = set()
            to_submit = [k for k in keys if k not in existing or k in waiting]
            elsewhere = await store.succeeded_elsewhere(manifest.name, to_submit)
            reusable = sum(1 for k in elsewhere if k in seeded)
            random_seed = len(elsewhere) - reusable
            _, runs, _ = await store.timings(manifest.name)
            learned_cap = await store.learned_cap([manifest.model_id], cap_key(opts.target))
            import statistics  # see status()

            median_run = statistics.median(runs) if runs else None
    else:
        existing = set()
        reusable = random_seed = 0
        learned_cap = None
    report = PlanReport(manifest.name, manifest.model_id, len(keys), manifest.duplicates,
                        len(keys) - sum(recorded.values()), recorded, price, median_run, price_unit=unit,
                        schema_origin=schema.origin if schema else "", balance=balance,
                        reusable=reusable, random_seed=random_seed, fixed=result.fixed,
                        learned_cap=learned_cap)
    if price is not None:
        submit = [k for k in keys if k not in existing or k in waiting]
        each = [costs.get(k) for k in submit] if unit == "second" else [job_price(price, unit, {})] * len(submit)
        known = [c for c in each if c is not None]
        report.unpriced = len(each) - len(known)
        report.cost_usd = sum(known) if known or not each else None
    return report


# ---- forget ------------------------------------------------------------------------------------

# States whose jobs `forget` removes: nothing of theirs is at the provider. A retired job goes
# too, whatever its state, once it is not followed any more.
FORGETTABLE = (S.PENDING, S.FAILED, S.CANCELLED, S.UNKNOWN, S.TIMED_OUT)
RETIRED = "retired"  # `forget --state retired`: the jobs no longer in the manifest
_AT_PROVIDER = (S.SUBMITTING, *S.FOLLOWED, S.DOWNLOADING)


@dataclass
class ForgetPlan:
    """The jobs `forget` removes (or removed), and where their files are."""

    batch: str
    simulated: bool
    folder: Path
    jobs: list[S.Job]
    forgotten: int = 0
    files_deleted: int = 0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for job in self.jobs:
            what = f"{RETIRED} {job.state}" if job.retired_at is not None else job.state
            out[what] = out.get(what, 0) + 1
        return out


def _forgettable(job: S.Job) -> bool:
    return job.state in FORGETTABLE or (job.retired_at is not None and job.state not in _AT_PROVIDER)


async def forget(workdir: Path, batch: str, *, states: tuple[str, ...] = (), keys: tuple[str, ...] = (),
                 simulated: bool | None = None, delete_files: bool = False,
                 confirm: Callable[[ForgetPlan], bool] = lambda plan: True) -> ForgetPlan:
    """Remove the records of ``batch``'s jobs that are not at the provider (in ``states``, with
    ``keys``; all of them when neither is given), once ``confirm(plan)`` agrees. Their files stay
    unless ``delete_files``. A key that names no such job is refused before anything is done."""
    path, simulated = await find_batch(Path(workdir), batch, simulated)
    lock = WorkdirLock(path.parent / C.LOCK_FILENAME)
    if shared_store() is None:  # a shared store's writes are its own transactions
        lock.acquire("forget")
    try:
        async with await Store.open(path) as store:
            jobs = await store.jobs([batch])
            by_key = {j.key: j for j in jobs}
            for key in keys:
                job = by_key.get(key)
                if job is None:
                    raise UsageError(f"batch '{batch}' has no job with key '{printable(key)}'")
                if not _forgettable(job):
                    raise UsageError(f"job {key} is {job.state}: "
                                     + ("at the provider (it is paid for): not forgotten"
                                        if job.state in _AT_PROVIDER else "done: not forgotten"))
            chosen = [j for j in jobs if _forgettable(j)
                      and (not states or j.state in states or (RETIRED in states and j.retired_at is not None))
                      and (not keys or j.key in keys)]
            root = _outputs_of(path, Path(workdir))
            plan = ForgetPlan(batch, simulated, root / batch, chosen)
            if not chosen or not confirm(plan):
                return plan
            files = [root / o.path for j in chosen for o in await store.outputs(j.id) if o.path]
            plan.forgotten = await store.forget(chosen)
        if delete_files:
            for f in files:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
                    plan.files_deleted += 1
            for job in chosen:
                discard_partials(plan.folder, job.file_stem)
    finally:
        lock.release()
    return plan
