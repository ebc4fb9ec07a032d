"""Validation end to end: manifests with real image files on disk and on a loopback image host,
every problem at once, each distinct image probed once, and every sample manifest valid."""

from __future__ import annotations

import hashlib
import json
import textwrap

import pytest
from aiohttp import web
from conftest import SAMPLES, loopback
from imagefactory import image_bytes, make_image

from batchgen.images import ImageProber
from batchgen.manifest import load_manifest
from batchgen.validate import ValidationResult, validate_manifest


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


async def check(path, **kw) -> ValidationResult:
    return await validate_manifest(load_manifest(path), **kw)


def texts(result):
    return [str(p) for p in result.problems]


@pytest.fixture
async def host():
    """A loopback image host; ``host.gets`` counts GETs per path."""
    files: dict[str, bytes] = {}
    gets: dict[str, int] = {}

    async def handler(request):
        name = request.match_info["name"]
        gets[name] = gets.get(name, 0) + 1
        assert "Authorization" not in request.headers
        if name not in files:
            return web.Response(status=404)
        data = files[name]
        end = min(int(request.headers["Range"].rpartition("-")[2]), len(data) - 1)
        return web.Response(status=206, body=data[:end + 1], content_type="image/jpeg",
                            headers={"Content-Range": f"bytes 0-{end}/{len(data)}"})

    app = web.Application()
    app.router.add_get("/{name}", handler)
    async with loopback(app) as root:

        class Host:
            url = root

        Host.files, Host.gets = files, gets
        yield Host


# ---- the samples --------------------------------------------------------------------------------


def _sample_manifests():
    rows = set()
    for y in SAMPLES.glob("*.yaml"):
        rows |= {line.split(":", 1)[1].strip() for line in y.read_text().splitlines() if line.startswith("rows:")}
    names = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".yaml", ".yml", ".csv") and p.name not in rows)
    assert {"quickstart.yaml", "street-scenes.yaml"} <= set(names)
    return names


@pytest.mark.parametrize("name", _sample_manifests())
async def test_every_sample_manifest_is_valid(samples, name):
    result = await check(samples / name)
    assert result.problems == [] and result.jobs >= 2 and result.schema is not None


async def test_quickstart_has_six_jobs_from_a_matrix_on_small_local_images(samples):
    result = await check(samples / "quickstart.yaml")
    assert result.jobs >= 6 and load_manifest(samples / "quickstart.yaml").matrix
    for image in (samples / "images").iterdir():
        assert image.stat().st_size < 50_000


async def test_street_scenes_uses_rows_and_a_prompt_template(samples):
    m = load_manifest(samples / "street-scenes.yaml")
    specs = list(m.iter_jobs())
    assert m.problems == [] and len(specs) >= 4
    assert all(s.source.startswith("street-scenes.csv, row ") for s in specs)
    assert all("{" not in s.inputs["prompt"] and "subject" in s.meta for s in specs)


# ---- local files and the real API ---------------------------------------------------------------


async def test_local_files_need_no_image_base_url(tmp_path):
    """They go inline as data: URIs; the store keeps the file's path and what it was."""
    image = make_image(tmp_path / "a.jpg", 640, 480)
    path = write(tmp_path / "m.yaml", """
        jobs:
          - {prompt: one, image: a.jpg}
          - {prompt: two, image: a.jpg}
    """)
    seen = []
    assert (await check(path, collect=seen.append)).problems == []
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    size = image.stat().st_size
    assert seen[0].inputs["image_urls"] == [f"{image.resolve().as_uri()}#sha256={digest}&size={size}&type=image/jpeg"]


async def test_published_local_files_are_checked_on_disk_and_at_their_url(tmp_path, host):
    make_image(tmp_path / "small.jpg", 320, 480)
    make_image(tmp_path / "ok.jpg", 640, 480)
    host.files["small.jpg"] = (tmp_path / "small.jpg").read_bytes()
    host.files["ok.jpg"] = (tmp_path / "ok.jpg").read_bytes()
    path = write(tmp_path / "p.yaml", f"""
        image_base_url: {host.url}
        jobs: [{{prompt: one, image: small.jpg}}, {{prompt: two, image: ok.jpg}}]
    """)
    (problem,) = (await check(path)).problems
    assert (problem.location, problem.field) == ("line 2", "image_urls[0]")
    assert problem.message.startswith("image is 320x480; The shortest side must be at least 320 pixels")
    assert host.gets == {"small.jpg": 1, "ok.jpg": 1}


