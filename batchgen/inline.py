"""Local input files sent inline, as ``data:`` URIs in the model's own field.

RunComfy's own ComfyUI nodes send every local image, video and audio input this way, and the Model
API stores it as a hosted input (runcomfy-api.md, "Input files"). batchgen does the same, so a
folder of the user's own images works against the real API with nothing published anywhere.

What the store keeps is not the base64 but a *file reference*: the file's ``file://`` URI with
what validation recorded in its fragment, ``file:///photos/a.jpg#sha256=<hex>&size=<bytes>&type=image/jpeg``
(a 1,000-job batch of 4 MB images would otherwise put 5 GB into SQLite). At submit time the body
is built around it: the JSON text of the inputs, with each reference replaced by
``data:<type>;base64,...`` streamed from the file in chunks (``InlineBody``), never the whole
batch's files in memory. Before a file is sent it is checked against its recorded size and
sha256 (``FileChecks``: hashed once per run, then a stat per submit); the bytes are hashed again
as they stream, and a mismatch aborts the body before its last chunk, so the service never
receives a complete request with other bytes than were validated.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from aiohttp import Payload
from aiohttp.abc import AbstractStreamWriter

from . import constants as C
from .errors import UsageError


class InputFileError(UsageError):
    """A local input file cannot be sent as validated: changed, removed, or too large a request."""


class FixedCopyError(InputFileError):
    """A copy made by --fix-images is gone or not as validated: nothing was sent, and only the
    manifest run again with --fix-images makes it again (a retry would meet the same file)."""


# ---- what a file is, from its content ----------------------------------------------------------

# ISO base media files (MP4, MOV, HEIC, AVIF, M4A) say what they are in the brand of their ftyp box.
_FTYP_BRANDS = {b"heic": "image/heic", b"heix": "image/heic", b"mif1": "image/heif", b"avif": "image/avif",
                b"qt  ": "video/quicktime", b"M4A ": "audio/mp4", b"M4B ": "audio/mp4"}


def sniff_mime(head: bytes) -> str | None:
    """The MIME type of a file from its first bytes (16 are enough), never from its name."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "image/tiff"
    if head.startswith(b"BM"):
        return "image/bmp"
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12], "video/mp4")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        # Frame sync: MPEG audio; 0xFFF1/0xFFF9 is AAC in ADTS frames.
        return "audio/aac" if head[1] in (0xF1, 0xF9) else "audio/mpeg"
    return None


def describe_data_uri(uri: str) -> str:
    """A data: URI as messages show it: its type and size, never its payload
    (``data:image/png;base64,… (146 KB)``)."""
    header, _, payload = uri.partition(",")
    size = len(payload) * 3 // 4 if header.endswith(";base64") else len(payload)
    return f"{header[:80]},… ({_human(size)})"


def shown(ref: str) -> str:
    """An input reference fit for a message: a data: URI without its payload, a file reference
    without its recorded fragment."""
    if ref.startswith("data:"):
        return describe_data_uri(ref)
    if ref.startswith("file://"):
        return ref.partition("#")[0]
    return ref


