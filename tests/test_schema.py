"""Every rule of the Dreamina schema on both sides of its boundary, with real JPEG and PNG files
probed from disk, plus the JSON Schema part (required, types, lengths, enum, items), the rule
parser, and finding schemas."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from decimal import Decimal
from fractions import Fraction

import jsonschema
import pytest
from imagefactory import EXTENSIONS, make_image

from batchgen.constants import DEFAULT_MODEL
from batchgen.images import ImageInfo, probe_file
from batchgen.schema import (
    ModelSchema,
    SchemaError,
    bundled_schemas,
    find_schema,
    model_filename,
    parse_rule,
    quick_test,
)

SCHEMA = find_schema(DEFAULT_MODEL)
assert SCHEMA is not None


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("images")


def check_image(folder, width, height, fmt="JPEG", nbytes=None):
    """Write a real image, probe it from disk as validation does, check it as Dreamina's input."""
    path = make_image(folder / f"{width}x{height}-{nbytes}.{EXTENSIONS[fmt]}", width, height, fmt, nbytes)
    ref = path.as_uri()
    info = probe_file(path)
    assert (info.width, info.height) == (width, height)
    return SCHEMA.check({"prompt": "p", "image_urls": [ref]}, {ref: info})


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize(
    ("width", "height", "needle"),
    [
        (321, 321, None),
        # "width_pixels> 320": exactly 320 is refused, although the message says "at least 320".
        (320, 600, "image is 320x600; The shortest side must be at least 320 pixels (allowed: width greater than 320"),
        (600, 320, "image is 600x320; The shortest side must be at least 320 pixels (allowed: height greater than 320"),
        (4096, 2000, None),
        (4097, 2000, "image is 4097x2000; Maximum resolution is 4096x4096 (allowed: width at most 4096 pixels)"),
        (2000, 4096, None),
        (2000, 4097, "image is 2000x4097; Maximum resolution is 4096x4096 (allowed: height at most 4096 pixels)"),
        (962, 321, None),  # width/height = 2.9969 < 3
        (963, 321, "(width/height 3); The ratio of long side to short side must be within 3:1 "
                   "(allowed: width/height less than 3)"),  # exactly 3
        (331, 1000, None),  # 0.331 > 0.33
        (330, 1000, "(width/height 0.33); The ratio of long side to short side must be greater than 0.33 "
                    "(allowed: width/height greater than 0.33)"),  # exactly 0.33
    ],
)
def test_dimension_rules(image_dir, fmt, width, height, needle):
    problems = check_image(image_dir, width, height, fmt)
    if needle is None:
        assert problems == []
    else:
        (field, message), = problems
        assert field == "image_urls[0]" and needle in message, message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_file_size_rule_uses_decimal_megabytes(image_dir, fmt):
    assert check_image(image_dir, 400, 400, fmt, 4_699_999) == []
    assert check_image(image_dir, 400, 400, fmt, 4_700_000) == [(
        "image_urls[0]",
        "image is 4,700,000 bytes; File size must be less than 4.7 MB "
        "(allowed: less than 4,700,000 bytes; 1 MB = 1,000,000 bytes)",
    )]


@pytest.mark.parametrize(("fmt", "ok"), [("JPEG", True), ("PNG", True), ("GIF", False), ("WEBP", False)])
def test_only_jpeg_and_png(image_dir, fmt, ok):
    problems = check_image(image_dir, 400, 400, fmt)
    if ok:
        assert problems == []
    else:
        assert problems == [("image_urls[0]", f"image is {fmt}; Upload JPEG or PNG only (allowed: one of JPEG, PNG)")]


