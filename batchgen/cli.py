"""The command line: a thin click shell over app.py. Parse options, call one function, render.

Errors become one line on stderr and an exit code (see EXIT_*); set BATCHGEN_TRACEBACK=1 to see
the traceback instead.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NoReturn

import click
from click.core import ParameterSource

from . import __version__, app, fiximages, reportformats
from . import constants as C
from . import store as S
from .config import CONFIG_FILENAME, load_config
from .downloads import DownloadLimits
from .errors import (
    AccountError,
    BatchgenError,
    InsufficientBalanceError,
    LockedError,
    ManifestError,
    UsageError,
)
from .progress import LineLog, Panel, RepeatedNotices, stderr_is_tty
from .runner import Event, RunSettings, RunSummary, StopReason
from .text import printable
from .workdir import outputs_root, realm, shared_store

# Exit codes, documented in README.md. Cron wrappers branch on these.
EXIT_OK = 0  # every job of the batch succeeded
EXIT_JOBS_FAILED = 1  # the run finished, but some jobs failed, timed out, were cancelled, are unknown or overdue
EXIT_USAGE = 2  # bad manifest, bad options, missing token: nothing was submitted
EXIT_INTERRUPTED = 3  # Ctrl-C/SIGTERM, deadline, a budget or an API outage stopped the run; run again to go on
EXIT_LOCKED = 4  # another run holds the work directory
EXIT_ACCOUNT = 5  # the account cannot run jobs (bad token, insufficient balance)
EXIT_REFUSED = 6  # the API refuses every job alike (unknown model, no such endpoint, same input error): fix, rerun
EXIT_INTERNAL = 70  # a bug or an unusable store
EXIT_PIPE = 141  # the reader of the output went away (| head): 128 + SIGPIPE, as shells report it

log = logging.getLogger("batchgen")

max_expand_option = click.option(
    "--max-expand", type=click.IntRange(1), default=C.DEFAULT_MAX_EXPAND, show_default=True,
    help="Refuse a manifest that expands to more jobs than this (jobs x rows x matrix x repeat, "
         "counted before expanding).",
)

def _workdir_from_group(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    """--workdir goes before the command name or after it: `batchgen -w W status` is
    `batchgen status -w W`. Given after, it wins."""
    if ctx.get_parameter_source(param.name or "") in (ParameterSource.DEFAULT, None):
        value = (ctx.obj or {}).get("workdir") or value
    _store_from_config(ctx, value)
    return value


def _store_from_config(ctx: click.Context, workdir: Path) -> None:
    """`store`, `outputs`, `account_concurrency` of batchgen.toml, for every command (options and
    the environment win). A file that cannot be read is left to the commands that read it whole."""
    try:
        settings, _ = load_config((ctx.obj or {}).get("config"), workdir)
    except BatchgenError:
        return
    env = {"store": C.STORE_ENV, "outputs": C.OUTPUTS_ENV, "account_concurrency": "BATCHGEN_ACCOUNT_CONCURRENCY"}
    given = [os.environ.get(env[k]) for k in ("store", "outputs", "account_concurrency")]
    _shared_store_options(
        None if given[0] else settings.get("store"),
        None if given[1] or "outputs" not in settings else Path(settings["outputs"]),
        None if given[2] else settings.get("account_concurrency"))


def _config_after_command(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    """--config after the command name: the group's ctx.obj, which every command reads, holds it."""
    if value is not None:
        ctx.obj = {**(ctx.obj or {}), "config": value}


def _workdir_given(ctx: click.Context) -> bool:
    """Whether the user named a work directory, before the command name or after it."""
    return (ctx.get_parameter_source("workdir") not in (ParameterSource.DEFAULT, None)
            or (ctx.obj or {}).get("workdir") is not None)


_WORKDIR_HELP = "Work directory: the SQLite store and downloaded outputs."
_CONFIG_HELP = f"Settings file (default: {CONFIG_FILENAME} in the work directory, if there)."


def workdir_option(f: Any) -> Any:
    """--workdir and --config, which every command that opens a work directory takes after its
    name as well as before it."""
    f = click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
                     expose_value=False, callback=_config_after_command, help=_CONFIG_HELP)(f)
    return click.option("--workdir", "-w", type=click.Path(file_okay=False, path_type=Path),
                        default=Path(C.DEFAULT_WORKDIR), show_default=True, callback=_workdir_from_group,
                        help=_WORKDIR_HELP)(f)


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"error: {printable(message, keep_newlines=True)}", err=True)
    sys.exit(code)


def _show_tracebacks() -> bool:
    """BATCHGEN_TRACEBACK=1: a developer wants Python's traceback rather than one line."""
    return bool(os.environ.get("BATCHGEN_TRACEBACK"))


def _fail_for(exc: Exception) -> NoReturn:
    """One line and an exit code for an error that reached the top (or the traceback, if asked)."""
    if isinstance(exc, BrokenPipeError):
        _reader_gone()
    if _show_tracebacks():
        raise exc
    if isinstance(exc, BatchgenError):
        _fail(str(exc), _exit_code_for(exc))
    # A bug: still one line, with the way to see more.
    _fail(f"internal error: {type(exc).__name__}: {exc} (set BATCHGEN_TRACEBACK=1 for details)", EXIT_INTERNAL)


def _reader_gone() -> NoReturn:
    """Whoever read our output went away (`batchgen report B -o - | head`): stop quietly with
    the shell's code for it, as other command-line tools do. What is left in stdout's buffer
    goes to /dev/null, or Python would fail again flushing it at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(EXIT_PIPE)


def _exit_code_for(exc: BaseException) -> int:
    if isinstance(exc, ManifestError | UsageError):
        return EXIT_USAGE
    if isinstance(exc, LockedError):
        return EXIT_LOCKED
    if isinstance(exc, AccountError | InsufficientBalanceError):
        return EXIT_ACCOUNT
    if isinstance(exc, BatchgenError):
        return EXIT_INTERNAL
    return EXIT_INTERNAL


def _run_async(coro: Any) -> Any:
    """asyncio.run with batchgen's errors turned into one line and an exit code."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except Exception as exc:  # noqa: BLE001 - every error becomes one line
        _fail_for(exc)


