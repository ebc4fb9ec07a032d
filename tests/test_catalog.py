"""Any model, checked against RunComfy's catalog (fetched from a real simulator, cached in the work
directory), and the account preflight: the balance beside the estimated cost."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time

import pytest
from click.testing import CliRunner
from conftest import write_file
from imagefactory import make_image

from batchgen import app, catalog
from batchgen import constants as C
from batchgen.cli import main
from batchgen.client import token_may_go_to
from batchgen.config import load_config
from batchgen.simulator.catalogapi import UNLIMITED_BALANCE

WAN = "sim/wan-like/image-to-video"  # per second: guidance_scale a "float", seed minimum 0
MULTI = "sim/multi-ref/image-to-video"  # image_urls: 1 to 3 images, each under 5 MB
DREAMINA = C.DEFAULT_MODEL


def cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


async def cli_beside(*args: str, env: dict | None = None):
    """The CLI in a thread, so that a simulator on this test's loop can answer it."""
    return await asyncio.to_thread(cli, *args, env=env)


def texts(result) -> list[str]:
    return [str(p) for p in result.problems]


@pytest.fixture
def images(tmp_path):
    make_image(tmp_path / "a.jpg", 640, 480)
    return tmp_path


@pytest.fixture
async def api(simulator):
    """A standalone simulator and a target with a token for it."""
    sim = await simulator()
    return sim, app.Target(api_url=sim.base_url, token="t")


async def validate(tmp_path, text: str, target: app.Target, **kw):
    path = write_file(tmp_path / "m.yaml", text)
    return await app.validate(app.RunOptions(workdir=tmp_path / "work", manifest=path, target=target, **kw))


def manifest(model: str, *jobs: str) -> str:
    lines = "".join(f"  - {{{job}}}\n" for job in jobs or ("prompt: p, image: a.jpg",))
    return f"model: {model}\njobs:\n{lines}"


# ---- unknown models -----------------------------------------------------------------------------


async def test_a_misspelled_model_gets_a_did_you_mean_from_the_catalog(api, images):
    sim, target = api
    result = await validate(images, manifest("sim/wan-like/image-to-vidoe"), target)
    (problem,) = texts(result)
    assert problem.startswith("m.yaml, line 1, field 'model': unknown model 'sim/wan-like/image-to-vidoe': "
                              "not bundled with batchgen and not in RunComfy's catalog (fetched ")
    assert "did you mean 'sim/wan-like/image-to-video'" in problem and "--no-schema runs it unchecked" in problem


async def test_without_a_token_a_misspelled_bundled_model_still_gets_a_did_you_mean(images):
    result = await validate(images, manifest("bytedance/dreamina-3-0/pro/image-to-vidoe"), app.Target())
    (problem,) = texts(result)
    assert "not bundled with batchgen; RunComfy's catalog was not consulted: no API token" in problem
    assert "did you mean 'bytedance/dreamina-3-0/pro/image-to-video'?" in problem


def test_only_no_schema_runs_a_model_without_a_schema_and_the_output_says_so(images):
    write_file(images / "m.yaml", manifest("someone/new-model"))
    refused = cli("validate", "m.yaml")
    assert refused.exit_code == 2 and "unknown model 'someone/new-model'" in refused.output
    allowed = cli("validate", "m.yaml", "--no-schema")
    assert allowed.exit_code == 0
    assert "1 job(s), all valid (no schema for the model: inputs NOT checked, --no-schema)" in allowed.output
    plan = cli("plan", "m.yaml", "--no-schema")
    assert plan.exit_code == 0 and "schema: none: inputs are NOT checked (--no-schema)" in plan.output


async def test_a_bundled_model_needs_no_network(images):
    target = app.Target(api_url="http://127.0.0.1:9/v1", token="t")  # nothing listens there
    result = await validate(images, manifest(DREAMINA), target)
    assert texts(result) == [] and result.schema.origin == "bundled"
    assert not (images / "work" / C.CATALOG_FILENAME).exists()


