"""`validate --fix`, `run --fix-images`, `plan --fix`: compliant copies of local images that fail
only on format or size, made from real images, checked by decoding the copies."""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from imagefactory import make_image
from PIL import Image
from test_cli import cli

from batchgen import constants as C
from batchgen.fiximages import FixOptions, ImageFixer, heif_support
from batchgen.manifest import load_manifest

DREAMINA = "bytedance/dreamina-3-0/pro/image-to-video"  # 321..4096 px, ratio within 3:1, 4.7 MB, JPEG/PNG

# A schema with small limits, so the images stay small and the tests quick.
SCHEMA = {
    "model_id": "test/fix",
    "input": {"type": "object", "required": ["prompt", "image"], "properties": {
        "prompt": {"type": "string"},
        "image": {"type": "string", "format": "image_uri", "validations": [
            {"validation_rule": "file_type_in", "validation_value": ["jpeg", "png"], "validation_error": "JPEG, PNG."},
            {"validation_rule": "file_size_mb<", "validation_value": 0.5, "validation_error": "Under 0.5 MB."},
            {"validation_rule": "width_pixels<=", "validation_value": 640, "validation_error": "At most 640 px."},
            {"validation_rule": "height_pixels<=", "validation_value": 640, "validation_error": "At most 640 px."},
            {"validation_rule": "width_pixels>=", "validation_value": 200, "validation_error": "At least 200 px."},
            {"validation_rule": "height_pixels>=", "validation_value": 200, "validation_error": "At least 200 px."},
            {"validation_rule": "width/height<=", "validation_value": 2, "validation_error": "Ratio at most 2."},
            {"validation_rule": "width/height>=", "validation_value": 0.5, "validation_error": "Ratio at least 0.5."},
        ]},
    }},
}


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def manifest(tmp_path: Path, images: list[str], model: str = "test/fix", field: str = "image") -> Path:
    """A manifest of one job per image (line numbers: job i is on line 4 + 2 * i)."""
    path = tmp_path / "m.yaml"
    doc = {"name": "fx", "model": model, "jobs": [{"prompt": f"p{i}", field: f} for i, f in enumerate(images)]}
    if model == "test/fix":
        (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
        doc["schema"] = "schema.json"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def validate(path: Path, *opts: str):
    return cli("validate", str(path), *opts)


def copies(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "jobs" / "fixed").glob("*"))


def test_webp_becomes_png_and_the_original_is_untouched(tmp_path):
    src = make_image(tmp_path / "street.webp", 400, 300, "WEBP")
    before = sha(src)
    path = manifest(tmp_path, ["street.webp"])
    plain = validate(path)
    assert plain.exit_code == 2 and "image is WEBP" in plain.output
    result = validate(path, "--fix")
    assert result.exit_code == 0, result.output
    assert "fixed street.webp: WEBP -> PNG\n" in result.output
    assert "1 job(s), all valid" in result.output
    [copy] = copies(tmp_path)
    with Image.open(copy) as im:
        assert (im.format, im.size) == ("PNG", (400, 300))
    assert sha(src) == before


def test_too_large_in_pixels_is_scaled_down_keeping_the_ratio(tmp_path):
    make_image(tmp_path / "big.jpg", 1280, 960)
    result = validate(manifest(tmp_path, ["big.jpg"]), "--fix")
    assert result.exit_code == 0, result.output
    assert "fixed big.jpg: 1280x960 -> 640x480 (over 640 px)" in result.output
    [copy] = copies(tmp_path)
    with Image.open(copy) as im:
        assert (im.format, im.size) == ("JPEG", (640, 480))  # a JPEG stays a JPEG


def test_too_large_in_bytes_is_made_to_fit(tmp_path):
    make_image(tmp_path / "heavy.png", 400, 400, "PNG", nbytes=700_000)  # padding a re-encode drops
    result = validate(manifest(tmp_path, ["heavy.png"]), "--fix")
    assert result.exit_code == 0, result.output
    assert "fixed heavy.png: 700,000 -> " in result.output and "(over 499,999)" in result.output
    [copy] = copies(tmp_path)
    assert copy.stat().st_size < 500_000