class _Group(click.Group):
    """The command group, with a last net: whatever escapes a command (a bug outside the event
    loop, a file that cannot be opened) is one line and an exit code, not a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes one line
            _fail_for(exc)


class _LogFormatter(logging.Formatter):
    """Log records as single lines: text from outside (the API's messages) escaped, and an
    exception as its type and message, its traceback only with BATCHGEN_TRACEBACK=1."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and record.exc_info[1] is not None and not _show_tracebacks():
            exc = record.exc_info[1]
            record = logging.makeLogRecord({
                **record.__dict__, "msg": "%s (%s: %s)", "exc_info": None, "exc_text": None,
                "args": (record.getMessage(), type(exc).__name__, exc),
            })
        return super().format(record)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        return printable(super().formatMessage(record))


def _not_an_event(record: logging.LogRecord) -> bool:
    """The runner logs each of its events at INFO for a program that uses it without a view;
    the CLI prints them itself (_RunView), as lines or on the panel: through logging too, -v
    showed every event twice. Its warnings, errors and -vv debug records still pass."""
    return not (record.levelno == logging.INFO and (record.name == "batchgen.runner"
                                                     or record.name.startswith("batchgen.runner.")))


def _install_log_handler() -> None:
    """Every command's log records (asyncio's and aiohttp's too) go through _LogFormatter."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_not_an_event)
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    # Job events are printed by the CLI itself; the library logger is for -v.
    logging.getLogger("batchgen").setLevel(level if verbose else logging.WARNING)
    # The only aiohttp server of a run is a --simulate run's own simulator, which complains
    # about every connection a stopping run leaves: noise, but for -vv.
    logging.getLogger("aiohttp.server").setLevel(logging.DEBUG if verbose > 1 else logging.CRITICAL)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="batchgen")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), help=_CONFIG_HELP)
@click.option("--workdir", "-w", type=click.Path(file_okay=False, path_type=Path),
              help=f"{_WORKDIR_HELP} [default: {C.DEFAULT_WORKDIR}]")
@click.option("--store", "store_url", envvar=C.STORE_ENV, metavar="URL",
              help="A shared store, postgresql://user@host/db, instead of the work directory's SQLite "
                   f"file: several runners on several machines share its jobs [env {C.STORE_ENV}].")
@click.option("--outputs", "outputs_dir", type=click.Path(file_okay=False, path_type=Path),
              envvar=C.OUTPUTS_ENV, help="Where outputs go (a path every runner mounts, with --store) "
              f"[default: the work directory; env {C.OUTPUTS_ENV}].")
@click.option("--account-concurrency", type=click.IntRange(1), envvar="BATCHGEN_ACCOUNT_CONCURRENCY",
              help="With --store: most jobs at the provider for the account across every runner.")
@click.pass_context
def main(ctx: click.Context, config_path: Path | None, workdir: Path | None, store_url: str | None,
         outputs_dir: Path | None, account_concurrency: int | None) -> None:
    """batchgen: run a manifest of RunComfy Model API jobs to finished, downloaded files.

    \b
    Quick start, no account needed:
      batchgen run sample_manifests/quickstart.yaml --simulate
      batchgen status
    """
    _install_log_handler()
    _shared_store_options(store_url, outputs_dir, account_concurrency)
    # Options that go before the command name or after it (workdir_option): the command reads them here.
    ctx.obj = {"config": config_path, "workdir": workdir}


def _shared_store_options(store_url: str | None, outputs_dir: Path | None, account_cap: int | None) -> None:
    """--store, --outputs, --account-concurrency: read where the store is opened (workdir.py,
    runner/leasing.py), whichever command it is."""
    if store_url:
        if not store_url.startswith(("postgresql://", "postgres://")):
            # Never the URL itself in the message: it may carry a password.
            scheme = store_url.split("://", 1)[0] if "://" in store_url else ""
            got = f"a URL starting {scheme}://" if scheme.isalnum() else "something else"
            raise click.UsageError(f"--store: expected a postgresql://user@host/db URL, got {got}")
        os.environ[C.STORE_ENV] = store_url
    if outputs_dir is not None:
        os.environ[C.OUTPUTS_ENV] = str(outputs_dir.resolve())
    if account_cap is not None:
        os.environ["BATCHGEN_ACCOUNT_CONCURRENCY"] = str(account_cap)


# ---- run ---------------------------------------------------------------------------------------


def _api_options(f: Any) -> Any:
    """Where the API is: what every command that may call it takes, the catalog included."""
    f = click.option("--api-url", envvar=C.API_URL_ENV,
                     help=f"API base URL [env {C.API_URL_ENV}].")(f)
    f = click.option("--simulate", is_flag=True,
                     help="Use a built-in simulator on a free loopback port (no account, no network).")(f)
    return f


def _target_options(f: Any) -> Any:
    f = click.option("--sim-fault", "sim_faults", multiple=True, metavar="SPEC",
                     help="With --simulate: inject a simulator fault, e.g. fail=0.3 (see batchgen simulate).")(f)
    return _api_options(f)


balance_url_option = click.option(
    "--balance-url", envvar=C.BALANCE_URL_ENV,
    help=f"The account balance endpoint [env {C.BALANCE_URL_ENV}; default {C.DEFAULT_BALANCE_URL}, or the "
         "same origin as a loopback --api-url]. The token is sent there only if it is the API's host or "
         "a RunComfy host.")


no_schema_option = click.option(
    "--no-schema", is_flag=True,
    help="Run a model that has no schema at all (not bundled, not in RunComfy's catalog) with its "
         "inputs unchecked, instead of refusing it.")


def _fix_options(flag: str) -> Callable[[Any], Any]:
    """--fix (validate, plan) or --fix-images (run), with --upscale and --fix-ratio."""
    def add(f: Any) -> Any:
        for opt in reversed([
            click.option(flag, "fix", is_flag=True,
                         help="Local images that fail only on format or size are sent as compliant copies "
                              f"made in WORKDIR/{C.FIXED_DIR}/ (PNG, or JPEG for photos; scaled down to fit); "
                              "the originals are never changed."),
            click.option("--upscale", is_flag=True, help=f"With {flag}: also scale up images under the smallest size."),
            click.option("--fix-ratio", type=click.Choice(fiximages.RATIO_CHOICES),
                         help=f"With {flag}: bring a width/height out of range within it, by padding "
                              "(centred bars) or cropping (centred)."),
        ]):
            f = opt(f)
        return f
    return add


def _fix(flag: str, fix: bool, upscale: bool, fix_ratio: str | None) -> fiximages.FixOptions | None:
    if not fix:
        if upscale or fix_ratio:
            raise click.UsageError(f"--upscale and --fix-ratio go with {flag}")
        return None
    return fiximages.FixOptions(upscale=upscale, ratio=fix_ratio)


def _run_options(f: Any) -> Any:
    """Options shared by `run` and `retry`, which both end in a run of the pool."""
    for opt in reversed([
        workdir_option,
        click.option("--concurrency", "-c", default="auto", show_default=True, metavar="auto[:N]|N",
                     help="Jobs in flight at the provider: auto finds the account's limit (and "
                          f"remembers it), at most N (default {C.AUTO_CEILING}); a number fixes it."),
        click.option("--downloads", type=click.IntRange(1), default=C.DEFAULT_DOWNLOAD_CONCURRENCY,
                     show_default=True, help="Most output downloads at once."),
        click.option("--rate", type=click.FloatRange(0), default=C.DEFAULT_RATE, show_default=True,
                     help="Most API requests per second (0: no limit)."),
        click.option("--max-jobs", type=click.IntRange(0),
                     help="Submit at most this many jobs in this run."),
        click.option("--max-cost", type=click.FloatRange(0),
                     help="Stop submitting once this many USD are spent or committed in this run."),
        click.option("--max-runtime",
                     help="Stop submitting before, and stop at, this long from now (e.g. 90m, 6h)."),
        click.option("--job-timeout",
                     help="Give up on a job not finished this long after submit: cancel it if still "
                          "queued, else mark it overdue and keep following it "
                          f"[default: {C.DEFAULT_JOB_TIMEOUT / 3600:g}h]."),
        click.option("--outage-budget",
                     help="Stop (exit 3) once the API has been unreachable this long "
                          f"[default: {C.OUTAGE_BUDGET / 60:g}m]."),
        click.option("--quiet", "-q", is_flag=True, help="Only errors and the final summary."),
        click.option("--log-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Also append every event to this file (plain or JSON lines)."),
        click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
                     show_default=True, help="json: one JSON object per line, for log collectors."),
        click.option("--verbose", "-v", count=True, help="More detail (-vv for debug)."),
        balance_url_option,
    ]):
        f = opt(f)
    return _target_options(f)


@main.command()
@click.argument("manifest", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--schema", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Model schema file to validate against (for models batchgen does not bundle).")
@click.option("--batch", help="Batch name (default: the manifest's name, or its file name).")
@_run_options
@no_schema_option
@click.option("--dry-run", is_flag=True, help="Show what would happen (see `batchgen plan`); submit nothing.")
@max_expand_option
@_fix_options("--fix-images")
@click.option("--reuse", is_flag=True,
              help="Jobs identical to ones already succeeded in another batch of the work directory "
                   "(same model, inputs and an explicit seed) take their outputs (linked) instead of "
                   "being paid for again.")
def run(manifest: Path | None, schema: Path | None, batch: str | None, dry_run: bool, no_schema: bool,
        max_expand: int, reuse: bool, fix: bool, upscale: bool, fix_ratio: str | None,
        **kw: Any) -> None:
    """Validate MANIFEST, record its jobs, submit them, and download every output.

    Running it again picks up where the last run stopped: jobs already submitted are polled,
    never submitted twice, and finished outputs are not downloaded again. Without MANIFEST, every
    unfinished batch in the work directory is resumed (or only --batch).

    \b
    Examples:
      batchgen run sample_manifests/quickstart.yaml --simulate
      RUNCOMFY_API_TOKEN=... batchgen run nightly.yaml --concurrency 8 --max-runtime 6h
      batchgen run            # resume whatever is unfinished in ./jobs
    """
    fix_options = _fix("--fix-images", fix, upscale, fix_ratio)
    if fix_options is not None and manifest is None:
        raise click.UsageError("--fix-images needs a MANIFEST")
    if dry_run:
        if manifest is None:
            raise click.UsageError("--dry-run needs a MANIFEST")
        _apply_config(kw)
        _setup_logging(kw["verbose"], kw["quiet"])
        opts = app.RunOptions(workdir=kw["workdir"], manifest=manifest, batch=batch, schema=schema,
                              no_schema=no_schema, max_expand=max_expand, fix=fix_options,
                              target=_target(kw["api_url"], kw["simulate"], (), kw["balance_url"]))
        _show_plan(opts, *_concurrency(kw["concurrency"]))
        return
    _execute_run(kw, manifest=manifest, schema=schema, batch=batch, no_schema=no_schema, max_expand=max_expand,
                 reuse=reuse, fix=fix_options)


@main.command()
@click.argument("batch")
@click.option("--unknown", is_flag=True,
              help="Also resubmit jobs whose submit outcome is unknown (they may already be "
                   "running, and billed, at the provider).")
@click.option("--force", is_flag=True,
              help="Also resubmit overdue jobs (past the job timeout, not cancelled: they may still "
                   "be delivered, and are billed).")
@click.option("--cancelled", is_flag=True,
              help="Also resume cancelled jobs (a `batchgen cancel`): submit them again.")
@_run_options
def retry(batch: str, unknown: bool, force: bool, cancelled: bool, **kw: Any) -> None:
    """Put BATCH's failed and timed-out jobs back to pending and run them.

    Their history is kept. Jobs with an unknown submit outcome are left alone unless --unknown
    is given: the API cannot tell whether they exist, so resubmitting may pay twice. Overdue
    jobs are left alone unless --force is given: they are still at the provider, which may
    still deliver them (this run keeps following them).

    \b
    Examples:
      batchgen retry street-scenes
      batchgen retry street-scenes --unknown --simulate
      batchgen retry street-scenes --force
      batchgen retry street-scenes --cancelled
    """
    states = ((S.FAILED, S.TIMED_OUT) + ((S.UNKNOWN,) if unknown else ()) + ((S.OVERDUE,) if force else ())
              + ((S.CANCELLED,) if cancelled else ()))
    _execute_run(kw, batch=batch, retry_states=states)


def _apply_config(kw: dict[str, Any]) -> None:
    """Fill options the user did not give on the command line from the config file."""
    ctx = click.get_current_context()
    try:
        settings, source = load_config((ctx.obj or {}).get("config"), kw["workdir"])
    except BatchgenError as exc:
        _fail(str(exc), EXIT_USAGE)
    for key, value in settings.items():
        if key not in kw:  # a setting of the file alone (no option): taken as it is
            kw[key] = value
        elif ctx.get_parameter_source(key) in (ParameterSource.DEFAULT, None):
            kw[key] = Path(value) if key == "log_file" else value
    if source is not None:
        log.info("settings from %s: %s", source, ", ".join(settings))


def _target(api_url: str | None, simulate: bool, sim_faults: tuple[str, ...],
            balance_url: str | None = None) -> app.Target:
    if sim_faults and not simulate:
        raise click.UsageError("--sim-fault goes with --simulate")
    sim_config = None
    if simulate:
        from .simulator import FaultConfig, SimConfig

        try:
            sim_config = SimConfig(faults=FaultConfig.parse(list(sim_faults)))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--sim-fault") from None
    return app.Target(api_url=api_url, simulate=simulate, sim_config=sim_config, balance_url=balance_url)


def _tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a long run. Everything alive now (modules,
    classes: tens of thousands of objects) is moved out of its sight, and it runs after 20,000
    net allocations rather than 700: a run allocates many short-lived objects per request, and
    most are freed by reference counting before a larger young generation is ever examined.
    Measured with gc.callbacks on 5,000 quick jobs, the collector's share of the process's CPU
    time fell from about 5% to under 1%. A process-wide setting, so it is made here, by the
    process's owner, not by the library. No collection first: it finds a few dozen objects
    among the ~40,000 and costs about 9 ms of every run's start."""
    import gc

    gc.freeze()
    gc.set_threshold(20_000, 10, 10)


def _execute_run(kw: dict[str, Any], **opts_kw: Any) -> None:
    _apply_config(kw)
    _setup_logging(kw["verbose"], kw["quiet"])
    if shared_store() is not None and not os.environ.get(C.OUTPUTS_ENV):
        # Each runner would keep its files on its own disk: the store would record paths that
        # report and gallery on every other machine cannot open.
        where = outputs_root(realm(kw["workdir"], kw["simulate"])).resolve()
        click.echo(f"warning: a shared store (--store) with outputs in this machine's work directory "
                   f"({printable(str(where))}): other machines' report and gallery will not find them; "
                   "pass --outputs DIR, a folder every runner mounts", err=True)
    max_runtime, job_timeout, outage = kw["max_runtime"], kw["job_timeout"], kw["outage_budget"]
    auto, concurrency = _concurrency(kw["concurrency"])
    settings = RunSettings(
        concurrency=concurrency, auto_concurrency=auto, download_concurrency=kw["downloads"], rate=kw["rate"],
        max_jobs=kw["max_jobs"], max_cost=kw["max_cost"],
        deadline=time.time() + _duration(max_runtime, "--max-runtime") if max_runtime else None,
        job_timeout=_duration(job_timeout, "--job-timeout") if job_timeout else C.DEFAULT_JOB_TIMEOUT,
        outage_budget=_duration(outage, "--outage-budget") if outage else C.OUTAGE_BUDGET,
        output_hosts=kw.get("output_hosts", ()),
        download_limits=DownloadLimits(
            max_bytes=kw.get("max_output_size", C.MAX_OUTPUT_BYTES),
            min_rate=kw.get("min_download_rate", C.MIN_DOWNLOAD_RATE),
            rate_window=kw.get("download_rate_window", C.DOWNLOAD_RATE_WINDOW)),
    )
    opts = app.RunOptions(
        workdir=kw["workdir"],
        target=_target(kw["api_url"], kw["simulate"], kw["sim_faults"], kw["balance_url"]),
        settings=settings, **opts_kw,
    )
    log_file = _open_log_file(kw["log_file"]) if kw["log_file"] else None
    view = _RunView(kw["quiet"], kw["verbose"], kw["log_format"], log_file)
    _tune_gc()
    outcome = _run_async(_run_with_signals(opts, view))
    _print_run_summary(outcome, _again(kw["workdir"], kw["simulate"], kw["api_url"]),
                       outputs_root(realm(kw["workdir"], kw["simulate"])), kw["log_format"])
    code, error = run_exit(outcome.summary, outcome.counts)
    if error is not None:
        _fail(error, code)
    sys.exit(code)


def run_exit(summary: RunSummary, counts: dict[str, dict[str, int]]) -> tuple[int, str | None]:
    """A finished run's exit code (EXIT_*), and the error line that goes with it, if any."""
    if summary.account_error:
        return EXIT_ACCOUNT, summary.account_error
    if summary.stop_reason is StopReason.REFUSED:
        return EXIT_REFUSED, summary.stop_message or "the API refuses every job"
    if summary.stop_reason is StopReason.OUTAGE:
        return EXIT_INTERRUPTED, summary.stop_message or "the API is unreachable"
    if summary.stop_reason is not None and summary.stop_reason.resumable:
        return EXIT_INTERRUPTED, None
    bad = sum(n for b in counts.values() for s, n in b.items()
              if s in (S.FAILED, S.UNKNOWN, S.CANCELLED, S.TIMED_OUT, S.OVERDUE))
    # Overdue jobs are not "run again to go on": they wait for the provider (a later run follows them).
    unfinished = sum(n for b in counts.values() for s, n in b.items() if s not in S.TERMINAL and s != S.OVERDUE)
    if unfinished:
        return EXIT_INTERRUPTED, None
    return (EXIT_JOBS_FAILED if bad else EXIT_OK), None


def _open_log_file(path: Path) -> IO[str]:
    """The --log-file, appended to; its folder is made if missing (``logs/batchgen.log``)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by _RunView
    except FileExistsError as exc:  # mkdir met a file where a folder should be
        _fail(f"cannot open the log file {path}: {exc.filename} is a file, not a folder", EXIT_USAGE)
    except OSError as exc:
        _fail(f"cannot open the log file {path}: {exc.strerror or exc}", EXIT_USAGE)


async def _run_with_signals(opts: app.RunOptions, view: _RunView) -> app.RunOutcome:
    loop = asyncio.get_running_loop()
    runner_box: list[Any] = []
    signals_seen = 0

    def on_signal(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1 and runner_box:
            click.echo(f"\n{signame}: stopping (jobs already submitted are kept); "
                       "press Ctrl-C again to exit at once", err=True)
            runner_box[0].stop(StopReason.INTERRUPTED)
            return
        # Second signal, or nothing submitted yet: leave now. Every committed state is safe in
        # the store; a submit caught on the wire becomes 'unknown' on the next run.
        os._exit(EXIT_INTERRUPTED)

    def on_runner(runner: Any) -> None:
        runner_box.append(runner)
        view.attach(runner)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        with view:
            outcome = await app.run(opts, on_event=view.on_event, on_runner=on_runner, on_notice=_notice)
            await view.finish(outcome)
            return outcome
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _notice(text: str, warning: bool) -> None:
    """What a run says before its jobs go (the balance): on stderr, with the run's other lines."""
    click.echo(f"{'warning: ' if warning else ''}{printable(text)}", err=True)


class _RunView:
    """Lines on stderr (and a log file), or a live panel on a terminal. Repeated notices are
    coalesced on the screen (RepeatedNotices); the log file gets every event as it came."""

    def __init__(self, quiet: bool, verbose: int, log_format: str, log_file: IO[str] | None):
        self._file = log_file
        use_panel = not quiet and log_format == "text" and stderr_is_tty()
        self.panel = Panel(verbose=verbose > 0) if use_panel else None
        verbosity = 0 if quiet else 1 + verbose
        self.file_lines = LineLog(None, log_format, verbosity, self._file)
        self.lines = LineLog(None if self.panel else sys.stderr, log_format, verbosity)
        self.notices = RepeatedNotices()
        self._runner: Any = None
        self._refresh: asyncio.Task[Any] | None = None

    def on_event(self, event: Event) -> None:
        self.file_lines(event)
        self._show(self.notices.offer(event))

    def _show(self, events: list[Event]) -> None:
        for event in events:
            self.lines(event)
            if self.panel is not None:
                self.panel.note(event)

    def attach(self, runner: Any) -> None:
        self._runner = runner
        self._refresh = asyncio.get_running_loop().create_task(self._keep_fresh())

    async def _keep_fresh(self) -> None:
        while True:
            self._show(self.notices.due())
            if self.panel is not None:
                await self._draw(await self._runner.store.counts(self._runner.batches))
            await asyncio.sleep(C.PANEL_REFRESH_EVERY)

    async def _draw(self, counts: dict[str, dict[str, int]]) -> None:
        assert self.panel is not None
        runner = self._runner
        self.panel.update(counts, runner.cap.value, runner.budget.spent, runner.cap_note)

    async def finish(self, outcome: app.RunOutcome) -> None:
        """The run is over: recaps still held back, and the panel's last frame drawn from the
        counts the summary prints, not from a refresh up to PANEL_REFRESH_EVERY old."""
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        self._show(self.notices.flush())
        if self.panel is not None and self._runner is not None:
            await self._draw(outcome.counts)

    def __enter__(self) -> _RunView:
        if self.panel is not None:
            self.panel.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        if self.panel is not None:
            self.panel.__exit__()
        if self._file is not None:
            self._file.close()


def _again(workdir: Path, simulate: bool = False, api_url: str | None = None) -> app.Again:
    """The options the user gave that a pasted `next:` command needs."""
    ctx = click.get_current_context()
    return app.Again(workdir=workdir if _workdir_given(ctx) else None, simulate=simulate, api_url=api_url,
                     config=(ctx.obj or {}).get("config"))


def _print_run_summary(outcome: app.RunOutcome, again: app.Again, folder: Path, log_format: str) -> None:
    """What the run did, per batch where its outputs are, what to do and where to look next: as
    text, or with --log-format json as one JSON object on stdout (the events went to stderr)."""
    s = outcome.summary
    notes = []
    if outcome.overdue_kept:
        notes.append(f"note: {outcome.overdue_kept} overdue job(s) not submitted again: they may still be "
                     "delivered and are billed (still followed); retry --force submits them anyway")
    if s.stop_reason is StopReason.CANCELLED:
        notes.append("stopped: cancelled by `batchgen cancel`")
    elif s.stop_reason and not s.stop_message:  # a stop message says itself what to do
        notes.append(f"stopped: {s.stop_reason}; run the same command again to continue")
    batches = [(name, counts, folder / name, app.next_steps(name, counts, again),
                app.look_steps(name, counts, again)) for name, counts in outcome.counts.items()]
    if log_format == "json":
        click.echo(json.dumps({
            "event": "summary", "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "batches": [{"name": name, "states": dict(_ordered(counts)), "outputs": str(where),
                         "next_steps": steps, "look": look} for name, counts, where, steps, look in batches],
            "new_jobs": outcome.new_jobs, "submitted": s.submitted, "finished": s.finished,
            "elapsed_s": round(s.elapsed, 1), "stop_reason": s.stop_reason,
            "stop_message": printable(s.stop_message) if s.stop_message else None,
            "notes": notes,
        }, ensure_ascii=False))
        return
    finished = ", ".join(f"{n} {state}" for state, n in sorted(s.finished.items())) or "nothing"
    click.echo(
        f"{', '.join(outcome.batches) or 'no batch'}: {outcome.new_jobs} new job(s) recorded, "
        f"{s.submitted} submitted, finished this run: {finished} ({s.elapsed:.1f}s)"
    )
    for name, counts, where, steps, look in batches:
        click.echo(f"  {name}: " + ", ".join(f"{n} {st}" for st, n in _ordered(counts)))
        if look:
            click.echo(f"  outputs: {where}")
        for step in steps:
            click.echo(f"  next: {step}")
        for step in look:
            click.echo(f"  look: {step}")
    for note in notes:
        click.echo(note, err=True)


