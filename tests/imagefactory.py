"""Real image files for tests: JPEG, PNG (and others) of a given size, optionally padded to an
exact byte count while staying a valid image."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from PIL import Image


def make_image(path: Path, width: int, height: int, fmt: str = "JPEG", nbytes: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (width, height), (120, 160, 200))
    img.save(path, format=fmt)
    if nbytes is not None:
        pad_to(path, nbytes, fmt)
    return path


def pad_to(path: Path, nbytes: int, fmt: str) -> None:
    data = path.read_bytes()
    extra = nbytes - len(data)
    if extra < 0:
        raise ValueError(f"{path.name} is already {len(data)} bytes, more than {nbytes}")
    if fmt.upper() == "PNG":
        # An ancillary chunk before IEND: 12 bytes of framing + payload.
        if extra < 12:
            raise ValueError("PNG padding needs at least 12 bytes")
        payload = b"pad\x00" + b"x" * (extra - 12 - 4)
        chunk = struct.pack(">I", len(payload)) + b"tEXt" + payload
        chunk += struct.pack(">I", zlib.crc32(b"tEXt" + payload) & 0xFFFFFFFF)
        iend = data.rindex(b"IEND") - 4
        data = data[:iend] + chunk + data[iend:]
    else:
        # Bytes after the JPEG end marker: decoders ignore them, the file size counts them.
        data += b"\x00" * extra
    path.write_bytes(data)
    assert path.stat().st_size == nbytes
