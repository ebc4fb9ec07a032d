"""One batch as a single HTML page to look at: every job's input image, prompt, settings and
either its output video or its error, with client-side filters by state.

The page is one self-contained file, ``<workdir>/<batch>/gallery.html`` (for a --simulate
batch ``<workdir>/simulated/<batch>/gallery.html``, the page saying so on top and on each card): CSS and JS inline, no
fonts or scripts from anywhere, and a Content-Security-Policy that forbids any request from
script, so opening it never phones home. Media are linked, never embedded: outputs by a path
relative to the page (the page beside the batch's outputs keeps working when the work
directory is moved, copied or served over HTTP as a whole), input images by a relative path
when they are local files and by their URL otherwise.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from . import store as S
from .app import find_batch
from .errors import UsageError
from .manifest import IMAGE_ALIASES
from .schema import find_schema
from .store import Job, Output, Store
from .text import printable

GALLERY_FILENAME = "gallery.html"

# Inputs shown as text under the prompt, first in this order, then the rest alphabetically.
_FIRST_SETTINGS = ("seed", "frames", "duration", "resolution", "aspect_ratio", "negative_prompt")
_IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".avif"}


async def build_gallery(workdir: Path, batch: str, simulated: bool | None = None) -> Path:
    """Write the page of ``batch`` beside its outputs and return its path. ``simulated``: the
    batch's --simulate results (True) or its results from an API (False); None: those from an
    API if it has any (app.find_batch)."""
    workdir = Path(workdir)
    path, simulated = await find_batch(workdir, batch, simulated)
    async with await Store.open(path) as store:
        info = await store.batch(batch)
        assert info is not None  # find_batch found it
        jobs = await store.jobs([batch])
        outputs = {job.id: await store.outputs(job.id) for job in jobs}
    schema = find_schema(info.model_id)
    image_fields = set(schema.image_fields()) if schema else set(IMAGE_ALIASES)
    root = path.parent.resolve()  # outputs' recorded paths are relative to their store's folder
    page = root / batch / GALLERY_FILENAME
    cards = [_card(job, outputs[job.id], image_fields, root, page.parent, simulated) for job in jobs]
    document = _page(batch, info.model_id, jobs, cards, simulated)
    page.parent.mkdir(parents=True, exist_ok=True)
    tmp = page.with_name(f".{page.name}.tmp")
    try:
        tmp.write_text(document, encoding="utf-8")
        tmp.replace(page)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write {page}: {exc}") from exc
    return page


# ---- links ---------------------------------------------------------------------------------------


def _relative_url(target: Path, base: Path) -> str:
    """A URL for ``target`` relative to the folder ``base``, else its absolute file:// URI (on
    Windows two drives have no relative path)."""
    try:
        rel = os.path.relpath(target, base)
    except ValueError:
        return target.resolve().as_uri()
    return quote(PurePosixPath(*Path(rel).parts).as_posix())


def _input_image_url(value: str, base: Path) -> str | None:
    scheme = urlsplit(value).scheme.lower()
    if scheme == "file":
        return _relative_url(Path(unquote(urlsplit(value).path)), base)
    if scheme in ("http", "https"):
        return value
    return None  # anything else (data:, javascript:, a bare name) is not linked


def _images(job: Job, image_fields: set[str]) -> list[str]:
    found: list[str] = []
    for name, value in job.inputs.items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            if not isinstance(v, str):
                continue
            if name in image_fields or PurePosixPath(urlsplit(v).path).suffix.lower() in _IMAGE_EXTENSIONS:
                found.append(v)
    return found


# ---- HTML ----------------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(printable(str(value), keep_newlines=True), quote=True)


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


def _output_html(out: Output, root: Path, base: Path) -> str:
    if out.path is None:
        return '<div class="placeholder">output not downloaded yet</div>'
    src = _e(_relative_url(root / out.path, base))
    suffix = PurePosixPath(out.path).suffix.lower()
    if out.kind == "image" or (out.kind != "video" and suffix in _IMAGE_EXTENSIONS):
        return f'<img class="output" src="{src}" alt="output {out.idx}" loading="lazy">'
    return f'<video class="output" controls muted loop playsinline preload="metadata" src="{src}"></video>'


def _card(job: Job, outputs: list[Output], image_fields: set[str], root: Path, base: Path,
          simulated: bool = False) -> str:
    images = [u for u in (_input_image_url(v, base) for v in _images(job, image_fields)) if u]
    parts = [f'<article class="card" data-state="{_e(job.state)}" data-key="{_e(job.key)}">']
    # The media area: the output when there is one, else the input image under the outcome.
    if outputs:
        parts.append('<div class="media">' + "".join(_output_html(o, root, base) for o in outputs) + "</div>")
    elif images:
        parts.append(f'<div class="media no-output"><img src="{_e(images[0])}" alt="input image" '
                     f'loading="lazy" referrerpolicy="no-referrer"><span class="veil">{_e(job.state)}</span></div>')
    else:
        parts.append(f'<div class="media no-output"><span class="veil">{_e(job.state)}</span></div>')
    parts.append('<div class="body">')
    sim = '<span class="badge sim">simulated</span>' if simulated else ""
    parts.append(f'<div class="head"><span class="badge state-{_e(job.state)}">{_e(job.state)}</span>{sim}'
                 f'<span class="seq">#{job.seq + 1}</span><code class="key">{_e(job.key)}</code></div>')
    if images:
        thumbs = "".join(f'<a href="{_e(u)}"><img src="{_e(u)}" alt="input image" loading="lazy" '
                         f'referrerpolicy="no-referrer"></a>' for u in images)
        parts.append(f'<div class="inputs"><span class="label">input</span>{thumbs}</div>')
    prompt = job.inputs.get("prompt")
    if prompt:
        parts.append(f'<p class="prompt">{_e(prompt)}</p>')
    settings = _settings(job, image_fields)
    if settings:
        parts.append('<dl class="settings">' + "".join(
            f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in settings) + "</dl>")
    if job.error:
        code = f" (code {job.error_code})" if job.error_code is not None else ""
        parts.append(f'<p class="error">{_e(job.error + code)}</p>')
    facts = [f"attempt {job.attempts}" if job.attempts == 1 else f"{job.attempts} attempts"]
    if job.started_at and job.finished_at:
        facts.append(f"ran {job.finished_at - job.started_at:.1f} s")
    if job.cost:
        facts.append(f"${job.cost:.2f}" + (" (simulated)" if simulated else ""))
    if job.api and not simulated:
        facts.append(job.api)
    facts.append(job.source)
    parts.append(f'<p class="facts">{_e(" · ".join(facts))}</p>')
    parts.append("</div></article>")
    return "".join(parts)


def _ordered_counts(jobs: Iterable[Job]) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
    known = [(s, counts[s]) for s in S.STATES if s in counts]
    return known + sorted((s, n) for s, n in counts.items() if s not in S.STATES)


def _page(batch: str, model_id: str, jobs: list[Job], cards: list[str], simulated: bool = False) -> str:
    counts = _ordered_counts(jobs)
    per_state = dict(counts)
    summary = " ".join(f'<span class="badge state-{_e(s)}">{_e(s)} {n}</span>' for s, n in counts)
    # Succeeded and failed always have a button (greyed at zero), other states when present.
    filters = [("all", len(jobs))] + [(s, per_state.get(s, 0)) for s in (S.SUCCEEDED, S.FAILED)] + [
        (s, n) for s, n in counts if s not in (S.SUCCEEDED, S.FAILED)]
    buttons = "".join(
        f'<button type="button" data-filter="{_e(s)}" aria-pressed="{"true" if s == "all" else "false"}"'
        f'{" disabled" if n == 0 else ""}>{_e(s)} <span class="n">{n}</span></button>' for s, n in filters)
    body = "\n".join(cards) if cards else '<p class="empty">This batch has no jobs.</p>'
    notice = ('<p class="simulated">Simulated: every output on this page is a placeholder made by '
              "batchgen's built-in simulator (--simulate), not a result of the API.</p>" if simulated else "")
    return _TEMPLATE.format(
        title=_e(f"{batch}{' (simulated)' if simulated else ''} · batchgen gallery"), batch=_e(batch),
        model=_e(model_id), total=len(jobs), summary=summary, buttons=buttons, cards=body, css=_CSS,
        js=_JS, notice=notice,
    )


# No default-src: nothing is allowed unless listed. Scripts and styles only inline; media from
# the page's own place (file:// or the server it is served from); input images may be remote.
_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
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
    <input type="search" id="search" placeholder="Search prompts…" aria-label="Search prompts">
  </nav>
</header>
<main id="grid">
{cards}
</main>
<p id="none" class="empty" hidden>No job matches.</p>
<script>{js}</script>
</body>
</html>
""".replace("__CSP__", _CSP)