def _ordered(counts: dict[str, int]) -> list[tuple[str, int]]:
    return [(st, counts[st]) for st in S.STATES if counts.get(st)]


def _concurrency(value: Any) -> tuple[bool, int]:
    """--concurrency (or `concurrency` in batchgen.toml): (auto, the ceiling or the fixed cap)."""
    text = str(value).strip().lower()
    auto = text == "auto" or text.startswith("auto:")
    number = text[5:] if text.startswith("auto:") else (str(C.AUTO_CEILING) if auto else text)
    try:
        limit = int(number)
    except ValueError:
        limit = 0
    if limit < 1:
        raise click.BadParameter(f"'{value}' is not auto, auto:N or a number of at least 1",
                                 param_hint="--concurrency")
    return auto, limit


def _duration(text: str, option: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            value = float(t[:-1]) * units[t[-1]]
        else:
            value = float(t)
    except ValueError:
        raise click.BadParameter(
            f"'{text}' is not a duration; use e.g. 90s, 30m, 6h", param_hint=option
        ) from None
    if value <= 0:
        raise click.BadParameter("must be more than zero", param_hint=option)
    return value


# ---- validate ----------------------------------------------------------------------------------


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--schema", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Model schema file to validate against.")
@workdir_option
@_api_options
@no_schema_option
@max_expand_option
@_fix_options("--fix")
@click.option("--verbose", "-v", count=True, help="More detail (-vv for debug).")
def validate(manifest: Path, schema: Path | None, workdir: Path, api_url: str | None, simulate: bool,
             no_schema: bool, max_expand: int, fix: bool, upscale: bool, fix_ratio: str | None,
             verbose: int) -> None:
    """Check MANIFEST against the model's schema without submitting anything.

    Every problem is listed at once, each with its file, row or line, and field. A model batchgen
    does not bundle is looked up in RunComfy's catalog (cached in the work directory for a day).
    With --simulate, local image files need no image_base_url.

    \b
    Example:
      batchgen validate sample_manifests/quickstart.yaml --simulate
    """
    _setup_logging(verbose, False)
    opts = app.RunOptions(workdir=workdir, manifest=manifest, schema=schema, no_schema=no_schema,
                          max_expand=max_expand, target=_target(api_url, simulate, ()),
                          fix=_fix("--fix", fix, upscale, fix_ratio))
    result = _run_async(app.validate(opts))
    _echo_fixed(result.fixed)
    if result.problems:
        _fail(str(ManifestError(result.problems, result.hint)), EXIT_USAGE)
    dup = f" ({result.duplicates} duplicate(s) collapsed)" if result.duplicates else ""
    unchecked = " (no schema for the model: inputs NOT checked, --no-schema)" if result.schema is None else ""
    click.echo(f"{manifest}: {result.jobs} job(s), all valid{dup}{unchecked}")


