"""RunComfy's model catalog: every model the API offers, with its input schema, so that a model
batchgen does not bundle is checked exactly like a bundled one.

The catalog comes from ``GET /models?include_schema=true`` (paged) on the API base URL, and is
cached in the work directory (``catalog.json``) with its fetch time and the API URL it came
from. It is refreshed when older than a day (or on ``batchgen models --refresh``); when it
cannot be refreshed the cache is used as it is, and without a cache only the bundled schemas are.

Answers are untrusted: pages are capped in size (client.py), and an entry that is not a mapping
with a model id, or whose fields have the wrong types, is skipped, never a crash. An entry's
schema is only turned into a ``ModelSchema`` when that model is looked up, so one broken schema
in a catalog of hundreds costs nothing until someone uses that model, and then it is a problem
in the manifest's report.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import constants as C
from .client import RunComfyClient
from .errors import BatchgenError, InvalidRequestError, NotFoundError
from .schema import ModelSchema, SchemaError, bundled_schemas

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# A model id longer than this is not one (RunComfy's are under a hundred characters).
_MAX_ID = 300


@dataclass(frozen=True)
class Entry:
    """One model of the catalog, its fields checked for type."""

    model_id: str
    display_name: str = ""
    categories: tuple[str, ...] = ()
    base_price_usd: float | None = None
    price_unit: str | None = None
    pricing_note: str = ""
    input_schema: dict[str, Any] | None = None  # as the catalog gave it; None: not given

    def schema(self) -> ModelSchema:
        """The entry's input schema as a ModelSchema; SchemaError if it has none or it is unusable."""
        if self.input_schema is None:
            raise SchemaError(f"RunComfy's catalog gives no input schema for '{self.model_id}'")
        kind = next((k for c in self.categories for k in ("video", "image") if c.endswith("to-" + k)), None)
        data = {"model_id": self.model_id, "input": self.input_schema, "x-batchgen": {
            "base_price_usd": self.base_price_usd, "price_unit": self.price_unit, "origin": "catalog",
            "output_kind": kind}}
        try:
            return ModelSchema(data, f"catalog:{self.model_id}")
        except SchemaError:
            raise
        except (TypeError, ValueError, AttributeError, KeyError, RecursionError) as exc:
            # An input schema of a shape nobody publishes: reported on the manifest, never a crash.
            raise SchemaError(f"catalog:{self.model_id}: input schema not usable ({type(exc).__name__})") from exc

    def to_json(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "display_name": self.display_name, "categories": list(self.categories),
                "base_price_usd": self.base_price_usd, "price_unit": self.price_unit,
                "pricing_note": self.pricing_note, "input_schema": self.input_schema}

    def price_text(self) -> str:
        if self.base_price_usd is None:
            return "price unknown"
        unit = {"second": "a second", "output": "an output", None: "a job"}.get(self.price_unit, self.price_unit)
        return f"${self.base_price_usd:g} {unit}"


def parse_entry(raw: Any) -> Entry | None:
    """An entry of a catalog answer, or None when it is malformed (then it is skipped)."""
    if not isinstance(raw, dict):
        return None
    model_id = raw.get("model_id")
    if not isinstance(model_id, str):
        return None
    model_id = model_id.strip().strip("/")
    if not model_id or len(model_id) > _MAX_ID or not model_id.isprintable():
        return None
    schema = raw.get("input_schema")
    if schema is not None and not isinstance(schema, dict):
        return None
    price = raw.get("base_price_usd")
    if isinstance(price, bool) or not isinstance(price, int | float) or not math.isfinite(price) or price < 0:
        price = None
    categories = raw.get("categories")
    categories = tuple(c for c in categories if isinstance(c, str)) if isinstance(categories, list) else ()

    def text(key: str) -> str:
        value = raw.get(key)
        return value if isinstance(value, str) else ""

    return Entry(model_id, text("display_name"), categories, float(price) if price is not None else None,
                 text("price_unit") or None, text("pricing_note"), schema)


@dataclass
class Catalog:
    """The catalog as fetched from ``api_url`` at ``fetched_at`` (epoch seconds)."""

    api_url: str
    fetched_at: float
    entries: dict[str, Entry] = field(default_factory=dict)
    skipped: int = 0  # malformed entries left out

    def is_fresh(self, now: float | None = None) -> bool:
        age = (time.time() if now is None else now) - self.fetched_at
        return -300 <= age < C.CATALOG_MAX_AGE  # a time in the future (a clock set back) is not fresh

    def fetched_text(self) -> str:
        return datetime.fromtimestamp(self.fetched_at, UTC).strftime("%Y-%m-%d %H:%M UTC")

    def find(self, search: str | None = None, category: str | None = None) -> list[Entry]:
        """Entries whose id or name contains ``search`` and that are in ``category``, by id."""
        needle = (search or "").lower()
        out = [e for e in self.entries.values()
               if (not needle or needle in e.model_id.lower() or needle in e.display_name.lower())
               and (not category or category in e.categories)]
        return sorted(out, key=lambda e: e.model_id)

    def categories(self) -> list[str]:
        return sorted({c for e in self.entries.values() for c in e.categories})


def _catalog_from(entries: list[Any], api_url: str, fetched_at: float) -> Catalog:
    catalog = Catalog(api_url, fetched_at)
    for raw in entries:
        entry = parse_entry(raw)
        if entry is None:
            catalog.skipped += 1
        elif entry.model_id not in catalog.entries:  # a repeat (pages shifting while read): first wins
            catalog.entries[entry.model_id] = entry
    if catalog.skipped:
        log.warning("RunComfy's catalog: %d malformed entr%s skipped", catalog.skipped,
                    "y" if catalog.skipped == 1 else "ies")
    return catalog


