"""Validation before spending: expand a manifest, probe each distinct image once, check every job
against its model's schema, and report every problem at once with file, row/line and field."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from .errors import Problem
from .images import ImageInfo, ImageProber
from .manifest import JobSpec, Manifest
from .schema import ModelSchema


@dataclass
class ValidationResult:
    jobs: int
    problems: list[Problem]
    duplicates: int
    schema: ModelSchema | None


def _image_refs(schema: ModelSchema | None, inputs: dict) -> list[tuple[str, str]]:
    """(field, reference) of every image in a job's inputs."""
    fields = schema.image_fields() if schema else {}
    refs: list[tuple[str, str]] = []
    for name in fields:
        value = inputs.get(name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                refs.append((name, v))
    return refs


async def validate_manifest(
    manifest: Manifest, *, allow_local_files: bool, prober: ImageProber | None = None,
    collect: Callable[[JobSpec], None] | None = None,
) -> ValidationResult:
    """Check a manifest. ``allow_local_files``: local images may be sent as files (a --simulate
    run publishes them itself); against the real API they need the manifest's image_base_url.
    ``collect`` sees every job as it is expanded, so a caller can record them afterwards without
    expanding the manifest twice."""
    own_prober = prober is None
    prober = prober or ImageProber()
    problems: list[Problem] = []
    seen_problems: set[Problem] = set()
    schema = manifest.schema
    jobs = 0
    # Jobs wait here while their images are probed in the background; probes are cached, so
    # a 100,000-job manifest over a handful of images costs a handful of probes.
    batch: list[tuple] = []
    source_of: dict[str, str] = {}

    def add(p: Problem) -> None:
        if p not in seen_problems:  # matrix and repeat copies repeat their base job's problems
            seen_problems.add(p)
            problems.append(p)

    async def check_batch() -> None:
        refs = {r for _, _, rs in batch for r in rs}
        infos = dict(zip(refs, await asyncio.gather(*(prober.probe(source_of[r]) for r in refs)), strict=True))
        for spec, loc, rs in batch:
            images: dict[str, ImageInfo | str] = {r: infos[r] for r in rs}
            if schema is not None:
                for fname, msg in schema.check(spec.inputs, images):
                    add(Problem(loc[0], loc[1], fname, msg))
            else:
                for r in rs:
                    if isinstance(images[r], str):
                        add(Problem(loc[0], loc[1], "", f"{r}: {images[r]}"))
        batch.clear()

    try:
        for spec in manifest.iter_jobs():
            jobs += 1
            if collect is not None:
                collect(spec)
            file, _, location = spec.source.partition(", ")
            named = [(f, r) for f, r in _image_refs(schema, spec.inputs) if r not in manifest.bad_refs]
            refs = [r for _, r in named]
            for fname, r in named:
                if r.startswith("file://") and not allow_local_files:
                    add(Problem(file, location, fname, f"local image {spec.local_files.get(r, r)} needs "
                                "image_base_url in the manifest (the https:// address where the same "
                                "files are published) to run against the real API; or use --simulate"))
                source_of.setdefault(r, spec.local_files.get(r, r))
            batch.append((spec, (file, location), refs))
            if len(batch) >= 500:
                await check_batch()
        await check_batch()
    finally:
        if own_prober:
            await prober.close()
    structural = [p for p in manifest.problems if p not in seen_problems]
    return ValidationResult(jobs, structural + problems, manifest.duplicates, schema)
