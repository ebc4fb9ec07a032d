"""Local files sent inline as data: URIs: built at submit time from the file checked against what
was validated, within RunComfy's 64 MiB, and decoded by the simulator as the service would."""

from __future__ import annotations

import base64
import io
import json
import os

import aiohttp
import pytest
import yaml
from conftest import local_ref
from imagefactory import image_bytes, make_image
from simruns import settings

from batchgen import app
from batchgen import store as S
from batchgen.client import RunComfyClient
from batchgen.constants import DEFAULT_MODEL, MAX_REQUEST_BYTES
from batchgen.errors import InvalidRequestError
from batchgen.inline import FileChecks, InputFileError, describe_data_uri, inline_body, prepare_body, request_size
from batchgen.manifest import canonical_json, load_manifest
from batchgen.simulator.media import make_video
from batchgen.store import Store
from batchgen.validate import validate_manifest


def run_options(tmp_path, sim, manifest, **kw) -> app.RunOptions:
    return app.RunOptions(workdir=tmp_path / "work", manifest=manifest,
                          target=app.Target(api_url=sim.base_url, token="t"), settings=settings(**kw))


async def jobs_of(workdir):
    async with await Store.open(workdir / "batchgen.sqlite3") as store:
        return [(j, await store.outputs(j.id)) for j in await store.jobs()]


# ---- end to end --------------------------------------------------------------------------------


async def test_a_jpeg_and_a_png_travel_as_data_uris_and_the_output_is_made_from_them(tmp_path, simulator):
    sim = await simulator(duration=0.05)
    jpeg = make_image(tmp_path / "in" / "a.jpg", 640, 480)
    png = make_image(tmp_path / "in" / "b.png", 480, 640, fmt="PNG")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "inl", "jobs": [{"prompt": "a", "image": "in/a.jpg"},
                                                            {"prompt": "b", "image": "in/b.png"}]}))
    out = await app.run(run_options(tmp_path, sim, path))
    assert out.summary.finished == {S.SUCCEEDED: 2}
    sent = {r["input"]["prompt"]: r["input"]["image_urls"][0] for r in sim.requests()["requests"]}
    # The simulator keeps no payload, only what it was: the type comes from the content.
    assert sent == {"a": describe_data_uri("data:image/jpeg;base64," + base64.b64encode(jpeg.read_bytes()).decode()),
                    "b": describe_data_uri("data:image/png;base64," + base64.b64encode(png.read_bytes()).decode())}
    assert sent["a"].startswith("data:image/jpeg;base64,… (")
    for job, (output,) in await jobs_of(tmp_path / "work"):
        source = jpeg if job.inputs["prompt"] == "a" else png
        video = (tmp_path / "work" / output.path).read_bytes()
        assert video == make_video(source.read_bytes(), 24)  # the output is made from the decoded file
        # The store keeps the path and the sha256 recorded at validation, never the base64.
        assert job.inputs["image_urls"] == [local_ref(source)] and "base64" not in (job.inputs_json or "")


async def test_simulated_runs_send_data_uris_too(samples, tmp_path):
    opts = app.RunOptions(workdir=tmp_path / "work", manifest=samples / "quickstart.yaml",
                          target=app.Target(simulate=True), settings=settings())
    await app.run(opts)
    state = (tmp_path / "work" / "simulated" / "simulator-state.jsonl").read_text()
    sent = [json.loads(line)["job"]["input"]["image_urls"][0] for line in state.splitlines() if '"job"' in line]
    assert len(sent) == 6
    assert all(s.startswith(("data:image/jpeg;base64,… (", "data:image/png;base64,… (")) for s in sent)


async def test_a_file_changed_after_validation_fails_its_job_before_submit(tmp_path, simulator):
    sim = await simulator(duration=0.05)
    image = make_image(tmp_path / "a.jpg", 640, 480)
    make_image(tmp_path / "b.jpg", 640, 480, nbytes=image.stat().st_size + 100)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "chg", "jobs": [{"prompt": "a", "image": "a.jpg"},
                                                            {"prompt": "b", "image": "b.jpg"}]}))

    def change_files(_runner):  # after validation and recording, before any submit
        data = bytearray(image.read_bytes())
        data[-10] ^= 0xFF  # other content, same size
        image.write_bytes(bytes(data))
        (tmp_path / "b.jpg").unlink()

    out = await app.run(run_options(tmp_path, sim, path), on_runner=change_files)
    assert out.summary.finished == {S.FAILED: 2}
    assert sim.calls["submit"] == 0
    errors = sorted(job.error for job, _ in await jobs_of(tmp_path / "work"))
    changed = "changed since it was validated: run validate again"
    assert errors[0] == f"local file {image.resolve()} has other content: {changed}"
    assert errors[1].startswith(f"local file {(tmp_path / 'b.jpg').resolve()} cannot be read (")