@main.command()
@click.argument("manifest", type=click.Path(dir_okay=False, path_type=Path))
@workdir_option
@_target_options
@balance_url_option
@click.option("--schema", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Model schema file to validate against.")
@click.option("--batch", help="Batch name (default: the manifest's name, or its file name).")
@click.option("--concurrency", "-c", default="auto", show_default=True, metavar="auto[:N]|N",
              help="The concurrency the run would use (for the duration estimate): auto, the cap an "
                   "earlier run found for the model at this API.")
@no_schema_option
@max_expand_option
@_fix_options("--fix")
@click.option("--verbose", "-v", count=True, help="More detail (-vv for debug).")
def plan(manifest: Path, workdir: Path, api_url: str | None, simulate: bool, sim_faults: tuple[str, ...],
         balance_url: str | None, schema: Path | None, batch: str | None, concurrency: str, no_schema: bool,
         max_expand: int, fix: bool, upscale: bool, fix_ratio: str | None, verbose: int) -> None:
    """Show what `batchgen run MANIFEST` would do: jobs in the manifest, how many are new and how
    many already recorded, estimated cost and duration, and (with an API token) the account's
    balance beside the cost. Submits and records nothing.

    \b
    Example:
      batchgen plan sample_manifests/quickstart.yaml --simulate
    """
    kw: dict[str, Any] = {"workdir": workdir, "api_url": api_url, "balance_url": balance_url,
                          "concurrency": concurrency}
    _apply_config(kw)
    _setup_logging(verbose, False)
    opts = app.RunOptions(workdir=workdir, manifest=manifest, batch=batch, schema=schema, no_schema=no_schema,
                          max_expand=max_expand, fix=_fix("--fix", fix, upscale, fix_ratio),
                          target=_target(kw["api_url"], simulate, sim_faults, kw["balance_url"]))
    _show_plan(opts, *_concurrency(kw["concurrency"]))


def _echo_fixed(changes: list[str]) -> None:
    """One line per copy made by --fix: what it changed (file names are the user's: made printable)."""
    for change in changes:
        click.echo(f"fixed {printable(change)}")


def _show_plan(opts: app.RunOptions, auto: bool, limit: int) -> None:
    p = _run_async(app.plan(opts))
    _echo_fixed(p.fixed)
    dup = f", {p.duplicates} duplicate row(s) collapsed" if p.duplicates else ""
    click.echo(f"{p.batch} ({p.model_id}): {p.jobs} job(s) in the manifest{dup}")
    if not p.schema_origin:
        click.echo("  schema: none: inputs are NOT checked (--no-schema)")
    elif p.schema_origin == "catalog":
        click.echo("  schema: from RunComfy's catalog")
    click.echo(f"  new: {p.new}")
    for st, n in _ordered(p.recorded):
        click.echo(f"  already recorded, {st}: {n}")
    click.echo(f"  would submit: {p.to_submit}")
    if p.reusable:
        click.echo(f"  identical to jobs already succeeded in other batches: {p.reusable} (run --reuse "
                   "links their outputs instead of paying again)")
    if p.random_seed:
        click.echo(f"  repeating earlier requests with a random seed: {p.random_seed} (new generations, "
                   "paid for)")
    cost = p.estimated_cost
    if cost is None:
        text = ("unknown (no price from the schema or the API)" if p.price_usd is None
                else f"unknown (price ${p.price_usd:g} per {p.price_unit}, which batchgen cannot apply)")
    elif p.price_unit == "second":
        text = f"${cost:.2f} (${p.price_usd:g} a second x each job's duration)"
        if p.unpriced:
            text += f"; {p.unpriced} job(s) without a duration not counted"
    else:
        text = f"${cost:.2f} (${p.price_usd:.2f} a job)"
    click.echo(f"  estimated cost: {text}")
    if p.balance is not None:
        line, warning = p.balance.describe(cost)
        click.echo(f"  {line}")
        if warning:
            click.echo(f"warning: {printable(warning)}", err=True)
    concurrency = p.concurrency(auto, limit)
    # auto with no cap learned yet: it starts small and finds the account's limit; estimated at
    # the fixed default meanwhile, and said so.
    duration = p.estimated_duration(concurrency or C.DEFAULT_CONCURRENCY)
    if not p.to_submit:
        text = "nothing to submit"
    elif duration is None:
        text = "unknown until jobs of this batch have run"
    elif not auto:
        text = f"{duration / 60:.1f} min at --concurrency {concurrency}"
    elif concurrency is not None:
        text = f"{duration / 60:.1f} min at {concurrency} at once (the cap --concurrency auto found for this model)"
    else:
        text = (f"{duration / 60:.1f} min at {C.DEFAULT_CONCURRENCY} at once (--concurrency auto has found no cap "
                "for this model at this API yet: the account may run more)")
    click.echo(f"  estimated duration: {text}")


@main.command()
@click.argument("model", required=False)
@click.option("--search", metavar="TEXT", help="Only models whose id or name contains TEXT.")
@click.option("--category", help="Only models of this category, e.g. image-to-video.")
@click.option("--refresh", is_flag=True, help="Fetch RunComfy's catalog now, even if the cached one is fresh.")
@workdir_option
@_api_options
@click.option("--verbose", "-v", count=True, help="More detail (-vv for debug).")
def models(model: str | None, search: str | None, category: str | None, refresh: bool, workdir: Path,
           api_url: str | None, simulate: bool, verbose: int) -> None:
    """List the models RunComfy's catalog offers (id, categories, price) and the bundled ones,
    or show one MODEL's fields and rules, from whichever source it came.

    The catalog is cached in the work directory and fetched again when a day old; without an
    API token, the cache (or only the bundled models) is shown.

    \b
    Examples:
      batchgen models --category image-to-video
      batchgen models --search kling --refresh
      batchgen models bytedance/dreamina-3-0/pro/image-to-video
    """
    _setup_logging(verbose, False)
    target = _target(api_url, simulate, ())
    if model is not None:
        found = _run_async(app.find_model(model, target, workdir, refresh))
        if found.schema is None:
            _fail(found.problem(), EXIT_USAGE)
        _show_model(found)
        return
    catalog, note = _run_async(app.open_catalog(target, workdir, refresh))
    _list_models(catalog, note, search, category, None if simulate else workdir / C.CATALOG_FILENAME)


def _list_models(catalog: Any, note: str, search: str | None, category: str | None, cache: Path | None) -> None:
    from .schema import bundled_schemas

    rows: dict[str, list[str]] = {}
    if catalog is not None:
        where = f"; cached in {cache}" if cache is not None else ""
        click.echo(f"RunComfy catalog, fetched {catalog.fetched_text()} ({len(catalog.entries)} models{where})")
        for e in catalog.find(search, category):
            rows[e.model_id] = [", ".join(e.categories) or "-", e.price_text(), ""]
    if note:
        click.echo(f"note: {note}", err=True)
    for sch in bundled_schemas():
        last = sch.model_id.rsplit("/", 1)[-1]
        cats = [last] if "-to-" in last else []
        needle = (search or "").lower()
        if (needle and needle not in sch.model_id.lower()) or (category and category not in cats):
            continue
        row = rows.setdefault(sch.model_id, [", ".join(cats) or "-", "-", ""])
        row[2] = "bundled"
    if not rows:
        click.echo("no model matches")
        return
    width = max(len(m) for m in rows)
    cat_width = max(len(r[0]) for r in rows.values())
    for model_id in sorted(rows):
        kinds, price, tag = rows[model_id]
        click.echo(f"{model_id:<{width}}  {kinds:<{cat_width}}  {price}{'  [' + tag + ']' if tag else ''}".rstrip())


def _show_model(found: app.ModelLookup) -> None:
    sch = found.schema
    assert sch is not None
    origin = {"bundled": "bundled with batchgen",
              "catalog": "from RunComfy's catalog" + (
                  f", fetched {found.catalog.fetched_text()}" if found.catalog else ""),
              }.get(sch.origin, f"from {sch.source}")
    click.echo(f"{sch.model_id}  (output: {sch.output_kind}; schema {origin})")
    if sch.base_price_usd is not None:
        per = "a second of the job's duration" if sch.price_unit == "second" else "a job"
        click.echo(f"  price: ${sch.base_price_usd:g} {per}")
    for name, prop in sch.properties.items():
        req = "required" if name in sch.required else f"default {json.dumps(prop['default'])}" \
            if "default" in prop else "optional"
        click.echo(f"  {name:<16} {req:<12} {'; '.join(_field_facts(prop))}")
        for rule in sch.rules.get(name, ()):
            said = rule.message.strip().rstrip(".")
            click.echo(f"  {'':<16} {'':<12} {said + ' ' if said else ''}(allowed: {rule.allowed()})")
    note = (sch.data.get("x-batchgen") or {}).get("note")
    if note:
        click.echo(f"  note: {note}")


def _field_facts(prop: dict[str, Any]) -> list[str]:
    """A field's JSON Schema constraints in a few words each."""
    facts = [str(prop["type"])] if "type" in prop else []
    if isinstance(prop.get("format"), str) and prop["format"].endswith(("_uri", "_uris")):
        facts.append(prop["format"])
    if "enum" in prop:
        facts.append("one of " + ", ".join(json.dumps(v) for v in prop["enum"]))
    for word, text in (("minimum", "at least"), ("exclusiveMinimum", "more than"), ("maximum", "at most"),
                       ("exclusiveMaximum", "less than")):
        if word in prop:
            facts.append(f"{text} {prop[word]}")
    if "maxLength" in prop:
        facts.append(f"at most {prop['maxLength']} characters")
    low, high = prop.get("minItems"), prop.get("maxItems")
    if low is not None and low == high:
        facts.append(f"exactly {low} item(s)")
    elif low is not None and high is not None:
        facts.append(f"{low} to {high} item(s)")
    elif low is not None or high is not None:
        facts.append(f"at least {low} item(s)" if low is not None else f"at most {high} item(s)")
    return facts


# ---- status ------------------------------------------------------------------------------------


@main.command()
@click.argument("batches", nargs=-1)
@workdir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--all", "show_all", is_flag=True,
              help="Also list retired jobs (no longer in the manifest) by state.")
