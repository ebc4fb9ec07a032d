"""Job keys: a job's identity, and the canonical JSON its inputs are recorded in.

A key is the first 16 hex characters of the sha256 of ``{"inputs":...,"model":...,"repeat":...}``
in canonical JSON (sorted keys, no spaces, text as is). Keys already recorded in stores depend on
this exact text (``test_manifest`` pins it): a change here makes every recorded job new again, and
a resumed batch would pay for its jobs twice.

Apart from the manifest so that the store, which records the canonical JSON, needs nothing of it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# One encoder for all: json.dumps with options builds a new one per call, which a 100,000-job
# manifest feels.
canonical_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode


def job_key_of_json(model_json: str, inputs_json: str, repeat: int) -> str:
    """The key from JSON already made (the model id's and the inputs' canonical JSON): the
    expansion's hot path encodes the inputs once, for the key and for the record."""
    canonical = f'{{"inputs":{inputs_json},"model":{model_json},"repeat":{repeat}}}'
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def job_key(model_id: str, inputs: dict[str, Any], repeat: int = 0) -> str:
    """The key of a job of ``model_id`` with these inputs (a local file given by ``sha256:...``)."""
    return job_key_of_json(canonical_json(model_id), canonical_json(inputs), repeat)