# ---- catalog schemas ----------------------------------------------------------------------------


async def test_a_catalog_only_model_is_checked_by_its_own_rules(api, images):
    sim, target = api
    wan = await validate(images, manifest(
        WAN,
        "prompt: fine, image: a.jpg, guidance_scale: 7.5, seed: 0",
        "prompt: a whole number is a number too, image: a.jpg, guidance_scale: 7",
        "prompt: bad, image: a.jpg, guidance_scale: high, seed: -1",
        "prompt: too much, image: a.jpg, guidance_scale: 10.5",
    ), target)
    assert wan.schema.origin == "catalog" and wan.schema.price_unit == "second"
    assert texts(wan) == [
        "m.yaml, line 5, field 'guidance_scale': must be of type number (a number), got \"high\"",
        "m.yaml, line 5, field 'seed': is -1; must be at least 0",
        "m.yaml, line 6, field 'guidance_scale': is 10.5; must be at most 10",
    ]
    make_image(images / "big.jpg", 640, 480, nbytes=5_000_000)
    multi = await validate(images, manifest(
        MULTI,
        "prompt: fine, image_urls: [a.jpg, a.jpg, a.jpg]",
        "prompt: four, image_urls: [a.jpg, a.jpg, a.jpg, a.jpg]",
        "prompt: none, image_urls: []",
        "prompt: heavy, image_urls: [a.jpg, big.jpg]",
    ), target)
    assert texts(multi) == [
        "m.yaml, line 4, field 'image_urls': has 4 item(s); at most 3 allowed",
        "m.yaml, line 5, field 'image_urls': has 0 item(s); at least 1 required",
        "m.yaml, line 6, field 'image_urls[1]': image is 5,000,000 bytes; Each image must be smaller than 5 MB "
        "(allowed: less than 5,000,000 bytes; 1 MB = 1,000,000 bytes)",
    ]
    assert sim.calls["catalog"] == 1  # the second manifest used the cache


def test_a_catalog_only_model_runs_end_to_end_priced_per_second(images):
    write_file(images / "m.yaml", f"model: {WAN}\njobs:\n  - {{prompt: a, image: a.jpg, duration: 10}}\n"
                                  "  - {prompt: b, image: a.jpg}\n")
    plan = cli("plan", "m.yaml", "--simulate")
    assert plan.exit_code == 0, plan.output
    assert "schema: from RunComfy's catalog" in plan.output
    # $0.05 a second: 10 s + the default 5 s.
    assert "estimated cost: $0.75 ($0.05 a second x each job's duration)" in plan.output
    run = cli("run", "m.yaml", "--simulate")
    assert run.exit_code == 0, run.output
    (batch,) = json.loads(cli("status", "--json").output)["batches"]
    assert batch["states"] == {"succeeded": 2} and batch["spent_usd"] == pytest.approx(0.75)


# ---- the cache ----------------------------------------------------------------------------------


def age_cache(workdir, seconds: float) -> None:
    path = workdir / C.CATALOG_FILENAME
    data = json.loads(path.read_text())
    data["fetched_at"] = time.time() - seconds
    path.write_text(json.dumps(data))


async def test_the_catalog_is_cached_for_a_day_and_serves_offline(api, images, caplog):
    sim, target = api
    work = images / "work"
    assert texts(await validate(images, manifest(WAN), target)) == []
    cache = json.loads((work / C.CATALOG_FILENAME).read_text())
    assert cache["api_url"] == sim.base_url and time.time() - cache["fetched_at"] < 60
    models = {m["model_id"]: m for m in cache["models"]}
    assert {WAN, MULTI, DREAMINA} <= set(models)
    assert models[WAN]["input_schema"]["properties"]["guidance_scale"]["type"] == "float"  # as served
    assert sim.calls["catalog"] == 1

    assert texts(await validate(images, manifest(WAN), target)) == []
    assert sim.calls["catalog"] == 1  # fresh: not asked again
    age_cache(work, C.CATALOG_MAX_AGE + 60)
    assert texts(await validate(images, manifest(WAN), target)) == []
    assert sim.calls["catalog"] == 2  # a day old: fetched again

    await sim.stop()  # offline from now on
    age_cache(work, C.CATALOG_MAX_AGE + 60)
    with caplog.at_level(logging.WARNING):
        assert texts(await validate(images, manifest(WAN), target)) == []
    assert "catalog cache from" in caplog.text and "could not refresh" in caplog.text
    assert texts(await validate(images, manifest(WAN), app.Target(api_url=sim.base_url))) == []  # no token


