"""A hostile or broken API, scenario by scenario: batchgen reports, skips or refuses, and never
crashes, never pays twice, never leaks the token. One section per area."""

from __future__ import annotations

import json

from aiohttp import web
from conftest import loopback, write_file
from imagefactory import make_image

from batchgen import app, catalog
from batchgen import constants as C
from batchgen.client import RunComfyClient

# --- catalog and balance ---------------------------------------------------------------------------

WAN = "sim/wan-like/image-to-video"


def catalog_manifest(folder, model: str):
    make_image(folder / "a.jpg", 640, 480)
    return write_file(folder / "m.yaml", f"model: {model}\nimage_base_url: https://cdn.example.com\n"
                                         "jobs: [{prompt: p, image: a.jpg}]\n")


async def check_catalog_model(folder, model: str, target: app.Target) -> list[str]:
    opts = app.RunOptions(workdir=folder / "work", manifest=catalog_manifest(folder, model), target=target)
    return [str(p) for p in (await app.validate(opts)).problems]


async def test_malformed_catalog_entries_are_skipped_and_a_broken_schema_is_a_problem(simulator, tmp_path):
    sim = await simulator(faults=["script.catalog=malformed"])
    target = app.Target(api_url=sim.base_url, token="t")
    found, note = await app.open_catalog(target, tmp_path / "work")
    # Not mappings, ids that are not text, a schema that is not an object: skipped, the rest kept.
    assert note == "" and found.skipped == 5
    assert {WAN, "broken/schema/image-to-video"} <= set(found.entries)
    assert catalog.load_cache(tmp_path / "work", sim.base_url).skipped == 0  # only what parsed is cached
    (problem,) = await check_catalog_model(tmp_path, "broken/schema/image-to-video", target)
    assert problem == ("m.yaml, line 1, field 'model': model 'broken/schema/image-to-video': RunComfy's catalog "
                       "schema cannot be used: catalog:broken/schema/image-to-video: input 'properties' must map "
                       "field names to schemas")
    assert await check_catalog_model(tmp_path, WAN, target) == []


async def test_an_oversized_catalog_answer_is_refused(simulator, tmp_path, monkeypatch):
    sim = await simulator()
    monkeypatch.setattr(C, "CATALOG_MAX_PAGE_BYTES", 1000)
    (problem,) = await check_catalog_model(tmp_path, WAN, app.Target(api_url=sim.base_url, token="t"))
    assert "RunComfy's catalog could not be fetched: catalog: answer of " in problem
    assert "bytes, more than the 1,000 allowed" in problem


def hostile_catalog(page, balance: bytes = b'{"balance_usd": 1}') -> web.Application:
    """A catalog served as ``page(offset, limit)`` says (a body, streamed without a length), and
    a balance answering ``balance``."""
    api = web.Application()

    async def models(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(page(int(request.query["offset"]), int(request.query["limit"])))
        await resp.write_eof()
        return resp

    async def wallet(request: web.Request) -> web.Response:
        return web.Response(body=balance, content_type="application/json")

    api.router.add_get("/v1/models", models)
    api.router.add_get("/prod/v2/balance", wallet)
    return api


async def test_a_streamed_oversized_page_and_endless_pages_are_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "CATALOG_PAGE_SIZE", 2)
    monkeypatch.setattr(C, "CATALOG_MAX_PAGES", 5)

    def endless(offset: int, limit: int) -> bytes:  # always a full page, never a total
        ids = ", ".join(f'{{"model_id": "m/{offset + i}"}}' for i in range(limit))
        return f'{{"models": [{ids}]}}'.encode()

    async with loopback(hostile_catalog(endless)) as root, RunComfyClient(root + "/v1", "t") as client:
        found = await catalog.fetch(client)
        assert len(found.entries) == 10 and client.calls["catalog"] == 5
    monkeypatch.setattr(C, "CATALOG_MAX_PAGE_BYTES", 100)
    async with loopback(hostile_catalog(lambda o, n: b" " * 1000)) as root:
        got, note = await app.open_catalog(app.Target(api_url=root + "/v1", token="t"), tmp_path)
    assert got is None and note.endswith("catalog: answer longer than the 100 bytes allowed")