def test_every_failing_rule_of_one_image_is_reported():
    info = ImageInfo("gif", 5000, 300, 9_000_000)
    messages = [m for _, m in SCHEMA.check({"prompt": "p", "image_urls": ["u"]}, {"u": info})]
    assert len(messages) == 5  # type, size, width, height, ratio
    assert messages[0].startswith("image is GIF")


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ({"image_urls": ["u"]}, ("prompt", "is required: text, at most 800 characters")),
        ({"prompt": "p"}, ("image_urls", "is required: a list of exactly 1 image URL(s) (Upload JPEG or PNG only)")),
        ({"prompt": "x" * 801, "image_urls": ["u"]}, ("prompt", "is 801 characters; at most 800 allowed")),
        ({"prompt": "p", "image_urls": []}, ("image_urls", "has 0 item(s); at least 1 required")),
        ({"prompt": "p", "image_urls": ["u", "v"]}, ("image_urls", "has 2 item(s); at most 1 allowed")),
        ({"prompt": "p", "image_urls": "u"}, ("image_urls", 'must be of type array (a list), got "u"')),
        ({"prompt": "p", "image_urls": [7]}, ("image_urls[0]", "must be of type string (text), got 7")),
        ({"prompt": "p", "image_urls": ["u"], "frames": 120}, ("frames", "must be one of 121, 241, got 120")),
        ({"prompt": "p", "image_urls": ["u"], "frames": "121"}, ("frames", 'must be one of 121, 241, got "121"')),
        ({"prompt": "p", "image_urls": ["u"], "seed": "lucky"},
         ("seed", 'must be of type integer (a whole number), got "lucky"')),
        ({"prompt": "p", "image_urls": ["u"], "seed": 1.5},
         ("seed", "must be of type integer (a whole number), got 1.5")),
        ({"prompt": "p", "image_urls": ["u"], "seed": True},
         ("seed", "must be of type integer (a whole number), got true")),
        ({"prompt": "p", "image_urls": ["u"], "colour": "red"},
         ("colour", "unknown field; allowed: prompt, image_urls, seed, frames")),
    ],
)
def test_json_schema_rules(inputs, expected):
    assert expected in SCHEMA.check(inputs, {})


@pytest.mark.parametrize(
    "inputs",
    [
        {"prompt": "x" * 800, "image_urls": ["u"]},
        {"prompt": "p", "image_urls": ["u"], "frames": 121, "seed": -1},
        {"prompt": "p", "image_urls": ["u"], "frames": 241, "seed": 7},
    ],
)
def test_valid_inputs_pass(inputs):
    assert SCHEMA.check(inputs, {}) == []


def test_all_problems_of_a_job_at_once_in_field_order():
    problems = SCHEMA.check({"seed": "x", "frames": 3, "prompt": "y" * 900, "zz": 1}, {})
    assert [f for f, _ in problems] == ["prompt", "image_urls", "seed", "frames", "zz"]


def test_defaults_fill_optional_fields_only():
    assert SCHEMA.apply_defaults({}) == {"seed": -1, "frames": 121}  # not the example prompt or image
    assert SCHEMA.apply_defaults({"frames": 241}) == {"seed": -1, "frames": 241}


def test_image_fields_and_output_kind():
    assert SCHEMA.image_fields() == {"image_urls": True}
    assert SCHEMA.output_kind == "video"
    assert SCHEMA.model_id == DEFAULT_MODEL and SCHEMA.input_schema["required"] == ["prompt", "image_urls"]


def test_probe_error_is_reported_on_the_field():
    problems = SCHEMA.check({"prompt": "p", "image_urls": ["https://h/x.jpg"]},
                            {"https://h/x.jpg": "image URL answered HTTP 404"})
    assert problems == [("image_urls[0]", "https://h/x.jpg: image URL answered HTTP 404")]


# ---- rules read from any schema --------------------------------------------------------------


def schema_with(rules, fmt="image_uri", **extra):
    prop = {"type": "string", "format": fmt, "validations": [
        {"validation_rule": r, "validation_value": v, "validation_error": f"{r} {v}"} for r, v in rules]}
    return ModelSchema({"model_id": "acme/x-to-image", "input": {"type": "object", "properties": {"img": prop}},
                        **extra})