def test_too_small_is_upscaled_only_when_asked(tmp_path):
    src = make_image(tmp_path / "small.png", 150, 100, "PNG")
    path = manifest(tmp_path, ["small.png"])
    refused = validate(path, "--fix")
    assert refused.exit_code == 2
    assert "m.yaml, line 4, field 'image': small.png: image is 150x100" in refused.output
    assert "--upscale would scale it up to 300x200" in refused.output
    assert copies(tmp_path) == []
    result = validate(path, "--fix", "--upscale")
    assert result.exit_code == 0, result.output
    assert "fixed small.png: 150x100 -> 300x200 (under 200 px)" in result.output
    with Image.open(copies(tmp_path)[0]) as im:
        assert im.size == (300, 200)
    assert sha(src) == sha(tmp_path / "small.png")


@pytest.mark.parametrize(("how", "size", "said"), [
    ("pad", (600, 300), "600x200 padded to 600x300 (width/height 3 over 2)"),
    ("crop", (400, 200), "600x200 cropped to 400x200 (width/height 3 over 2)"),
])
def test_a_ratio_out_of_range_is_padded_or_cropped_as_asked(tmp_path, how, size, said):
    make_image(tmp_path / "wide.png", 600, 200, "PNG")
    path = manifest(tmp_path, ["wide.png"])
    refused = validate(path, "--fix")
    assert refused.exit_code == 2
    assert "--fix-ratio pad or --fix-ratio crop would fix it" in refused.output
    result = validate(path, "--fix", "--fix-ratio", how)
    assert result.exit_code == 0, result.output
    assert f"fixed wide.png: {said}" in result.output
    with Image.open(copies(tmp_path)[0]) as im:
        assert im.size == size
        if how == "pad":  # black bars above and below, the picture in the middle
            assert im.convert("RGB").getpixel((300, 10)) == (0, 0, 0)
            assert im.convert("RGB").getpixel((300, 150)) != (0, 0, 0)


def test_options_without_fix_are_refused():
    result = cli("validate", "m.yaml", "--upscale")
    assert result.exit_code == 2 and "--upscale and --fix-ratio go with --fix" in result.output


def test_rerun_finds_the_same_copies_and_keys(tmp_path):
    for name, w, h, fmt in (("a.webp", 400, 300, "WEBP"), ("b.jpg", 1280, 960, "JPEG"), ("c.gif", 300, 300, "GIF")):
        make_image(tmp_path / name, w, h, fmt)
    originals = {p.name: sha(p) for p in tmp_path.iterdir() if p.is_file()}
    path = manifest(tmp_path, ["a.webp", "b.jpg", "c.gif"])
    first = validate(path, "--fix")
    assert first.exit_code == 0, first.output
    made = {p: (sha(p), p.stat().st_mtime_ns) for p in copies(tmp_path)}
    assert len(made) == 3
    second = validate(path, "--fix")
    assert second.output == first.output  # says again what each copy changed
    assert {p: (sha(p), p.stat().st_mtime_ns) for p in copies(tmp_path)} == made  # not written again
    assert {p.name: sha(p) for p in tmp_path.iterdir() if p.is_file() and p.name in originals} == originals


def fixed_spec(tmp_path: Path, path: Path, **options):
    loaded = load_manifest(path)
    assert loaded.schema is not None
    loaded.images.fixer = ImageFixer(loaded.schema, tmp_path / "jobs" / "fixed", FixOptions(**options))
    [spec] = loaded.iter_jobs()
    return spec


def test_the_copy_is_sent_and_the_key_counts_the_source_and_the_fix(tmp_path, monkeypatch):
    make_image(tmp_path / "big.jpg", 1280, 960)
    path = manifest(tmp_path, ["big.jpg"])
    spec = fixed_spec(tmp_path, path)
    [copy] = copies(tmp_path)
    first = sha(copy)
    # The copy is what is sent (a file reference to it, with its own sha256) ...
    assert spec.inputs["image"].startswith(copy.as_uri() + f"#sha256={first}")
    assert spec.local_files == {spec.inputs["image"]: str(copy)}
    # ... but the key counts the source and what was done to it: encoded again otherwise (fixed/
    # deleted, another libjpeg), the copy has other bytes and the job is the same.
    shutil.rmtree(tmp_path / "jobs" / "fixed")
    monkeypatch.setattr(C, "FIX_JPEG_QUALITY", 60)
    again = fixed_spec(tmp_path, path)
    [copy] = copies(tmp_path)
    assert sha(copy) != first and again.inputs["image"].startswith(copy.as_uri() + f"#sha256={sha(copy)}")
    assert again.key == spec.key
    # Another fix of the same source is another job.
    make_image(tmp_path / "wide.png", 600, 200, "PNG")
    wide = manifest(tmp_path, ["wide.png"])
    assert fixed_spec(tmp_path, wide, ratio="pad").key != fixed_spec(tmp_path, wide, ratio="crop").key


