"""Image references in a manifest: what a job's image fields name, turned into what is sent.

A reference is an https:// URL (plain http only for loopback), a ``data:`` URI, or a local file
(a path, relative to the file that wrote it, or a file:// URL). A local file is sent inline at
submit time (inline.py), or, with ``image_base_url``, as the URL it is published at. Either way
the job key counts a local file by its content (``sha256:...``), not by its path.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from ..inline import FileRef, sniff_mime

# Friendly names for a model's one image field (Dreamina wants a one-item list `image_urls`).
IMAGE_ALIASES = ("image", "image_url", "image_urls", "images", "image_path")
LIST_SEPARATOR = "|"  # several values in one CSV cell: "a.jpg|b.jpg"
# Without a schema, fields whose names look like these may hold local image paths.
_IMAGE_NAME = re.compile(r"(image|img)", re.IGNORECASE)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".avif"}
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}

# What a reference becomes: (value to send, local file or None); a problem as a string; or None
# to leave the value alone.
Resolved = tuple[str, Path | None] | str | None


@dataclass(frozen=True)
class FixedFile:
    """A compliant copy sent instead of a local file (fiximages.py), and what the job key counts
    for it: the source's bytes and what was done to them, not the copy's bytes. A copy encoded
    again (another Pillow or libjpeg, another machine, ``fixed/`` deleted) is then the same job,
    never paid twice. What is sent is still checked byte for byte: the copy's own sha256 and size
    are in its file reference, as for any local file (inline.py)."""

    path: Path
    key: str


# The hook `validate --fix` sets (fiximages.ImageFixer): a local file sent inline and its field ->
# the file itself (it passes), a compliant copy to send instead, or a problem as a string.
Fixer = Callable[[Path, str], Path | FixedFile | str]


def is_image_name(name: str) -> bool:
    """Without a schema: whether a field's name says it holds an image (image_url, img_url, ...)."""
    return _IMAGE_NAME.search(name) is not None


def is_loopback_host(host: str | None) -> bool:
    """127.0.0.0/8, ::1 and localhost: the only hosts plain http:// is allowed for."""
    if not host:
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listify(value: Any, is_list: bool) -> Any:
    """A string for a list field becomes a list ('a.jpg|b.jpg' for several); a one-item list for a
    single-URL field becomes its item."""
    if is_list and isinstance(value, str):
        return [v.strip() for v in value.split(LIST_SEPARATOR) if v.strip()]
    if not is_list and isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


