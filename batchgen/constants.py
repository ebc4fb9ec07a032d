"""Every tunable default in one place, each with the reason for its value."""

from __future__ import annotations

# The model a manifest targets when it names none: the one this project was started for.
DEFAULT_MODEL = "bytedance/dreamina-3-0/pro/image-to-video"

# RunComfy's public endpoint; --api-url or RUNCOMFY_API_URL override it.
DEFAULT_API_URL = "https://model-api.runcomfy.net/v1"
TOKEN_ENV = "RUNCOMFY_API_TOKEN"
# Read when TOKEN_ENV is not set: the name RunComfy's own CLI uses, so one export serves both.
TOKEN_ENV_FALLBACK = "RUNCOMFY_TOKEN"
API_URL_ENV = "RUNCOMFY_API_URL"
# A shared store (postgresql://user@host/db) instead of the work directory's SQLite file:
# `--store`, `store = "…"` in batchgen.toml, or this variable.
STORE_ENV = "BATCHGEN_STORE"
# Where outputs go when the store is shared (a path every runner mounts): `--outputs`.
OUTPUTS_ENV = "BATCHGEN_OUTPUTS"
# The name the shared store goes by where a store's path is expected (Store.open reads the URL
# from STORE_ENV): the URL itself is never a path, and may hold a password.
SHARED_STORE_MARK = "<shared store>"

# The account's wallet: on RunComfy's main API host, not the Model API's. --balance-url,
# balance_url in batchgen.toml or RUNCOMFY_BALANCE_URL override it. When the API URL is a
# loopback address (a standalone simulator) and none is given, the balance is asked at the same
# origin and this path, where the simulator serves it.
DEFAULT_BALANCE_URL = "https://api.runcomfy.net/prod/v2/balance"
BALANCE_URL_ENV = "RUNCOMFY_BALANCE_URL"
BALANCE_PATH = "/prod/v2/balance"
# A balance answer is a few dozen bytes; anything longer is not one.
BALANCE_MAX_BYTES = 64 << 10

# RunComfy's model catalog, cached in the work directory. A day: models and prices change rarely,
# and a nightly cron run then refreshes it once a night. `batchgen models --refresh` forces it.
CATALOG_FILENAME = "catalog.json"
CATALOG_MAX_AGE = 24 * 3600
# Entries per catalog page: the most the API takes (limit=1..500), so a catalog of a few hundred
# models is one call.
CATALOG_PAGE_SIZE = 500
# Catalog answers are untrusted: a page (500 entries with their schemas, a few KB each) larger
# than this is refused, and at most this many pages are read (100,000 models: far beyond today's).
CATALOG_MAX_PAGE_BYTES = 32 << 20
CATALOG_MAX_PAGES = 200

# The default work directory, relative to where batchgen is started.
DEFAULT_WORKDIR = "jobs"
STORE_FILENAME = "batchgen.sqlite3"
LOCK_FILENAME = "batchgen.lock"
CONFIG_FILENAME = "batchgen.toml"
# --simulate runs keep their own store and outputs in this folder of the work directory, so that a
# simulated result is never taken for a real one, nor written over one (ARCHITECTURE.md, "Realms").
SIMULATED_DIR = "simulated"
# Where a --simulate run keeps its simulator's jobs (in that folder), so an interrupted run
# resumes them.
SIM_STATE_FILENAME = "simulator-state.jsonl"
# Where fixed copies of input images go (fiximages.py, `validate --fix`, `run --fix-images`), in
# the work directory: beside the batches' folders, one folder for both realms.
FIXED_DIR = "fixed"
# Names batchgen keeps in the work directory beside the batches' folders (SQLite adds -wal, -shm
# and -journal to the store's name; the simulated runs' folder; the fixed copies' folder): a batch
# may not be named as one.
WORKDIR_FILES = (STORE_FILENAME, f"{STORE_FILENAME}-wal", f"{STORE_FILENAME}-shm",
                 f"{STORE_FILENAME}-journal", LOCK_FILENAME, CONFIG_FILENAME, SIM_STATE_FILENAME,
                 SIMULATED_DIR, FIXED_DIR)
# How often, at most, a run checks that its store file is still the one it opened (a stat): a
# store deleted under a run is noticed within this long, at its next write. Every claim checks
# too, so nothing is submitted into a store that is gone.
STORE_CHECK_EVERY = 0.5

