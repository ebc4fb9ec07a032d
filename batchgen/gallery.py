"""One batch as a page to look at in a browser: every job's input image, prompt, settings and
either its output video or its error, with search, state filters and sorting.

The page is ``<workdir>/<batch>/gallery.html`` (for a --simulate batch
``<workdir>/simulated/<batch>/gallery.html``, the page saying so on top and on each card). It
holds no cards: the jobs are in ``gallery-data.js`` beside it, written a chunk at a time as they
are read from the store (JSON text, a script that adds them to a global; a page opened from
file:// may load a sibling script but not fetch() a sibling file), and the page's own script
draws only the cards in view (a virtual grid), so 100,000 jobs open in a second and a video
loads only when its card is scrolled to. Search, filters and sorting work on the data, not the
DOM. CSS and JS are inline (batchgen/static), nothing is fetched from the network, and a
Content-Security-Policy forbids any request from script.

Media are linked, never embedded: outputs by a path relative to the page, input images as small
JPEG copies in ``thumbs/`` beside it (thumbs.py) when they are local files or data: URIs, and by
their URL otherwise. The page so keeps working when the work directory is moved, copied or
served over HTTP as a whole.
"""

from __future__ import annotations

import html
import json
import os
from importlib import resources
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

from . import constants as C
from . import store as S
from .app import open_batch
from .errors import UsageError
from .manifest import IMAGE_ALIASES
from .schema import find_schema
from .store import Job, Output
from .text import printable
from .thumbs import Thumbnails

GALLERY_FILENAME = "gallery.html"
DATA_FILENAME = "gallery-data.js"
# The global the data file adds its chunks to; the page's script reads it.
DATA_GLOBAL = "batchgenGallery"

# Inputs shown as text under the prompt, first in this order, then the rest alphabetically.
_FIRST_SETTINGS = ("seed", "frames", "duration", "resolution", "aspect_ratio", "negative_prompt")
_IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".avif"}


async def build_gallery(workdir: Path, batch: str, simulated: bool | None = None) -> Path:
    """Write the page of ``batch`` and its data beside its outputs and return the page's path.
    ``simulated``: the batch's --simulate results (True) or its results from an API (False);
    None: those from an API if it has any (app.open_batch)."""
    async with open_batch(Path(workdir), batch, simulated) as found:
        store, root, simulated, info = found.store, found.root, found.simulated, found.batch
        page = root / batch / GALLERY_FILENAME
        data = page.with_name(DATA_FILENAME)
        tmp_data = data.with_name(f".{data.name}.tmp")
        tmp_page = page.with_name(f".{page.name}.tmp")
        try:
            page.parent.mkdir(parents=True, exist_ok=True)
            # Of every job the page shows, retired ones (no longer in the manifest) included.
            counts = (await store.counts([batch], retired=None)).get(batch, {})
            schema = find_schema(info.model_id)
            image_fields = set(schema.image_fields()) if schema else set(IMAGE_ALIASES)
            thumbs = Thumbnails(page.parent)
            with tmp_data.open("w", encoding="utf-8") as fh:
                fh.write(f"window.{DATA_GLOBAL} = window.{DATA_GLOBAL} || [];\n")
                async for part in store.iter_jobs_with_outputs(batch, C.REPORT_CHUNK):
                    records = [_record(job, outs, image_fields, root, page.parent, thumbs, simulated)
                               for job, outs in part]
                    # JSON text in a string, parsed by JSON.parse: faster for the browser than
                    # the same data as a JavaScript literal. ASCII only and "<" escaped, so no
                    # line separator or "</script>" could end anything early, even inlined.
                    text = json.dumps(records, ensure_ascii=True, separators=(",", ":")).replace("<", "\\u003c")
                    fh.write(f"window.{DATA_GLOBAL}.push(JSON.parse({json.dumps(text)}));\n")
            tmp_page.write_text(_page(batch, info.model_id, counts, simulated), encoding="utf-8")
            tmp_data.replace(data)
            tmp_page.replace(page)
        except OSError as exc:
            raise UsageError(f"cannot write {page}: {exc}") from exc
        finally:
            tmp_data.unlink(missing_ok=True)
            tmp_page.unlink(missing_ok=True)
    return page