async def test_a_catalog_of_the_wrong_shape_is_an_empty_catalog_not_a_crash(tmp_path):
    for body in (b'{"models": "all of them", "total": "many"}', b'{"models": [null, [], {"model_id": ""}]}'):
        async with loopback(hostile_catalog(lambda o, n, b=body: b)) as root:
            got, note = await app.open_catalog(app.Target(api_url=root + "/v1", token="t"), tmp_path / "w")
        assert note == "" and got.entries == {}
    async with loopback(hostile_catalog(lambda o, n: b"<html>maintenance</html>")) as root:
        got, note = await app.open_catalog(app.Target(api_url=root + "/v1", token="t"), tmp_path / "x")
    assert got is None and "HTTP 200 with a body that is not JSON" in note


async def test_a_balance_answer_that_is_no_number_is_a_warning(tmp_path):
    for body, error in ((b'{"currency": "USD"}', "balance: the answer has no balance_usd number"),
                        (b'{"balance_usd": NaN}', "balance: the answer has no balance_usd number"),
                        (b'{"balance_usd": true}', "balance: the answer has no balance_usd number"),
                        (b"x" * 100_000, "balance: answer of 100,000 bytes, more than the 65,536 allowed")):
        async with loopback(hostile_catalog(lambda o, n: b"", balance=body)) as root:
            async with RunComfyClient(root + "/v1", "t") as client:
                info = await app.account_balance(client, app.Target())
        assert info.balance_usd is None and info.error == error
    async with loopback(hostile_catalog(lambda o, n: b"", balance=b'{"balance_usd": "12.5"}')) as root:
        async with RunComfyClient(root + "/v1", "t") as client:
            assert (await app.account_balance(client, app.Target())).balance_usd == 12.5


async def test_the_token_is_never_sent_to_a_balance_url_on_another_host(simulator):
    sim = await simulator()
    seen: list[str] = []
    spy = web.Application()

    async def record(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"balance_usd": 1})

    spy.router.add_get("/b", record)
    async with loopback(spy) as root:
        elsewhere = root.replace("127.0.0.1", "localhost") + "/b"  # another host name than the API's
        async with RunComfyClient(sim.base_url, "t") as client:
            info = await app.account_balance(client, app.Target(balance_url=elsewhere))
    assert seen == [] and info.balance_usd is None
    assert info.error == (f"balance URL {elsewhere} is neither the API's host nor a RunComfy host over https: "
                          "the token is not sent there")


async def test_a_catalog_schema_referring_elsewhere_or_to_itself_is_a_problem_not_a_crash(tmp_path):
    fetched: list[str] = []
    spy = web.Application()

    async def record(request: web.Request) -> web.Response:
        fetched.append(request.path)
        return web.json_response({"type": "string"})

    spy.router.add_get("/s.json", record)
    async with loopback(spy) as elsewhere:
        entry = {"model_id": "odd/refs/image-to-video", "input_schema": {"type": "object", "properties": {
            "prompt": {"type": "string"}, "remote": {"$ref": f"{elsewhere}/s.json"},
            "loop": {"$ref": "#/properties/loop"}, "nowhere": {"$ref": "#/$defs/nope"}}}}
        body = f'{{"models": [{json.dumps(entry)}]}}'.encode()
        async with loopback(hostile_catalog(lambda o, n: body)) as root:
            target = app.Target(api_url=root + "/v1", token="t")
            for field, value, said in (("remote", "1", f"refers to '{elsewhere}/s.json', which it does not hold"),
                                       ("loop", "x", "refers to itself without end"),
                                       ("nowhere", "x", "refers to '/$defs/nope', which it does not hold")):
                write_file(tmp_path / "m.yaml",
                           f"model: odd/refs/image-to-video\njobs: [{{prompt: p, {field}: {value}}}]\n")
                opts = app.RunOptions(workdir=tmp_path / "work", manifest=tmp_path / "m.yaml", target=target)
                problems = [str(p) for p in (await app.validate(opts)).problems]
                assert problems == [f"m.yaml, line 2: the model's schema cannot be applied: it {said}"]
    assert fetched == []  # a reference to another document is never fetched