def status(batches: tuple[str, ...], workdir: Path, as_json: bool, show_all: bool) -> None:
    """Show, per batch, how many jobs are in each state, and the API its results are from.

    Jobs an earlier version of the manifest had, and the manifest run since has not, are
    retired: left out of the counts and the advice (their number is said; --all lists them).

    Batches run with --simulate are listed after the others and marked simulated: their outputs
    are the built-in simulator's placeholders, kept apart in WORKDIR/simulated/.

    \b
    Examples:
      batchgen status
      batchgen status quickstart --json
      batchgen status quickstart --all
    """
    result = _run_async(app.status(workdir, list(batches) or None, _again(workdir)))
    if as_json:
        click.echo(json.dumps({"batches": [b.as_dict() for b in result]}, indent=2))
        return
    if not result:
        click.echo(f"no batches in {workdir}")
        return
    for b in result:
        if b.simulated:
            click.echo(f"{b.name}  ({b.model_id}, {b.total} jobs, simulated: nothing spent)")
            click.echo(f"  simulated: placeholder outputs of the built-in simulator, in {b.folder}")
        else:
            click.echo(f"{b.name}  ({b.model_id}, {b.total} jobs, ${b.spent_usd:.2f} spent)")
            if b.apis:
                click.echo(f"  api: {', '.join(b.apis)}")
            if b.folder is not None and b.look:
                click.echo(f"  outputs: {b.folder}")
        for st, n in _ordered(b.counts):
            click.echo(f"  {st:<12} {n:>6}")
        if b.retired and show_all:
            click.echo("  retired (no longer in the manifest):")
            for st, n in _ordered(b.retired):
                click.echo(f"    {st:<10} {n:>6}")
        elif b.retired:
            click.echo(f"  retired      {sum(b.retired.values()):>6}  (no longer in the manifest; --all lists them)")
        if b.median_queue_s is not None or b.median_run_s is not None:
            click.echo(f"  median queue wait {_secs(b.median_queue_s)}, median run time {_secs(b.median_run_s)}")
        if b.failures:
            click.echo("  failures:")
            for st, err, n in b.failures:
                click.echo(f"    {n:>5} {st}: {printable(err) if err else '(no message)'}")
        for step in b.next_steps:
            click.echo(f"  next: {step}")
        for step in b.look:
            click.echo(f"  look: {step}")


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


