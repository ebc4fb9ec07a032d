"""Small JPEG copies of a gallery's input images, inside the work directory.

A gallery shows each job's input image. Linking the original (``../../images/a.jpg``) breaks as
soon as the work directory is moved or copied without the manifest's folder, and printing a
data: URI's payload into the page would make it as large as every image together. So each
image is made once into ``<batch folder>/thumbs/<sha256>.jpg``: named by the digest of its
content (the one validation recorded in a ``file://...#sha256=`` reference), so the same image
in 100,000 jobs is one file, made once, and a second gallery of the batch reuses it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import unquote, urlsplit

from . import constants as C
from .inline import FileRef, decode_data_uri

THUMBS_DIR = "thumbs"


class Thumbnails:
    """Makes and remembers the thumbnails of one gallery: ``url(value)`` for each input value."""

    def __init__(self, folder: Path):
        self.folder = folder  # the page's folder: thumbnails go in folder/thumbs/
        self._by_value: dict[str, str | None] = {}
        self._made: dict[str, bool] = {}

    def url(self, value: str) -> str | None:
        """A URL relative to the page of the thumbnail of the local file or data: URI ``value``
        (None: not a local image, or not one Pillow can read)."""
        if value not in self._by_value:
            self._by_value[value] = self._make(value)
        return self._by_value[value]

    def _make(self, value: str) -> str | None:
        scheme = urlsplit(value).scheme.lower()
        if scheme == "data":
            try:
                data = decode_data_uri(value)[1]
            except ValueError:
                return None
            digest = hashlib.sha256(data).hexdigest()
            source: Path | bytes = data
        elif scheme == "file":
            ref = FileRef.parse(value)
            path = Path(ref.path) if ref else Path(unquote(urlsplit(value).path))
            found = ref.sha256 if ref else _file_digest(path)
            if found is None:
                return None
            digest, source = found, path
        else:
            return None
        name = f"{digest}.jpg"
        if digest not in self._made:
            self._made[digest] = (self.folder / THUMBS_DIR / name).exists() or _thumbnail(
                source, self.folder / THUMBS_DIR / name)
        return f"{THUMBS_DIR}/{name}" if self._made[digest] else None


def _file_digest(path: Path) -> str | None:
    try:
        with path.open("rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    except OSError:
        return None


def _thumbnail(source: Path | bytes, out: Path) -> bool:
    import io

    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.draft("RGB", (C.THUMB_SIDE, C.THUMB_SIDE))  # JPEG: decode at a fraction of the size
            img.thumbnail((C.THUMB_SIDE, C.THUMB_SIDE))
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.tmp")
            img.convert("RGB").save(tmp, "JPEG", quality=C.THUMB_QUALITY)
            tmp.replace(out)
            return True
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return False
