"""Settings a cron line should not have to repeat: ``batchgen.toml`` in the work directory, or a
file given with ``--config``. Command-line options win over the file; the file wins over the
built-in defaults. The API token is never read from here: it stays in the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import UsageError

CONFIG_FILENAME = "batchgen.toml"

# Option name -> the type the file must give.
SETTINGS: dict[str, type | tuple[type, ...]] = {
    "api_url": str,
    "balance_url": str,
    "concurrency": int,
    "downloads": int,
    "rate": (int, float),
    "max_jobs": int,
    "max_cost": (int, float),
    "max_runtime": str,
    "job_timeout": str,
    "log_file": str,
    "log_format": str,
}


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
            raise UsageError(f"{path}: unknown setting '{key}'; allowed: {', '.join(SETTINGS)}")
        want = SETTINGS[key]
        if isinstance(value, bool) or not isinstance(value, want):
            names = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            raise UsageError(f"{path}: setting '{key}' must be {names}, got {value!r}")
    return settings, Path(path)
