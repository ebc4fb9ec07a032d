"""Every rule of the Dreamina schema on both sides of its boundary, with real JPEG and PNG files
probed from disk, plus the JSON Schema part (required, types, lengths, enum, items)."""

from __future__ import annotations

import pytest
from imagefactory import make_image

from batchgen.constants import DEFAULT_MODEL
from batchgen.images import probe_file
from batchgen.schema import ModelSchema, bundled_schemas, find_schema

SCHEMA = find_schema(DEFAULT_MODEL)


def check_image(tmp_path, width, height, fmt="JPEG", nbytes=None):
    ext = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp"}[fmt]
    path = make_image(tmp_path / f"img-{width}x{height}-{nbytes}.{ext}", width, height, fmt, nbytes)
    ref = path.as_uri()
    inputs = {"prompt": "p", "image_urls": [ref]}
    return SCHEMA.check(inputs, {ref: probe_file(path)})


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize(
    ("width", "height", "ok", "needle"),
    [
        (321, 321, True, None),
        (320, 600, False, "320 pixels"),  # "> 320": exactly 320 is refused, whatever the message says
        (600, 320, False, "320 pixels"),
        (4096, 2000, True, None),
        (4097, 2000, False, "4096"),
        (2000, 4096, True, None),
        (2000, 4097, False, "4096"),
        (962, 321, True, None),  # width/height 2.997 < 3
        (963, 321, False, "3:1"),  # exactly 3
        (331, 1000, True, None),  # 0.331 > 0.33
        (330, 1000, False, "0.33"),  # exactly 0.33
    ],
)
def test_dimension_rules(tmp_path, fmt, width, height, ok, needle):
    problems = check_image(tmp_path, width, height, fmt)
    if ok:
        assert problems == []
    else:
        assert problems and all(field == "image_urls[0]" for field, _ in problems)
        assert any(needle in msg for _, msg in problems), problems


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize(("nbytes", "ok"), [(4_699_999, True), (4_700_000, False)])
def test_file_size_rule_uses_decimal_megabytes(tmp_path, fmt, nbytes, ok):
    problems = check_image(tmp_path, 400, 400, fmt, nbytes)
    if ok:
        assert problems == []
    else:
        (field, msg), = problems
        assert "4,700,000 bytes" in msg and "less than 4.7 MB" in msg


@pytest.mark.parametrize(("fmt", "ok"), [("JPEG", True), ("PNG", True), ("GIF", False), ("WEBP", False)])
def test_only_jpeg_and_png(tmp_path, fmt, ok):
    problems = check_image(tmp_path, 400, 400, fmt)
    assert (problems == []) is ok
    if not ok:
        assert "JPEG or PNG" in problems[0][1]


@pytest.mark.parametrize(
    ("inputs", "field", "needle"),
    [
        ({"image_urls": ["u"]}, "prompt", "is required"),
        ({"prompt": "x" * 801, "image_urls": ["u"]}, "prompt", "801 characters; at most 800"),
        ({"prompt": "p", "image_urls": []}, "image_urls", "at least 1"),
        ({"prompt": "p", "image_urls": ["u", "v"]}, "image_urls", "at most 1"),
        ({"prompt": "p", "image_urls": ["u"], "frames": 120}, "frames", "one of 121, 241, got 120"),
        ({"prompt": "p", "image_urls": ["u"], "seed": "lucky"}, "seed", "type integer"),
        ({"prompt": "p", "image_urls": ["u"], "colour": "red"}, "colour", "unknown field; allowed: prompt"),
    ],
)
def test_json_schema_rules(inputs, field, needle):
    problems = SCHEMA.check(inputs, {})
    assert any(f == field and needle in m for f, m in problems), problems


@pytest.mark.parametrize(
    "inputs",
    [
        {"prompt": "x" * 800, "image_urls": ["u"]},
        {"prompt": "p", "image_urls": ["u"], "frames": 241, "seed": 7},
    ],
)
def test_valid_inputs_pass(inputs):
    assert SCHEMA.check(inputs, {}) == []


def test_defaults_fill_optional_fields_only():
    filled = SCHEMA.apply_defaults({})
    assert filled == {"seed": -1, "frames": 121}  # not the example prompt or image


def test_image_fields_and_output_kind():
    assert SCHEMA.image_fields() == {"image_urls": True}
    assert SCHEMA.output_kind == "video"


def test_unknown_rule_is_reported_not_ignored(tmp_path):
    data = {
        "model_id": "x/y",
        "input": {"type": "object", "properties": {"image_url": {
            "type": "string", "format": "image_uri",
            "validations": [{"validation_rule": "dpi>", "validation_value": 72, "validation_error": "dpi"}],
        }}},
    }
    problems = ModelSchema(data).check({"image_url": "u"}, {})
    assert problems and "not understood" in problems[0][1]


def test_every_bundled_schema_loads():
    schemas = bundled_schemas()
    assert DEFAULT_MODEL in {s.model_id for s in schemas}
    for s in schemas:
        assert s.image_fields(), s.model_id


def test_probe_error_is_reported_on_the_field(tmp_path):
    problems = SCHEMA.check({"prompt": "p", "image_urls": ["https://h/x.jpg"]},
                            {"https://h/x.jpg": "image URL answered HTTP 404"})
    assert problems == [("image_urls[0]", "https://h/x.jpg: image URL answered HTTP 404")]
