"""Hostile and broken API scenarios, one section per area."""

from __future__ import annotations

import yaml
from imagefactory import make_image
from test_runner import settings

from batchgen import app
from batchgen import store as S
from batchgen.store import Store

# --- inline files ---------------------------------------------------------------------------------


async def test_a_service_with_a_lower_body_limit_fails_the_job_without_an_unknown(tmp_path, simulator):
    """A 413 is a refusal: the job fails once, it is neither unknown nor submitted again."""
    sim = await simulator(faults=["max_body=100000"], duration=0.05)
    make_image(tmp_path / "big.jpg", 640, 480, nbytes=200_000)
    make_image(tmp_path / "small.jpg", 640, 480)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "lim", "jobs": [{"prompt": "big", "image": "big.jpg"},
                                                            {"prompt": "small", "image": "small.jpg"}]}))
    out = await app.run(app.RunOptions(workdir=tmp_path / "work", manifest=path,
                                       target=app.Target(api_url=sim.base_url, token="t"), settings=settings()))
    assert out.summary.finished == {S.FAILED: 1, S.SUCCEEDED: 1}
    assert sim.calls["submit"] == 2
    async with await Store.open(tmp_path / "work" / "batchgen.sqlite3") as store:
        (failed,) = await store.jobs(["lim"], [S.FAILED])
    assert failed.inputs["prompt"] == "big" and failed.attempts == 1
    assert "Request body too large: at most 100,000 bytes (error_code 413001)" in (failed.error or "")