async def test_a_wrong_image_base_url_is_caught(tmp_path, host):
    make_image(tmp_path / "a.jpg", 640, 480)
    make_image(tmp_path / "b.jpg", 800, 600)
    host.files["b.jpg"] = image_bytes(640, 480)  # another image under the same name
    for base, message in [
        (f"{host.url}/wrong", f"{host.url}/wrong/a.jpg: published copy of {(tmp_path / 'a.jpg').resolve()}: "
                              "image URL answered HTTP 404; is image_base_url right?"),
        (host.url, f"{host.url}/b.jpg: not the same image as {(tmp_path / 'b.jpg').resolve()} (published: "
                   f"JPEG 640x480, {len(host.files['b.jpg']):,} bytes; local: JPEG 800x600, "
                   f"{(tmp_path / 'b.jpg').stat().st_size:,} bytes); is image_base_url right?"),
    ]:
        image = "a.jpg" if "wrong" in base else "b.jpg"
        path = write(tmp_path / "p.yaml", f"image_base_url: {base}\njobs: [{{prompt: one, image: {image}}}]\n")
        (problem,) = (await check(path)).problems
        assert (problem.field, problem.message) == ("image_urls[0]", message)


# ---- every Dreamina rule through a manifest ---------------------------------------------------------


async def test_every_rule_reported_on_its_row(tmp_path):
    cases = [  # (file, width, height, format, bytes or None, expected start of the message or None)
        ("ok.jpg", 640, 480, "JPEG", None, None),
        ("ok.png", 480, 640, "PNG", None, None),
        ("edge-ok.jpg", 321, 321, "JPEG", None, None),
        ("narrow.png", 320, 600, "PNG", None, "image is 320x600; The shortest side"),
        ("wide.jpg", 4097, 2000, "JPEG", None, "image is 4097x2000; Maximum resolution"),
        ("ratio3.png", 963, 321, "PNG", None, "image is 963x321 (width/height 3)"),
        ("ratio033.jpg", 330, 1000, "JPEG", None, "image is 330x1000 (width/height 0.33)"),
        ("heavy.jpg", 400, 400, "JPEG", 4_700_000, "image is 4,700,000 bytes"),
        ("light.png", 400, 400, "PNG", 4_699_999, None),
        ("anim.gif", 400, 400, "GIF", None, "image is GIF; Upload JPEG or PNG only"),
        ("modern.webp", 400, 400, "WEBP", None, "image is WEBP"),
    ]
    for name, w, h, fmt, nbytes, _ in cases:
        make_image(tmp_path / "img" / name, w, h, fmt, nbytes)
    rows = "prompt,image\n" + "".join(f"shot {i},img/{c[0]}\n" for i, c in enumerate(cases))
    write(tmp_path / "rows.csv", rows)
    result = await check(write(tmp_path / "m.yaml", "rows: rows.csv\n"))
    expected = [(f"row {i + 2}", c[5]) for i, c in enumerate(cases) if c[5]]
    got = [(p.location, p.message) for p in result.problems]
    assert [loc for loc, _ in got] == [loc for loc, _ in expected], texts(result)
    for (_, message), (_, start) in zip(got, expected, strict=True):
        assert message.startswith(start), message
    assert all(p.file == "rows.csv" and p.field == "image_urls[0]" for p in result.problems)
    assert result.jobs == len(cases)


async def test_every_problem_of_every_job_at_once_in_row_order(tmp_path):
    make_image(tmp_path / "a.jpg", 640, 480)
    make_image(tmp_path / "tiny.png", 100, 100, "PNG")
    write(tmp_path / "rows.csv", textwrap.dedent("""
        subject,image,frames,seed
        fox,a.jpg,121,1
        owl,a.jpg,120,2
        cat,tiny.png,241,x
        dog,a.jpg|a.jpg,,
    """).lstrip())
    path = write(tmp_path / "m.yaml", """
        defaults: {prompt: "A {subject} at dusk"}
        rows: rows.csv
        jobs:
          - {prompt: "%s", image: a.jpg}
    """ % ("x" * 801))
    result = await check(path)
    assert texts(result) == [
        "m.yaml, line 4, field 'prompt': is 801 characters; at most 800 allowed",
        "rows.csv, row 3, field 'frames': must be one of 121, 241, got 120",
        "rows.csv, row 4, field 'seed': 'x' is not a whole number",
        "rows.csv, row 5, field 'image_urls': has 2 item(s); at most 1 allowed",
    ]
    assert result.jobs == 4  # the row whose seed did not cast is not a job


