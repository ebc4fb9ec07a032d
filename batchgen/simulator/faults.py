"""Faults the simulator can inject, as rates or as a script of outcomes for the first calls.

``FAULTS`` below is the one list of them (``batchgen simulate --fault SPEC``, repeatable): what
``FaultConfig.parse`` accepts, and what ``batchgen simulate --help`` and its error messages list.

Outcome names in scripts (``OUTCOMES``): ``ok``, ``429``, ``5xx``, ``error200``, ``slow``,
``drop``, ``500_created`` and ``error200_created`` (submit), ``truncate`` (downloads), ``fail``
(submit: the job will fail), ``expire`` (download: answer 403), ``404`` (RunComfy's 404001
"request not found", as a request id just handed out may get), ``badjson`` (HTTP 200 with a body
that is not JSON), ``malformed`` (catalog: the page also holds entries of the wrong shape), and
the bodies of ``output_body`` (downloads); ``slow`` applies to downloads too. The rates apply to
the job calls only: the catalog and the balance fail only when scripted.
"""

from __future__ import annotations

import json
import random
import textwrap
from dataclasses import dataclass, field

ENDPOINTS = ("submit", "status", "result", "cancel", "download", "catalog", "balance")
BODIES = ("gzip", "gzip_forced", "bomb", "huge", "endless", "trickle")
OUTCOMES = ("ok", "429", "5xx", "error200", "slow", "drop", "500_created", "error200_created",
            "truncate", "fail", "expire", "404", "badjson", "malformed", *BODIES)
# Submit outcomes that create the job and then answer anything but its request id.
CREATED_THEN_LOST = ("drop", "500_created", "error200_created")
MODEL_INFO = ("ok", "404", "noprice")

# What hostile_text puts before every error message: text that would act if printed or opened
# as it is (a formula for spreadsheets; CSI, OSC and NUL for terminals and log tools).
HOSTILE_TEXT = ('=HYPERLINK("https://evil.example/x","click") \x1b[31m\x1b[2J\x1b]8;;https://evil.example\x07'
                'link\x1b]8;;\x07\x1b]0;pwned\x07\x00 ')



@dataclass(frozen=True)
class Fault:
    """One fault a spec can name: ``name=value``; ``example`` is a spec that parses (a test
    parses each), ``what`` its one line of help."""

    name: str  # before "="; a family ends in ".FIELD" or ".ENDPOINT"
    value: str
    example: str
    what: str

    @property
    def family(self) -> str | None:
        """``"script."`` for ``script.ENDPOINT``: a prefix the name only begins with."""
        head, dot, tail = self.name.partition(".")
        return head + dot if dot and tail.isupper() else None


