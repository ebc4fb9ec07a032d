"""Hostile or broken API scenarios, against the simulator's fault knobs or a real loopback server
serving the hostile answers. One section per area."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from aiohttp import web
from conftest import loopback
from test_runner import check_outputs_match, manifest, options, outputs_by_job

from batchgen import app
from batchgen import store as S
from batchgen.client import RunComfyClient
from batchgen.downloads import DownloadLimits, download, make_session
from batchgen.errors import APIResponseLostError, DownloadError
from batchgen.outputhosts import OutputHosts

# --- downloads ---------------------------------------------------------------------------------
# Issue 14, "Downloads are contained": outputs only from allowed hosts (each redirect hop and the
# address actually connected to checked), a size cap and a least rate, bodies asked for unencoded,
# API answers read only up to a few MB, .part files never written through a symlink, extensions
# from a list of media types.

SMALL_CAP = DownloadLimits(max_bytes=1 << 20)


async def _run(tmp_path, sim, n=4, **kw):
    """Run ``n`` jobs against ``sim``; the outcome, each job with its outputs by key, the events."""
    events = []
    opts = options(tmp_path, sim, manifest(tmp_path, sim, n), **kw)
    out = await app.run(opts, on_event=events.append)
    return out, await outputs_by_job(tmp_path / "work"), events


def _offhost_by_job(sim) -> dict[str, bool]:
    return {rid: job.offhost for rid, job in sim.jobs.items()}


async def test_an_output_on_a_host_not_allowed_fails_its_job_alone(simulator, tmp_path):
    sim = await simulator(duration=0.05, faults=["offhost=0.5"], seed=3)
    out, jobs, _ = await _run(tmp_path, sim, n=8)
    offhost = _offhost_by_job(sim)
    assert 0 < sum(offhost.values()) < len(offhost)  # the seed gives both kinds
    for job, _outs in jobs.values():
        if offhost[job.request_id]:
            assert job.state == S.FAILED
            assert "'localhost'" in job.error and "output_hosts in batchgen.toml" in job.error
        else:
            assert job.state == S.SUCCEEDED, job.error
    # Refused before connecting: the simulator (which answers to 'localhost' too) served only the
    # allowed ones, once each.
    assert sim.calls["download"] == len(offhost) - sum(offhost.values())
    await check_outputs_match(sim, tmp_path / "work")


async def test_a_host_added_to_output_hosts_is_downloaded_from(simulator, tmp_path):
    sim = await simulator(duration=0.05, faults=["offhost=1"])
    out, _, _ = await _run(tmp_path, sim, n=3, output_hosts=("localhost",))
    assert out.counts == {"b": {"succeeded": 3}}
    await check_outputs_match(sim, tmp_path / "work")


def test_output_hosts_from_batchgen_toml(samples):
    from test_cli import cli

    work = samples.parent / "jobs"
    refused = cli("run", str(samples / "plain.csv"), "--simulate", "--sim-fault", "offhost=1")
    assert refused.exit_code == 1 and "output_hosts in batchgen.toml" in refused.output
    (work / "batchgen.toml").write_text('output_hosts = ["localhost"]\n')
    allowed = cli("retry", "plain", "--simulate", "--sim-fault", "offhost=1")
    assert allowed.exit_code == 0, allowed.output


async def test_redirects_are_followed_only_to_allowed_hosts_and_only_a_few_times(simulator, tmp_path):
    same = await simulator(duration=0.05, faults=["redirect=same"])
    out, _, _ = await _run(tmp_path / "same", same, n=2)
    assert out.counts == {"b": {"succeeded": 2}}
    assert same.calls["download"] == 4  # each output: the redirect, then the file
    assert same.output_auth_seen == 0  # the token never goes to an output host, nor on a redirect

    away = await simulator(duration=0.05, faults=["redirect=localhost"])
    out, jobs, _ = await _run(tmp_path / "away", away, n=2)
    assert out.counts == {"b": {"failed": 2}}
    assert all("'localhost' is not allowed" in job.error for job, _ in jobs.values())
    assert away.calls["download"] == 2  # the redirect was not followed

    loop = await simulator(duration=0.05, faults=["redirect=loop"])
    out, jobs, _ = await _run(tmp_path / "loop", loop, n=1)
    assert out.counts == {"b": {"failed": 1}}
    assert all("redirects more than" in job.error for job, _ in jobs.values())


@pytest.fixture
async def plain_host():
    """A loopback file host; ``hits`` counts the requests that reached it."""
    state = {"hits": 0}

    async def handler(request):
        state["hits"] += 1
        return web.Response(body=b"x" * 1000)

    app_ = web.Application()
    app_.router.add_get("/{name}", handler)
    async with loopback(app_) as root:
        state["port"] = int(root.rpartition(":")[2])
        yield state


class _Answers:
    """What DNS would answer: nothing on this machine can make a name resolve to chosen addresses
    (the one thing here that is not real)."""

    def __init__(self, *addresses: str):
        self.addresses = addresses

    async def resolve(self, host, port=0, family=socket.AF_INET):
        return [{"hostname": host, "host": a, "port": port, "family": family, "proto": 0, "flags": 0}
                for a in self.addresses]

    async def close(self):
        pass


async def test_private_addresses_are_refused_unless_the_api_is_on_one(plain_host, tmp_path):
    port = plain_host["port"]
    # An API on a public address (never contacted): names that lead to loopback are refused, by
    # name (resolved at connect time) or as a literal address, even when the user allowed them.
    public_api = OutputHosts("http://1.1.1.1/v1", ["localhost", "127.0.0.1"])
    async with make_session(hosts=public_api) as session:
        with pytest.raises(DownloadError, match="'localhost' resolves to 127.0.0.1") as info:
            await download(session, f"http://localhost:{port}/a.png", tmp_path / "a.png", hosts=public_api)
        assert info.value.permanent
        with pytest.raises(DownloadError, match="'127.0.0.1' is a loopback"):
            await download(session, f"http://127.0.0.1:{port}/a.png", tmp_path / "a.png", hosts=public_api)
    assert plain_host["hits"] == 0
    # The API itself on loopback (the simulator): loopback outputs are fine.
    local_api = OutputHosts(f"http://127.0.0.1:{port + 1}/v1", ["localhost"])
    async with make_session(hosts=local_api) as session:
        got = await download(session, f"http://localhost:{port}/a.png", tmp_path / "a.png", hosts=local_api)
    assert got.size == 1000 and plain_host["hits"] == 1


async def test_the_address_checked_is_the_address_connected_to(plain_host, tmp_path):
    """DNS rebinding: an allowed name whose DNS answers 127.0.0.1 when the connection is made is
    refused by the session's resolver, whatever it answered earlier."""
    hosts = OutputHosts("http://1.1.1.1/v1")
    guarded = hosts.resolver(_Answers("127.0.0.1"))
    with pytest.raises(OSError, match="loopback"):
        await guarded.resolve("files.runcomfy.net", 80)
    # Both kinds in one answer: only the public one may be connected to.
    mixed = await hosts.resolver(_Answers("127.0.0.1", "104.18.0.1", "169.254.169.254")).resolve("a.runcomfy.com")
    assert [r["host"] for r in mixed] == ["104.18.0.1"]
    # End to end: the download never reaches the loopback host behind the allowed name.
    import aiohttp

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=guarded), auto_decompress=False)
    async with session:
        with pytest.raises(DownloadError, match="resolves to 127.0.0.1") as info:
            await download(session, f"http://files.runcomfy.net:{plain_host['port']}/a.png", tmp_path / "a.png",
                           hosts=hosts)
    assert info.value.permanent and plain_host["hits"] == 0