@pytest.mark.parametrize(
    ("rule", "value", "passing", "failing"),
    [
        ("width_pixels>=", 320, 320, 319),
        ("width_pixels<", 320, 319, 320),
        ("width_pixels==", 512, 512, 513),
        ("width_pixels_in", [512, 1024], 1024, 1000),
        ("height_pixels >", 100, 101, 100),
    ],
)
def test_rules_apply_literally(rule, value, passing, failing):
    schema = schema_with([(rule, value)])
    assert schema.rule_problems == []
    ok = schema.check({"img": "u"}, {"u": ImageInfo("png", passing, passing, 10)})
    bad = schema.check({"img": "u"}, {"u": ImageInfo("png", failing, failing, 10)})
    assert ok == [] and len(bad) == 1 and bad[0][0] == "img"


def test_size_and_ratio_rules_use_exact_arithmetic():
    schema = schema_with([("file_size_mb<=", 0.3), ("width/height>=", 0.7)])
    assert schema.check({"img": "u"}, {"u": ImageInfo("png", 700, 1000, 300_000)}) == []
    bad = schema.check({"img": "u"}, {"u": ImageInfo("png", 699, 1000, 300_001)})
    assert [m.split(";")[0] for _, m in bad] == ["image is 300,001 bytes", "image is 699x1000 (width/height 0.699)"]


def test_file_type_rules_accept_jpg_spelling():
    schema = schema_with([("file_type_in", ["JPG", "png"])])
    assert schema.check({"img": "u"}, {"u": ImageInfo("jpeg", 400, 400, 10)}) == []
    assert schema_with([("file_type==", "png")]).check({"img": "u"}, {"u": ImageInfo("png", 4, 4, 1)}) == []


@pytest.mark.parametrize(
    ("rule", "value", "needle"),
    [
        ("dpi>", 72, "rule 'dpi>' is not understood by batchgen"),
        ("width_pixels~", 72, "rule 'width_pixels~' is not understood"),
        ("file_size_mb<", "big", "has a value batchgen cannot use"),
        ("file_type_in", "jpeg", "has a value batchgen cannot use"),
        ("width/height<", True, "has a value batchgen cannot use"),
    ],
)
def test_unknown_rule_is_reported_not_ignored(rule, value, needle):
    schema = schema_with([(rule, value)])
    (field, message), = schema.rule_problems
    assert field == "img" and needle in message and "acme/x-to-image" in message
    assert schema.check({"img": "u"}, {"u": ImageInfo("png", 400, 400, 10)}) == schema.rule_problems
    assert schema.check({}, {}) == []  # no image given, nothing to refuse it


def test_parse_rule():
    rule = parse_rule({"validation_rule": "width/height<", "validation_value": 3, "validation_error": "x"})
    assert (rule.subject, rule.op, rule.value) == ("width/height", "<", 3)
    with pytest.raises(ValueError, match="no validation_rule"):
        parse_rule({"rule": "x"})


def test_rules_on_list_items_apply_to_each_image():
    prop = {"type": "array", "items": {"type": "string", "format": "image_uri", "validations": [
        {"validation_rule": "width_pixels>", "validation_value": 100, "validation_error": "too small"}]}}
    schema = ModelSchema({"model_id": "a/b", "input": {"type": "object", "properties": {"refs": prop}}})
    assert schema.image_fields() == {"refs": True}
    images = {"a": ImageInfo("png", 200, 200, 1), "b": ImageInfo("png", 50, 50, 1)}
    problems = schema.check({"refs": ["a", "b"]}, images)
    assert problems == [("refs[1]", "image is 50x50; too small (allowed: width greater than 100 pixels)")]


@pytest.mark.parametrize(
    ("model_id", "output", "kind"),
    [
        ("acme/foo/image-to-video", {}, "video"),
        ("acme/foo/text-to-image", {}, "image"),
        ("acme/foo", {"output": {"properties": {"videos": {}}}}, "video"),
        ("acme/foo", {"output": {"properties": {"images": {}}}}, "image"),
    ],
)
def test_output_kind_guessed_without_x_batchgen(model_id, output, kind):
    schema = ModelSchema({"model_id": model_id, "input": {"type": "object", "properties": {}}, "output": output})
    assert schema.output_kind == kind