async def test_a_batch_of_small_images_gets_one_problem_per_image(tmp_path):
    # Issue 18: a 300x300 image fails "width > 320" and "height > 320", which the schema words
    # alike ("The shortest side must be at least 320 pixels"): one problem, not two near copies.
    for i in range(3):
        make_image(tmp_path / f"s{i}.jpg", 300, 300)
    make_image(tmp_path / "huge.png", 5000, 5000, "PNG")
    rows = "prompt,image\n" + "".join(f"p{i},s{i}.jpg\n" for i in range(3)) + "p,huge.png\nagain,s0.jpg\n"
    write(tmp_path / "rows.csv", rows)
    result = await check(write(tmp_path / "m.yaml", "rows: rows.csv\n"))
    assert texts(result) == [
        *(f"rows.csv, row {i + 2}, field 'image_urls[0]': image is 300x300; The shortest side must be at least "
          "320 pixels (allowed: width greater than 320 pixels and height greater than 320 pixels)" for i in range(3)),
        "rows.csv, row 5, field 'image_urls[0]': image is 5000x5000; Maximum resolution is 4096x4096 "
        "(allowed: width at most 4096 pixels and height at most 4096 pixels)",
        "rows.csv, row 6, field 'image_urls[0]': image is 300x300; The shortest side must be at least "
        "320 pixels (allowed: width greater than 320 pixels and height greater than 320 pixels)",
    ]


async def test_a_yaml_number_in_quotes_is_checked_as_the_number_and_a_bad_one_named_once(tmp_path):
    # Issue 18: YAML "121" is the integer 121, as a CSV cell is; "121.5" is one problem with its
    # file, line, field and what is allowed (not a type error beside the list of allowed values).
    make_image(tmp_path / "a.jpg", 640, 480)
    path = write(tmp_path / "m.yaml", """
        jobs:
          - {prompt: p, image: a.jpg, frames: "121", seed: "5"}
          - {prompt: q, image: a.jpg, frames: "121.5"}
    """)
    result = await check(path)
    assert texts(result) == ["m.yaml, line 3, field 'frames': must be one of 121, 241, got \"121.5\""]
    assert result.jobs == 2


async def test_row_problems_from_manifest_and_schema_together(tmp_path):
    make_image(tmp_path / "tiny.png", 100, 100, "PNG")
    write(tmp_path / "rows.csv", "prompt,image,frames\nok,tiny.png,120\n")
    result = await check(write(tmp_path / "m.yaml", "rows: rows.csv\nmatrix: {seed: [1, 2, 3]}\n"))
    # In the form's order: the image (its width and height rules say one thing), then frames.
    assert [(p.location, p.field) for p in result.problems] == [("row 2", "image_urls[0]"), ("row 2", "frames")]
    assert result.jobs == 3  # matrix copies share their row's problems, reported once


# ---- remote images ----------------------------------------------------------------------------------


async def test_remote_images_probed_once_each(tmp_path, host):
    host.files["good.jpg"] = image_bytes(640, 480)
    host.files["small.jpg"] = image_bytes(300, 300)
    rows = "prompt,image_url\n" + "".join(
        f"p{i},{host.url}/{['good.jpg', 'small.jpg', 'gone.jpg'][i % 3]}\n" for i in range(30))
    write(tmp_path / "rows.csv", rows)
    path = write(tmp_path / "m.yaml", "rows: rows.csv\nmatrix: {frames: [121, 241]}\n")
    async with ImageProber(concurrency=2) as prober:
        result = await validate_manifest(load_manifest(path), prober=prober)
    assert host.gets == {"good.jpg": 1, "small.jpg": 1, "gone.jpg": 1}
    assert result.jobs == 60
    by_row = {}
    for p in result.problems:
        by_row.setdefault(p.location, []).append(p.message)
    assert len(by_row) == 20  # rows 3, 4, 6, 7, ...: the small and the missing image
    assert by_row["row 3"][0].startswith("image is 300x300; The shortest side must be at least 320 pixels")
    assert by_row["row 4"] == [f"{host.url}/gone.jpg: image URL answered HTTP 404"]