_CSS = """
:root { color-scheme: light dark; --bg: #f4f5f7; --card: #fff; --fg: #1d2026; --muted: #677085;
  --line: #dfe2e8; --ok: #1a7f37; --bad: #c62828; --warn: #b26a00; --info: #1f5fbf; }
@media (prefers-color-scheme: dark) { :root { --bg: #14161a; --card: #1e2127; --fg: #e6e8ec;
  --muted: #9aa3b2; --line: #2e333c; } }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  background: var(--bg); color: var(--fg); }
header { position: sticky; top: 0; z-index: 1; padding: 16px 24px 12px; background: var(--bg);
  border-bottom: 1px solid var(--line); }
h1 { margin: 0; font-size: 22px; }
.model { margin: 2px 0 8px; color: var(--muted); }
.summary { margin: 0 0 10px; display: flex; flex-wrap: wrap; gap: 6px; }
.filters { display: flex; flex-wrap: wrap; gap: 6px; align-items: center; }
.filters button { font: inherit; padding: 5px 12px; border-radius: 999px; border: 1px solid var(--line);
  background: var(--card); color: var(--fg); cursor: pointer; text-transform: capitalize; }
.filters button[aria-pressed="true"] { background: var(--fg); color: var(--bg); border-color: var(--fg); }
.filters button:disabled { opacity: .45; cursor: default; }
.filters .n { opacity: .7; }
#search { margin-left: auto; font: inherit; padding: 5px 10px; border-radius: 8px; min-width: 200px;
  border: 1px solid var(--line); background: var(--card); color: var(--fg); }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(300px, 1fr)); gap: 16px; padding: 20px 24px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 12px; overflow: hidden;
  display: flex; flex-direction: column; box-shadow: 0 1px 2px rgba(0,0,0,.06); }
.card[hidden] { display: none; }
/* overflow: hidden lets aspect-ratio win over a 4:3 video's own height: every card lines up. */
.media { position: relative; background: #000; aspect-ratio: 16 / 9; display: flex; overflow: hidden; }
.media video, .media > img { flex: 1 1 0; min-width: 0; height: 100%; object-fit: contain; display: block; }
.media.no-output { background: var(--line); align-items: center; justify-content: center; }
.media.no-output img { opacity: .35; filter: grayscale(1); object-fit: cover; }
.veil { position: absolute; font-weight: 600; text-transform: uppercase; letter-spacing: .08em; color: var(--fg);
  background: var(--card); padding: 3px 12px; border-radius: 6px; }
.card[data-state="failed"] .veil { color: var(--bad); }
.placeholder { margin: auto; color: #aaa; }
.body { padding: 10px 14px 12px; display: flex; flex-direction: column; gap: 8px; flex: 1; }
.head { display: flex; align-items: center; gap: 8px; }
.seq { color: var(--muted); }
.key { margin-left: auto; color: var(--muted); font-size: 12px; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px; font-weight: 600;
  background: var(--line); color: var(--fg); }
.state-succeeded { background: #dff3e4; color: var(--ok); }
.state-failed, .state-timed_out, .state-unknown { background: #fde2e1; color: var(--bad); }
.state-cancelled { background: #fff1d6; color: var(--warn); }
.state-in_queue, .state-in_progress, .state-downloading, .state-submitting, .state-pending {
  background: #e1ecfd; color: var(--info); }
.inputs { display: flex; align-items: center; gap: 6px; }
.inputs img { width: 56px; height: 40px; object-fit: cover; border-radius: 4px; border: 1px solid var(--line);
  display: block; }
.label { font-size: 11px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); }
.prompt { margin: 0; }
.settings { margin: 0; display: flex; flex-wrap: wrap; gap: 4px 14px; font-size: 12px; }
.settings div { display: flex; gap: 4px; }
.settings dt { color: var(--muted); }
.settings dd { margin: 0; font-variant-numeric: tabular-nums; word-break: break-all; }
.error { margin: 0; padding: 6px 8px; border-radius: 6px; background: #fde2e1; color: var(--bad); font-size: 13px; }
.facts { margin: auto 0 0; color: var(--muted); font-size: 12px; }
.empty { padding: 24px; color: var(--muted); text-align: center; }
.simulated { margin: 0 0 10px; padding: 6px 10px; border-radius: 6px; background: #fff1d6; color: var(--warn);
  font-weight: 600; }
.badge.sim { background: #fff1d6; color: var(--warn); }
"""

