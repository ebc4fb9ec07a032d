"""What the API says about its models and the account: the catalog (paged, searchable), one
model's schema and price, the categories, the balance."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from ..schema import ModelSchema, bundled_schemas, find_schema, job_price
from .core import INVALID_INPUT, SimCore

# Models the simulator's catalog offers that batchgen does not bundle (so the path from catalog to
# validated run is tested end to end), each with its catalog facts under "catalog".
CATALOG_DIR = Path(__file__).parent / "catalog"
# What GET /prod/v2/balance reports for an unlimited wallet (no --balance).
UNLIMITED_BALANCE = 1_000_000.0
# Entries the malformed fault adds to a catalog page: not mappings, ids of the wrong type, a
# schema that is not an object, and one whose schema is an object but not a usable one.
MALFORMED_ENTRIES: list[Any] = [
    42, "text", {"display_name": "no id"}, {"model_id": 7}, {"model_id": "bad/schema", "input_schema": "nope"},
    {"model_id": "broken/schema/image-to-video", "categories": ["image-to-video"], "base_price_usd": 0.1,
     "input_schema": {"type": "object", "properties": {"prompt": 5}}},
]


@cache
def catalog_only_models() -> dict[str, tuple[ModelSchema, dict[str, Any]]]:
    """model id -> (schema, catalog facts) of the simulator's extra models."""
    out: dict[str, tuple[ModelSchema, dict[str, Any]]] = {}
    for path in sorted(CATALOG_DIR.glob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        out[data["model_id"]] = (ModelSchema(data, str(path)), data.get("catalog") or {})
    return out


class CatalogEndpoints(SimCore):
    """The catalog, model info and balance endpoints, and the schema and price of a model."""

    def _schema(self, model_id: str) -> ModelSchema | None:
        for path in self.config.extra_schemas:
            s = find_schema(model_id, path)
            if s is not None and s.model_id == model_id:
                return s
        found = find_schema(model_id)
        if found is None and model_id in catalog_only_models():
            found = catalog_only_models()[model_id][0]
        return found

    def _price(self, model_id: str, inputs: dict[str, Any]) -> float:
        """What a job costs: --price for a bundled model; an extra model's own catalog price (per
        second of its duration when priced so)."""
        extra = catalog_only_models().get(model_id)
        if extra is None:
            return self.config.price_usd
        facts = extra[1]
        price = job_price(facts.get("base_price_usd"), facts.get("price_unit"), inputs)
        return price if price is not None else self.config.price_usd

    def catalog(self) -> list[dict[str, Any]]:
        """Every model's catalog entry with its input schema, as GET /models?include_schema=true."""
        schemas = [ModelSchema.load(p) for p in self.config.extra_schemas] + bundled_schemas()
        entries: dict[str, dict[str, Any]] = {}
        for schema in schemas:
            last = schema.model_id.rsplit("/", 1)[-1]
            entries.setdefault(schema.model_id, {
                "model_id": schema.model_id, "kind": "model", "display_name": schema.model_id,
                "categories": [last] if "-to-" in last else [], "base_price_usd": self.config.price_usd,
                "price_unit": "output", "pricing_note": "simulated price", "input_schema": schema.data["input"]})
        for model_id, (schema, facts) in catalog_only_models().items():
            entries.setdefault(model_id, {"model_id": model_id, "kind": "model", **facts,
                                          "input_schema": schema.data["input"]})
        return sorted(entries.values(), key=lambda e: e["model_id"])

    @staticmethod
    def _without_schema(entry: dict[str, Any], include: bool) -> dict[str, Any]:
        return entry if include else {k: v for k, v in entry.items() if k != "input_schema"}

    async def _catalog(self, request: web.Request) -> web.StreamResponse:
        admitted = await self._admit(request, "catalog")
        if not isinstance(admitted, tuple):
            return admitted
        outcome = admitted[1]
        q = request.query
        search, category = q.get("search", "").lower(), q.get("category", "")
        found = [e for e in self.catalog()
                 if (not search or search in e["model_id"].lower() or search in e["display_name"].lower())
                 and (not category or category in e["categories"])]
        try:
            limit = min(500, max(1, int(q.get("limit", "50"))))
            offset = max(0, int(q.get("offset", "0")))
        except ValueError:
            return self._error(*INVALID_INPUT, "limit and offset must be whole numbers")
        include = q.get("include_schema") == "true"
        page: list[Any] = [self._without_schema(e, include) for e in found[offset:offset + limit]]
        if outcome == "malformed":
            page += MALFORMED_ENTRIES
        return web.json_response({"models": page, "total": len(found)})

    async def _categories(self, request: web.Request) -> web.StreamResponse:
        owner = self._auth(request)
        if isinstance(owner, web.Response):
            return owner
        names = sorted({c for e in self.catalog() for c in e["categories"]})
        return web.json_response({"categories": names})

    async def _balance(self, request: web.Request) -> web.StreamResponse:
        """RunComfy's wallet (on its main API host, served here at the same path): what is left of
        --balance after this token's jobs; an unlimited wallet says UNLIMITED_BALANCE."""
        admitted = await self._admit(request, "balance")
        if not isinstance(admitted, tuple):
            return admitted
        owner = admitted[0]
        total = self.config.balance_usd
        left = UNLIMITED_BALANCE if total is None else max(0.0, total - self._spent.get(owner, 0.0))
        return web.json_response({"balance_usd": round(left, 6), "currency": "USD"})

    async def _model_info(self, request: web.Request) -> web.StreamResponse:
        self.calls["model"] += 1
        owner = self._auth(request)
        if isinstance(owner, web.Response):
            return owner
        model_id = unquote(request.match_info["model_id"])
        shown = self.config.faults.model_info
        entry = next((e for e in self.catalog() if e["model_id"] == model_id), None)
        if entry is None or shown == "404":
            return self._error(404, 400001, f"Unknown model '{model_id}'")
        body = self._without_schema(entry, request.query.get("include_schema") == "true")
        if shown == "noprice":
            body = {k: v for k, v in body.items() if k != "base_price_usd"}
        return web.json_response(body)