def test_image_uris_format_is_a_list_field():
    schema = ModelSchema({"model_id": "a/b", "input": {"type": "object", "properties": {
        "images": {"type": "array", "format": "image_uris"}, "mask": {"type": "string", "format": "image_uri"},
        "prompt": {"type": "string"}}}})
    assert schema.image_fields() == {"images": True, "mask": False}


# ---- finding schemas ---------------------------------------------------------------------------


def test_find_schema_bundled_extra_and_unknown(tmp_path):
    assert model_filename(DEFAULT_MODEL) == "bytedance--dreamina-3-0--pro--image-to-video.json"
    assert find_schema(DEFAULT_MODEL) is SCHEMA  # loaded once
    assert find_schema("nobody/nothing") is None
    extra = tmp_path / "mine.json"
    extra.write_text(json.dumps({"model_id": "mine/v1", "input": {"type": "object", "properties": {}}}))
    assert find_schema(DEFAULT_MODEL, extra).model_id == "mine/v1"  # --schema wins


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("{not json", "not valid JSON"),
        ('{"model_id": "x"}', "no 'input' object"),
        ('{"input": {"type": "object", "properties": {"a": {"type": "strnig"}}}}', "not valid JSON Schema"),
    ],
)
def test_bad_schema_files(tmp_path, text, needle):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SchemaError, match=needle):
        ModelSchema.load(path)
    with pytest.raises(SchemaError, match="cannot read schema"):
        ModelSchema.load(tmp_path / "missing.json")


def test_every_bundled_schema_loads_with_rules_understood():
    schemas = bundled_schemas()
    assert DEFAULT_MODEL in {s.model_id for s in schemas}
    for s in schemas:
        # Bundled schemas are not checked against the metaschema when loaded (every field has a
        # quick test, see ModelSchema): proven valid here instead.
        jsonschema.Draft202012Validator.check_schema(s._plain)
        assert s.image_fields(), s.model_id
        assert s.rule_problems == [], s.model_id
        assert s.output_kind in ("video", "image")
        assert find_schema(s.model_id) is s


# Schemas of the shapes RunComfy publishes, and of every keyword a quick test covers, each with
# values on both sides of it and values of every kind a manifest can produce (and a few it cannot).
QUICK_SCHEMAS = [
    {"type": "string", "maxLength": 5},
    {"type": "string", "minLength": 2, "format": "image_uri", "description": "d", "default": "x"},
    {"type": "integer", "default": -1},
    {"type": "integer", "enum": [5, 10]},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    {"type": ["integer", "null"], "minimum": 3},
    {"enum": ["480p", "720p", 1, None, True]},
    {"type": "boolean"},
    {"type": "object"},
    {"type": "array", "items": {"type": "string", "format": "image_uri"}, "minItems": 1, "maxItems": 2},
    {"type": "array", "items": {"type": "integer", "maximum": 9}},
    {"maxLength": 3, "minimum": 2, "maxItems": 1},  # keywords without a type apply to their kind
]
QUICK_VALUES = [
    "", "a", "abcde", "abcdef", "720p", "480p", "x" * 300, 0, 1, 2, 3, 5, 9, 10, 11, -1, 2**70, 0.0, 0.5, 1.0, 5.0,
    -0.5, math.inf, math.nan, True, False, None, [], ["a"], ["a", "b"], ["a", "b", "c"], [1], [1, 2], [10], [True],
    [1.0], {}, {"a": 1}, Decimal("0.5"), Fraction(1, 2), ("a",),
]