# ---- report and gallery --------------------------------------------------------------------------


@main.command()
@click.argument("batch")
@click.option("--output", "-o", "out", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help=f"File to write; its extension picks the format: {reportformats.help_list()}. '-' writes "
                   f"to stdout ({' or '.join(reportformats.STREAM_EXTENSIONS)}; CSV unless --format).")
@click.option("--format", "fmt", type=click.Choice(list(reportformats.REPORT_FORMATS)), default=None,
              help="The format, whatever the file's extension (on stdout: "
                   f"{' or '.join(f.name for f in reportformats.REPORT_FORMATS.values() if f.streams)}).")
@workdir_option
@click.option("--simulated/--api", "--simulate", "simulated", default=None,
              help="The batch's --simulate results, or its results from the API (default: from the "
                   "API if it has any, else the simulated ones).")
def report(batch: str, out: str, fmt: str | None, workdir: Path, simulated: bool | None) -> None:
    """Write one row per job of BATCH: inputs, notes, state, timings, output files with their
    sha256, cost and error, and whether it is simulated (with the API each job ran against).

    Output paths in the report are absolute. Lists (several images, several outputs) are joined
    with " | ". The report is written a chunk of jobs at a time, so its size is not bounded by
    memory; with -o - it goes to stdout and the summary line to stderr.

    \b
    Examples:
      batchgen report quickstart -o quickstart.csv
      batchgen report quickstart -o quickstart.json
      batchgen report quickstart -o - --format jsonl | jq .state
      batchgen report nightly -o ~/reports/nightly.xlsx --workdir /data/batchgen
    """
    path = None if out == "-" else Path(out)
    counts, sim = _run_async(_write_report(workdir, batch, path, fmt, simulated))
    states = ", ".join(f"{n} {st}" for st, n in _ordered(counts))
    total = sum(counts.values())
    where = "stdout" if path is None else str(path)
    click.echo(f"{where}: {total} job(s) of {batch}{', simulated' if sim else ''} ({states or 'no jobs'})",
               err=path is None)