async def test_the_default_hosts_are_runcomfys_and_the_apis():
    from yarl import URL

    hosts = OutputHosts("https://model-api.runcomfy.net/v1", ["cdn.example.com", "*.example.net"])
    for url in ("https://files.runcomfy.net/x.mp4", "https://a.b.runcomfy.com/x", "https://model-api.runcomfy.net/o",
                "https://cdn.example.com/x", "https://x.example.net/x", "https://FILES.RUNCOMFY.NET./x"):
        assert await hosts.refusal(URL(url)) is None, url
    for url, why in [("https://evil.example.org/x", "not allowed"), ("https://runcomfy.net.evil.org/x", "not allowed"),
                     ("https://evilruncomfy.net/x", "not allowed"), ("http://files.runcomfy.net/x", "not https"),
                     ("https://169.254.169.254/latest", "not allowed"), ("https://example.com/x", "not allowed")]:
        assert why in (await hosts.refusal(URL(url)) or ""), url


async def test_a_declared_size_over_the_cap_is_refused_before_reading(simulator, tmp_path):
    sim = await simulator(duration=0.05, faults=["output_body=huge"])
    started = time.monotonic()
    out, jobs, _ = await _run(tmp_path, sim, n=2)
    assert out.counts == {"b": {"failed": 2}}
    assert all("over the size cap of 2,147,483,648 bytes (it declares 3,221,225,472)" in job.error
               for job, _ in jobs.values())
    assert sim.calls["download"] == 2 and time.monotonic() - started < 10  # one try each
    assert not list((tmp_path / "work" / "b").glob("*"))


