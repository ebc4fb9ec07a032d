"""Manifest expansion: defaults, jobs, CSV rows, matrix, repeat, aliases, templates, keys, and
problems that name file, row or line, and field — all of them at once."""

from __future__ import annotations

import asyncio
import textwrap

import pytest
from imagefactory import make_image

from batchgen.app import validate
from batchgen.manifest import load_manifest


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def imgs(tmp_path):
    make_image(tmp_path / "a.jpg", 640, 480)
    make_image(tmp_path / "b.png", 480, 640, "PNG")
    return tmp_path


def jobs_of(path, **kw):
    m = load_manifest(path, **kw)
    specs = list(m.iter_jobs())
    return m, specs


def test_defaults_jobs_matrix_repeat(imgs):
    path = write(imgs / "m.yaml", """
        defaults: {seed: 5}
        jobs:
          - {prompt: one, image: a.jpg}
          - {prompt: two, image: b.png, seed: 9}
        matrix: {frames: [121, 241]}
        repeat: 2
    """)
    m, specs = jobs_of(path)
    assert m.problems == [] and m.name == "m"
    assert len(specs) == 2 * 2 * 2
    first = specs[0]
    assert first.inputs["seed"] == 5 and first.inputs["frames"] == 121
    assert first.inputs["image_urls"] == [(imgs / "a.jpg").resolve().as_uri()]
    assert specs[4].inputs["seed"] == 9
    assert first.source == "m.yaml, line 4" and specs[4].source == "m.yaml, line 5"
    assert [s.seq for s in specs] == list(range(8))
    assert len({s.key for s in specs}) == 8
    assert first.meta == {"matrix": {"frames": 121}, "repeat": 0}


def test_csv_rows_with_template_alias_and_notes(imgs):
    write(imgs / "rows.csv", "subject,image_url,frames,_note\nfox,a.jpg,241,keep\nowl,b.png,,\n")
    path = write(imgs / "m.yaml", """
        name: night-shift
        defaults: {prompt: "A {subject} at dusk"}
        rows: rows.csv
    """)
    m, specs = jobs_of(path)
    assert m.problems == []
    assert [s.inputs["prompt"] for s in specs] == ["A fox at dusk", "A owl at dusk"]
    assert specs[0].inputs["frames"] == 241 and specs[1].inputs["frames"] == 121
    assert specs[0].meta == {"_note": "keep", "subject": "fox"}
    assert "subject" not in specs[0].inputs
    assert specs[0].source == "rows.csv, row 2" and specs[0].batch == "night-shift"


def test_keys_are_stable_and_default_insensitive(imgs):
    a = write(imgs / "a.yaml", "jobs: [{prompt: p, image: a.jpg}]\n")
    b = write(imgs / "b.yaml", "jobs: [{prompt: p, image_urls: [a.jpg], frames: 121, seed: -1}]\n")
    c = write(imgs / "c.yaml", "jobs: [{prompt: p, image: a.jpg}]\nrepeat: 2\n")
    ka = jobs_of(a)[1][0].key
    assert ka == jobs_of(b)[1][0].key  # defaults written out or left implicit: same job
    assert ka == jobs_of(a)[1][0].key
    ks = [s.key for s in jobs_of(c)[1]]
    assert ks[0] == ka and ks[1] != ka  # each repeat is its own job


def test_key_follows_image_content_not_its_path(imgs, tmp_path):
    a = write(imgs / "a.yaml", "jobs: [{prompt: p, image: a.jpg}]\n")
    before = jobs_of(a)[1][0].key
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "a.jpg").write_bytes((imgs / "a.jpg").read_bytes())
    write(moved / "a.yaml", "jobs: [{prompt: p, image: a.jpg}]\n")
    assert jobs_of(moved / "a.yaml")[1][0].key == before
    make_image(imgs / "a.jpg", 641, 480)
    assert jobs_of(a)[1][0].key != before


def test_image_base_url_publishes_local_files(imgs):
    path = write(imgs / "m.yaml", """
        image_base_url: https://cdn.example.com/in/
        jobs: [{prompt: p, image: a.jpg}]
    """)
    _, (spec,) = jobs_of(path)
    assert spec.inputs["image_urls"] == ["https://cdn.example.com/in/a.jpg"]
    assert spec.local_files == {"https://cdn.example.com/in/a.jpg": str((imgs / "a.jpg").resolve())}