async def test_a_model_without_schema_is_refused_unless_no_schema_and_still_probes_images(tmp_path, host):
    host.files["a.jpg"] = image_bytes(640, 480)
    path = write(tmp_path / "m.yaml", f"""
        model: someone/new-model
        jobs:
          - {{prompt: p, start_image_url: "{host.url}/a.jpg", size: huge}}
          - {{prompt: q, start_image_url: "{host.url}/missing.jpg"}}
    """)
    missing = f"m.yaml, line 4, field 'start_image_url': {host.url}/missing.jpg: image URL answered HTTP 404"
    refused = await check(path)
    assert texts(refused)[0].startswith("m.yaml, line 1, field 'model': unknown model 'someone/new-model'")
    assert texts(refused)[1:] == [missing]
    result = await check(path, no_schema=True)
    assert result.schema is None and result.jobs == 2
    assert texts(result) == [missing]


# ---- schemas ----------------------------------------------------------------------------------------


async def test_schema_path_and_unknown_rules_reported_once(tmp_path):
    make_image(tmp_path / "a.jpg", 640, 480)
    schema = tmp_path / "acme.json"
    schema.write_text(json.dumps({"model_id": "acme/i2v", "input": {"type": "object", "properties": {
        "img": {"type": "string", "format": "image_uri", "validations": [
            {"validation_rule": "dpi>=", "validation_value": 72, "validation_error": "72 dpi"},
            {"validation_rule": "width_pixels<=", "validation_value": 600, "validation_error": "Too wide."}]}}}}))
    path = write(tmp_path / "m.yaml", "model: acme/i2v\njobs: [{img: a.jpg}, {img: a.jpg, _n: 2}]\nrepeat: 3\n")
    result = await validate_manifest(load_manifest(path), schema_path=schema)
    assert result.schema.model_id == "acme/i2v" and result.jobs == 3 and result.duplicates == 3
    assert texts(result) == [
        "acme.json, field 'img': schema acme/i2v: rule 'dpi>=' is not understood by batchgen (known subjects: "
        "file_size_mb, width_pixels, height_pixels, width/height, file_type; operators: <=, >=, ==, <, >, _in); "
        "update batchgen or remove the rule from the schema",
        "m.yaml, line 2, field 'img': image is 640x480; Too wide (allowed: width at most 600 pixels)",
    ]


async def test_a_bad_schema_path_is_a_problem_not_a_crash(tmp_path):
    make_image(tmp_path / "a.jpg", 640, 480)
    (tmp_path / "bad.json").write_text("[]")
    path = write(tmp_path / "m.yaml", "jobs: [{prompt: p, image: a.jpg}]\n")
    result = await validate_manifest(load_manifest(path), schema_path=tmp_path / "bad.json")
    assert result.jobs == 0 and "no 'input' object" in texts(result)[0]


# ---- robustness -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("m.yaml", b"\x00\x01\x02 binary"),
        ("m.yaml", b"\xff\xfe not utf-8"),
        ("m.yaml", b"jobs: &x [*x]\n"),
        ("m.yaml", b"jobs:\n  - {prompt: &p [*p], image: a.jpg}\n"),
        ("m.csv", b"prompt\n\"unclosed\n"),
        ("m.csv", b"\x00,\x00\n\x00,\x00\n"),
        ("m.yaml", b"jobs: [{prompt: {nested: [1, {deep: true}]}, image: [[a.jpg]]}]\n"),
        ("m.yaml", b"matrix: {seed: [[1], {a: 2}]}\njobs: [{prompt: p, image: 12}]\n"),
    ],
)
async def test_never_a_traceback(tmp_path, name, content):
    make_image(tmp_path / "a.jpg", 640, 480)
    (tmp_path / name).write_bytes(content)
    result = await check(tmp_path / name)
    assert isinstance(result, ValidationResult)
    assert result.problems, "garbage must not pass"


async def test_collect_sees_every_job_once(tmp_path):
    make_image(tmp_path / "a.jpg", 640, 480)
    path = write(tmp_path / "m.yaml", "jobs: [{prompt: p, image: a.jpg}, {prompt: p, image: a.jpg}]\n"
                                      "matrix: {seed: [1, 2]}\n")
    seen = []
    result = await validate_manifest(load_manifest(path), collect=seen.append)
    assert [s.inputs["seed"] for s in seen] == [1, 2] and result.jobs == 2 and result.duplicates == 2
