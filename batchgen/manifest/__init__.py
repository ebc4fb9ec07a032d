"""Manifests: YAML or CSV files expanded into job specs. Pure and synchronous: no network.

A YAML manifest::

    name: street-scenes            # batch name (default: the file name)
    model: bytedance/dreamina-3-0/pro/image-to-video
    image_base_url: https://cdn.example.com/inputs   # where local images are published (real API)
    defaults: {frames: 121}
    rows: scenes.csv               # one job per CSV row ...
    jobs:                          # ... and/or jobs listed here
      - {prompt: "A fox in snow", image: images/fox.jpg}
    matrix: {seed: [1, 2]}         # every job x every combination
    repeat: 1

Expansion order: schema defaults of optional fields < ``defaults`` < the job or row < matrix
values; then ``repeat`` copies. String values may be templates (``"{subject}, golden hour"``)
drawing on every variable of the job. Problems are collected with file, row/line and field, never
raised one at a time, so a user sees them all at once.

The modules, in the order a manifest meets them: ``yamlread`` (the YAML document, with lines),
``loader`` (``Manifest``: the top-level keys, the schema, the count of jobs), ``csvread`` (rows),
``values`` (typing cells and values), ``expand`` (jobs: templates, image references, keys),
``templates``, ``imagerefs``, ``problems`` (``ProblemLog``); job keys live in ``batchgen.jobkeys``.
"""

from __future__ import annotations

from pathlib import Path

from ..constants import DEFAULT_MAX_EXPAND
from ..errors import ManifestError, Problem
from ..jobkeys import canonical_json, job_key
from .imagerefs import IMAGE_ALIASES, LIST_SEPARATOR, FixedFile, is_image_name, is_loopback_host
from .loader import TOP_KEYS, Manifest, batch_name_clash, batch_name_problem
from .problems import ProblemLog
from .spec import JobSpec
from .templates import TemplateError, render, template_names

__all__ = [
    "IMAGE_ALIASES", "LIST_SEPARATOR", "TOP_KEYS", "FixedFile", "JobSpec", "Manifest", "ProblemLog",
    "TemplateError", "batch_name_clash", "batch_name_problem", "canonical_json", "is_image_name",
    "is_loopback_host", "job_key", "load_manifest", "render", "template_names",
]


def load_manifest(path: str | Path, batch: str | None = None, schema_path: str | Path | None = None,
                  max_expand: int = DEFAULT_MAX_EXPAND) -> Manifest:
    """Load a manifest (YAML or CSV by extension). What is wrong with it is in ``problems``, filled
    further by ``iter_jobs()``; validate.py reports them all together."""
    path = Path(path)
    if not path.exists():
        raise ManifestError([Problem(str(path), "", "", "file not found")])
    return Manifest(path, batch=batch, schema_path=schema_path, max_expand=max_expand)