async def test_a_file_changed_while_it_streams_never_reaches_the_service_whole(tmp_path, simulator):
    """Same size, same mtime, other bytes: the stat check passes, the hash taken while sending does
    not, and the body stops short of its end, so the service has no request to act on."""
    sim = await simulator(duration=0.05)
    image = make_image(tmp_path / "a.jpg", 640, 480)
    spec = await one_spec(tmp_path, "a.jpg")
    checks = FileChecks()
    await checks.verify(await first_ref(spec))
    st = image.stat()
    data = bytearray(image.read_bytes())
    data[-10] ^= 0xFF
    image.write_bytes(bytes(data))
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    body = await prepare_body(spec.inputs, checks)  # the cheap check cannot see it
    async with RunComfyClient(sim.base_url, "t") as client:
        with pytest.raises(InputFileError, match="changed while it was being sent"):
            await client.submit(DEFAULT_MODEL, body)
    assert sim.requests()["requests"] == []


async def one_spec(tmp_path, image: str):
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump({"jobs": [{"prompt": "p", "image_url": image}]}))
    specs = []
    result = await validate_manifest(load_manifest(path), collect=specs.append)
    assert result.problems == []
    return specs[0]


async def first_ref(spec):
    from batchgen.inline import local_files

    return local_files(spec.inputs)[0]


# ---- the 64 MiB cap ----------------------------------------------------------------------------


def body_size_by_hand(prompt: str, data: bytes) -> int:
    """The submit body, built without batchgen: JSON with the file as a base64 data: URI."""
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    return len(json.dumps({"image_url": uri, "prompt": prompt}, separators=(",", ":")).encode())


async def test_the_request_cap_on_both_sides_of_64_mib(tmp_path, simulator):
    """A job of exactly 64 MiB is valid and sent whole; one byte more is refused at validation,
    by the sender, and by the simulator (413)."""
    big = make_image(tmp_path / "big.png", 400, 400, fmt="PNG", nbytes=48 * 1024 * 1024 - 1000)
    data = big.read_bytes()
    pad = MAX_REQUEST_BYTES - body_size_by_hand("", data)
    sim = await simulator(validate_inputs=False)
    for extra, valid in ((0, True), (1, False)):
        prompt = "x" * (pad + extra)
        path = tmp_path / "cap.yaml"
        path.write_text(yaml.safe_dump({"model": "someone/new-model",
                                        "jobs": [{"prompt": prompt, "image_url": "big.png"}]}))
        specs = []
        result = await validate_manifest(load_manifest(path), collect=specs.append, no_schema=True)
        spec = specs[0]
        size = request_size(spec.inputs_json, spec.local_files)
        assert size == body_size_by_hand(prompt, data) == MAX_REQUEST_BYTES + extra
        if valid:
            assert result.problems == []
            body = inline_body(spec.inputs)
            assert body is not None and body.size == MAX_REQUEST_BYTES
            async with RunComfyClient(sim.base_url, "t") as client:
                await client.submit(DEFAULT_MODEL, body)  # the simulator read it whole, as JSON
            (accepted,) = sim.requests()["requests"]
            assert len(accepted["input"]["prompt"]) == pad
        else:
            (problem,) = result.problems
            assert problem.message.startswith(f"the request would be {MAX_REQUEST_BYTES + 1:,} bytes")
            with pytest.raises(InputFileError, match="at most 67,108,864"):
                inline_body(spec.inputs)


