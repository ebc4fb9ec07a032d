"""Validation before spending: expand a manifest, probe each distinct image once, check every job
against its model's schema, and report every problem at once with file, row/line and field.

Defaults: the manifest applies the schema's defaults of optional fields while expanding (so the
job key covers them); validation checks the inputs exactly as they will be sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from . import constants as C
from .errors import Problem
from .images import ImageInfo, ImageProber
from .inline import FileRef, read_data_uri, request_size, shown, too_large
from .jobkeys import canonical_json
from .manifest import JobSpec, Manifest, ProblemLog, is_image_name
from .schema import ModelSchema, SchemaError, find_schema

log = logging.getLogger(__name__)

# Jobs held while their images are probed. Probes are cached, so a 100,000-job manifest over a
# handful of images costs a handful of probes; the window only bounds memory and lets probes of
# different images overlap.
WINDOW = 1000


@dataclass
class ValidationResult:
    jobs: int  # jobs in the expanded manifest, duplicates not counted
    problems: list[Problem]  # empty: the manifest may be run
    duplicates: int  # jobs skipped because an earlier one had the same key
    schema: ModelSchema | None  # None: no schema (--no-schema), inputs passed through unchecked
    fixed: list[str] = field(default_factory=list)  # --fix: each copy made, what it changed
    hint: str | None = None  # without --fix: how many images --fix would fix (FixHints), if any


def image_refs(schema: ModelSchema | None, inputs: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, reference) of every image in a job's inputs. Without a schema, fields whose names
    say image (image_url, img_url, start_image, ...)."""
    if schema is not None:
        fields: Any = schema.image_fields()
    else:
        fields = [k for k in inputs if is_image_name(k)]
    refs: list[tuple[str, str]] = []
    for name in fields:
        value = inputs.get(name)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                refs.append((name, v))
    return refs


async def validate_manifest(
    manifest: Manifest,
    *,
    schema_path: str | Path | None = None,
    session: aiohttp.ClientSession | None = None,
    prober: ImageProber | None = None,
    collect: Callable[[JobSpec], None] | None = None,
    no_schema: bool = False,
    model_problem: str | None = None,
) -> ValidationResult:
    """Check every job of ``manifest``; never raises for bad input.

    ``schema_path`` checks against that schema file instead of the one the manifest found.
    Local files are sent inline (inline.py): they are checked on disk, and each job's request
    must stay within RunComfy's 64 MiB with them. A local file published under the manifest's
    ``image_base_url`` is checked on disk and at its URL, which must serve the same image.
    ``session`` (without credentials) or ``prober`` are used for remote images; otherwise one is
    made here. ``collect`` sees every job as it is expanded, so a caller can record them
    afterwards without expanding the manifest twice. A model without a schema is a problem
    (``model_problem`` says where batchgen looked and what it may have meant), unless
    ``no_schema``: then only its images are probed.
    """
    extra: list[Problem] = []
    if schema_path is not None:
        try:
            manifest.use_schema(find_schema(manifest.model_id, schema_path))
        except SchemaError as exc:
            problems = [*manifest.problems, Problem(str(schema_path), "", "", str(exc))]
            return ValidationResult(0, problems, 0, None)
    schema = manifest.schema
    if schema is None and not no_schema and not any(p.field in ("schema", "model") for p in manifest.problems):
        extra.append(Problem(manifest.file, manifest.location_of("model"), "model", model_problem or (
            f"unknown model '{manifest.model_id}': batchgen has no schema for it (--schema FILE checks against "
            "a schema file; --no-schema runs it unchecked)")))
    # Rules the schema has but batchgen cannot apply: said once, on the schema, not on every job.
    schema_rules = set(schema.rule_problems) if schema else set()
    if schema is not None:
        schema_file = Path(schema.source).name if schema.source else manifest.file
        extra += [Problem(schema_file, "", field_name, message) for field_name, message in schema.rule_problems]

    own_prober = prober is None
    prober = prober or ImageProber(session=session)
    # Matrix and repeat copies of a job share its source, so they meet its problems again: once is enough.
    found = ProblemLog()
    add = found.add
    jobs = 0
    window: list[tuple[JobSpec, list[tuple[str, str]]]] = []
    other_media = schema.other_media_fields() if schema is not None else {}
    seen_media: dict[tuple[str, str], ImageInfo | str | None] = {}  # video and audio files, once each

    async def check_window() -> None:
        refs = list({ref for _, named in window for _, ref in named})
        disk = {ref: spec.local_files.get(ref, ref) for spec, named in window for _, ref in named}
        # A published local file: its URL is probed too, and must serve the same image.
        published = [r for r in refs if disk[r] != r and not r.startswith("file://")]
        infos = await asyncio.gather(*(prober.probe(disk[r]) for r in refs),
                                     *(prober.probe(r) for r in published))
        probed: dict[str, ImageInfo | str] = dict(zip(refs, infos, strict=False))
        for ref, remote in zip(published, infos[len(refs):], strict=True):
            probed[ref] = _same_image(disk[ref], probed[ref], remote)
        for spec, named in window:
            file, _, location = spec.source.partition(", ")
            images = {ref: probed[ref] for _, ref in named}
            if schema is not None:
                for field_name, message in schema.check(spec.inputs, images):
                    if (field_name, message) not in schema_rules:
                        add(Problem(file, location, field_name, message))
            else:
                for field_name, ref in named:
                    info = images[ref]
                    if isinstance(info, str):
                        add(Problem(file, location, field_name, f"{shown(ref)}: {info}"))
            for field_name, ref in named:
                file_ref = FileRef.parse(ref)
                if file_ref is not None and file_ref.mime is None and not isinstance(images[ref], str):
                    add(Problem(file, location, field_name,
                                f"{file_ref.path}: its content is of no type batchgen can send inline"))
        window.clear()

    try:
        for spec in manifest.iter_jobs():
            jobs += 1
            if collect is not None:
                collect(spec)
            file, _, location = spec.source.partition(", ")
            named = []
            for field_name, ref in image_refs(schema, spec.inputs):
                if ref in manifest.bad_refs:
                    continue  # the manifest said what is wrong with it
                if ref in spec.local_files or ref.startswith(("http://", "https://", "data:")):
                    named.append((field_name, ref))
            if other_media:
                assert schema is not None
                for field_name, ref, kind in other_media_refs(other_media, spec.inputs):
                    if ref in manifest.bad_refs:
                        continue
                    if (ref, kind) not in seen_media:
                        seen_media[ref, kind] = media_facts(ref, kind)
                    facts = seen_media[ref, kind]
                    messages = [facts] if isinstance(facts, str) else (
                        schema.file_rule_failures(field_name, facts) if facts else [])
                    for message in messages:
                        add(Problem(file, location, field_name, f"{shown(ref)}: {message}"))
            if spec.local_files:
                size = request_size(spec.inputs_json or canonical_json(spec.inputs), spec.local_files)
                if size > C.MAX_REQUEST_BYTES:
                    add(Problem(file, location, "", too_large(size)))
            window.append((spec, named))
            if len(window) >= WINDOW:
                await check_window()
        await check_window()
    finally:
        if own_prober:
            await prober.close()
    problems = extra + _in_order(manifest, found)
    return ValidationResult(jobs, problems, manifest.duplicates, schema)