def test_a_cache_is_used_only_for_its_own_api_and_a_broken_one_is_ignored(tmp_path):
    catalog.save_cache(tmp_path, catalog.Catalog("http://a/v1", time.time(), {WAN: catalog.Entry(WAN)}))
    assert catalog.load_cache(tmp_path, "http://b/v1") is None
    assert set(catalog.load_cache(tmp_path, "http://a/v1").entries) == {WAN}
    (tmp_path / C.CATALOG_FILENAME).write_text('{"version": 1, "api_url": "http://a/v1", "fetched_at": ')
    assert catalog.load_cache(tmp_path, "http://a/v1") is None


def test_a_cache_dated_in_the_future_is_not_fresh():
    now = time.time()
    assert catalog.Catalog("u", now - 60).is_fresh(now)
    assert not catalog.Catalog("u", now - C.CATALOG_MAX_AGE).is_fresh(now)
    assert not catalog.Catalog("u", now + 3600).is_fresh(now)


async def test_refresh_fetches_even_a_fresh_catalog_and_pages_are_followed(api, tmp_path, monkeypatch):
    sim, target = api
    monkeypatch.setattr(C, "CATALOG_PAGE_SIZE", 2)
    first, note = await app.open_catalog(target, tmp_path)
    assert note == "" and len(first.entries) == 6 and sim.calls["catalog"] == 3  # 6 models, 2 a page
    await app.open_catalog(target, tmp_path)
    assert sim.calls["catalog"] == 3
    await app.open_catalog(target, tmp_path, refresh=True)
    assert sim.calls["catalog"] == 6


# ---- batchgen models ----------------------------------------------------------------------------


def model_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if re.match(r"^[a-z][\w.-]*/", line)]


def test_models_lists_searches_and_filters_the_catalog():
    listed = cli("models", "--simulate")
    assert listed.exit_code == 0 and listed.output.startswith("RunComfy catalog, fetched ")
    lines = model_lines(listed.output)
    assert len(lines) == 6
    assert any(re.fullmatch(rf"{re.escape(WAN)}\s+image-to-video\s+\$0\.05 a second", line) for line in lines)
    assert any(re.fullmatch(rf"{re.escape(DREAMINA)}\s+image-to-video\s+\$0\.1 an output\s+\[bundled\]", line)
               for line in lines)
    found = model_lines(cli("models", "--simulate", "--search", "MULTI").output)
    assert [line.split()[0] for line in found] == [MULTI]
    category = model_lines(cli("models", "--simulate", "--category", "reference-to-video").output)
    assert [line.split()[0] for line in category] == [MULTI]
    assert "no model matches" in cli("models", "--simulate", "--search", "nothing-like-it").output


def test_models_without_a_token_lists_the_bundled_ones_and_says_why():
    result = cli("models")
    assert result.exit_code == 0 and "no API token" in result.output
    assert {line.split()[0] for line in model_lines(result.output)} >= {DREAMINA, "wan-ai/wan-2-2/image-to-video"}


