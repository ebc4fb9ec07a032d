"""Real image files for tests: JPEG, PNG (and GIF, WebP for the wrong types) of a given size,
optionally padded to an exact byte count while staying a valid, decodable image.

Padding goes where a decoder accepts optional data: JPEG comment (COM) segments right before the
end-of-image marker, a PNG ancillary (tEXt) chunk right before IEND; the header stays at the start,
so a 64 KiB probe still finds it. ``head_padding`` instead puts comment segments before a JPEG's
frame header, as a large EXIF block does, so the size marker lands late in the file (what a header
probe must cope with).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from PIL import Image, ImageDraw

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp"}
_COM_MAX = 0xFFFF - 2  # payload of one JPEG marker segment: its 2-byte length counts itself


def image_bytes(width: int, height: int, fmt: str = "JPEG") -> bytes:
    """A small, real image: a gradient with a shape on it (so encoders do real work)."""
    import io

    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(200, 90, 40))
    out = io.BytesIO()
    img.save(out, format=fmt, **({"quality": 85} if fmt.upper() == "JPEG" else {}))
    return out.getvalue()


def make_image(path: Path, width: int, height: int, fmt: str = "JPEG", nbytes: int | None = None) -> Path:
    """Write a ``fmt`` image of ``width`` x ``height`` to ``path``; exactly ``nbytes`` long if given."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = image_bytes(width, height, fmt)
    if nbytes is not None:
        data = pad(data, nbytes, fmt)
    path.write_bytes(data)
    return path


def pad(data: bytes, nbytes: int, fmt: str) -> bytes:
    """``data`` grown to exactly ``nbytes`` bytes, still a valid image of the same format."""
    extra = nbytes - len(data)
    if extra == 0:
        return data
    if extra < 0:
        raise ValueError(f"the image is already {len(data)} bytes, more than {nbytes}")
    fmt = fmt.upper()
    if fmt == "PNG":
        if extra < 12 + 4:
            raise ValueError("PNG padding needs at least 16 bytes")
        payload = b"pad\x00" + b"x" * (extra - 12 - 4)
        chunk = struct.pack(">I", len(payload)) + b"tEXt" + payload
        chunk += struct.pack(">I", zlib.crc32(b"tEXt" + payload) & 0xFFFFFFFF)
        iend = data.rindex(b"IEND") - 4  # the chunk's length field comes before its type
        out = data[:iend] + chunk + data[iend:]
    elif fmt == "JPEG":
        eoi = data.rindex(b"\xff\xd9")
        out = data[:eoi] + _com_segments(extra) + data[eoi:]
    else:
        raise ValueError(f"cannot pad {fmt}")
    assert len(out) == nbytes
    return out


def head_padding(data: bytes, nbytes: int) -> bytes:
    """A JPEG with ``nbytes`` of comment segments before its frame header (like a big EXIF block)."""
    return data[:_after_jfif(data)] + _com_segments(nbytes) + data[_after_jfif(data):]


def _after_jfif(data: bytes) -> int:
    """Offset just after SOI and, if present, the APP0 (JFIF) segment that must come first."""
    assert data[:2] == b"\xff\xd8", "not a JPEG"
    pos = 2
    if data[pos:pos + 2] == b"\xff\xe0":
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        pos += 2 + length
    return pos


def _com_segments(extra: int) -> bytes:
    """COM segments totalling exactly ``extra`` bytes (each is 4 bytes of framing + payload)."""
    if extra < 4:
        raise ValueError("JPEG padding needs at least 4 bytes")
    count = -(-extra // (_COM_MAX + 4))
    payload_total = extra - 4 * count
    out = []
    for i in range(count):
        size = payload_total // count + (1 if i < payload_total % count else 0)
        out.append(b"\xff\xfe" + struct.pack(">H", size + 2) + b"p" * size)
    return b"".join(out)
