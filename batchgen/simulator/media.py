"""The simulator's output files: a real, playable MP4 made from the input image (a slow zoom),
or a PNG for image models. Small and fast: 24 frames at 320x240 encode in a few milliseconds."""

from __future__ import annotations

import io

import av
from PIL import Image, ImageOps

VIDEO_SIZE = (320, 240)
VIDEO_FRAMES = 24
VIDEO_FPS = 24


def _source(image_bytes: bytes | None) -> Image.Image:
    if image_bytes:
        try:
            with Image.open(io.BytesIO(image_bytes)) as img:
                return img.convert("RGB")
        except (OSError, ValueError):
            pass
    return Image.new("RGB", VIDEO_SIZE, (90, 90, 110))


def make_video(image_bytes: bytes | None, frames: int = VIDEO_FRAMES) -> bytes:
    """An H.264 MP4 of ``frames`` frames zooming slowly into the image. Deterministic for the same
    input (single-threaded encoder), so a download's sha256 can be checked against it."""
    base = ImageOps.fit(_source(image_bytes), (VIDEO_SIZE[0] * 2, VIDEO_SIZE[1] * 2))
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height = VIDEO_SIZE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.codec_context.options = {"preset": "ultrafast"}
        w, h = base.size
        for i in range(frames):
            # Zoom from the whole image to its central 75%.
            z = 1.0 - 0.25 * i / max(1, frames - 1)
            cw, ch = int(w * z), int(h * z)
            box = ((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)
            # PyAV's stubs leave from_image unannotated.
            frame = av.VideoFrame.from_image(base.crop(box).resize(VIDEO_SIZE))  # type: ignore[no-untyped-call]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def make_image(image_bytes: bytes | None) -> bytes:
    """A PNG 'generated' from the input: the image mirrored, so it is visibly derived from it."""
    img = ImageOps.mirror(_source(image_bytes))
    img.thumbnail((512, 512))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