def test_models_shows_one_model_from_whichever_source_it_came():
    wan = cli("models", WAN, "--simulate")
    assert wan.exit_code == 0, wan.output
    assert f"{WAN}  (output: video; schema from RunComfy's catalog, fetched " in wan.output
    assert "price: $0.05 a second of the job's duration" in wan.output
    assert "guidance_scale   default 5    number; at least 1; at most 10" in wan.output
    assert "seed             default 42   integer; at least 0; at most 2147483647" in wan.output
    multi = cli("models", MULTI, "--simulate").output
    assert "image_urls       required     array; image_uris; 1 to 3 item(s)" in multi
    assert "Each image must be smaller than 5 MB (allowed: less than 5,000,000 bytes" in multi
    bundled = cli("models", DREAMINA)  # no token, no network
    assert bundled.exit_code == 0 and "schema bundled with batchgen" in bundled.output
    wrong = cli("models", "sim/wan-like/image-to-vide", "--simulate")
    assert wrong.exit_code == 2 and "did you mean 'sim/wan-like/image-to-video'" in wrong.output


async def test_models_lists_from_the_cache_of_a_standalone_api(api, tmp_path):
    sim, _ = api
    env = {"RUNCOMFY_API_TOKEN": "t"}
    first = await cli_beside("models", "--api-url", sim.base_url, env=env)
    assert first.exit_code == 0 and f"cached in jobs/{C.CATALOG_FILENAME}" in first.output
    again = await cli_beside("models", "--api-url", sim.base_url, "--search", "wan", env=env)
    assert {line.split()[0] for line in model_lines(again.output)} == {WAN, "wan-ai/wan-2-2/image-to-video"}
    assert sim.calls["catalog"] == 1
    await cli_beside("models", "--api-url", sim.base_url, "--refresh", env=env)
    assert sim.calls["catalog"] == 2


# ---- the account preflight ------------------------------------------------------------------------


def two_jobs(folder, sim=None):
    """Two $0.10 jobs; with ``sim``, their image is one the simulator serves, so they can run."""
    image = sim.publish_file(folder / "a.jpg") if sim is not None else "a.jpg"
    return write_file(folder / "m.yaml", manifest(DREAMINA, f"prompt: a, image: '{image}'",
                                                  f"prompt: b, image: '{image}'"))


async def test_plan_shows_the_balance_and_warns_when_it_cannot_cover_the_cost(simulator, images):
    sim = await simulator(balance_usd=0.15)
    opts = app.RunOptions(workdir=images / "work", manifest=two_jobs(images),
                          target=app.Target(api_url=sim.base_url, token="t"))
    report = await app.plan(opts)
    assert report.estimated_cost == pytest.approx(0.20)
    assert report.balance.describe(report.estimated_cost) == (
        "balance: $0.15 USD",
        "the balance ($0.15) cannot cover the estimated cost ($0.20): jobs beyond it will be refused")
    sim.config.balance_usd = 5
    report = await app.plan(opts)
    assert report.balance.describe(report.estimated_cost) == ("balance: $5.00 USD, covers the estimated $0.20", None)
    shown = await cli_beside("plan", "m.yaml", "--api-url", sim.base_url, env={"RUNCOMFY_TOKEN": "t"})
    assert shown.exit_code == 0 and "  balance: $5.00 USD, covers the estimated $0.20" in shown.output


async def test_plan_command_warns_and_the_balance_url_comes_from_the_config(simulator, images):
    api_sim = await simulator(balance_usd=100)
    wallet = await simulator(balance_usd=0.15)  # same loopback host as the API: the token may go there
    two_jobs(images)
    (images / "jobs").mkdir()
    (images / "jobs" / "batchgen.toml").write_text(f'balance_url = "{wallet.root_url}/prod/v2/balance"\n')
    shown = await cli_beside("plan", "m.yaml", "--api-url", api_sim.base_url, env={"RUNCOMFY_API_TOKEN": "t"})
    assert shown.exit_code == 0
    assert "  balance: $0.15 USD" in shown.output
    assert "warning: the balance ($0.15) cannot cover the estimated cost ($0.20)" in shown.output
    assert wallet.calls["balance"] == 1 and api_sim.calls["balance"] == 0


