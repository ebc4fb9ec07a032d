"""Faults the simulator can inject, as rates or as a script of outcomes for the first calls.

Spec strings (``batchgen simulate --fault SPEC``, repeatable):

=====================  =======================================================================
``429=0.1``            10% of API calls answer 429 with a RunComfy error envelope
``retry_after=2``      ... with ``Retry-After: 2`` (``date`` for an HTTP date, ``none`` for none)
``5xx=0.05``           5% answer a bare 502 (no envelope: for a submit, no job is created)
``error200=0.05``      5% answer HTTP 200 with an error envelope (error_code 500001)
``slow=0.1``           10% of calls wait ``slow_seconds`` (default 2) before answering
``drop=0.05``          5% of submits create the job, then drop the connection without answering
``fail=0.1``           10% of jobs end ``failed``
``truncate=0.1``       10% of downloads send the full Content-Length, then stop half way
``expire=30``          output URLs stop working 30 s after /result handed them out
``max_body=1000000``   submit bodies over 1,000,000 bytes answer 413 (a service whose limit is
                       below the 64 MiB that RunComfy's own client allows)
``script.submit=429,ok,drop``  the first submits answer 429, then normally, then drop; likewise
                       ``script.status``, ``script.result``, ``script.cancel``, ``script.download``
=====================  =======================================================================

Outcome names in scripts: ``ok``, ``429``, ``5xx``, ``error200``, ``slow``, ``drop``, ``truncate``
(downloads), ``fail`` (submit: the job will fail), ``expire`` (download: answer 403); ``slow``
applies to downloads too.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

ENDPOINTS = ("submit", "status", "result", "cancel", "download")
OUTCOMES = ("ok", "429", "5xx", "error200", "slow", "drop", "truncate", "fail", "expire")

_RATE_KEYS = {
    "429": "rate_429", "5xx": "rate_5xx", "error200": "rate_error_200", "slow": "slow_rate",
    "drop": "drop_after_submit", "fail": "fail_rate", "truncate": "truncate_rate",
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
    fail_rate: float = 0.0
    truncate_rate: float = 0.0
    expire_after: float | None = None
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
            if name.startswith("script."):
                endpoint = name.removeprefix("script.")
                if endpoint not in ENDPOINTS:
                    raise ValueError(f"fault '{spec}': unknown endpoint '{endpoint}'; one of {', '.join(ENDPOINTS)}")
                steps = [s.strip() for s in value.split(",") if s.strip()]
                bad = [s for s in steps if s not in OUTCOMES]
                if bad:
                    raise ValueError(f"fault '{spec}': unknown outcome {bad[0]!r}; one of {', '.join(OUTCOMES)}")
                cfg.script[endpoint] = steps
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
            elif name == "max_body":
                cfg.max_body = int(_number(spec, value))
            elif name in _RATE_KEYS:
                rate = _number(spec, value)
                if not 0 <= rate <= 1:
                    raise ValueError(f"fault '{spec}': a rate must be between 0 and 1")
                setattr(cfg, _RATE_KEYS[name], rate)
            else:
                allowed = ", ".join([*_RATE_KEYS, "retry_after", "slow_seconds", "expire", "max_body",
                                     "script.ENDPOINT"])
                raise ValueError(f"unknown fault '{name}'; allowed: {allowed}")
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
        if endpoint == "download":
            return "truncate" if c.truncate_rate and r() < c.truncate_rate else "ok"
        if c.rate_429 and r() < c.rate_429:
            return "429"
        if c.rate_5xx and r() < c.rate_5xx:
            return "5xx"
        if c.rate_error_200 and r() < c.rate_error_200:
            return "error200"
        if endpoint == "submit" and c.drop_after_submit and r() < c.drop_after_submit:
            return "drop"
        if c.slow_rate and r() < c.slow_rate:
            return "slow"
        return "ok"

    def job_fails(self) -> bool:
        return bool(self.config.fail_rate) and self.rng.random() < self.config.fail_rate
