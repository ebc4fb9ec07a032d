"""Settings a cron line should not have to repeat: ``batchgen.toml`` in the work directory, or a
file given with ``--config``. Command-line options win over the file; the file wins over the
built-in defaults. The API token is never read from here: it stays in the environment."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .constants import CONFIG_FILENAME
from .errors import UsageError

__all__ = ["CONFIG_FILENAME", "SETTINGS", "load_config"]

# Option name -> the type the file must give.
SETTINGS: dict[str, type | tuple[type, ...]] = {
    "api_url": str,
    "balance_url": str,
    "concurrency": (int, str),  # a number, "auto" or "auto:N"
    "downloads": int,
    "rate": (int, float),
    "max_jobs": int,
    "max_cost": (int, float),
    "max_runtime": str,
    "job_timeout": str,
    "outage_budget": str,
    "log_file": str,
    "log_format": str,
    # Only in the file (downloads.py, outputhosts.py): hosts outputs may come from besides
    # RunComfy's and the API's, the size cap of one output, and the least download rate.
    "output_hosts": list,
    "max_output_size": (int, str),
    "min_download_rate": (int, float, str),
    "download_rate_window": (int, float),
    # The shared store (--store), where outputs go (--outputs), the account's cap across runners
    # (--account-concurrency): read by every command (cli._store_from_config).
    "store": str,
    "outputs": str,
    "account_concurrency": int,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def load_config(path: Path | None, workdir: Path) -> tuple[dict[str, Any], Path | None]:
    """The settings of the config file (explicit ``path``, else ``workdir/batchgen.toml`` if it
    exists) and the file they came from."""
    if path is None:
        candidate = Path(workdir) / CONFIG_FILENAME
        if not candidate.exists():
            return {}, None
        path = candidate
    import tomllib  # here, not at the top: most runs have no config file (2 ms of every start)

    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file not found: {path}") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"{path}: not a valid TOML file: {exc}") from None
    # Allow the settings either at the top level or under a [run] table.
    settings = dict(data.pop("run", {})) if isinstance(data.get("run"), dict) else {}
    settings.update(data)
    for key, value in settings.items():
        if key in ("token", "api_token", "RUNCOMFY_API_TOKEN", "RUNCOMFY_TOKEN"):
            raise UsageError(f"{path}: '{key}' does not belong in a file; set RUNCOMFY_API_TOKEN in the "
                             "environment instead")
        if key not in SETTINGS:
            raise UsageError(f"{path}: unknown setting '{key}'{_did_you_mean(key)}; allowed: "
                             f"{', '.join(SETTINGS)}")
        want = SETTINGS[key]
        if isinstance(value, bool) or not isinstance(value, want):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise UsageError(f"{path}: setting '{key}' must be {names}, got {value!r}")
    _check_download_settings(settings, path)
    return settings, Path(path)


def _did_you_mean(key: str) -> str:
    """The setting a typo most likely meant (``concurency``, ``max-cost``, ``Log_File``)."""
    import difflib

    wanted = key.strip().lower().replace("-", "_")
    if wanted in SETTINGS:
        return f" (did you mean '{wanted}'?)"
    close = difflib.get_close_matches(wanted, SETTINGS, n=1, cutoff=0.7)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_size(value: int | float | str) -> int:
    """A number of bytes, or text such as "2GiB", "500 MB", "10KB" (KB, MB, GB: powers of 1000;
    KiB, MiB, GiB: of 1024). ValueError if it is neither."""
    if isinstance(value, int | float):
        return int(value)
    m = _SIZE.fullmatch(value)
    unit = (m.group(2) or "").lower() if m else None
    if m is None or unit not in _UNITS:
        raise ValueError(f"{value!r} is not a size (e.g. 2GiB, 500MB, 10000)")
    return int(float(m.group(1)) * _UNITS[unit])


def _check_download_settings(settings: dict[str, Any], path: Path) -> None:
    """Bring the download settings to their plain form (sizes in bytes, hosts a tuple), or refuse."""
    hosts = settings.get("output_hosts")
    if hosts is not None:
        if not all(isinstance(h, str) and h.strip() and "/" not in h for h in hosts):
            raise UsageError(f"{path}: output_hosts must be a list of host names (e.g. "
                             f"[\"cdn.example.com\", \"*.example.net\"]), got {hosts!r}")
        settings["output_hosts"] = tuple(h.strip() for h in hosts)
    for key in ("max_output_size", "min_download_rate"):
        if key in settings:
            try:
                settings[key] = parse_size(settings[key])
            except ValueError as exc:
                raise UsageError(f"{path}: setting '{key}': {exc}") from None
            if settings[key] <= 0 and key == "max_output_size":
                raise UsageError(f"{path}: setting 'max_output_size' must be more than 0")
    if settings.get("download_rate_window", 1) <= 0:
        raise UsageError(f"{path}: setting 'download_rate_window' must be more than 0 seconds")