@pytest.mark.parametrize("extra, status", [(0, 200), (1, 413)])
async def test_the_simulator_refuses_bodies_over_64_mib(simulator, extra, status):
    sim = await simulator(validate_inputs=False)
    shell = canonical_json({"image_urls": ["https://example.com/a.jpg"], "prompt": ""}).encode()
    body = shell.replace(b'"prompt":""', b'"prompt":"' + b"x" * (MAX_REQUEST_BYTES + extra - len(shell)) + b'"')
    assert len(body) == MAX_REQUEST_BYTES + extra
    async with aiohttp.ClientSession() as http, http.post(
            f"{sim.base_url}/models/{DEFAULT_MODEL}", data=io.BytesIO(body),
            headers={"Authorization": "Bearer t", "Content-Type": "application/json"}) as resp:
        assert resp.status == status
        if status == 413:
            assert (await resp.json())["error_code"] == 413001


# ---- data: URIs written in a manifest ------------------------------------------------------------


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


async def test_data_uris_in_a_manifest_are_validated_without_showing_their_payload(tmp_path):
    small = data_uri(image_bytes(300, 300), "image/jpeg")
    lying = data_uri(image_bytes(640, 480), "image/png")  # a JPEG that says PNG
    good = data_uri(image_bytes(640, 480), "image/jpeg")
    path = tmp_path / "d.yaml"
    path.write_text(yaml.safe_dump({"jobs": [{"prompt": "a", "image": small}, {"prompt": "b", "image": lying},
                                             {"prompt": "c", "image": good}]}))
    result = await validate_manifest(load_manifest(path))
    messages = [p.message for p in result.problems]
    assert len(messages) == 2 and not any(small[40:80] in m or lying[40:80] in m for m in messages)
    assert messages[0].startswith("image is 300x300; The shortest side must be at least 320 pixels")
    assert messages[1] == f"{describe_data_uri(lying)}: the data: URI says image/png but its content is image/jpeg"
    shown = describe_data_uri(lying)
    assert shown.startswith("data:image/png;base64,… (") and shown.endswith(" KB)")


async def test_the_simulator_applies_the_model_rules_to_decoded_bytes(simulator):
    sim = await simulator()
    async with RunComfyClient(sim.base_url, "t") as client:
        ok = await client.submit(DEFAULT_MODEL, {"prompt": "p", "image_urls": [
            data_uri(image_bytes(640, 480, "PNG"), "image/png")]})
        assert ok.request_id
        small = data_uri(image_bytes(300, 300), "image/jpeg")
        with pytest.raises(InvalidRequestError, match="image is 300x300; The shortest side must be at least 320"):
            await client.submit(DEFAULT_MODEL, {"prompt": "p", "image_urls": [small]})
        broken = small[:-1] + "!"  # not base64
        with pytest.raises(InvalidRequestError) as refused:
            await client.submit(DEFAULT_MODEL, {"prompt": "p", "image_urls": [broken]})
    assert f"image_urls[0]: {describe_data_uri(broken)}: the data: URI's base64 is not valid" in str(refused.value)


async def test_the_body_is_the_json_of_the_inputs_with_data_uris(tmp_path):
    make_image(tmp_path / "a.jpg", 640, 480)
    inputs = {"prompt": 'quote " and \\ and é', "image_urls": [local_ref(tmp_path / "a.jpg")] * 2, "seed": 1}
    body = inline_body(inputs)
    assert body is not None and body.size == request_size(canonical_json(inputs), [local_ref(tmp_path / "a.jpg")])

    class Wire:  # what aiohttp's writer is handed
        chunks: list[bytes] = []

        async def write(self, chunk: bytes) -> None:
            self.chunks.append(chunk)

    wire = Wire()
    await body.write(wire)
    uri = data_uri((tmp_path / "a.jpg").read_bytes(), "image/jpeg")
    assert b"".join(wire.chunks) == canonical_json({**inputs, "image_urls": [uri, uri]}).encode()
    assert body.size == len(b"".join(wire.chunks))


# ---- the README's standalone simulator -----------------------------------------------------------