# Jobs in flight at the provider with a fixed --concurrency and no number given (`plan`'s estimate,
# RunSettings' default): a handful is polite. A run's own default is `auto` (below).
DEFAULT_CONCURRENCY = 4
# --concurrency auto (limits.AdaptiveCap): RunComfy publishes no limit per account, so the cap is
# found. It starts at AUTO_START (or at the cap an earlier run learned for the model and API),
# and grows by half (AUTO_SLOW_START) each time a job that filled it is seen running at once, by
# one once a job has been seen waiting. Two: an account that runs two jobs is not flooded with
# more at the start (the benchmark's smallest account keeps at most one waiting), and a large
# one is reached in a few rounds of AUTO_PROBE_DELAY (2 -> 64 in nine, about 2 s). 1.5 rather
# than TCP's 2: the last round overshoots the limit by at most half of it, and those jobs wait
# a whole job's time at the provider before they start.
AUTO_START = 2
AUTO_SLOW_START = 1.5
# The highest cap `auto` goes to without a ceiling (`auto:N`): far above any account seen, and
# a bound on what a provider that never says "wait" (or lies) can draw from one run.
AUTO_CEILING = 256
# Once the limit is known, the cap is the limit plus a quarter of it (at least one) waiting at
# the provider: a slot it frees starts the next job at once, while we notice the finish only at
# our next poll (with jittery durations, up to a fifth of a job later). Measured with 64 slots
# and durations of ±20%: an eighth left the queue dry now and then (makespan 1.15 x the bound,
# against 1.115 with a quarter); the queue still averages well under a quarter of the limit,
# since it drains whenever jobs finish before we notice.
AUTO_HEADROOM_DIVISOR = 4
# How soon after its submit a tester (the job that filled the cap) is asked whether it runs.
# Each round of the slow start lasts about this long, and the simulator starts a job at once;
# a provider that takes longer to start jobs that have room makes the cap grow by one at a time
# instead (a tester seen waiting at position 1), never flood.
AUTO_PROBE_DELAY = 0.15
# Once the slow start is over, a tester at most this often, or once per expected run time when
# that is longer: the cap then only follows changes of the account's limit (or of other work on
# it), and a tester per job would cost a /status call per job for that (a small batch of long
# jobs: most of its polling budget of 3 calls a job).
AUTO_STEADY_TEST_EVERY = 1.0
# Output downloads at once: they go to storage hosts, not the API, so they have their own limit.
DEFAULT_DOWNLOAD_CONCURRENCY = 4
# API requests per second across all calls (submit, status, result, cancel); 0 = unlimited.
DEFAULT_RATE = 10.0

# How many times one job may be submitted before it is declared failed. Only submits that certainly
# did not create a job are retried, so this bounds wasted time, not money.
MAX_SUBMIT_ATTEMPTS = 5
# Failed tries of one output's download before it is declared lost (a fresh URL is asked for
# every third), and answers about one job that could not be read, in a row, before the job is
# put aside as 'overdue' (still followed). Other failed polls are retried until the job timeout.
MAX_CALL_RETRIES = 8

# Polling. Until batchgen has seen jobs of a model finish it polls on a short, growing interval;
# after that it polls near the expected finish (see runner.PollPlanner).
FIRST_POLL_DELAY = 1.0
# The jobs polled early to learn how long jobs take (runner.PollPlanner.scout_delay). Until one
# of them is seen finished, every other job waits for a poll planned without knowing: on the first
# wave of a batch, that lag holds every provider slot. Each scout polls from 10 ms on, a quarter
# more each time (10 ms -> 1 s in about 20 calls); the SCOUTS scouts are offset from each other, so
# together they poll every 1.25^(1/SCOUTS) - 1 = 2.8% of the time the jobs have been out (a scout
# alone: 25%). That costs SCOUTS times a scout's calls once per run: about 200 for 3 s jobs.
SCOUT_FIRST_POLL = 0.01
SCOUT_GROWTH = 1.25
SCOUTS = 8
# Scouts are worth their calls for a first wave of many jobs, not for a few: a run gets one
# scout per SCOUT_JOBS_EACH jobs to do (at least one, at most SCOUTS). With 48, scouts cost
# under one call per job (a scout makes about 28 calls for 5 s jobs, 36 for 30 s ones). A
# scout alone (under 96 jobs) starts at SCOUT_ALONE_FIRST_POLL: its first 10 polls, under
# 0.1 s, would find only jobs that short, and 10 jobs of 30 s then cost about 26 scout calls,
# 10 results and a few testers: within 3 calls a job plus 20.
SCOUT_JOBS_EACH = 48
SCOUT_ALONE_FIRST_POLL = 0.1
MIN_POLL_INTERVAL = 0.25
# The longest a download waits for the submits claimed before it (runner._submits_first). Only a
# backstop: they are normally on their way within milliseconds.
SUBMITS_FIRST_MAX = 0.25
# The least a job is polled after its expected finish (runner.PollPlanner.next_delay). It only
# matters for jobs under a second (longer ones get 0.2% of their duration); for those, each
# millisecond of it is a millisecond a concurrency slot is held for nothing.
POLL_MARGIN_MIN = 0.002
MAX_POLL_INTERVAL = 30.0
# A job not finished this long after its submit is given up on: cancelled if the provider still
# can (then 'timed_out'), else 'overdue' and still followed. It bounds a job whose status never
# becomes final or whose polls fail forever; --job-timeout changes it. Dreamina's jobs take
# minutes, and a provider's queue on a bad night maybe an hour or two: six hours is far beyond.
DEFAULT_JOB_TIMEOUT = 6 * 3600.0
# How often a run still asks about an overdue job while it has other work (it no longer keeps the
# run alive): a late job is downloaded by the run it finishes in, at one call a minute.
OVERDUE_POLL_INTERVAL = 60.0
# How often a run reads the store for a `batchgen cancel` given while it runs (seconds): one
# indexed read of the small batches table, and the cancel is carried out within two seconds.
CANCEL_CHECK_EVERY = 1.0
# A request id handed out a moment ago may not be known yet to the server a poll reaches (nothing
# promises the provider's servers agree at once): a 404001 this soon after its submit is asked
# again, not believed. Two minutes: far beyond any replication lag, short against a job's minutes.
NOT_FOUND_GRACE = 120.0