async def _write_report(workdir: Path, batch: str, out: Path | None, fmt: str | None,
                        simulated: bool | None) -> tuple[dict[str, int], bool]:
    from .app import find_batch
    from .report import report_format, report_tables, stream_report  # only here: the report's modules

    report_format(out, fmt)  # a wrong format fails before the store is read
    _, sim = await find_batch(workdir, batch, simulated)
    return await stream_report(report_tables(workdir, batch, sim), out, fmt), sim


@main.command()
@click.argument("batch")
@workdir_option
@click.option("--open", "open_page", is_flag=True, help="Open the page in the default browser.")
@click.option("--simulated/--api", "--simulate", "simulated", default=None,
              help="The batch's --simulate results (page in WORKDIR/simulated/BATCH/), or its results "
                   "from the API (default: from the API if it has any, else the simulated ones).")
def gallery(batch: str, workdir: Path, open_page: bool, simulated: bool | None) -> None:
    """Write an HTML page of BATCH to WORKDIR/BATCH/gallery.html, its jobs in gallery-data.js
    beside it: every job's input image, prompt and settings with its video or its error, with
    search, state filters and sorting; only the cards in view are drawn, so 100,000 jobs open
    in a second. A simulated batch's page is WORKDIR/simulated/BATCH/gallery.html and says it
    is simulated.

    The page fetches nothing from the network; it links the videos, and small copies of the
    input images (WORKDIR/BATCH/thumbs/), by relative paths, so it keeps working when the work
    directory is moved or copied as a whole.

    \b
    Examples:
      batchgen gallery quickstart
      batchgen gallery nightly --workdir /data/batchgen --open
    """
    from .gallery import build_gallery

    page = _run_async(build_gallery(workdir, batch, simulated))
    click.echo(f"{page}")
    if open_page:
        click.launch(page.as_uri())


# ---- cancel ------------------------------------------------------------------------------------