def test_readme_standalone_simulator_runs_the_sample_with_its_local_images(samples, tmp_path):
    """As README's `batchgen simulate` section says: a simulator of its own, then `batchgen run` of
    the sample manifest with --api-url, local images and no image_base_url."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sim = subprocess.Popen([sys.executable, "-m", "batchgen.cli", "simulate", "--port", str(port),
                            "--duration", "0.2"], stderr=subprocess.PIPE, text=True)
    try:
        assert sim.stderr is not None and "listening" in sim.stderr.readline()
        env = {**os.environ, "RUNCOMFY_API_TOKEN": "anything"}
        run = subprocess.run([sys.executable, "-m", "batchgen.cli", "run", str(samples / "quickstart.yaml"),
                              "--api-url", f"http://127.0.0.1:{port}/v1", "-q"],
                             env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "quickstart: 6 succeeded" in run.stdout
        assert "image_base_url" not in yaml.safe_load((samples / "quickstart.yaml").read_text())
    finally:
        sim.terminate()
        sim.communicate(timeout=10)


# ---- video and audio inputs ----------------------------------------------------------------------


def media_schema(tmp_path):
    """A model that takes a video (MP4 under 1 MB) and a list of audio files."""
    path = tmp_path / "v2v.json"
    path.write_text(json.dumps({"model_id": "test/video-to-video", "input": {
        "type": "object", "required": ["prompt", "video_url"], "properties": {
            "prompt": {"type": "string"},
            "video_url": {"type": "string", "format": "video_uri", "validations": [
                {"validation_rule": "file_type_in", "validation_value": ["mp4"], "validation_error": "MP4 only."},
                {"validation_rule": "file_size_mb<", "validation_value": 1, "validation_error": "Under 1 MB."}]},
            "audio_urls": {"type": "array", "items": {"type": "string", "format": "audio_uri"}}}},
        "output": {"type": "object", "properties": {"video": {"type": "string"}}}}))
    return path


def wav_bytes(nbytes: int = 4000) -> bytes:
    return b"RIFF" + (nbytes - 8).to_bytes(4, "little") + b"WAVEfmt " + bytes(nbytes - 16)


async def test_video_and_audio_files_go_inline_and_are_checked_by_type_and_size(tmp_path, simulator):
    schema = media_schema(tmp_path)
    (tmp_path / "clip.mp4").write_bytes(make_video(None, 4))
    (tmp_path / "big.mp4").write_bytes(make_video(None, 4) + bytes(1_000_000))
    (tmp_path / "voice.wav").write_bytes(wav_bytes())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"schema": str(schema), "jobs": [
        {"prompt": "a", "video_url": "voice.wav"}, {"prompt": "b", "video_url": "big.mp4"},
        {"prompt": "c", "video_url": "clip.mp4", "audio_urls": ["clip.mp4"]}]}))
    problems = [(p.location, p.message) for p in (await validate_manifest(load_manifest(bad))).problems]
    wav, big, clip = ((tmp_path / n).resolve().as_uri() for n in ("voice.wav", "big.mp4", "clip.mp4"))
    assert problems == [
        ("line 2", f"{wav}: its content is audio/wav, not a video file"),
        ("line 4", f"{big}: file is {(tmp_path / 'big.mp4').stat().st_size:,} bytes; Under 1 MB (allowed: less "
                   "than 1,000,000 bytes; 1 MB = 1,000,000 bytes)"),
        ("line 6", f"{clip}: its content is video/mp4, not an audio file"),
    ]

    sim = await simulator(extra_schemas=[schema])
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"name": "v2v", "schema": str(schema), "jobs": [
        {"prompt": "a", "video_url": "clip.mp4", "audio_urls": ["voice.wav"]}]}))
    out = await app.run(run_options(tmp_path, sim, good))
    assert out.summary.finished == {S.SUCCEEDED: 1}
    (sent,) = sim.requests()["requests"]
    assert sent["input"]["video_url"].startswith("data:video/mp4;base64,… (")
    assert sent["input"]["audio_urls"][0] == "data:audio/wav;base64,… (4 KB)"
    async with RunComfyClient(sim.base_url, "t") as client:
        for declared, why in (("audio/wav", "its content is audio/wav, not a video file"),
                              ("video/mp4", "the data: URI says video/mp4 but its content is audio/wav")):
            with pytest.raises(InvalidRequestError, match=why):
                await client.submit("test/video-to-video",
                                    {"prompt": "p", "video_url": data_uri(wav_bytes(), declared)})


async def test_a_bare_file_uri_from_an_older_batchgen_is_never_sent_unchecked():
    with pytest.raises(InputFileError, match="recorded by an older batchgen without its checksum"):
        await prepare_body({"prompt": "p", "image_urls": ["file:///old/a.jpg"]}, FileChecks())
    # Text that merely starts like one is text.
    assert await prepare_body({"prompt": "file:// links are not followed", "seed": 1}, FileChecks()) is None