class ImageRefs:
    """Resolves a manifest's image references, each (reference, folder) once and each local file
    hashed once: thousands of rows name the same few images.

    ``bad`` holds the references found unusable (already reported), which validation skips.
    """

    def __init__(self, manifest_folder: Path, image_base_url: str | None, *, schema_known: bool):
        self.manifest_folder = manifest_folder
        self.image_base_url = image_base_url
        self.schema_known = schema_known
        self.bad: set[str] = set()
        self._resolved: dict[tuple[str, Path], Resolved] = {}
        self._files: dict[Path, FileRef] = {}
        self.fixer: Fixer | None = None

    def resolve_inputs(self, inputs: dict[str, Any], fields: Iterable[str], folder_of: dict[str, Path],
                       default_folder: Path) -> tuple[dict[str, str], dict[str, Any], list[tuple[str, str]]]:
        """Turn the references in ``inputs``' image ``fields`` (in place) into what is sent.
        Returns the local files behind them (sent value -> path), the inputs as the key sees
        them (a local file by its content), and the problems met as (field, message).
        ``folder_of``: the folder a field's relative paths start from, if not ``default_folder``."""
        local_files: dict[str, str] = {}
        key_inputs = inputs
        problems: list[tuple[str, str]] = []
        for fname in fields:
            value = inputs.get(fname)
            if value is None:
                continue
            folder = folder_of.get(fname, default_folder)
            sent, keyed = [], []
            for ref in value if isinstance(value, list) else [value]:
                url, key, path, problem = self._one(ref, folder, fname)
                if problem:
                    problems.append((fname, problem))
                sent.append(url)
                keyed.append(key)
                if path is not None:
                    local_files[url] = path
            inputs[fname] = sent if isinstance(value, list) else sent[0]
            if keyed != sent or key_inputs is not inputs:
                if key_inputs is inputs:
                    key_inputs = dict(inputs)
                key_inputs[fname] = keyed if isinstance(value, list) else keyed[0]
        return local_files, key_inputs, problems

    def _one(self, ref: Any, folder: Path, field: str) -> tuple[Any, Any, str | None, str | None]:
        """(value sent, value keyed, local file or None, problem or None) for one reference."""
        res = self.resolve(ref, folder) if isinstance(ref, str) else None
        if isinstance(res, str):
            self.bad.add(ref)
            return ref, ref, None, res
        if res is None:
            return ref, ref, None, None
        url, path = res
        if path is None:
            return url, url, None, None
        keyed = None
        if self.fixer is not None and url.startswith("file://"):  # sent inline: a copy may go instead
            fixed = self.fixer(path, field)
            if isinstance(fixed, str):
                self.bad.add(url)
                return url, url, None, fixed
            if isinstance(fixed, FixedFile):
                path, keyed = fixed.path, fixed.key
        facts = self.file_facts(path)
        if facts is None:
            self.bad.add(url)
            return url, "sha256:None", None, f"cannot read local file {ref}"
        if url.startswith("file://"):
            url = facts.uri  # sent inline at submit time; recorded with what it was when validated
        return url, keyed or f"sha256:{facts.sha256}", str(path), None

    def resolve(self, ref: str, folder: Path) -> Resolved:
        """(value to send, local file or None), a problem as a string, or None to leave the value
        alone (without a schema, a value that does not look like an image)."""
        cache_key = (ref, folder)
        if cache_key not in self._resolved:
            self._resolved[cache_key] = self._resolve(ref, folder)
        return self._resolved[cache_key]

    def _resolve(self, ref: str, folder: Path) -> Resolved:
        if ref.startswith("data:"):
            return ref, None  # the file itself, written inline: validation decodes its header
        parts = urlsplit(ref)
        if parts.scheme in ("http", "https"):
            if not parts.netloc:
                return f"{ref}: not a complete URL"
            if parts.scheme == "http" and not is_loopback_host(parts.hostname):
                return f"{ref}: plain http is allowed only for loopback addresses; use https://"
            return ref, None
        if parts.scheme and len(parts.scheme) > 1 and parts.scheme != "file":  # one letter: a Windows drive
            return f"{ref}: unsupported scheme '{parts.scheme}'; use an https:// URL or a local file path"
        path = Path(parts.path if parts.scheme == "file" else ref).expanduser()
        path = (path if path.is_absolute() else folder / path).resolve()
        if not path.is_file():
            if not self.schema_known and parts.scheme != "file" and path.suffix.lower() not in _IMAGE_SUFFIXES:
                return None  # no schema says this is an image; it is probably just text
            return f"local image not found: {ref} (looked for {path})"
        if self.image_base_url:
            return self._published(ref, path)
        return path.as_uri(), path

    def _published(self, ref: str, path: Path) -> Resolved:
        """The URL a local file is published at under ``image_base_url``."""
        assert self.image_base_url is not None
        try:
            rel = path.relative_to(self.manifest_folder)
        except ValueError:
            return (f"{ref} is outside the manifest's folder, so image_base_url cannot say where it is "
                    "published; move it under the manifest's folder")
        return self.image_base_url + "/" + "/".join(quote(p) for p in rel.parts), path

    def file_facts(self, path: Path) -> FileRef | None:
        """sha256 (a local file's identity in the job key), size and type of a local file, once
        per file; None if it cannot be read."""
        facts = self._files.get(path)
        if facts is None:
            h = hashlib.sha256()
            size = 0
            try:
                with open(path, "rb") as fh:
                    head = fh.read(1 << 20)
                    block = head
                    while block:
                        h.update(block)
                        size += len(block)
                        block = fh.read(1 << 20)
            except OSError:
                return None
            facts = self._files[path] = FileRef(str(path), h.hexdigest(), size, sniff_mime(head[:64]))
        return facts