def _human(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1_000_000 else f"{max(1, round(n / 1000))} KB"


def decode_data_uri(uri: str) -> tuple[str, bytes]:
    """(MIME type as written, decoded bytes) of a ``data:`` URI; ValueError says what is wrong."""
    header, comma, payload = uri.partition(",")
    if not comma or not header.startswith("data:"):
        raise ValueError("not a data: URI (data:<type>;base64,<data>)")
    params = header[5:].split(";")
    if "base64" not in params[1:]:
        raise ValueError("a data: URI of a file must be base64 (data:<type>;base64,<data>)")
    try:
        return params[0].strip().lower(), base64.b64decode(payload, validate=True)
    except ValueError as exc:
        raise ValueError(f"the data: URI's base64 is not valid: {exc}") from None


def read_data_uri(uri: str) -> tuple[str | None, bytes]:
    """(MIME type from the content, decoded bytes) of a ``data:`` URI; ValueError says what is
    wrong, including a declared type the content contradicts."""
    declared, data = decode_data_uri(uri)
    actual = sniff_mime(data[:64])
    if actual is not None and declared and declared.replace("/jpg", "/jpeg") != actual:
        raise ValueError(f"the data: URI says {declared} but its content is {actual}")
    return actual, data


# ---- file references ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FileRef:
    """A local file as a job records it: where it is and what validation found there."""

    path: str
    sha256: str
    size: int
    mime: str | None  # None: the content is of no type batchgen knows (validation refuses it)

    @functools.cached_property
    def uri(self) -> str:
        """The reference as recorded: ``file:///a.jpg#sha256=<hex>&size=<bytes>&type=image/jpeg``."""
        fragment = f"sha256={self.sha256}&size={self.size}"
        if self.mime:
            fragment += f"&type={quote(self.mime, safe='/')}"
        return f"{Path(self.path).as_uri()}#{fragment}"

    @classmethod
    def parse(cls, ref: str) -> FileRef | None:
        """The reference's facts, or None for anything else (a URL, or a bare file:// URI recorded
        by a batchgen older than inline files)."""
        if not ref.startswith("file://") or "#" not in ref:
            return None
        return _parse_ref(ref)

    @classmethod
    def _parse(cls, ref: str) -> FileRef | None:
        parts = urlsplit(ref)
        facts = {k: v[0] for k, v in parse_qs(parts.fragment).items()}
        if "sha256" not in facts or not facts.get("size", "").isdigit():
            return None
        return cls(unquote(parts.path), facts["sha256"], int(facts["size"]), facts.get("type"))

    def data_uri_prefix(self) -> bytes:
        return f"data:{self.mime or 'application/octet-stream'};base64,".encode()

    def data_uri_length(self) -> int:
        return len(self.data_uri_prefix()) + 4 * ((self.size + 2) // 3)


@functools.lru_cache(maxsize=4096)  # thousands of jobs name the same few files
def _parse_ref(ref: str) -> FileRef | None:
    return FileRef._parse(ref)


def local_files(inputs: dict[str, Any]) -> list[FileRef]:
    """Every file reference among the values of ``inputs`` (lists included)."""
    found = []
    for value in inputs.values():
        for v in value if isinstance(value, list) else (value,):
            if isinstance(v, str) and v.startswith("file://"):
                ref = FileRef.parse(v)
                if ref is None and not any(c.isspace() for c in v):  # text that starts so is no file
                    raise InputFileError(
                        f"input {v} was recorded by an older batchgen without its checksum, so it cannot be "
                        "sent inline safely; run the manifest again under a new batch name (--batch)")
                if ref is not None:
                    found.append(ref)
    return found


# ---- the request body --------------------------------------------------------------------------


def _pieces(inputs: dict[str, Any]) -> tuple[list[bytes], list[FileRef]]:
    """The inputs' JSON text cut around each file reference: ``pieces[i]`` comes before
    ``files[i]`` (one entry per occurrence), the last piece after the last file."""
    from .jobkeys import canonical_json

    marker = uuid.uuid4().hex  # in no user's text: the cut points are ours alone
    files: list[FileRef] = []

    def swap(v: Any) -> Any:
        if isinstance(v, list):
            return [swap(x) for x in v]
        ref = FileRef.parse(v) if isinstance(v, str) else None
        if ref is None:
            return v
        files.append(ref)
        return f"{marker}{len(files) - 1}"

    text = canonical_json({k: swap(v) for k, v in inputs.items()})
    # Each reference is now the JSON string "<marker><n>": cut just inside its quotes.
    cut = re.split(f'(?<=")({marker}\\d+)(?=")', text)
    pieces = [p.encode() for p in cut[0::2]]
    order = [files[int(m[len(marker):])] for m in cut[1::2]]
    return pieces, order


def request_size(inputs_json: str, refs: Iterable[str]) -> int:
    """Bytes of the submit body for inputs recorded as ``inputs_json`` (canonical JSON) once each
    file reference among ``refs`` is a data: URI. Counted in the text: a reference stands in it
    as a whole JSON string, which a quote inside a prompt (always escaped) cannot imitate."""
    size = len(inputs_json.encode())
    for ref in refs:
        file_ref = FileRef.parse(ref)
        if file_ref is not None:
            size += inputs_json.count(f'"{ref}"') * (file_ref.data_uri_length() - len(ref))
    return size


def too_large(size: int) -> str:
    return (f"the request would be {size:,} bytes with its local files inlined as base64; RunComfy "
            f"accepts at most {C.MAX_REQUEST_BYTES:,} (64 MiB): publish the largest files and give "
            "image_base_url, or use fewer or smaller files")


class FileChecks:
    """Whether each local file is still what validation recorded: a whole sha256 once per run
    and file, then a stat (size and mtime) per submit; a changed stat means hashing again."""

    def __init__(self) -> None:
        self._verified: dict[tuple[str, str], tuple[int, int]] = {}  # (path, sha256) -> (size, mtime_ns)
        self._hashing: dict[tuple[str, str], asyncio.Future[None]] = {}

    async def verify(self, ref: FileRef) -> None:
        key = (ref.path, ref.sha256)
        try:
            st = os.stat(ref.path)
        except OSError as exc:
            raise _changed(ref, f"cannot be read ({exc.strerror or exc})") from None
        if st.st_size != ref.size:
            raise _changed(ref, f"is {st.st_size:,} bytes, was {ref.size:,}")
        if self._verified.get(key) == (st.st_size, st.st_mtime_ns):
            return
        pending = self._hashing.get(key)
        if pending is None:  # one hash however many jobs ask at once
            pending = self._hashing[key] = asyncio.ensure_future(self._hash(ref))
        try:
            await asyncio.shield(pending)
        finally:
            if pending.done():
                self._hashing.pop(key, None)

    async def _hash(self, ref: FileRef) -> None:
        def digest() -> tuple[str, os.stat_result]:
            h = hashlib.sha256()
            with open(ref.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            return h.hexdigest(), st

        try:
            found, st = await asyncio.to_thread(digest)
        except OSError as exc:
            raise _changed(ref, f"cannot be read ({exc.strerror or exc})") from None
        if found != ref.sha256 or st.st_size != ref.size:
            raise _changed(ref, "has other content")
        self._verified[(ref.path, ref.sha256)] = (st.st_size, st.st_mtime_ns)


# A copy fiximages.py made: WORKDIR/fixed/<sha256 of source and fix>-<sha256 of its bytes>.<ext>.
_FIXED_COPY = re.compile(r"[0-9a-f]{32}-[0-9a-f]{32}\.(png|jpg|webp)")


def _changed(ref: FileRef, how: str) -> InputFileError:
    path = Path(ref.path)
    if path.parent.name == C.FIXED_DIR and _FIXED_COPY.fullmatch(path.name):
        return FixedCopyError(f"local file {ref.path} {how}: a copy made by --fix-images, gone or changed since "
                              "it was validated")
    return InputFileError(f"local file {ref.path} {how}: changed since it was validated: run validate again")


class InlineBody(Payload):
    """A submit body: the inputs' JSON with each local file streamed in as a base64 data: URI.

    Its size is known in advance (Content-Length, no chunked upload). Each file is read in
    chunks of INLINE_CHUNK bytes and hashed as it goes; if what is read is not what was validated,
    the write stops before the body's end (aiohttp then drops the connection), so the service
    never has a complete request to act on.
    """

    _autoclose = True  # it holds no file open between writes

    def __init__(self, pieces: list[bytes], files: list[FileRef]):
        super().__init__(None, content_type="application/json")
        self._parts = pieces
        self._files = files
        self._size = sum(map(len, pieces)) + sum(r.data_uri_length() for r in files)

    @property
    def files(self) -> list[FileRef]:
        return list(self._files)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return f"<request body of {self._size:,} bytes with {len(self._files)} inline file(s)>"

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        for i, ref in enumerate(self._files):
            await writer.write(self._parts[i])
            await writer.write(ref.data_uri_prefix())
            for chunk in _base64_chunks(ref):
                await writer.write(chunk)
        await writer.write(self._parts[-1])


def _base64_chunks(ref: FileRef) -> Iterator[bytes]:
    """The file as base64, INLINE_CHUNK bytes of it at a time (a multiple of 3: no padding
    inside). Each chunk is sent only once the next one is read, and the last one only once the
    whole file hashed to what was validated."""
    h = hashlib.sha256()
    got = 0
    held = b""
    try:
        with open(ref.path, "rb") as fh:
            while block := fh.read(C.INLINE_CHUNK):
                h.update(block)
                got += len(block)
                if got > ref.size:
                    break
                if held:
                    yield base64.b64encode(held)
                held = block
    except OSError as exc:
        raise _changed(ref, f"cannot be read ({exc.strerror or exc})") from None
    if got != ref.size or h.hexdigest() != ref.sha256:
        raise _changed(ref, "changed while it was being sent")
    if held:
        yield base64.b64encode(held)


def inline_body(inputs: dict[str, Any]) -> InlineBody | None:
    """The body for ``inputs`` if they name local files (None: send them as they are)."""
    refs = local_files(inputs)
    if not refs:
        return None
    pieces, order = _pieces(inputs)
    body = InlineBody(pieces, order)
    if body.size is not None and body.size > C.MAX_REQUEST_BYTES:
        raise InputFileError(too_large(body.size))
    return body


async def prepare_body(inputs: dict[str, Any], checks: FileChecks) -> InlineBody | None:
    """``inline_body`` once every file it sends has been checked against what was validated."""
    body = inline_body(inputs)
    if body is not None:
        for ref in {r.uri: r for r in body.files}.values():
            await checks.verify(ref)
    return body