@main.command()
@click.argument("batch")
@workdir_option
@_target_options
def cancel(batch: str, workdir: Path, api_url: str | None, simulate: bool, sim_faults: tuple[str, ...]) -> None:
    """Cancel BATCH: jobs not yet submitted are never submitted; queued jobs are cancelled at
    the provider. Jobs already running cannot be cancelled: they are recorded as such and the
    next run still downloads what they produce.

    \b
    Example:
      batchgen cancel street-scenes
    """
    report = _run_async(app.cancel(workdir, batch, _target(api_url, simulate, sim_faults)))
    if report.handed_to == app.SHARED:
        click.echo(f"{batch}: {report.not_submitted} not submitted and cancelled; no runner on the shared "
                   f"store submits another job of it, and those running it cancel its queued jobs at the "
                   f"provider within {C.CANCEL_CHECK_EVERY * 2:g} s (jobs already running are still followed)")
        return
    if report.handed_to is not None:
        # The holding run follows only its own batches: if it is not running this one, the queued
        # jobs are cancelled at the provider by this batch's next run, which sees the request.
        click.echo(f"{batch}: {report.not_submitted} not submitted and cancelled; the batchgen run "
                   f"holding the work directory (pid {report.handed_to}) cancels its queued jobs "
                   f"at the provider within {C.CANCEL_CHECK_EVERY * 2:g} s if it is running this batch, "
                   "else the batch's next run does (jobs already running are still followed)")
        return
    click.echo(f"{batch}: {report.not_submitted} not submitted and cancelled, {report.cancelled} "
               f"cancelled at the provider, {report.not_cancellable} already running "
               "(still followed)")
    for err in report.errors:
        click.echo(f"  could not cancel {printable(err)}", err=True)
    sys.exit(EXIT_JOBS_FAILED if report.errors else EXIT_OK)


# ---- forget ------------------------------------------------------------------------------------


@main.command()
@click.argument("batch")
@click.option("--state", "states", multiple=True, type=click.Choice([*map(str, app.FORGETTABLE), app.RETIRED]),
              help="Only jobs in this state (repeatable; 'retired': those no longer in the manifest).")
@click.option("--key", "keys", multiple=True, help="Only the job with this key (repeatable).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option("--delete-files", is_flag=True, help="Also delete their output files (kept by default).")
@workdir_option
@click.option("--simulated/--api", "--simulate", "simulated", default=None,
              help="The batch's --simulate records, or those of the API (default: the API's if it "
                   "has any, else the simulated ones).")
def forget(batch: str, states: tuple[str, ...], keys: tuple[str, ...], yes: bool, delete_files: bool,
           workdir: Path, simulated: bool | None) -> None:
    """Remove BATCH's job records that are not at the provider: pending, failed, cancelled,
    timed out, unknown, and retired jobs (no longer in the manifest). Jobs at the provider and
    succeeded jobs are never forgotten. Their files stay unless --delete-files. A manifest run
    again records a forgotten job anew (and submits it).

    \b
    Examples:
      batchgen forget street-scenes --state retired
      batchgen forget street-scenes --key 35964620b34140af --yes
    """

    def confirm(plan: app.ForgetPlan) -> bool:
        what = ", ".join(f"{n} {st}" for st, n in sorted(plan.counts().items()))
        click.echo(f"{batch}: forget {len(plan.jobs)} job(s) ({what})"
                   + ("; their files are deleted" if delete_files else f"; their files stay in {plan.folder}"))
        if any(j.state == S.UNKNOWN for j in plan.jobs):
            click.echo("warning: a job of unknown outcome may exist, and be billed, at the provider: its "
                       "record is the only trace of it", err=True)
        return yes or click.confirm("Forget them?", default=False)

    plan = _run_async(app.forget(workdir, batch, states=states, keys=keys, simulated=simulated,
                                 delete_files=delete_files, confirm=confirm))
    if not plan.jobs:
        click.echo(f"{batch}: no job to forget")
    elif not plan.forgotten:
        click.echo("nothing forgotten")
    else:
        click.echo(f"{batch}: {plan.forgotten} job(s) forgotten"
                   + (f", {plan.files_deleted} file(s) deleted" if delete_files else ""))


# ---- simulate ----------------------------------------------------------------------------------


class _SimulateCommand(click.Command):
    """``simulate``, whose help ends with every fault, from the simulator's own table (imported
    only when the help is shown)."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from .simulator.faults import faults_help

        formatter.write_paragraph()
        formatter.write("Faults (--fault NAME=VALUE, repeatable; RATE is a share from 0 to 1):\n")
        formatter.write(faults_help() + "\n")  # one width everywhere: README shows it


@main.command(cls=_SimulateCommand)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", "-p", type=click.IntRange(0, 65535), default=8787, show_default=True,
              help="Port to listen on (0: any free port).")
@click.option("--token", help="Accept only this Bearer token (default: any non-empty token).")
@click.option("--concurrency", type=click.IntRange(1), default=4, show_default=True,
              help="Jobs running at once per token (the account's limit); the rest wait in the queue.")
@click.option("--max-queued", type=click.IntRange(0),
              help="Jobs a token may have waiting; a submit beyond them gets 429 (default: no limit).")
@click.option("--duration", type=click.FloatRange(0), default=2.0, show_default=True,
              help="Seconds each job runs.")
@click.option("--duration-jitter", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Each job runs the duration give or take this fraction of it, at random (0.2: ±20%).")
@click.option("--fault", "faults", multiple=True, metavar="SPEC",
              help="Inject faults, e.g. --fault 429=0.1 --fault retry_after=2 (all listed below).")
@click.option("--price", type=click.FloatRange(0), default=0.10, show_default=True,
              help="USD per job, reported by model info and include_cost results.")
@click.option("--balance", type=click.FloatRange(0),
              help="Account balance in USD; submits beyond it get RunComfy's 400002 error.")
@click.option("--seed", type=int, help="Random seed for reproducible faults.")
def simulate(host: str, port: int, token: str | None, concurrency: int, max_queued: int | None,
             duration: float, duration_jitter: float, faults: tuple[str, ...], price: float,
             balance: float | None, seed: int | None) -> None:
    """Serve a local fake of the RunComfy Model API until Ctrl-C.

    Point a run at it with --api-url (any token works unless --token is given).

    \b
    Example:
      batchgen simulate --port 8787 --duration 5 --fault 429=0.1
      RUNCOMFY_API_TOKEN=x batchgen run m.yaml --api-url http://127.0.0.1:8787/v1
    """
    from .simulator import FaultConfig, SimConfig, serve

    try:
        fault_config = FaultConfig.parse(list(faults))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--fault") from None
    config = SimConfig(token=token, concurrency=concurrency, max_queued=max_queued, duration=duration,
                       duration_jitter=duration_jitter, price_usd=price, balance_usd=balance,
                       faults=fault_config, seed=seed)

    def ready(sim: Any) -> None:
        click.echo(f"simulator listening on {sim.base_url} (Ctrl-C to stop)", err=True)

    async def serve_until_signal() -> str:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        seen: list[str] = []

        def on_signal(signame: str) -> None:
            if seen:  # a second signal: closing connections took too long, leave now
                os._exit(EXIT_OK)
            seen.append(signame)
            # aiohttp logs every request cut short by the stop: the stop asked for, not news.
            logging.getLogger("aiohttp").setLevel(logging.CRITICAL)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig.name)
        try:
            await serve(config, host, port, ready=ready, stop=stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return seen[0]

    signame = _run_async(serve_until_signal())
    click.echo(f"simulator stopped ({signame})", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