@pytest.mark.parametrize("schema", QUICK_SCHEMAS, ids=json.dumps)
def test_quick_test_never_passes_what_json_schema_refuses(schema):
    """The quick test stands in for jsonschema on the values it passes, so it must not pass a
    single value jsonschema refuses; and it must pass the plain valid values, or it saves nothing."""
    test = quick_test(schema)
    assert test is not None
    validator = jsonschema.Draft202012Validator(schema)
    passed = 0
    for value in QUICK_VALUES:
        if test(value):
            passed += 1
            assert validator.is_valid(value), (schema, value)
    assert passed, schema


@pytest.mark.parametrize(("schema", "value"), [
    ({"type": "string", "maxLength": 5}, "abc"),
    ({"type": "integer", "default": -1}, 42),
    ({"type": "integer", "enum": [121, 241]}, 241),
    ({"type": "array", "items": {"type": "string"}, "maxItems": 1, "minItems": 1}, ["https://x/a.jpg"]),
])
def test_quick_test_passes_plain_valid_values(schema, value):
    assert quick_test(schema)(value)


@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": "^a"},  # a keyword it does not cover
    {"type": "strng"},  # not a type: jsonschema says what is wrong
    {"type": "string", "maxLength": "5"},
    {"enum": "abc"},
    {"items": [{"type": "string"}]},
    {"type": "array", "items": {"type": "string", "uniqueItems": True}},
    True,
])
def test_quick_test_declines_what_it_does_not_cover(schema):
    assert quick_test(schema) is None


def test_values_failing_the_quick_test_are_still_judged_by_json_schema():
    # 5.0 is an integer to JSON Schema; the quick test (exact types) leaves it to jsonschema.
    assert SCHEMA.check({"prompt": "p", "image_urls": ["https://x/a.jpg"], "frames": 121.0}, {}) == []
    assert SCHEMA.check({"prompt": "p", "image_urls": ["https://x/a.jpg"], "seed": 7.0}, {}) == []
    assert SCHEMA.check({"prompt": "p", "image_urls": ["https://x/a.jpg"], "seed": 7.5}, {}) == [
        ("seed", "must be of type integer (a whole number), got 7.5")]


@pytest.mark.parametrize("field", [
    {"type": "string", "maxLength": -1},
    {"type": "string", "maxLength": "800"},
    {"type": "strng"},
    {"type": "string", "enum": "std"},
    {"type": "integer", "minimum": True},
    {"type": "array", "items": {"type": "string", "maxItems": "1"}},
])
def test_a_schema_with_a_broken_field_is_refused_when_loaded(tmp_path, field):
    # Wherever the file is, the models folder included: whether a check is needed is decided by
    # what the schema says, not by where it lies.
    bad = {"model_id": "a/b", "input": {"type": "object", "properties": {"ok": {"type": "string"}, "x": field}}}
    with pytest.raises(SchemaError, match="not valid JSON Schema"):
        ModelSchema(bad)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(SchemaError, match="not valid JSON Schema"):
        find_schema("a/b", path)