# ---- links ---------------------------------------------------------------------------------------


def _relative_url(target: Path | str, base: Path) -> str:
    """A URL for ``target`` relative to the folder ``base``, else its absolute file:// URI (on
    Windows two drives have no relative path)."""
    try:
        rel = os.path.relpath(target, base)
    except ValueError:
        return Path(target).resolve().as_uri()
    return quote(PurePosixPath(*Path(rel).parts).as_posix())


def _input_image_url(value: str, thumbs: Thumbnails) -> str | None:
    scheme = urlsplit(value).scheme.lower()
    if scheme in ("file", "data"):
        return thumbs.url(value)
    if scheme in ("http", "https"):
        return value
    return None  # anything else (javascript:, a bare name) is not linked


def _images(job: Job, image_fields: set[str]) -> list[str]:
    found: list[str] = []
    for name, value in job.inputs.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, str):
                continue
            if name in image_fields or _image_suffix(v):
                found.append(v)
    return found


def _image_suffix(value: str) -> bool:
    """Whether ``value`` (a URL or a path) names an image file by its extension: string work
    only, since every prompt of 100,000 jobs passes here."""
    path = value.split("#", 1)[0].split("?", 1)[0]
    return os.path.splitext(path)[1].lower() in _IMAGE_EXTENSIONS


# ---- the data ------------------------------------------------------------------------------------


def _t(value: Any) -> str:
    """Text for the page's script, which puts it in the page as text (textContent), never as
    markup; control characters are shown as escapes."""
    return printable(str(value), keep_newlines=True)


def _setting_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


def _settings(job: Job, image_fields: set[str]) -> list[tuple[str, str]]:
    rest = {k: v for k, v in job.inputs.items() if k != "prompt" and k not in image_fields}
    order = [k for k in _FIRST_SETTINGS if k in rest] + sorted(k for k in rest if k not in _FIRST_SETTINGS)
    pairs = [(k, _setting_value(rest[k])) for k in order]
    # Notes (_note, template variables, the matrix combination) help tell jobs apart.
    for k, v in sorted(job.meta.items()):
        if k == "matrix" and isinstance(v, dict):
            continue  # the matrix values are already among the inputs
        pairs.append((k, _setting_value(v)))
    return pairs


def _output(out: Output, root: Path, base: Path) -> list[Any]:
    """[relative URL or None (not downloaded yet), is an image, index]."""
    if out.path is None:
        return [None, False, out.idx]
    suffix = PurePosixPath(out.path).suffix.lower()
    image = out.kind == "image" or (out.kind != "video" and suffix in _IMAGE_EXTENSIONS)
    # Outputs are in the page's folder (root/batch/...): their URL is the rest of their recorded
    # path, without a relpath per output; anything else gets one.
    prefix = base.name + "/"
    if base.parent == root and out.path.startswith(prefix) and ".." not in out.path:
        return [quote(out.path[len(prefix):]), image, out.idx]
    return [_relative_url(os.path.join(root, out.path), base), image, out.idx]


# The fields of a job's record, in order (the page's script reads them by these positions).
# name: the manifest's output_name for the job (None: its files are named by its key).
RECORD_FIELDS = ("key", "seq", "state", "prompt", "settings", "error", "outputs", "inputs", "facts", "run_s",
                 "name")


