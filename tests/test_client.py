"""The client against small real servers on loopback: errors with HTTP 200, lost answers,
refused connections, model ids with spaces, and the token staying with the API host."""

from __future__ import annotations

import asyncio
import socket
from contextlib import AsyncExitStack

import pytest
from aiohttp import web
from conftest import loopback

from batchgen.client import RunComfyClient, model_path, normalize_status, parse_outputs
from batchgen.errors import (
    AccountError,
    APIConnectionError,
    APIResponseLostError,
    RateLimitError,
    ServerError,
)


@pytest.fixture
async def server():
    """``url = await server(app)``: the app on a loopback port, until the test ends."""
    async with AsyncExitStack() as stack:

        async def start(app: web.Application) -> str:
            return await stack.enter_async_context(loopback(app)) + "/v1"

        yield start


def test_model_path_escapes_each_segment():
    assert model_path("bytedance/dreamina-3-0/pro/image-to-video") == "bytedance/dreamina-3-0/pro/image-to-video"
    assert model_path("minimax/Hailuo Video 01 Live") == "minimax/Hailuo%20Video%2001%20Live"


def test_status_vocabularies_fold():
    assert normalize_status("canceled") == "cancelled"
    assert normalize_status("COMPLETED") == "completed"


def test_parse_outputs_all_kinds():
    out = {"video": "v", "images": ["i1", "i2"], "videos": [], "image": None}
    assert parse_outputs(out) == [("video", "v"), ("image", "i1"), ("image", "i2")]
    assert parse_outputs(None) == []


async def test_submit_sends_token_and_escaped_path(server):
    seen = {}

    async def submit(request):
        seen["path"] = request.raw_path
        seen["auth"] = request.headers.get("Authorization")
        seen["body"] = await request.json()
        return web.json_response({"request_id": "r1", "status_url": "s", "result_url": "r",
                                  "cancel_url": "c"})

    app = web.Application()
    app.router.add_post("/v1/models/{tail:.*}", submit)
    url = await server(app)
    async with RunComfyClient(url, "tok") as client:
        sub = await client.submit("minimax/Hailuo Video 01 Live", {"prompt": "x"})
    assert sub.request_id == "r1"
    assert seen == {"path": "/v1/models/minimax/Hailuo%20Video%2001%20Live", "auth": "Bearer tok",
                    "body": {"prompt": "x"}}


async def test_submit_sends_recorded_json_text_as_it_is(server):
    # The runner sends a job's inputs as recorded (JSON text): byte for byte, as JSON.
    seen = {}

    async def submit(request):
        seen["type"] = request.headers.get("Content-Type")
        seen["raw"] = await request.read()
        seen["auth"] = request.headers.get("Authorization")
        return web.json_response({"request_id": "r1"})

    app = web.Application()
    app.router.add_post("/v1/models/{tail:.*}", submit)
    url = await server(app)
    text = '{"image_urls":["https://x/a.png"],"prompt":"caf\u00e9 ☕","seed":7}'
    async with RunComfyClient(url, "tok") as client:
        sub = await client.submit("m", text)
    assert sub.request_id == "r1"
    assert seen == {"type": "application/json", "raw": text.encode(), "auth": "Bearer tok"}


async def test_error_with_http_200_is_an_error(server):
    async def handler(request):
        return web.json_response({"error_code": 400004, "error_message": "token revoked"})

    app = web.Application()
    app.router.add_get("/v1/requests/{rid}/status", handler)
    url = await server(app)
    async with RunComfyClient(url, "secret-token") as client:
        with pytest.raises(AccountError) as info:
            await client.status("abc")
    assert "token revoked" in str(info.value)
    assert "secret-token" not in str(info.value)


async def test_429_carries_retry_after(server):
    async def handler(request):
        return web.json_response({"error_code": 429001, "error_message": "slow"}, status=429,
                                 headers={"Retry-After": "7"})

    app = web.Application()
    app.router.add_get("/v1/requests/{rid}/status", handler)
    url = await server(app)
    async with RunComfyClient(url, "t") as client:
        with pytest.raises(RateLimitError) as info:
            await client.status("abc")
    assert info.value.retry_after == 7.0


async def test_bare_5xx_on_submit_has_no_envelope(server):
    async def handler(request):
        return web.Response(status=502, text="<html>bad gateway</html>")

    app = web.Application()
    app.router.add_post("/v1/models/{tail:.*}", handler)
    url = await server(app)
    async with RunComfyClient(url, "t") as client:
        with pytest.raises(ServerError) as info:
            await client.submit("m", {})
    assert info.value.envelope is False


async def test_connection_refused_is_certainly_not_sent():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with RunComfyClient(f"http://127.0.0.1:{port}/v1", "t") as client:
        with pytest.raises(APIConnectionError):
            await client.submit("m", {})


async def test_reset_after_request_is_a_lost_answer(server):
    async def handler(request):
        await request.read()
        request.transport.close()
        await asyncio.sleep(0.1)
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/models/{tail:.*}", handler)
    url = await server(app)
    async with RunComfyClient(url, "t") as client:
        with pytest.raises(APIResponseLostError):
            await client.submit("m", {})


async def test_timeout_is_a_lost_answer(server):
    async def handler(request):
        await asyncio.sleep(2)
        return web.json_response({"request_id": "late"})

    app = web.Application()
    app.router.add_post("/v1/models/{tail:.*}", handler)
    url = await server(app)
    async with RunComfyClient(url, "t", timeout=0.3) as client:
        with pytest.raises(APIResponseLostError, match="no answer"):
            await client.submit("m", {})


async def test_200_without_request_id_is_unknown(server):
    async def handler(request):
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/models/{tail:.*}", handler)
    url = await server(app)
    async with RunComfyClient(url, "t") as client:
        with pytest.raises(APIResponseLostError):
            await client.submit("m", {})


async def test_redirects_are_not_followed_so_the_token_stays_home(server):
    leaked = []

    async def elsewhere(request):
        leaked.append(request.headers.get("Authorization"))
        return web.json_response({"request_id": "x"})

    other = web.Application()
    other.router.add_route("*", "/{tail:.*}", elsewhere)
    other_url = await server(other)

    async def redirect(request):
        raise web.HTTPTemporaryRedirect(other_url + "/steal")

    app = web.Application()
    app.router.add_get("/v1/requests/{rid}/result", redirect)
    url = await server(app)
    async with RunComfyClient(url, "secret") as client:
        with pytest.raises(ServerError, match="redirect"):
            await client.result("abc")
    assert leaked == []
