"""Manifest expansion: defaults, jobs, CSV rows, matrix, repeat, aliases, templates, keys, and
problems that name file, row or line, and field — all of them at once. Pure: no network."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import local_ref
from imagefactory import make_image

from batchgen.constants import DEFAULT_MODEL
from batchgen.errors import ManifestError
from batchgen.manifest import JobSpec, is_loopback_host, job_key, load_manifest, render, template_names


def write(path, text):
    path.write_text(textwrap.dedent(text).lstrip("\n"))
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


def texts(m):
    return [str(p) for p in m.problems]


# ---- expansion --------------------------------------------------------------------------------


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
    assert m.problems == [] and m.name == "m" and m.model_id == DEFAULT_MODEL
    assert len(specs) == 2 * 2 * 2
    first = specs[0]
    assert isinstance(first, JobSpec) and first.batch == "m" and first.model_id == DEFAULT_MODEL
    assert first.inputs == {"prompt": "one", "seed": 5, "frames": 121,
                            "image_urls": [local_ref(imgs / "a.jpg")]}
    assert [s.inputs["frames"] for s in specs[:4]] == [121, 121, 241, 241]
    assert specs[4].inputs["seed"] == 9
    assert first.source == "m.yaml, line 3" and specs[4].source == "m.yaml, line 4"
    assert [s.seq for s in specs] == list(range(8))
    assert len({s.key for s in specs}) == 8
    assert first.meta == {"matrix": {"frames": 121}, "repeat": 0}
    assert specs[1].meta == {"matrix": {"frames": 121}, "repeat": 1}
    assert first.local_files == {first.inputs["image_urls"][0]: str((imgs / "a.jpg").resolve())}


def test_defaults_and_a_matrix_alone_are_one_job_times_the_matrix(imgs):
    # A seed sweep over one image needs no `jobs` list: the defaults are the job.
    path = write(imgs / "m.yaml", """
        defaults: {prompt: drift, image: a.jpg}
        matrix:
          seed: [1, 2, 3]
    """)
    m, specs = jobs_of(path)
    assert m.problems == []
    assert [s.inputs["seed"] for s in specs] == [1, 2, 3]
    assert all(s.inputs["prompt"] == "drift" for s in specs) and len({s.key for s in specs}) == 3
    assert specs[0].source == "m.yaml, line 2"  # where the matrix is written
    # Without a matrix, defaults alone are still no jobs (a manifest missing its list).
    path = write(imgs / "m.yaml", "defaults: {prompt: drift, image: a.jpg}\n")
    m, specs = jobs_of(path)
    assert specs == [] and texts(m) == ["m.yaml, field 'jobs': the manifest has no jobs: add a 'jobs' list, "
                                        "'rows: file.csv', or a 'matrix' over the defaults"]


def test_merge_order_schema_defaults_then_defaults_then_job_then_matrix(imgs):
    path = write(imgs / "m.yaml", """
        defaults: {frames: 241, seed: 1}
        jobs:
          - {prompt: p, image: a.jpg, seed: 2}
          - {prompt: q, image: a.jpg, frames: 121, seed: 3}
        matrix: {seed: [7]}
    """)
    _, specs = jobs_of(path)
    assert [(s.inputs["frames"], s.inputs["seed"]) for s in specs] == [(241, 7), (121, 7)]
    path = write(imgs / "n.yaml", "jobs: [{prompt: p, image: a.jpg}]\n")
    _, (spec,) = jobs_of(path)
    assert (spec.inputs["frames"], spec.inputs["seed"]) == (121, -1)  # the schema's, for optional fields only


def test_jobs_and_rows_together_in_order(imgs):
    write(imgs / "rows.csv", "prompt,image\nfrom csv,a.jpg\n")
    path = write(imgs / "m.yaml", """
        rows: rows.csv
        jobs: [{prompt: from yaml, image: b.png}]
    """)
    _, specs = jobs_of(path)
    assert [s.inputs["prompt"] for s in specs] == ["from yaml", "from csv"]
    assert [s.source for s in specs] == ["m.yaml, line 2", "rows.csv, row 2"]


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
    assert specs[0].inputs["frames"] == 241 and specs[1].inputs["frames"] == 121  # empty cell: not given
    assert specs[0].meta == {"_note": "keep", "subject": "fox"}
    assert specs[1].meta == {"subject": "owl"}
    assert "subject" not in specs[0].inputs and "_note" not in specs[0].inputs
    assert specs[0].source == "rows.csv, row 2" and specs[0].batch == "night-shift"


def test_csv_manifest_on_its_own_casts_by_schema_type(imgs):
    path = write(imgs / "plain.csv", """
        prompt,image,seed,frames
        "A quoted, comma prompt",a.jpg,-7,241

        second,b.png,,
    """)
    m, specs = jobs_of(path)
    assert m.problems == [] and m.name == "plain"
    assert specs[0].inputs["prompt"] == "A quoted, comma prompt"
    assert (specs[0].inputs["seed"], specs[0].inputs["frames"]) == (-7, 241)
    assert specs[1].source == "plain.csv, row 4"  # the blank line is skipped but counted


def test_an_integer_written_as_121_0_121_or_quoted_is_one_job(imgs):
    # Issue 18: pandas and spreadsheets write 121.0 for an integer column with blanks; YAML "121"
    # is text. Where the schema wants an integer, each is the integer 121, and one job (one key).
    write(imgs / "rows.csv", "prompt,image,seed,frames\np,a.jpg,7.0,121.0\np,a.jpg,7,121\n")
    csv_specs = jobs_of(write(imgs / "m.yaml", "rows: rows.csv\n"))[1]
    quoted = write(imgs / "q.yaml", 'jobs: [{prompt: p, image: a.jpg, seed: "7", frames: "121"}]\n')
    floats = write(imgs / "f.yaml", "jobs: [{prompt: p, image: a.jpg, seed: 7.0, frames: 121.0}]\n")
    plain = write(imgs / "p.yaml", "jobs: [{prompt: p, image: a.jpg, seed: 7, frames: 121}]\n")
    templated = write(imgs / "t.yaml",
                      'defaults: {n: 121}\njobs: [{prompt: p, image: a.jpg, seed: 7, frames: "{n}"}]\n')
    specs = [*csv_specs, *(jobs_of(p)[1][0] for p in (quoted, floats, plain, templated))]
    assert len(csv_specs) == 1  # the second row is the first one again
    assert all(s.inputs["frames"] == 121 and type(s.inputs["frames"]) is int for s in specs)
    assert all(type(s.inputs["seed"]) is int for s in specs)
    assert len({s.key for s in specs}) == 1


def test_a_fractional_cell_for_an_integer_is_an_error_naming_file_row_and_field(imgs):
    path = write(imgs / "rows.csv", "prompt,image,frames\np,a.jpg,121.5\np,a.jpg,1e400\n")
    m, specs = jobs_of(path)
    assert specs == []
    assert texts(m) == ["rows.csv, row 2, field 'frames': '121.5' is not a whole number",
                        "rows.csv, row 3, field 'frames': '1e400' is not a whole number"]


def test_csv_casts_numbers_booleans_and_lists(tmp_path):
    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"model_id": "acme/t2i", "input": {"type": "object", "properties": {
        "prompt": {"type": "string"}, "scale": {"type": "number"}, "hd": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}}, "steps": {"type": "integer"}}}}))
    path = write(tmp_path / "m.csv", """
        prompt,scale,hd,tags,steps
        a,1.5,yes,x|y,3
        b,lots,maybe,,3.5
    """)
    m, specs = jobs_of(path, schema_path=schema)
    assert specs[0].inputs == {"prompt": "a", "scale": 1.5, "hd": True, "tags": ["x", "y"], "steps": 3}
    assert len(specs) == 1  # the row with bad cells is not expanded
    assert texts(m) == [
        "m.csv, row 3, field 'scale': 'lots' is not a number",
        "m.csv, row 3, field 'hd': 'maybe' is not true or false",
        "m.csv, row 3, field 'steps': '3.5' is not a whole number",
    ]


def test_list_field_takes_several_urls_separated_by_bars(imgs):
    path = write(imgs / "m.csv", "prompt,image_urls\np,a.jpg|b.png\n")
    _, (spec,) = jobs_of(path)
    assert [u.partition("#")[0].rsplit("/", 1)[1] for u in spec.inputs["image_urls"]] == ["a.jpg", "b.png"]


def test_alias_onto_a_single_url_field(imgs):
    path = write(imgs / "m.yaml", """
        model: kling/kling-2-1/standard/image-to-video
        jobs: [{prompt: p, image: a.jpg}, {prompt: q, image_urls: [b.png]}]
    """)
    m, specs = jobs_of(path)
    assert m.problems == []
    assert [s.inputs["image_url"].partition("#")[0].rsplit("/", 1)[1] for s in specs] == ["a.jpg", "b.png"]
    assert specs[0].inputs["duration"] == 5


def test_the_same_image_twice_is_a_problem(imgs):
    path = write(imgs / "m.yaml", "jobs:\n  - {prompt: p, image: a.jpg, image_urls: [b.png]}\n")
    m, _ = jobs_of(path)
    assert "m.yaml, line 2, field 'image': the image is given twice (image, image_urls); use one" in texts(m)


def test_a_job_image_overrides_a_default_image(imgs):
    path = write(imgs / "m.yaml", """
        defaults: {image: a.jpg}
        jobs: [{prompt: p}, {prompt: q, image_url: b.png}]
    """)
    m, specs = jobs_of(path)
    assert m.problems == []
    assert [s.inputs["image_urls"][0].partition("#")[0].rsplit("/", 1)[1] for s in specs] == ["a.jpg", "b.png"]



def test_a_matrix_of_images_is_normalized_like_a_job(imgs):
    # The matrix is normalized only when it names an image: this is the case that must still be.
    path = write(imgs / "m.yaml", """
        jobs: [{prompt: p}]
        matrix: {image: [a.jpg, b.png], seed: [1, 2]}
    """)
    m, specs = jobs_of(path)
    assert m.problems == []
    assert [(s.inputs["image_urls"][0].partition("#")[0].rsplit("/", 1)[1], s.inputs["seed"]) for s in specs] == [
        ("a.jpg", 1), ("a.jpg", 2), ("b.png", 1), ("b.png", 2)]
    assert specs[0].meta["matrix"] == {"image": "a.jpg", "seed": 1}  # as written, for reports


def test_jobs_never_share_a_list(imgs):
    # Plain lists are not rendered (nothing to fill), but each job still gets its own copy.
    path = write(imgs / "m.yaml", """
        model: kling/kling-o1/image-to-video
        jobs: [{prompt: p, start_image_url: a.jpg, _notes: [one, two]}]
        repeat: 2
    """)
    m, specs = jobs_of(path)
    assert m.problems == []
    assert [s.meta["_notes"] for s in specs] == [["one", "two"]] * 2
    specs[0].meta["_notes"].append("three")
    assert specs[1].meta["_notes"] == ["one", "two"]

def test_rows_images_are_relative_to_their_csv(tmp_path):
    make_image(tmp_path / "data" / "pics" / "c.jpg", 640, 480)
    write(tmp_path / "data" / "rows.csv", "prompt,image\np,pics/c.jpg\n")
    path = write(tmp_path / "m.yaml", "rows: data/rows.csv\n")
    m, (spec,) = jobs_of(path)
    assert m.problems == [] and spec.source == "data/rows.csv, row 2"
    assert spec.inputs["image_urls"] == [local_ref(tmp_path / "data" / "pics" / "c.jpg")]


# ---- templates ----------------------------------------------------------------------------------


def test_template_helpers():
    assert render("{a} and {{literal}} {n:03d}", {"a": "x", "n": 7}) == "x and {literal} 007"
    assert template_names(["{a} {b}", "plain", 3]) == {"a", "b"}


def test_templates_use_matrix_variables_that_are_not_sent(imgs):
    path = write(imgs / "m.yaml", """
        defaults: {prompt: "{style} shot of a fox, seed {seed}, {{raw}}"}
        jobs: [{image: a.jpg, seed: 4}]
        matrix: {style: [noir, pastel]}
    """)
    m, specs = jobs_of(path)
    assert m.problems == []
    assert [s.inputs["prompt"] for s in specs] == ["noir shot of a fox, seed 4, {raw}",
                                                   "pastel shot of a fox, seed 4, {raw}"]
    assert "style" not in specs[0].inputs
    assert specs[0].meta == {"style": "noir", "matrix": {"style": "noir"}}


@pytest.mark.parametrize(
    ("prompt", "needle"),
    [
        ("{nope}", "m.yaml, line 2, field 'prompt': template uses {nope}, which no job defines; "
                   "defined: frames, image_urls, prompt, seed"),
        ("{a.b}", "m.yaml, line 2, field 'prompt': bad template field {a.b}: use a plain name"),
        ("{unclosed", "m.yaml, line 2, field 'prompt': bad template (expected '}' before end of string)"),
        ("{seed:zz}", "m.yaml, line 2, field 'prompt': template {seed:zz} cannot format -1"),
    ],
)
def test_template_problems_name_the_field_and_variable(imgs, prompt, needle):
    path = imgs / "m.yaml"
    path.write_text("jobs:\n  - " + json.dumps({"prompt": prompt, "image": "a.jpg"}) + "\n")
    m, specs = jobs_of(path)
    assert specs == []
    assert any(t.startswith(needle) for t in texts(m)), texts(m)


def test_a_default_template_missing_a_column_is_reported_once_at_the_template(imgs):
    write(imgs / "rows.csv", "image\na.jpg\nb.png\na.jpg\n")
    path = write(imgs / "m.yaml", """
        defaults: {prompt: "A {subject}"}
        rows: rows.csv
    """)
    m, specs = jobs_of(path)
    assert specs == []
    (problem,) = m.problems
    assert str(problem).startswith("m.yaml, line 1, field 'prompt': template uses {subject}, which no job defines")


@pytest.mark.parametrize(("template", "problem"), [
    ('prompt: "A {mod} fox"', "field 'prompt': template uses {mod}, which no job defines (did you mean 'mood'?); "
                              "defined: frames, image_urls, mood, prompt, seed"),
    # The name of the output files is a template like any other.
    ('output_name: "{mod}_{seed}"', "field 'output_name': template uses {mod}, which no job defines (did you mean "
                                    "'mood'?); defined: frames, image_urls, mood, output_name, seed"),
])
def test_a_template_typo_is_reported_at_the_template_once_with_a_suggestion(imgs, template, problem):
    # Issue 18: `{mod}` for `{mood}` is the template's fault, not any row's.
    write(imgs / "rows.csv", "image,mood\na.jpg,calm\nb.png,wild\na.jpg,dark\n")
    path = write(imgs / "m.yaml", f"""
        rows: rows.csv
        defaults:
          frames: 121
          {template}
    """)
    m, specs = jobs_of(path)
    assert specs == []
    assert texts(m) == [f"m.yaml, line 4, {problem}"]


def test_a_listed_job_without_a_column_the_rows_have_is_that_jobs_problem(imgs):
    # The rows define {mood}; the job listed before them does not: not a typo in the template.
    write(imgs / "rows.csv", "image,mood\na.jpg,calm\n")
    path = write(imgs / "m.yaml", """
        defaults: {prompt: "A {mood} fox"}
        jobs: [{image: b.png}]
        rows: rows.csv
    """)
    m, specs = jobs_of(path)
    assert [s.inputs["prompt"] for s in specs] == ["A calm fox"]
    (problem,) = m.problems
    assert str(problem).startswith("m.yaml, line 2, field 'prompt': template uses {mood}, which this job does not "
                                   "define")


def test_a_blank_cell_a_template_needs_is_still_the_rows_problem(imgs):
    # The column exists; one row leaves it blank: that row is where to look.
    write(imgs / "rows.csv", "image,mood\na.jpg,calm\nb.png,\n")
    path = write(imgs / "m.yaml", """
        rows: rows.csv
        defaults: {prompt: "A {mood} fox"}
    """)
    m, specs = jobs_of(path)
    assert [s.inputs["prompt"] for s in specs] == ["A calm fox"]
    (problem,) = m.problems
    assert str(problem).startswith("rows.csv, row 3, field 'prompt': template uses {mood}, which this job does not "
                                   "define")


# ---- keys ---------------------------------------------------------------------------------------


def test_keys_are_stable_and_default_insensitive(imgs):
    a = write(imgs / "a.yaml", "jobs: [{prompt: p, image: a.jpg}]\n")
    b = write(imgs / "b.yaml", "jobs: [{prompt: p, image_urls: [a.jpg], frames: 121, seed: -1}]\n")
    c = write(imgs / "c.yaml", "jobs: [{prompt: p, image: a.jpg}]\nrepeat: 2\n")
    d = write(imgs / "d.yaml", "defaults: {frames: 121}\njobs: [{prompt: p, image: a.jpg}]\n")
    ka = jobs_of(a)[1][0].key
    assert len(ka) == 16 and int(ka, 16) >= 0
    assert ka == jobs_of(a)[1][0].key == jobs_of(b)[1][0].key == jobs_of(d)[1][0].key
    ks = [s.key for s in jobs_of(c)[1]]
    assert ks[0] == ka and ks[1] != ka  # each repeat is its own job
    e = write(imgs / "e.yaml", "jobs: [{prompt: p, image: a.jpg, seed: 1}]\n")
    assert jobs_of(e)[1][0].key != ka


def test_keys_never_change_between_versions(tmp_path):
    # Keys already in users' stores must come out the same, or a grown manifest would submit
    # every job again. These were computed by batchgen before the key's JSON was hand-assembled.
    path = write(tmp_path / "pin.yaml", """
        model: bytedance/dreamina-3-0/pro/image-to-video
        defaults: {seed: 7}
        jobs:
          - prompt: "Un gato en la playa, atardecer — «cine» 🎬"
            image: "https://cdn.example.com/a b/cat.png"
            _note: x
          - {prompt: "plain", image_urls: ["https://cdn.example.com/1.png"], seed: -1, frames: 241}
        repeat: 2
    """)
    m, specs = jobs_of(path)
    assert m.problems == []
    assert [s.key for s in specs] == ["28fa78bc6e06ca3b", "a86d41dedbfdfe5f", "68543baf7a963e8b", "eb2b94d5421e2663"]
    assert json.loads(specs[0].inputs_json) == specs[0].inputs  # what is recorded is what is sent
    # jobkeys.job_key, from the inputs as sent (no local file here), is the same key.
    assert [job_key(s.model_id, s.inputs, s.meta.get("repeat", 0)) for s in specs] == [s.key for s in specs]


def test_the_store_needs_nothing_of_the_manifest():
    # Issue 19: job keys and their canonical JSON live in batchgen.jobkeys, apart from the
    # manifest's YAML and CSV reading.
    code = "import sys, batchgen.store; print(sorted(m for m in sys.modules if m.startswith('batchgen.manifest')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_key_follows_image_content_not_its_path_or_url(imgs, tmp_path):
    a = write(imgs / "a.yaml", "jobs: [{prompt: p, image: a.jpg}]\n")
    before = jobs_of(a)[1][0].key
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "renamed.jpg").write_bytes((imgs / "a.jpg").read_bytes())
    write(moved / "a.yaml", "image_base_url: https://cdn.example.com/x\njobs: [{prompt: p, image: renamed.jpg}]\n")
    assert jobs_of(moved / "a.yaml")[1][0].key == before
    make_image(imgs / "a.jpg", 641, 480)
    assert jobs_of(a)[1][0].key != before


def test_duplicates_collapse_keeping_the_first(imgs):
    path = write(imgs / "m.yaml", """
        jobs:
          - {prompt: p, image: a.jpg, _note: first}
          - {prompt: p, image: a.jpg, _note: second}
          - {prompt: other, image: a.jpg}
    """)
    m, specs = jobs_of(path)
    assert [s.meta.get("_note") for s in specs] == ["first", None] and m.duplicates == 1
    assert [s.seq for s in specs] == [0, 1]


# ---- images -------------------------------------------------------------------------------------


def test_image_base_url_publishes_local_files(imgs):
    make_image(imgs / "sub dir" / "my pic.jpg", 640, 480)
    path = write(imgs / "m.yaml", """
        image_base_url: https://cdn.example.com/in/
        jobs: [{prompt: p, image: a.jpg}, {prompt: q, image: "sub dir/my pic.jpg"}]
    """)
    m, specs = jobs_of(path)
    assert m.image_base_url == "https://cdn.example.com/in"
    assert specs[0].inputs["image_urls"] == ["https://cdn.example.com/in/a.jpg"]
    assert specs[0].local_files == {"https://cdn.example.com/in/a.jpg": str((imgs / "a.jpg").resolve())}
    assert specs[1].inputs["image_urls"] == ["https://cdn.example.com/in/sub%20dir/my%20pic.jpg"]


def test_image_base_url_cannot_publish_files_outside_the_folder(tmp_path):
    make_image(tmp_path / "outside.jpg", 640, 480)
    (tmp_path / "in").mkdir()
    path = write(tmp_path / "in" / "m.yaml", """
        image_base_url: https://cdn.example.com
        jobs: [{prompt: p, image: ../outside.jpg}]
    """)
    m, _ = jobs_of(path)
    assert any("outside the manifest's folder" in t and "line 2, field 'image_urls'" in t for t in texts(m))


@pytest.mark.parametrize(
    ("ref", "problem"),
    [
        ("https://cdn.example.com/a.jpg", None),
        ("http://127.0.0.1:8080/a.jpg", None),
        ("http://127.1.2.3/a.jpg", None),
        ("http://localhost/a.jpg", None),
        ("http://[::1]:9000/a.jpg", None),
        ("http://example.com/a.jpg", "plain http is allowed only for loopback addresses; use https://"),
        ("http://10.0.0.1/a.jpg", "plain http is allowed only for loopback"),
        ("ftp://example.com/a.jpg", "unsupported scheme 'ftp'"),
        ("missing.jpg", "local image not found: missing.jpg (looked for "),
    ],
)
def test_image_references(tmp_path, ref, problem):
    path = write(tmp_path / "m.yaml", f"jobs:\n  - {{prompt: p, image: '{ref}'}}\n")
    m, specs = jobs_of(path)
    if problem is None:
        assert m.problems == [] and specs[0].inputs["image_urls"] == [ref] and specs[0].local_files == {}
    else:
        (p,) = m.problems
        assert (p.file, p.location, p.field) == ("m.yaml", "line 2", "image_urls") and problem in p.message


def test_absolute_paths_and_file_uris(imgs, tmp_path):
    path = write(tmp_path / "elsewhere.yaml", f"""
        jobs:
          - {{prompt: p, image: '{imgs / "a.jpg"}'}}
          - {{prompt: q, image: '{(imgs / "b.png").as_uri()}'}}
    """)
    m, specs = jobs_of(path)
    assert m.problems == []
    assert [s.inputs["image_urls"][0] for s in specs] == [local_ref(imgs / "a.jpg"), local_ref(imgs / "b.png")]


def test_is_loopback_host():
    assert is_loopback_host("127.0.0.1") and is_loopback_host("::1") and is_loopback_host("LOCALHOST")
    assert not is_loopback_host("example.com") and not is_loopback_host(None) and not is_loopback_host("0.0.0.0")


# ---- problems -----------------------------------------------------------------------------------


def test_all_problems_at_once_with_locations(imgs):
    write(imgs / "rows.csv", "prompt,image,frames,promt\nok,a.jpg,,\nbad,missing.jpg,abc,x\nalso,a.jpg,,y\n")
    path = write(imgs / "m.yaml", """
        name: good
        colour: red
        defaults: {frames: 121, sede: 4}
        rows: rows.csv
        jobs:
          - {prompt: "{nope}", image: a.jpg}
          - {prompt: p, image: "http://example.com/x.jpg", size: big}
    """)
    m, _ = jobs_of(path)
    found = texts(m)
    for needle in [
        "m.yaml, line 2, field 'colour': unknown key; allowed: name, model, schema, "
        "image_base_url, defaults, jobs, rows, matrix, repeat",
        "m.yaml, line 3, field 'sede': unknown field 'sede' (did you mean 'seed'?); allowed: prompt, image_urls, "
        "seed, frames (or image / image_url for image_urls; or prefix it with _ to keep it as a note)",
        "m.yaml, line 6, field 'prompt': template uses {nope}, which no job defines",
        "m.yaml, line 7, field 'image_urls': http://example.com/x.jpg: plain http is allowed only for loopback",
        "m.yaml, line 7, field 'size': unknown field 'size'; allowed: prompt",
        "rows.csv, row 3, field 'frames': 'abc' is not a whole number",
        "rows.csv, row 3, field 'promt': unknown column 'promt' (did you mean 'prompt'?); allowed: prompt, "
        "image_urls, seed, frames (or image / image_url for image_urls; or prefix it with _ to keep it as a note)",
        "rows.csv, row 3, field 'image_urls': local image not found: missing.jpg",
    ]:
        assert sum(t.startswith(needle) for t in found) == 1, f"{needle!r} not once in\n" + "\n".join(found)
    assert len(found) == 8  # the defaults' typo and the CSV column once each, not per job or row


def test_iterating_twice_does_not_double_problems(imgs):
    path = write(imgs / "m.yaml", "jobs: [{prompt: p, image: missing.jpg}]\n")
    m = load_manifest(path)
    list(m.iter_jobs())
    list(m.iter_jobs())
    assert len(m.problems) == 1


def test_expansion_streams_rows(imgs):
    lines = ["prompt,image"] + [f"p{i},a.jpg" for i in range(1000)] + ["late,missing.jpg"]
    path = write(imgs / "m.csv", "\n".join(lines) + "\n")
    m = load_manifest(path)
    jobs = m.iter_jobs()
    assert next(jobs).inputs["prompt"] == "p0"
    assert m.problems == []  # the last row has not been read yet
    assert sum(1 for _ in jobs) == 1000  # the job with the missing image too: its other fields get checked
    assert texts(m) == [f"m.csv, row 1002, field 'image_urls': local image not found: missing.jpg "
                        f"(looked for {(imgs / 'missing.jpg').resolve()})"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("jobs: [\n  {prompt: p}\n", "m.yaml, line 3: not valid YAML"),
        ("- a\n- b\n", "m.yaml: the manifest must be a mapping of keys (name, model"),
        ("name: x\n", "m.yaml, field 'jobs': the manifest has no jobs"),
        ("name: 'a b'\njobs: []\n", "m.yaml, line 1, field 'name': batch name 'a b' is not allowed"),
        ("name: ../up\njobs: []\n", "batch name '../up' is not allowed"),
        ("jobs: [{prompt: p}]\nrepeat: 0\n", "m.yaml, line 2, field 'repeat': must be a whole number of at least 1"),
        ("jobs: [{prompt: p}]\nrepeat: two\n", "field 'repeat': must be a whole number of at least 1, got 'two'"),
        ("jobs: [{prompt: p}]\nmatrix: {seed: 3}\n", "m.yaml, line 2, field 'matrix.seed': must be a non-empty list"),
        ("jobs: [{prompt: p}]\nmatrix: [1, 2]\n", "field 'matrix': must be a mapping of field: [values, ...]"),
        ("rows: nope.csv\n", "m.yaml, line 1, field 'rows': CSV file not found: nope.csv"),
        ("rows: [a.csv]\n", "field 'rows': must be the path of a CSV file"),
        ("jobs: [{prompt: p}]\nimage_base_url: ftp://x\n", "field 'image_base_url': must be an https:// URL"),
        ("jobs: [{prompt: p}]\nimage_base_url: http://cdn.example.com\n", "must be https:// (plain http only for"),
        ("jobs: {prompt: p}\n", "m.yaml, line 1, field 'jobs': must be a list of jobs"),
        ("jobs:\n  - just text\n", "m.yaml, line 2, field 'jobs': job 1 must be a mapping of field: value"),
        ("defaults: [1]\njobs: []\n", "m.yaml, line 1, field 'defaults': must be a mapping of field: value"),
        ("model: 7\njobs: []\n", "field 'model': must be a model id such as"),
        ("jobs: []\nrepeat: 1\nrepeat: 2\n", "m.yaml, line 3, field 'repeat': appears twice (also on line 2)"),
        ("jobs: []\nrpeat: 2\n", "field 'rpeat': unknown key (did you mean 'repeat'?); allowed: name, model"),
        ("jobs:\n  - {prompt: p, prompt: q}\n", "field 'prompt': appears twice"),
        ("jobs: [{prompt: p, seed: .nan}]\n", "m.yaml, line 1, field 'seed': nan is not a number JSON can carry"),
        ("schema: none.json\njobs: []\n", "m.yaml, line 1, field 'schema': schema file not found: none.json"),
    ],
)
def test_structural_problems(tmp_path, text, needle):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    m, _ = jobs_of(path)
    assert any(t.startswith(needle) or needle in t for t in texts(m)), texts(m)


@pytest.mark.parametrize(
    ("csv_bytes", "needle"),
    [
        (b"", "m.csv: the CSV file is empty"),
        (b"prompt,prompt\na,b\n", "m.csv, row 1, field 'prompt': column appears twice"),
        (b"prompt\na,b\n", "m.csv, row 2: 2 cells but the header has 1 columns"),
        (b"prompt\nok\n\xff\xfe bad\n", "m.csv, line 3: not UTF-8 text (invalid start byte)"),
        (b"prompt,\na,stray\n", "m.csv, row 2: a column without a header holds values"),
    ],
)
def test_csv_problems(tmp_path, csv_bytes, needle):
    path = tmp_path / "m.csv"
    path.write_bytes(csv_bytes)
    m, _ = jobs_of(path)
    assert any(t.startswith(needle) for t in texts(m)), texts(m)


def test_excel_csv_with_byte_order_mark(imgs):
    (imgs / "m.csv").write_bytes(b"\xef\xbb\xbfprompt,image\r\nhello,a.jpg\r\n")
    m, (spec,) = jobs_of(imgs / "m.csv")
    assert m.problems == [] and spec.inputs["prompt"] == "hello"


def test_dates_stay_text(imgs):
    path = write(imgs / "m.yaml", "jobs: [{prompt: 2024-05-01, image: a.jpg}]\n")
    m, (spec,) = jobs_of(path)
    assert m.problems == [] and spec.inputs["prompt"] == "2024-05-01"


def test_missing_manifest_is_a_manifest_error(tmp_path):
    with pytest.raises(ManifestError, match="file not found"):
        load_manifest(tmp_path / "nope.yaml")
    (tmp_path / "m.txt").write_text("x")
    assert "unsupported manifest type '.txt'" in texts(load_manifest(tmp_path / "m.txt"))[0]


# ---- models and schemas -------------------------------------------------------------------------


def test_unknown_model_passes_inputs_through(imgs):
    path = write(imgs / "m.yaml", """
        model: someone/new-model v2
        jobs: [{prompt: "p {n}", n: 3, size: 1024x768, start_image: a.jpg}]
    """)
    m, (spec,) = jobs_of(path)
    assert m.schema is None and m.problems == []
    assert spec.inputs == {"prompt": "p 3", "n": 3, "size": "1024x768",
                           "start_image": local_ref(imgs / "a.jpg")}
    assert spec.model_id == "someone/new-model v2"


def test_schema_option_validates_another_model(imgs):
    schema = imgs / "s.json"
    schema.write_text(json.dumps({"model_id": "acme/i2v", "input": {
        "type": "object", "required": ["image_url"],
        "properties": {"image_url": {"type": "string", "format": "image_uri"},
                       "duration": {"type": "integer", "enum": [5, 10]}}}}))
    path = write(imgs / "m.yaml", "jobs: [{image: a.jpg, duration: 7}]\n")
    m, (spec,) = jobs_of(path, schema_path=schema)
    assert m.model_id == "acme/i2v"  # no model in the manifest: the schema's
    assert spec.inputs["image_url"].startswith("file://")  # alias onto a single-URL field
    in_file = write(imgs / "n.yaml", "schema: s.json\nmodel: acme/i2v\njobs: [{image: a.jpg}]\n")
    assert jobs_of(in_file)[0].schema.model_id == "acme/i2v"
    other = write(imgs / "o.yaml", "schema: s.json\nmodel: acme/other\njobs: [{image: a.jpg}]\n")
    assert "the schema file is for model 'acme/i2v' but the manifest's model is 'acme/other'" in texts(
        jobs_of(other)[0])[0]


def test_bad_schema_file_is_a_problem(imgs):
    (imgs / "s.json").write_text("{broken")
    path = write(imgs / "m.yaml", "schema: s.json\njobs: [{image: a.jpg}]\n")
    m, specs = jobs_of(path)
    assert specs == [] and "m.yaml, line 1, field 'schema': schema" in texts(m)[0] and "not valid JSON" in texts(m)[0]


def test_batch_name_override(imgs):
    path = write(imgs / "My Manifest!.yaml", "jobs: [{prompt: p, image: a.jpg}]\n")
    assert load_manifest(path).name == "My-Manifest"
    assert load_manifest(path, batch="nightly").name == "nightly"
    assert "batch name 'a/b' is not allowed" in texts(load_manifest(path, batch="a/b"))[0]


def test_problem_free_sample_manifests(samples):
    for name in ("quickstart.yaml", "street-scenes.yaml", "plain.csv", "named-outputs.yaml"):
        m, specs = jobs_of(samples / name)
        assert m.problems == [] and len(specs) >= 2, name
    m, specs = jobs_of(samples / "quickstart.yaml")
    assert len(specs) >= 6 and m.matrix


@pytest.mark.perf
def test_expands_100000_jobs_quickly(imgs):
    import time

    rows = ["subject,image,seed"] + [f"subject {i},{'a.jpg' if i % 2 else 'b.png'},{i}" for i in range(25_000)]
    (imgs / "rows.csv").write_text("\n".join(rows) + "\n")
    path = write(imgs / "m.yaml", """
        defaults: {prompt: "{style} shot of {subject}"}
        rows: rows.csv
        matrix: {frames: [121, 241], style: [Noir, Pastel]}
    """)
    start = time.perf_counter()
    m = load_manifest(path)
    count = sum(1 for _ in m.iter_jobs())
    elapsed = time.perf_counter() - start
    assert count == 100_000 and m.problems == []
    assert elapsed < 10, f"{elapsed:.1f} s for 100,000 jobs"


# ---- batch names and limits -------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "batchgen.sqlite3", "batchgen.toml", "batchgen.lock", "Batchgen.SQLite3", "batchgen.sqlite3-wal",
    "simulator-state.jsonl", "CON", "nul.txt", "com1", "night.",
])
def test_batch_names_that_cannot_be_a_folder_of_their_own_are_refused(imgs, name):
    path = write(imgs / "m.yaml", f"""
        name: "{name}"
        jobs: [{{prompt: p, image: a.jpg}}]
    """)
    m = load_manifest(path)
    assert [(p.location, p.field) for p in m.problems] == [("line 1", "name")], texts(m)
    assert f"batch name '{name}'" in texts(m)[0]
    other = load_manifest(write(imgs / "n.yaml", "jobs: [{prompt: p, image: a.jpg}]\n"), batch=name)
    assert [p.field for p in other.problems] == ["name"]


def test_a_batch_name_taken_by_a_file_of_the_work_directory(imgs):
    (imgs / "work").mkdir()
    (imgs / "work" / "notes.txt").write_text("mine")
    (imgs / "work" / "night").mkdir()  # a batch's own folder is fine
    for name, refused in (("night", False), ("notes.txt", True)):
        m = load_manifest(write(imgs / "m.yaml", f"name: {name}\njobs: [{{prompt: p, image: a.jpg}}]\n"))
        m.check_workdir(imgs / "work")
        assert bool(m.problems) == refused, texts(m)
    assert "m.yaml, line 1, field 'name': batch name 'notes.txt' is taken by the file" in texts(m)[0]


def _bounded(fn):
    """Run ``fn``; assert it took little time and memory (loosely: a shared, loaded machine)."""
    import time
    import tracemalloc

    tracemalloc.start()
    started = time.perf_counter()
    try:
        result = fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - started < 2
    assert peak < 100 * 1024 * 1024
    return result


HUNDRED = ",".join(map(str, range(100)))
THOUSAND_JOBS = ",".join(["{prompt: p, image: a.jpg}"] * 1001)


@pytest.mark.parametrize(("text", "needle"), [
    # Four 100-value lists: 10^8 combinations, and a thousand copies of each.
    ("""
        jobs: [{prompt: p, image: a.jpg}]
        matrix:
          seed: &s [HUNDRED]
          _a: *s
          _b: *s
          _c: *s
        repeat: 1000
     """.replace("HUNDRED", HUNDRED),
     "m.yaml, line 2, field 'matrix': the manifest expands to 100,000,000,000 jobs (100,000,000 matrix "
     "combinations (seed: 100, _a: 100, _b: 100, _c: 100) x repeat 1,000 for each job), over the limit of "
     "1,000,000; if you mean it, raise the limit with --max-expand N"),
    ("""
        jobs: [{prompt: p, image: a.jpg}]
        repeat: 1000000000000
     """, "m.yaml, line 2, field 'repeat': the manifest expands to 1,000,000,000,000 jobs (repeat "),
    # Neither alone is too much; together they are.
    ("""
        jobs: [JOBS]
        matrix: {seed: [HUNDRED, HUNDRED, HUNDRED, HUNDRED, HUNDRED, HUNDRED, HUNDRED, HUNDRED, HUNDRED, HUNDRED]}
     """.replace("JOBS", THOUSAND_JOBS).replace("HUNDRED", HUNDRED),
     "m.yaml, line 2, field 'matrix': the manifest expands to 1,001,000 jobs (1,001 jobs x 1,000 matrix"),
])
def test_matrix_and_repeat_are_counted_before_anything_is_expanded(imgs, text, needle):
    path = write(imgs / "m.yaml", text)
    m, specs = _bounded(lambda: jobs_of(path))
    assert specs == [] and len(m.problems) == 1 and texts(m)[0].startswith(needle), texts(m)


def test_max_expand_moves_the_limit_and_counts_exactly(imgs):
    path = write(imgs / "m.yaml", """
        jobs: [{prompt: p, image: a.jpg}, {prompt: q, image: a.jpg}]
        matrix: {seed: [1, 2, 3]}
        repeat: 2
    """)
    assert len(jobs_of(path, max_expand=12)[1]) == 12
    m, specs = jobs_of(path, max_expand=11)
    assert specs == [] and "expands to 12 jobs (2 jobs x 3 matrix combinations (seed: 3) x repeat 2)" in texts(m)[0]


def test_csv_rows_count_toward_the_limit(imgs):
    # A quoted cell over two lines and blank lines: 30 rows in 61 lines, counted exactly.
    rows = "".join(f'"a prompt\nof two lines {i}",a.jpg\n\n' for i in range(30))
    (imgs / "rows.csv").write_text("prompt,image\n" + rows)
    path = write(imgs / "m.yaml", "rows: rows.csv\nmatrix: {seed: [1, 2]}\n")
    assert len(jobs_of(path, max_expand=60)[1]) == 60
    m, specs = _bounded(lambda: jobs_of(path, max_expand=59))
    assert specs == [] and texts(m) == [
        "m.yaml, line 2, field 'matrix': the manifest expands to 60 jobs (30 CSV rows x 2 matrix combinations "
        "(seed: 2)), over the limit of 59; if you mean it, raise the limit with --max-expand N"]
    alone = jobs_of(imgs / "rows.csv", max_expand=29)[0]
    assert texts(alone) == ["rows.csv: the manifest expands to 30 jobs (30 CSV rows), over the limit of 29; "
                            "if you mean it, raise the limit with --max-expand N"]


def test_rows_added_while_expanding_still_stop_at_the_limit(imgs):
    (imgs / "rows.csv").write_text("prompt,image\np,a.jpg\n")
    m = load_manifest(imgs / "rows.csv", max_expand=3)
    (imgs / "rows.csv").write_text("prompt,image\n" + "".join(f"p{i},a.jpg\n" for i in range(10)))
    assert len(list(m.iter_jobs())) == 3
    assert texts(m) == ["rows.csv, row 5: the manifest expands to more than 3 jobs, over the limit of 3; "
                        "if you mean it, raise the limit with --max-expand N"]


BILLION_LAUGHS = """
    defaults:
      prompt: p
      image: a.jpg
      _a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]
      _b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
      _c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
      _d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
      _e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
      _f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
      _g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
      _h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
      _i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
    jobs: [{}]