# Filtering is client-side so the page works from file:// with no server. Videos play while the
# pointer is over them and pause when hidden, so hundreds of cards do not all decode at once.
_JS = """
(function () {
  var cards = Array.prototype.slice.call(document.querySelectorAll('.card'));
  var buttons = Array.prototype.slice.call(document.querySelectorAll('.filters button'));
  var search = document.getElementById('search');
  var none = document.getElementById('none');
  var state = 'all';
  function apply() {
    var q = search.value.trim().toLowerCase();
    var shown = 0;
    cards.forEach(function (card) {
      var text = card.querySelector('.prompt');
      var ok = (state === 'all' || card.dataset.state === state) &&
               (!q || (text && text.textContent.toLowerCase().indexOf(q) >= 0) ||
                card.dataset.key.indexOf(q) === 0);
      card.hidden = !ok;
      if (ok) { shown++; } else {
        card.querySelectorAll('video').forEach(function (v) { v.pause(); });
      }
    });
    none.hidden = shown > 0 || cards.length === 0;
  }
  buttons.forEach(function (b) {
    b.addEventListener('click', function () {
      state = b.dataset.filter;
      buttons.forEach(function (o) { o.setAttribute('aria-pressed', String(o === b)); });
      apply();
    });
  });
  search.addEventListener('input', apply);
  document.querySelectorAll('video').forEach(function (v) {
    v.addEventListener('mouseenter', function () { var p = v.play(); if (p) { p.catch(function () {}); } });
    v.addEventListener('mouseleave', function () { v.pause(); });
  });
})();
"""