@pytest.mark.parametrize("body", ["bomb", "endless"])
async def test_bytes_received_over_the_cap_are_refused_and_nothing_is_kept(simulator, tmp_path, body):
    sim = await simulator(duration=0.05, faults=[f"output_body={body}"])
    out, jobs, _ = await asyncio.wait_for(_run(tmp_path, sim, n=1, download_limits=SMALL_CAP), 30)
    assert out.counts == {"b": {"failed": 1}}
    assert all("over the size cap of 1,048,576 bytes (more arrived)" in job.error for job, _ in jobs.values())
    assert sim.calls["download"] == 1
    assert not list((tmp_path / "work" / "b").glob("*"))  # neither a file nor a .part


@pytest.mark.parametrize("body", ["gzip", "gzip_forced"])
async def test_a_gzip_encoded_output_is_downloaded_whole(simulator, tmp_path, body):
    sim = await simulator(duration=0.05, faults=[f"output_body={body}"])
    out, _, _ = await _run(tmp_path, sim, n=2)
    assert out.counts == {"b": {"succeeded": 2}}
    await check_outputs_match(sim, tmp_path / "work")


async def test_a_download_slower_than_the_least_rate_is_abandoned_and_tried_again(simulator, tmp_path):
    sim = await simulator(duration=0.05, faults=["script.download=trickle"])
    limits = DownloadLimits(min_rate=50_000, rate_window=0.3)
    started = time.monotonic()
    out, _, events = await _run(tmp_path, sim, n=1, download_limits=limits)
    assert out.counts == {"b": {"succeeded": 1}}
    assert any("download too slow" in e.message for e in events if e.kind == "retry")
    assert sim.calls["download"] == 2 and time.monotonic() - started < 5
    await check_outputs_match(sim, tmp_path / "work")


@pytest.fixture
async def api_answers():
    """A loopback 'API' whose /status answers ``kind``: endless, declared huge, or a gzip bomb."""
    state = {"kind": "endless"}

    async def status(request):
        kind = state["kind"]
        if kind == "declared":
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = 100 << 20
            await resp.prepare(request)
            await resp.write(b'{"status": "in_queue", "pad": "')
            return resp
        if kind == "bomb":
            from batchgen.simulator.server import _bomb

            return web.Response(body=_bomb(), headers={"Content-Encoding": "gzip",
                                                       "Content-Type": "application/json"})
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        try:
            await resp.write(b'{"status": "in_queue", "pad": "')
            while True:
                await resp.write(b"x" * 65536)
        except ConnectionError:
            return resp

    app_ = web.Application()
    app_.router.add_get("/v1/requests/{rid}/status", status)
    async with loopback(app_) as root:
        state["url"] = root + "/v1"
        yield state


@pytest.mark.parametrize("kind", ["endless", "declared", "bomb"])
async def test_an_api_answer_of_more_than_a_few_mb_is_refused_not_read_whole(api_answers, kind):
    api_answers["kind"] = kind
    async with RunComfyClient(api_answers["url"], "t") as client:
        with pytest.raises(APIResponseLostError, match="too large|larger than"):
            await asyncio.wait_for(client.status("r1"), 20)


async def test_an_output_url_ending_in_sh_is_saved_as_media(simulator, tmp_path):
    sim = await simulator(duration=0.05, faults=["output_ext=sh"])
    out, jobs, _ = await _run(tmp_path, sim, n=2)
    assert out.counts == {"b": {"succeeded": 2}}
    names = sorted(p.name for p in (tmp_path / "work" / "b").iterdir())
    assert names == sorted(f"{job.key}.mp4" for job, _ in jobs.values())
    await check_outputs_match(sim, tmp_path / "work")


def test_download_settings_in_batchgen_toml(tmp_path):
    from batchgen.config import load_config, parse_size
    from batchgen.errors import UsageError

    assert parse_size("2GiB") == 2 << 30 and parse_size("500 MB") == 500_000_000 and parse_size(10) == 10
    (tmp_path / "batchgen.toml").write_text(
        'output_hosts = ["cdn.example.com", "*.example.net"]\nmax_output_size = "1MiB"\n'
        'min_download_rate = "5KB"\ndownload_rate_window = 30\n')
    settings, _ = load_config(None, tmp_path)
    assert settings == {"output_hosts": ("cdn.example.com", "*.example.net"), "max_output_size": 1 << 20,
                        "min_download_rate": 5000, "download_rate_window": 30}
    for bad in ('output_hosts = "cdn.example.com"', 'output_hosts = ["https://cdn.example.com/"]',
                'max_output_size = "lots"', "max_output_size = 0", "download_rate_window = 0"):
        (tmp_path / "batchgen.toml").write_text(bad + "\n")
        with pytest.raises(UsageError):
            load_config(None, tmp_path)