def test_a_corrupt_image_is_still_an_error_naming_file_and_row(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    make_image(tmp_path / "ok.webp", 300, 300, "WEBP")
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    (tmp_path / "rows.csv").write_text("prompt,image\nfine,ok.webp\nbad,broken.png\n")
    path = tmp_path / "m.yaml"
    path.write_text("name: fx\nmodel: test/fix\nschema: schema.json\nrows: rows.csv\n")
    result = validate(path, "--fix")
    assert result.exit_code == 2
    assert "fixed ok.webp: WEBP -> PNG" in result.output
    assert "rows.csv, row 3, field 'image'" in result.output and "broken.png" in result.output
    assert "not a readable image" in result.output
    assert "Traceback" not in result.output


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    # A PNG whose header claims 20,000 x 20,000 pixels, in a few dozen bytes.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    (tmp_path / "bomb.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    result = validate(manifest(tmp_path, ["bomb.png"]), "--fix")
    assert result.exit_code == 2
    assert ("bomb.png: 20000x20000 is 400,000,000 pixels, more than batchgen decodes to fix an image"
            in result.output)
    assert copies(tmp_path) == []


@pytest.mark.skipif(not heif_support(), reason="pillow-heif (the heic extra) is not installed")
def test_heic_photo_becomes_jpeg(tmp_path):
    Image.new("RGB", (400, 300), (30, 120, 200)).save(tmp_path / "phone.heic")
    result = validate(manifest(tmp_path, ["phone.heic"]), "--fix")
    assert result.exit_code == 0, result.output
    assert "fixed phone.heic: HEIF -> JPEG" in result.output
    with Image.open(copies(tmp_path)[0]) as im:
        assert (im.format, im.size) == ("JPEG", (400, 300))


def test_plan_fix_says_what_it_changed(tmp_path):
    make_image(tmp_path / "street.webp", 500, 400, "WEBP")
    result = cli("plan", str(manifest(tmp_path, ["street.webp"], model=DREAMINA, field="image_urls")),
                 "--simulate", "--fix")
    assert result.exit_code == 0, result.output
    assert "fixed street.webp: WEBP -> PNG" in result.output and "new: 1" in result.output


def test_run_fix_images_sends_the_copy_and_a_rerun_sends_nothing(tmp_path):
    make_image(tmp_path / "street.webp", 500, 400, "WEBP")
    make_image(tmp_path / "tiny.png", 200, 160, "PNG")
    path = manifest(tmp_path, ["street.webp", "tiny.png"], model=DREAMINA, field="image_urls")
    originals = {name: sha(tmp_path / name) for name in ("street.webp", "tiny.png")}
    refused = cli("run", str(path), "--simulate")
    assert refused.exit_code == 2 and "image is WEBP" in refused.output
    first = cli("run", str(path), "--simulate", "--fix-images", "--upscale")
    assert first.exit_code == 0, first.output
    assert "fixed street.webp: WEBP -> PNG" in first.output
    assert "fixed tiny.png: 200x160 -> 402x321 (under 321 px)" in first.output
    state = tmp_path / "jobs" / "simulated" / "simulator-state.jsonl"
    submits = [r["job"] for r in map(json.loads, state.read_text().splitlines()) if "job" in r]
    # The simulator (which checks inputs as the service does) received the copies' bytes.
    sent = {r["media"][0] for r in submits}
    assert sent == {f"data:sha256:{sha(p)}" for p in copies(tmp_path)}
    assert len(submits) == 2 and all(r["input"]["image_urls"][0].startswith("data:image/png") for r in submits)
    again = cli("run", str(path), "--simulate", "--fix-images", "--upscale")
    assert again.exit_code == 0, again.output
    assert "0 new job(s) recorded, 0 submitted" in again.output
    resubmitted = [r for r in map(json.loads, state.read_text().splitlines()) if "job" in r]
    assert len(resubmitted) == 2  # the same jobs, already done: nothing submitted again
    assert {name: sha(tmp_path / name) for name in originals} == originals


def test_heic_without_pillow_heif_says_what_to_install(tmp_path):
    import subprocess
    import sys

    # The start of a HEIC file (its ISO box "ftyp", brand "heic"); without pillow-heif nothing reads more.
    (tmp_path / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    path = manifest(tmp_path, ["phone.heic"])
    code = ("import sys; sys.modules['pillow_heif'] = None\n"  # as if it were not installed
            "from batchgen.cli import main; main(['validate', sys.argv[1], '--fix'])")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert ("m.yaml, line 4, field 'image': phone.heic: a HEIC/HEIF image, which batchgen reads only with "
            "pillow-heif installed (pip install pillow-heif" in done.stderr)
    assert "Traceback" not in done.stderr


def test_transparency_is_kept_and_padding_is_transparent(tmp_path):
    im = Image.new("RGBA", (300, 700), (200, 40, 40, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))
    im.save(tmp_path / "tall.webp")
    result = validate(manifest(tmp_path, ["tall.webp"]), "--fix", "--fix-ratio", "pad")
    assert result.exit_code == 0, result.output
    assert ("fixed tall.webp: WEBP -> PNG, 300x700 padded to 350x700 (width/height 0.4286 under 0.5), "
            "350x700 -> 320x640 (over 640 px)\n") in result.output
    with Image.open(copies(tmp_path)[0]) as copy:
        assert (copy.format, copy.mode, copy.size) == ("PNG", "RGBA", (320, 640))
        assert copy.getpixel((2, 320))[3] == 0  # a bar: transparent
        red, _, _, alpha = copy.getpixel((160, 320))
        assert alpha == 255 and red > 150  # the picture (WEBP is lossy: about its colour)


def test_a_photo_turned_by_exif_is_fixed_upright(tmp_path):
    photo = Image.new("RGB", (800, 300), (10, 100, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned a quarter: 300 wide, 800 tall
    photo.save(tmp_path / "turned.jpg", exif=exif)
    result = validate(manifest(tmp_path, ["turned.jpg"]), "--fix", "--fix-ratio", "crop")
    assert result.exit_code == 0, result.output
    assert "turned upright (EXIF orientation)" in result.output
    with Image.open(copies(tmp_path)[0]) as copy:
        assert copy.size[0] < copy.size[1] and copy.getexif().get(0x0112, 1) == 1


async def test_fix_images_against_an_api_in_a_fresh_folder_then_status_plan_and_a_rerun(tmp_path, simulator):
    # The copies' folder (WORKDIR/fixed/) is not taken for what earlier runs left beside a lost store.
    from test_realms import TOKEN, batchgen

    api = await simulator(token=TOKEN)  # a real server on loopback, as the API
    make_image(tmp_path / "street.webp", 500, 400, "WEBP")
    path = manifest(tmp_path, ["street.webp"], model=DREAMINA, field="image_urls")
    code, out = await batchgen("run", str(path), "--api-url", api.base_url, "--fix-images", token=True)
    assert code == 0, out
    assert "fixed street.webp: WEBP -> PNG" in out and "1 new job(s) recorded, 1 submitted" in out
    assert len(copies(tmp_path)) == 1 and (tmp_path / "jobs" / "batchgen.sqlite3").is_file()
    code, out = await batchgen("status")
    assert code == 0 and "fx  (bytedance/dreamina-3-0/pro/image-to-video, 1 jobs, $0.10 spent)" in out, out
    code, out = await batchgen("plan", str(path), "--api-url", api.base_url, "--fix", token=True)
    assert code == 0 and "fixed street.webp: WEBP -> PNG" in out and "new: 0" in out, out
    code, out = await batchgen("run", str(path), "--api-url", api.base_url, "--fix-images", token=True)
    assert code == 0 and "0 new job(s) recorded, 0 submitted" in out, out
    assert api.calls["submit"] == 1
    # A lost store beside real outputs is still refused (the exception is fixed/ alone).
    (tmp_path / "jobs" / "batchgen.sqlite3").unlink()
    code, out = await batchgen("run", str(path), "--api-url", api.base_url, "--fix-images", token=True)
    assert code == 70 and "holds what earlier runs left (batchgen.lock, fx/)" in out, out
    assert api.calls["submit"] == 1


@pytest.mark.parametrize("name", ["fixed", "Fixed"])
def test_a_batch_cannot_be_named_as_the_copies_folder(tmp_path, name):
    make_image(tmp_path / "street.webp", 500, 400, "WEBP")
    path = manifest(tmp_path, ["street.webp"])
    path.write_text(path.read_text().replace("name: fx", f"name: {name}"))
    result = validate(path, "--fix")
    assert result.exit_code == 2
    assert f"batch name '{name}' is reserved: batchgen keeps a file or folder of that name" in result.output


async def test_a_copy_encoded_again_is_the_same_job_and_never_paid_again(tmp_path, simulator, monkeypatch):
    from simruns import settings

    from batchgen import app

    state = tmp_path / "sim.jsonl"  # what the simulator received: each job's inline files by sha256
    api = await simulator(state_file=state)
    make_image(tmp_path / "harbour.jpg", 4400, 2000)  # over 4096 px: scaled down, still a JPEG
    make_image(tmp_path / "street.webp", 500, 400, "WEBP")
    path = manifest(tmp_path, ["street.webp", "harbour.jpg", "harbour.jpg"], model=DREAMINA, field="image_urls")

    def opts(**kw):
        return app.RunOptions(workdir=tmp_path / "jobs", manifest=path, fix=FixOptions(),
                              target=app.Target(api_url=api.base_url, token="t"), settings=settings(**kw))

    first = await app.run(opts(max_jobs=2))  # one job left pending
    assert first.new_jobs == 3 and first.summary.submitted == 2
    jpeg = next(p for p in copies(tmp_path) if p.suffix == ".jpg")
    before = sha(jpeg)
    # fixed/ deleted, and a libjpeg that encodes otherwise: the copy comes back with other bytes.
    shutil.rmtree(tmp_path / "jobs" / "fixed")
    monkeypatch.setattr(C, "FIX_JPEG_QUALITY", 60)
    second = await app.run(opts())
    [jpeg] = [p for p in copies(tmp_path) if p.suffix == ".jpg"]
    assert sha(jpeg) != before
    assert second.new_jobs == 0 and second.summary.submitted == 1  # the one left, nothing again
    assert second.counts == {"fx": {"succeeded": 3}}
    requests = api.requests()["requests"]
    assert sorted(r["input"]["prompt"] for r in requests) == ["p0", "p1", "p2"] and api.calls["submit"] == 3
    # The job left pending sent the copies as they are now (checked against their own sha256).
    received = {r["job"]["id"]: r["job"]["media"][0] for r in map(json.loads, state.read_text().splitlines())
                if "job" in r}
    assert requests[2]["input"]["prompt"] == "p2"  # harbour.jpg: sent as encoded the second time
    assert received[requests[2]["request_id"]] == f"data:sha256:{sha(jpeg)}" != f"data:sha256:{before}"
    third = await app.run(opts())
    assert third.new_jobs == 0 and third.summary.submitted == 0 and api.calls["submit"] == 3


@pytest.mark.parametrize("damage", ["truncated", "empty", "written over"])
def test_a_damaged_copy_is_made_again(tmp_path, damage):
    make_image(tmp_path / "street.webp", 400, 300, "WEBP")
    path = manifest(tmp_path, ["street.webp"])
    key = fixed_spec(tmp_path, path).key
    [copy] = copies(tmp_path)
    good = copy.read_bytes()
    copy.write_bytes({"truncated": good[: len(good) // 2], "empty": b"",
                      "written over": make_image(tmp_path / "other.png", 400, 300, "PNG").read_bytes()}[damage])
    result = validate(path, "--fix")
    assert result.exit_code == 0, result.output
    assert "fixed street.webp: WEBP -> PNG\n" in result.output and "Traceback" not in result.output
    assert [p.read_bytes() for p in copies(tmp_path)] == [good]  # the damaged one gone, the copy back
    assert fixed_spec(tmp_path, path).key == key


async def test_a_copy_gone_while_its_job_is_pending_stops_with_the_way_out(tmp_path, simulator):
    from simruns import settings

    from batchgen import app
    from batchgen.runner import StopReason

    api = await simulator()
    make_image(tmp_path / "street.webp", 500, 400, "WEBP")
    make_image(tmp_path / "lane.webp", 500, 400, "WEBP")
    path = manifest(tmp_path, ["street.webp", "lane.webp"], model=DREAMINA, field="image_urls")

    def opts(**kw):
        return app.RunOptions(workdir=tmp_path / "jobs", manifest=path, fix=FixOptions(),
                              target=app.Target(api_url=api.base_url, token="t"), settings=settings(**kw))

    assert (await app.run(opts(max_jobs=1))).summary.submitted == 1
    shutil.rmtree(tmp_path / "jobs" / "fixed")
    # Resumed without the manifest: the copy cannot be sent, and nothing else is sent for it.
    resumed = await app.run(replace(opts(max_jobs=1), manifest=None))
    assert resumed.summary.stop_reason is StopReason.REFUSED and resumed.summary.submitted == 0
    assert "a copy made by --fix-images, gone or changed since it was validated: batchgen run " in \
        resumed.summary.stop_message
    assert f"{path} --fix-images (with the --upscale or --fix-ratio it had) makes it again" in \
        resumed.summary.stop_message
    assert resumed.counts == {"fx": {"succeeded": 1, "pending": 1}} and api.calls["submit"] == 1
    # The way out, as said: the manifest with --fix-images makes the copy again and sends the job.
    again = await app.run(opts())
    assert again.summary.submitted == 1 and again.counts == {"fx": {"succeeded": 2}}
    assert api.calls["submit"] == 2


def test_a_source_over_the_size_cap_is_refused_before_it_is_read(tmp_path, monkeypatch):
    make_image(tmp_path / "huge.webp", 400, 300, "WEBP")
    monkeypatch.setattr(C, "MAX_FIX_SOURCE_BYTES", 1000)  # the image is a few KB
    result = validate(manifest(tmp_path, ["huge.webp"]), "--fix")
    assert result.exit_code == 2
    assert ("m.yaml, line 4, field 'image': huge.webp: the file is over 1,000 bytes, more than batchgen reads "
            "to fix an image; convert or scale it down yourself") in result.output
    assert copies(tmp_path) == [] and "Traceback" not in result.output


def test_without_fix_one_hint_line_counts_what_fix_would_fix(tmp_path):
    make_image(tmp_path / "street.webp", 400, 300, "WEBP")
    make_image(tmp_path / "small.png", 150, 100, "PNG")
    make_image(tmp_path / "wide.png", 600, 200, "PNG")
    make_image(tmp_path / "fine.png", 300, 300, "PNG")
    path = manifest(tmp_path, ["street.webp", "small.png", "wide.png", "fine.png", "street.webp"])
    result = validate(path)
    assert result.exit_code == 2
    lines = result.output.splitlines()
    assert lines[0] == "error: 4 problems in the manifest; nothing was submitted"
    assert lines[1] == "  m.yaml, line 4, field 'image': image is WEBP; JPEG, PNG (allowed: one of JPEG, PNG)"
    assert lines[-1] == (f"hint: 3 image(s) can be fixed by copies: batchgen validate {path} --fix --upscale "
                         "--fix-ratio pad (or --fix-ratio crop) shows what would change")
    assert copies(tmp_path) == []  # nothing written without --fix
    run = cli("run", str(path), "--simulate")
    assert run.exit_code == 2 and run.output.splitlines()[-1] == lines[-1]
    # Problems --fix cannot help with: no hint.
    only = manifest(tmp_path, ["fine.png"])
    only.write_text(only.read_text().replace("prompt: p0", "prompt: 5"))
    result = validate(only)
    assert result.exit_code == 2 and "hint:" not in result.output


async def test_only_a_copy_batchgen_made_is_said_to_be_one(tmp_path):
    from batchgen.inline import FileChecks, FileRef, FixedCopyError, InputFileError

    own = tmp_path / "fixed" / "holiday.png"  # the user's own folder named fixed
    copy = tmp_path / "jobs" / "fixed" / f"{'a' * 32}-{'b' * 32}.png"
    for path, kind, said in ((own, InputFileError, "run validate again"),
                             (copy, FixedCopyError, "a copy made by --fix-images")):
        with pytest.raises(InputFileError) as err:
            await FileChecks().verify(FileRef(str(path), "0" * 64, 10, "image/png"))
        assert type(err.value) is kind and said in str(err.value)