# Backoff for retryable errors: base * 2^(retry - 1), capped, then half of it fixed and half random
# ("equal jitter": a crowd of retries spreads out, and none comes back at once).
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
# A Retry-After larger than this is treated as this: one bad header must not stall a nightly run.
RETRY_AFTER_CAP = 120.0

# How long the API may stay unreachable (connections refused, DNS failing) before a run gives up
# (exit 3, "run again to go on"). Such a submit certainly sent nothing, so its job just waits,
# its attempts untouched; ten minutes rides out a deploy or a network blip without leaving a
# nightly run waiting all night on a dead host. --outage-budget overrides it.
OUTAGE_BUDGET = 600.0
# The same refusal (error code and message) on this many submits in a row, before any submit of
# the run was accepted, is taken to be one every job will meet (a field the service now requires,
# an image host it cannot reach): the run stops instead of spending every job's attempts on it.
# Three: two could be two bad rows side by side.
SAME_REFUSALS_TO_STOP = 3

# HTTP timeouts (seconds). A submit that times out is an unknown outcome, so keep connect short
# (a connect failure is safe to retry) and the total generous.
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 60.0
# Downloads: no total limit (videos can be large), but a stall of this long fails the attempt.
DOWNLOAD_READ_TIMEOUT = 60.0
DOWNLOAD_CHUNK = 1 << 16
# The largest output batchgen accepts (max_output_size in batchgen.toml): a 10 s 2K video is tens
# of MB, so 2 GiB leaves room for any real output while a server that declares or streams more
# (or a gzip bomb) cannot fill the disk.
MAX_OUTPUT_BYTES = 2 << 30
# A download receiving less than MIN_DOWNLOAD_RATE bytes/s over DOWNLOAD_RATE_WINDOW seconds is
# abandoned (its .part kept) and tried again later: a host trickling bytes would otherwise hold a
# download slot for hours. 10 KB/s is far below any real CDN; 60 s rides out a pause.
MIN_DOWNLOAD_RATE = 10_000
DOWNLOAD_RATE_WINDOW = 60.0
# Redirects followed for one output, each hop checked against the allowed hosts: CDNs use one or
# two; more is a loop.
MAX_OUTPUT_REDIRECTS = 5
# Output hosts besides the API's own and those in output_hosts: RunComfy's storage hosts, the
# only ones RunComfy's own CLI downloads from.
OUTPUT_HOSTS = ("*.runcomfy.net", "*.runcomfy.com")
# The largest API answer read: real ones are a few hundred bytes; a larger one is refused, not
# read whole into memory.
MAX_API_ANSWER = 4 << 20
# Outputs up to this size are received in memory and written in one go on the event loop's
# thread (about a millisecond at most); larger ones stream to their .part file.
DOWNLOAD_IN_MEMORY = 1 << 20
# Such small files are recorded before they are flushed, then flushed together every so many
# seconds (durability.py): a restart of the machine can cost at most this long's files (and a
# run's last ones, which the kernel writes back within about 30 s) a second download. More often
# would only add journal commits, each of which stalls the creation of the next files.
FLUSH_EVERY = 5.0

