"""Every tunable default in one place, each with the reason for its value."""

from __future__ import annotations

# The model a manifest targets when it names none: the one this project was started for.
DEFAULT_MODEL = "bytedance/dreamina-3-0/pro/image-to-video"

# RunComfy's public endpoint; --api-url or RUNCOMFY_API_URL override it.
DEFAULT_API_URL = "https://model-api.runcomfy.net/v1"
TOKEN_ENV = "RUNCOMFY_API_TOKEN"
API_URL_ENV = "RUNCOMFY_API_URL"

# The default work directory, relative to where batchgen is started.
DEFAULT_WORKDIR = "jobs"
STORE_FILENAME = "batchgen.sqlite3"
LOCK_FILENAME = "batchgen.lock"

# Jobs in flight at the provider. RunComfy does not document an account limit; a handful is polite
# and the adaptive cap (retry.py) finds the real one when 429s say so.
DEFAULT_CONCURRENCY = 4
# Output downloads at once: they go to storage hosts, not the API, so they have their own limit.
DEFAULT_DOWNLOAD_CONCURRENCY = 4
# API requests per second across all calls (submit, status, result, cancel); 0 = unlimited.
DEFAULT_RATE = 10.0

# How many times one job may be submitted before it is declared failed. Only submits that certainly
# did not create a job are retried, so this bounds wasted time, not money.
MAX_SUBMIT_ATTEMPTS = 5
# Retries of one status/result/download call before the job is put aside for a later poll.
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
MIN_POLL_INTERVAL = 0.25
# The longest a download waits for the submits claimed before it (runner._submits_first). Only a
# backstop: they are normally on their way within milliseconds.
SUBMITS_FIRST_MAX = 0.25
# The least a job is polled after its expected finish (runner.PollPlanner.next_delay). It only
# matters for jobs under a second (longer ones get 0.2% of their duration); for those, each
# millisecond of it is a millisecond a concurrency slot is held for nothing.
POLL_MARGIN_MIN = 0.002
MAX_POLL_INTERVAL = 30.0

# Backoff for retryable errors: base * 2^attempt, capped, with full jitter.
BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0
# A Retry-After larger than this is treated as this: one bad header must not stall a nightly run.
RETRY_AFTER_CAP = 120.0

# HTTP timeouts (seconds). A submit that times out is an unknown outcome, so keep connect short
# (a connect failure is safe to retry) and the total generous.
CONNECT_TIMEOUT = 10.0
REQUEST_TIMEOUT = 60.0
# Downloads: no total limit (videos can be large), but a stall of this long fails the attempt.
DOWNLOAD_READ_TIMEOUT = 60.0
DOWNLOAD_CHUNK = 1 << 16
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

# Local input files go inline as base64 data: URIs (inline.py). RunComfy's own client refuses a
# request body over 64 MiB (its MAX_REQUEST_BYTES); validation refuses such a job before spending,
# and the simulator answers 413 past it, as a server with that limit would.
MAX_REQUEST_BYTES = 64 << 20
# A file is read and base64-encoded this much at a time while its request streams out: a multiple
# of 3 (no padding inside the base64), and about 1 MiB of base64 per chunk, so 50 submits in
# flight hold ~100 MiB of chunks at most, not 50 whole files.
INLINE_CHUNK = 3 << 18