def test_duplicates_collapse(imgs):
    path = write(imgs / "m.yaml", "jobs: [{prompt: p, image: a.jpg}, {prompt: p, image: a.jpg}]\n")
    m, specs = jobs_of(path)
    assert len(specs) == 1 and m.duplicates == 1


def test_all_problems_at_once_with_locations(imgs):
    write(imgs / "rows.csv", "prompt,image,frames,promt\nok,a.jpg,,\nbad,missing.jpg,abc,x\n")
    path = write(imgs / "m.yaml", """
        name: good
        colour: red
        defaults: {frames: 120}
        rows: rows.csv
        jobs:
          - {prompt: "{nope}", image: a.jpg}
          - {prompt: p, image: "http://example.com/x.jpg"}
    """)
    result = asyncio.run(validate(path, simulate=True))
    text = "\n".join(str(p) for p in result.problems)
    for needle in [
        "m.yaml, line 3, field 'colour': unknown key; allowed: name, model",
        "m.yaml, line 7, field 'prompt': template uses {nope}",
        "m.yaml, line 8, field 'image_urls': http://example.com/x.jpg: plain http is allowed only for loopback",
        "rows.csv, row 3, field 'frames': 'abc' is not a whole number",
        "rows.csv, row 3, field 'promt': unknown field; allowed: prompt, image_urls, seed, frames",
        "rows.csv, row 3, field 'image_urls': local image not found: missing.jpg",
        "rows.csv, row 2, field 'frames': must be one of 121, 241, got 120",
    ]:
        assert needle in text, f"{needle!r} not in\n{text}"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("jobs: [\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("name: x\n", "has no jobs"),
        ("name: 'a b'\njobs: []\n", "batch name 'a b' is not allowed"),
        ("jobs: [{prompt: p}]\nrepeat: 0\n", "field 'repeat': must be a whole number"),
        ("jobs: [{prompt: p}]\nmatrix: {seed: 3}\n", "non-empty list"),
        ("rows: nope.csv\n", "CSV file not found"),
        ("jobs: [{prompt: p}]\nimage_base_url: ftp://x\n", "https:// URL"),
    ],
)
def test_structural_problems(tmp_path, text, needle):
    path = write(tmp_path / "m.yaml", text)
    result = asyncio.run(validate(path, simulate=True))
    assert any(needle in str(p) for p in result.problems), result.problems


def test_unknown_model_passes_inputs_through(imgs):
    path = write(imgs / "m.yaml", """
        model: someone/new-model v2
        jobs: [{prompt: p, anything: 3}]
    """)
    m, (spec,) = jobs_of(path)
    assert m.schema is None and spec.inputs == {"prompt": "p", "anything": 3}
    assert spec.model_id == "someone/new-model v2"


def test_schema_option_validates_another_model(imgs):
    import json

    schema = imgs / "s.json"
    schema.write_text(json.dumps({"model_id": "acme/i2v", "input": {
        "type": "object", "required": ["image_url"],
        "properties": {"image_url": {"type": "string", "format": "image_uri"},
                       "duration": {"type": "integer", "enum": [5, 10]}}}}))
    path = write(imgs / "m.yaml", "model: acme/i2v\njobs: [{image: a.jpg, duration: 7}]\n")
    result = asyncio.run(validate(path, schema=schema, simulate=True))
    assert [(p.field, "5, 10" in p.message) for p in result.problems] == [("duration", True)]
    m, (spec,) = jobs_of(path, schema_path=schema)
    assert spec.inputs["image_url"].startswith("file://")  # alias onto a single-URL field


def test_csv_manifest_directly(samples):
    m, specs = jobs_of(samples / "plain.csv")
    assert m.problems == [] and m.name == "plain" and len(specs) == 2


@pytest.mark.parametrize("name", ["quickstart.yaml", "street-scenes.yaml", "plain.csv"])
def test_every_sample_manifest_is_valid(samples, name):
    result = asyncio.run(validate(samples / name, simulate=True))
    assert result.problems == [] and result.jobs >= 2


def test_quickstart_has_six_jobs_with_a_matrix(samples):
    m, specs = jobs_of(samples / "quickstart.yaml")
    assert len(specs) >= 6 and m.matrix