def test_a_run_of_valid_jobs_never_imports_jsonschema(tmp_path):
    """jsonschema takes a twentieth of a second to import; checking valid jobs of a bundled model
    must not need it (the quick tests decide), so neither does the start of a run."""
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        f"model: {DEFAULT_MODEL}\njobs:\n  - prompt: a cat\n    image_url: https://example.com/a.jpg\n"
        "matrix:\n  seed: [1, 2, 3]\n  frames: [121, 241]\n")
    code = (
        "import sys\nfrom batchgen.manifest import load_manifest\n"
        f"m = load_manifest({str(manifest)!r})\njobs = list(m.iter_jobs())\n"
        "problems = [p for j in jobs for p in m.schema.check(j.inputs, {})]\n"
        "print(len(jobs), problems, 'jsonschema' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["6", "[]", "False"]


# ---- what catalog schemas use that the Dreamina page does not -------------------------------------


def catalog_schema(properties: dict, **extra) -> ModelSchema:
    return ModelSchema({"model_id": "acme/x/image-to-video", "input": {"type": "object", "properties": properties},
                        "x-batchgen": extra})


def test_the_non_standard_float_type_means_number():
    schema = catalog_schema({"cfg": {"type": "float", "minimum": 1, "maximum": 10},
                             "weights": {"type": "array", "items": {"type": "float"}},
                             "mode": {"type": "string", "enum": ["float", "int"], "default": "float"}})
    assert schema.field_type("cfg") == "number" and schema.item_type("weights") == "number"  # CSV cells cast so
    assert schema.check({"cfg": 2.5, "weights": [0.5, 1], "mode": "float"}, {}) == []
    assert schema.check({"cfg": 3}, {}) == []  # a whole number is a number
    assert schema.check({"cfg": "high"}, {}) == [("cfg", 'must be of type number (a number), got "high"')]
    assert schema.check({"cfg": True}, {}) == [("cfg", "must be of type number (a number), got true")]
    assert schema.check({"cfg": 10.5}, {}) == [("cfg", "is 10.5; must be at most 10")]
    assert schema.check({"weights": ["a"]}, {}) == [("weights[0]", 'must be of type number (a number), got "a"')]
    assert schema.properties["mode"]["enum"] == ["float", "int"]  # values are not types: left alone


def test_a_seed_with_minimum_zero_refuses_minus_one():
    schema = catalog_schema({"seed": {"type": "integer", "minimum": 0, "default": 0}})
    assert schema.check({"seed": 0}, {}) == []
    assert schema.check({"seed": -1}, {}) == [("seed", "is -1; must be at least 0")]


def test_min_and_max_items_on_a_media_list():
    schema = catalog_schema({"refs": {"type": "array", "format": "image_uris", "minItems": 1, "maxItems": 3,
                                      "items": {"type": "string", "format": "image_uri"}}})
    assert schema.image_fields() == {"refs": True}
    assert schema.describe("refs") == "a list of 1 to 3 image URL(s)"
    assert schema.check({"refs": ["https://x/a.jpg"] * 3}, {}) == []
    assert schema.check({"refs": ["https://x/a.jpg"] * 4}, {}) == [("refs", "has 4 item(s); at most 3 allowed")]
    assert schema.check({"refs": []}, {}) == [("refs", "has 0 item(s); at least 1 required")]


def test_a_file_size_rule_on_the_items_of_a_media_list_applies_to_each_image():
    schema = catalog_schema({"refs": {"type": "array", "format": "image_uris", "items": {
        "type": "string", "format": "image_uri", "validations": [
            {"validation_rule": "file_size_mb<", "validation_value": 5, "validation_error": "Under 5 MB."}]}}})
    small, big = ImageInfo("jpeg", 640, 480, 4_999_999), ImageInfo("png", 640, 480, 5_000_000)
    assert schema.check({"refs": ["a", "b"]}, {"a": small, "b": big}) == [
        ("refs[1]", "image is 5,000,000 bytes; Under 5 MB (allowed: less than 5,000,000 bytes; "
                    "1 MB = 1,000,000 bytes)")]


@pytest.mark.parametrize(("unit", "inputs", "price"), [
    ("second", {"duration": 10}, 0.5),
    ("second", {"duration": "5"}, 0.25),  # duration enums are often strings
    ("second", {"duration": 2.5}, 0.125),
    ("second", {}, None),  # no duration: no guess
    ("second", {"duration": "long"}, None),
    ("second", {"duration": True}, None),
    ("output", {"duration": 10}, 0.05),
    (None, {}, 0.05),
    ("token", {}, None),  # a unit batchgen does not know: no estimate rather than a wrong one
])
def test_price_per_second_times_the_duration_field(unit, inputs, price):
    schema = catalog_schema({"duration": {"type": ["integer", "string", "number", "boolean"]}},
                            base_price_usd=0.05, price_unit=unit)
    assert schema.price_unit == (unit or "output")
    got = schema.job_price(inputs)
    assert got == (pytest.approx(price) if price is not None else None)