FAULTS: tuple[Fault, ...] = (
    Fault("429", "RATE", "429=0.1", "that share of API calls answer 429 with a RunComfy error envelope"),
    Fault("retry_after", "SECONDS|date|none", "retry_after=2",
          "429 answers carry this Retry-After (date: as an HTTP date; none: no header)"),
    Fault("5xx", "RATE", "5xx=0.05",
          "that share of API calls answer a bare 502 (no envelope: for a submit, no job is created)"),
    Fault("error200", "RATE", "error200=0.05",
          "that share of API calls answer HTTP 200 with an error envelope (error_code 500001)"),
    Fault("slow", "RATE", "slow=0.1", "that share of API calls wait slow_seconds before answering"),
    Fault("slow_seconds", "SECONDS", "slow_seconds=5", "how long a slow call waits (default 2)"),
    Fault("drop", "RATE", "drop=0.05", "that share of submits create the job, then drop the connection"),
    Fault("500_created", "RATE", "500_created=0.05",
          "that share of submits create the job, then answer 500 with an error envelope (500001)"),
    Fault("error200_created", "RATE", "error200_created=0.05",
          "that share of submits create the job, then answer HTTP 200 with error_code 500001"),
    Fault("model_info", "|".join(MODEL_INFO[1:]), "model_info=404",
          "model info answers 404 (noprice: without base_price_usd): the price comes only from a result"),
    Fault("fail", "RATE", "fail=0.1", "that share of jobs end 'failed'"),
    Fault("truncate", "RATE", "truncate=0.1",
          "that share of downloads send the full Content-Length, then stop half way"),
    Fault("expire", "SECONDS", "expire=30", "output URLs stop working that long after /result handed them out"),
    Fault("hostile_text", "1", "hostile_text=1",
          "every error message starts with a spreadsheet formula, terminal escapes and a NUL"),
    Fault("stuck", "WORD", "stuck=processing", "/status and /result answer this status word for every job, forever"),
    Fault("garble.FIELD", "JSON", "garble.cost=1e400",
          "every /status and /result answer carries this raw JSON text as FIELD (Infinity, NaN, 123, ...)"),
    Fault("offhost", "RATE", "offhost=0.5", "that share of jobs' output URLs name another host (offhost_host)"),
    Fault("offhost_host", "NAME", "offhost_host=example.test",
          "the host name offhost uses (default localhost: still served, but not allowed)"),
    Fault("redirect", "same|loop|HOST", "redirect=same",
          "every download first answers 302: to the same file once, to itself forever, or to HOST"),
    Fault("output_ext", "EXT", "output_ext=sh", "output URLs end in output.EXT rather than .mp4/.png"),
    Fault("output_body", "BODY", "output_body=gzip",
          f"every output's body is one of {', '.join(BODIES)} (gzipped when asked or always, a gzip "
          "bomb, a length that lies, no end, 256 bytes every 0.1 s)"),
    Fault("max_body", "BYTES", "max_body=1000000", "submit bodies over BYTES answer 413 (default 64 MiB)"),
    Fault("script.ENDPOINT", "OUTCOME,...", "script.submit=429,ok,drop",
          f"the first calls to ENDPOINT ({', '.join(ENDPOINTS)}) get these outcomes, in order"),
)


def fault_named(name: str) -> Fault | None:
    """The entry of FAULTS that ``name`` (before "=") is, or belongs to."""
    for fault in FAULTS:
        if name == fault.name or (fault.family is not None and name.startswith(fault.family)):
            return fault
    return None


def faults_help(width: int = 98) -> str:
    """FAULTS as lines for ``batchgen simulate --help``: each spec, then what it does."""
    column = max(len(f"{f.name}={f.value}") for f in FAULTS) + 4
    rows = [(f"{f.name}={f.value}", f.what) for f in FAULTS]
    rows.append(("OUTCOME", f"in a script: {', '.join(OUTCOMES)}"))
    lines: list[str] = []
    for spec, what in rows:
        wrapped = textwrap.wrap(what, max(20, width - column))
        lines.append(f"  {spec:<{column - 2}}{wrapped[0]}")
        lines.extend(" " * column + more for more in wrapped[1:])
    return "\n".join(lines)


_RATE_KEYS = {
    "429": "rate_429", "5xx": "rate_5xx", "error200": "rate_error_200", "slow": "slow_rate",
    "drop": "drop_after_submit", "500_created": "rate_500_created",
    "error200_created": "rate_error_200_created", "fail": "fail_rate", "truncate": "truncate_rate",
    "offhost": "offhost_rate",
}


