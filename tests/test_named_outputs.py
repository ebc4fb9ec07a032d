"""Output files named by the manifest's ``output_name``, end to end: real runs against the
simulator on loopback, the files on disk, the store, the report and the gallery, and a run after
the template changed (nothing renamed, nothing submitted again)."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path
from urllib.parse import quote

import yaml
from imagefactory import make_image
from simruns import settings
from test_gallery import CARDS, VIDEO_STATES, chromium, field, gallery_data, needs_chromium, open_page

from batchgen import app
from batchgen.gallery import build_gallery
from batchgen.report import build_report
from batchgen.store import Store

SAMPLE_NAMES = ["a_red_fox_1_121", "a_red_fox_1_241", "a_red_fox_1_121_2", "a_red_fox_1_241_2",
                "a_night_bus_2_121", "a_night_bus_2_241"]  # in manifest order


def media(folder: Path) -> dict[str, int]:
    """The output files in a batch folder: name -> inode."""
    return {p.name: p.stat().st_ino for p in folder.iterdir() if p.suffix in (".mp4", ".png")}


async def recorded(work: Path, batch: str) -> list[tuple[str, str | None, list[str | None]]]:
    """(key, output name, output paths) of each job, in manifest order."""
    async with await Store.open(work / "batchgen.sqlite3") as store:
        return [(job.key, job.output_name, [o.path for o in await store.outputs(job.id)])
                for job in await store.jobs([batch])]


def run_opts(work: Path, manifest: Path, sim, **kw) -> app.RunOptions:
    return app.RunOptions(workdir=work, manifest=manifest, target=app.Target(api_url=sim.base_url, token="t"),
                          settings=settings(**kw))


async def test_a_yaml_manifest_names_the_files_the_store_report_and_gallery_keep(samples, tmp_path, simulator):
    sim = await simulator(duration=0.05)
    work = tmp_path / "work"
    out = await app.run(run_opts(work, samples / "named-outputs.yaml", sim))
    assert out.counts == {"named-outputs": {"succeeded": 6}}
    folder = work / "named-outputs"
    assert sorted(media(folder)) == sorted(f"{n}.mp4" for n in SAMPLE_NAMES)
    jobs = await recorded(work, "named-outputs")
    assert [(name, paths) for _, name, paths in jobs] == [(n, [f"named-outputs/{n}.mp4"]) for n in SAMPLE_NAMES]

    report = await build_report(work, "named-outputs")
    assert list(report["output_name"]) == SAMPLE_NAMES
    assert list(report["key"]) == [key for key, _, _ in jobs]
    for row in report.itertuples():  # each name is the file whose digest the report gives
        assert os.path.basename(row.output_paths) == f"{row.output_name}.mp4"
        assert hashlib.sha256(Path(row.output_paths).read_bytes()).hexdigest() == row.output_sha256

    page = await build_gallery(work, "named-outputs")
    records = gallery_data(page)
    assert [field(r, "name") for r in records] == SAMPLE_NAMES
    assert [field(r, "outputs")[0][0] for r in records] == [quote(f"{n}.mp4") for n in SAMPLE_NAMES]
    assert all((page.parent / f"{n}.mp4").is_file() for n in SAMPLE_NAMES)  # the page shows files that exist


async def test_a_new_template_renames_nothing_recorded_and_submits_nothing_again(samples, tmp_path, simulator):
    sim = await simulator(duration=0.05)
    work = tmp_path / "work"
    path = samples / "named-outputs.yaml"
    # Two of the six jobs run; four are recorded (named) but not yet submitted.
    first = await app.run(run_opts(work, path, sim, max_jobs=2))
    assert first.counts["named-outputs"] == {"succeeded": 2, "pending": 4}
    before = media(work / "named-outputs")
    assert sorted(before) == sorted(f"{n}.mp4" for n in SAMPLE_NAMES[:2])

    doc = yaml.safe_load(path.read_text())
    doc["defaults"]["output_name"] = "{frames}f_{subject}"  # another template ...
    doc["jobs"].append({"subject": "a red fox", "image": "images/lake.png", "seed": 3})  # ... and a new job
    path.write_text(yaml.safe_dump(doc))
    again = await app.run(run_opts(work, path, sim))
    # Only the new job's two clips are new; the four waiting ones are sent once, as before.
    assert again.new_jobs == 2 and again.counts == {"named-outputs": {"succeeded": 8}}
    assert sim.calls["submit"] == 8
    after = media(work / "named-outputs")
    assert {n: after[n] for n in before} == before  # the same files: not renamed, not written again
    # Recorded jobs keep the names they were recorded with, downloaded or not; the new job's
    # names come from the new template.
    assert [name for _, name, _ in await recorded(work, "named-outputs")] == [
        *SAMPLE_NAMES, "121f_a_red_fox", "241f_a_red_fox"]
    assert sorted(after) == sorted([*(f"{n}.mp4" for n in SAMPLE_NAMES), "121f_a_red_fox.mp4", "241f_a_red_fox.mp4"])


async def test_a_new_batch_with_reuse_links_finished_files_under_new_names(samples, tmp_path, simulator):
    sim = await simulator(duration=0.05)
    work = tmp_path / "work"
    path = samples / "named-outputs.yaml"
    await app.run(run_opts(work, path, sim))
    path.write_text(path.read_text().replace("{subject}_{seed}_{frames}", "{frames}f_{subject}"))
    opts = run_opts(work, path, sim)
    opts.batch, opts.reuse = "named-v2", True
    again = await app.run(opts)
    assert again.counts == {"named-v2": {"succeeded": 6}} and sim.calls["submit"] == 6  # nothing paid
    old, new = media(work / "named-outputs"), media(work / "named-v2")
    assert sorted(new) == sorted(f"{f}f_{s}{suffix}.mp4" for f in (121, 241) for s, suffix in
                                 (("a_red_fox", ""), ("a_red_fox", "_2"), ("a_night_bus", "")))
    # The same files (hard links) under the new names, the old batch's untouched.
    assert new["121f_a_red_fox_2.mp4"] == old["a_red_fox_1_121_2.mp4"]
    assert sorted(new.values()) == sorted(old.values())


async def test_a_csv_manifest_names_files_and_a_new_name_avoids_every_file_there(tmp_path, simulator):
    sim = await simulator(duration=0.05)
    work = tmp_path / "work"
    image = sim.publish_file(_image(tmp_path))
    path = tmp_path / "clips.csv"
    path.write_text("prompt,image_url,seed,output_name\n"
                    f"a fox,{image},1,Fox/Take 1\n"      # a path separator and a space
                    f"a fox,{image},2,fox_take_1\n"      # the same name where case is ignored
                    f"an owl,{image},3,CON\n"            # a Windows device name
                    f"a hare,{image},4,\n")              # no name: its key
    out = await app.run(run_opts(work, path, sim))
    assert out.counts == {"clips": {"succeeded": 4}}
    jobs = await recorded(work, "clips")
    names = ["Fox_Take_1", "fox_take_1_2", "_CON", None]
    assert [name for _, name, _ in jobs] == names
    files = [f"{n or key}.mp4" for (key, _, _), n in zip(jobs, names, strict=True)]
    assert sorted(media(work / "clips")) == sorted(files)

    # A file no record names (left by a job forgotten since, or put there by hand) is never
    # written over: a new job's name avoids it too.
    (work / "clips" / "Lynx.mp4").write_bytes(b"mine")
    kept = media(work / "clips")
    path.write_text(path.read_text() + f"a lynx,{image},5,lynx\n")
    await app.run(run_opts(work, path, sim))
    jobs = await recorded(work, "clips")
    assert [name for _, name, _ in jobs][-1] == "lynx_2"
    assert {n: media(work / "clips")[n] for n in kept} == kept
    assert (work / "clips" / "Lynx.mp4").read_bytes() == b"mine"


async def test_several_outputs_of_a_named_job_get_an_index(tmp_path, simulator):
    sim = await simulator(duration=0.05)
    work = tmp_path / "work"
    image = sim.publish_file(_image(tmp_path))
    path = tmp_path / "b.csv"
    path.write_text(f"prompt,image_url,seed,output_name\na fox,{image},1,fox\n")
    await app.run(run_opts(work, path, sim))
    ((key, name, [first]),) = await recorded(work, "b")
    assert name == "fox" and first == "b/fox.mp4"
    # A second output of the same job, to be downloaded (the simulator makes one; the API can
    # make more): recorded as a result would record it, then a run fetches it.
    with sqlite3.connect(work / "batchgen.sqlite3") as db:
        url = db.execute("SELECT url FROM outputs").fetchone()[0]
        db.execute("INSERT INTO outputs (job_id, idx, kind, url) SELECT job_id, 1, kind, url FROM outputs")
        db.execute("UPDATE jobs SET state = 'downloading'")
    assert url
    await app.run(app.RunOptions(workdir=work, batch="b", target=app.Target(api_url=sim.base_url, token="t"),
                                 settings=settings()))
    assert [paths for _, _, paths in await recorded(work, "b")] == [["b/fox.mp4", "b/fox-1.mp4"]]
    assert sorted(media(work / "b")) == ["fox-1.mp4", "fox.mp4"]


@needs_chromium
async def test_the_gallery_plays_named_files_and_its_search_finds_names(samples, tmp_path):
    work = tmp_path / "work"
    await app.run(app.RunOptions(workdir=work, manifest=samples / "named-outputs.yaml",
                                 target=app.Target(simulate=True), settings=settings()))
    page_path = await build_gallery(work, "named-outputs")
    async with chromium(tmp_path / "profile") as cdp:
        page = await open_page(cdp, page_path.as_uri())
        await page.wait_for("Array.from(document.querySelectorAll('.card video')).length === 6 && "
                            "Array.from(document.querySelectorAll('.card video')).every(v => v.readyState >= 1)",
                            "every named video's metadata")
        videos = await page.evaluate(VIDEO_STATES)
        assert sorted(v["src"] for v in videos) == sorted(f"{n}.mp4" for n in SAMPLE_NAMES)
        assert all(v["error"] is None and v["duration"] > 0 for v in videos), videos
        names = await page.evaluate("Array.from(document.querySelectorAll('.card .name')).map(e => e.textContent)")
        assert sorted(names) == sorted(SAMPLE_NAMES)
        await page.evaluate("(() => { const s = document.getElementById('search'); s.value = 'NIGHT_BUS_2';"
                            " s.dispatchEvent(new Event('input')); })()")
        await page.wait_for(f"{CARDS} === 2", "the two cards whose name the search finds")
        assert page.errors() == []


def _image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "in.jpg", 640, 480)