# ---- the cache ---------------------------------------------------------------------------------


def cache_path(workdir: Path) -> Path:
    return Path(workdir) / C.CATALOG_FILENAME


def load_cache(workdir: Path, api_url: str) -> Catalog | None:
    """The cached catalog of ``api_url``, or None (no cache, another API's, or unreadable)."""
    path = cache_path(workdir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("ignoring the catalog cache %s: %s", path, exc)
        return None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("api_url") != api_url:
        return None
    fetched = data.get("fetched_at")
    models = data.get("models")
    if isinstance(fetched, bool) or not isinstance(fetched, int | float) or not isinstance(models, list):
        return None
    return _catalog_from(models, api_url, float(fetched))


def save_cache(workdir: Path, catalog: Catalog) -> None:
    """Write the cache whole or not at all (a temporary file renamed into place)."""
    path = cache_path(workdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"version": CACHE_VERSION, "api_url": catalog.api_url, "fetched_at": catalog.fetched_at,
            "models": [e.to_json() for e in catalog.entries.values()]}
    fd, tmp = tempfile.mkstemp(prefix=".catalog-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---- the API -----------------------------------------------------------------------------------


async def fetch(client: RunComfyClient) -> Catalog:
    """The whole catalog, page by page (at most CATALOG_MAX_PAGES pages)."""
    found: list[Any] = []
    offset = 0
    for _ in range(C.CATALOG_MAX_PAGES):
        page = await client.list_models(offset, C.CATALOG_PAGE_SIZE)
        found += page.models
        offset += len(page.models)
        if not page.models or len(page.models) < C.CATALOG_PAGE_SIZE or (
                page.total is not None and offset >= page.total):
            break
    else:
        log.warning("RunComfy's catalog: stopped after %d pages (%d entries)", C.CATALOG_MAX_PAGES, len(found))
    return _catalog_from(found, client.base_url, time.time())


async def current(client: RunComfyClient | None, workdir: Path | None, api_url: str,
                  refresh: bool = False) -> tuple[Catalog | None, str]:
    """The catalog to use, and a note when it is not a fresh one (said to the user).

    A fresh cache is used as it is; otherwise the catalog is fetched (needs ``client``) and
    cached. When it cannot be fetched, a stale cache still serves. ``workdir`` None: no cache
    (the in-process simulator's catalog is not worth keeping, and must not replace the real one).
    """
    cached = load_cache(workdir, api_url) if workdir is not None else None
    if cached is not None and cached.is_fresh() and not refresh:
        return cached, ""
    if client is None:
        if cached is not None:
            return cached, f"catalog cache from {cached.fetched_text()} (not refreshed: no API token)"
        return None, "RunComfy's catalog was not consulted: no API token (set RUNCOMFY_API_TOKEN)"
    try:
        catalog = await fetch(client)
    except BatchgenError as exc:
        if cached is not None:
            return cached, f"catalog cache from {cached.fetched_text()} (could not refresh: {exc})"
        return None, f"RunComfy's catalog could not be fetched: {exc}"
    if workdir is not None:
        try:
            save_cache(workdir, catalog)
        except OSError as exc:
            log.warning("could not cache the catalog in %s: %s", workdir, exc)
    return catalog, ""


async def model_entry(client: RunComfyClient, model_id: str) -> Entry | None:
    """The model's own entry (``GET /models/{id}?include_schema=true``), for a model newer than
    the cached catalog; None when the API does not know it."""
    try:
        body = await client.model_entry(model_id)
    except (NotFoundError, InvalidRequestError):
        return None
    entry = parse_entry({"model_id": model_id, **body})
    return entry if entry is not None and entry.model_id == model_id.strip("/") else None


# ---- unknown models ----------------------------------------------------------------------------


def suggestions(model_id: str, catalog: Catalog | None, n: int = 3) -> list[str]:
    """Model ids close to ``model_id``, from the bundled schemas and the catalog."""
    import difflib  # only when a model id needs correcting

    ids = {s.model_id for s in bundled_schemas()} | (set(catalog.entries) if catalog else set())
    matcher = difflib.SequenceMatcher(b=model_id.lower())
    scored = []
    for candidate in sorted(ids):
        matcher.set_seq1(candidate.lower())
        scored.append((matcher.ratio(), candidate))
    scored.sort(key=lambda item: -item[0])
    # Ids share long tails ("/image-to-video"), so many are somewhat alike: offer only those about
    # as close as the closest, not every model of the same kind.
    best = scored[0][0] if scored else 0.0
    return [c for score, c in scored[:n] if score >= max(0.6, best - 0.1)]


def unknown_model_note(model_id: str, catalog: Catalog | None, note: str) -> str:
    """What follows "unknown model 'X'" in a manifest's problems: where batchgen looked, the
    closest ids, and the ways out."""
    if catalog is not None:
        where = f"not bundled with batchgen and not in RunComfy's catalog (fetched {catalog.fetched_text()})"
    else:
        where = f"not bundled with batchgen; {note or 'RunComfy catalog not consulted'}"
    close = suggestions(model_id, catalog)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return (f": {where}{hint} (`batchgen models --search WORD` lists models; --schema FILE checks against a "
            "schema file; --no-schema runs it unchecked)")