def other_media_refs(fields: dict[str, str], inputs: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(field, reference, "video" or "audio") of every video and audio file in a job's inputs;
    ``fields``: the schema's ``other_media_fields()``."""
    refs = []
    for name, kind in fields.items():
        value = inputs.get(name)
        refs += [(name, v, kind) for v in (value if isinstance(value, list) else [value]) if isinstance(v, str)]
    return refs


def media_facts(ref: str, kind: str) -> ImageInfo | str | None:
    """A video or audio file's type (as the format) and size, or what is wrong with it; None for
    a URL (the service fetches it; nothing here reads a whole video to check it)."""
    file_ref = FileRef.parse(ref)
    if file_ref is not None:
        mime, size = file_ref.mime, file_ref.size
    elif ref.startswith("data:"):
        try:
            mime, data = read_data_uri(ref)
        except ValueError as exc:
            return str(exc)
        size = len(data)
    else:
        return None
    if mime is None:
        return f"not {_a(kind)} file batchgen recognises from its content"
    if not mime.startswith(f"{kind}/"):
        return f"its content is {mime}, not {_a(kind)} file"
    return ImageInfo(mime.partition("/")[2], 0, 0, size)


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _same_image(path: str, local: ImageInfo | str, remote: ImageInfo | str) -> ImageInfo | str:
    """What to check a published local file by: its local facts if the copy at its URL is the
    same image, else what is wrong (a wrong image_base_url serves nothing, or something else).
    Messages go after the URL ("https://...: not the same image as ...")."""
    if isinstance(local, str):
        return local
    if isinstance(remote, str):
        return f"published copy of {path}: {remote}; is image_base_url right?"
    if remote != local:
        return (f"not the same image as {path} (published: {_facts(remote)}; local: {_facts(local)}); "
                "is image_base_url right?")
    return local


def _facts(info: ImageInfo) -> str:
    return f"{info.format.upper()} {info.width}x{info.height}, {info.size:,} bytes"


_NUMBER = re.compile(r"\d+")


def _in_order(manifest: Manifest, checked: ProblemLog) -> list[Problem]:
    """Every problem by file (the manifest, then the others as they were met) and row/line, so
    one job's problems read together; problems about a whole file come first."""
    loaded = manifest.problems
    known = set(loaded)
    files: dict[str, int] = {manifest.file: 0}
    for p in (*loaded, *checked):
        files.setdefault(p.file, len(files))

    def order(p: Problem) -> tuple[int, int]:
        m = _NUMBER.search(p.location)
        return files[p.file], int(m.group()) if m else 0

    return sorted([*loaded, *(p for p in checked if p not in known)], key=order)