@dataclass
class FaultConfig:
    rate_429: float = 0.0
    retry_after: str | None = None  # seconds, "date", or None (no header)
    rate_5xx: float = 0.0
    rate_error_200: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 2.0
    drop_after_submit: float = 0.0
    rate_500_created: float = 0.0
    rate_error_200_created: float = 0.0
    model_info: str = "ok"  # one of MODEL_INFO
    fail_rate: float = 0.0
    truncate_rate: float = 0.0
    expire_after: float | None = None
    hostile_text: bool = False
    stuck_status: str | None = None  # the status word every /status and /result answer says
    # Field name -> raw JSON text put as that field's value in every /status and /result answer.
    garble: dict[str, str] = field(default_factory=dict)
    offhost_rate: float = 0.0
    offhost_host: str = "localhost"
    redirect: str | None = None  # "same", "loop" or a host name
    output_ext: str | None = None
    output_body: str | None = None  # one of BODIES
    max_body: int | None = None  # bytes; None: MAX_REQUEST_BYTES
    script: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, specs: list[str]) -> FaultConfig:
        cfg = cls()
        for spec in specs:
            name, sep, value = spec.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or not value:
                raise ValueError(f"fault '{spec}' must look like NAME=VALUE, e.g. 429=0.1")
            if fault_named(name) is None:
                names = ", ".join(f.name for f in FAULTS)
                raise ValueError(f"unknown fault '{name}'; one of {names} (see batchgen simulate --help)")
            if name.startswith("script."):
                endpoint = name.removeprefix("script.")
                if endpoint not in ENDPOINTS:
                    raise ValueError(f"fault '{spec}': unknown endpoint '{endpoint}'; one of {', '.join(ENDPOINTS)}")
                steps = [s.strip() for s in value.split(",") if s.strip()]
                bad = [s for s in steps if s not in OUTCOMES]
                if bad:
                    raise ValueError(f"fault '{spec}': unknown outcome {bad[0]!r}; one of {', '.join(OUTCOMES)}")
                cfg.script[endpoint] = steps
            elif name.startswith("garble."):
                try:
                    json.loads(value)  # Python's reading: Infinity, NaN, 1e400 and huge ints pass
                except ValueError:
                    raise ValueError(f"fault '{spec}': '{value}' is not JSON text") from None
                cfg.garble[name.removeprefix("garble.")] = value
            elif name == "stuck":
                cfg.stuck_status = value
            elif name == "retry_after":
                if value.lower() == "none":
                    cfg.retry_after = None
                elif value.lower() == "date":
                    cfg.retry_after = "date"
                else:
                    cfg.retry_after = f"{_number(spec, value):g}"
            elif name == "slow_seconds":
                cfg.slow_seconds = _number(spec, value)
            elif name == "expire":
                cfg.expire_after = _number(spec, value)
            elif name == "hostile_text":
                cfg.hostile_text = _number(spec, value) != 0
            elif name == "model_info":
                if value not in MODEL_INFO:
                    raise ValueError(f"fault '{spec}': one of {', '.join(MODEL_INFO)}")
                cfg.model_info = value
            elif name in ("offhost_host", "redirect", "output_ext"):
                if not value.replace(".", "").replace("-", "").isalnum():
                    raise ValueError(f"fault '{spec}': '{value}' must be a plain name")
                setattr(cfg, name, value)
            elif name == "output_body":
                if value not in BODIES:
                    raise ValueError(f"fault '{spec}': unknown body '{value}'; one of {', '.join(BODIES)}")
                cfg.output_body = value
            elif name == "max_body":
                cfg.max_body = int(_number(spec, value))
            elif name in _RATE_KEYS:
                rate = _number(spec, value)
                if not 0 <= rate <= 1:
                    raise ValueError(f"fault '{spec}': a rate must be between 0 and 1")
                setattr(cfg, _RATE_KEYS[name], rate)
            else:  # in FAULTS, but not read here: a test parses every example
                raise AssertionError(f"fault '{name}' is listed but not parsed")
        return cfg


def _number(spec: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"fault '{spec}': '{value}' is not a number") from None


class FaultPicker:
    """Decides each call's outcome: the script first, then the rates."""

    def __init__(self, config: FaultConfig, seed: int | None = None):
        self.config = config
        self.rng = random.Random(seed)
        self._script = {k: list(v) for k, v in config.script.items()}

    def pick(self, endpoint: str) -> str:
        steps = self._script.get(endpoint)
        if steps:
            return steps.pop(0)
        c = self.config
        r = self.rng.random
        if endpoint in ("catalog", "balance"):
            return "ok"
        if endpoint == "download":
            if c.truncate_rate and r() < c.truncate_rate:
                return "truncate"
            return c.output_body or "ok"
        if c.rate_429 and r() < c.rate_429:
            return "429"
        if c.rate_5xx and r() < c.rate_5xx:
            return "5xx"
        if c.rate_error_200 and r() < c.rate_error_200:
            return "error200"
        if endpoint == "submit":
            for outcome, rate in (("drop", c.drop_after_submit), ("500_created", c.rate_500_created),
                                  ("error200_created", c.rate_error_200_created)):
                if rate and r() < rate:
                    return outcome
        if c.slow_rate and r() < c.slow_rate:
            return "slow"
        return "ok"

    def job_fails(self) -> bool:
        return bool(self.config.fail_rate) and self.rng.random() < self.config.fail_rate

    def job_offhost(self) -> bool:
        return bool(self.config.offhost_rate) and self.rng.random() < self.config.offhost_rate