"""


def test_billion_laughs_are_refused_before_any_value_is_built(imgs):
    path = write(imgs / "m.yaml", BILLION_LAUGHS)
    assert path.stat().st_size < 1024
    m, specs = _bounded(lambda: jobs_of(path))
    assert specs == [] and texts(m) == [
        "m.yaml, line 9: YAML aliases (*name) expand the file to 490,329,073 values from 37 written (this one "
        "alone to 597,871); at most 100,000 are allowed: write the values out, or use defaults, matrix or repeat"]


def test_ordinary_aliases_are_welcome(imgs):
    # Each job merges eleven defaults in: the file means six times the values it writes.
    notes = ", ".join(f"_n{i}: {i}" for i in range(10))
    jobs = "".join(f"  - {{<<: *base, prompt: p{i}}}\n" for i in range(12_000))
    path = imgs / "m.yaml"
    path.write_text(f"defaults: &base {{image: a.jpg, {notes}}}\njobs:\n" + jobs)
    m, specs = jobs_of(path)
    assert m.problems == [] and len(specs) == 12_000 and specs[-1].meta["_n9"] == 9


# ---- output_name: what the files are called -----------------------------------------------------


def test_output_name_from_defaults_a_job_or_a_column_is_no_input_and_no_part_of_the_key(imgs):
    write(imgs / "rows.csv", "image,subject,seed,output_name\na.jpg,red fox,1,\nb.png,owl,2,my/owl\n")
    path = write(imgs / "m.yaml", """
        defaults:
          prompt: "A {subject}"
          output_name: "{subject}_{seed}_{frames}"
        jobs:
          - {image: a.jpg, subject: hare, seed: 3, output_name: "hare {seed:03d}"}
          - {image: a.jpg, subject: lynx, seed: 4}
        rows: rows.csv
    """)
    m, specs = jobs_of(path)
    assert m.problems == []
    # Made safe (whitespace, a path separator); the model's default frames count as a variable.
    assert [s.output_name for s in specs] == ["hare_003", "lynx_4_121", "red_fox_1_121", "my_owl"]
    assert all("output_name" not in s.inputs and "output_name" not in s.meta for s in specs)
    # The same jobs without names have the same keys: a name never makes a job new.
    plain = write(imgs / "plain.yaml", path.read_text().replace("output_name", "_unused_note"))
    write(imgs / "rows.csv", "image,subject,seed,_unused_note\na.jpg,red fox,1,\nb.png,owl,2,my/owl\n")
    _, unnamed = jobs_of(plain)
    assert [s.key for s in unnamed] == [s.key for s in specs]
    assert [s.output_name for s in unnamed] == [None] * 4


def test_a_column_used_only_by_output_name_is_a_note_not_an_unknown_column(imgs):
    write(imgs / "rows.csv", "image,shot\na.jpg,wide\nb.png,close\n")
    path = write(imgs / "m.yaml", """
        defaults: {prompt: "A fox", output_name: "fox_{shot}"}
        rows: rows.csv
    """)
    m, specs = jobs_of(path)
    assert m.problems == []
    assert [(s.output_name, s.meta) for s in specs] == [("fox_wide", {"shot": "wide"}),
                                                        ("fox_close", {"shot": "close"})]


def test_an_output_name_that_is_no_text_is_a_problem_where_it_is_written(imgs):
    path = write(imgs / "m.yaml", """
        jobs:
          - {prompt: a, image: a.jpg, output_name: [x, y]}
          - {prompt: b, image: a.jpg, output_name: 42}
    """)
    m, specs = jobs_of(path)
    assert texts(m) == ["m.yaml, line 2, field 'output_name': must be a text such as \"{subject}_{seed}\" "
                        "(the name of the job's output files, without extension)"]
    assert [s.output_name for s in specs] == ["42"]


def test_an_output_name_at_the_top_level_says_where_it_belongs(imgs):
    path = write(imgs / "m.yaml", """
        output_name: "{seed}"
        jobs: [{prompt: a, image: a.jpg}]
    """)
    assert texts(load_manifest(path)) == ["m.yaml, line 1, field 'output_name': output_name is a job's value: put it "
                                          "under defaults (every job), in a job, or in a CSV column"]


def test_an_output_name_with_nothing_usable_leaves_the_job_named_by_its_key(imgs):
    path = write(imgs / "m.yaml", """
        defaults: {output_name: "{_tag}"}
        jobs:
          - {prompt: a, image: a.jpg, _tag: "..."}
          - {prompt: b, image: a.jpg, _tag: ""}
    """)
    m, specs = jobs_of(path)
    assert m.problems == [] and [s.output_name for s in specs] == [None, None]