def _record(job: Job, outputs: list[Output], image_fields: set[str], root: Path, base: Path,
            thumbs: Thumbnails, simulated: bool = False) -> list[Any]:
    images = [u for u in (_input_image_url(v, thumbs) for v in _images(job, image_fields)) if u]
    prompt = job.inputs.get("prompt")
    error = None
    if job.error:
        error = _t(job.error + (f" (code {job.error_code})" if job.error_code is not None else ""))
    facts = [f"attempt {job.attempts}" if job.attempts == 1 else f"{job.attempts} attempts"]
    run_s = None
    if job.started_at and job.finished_at:
        run_s = round(job.finished_at - job.started_at, 3)
        facts.append(f"ran {run_s:.1f} s")
    if job.cost:
        facts.append(f"${job.cost:.2f}" + (" (simulated)" if simulated else ""))
    if job.api and not simulated:
        facts.append(job.api)
    facts.append(job.source)
    return [_t(job.key), job.seq, _t(job.state), _t(prompt) if prompt else None,
            [[_t(k), _t(v)] for k, v in _settings(job, image_fields)], error,
            [_output(o, root, base) for o in outputs], images, _t(" · ".join(facts)), run_s,
            _t(job.output_name) if job.output_name else None]


# ---- the page ------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(printable(str(value), keep_newlines=True), quote=True)


def _ordered_counts(counts: dict[str, int]) -> list[tuple[str, int]]:
    known = [(s, counts[s]) for s in S.STATES if s in counts]
    return known + sorted((s, n) for s, n in counts.items() if s not in S.STATES)


def _page(batch: str, model_id: str, counts_by_state: dict[str, int], simulated: bool = False) -> str:
    counts = _ordered_counts(counts_by_state)
    total = sum(counts_by_state.values())
    summary = " ".join(f'<span class="badge state-{_e(s)}">{_e(s)} {n}</span>' for s, n in counts)
    # Succeeded and failed always have a button (greyed at zero), other states when present.
    filters = [("all", total)] + [(s, counts_by_state.get(s, 0)) for s in (S.SUCCEEDED, S.FAILED)] + [
        (s, n) for s, n in counts if s not in (S.SUCCEEDED, S.FAILED)]
    buttons = "".join(
        f'<button type="button" data-filter="{_e(s)}" aria-pressed="{"true" if s == "all" else "false"}"'
        f'{" disabled" if n == 0 else ""}>{_e(s)} <span class="n">{n}</span></button>' for s, n in filters)
    notice = ('<p class="simulated">Simulated: every output on this page is a placeholder made by '
              "batchgen's built-in simulator (--simulate), not a result of the API.</p>" if simulated else "")
    static = resources.files("batchgen") / "static"
    config = json.dumps({"simulated": simulated, "global": DATA_GLOBAL, "fields": RECORD_FIELDS})
    return (
        _TEMPLATE.replace("{title}", _e(f"{batch}{' (simulated)' if simulated else ''} · batchgen gallery"))
        .replace("{batch}", _e(batch)).replace("{model}", _e(model_id)).replace("{total}", str(total))
        .replace("{summary}", summary).replace("{buttons}", buttons).replace("{notice}", notice)
        .replace("{data}", DATA_FILENAME).replace("{config}", html.escape(config, quote=True))
        .replace("{css}", (static / "gallery.css").read_text(encoding="utf-8"))
        .replace("{js}", (static / "gallery.js").read_text(encoding="utf-8"))
    )


# No default-src: nothing is allowed unless listed. Styles inline; scripts inline and the data
# file beside the page ('self' when served, file: when opened from disk); media from the page's
# own place; input images may be remote.
_CSP = ("default-src 'none'; script-src 'unsafe-inline' 'self' file:; style-src 'unsafe-inline'; "
        "img-src 'self' file: http: https: data:; media-src 'self' file:")

_TEMPLATE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="__CSP__">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header>
  <h1>{batch}</h1>
  <p class="model">{model} · {total} jobs</p>
  {notice}
  <p class="summary">{summary}</p>
  <nav class="filters" aria-label="Show jobs by state">{buttons}
    <select id="sort" aria-label="Sort">
      <option value="seq">Manifest order</option><option value="state">By state</option>
      <option value="run">Longest run first</option><option value="key">By key</option>
    </select>
    <input type="search" id="search" placeholder="Search prompts…" aria-label="Search prompts">
    <span id="shown" class="shown"></span>
  </nav>
</header>
<main id="grid" data-config="{config}"></main>
<p id="none" class="empty" hidden>No job matches.</p>
<script src="{data}"></script>
<script>{js}</script>
</body>
</html>
""".replace("__CSP__", _CSP)