async def test_a_failing_balance_call_is_a_warning_never_a_stop(simulator, images):
    sim = await simulator(faults=["script.balance=5xx,5xx"])
    opts = app.RunOptions(workdir=images / "work", manifest=two_jobs(images, sim),
                          target=app.Target(api_url=sim.base_url, token="t"))
    report = await app.plan(opts)
    line, warning = report.balance.describe(report.estimated_cost)
    assert line == "balance: unknown"
    assert warning == "could not read the account's balance: balance /prod/v2/balance: HTTP 502"
    notices: list[tuple[str, bool]] = []
    outcome = await app.run(opts, on_notice=lambda text, warn: notices.append((text, warn)))
    assert outcome.counts == {"m": {"succeeded": 2}}
    assert notices == [("balance: unknown", False), (warning, True)]


async def test_a_run_starts_with_the_balance_beside_the_cost(simulator, images):
    sim = await simulator(balance_usd=0.15)
    opts = app.RunOptions(workdir=images / "work", manifest=two_jobs(images, sim),
                          target=app.Target(api_url=sim.base_url, token="t"))
    notices: list[tuple[str, bool]] = []
    outcome = await app.run(opts, on_notice=lambda text, warn: notices.append((text, warn)))
    assert notices == [
        ("balance: $0.15 USD", False),
        ("the balance ($0.15) cannot cover the estimated cost ($0.20): jobs beyond it will be refused", True)]
    assert outcome.summary.account_error is not None  # the API refused the second job, as warned


async def test_the_token_comes_from_runcomfy_token_and_only_its_name_is_said(simulator, images, monkeypatch,
                                                                              caplog):
    sim = await simulator()
    monkeypatch.setattr(app, "_TOLD_SOURCES", set())
    monkeypatch.setenv("RUNCOMFY_TOKEN", "sekrit-value-123")
    opts = app.RunOptions(workdir=images / "work", manifest=two_jobs(images), target=app.Target(api_url=sim.base_url))
    with caplog.at_level(logging.INFO, logger="batchgen"):
        report = await app.plan(opts)
    assert report.balance.balance_usd == UNLIMITED_BALANCE
    assert "API token from RUNCOMFY_TOKEN" in caplog.text and "sekrit" not in caplog.text
    monkeypatch.setenv("RUNCOMFY_API_TOKEN", "first")
    assert app.token_source(app.Target()) == ("first", "RUNCOMFY_API_TOKEN")


def test_the_balance_url_default_override_and_loopback_derivation(monkeypatch, tmp_path):
    real = "https://model-api.runcomfy.net/v1"
    assert app.resolve_balance_url(app.Target(), real) == "https://api.runcomfy.net/prod/v2/balance"
    assert app.resolve_balance_url(app.Target(), "http://127.0.0.1:8787/v1") == "http://127.0.0.1:8787/prod/v2/balance"
    monkeypatch.setenv("RUNCOMFY_BALANCE_URL", "https://x.runcomfy.net/b")
    assert app.resolve_balance_url(app.Target(), real) == "https://x.runcomfy.net/b"
    assert app.resolve_balance_url(app.Target(balance_url="https://y.runcomfy.com/b"), real) == "https://y.runcomfy.com/b"
    (tmp_path / "c.toml").write_text('balance_url = "https://z.runcomfy.net/b"\n')
    assert load_config(tmp_path / "c.toml", tmp_path)[0] == {"balance_url": "https://z.runcomfy.net/b"}


def test_the_token_goes_only_to_the_api_host_or_a_runcomfy_host():
    real = "https://model-api.runcomfy.net/v1"
    assert token_may_go_to("https://api.runcomfy.net/prod/v2/balance", real)
    assert token_may_go_to("https://model-api.runcomfy.net/anything", real)
    assert token_may_go_to("http://127.0.0.1:8787/prod/v2/balance", "http://127.0.0.1:8787/v1")
    for elsewhere in ("http://api.runcomfy.net/prod/v2/balance",  # not encrypted
                      "https://runcomfy.net.example.com/b", "https://evilruncomfy.net/b", "https://example.com/b",
                      "http://localhost:8787/b", "file:///etc/passwd", "not a url"):
        assert not token_may_go_to(elsewhere, real if "runcomfy" in elsewhere else "http://127.0.0.1:8787/v1")