# Jobs inserted per transaction when a manifest is recorded.
INSERT_CHUNK = 2000

# Jobs one manifest may expand to (jobs x CSV rows x matrix combinations x repeat), counted before
# anything is expanded. A million jobs is far beyond a night's work (and over $100,000 at a
# Dreamina price), yet small enough to record in a few seconds; a typo such as `repeat: 1000000`
# or a matrix of five 100-value lists is refused in milliseconds instead of filling memory for
# minutes. `--max-expand N` raises it for a manifest that really means more.
DEFAULT_MAX_EXPAND = 1_000_000
# YAML aliases may make a manifest's values at most this many times as many nodes as the file
# writes (and at least ALIAS_FREE_NODES in all): `<<: *defaults` in every job multiplies by a few,
# a "billion laughs" by millions. Counted on the parsed nodes, before any value is built or walked.
ALIAS_EXPANSION_RATIO = 10
ALIAS_FREE_NODES = 100_000

# Reading the API's answers (client.py). Anything beyond these is not believed: it is ignored, or
# makes that one call fail, never the run.
# RunComfy's request ids are UUIDs (36 characters); one longer than this is not a request id.
MAX_REQUEST_ID = 256
# Signed CDN links run to a kilobyte or two; a "URL" beyond this is not one.
MAX_OUTPUT_URL = 16384
# Messages and status words from answers are cut to this many characters (logs, store, status).
MAX_ANSWER_TEXT = 2000
# The most one job can plausibly cost (Dreamina: cents): a larger reported cost is ignored, as is
# 1e400, rather than stopping a --max-cost run on garbage.
MAX_JOB_COST_USD = 10_000.0

# Local input files go inline as base64 data: URIs (inline.py). RunComfy's own client refuses a
# request body over 64 MiB (its MAX_REQUEST_BYTES); validation refuses such a job before spending,
# and the simulator answers 413 past it, as a server with that limit would.
MAX_REQUEST_BYTES = 64 << 20
# A file is read and base64-encoded this much at a time while its request streams out: a multiple
# of 3 (no padding inside the base64), and about 1 MiB of base64 per chunk, so 50 submits in
# flight hold ~100 MiB of chunks at most, not 50 whole files.
INLINE_CHUNK = 3 << 18

# Reports and galleries read a batch this many jobs at a time (two queries per chunk): a chunk of
# report rows is a few megabytes, and 100,000 jobs are 50 round trips to SQLite, not 100,000.
REPORT_CHUNK = 2000
# Gallery thumbnails of input images (thumbs.py): the longest side in pixels (the card shows them
# at most ~300 px wide) and the JPEG quality; a few kilobytes each.
THUMB_SIDE = 320
THUMB_QUALITY = 80

# What a run shows. A notice that repeats (a 429 lowering the cap again and again) is said once,
# then counted for this long and recapped in one line: half a minute is long enough that a
# throttling burst fills one line instead of a screen, short enough that the recap still reads
# as news. The live panel is redrawn twice a second: smooth enough for counts that change once
# per job, cheap enough that a 100,000-job batch's count query stays under 1% of a core.
NOTICE_REPEAT_WINDOW = 30.0
PANEL_REFRESH_EVERY = 0.5

# Fixing input images (fiximages.py, `validate --fix`, `run --fix-images`). Copies go to
# FIXED_DIR (above), named by their source's sha256 and the fix, so a second run finds the copy
# the first made. An image is decoded to be fixed only if its header says it has at most
# this many pixels: a 64 Mpx RGBA picture is 256 MiB in memory, and a few-kilobyte PNG can claim
# 100,000 x 100,000 (a decompression bomb); Pillow's own refusal starts at ~179 Mpx.
MAX_FIX_PIXELS = 64 * 1024 * 1024
# The largest source file read to be fixed: it is read whole into memory (and decoded beside it).
# 200 MB is beyond any photo or scan a model takes (a 64 Mpx 16-bit TIFF is ~400 MB raw, but
# such files are compressed or exceed MAX_FIX_PIXELS anyway), yet keeps a mistaken path (a disk
# image, a video named .png) from taking the machine's memory.
MAX_FIX_SOURCE_BYTES = 200_000_000
# A fixed JPEG's quality: visually lossless for a model's input; an over-the-byte-limit image is
# scaled down rather than compressed harder (artefacts become the model's input).
FIX_JPEG_QUALITY = 92
