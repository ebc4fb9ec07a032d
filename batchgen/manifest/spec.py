"""What a manifest expands into (``JobSpec``), and the layers a job's values come from."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class JobSpec:
    """One job as expanded from a manifest, before it is recorded."""

    batch: str
    model_id: str
    key: str  # 16 hex chars: model + canonical inputs + repeat index (jobkeys.py)
    seq: int  # position in the expanded manifest (duplicates skipped)
    source: str  # "quickstart.yaml, line 14" or "rows.csv, row 7"
    inputs: dict[str, Any]
    meta: dict[str, Any]
    local_files: dict[str, str] = field(default_factory=dict)  # input URL -> file on disk
    inputs_json: str | None = None  # the inputs in canonical JSON, as recorded (None: not made yet)
    # Its output_name filled and made safe (outputnames.safe_stem), not yet unique in its batch;
    # None: its files are named by its key. Not part of the key.
    output_name: str | None = None


@dataclass
class Level:
    """One layer of a job's values (defaults, a job or row, matrix values) and where it came from."""

    values: dict[str, Any]
    file: str  # display name of the file it came from
    location: str  # "line 12" / "row 3"
    folder: Path  # relative image paths in it are relative to this
    lines: dict[str, int] = field(default_factory=dict)  # key -> its line, for defaults and matrix
    csv: bool = False

    def where(self, key: str) -> str:
        """Where ``key`` of this layer was written: its own line if known, else the layer's."""
        return f"line {self.lines[key]}" if key in self.lines else self.location
