"""Compliant copies of local input images that fail only on format or size (`validate --fix`,
`run --fix-images`, `plan --fix`).

What a copy is, per failed rule of the field's ``validations`` (schema.py's ``Rule``):

- ``file_type``: PNG, lossless, so what was checked is what the model sees; JPEG instead when the
  source is a photo codec (JPEG, HEIC, AVIF) with no transparency and JPEG is allowed (a PNG of a
  photo is five to ten times larger and meets the size limit first), or when PNG is not allowed.
- ``width_pixels``/``height_pixels`` upper bounds: scaled down (Lanczos) to fit, ratio kept.
  Lower bounds: scaled up only with ``upscale`` (an upscaled input is a blurred input: the user
  decides); without it the image stays a problem, with a hint naming the option.
- ``width/height``: padded (centred, transparent or black bars) or cropped (centred) to the
  nearest allowed ratio, only as ``ratio`` says; no silent default.
- ``file_size_mb``: re-encoded, then scaled down by steps until it fits.

Copies go to ``WORKDIR/fixed/``, named by the source's sha256 and the fix (the rules and options
that shaped it), so a second run finds the copy the first made, then by the sha256 of the copy's
own bytes, so a copy damaged since (truncated, emptied) is known and made again. The job key counts the source's
sha256 and what was done to it (``FixedFile.key``), not the copy's bytes: a copy encoded again
(another Pillow or libjpeg, another machine, ``FIX_VERSION`` bumped, ``fixed/`` deleted) is the
same job, never paid twice, while the submit still checks the copy it sends against the copy's
own recorded sha256 (inline.py). Originals are never written. An image that cannot
be read is left to validation, which says why; one whose header claims more than
``MAX_FIX_PIXELS`` is refused before a pixel is decoded.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import math
import os
import shlex
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from PIL import Image, ImageOps

from . import constants as C
from .images import ImageInfo, ImageProbeError, probe_bytes, probe_file
from .manifest import FixedFile
from .schema import ModelSchema, Rule, explain_failures

# Bumped whenever the same source and rules would give other bytes: old copies are then not reused
# (the job keys do not change: they count what is done, not the bytes it gives).
FIX_VERSION = 1
RATIO_CHOICES = ("pad", "crop")
_PIXEL_SUBJECTS = ("width_pixels", "height_pixels", "width/height")
_PHOTO_FORMATS = {"jpeg", "heif", "heic", "avif"}
_WRITABLE = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# ISO base media "brands" of HEIC/HEIF files (bytes 8-12): what to name when Pillow cannot read one.
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")


@dataclass(frozen=True)
class FixOptions:
    """What the user allowed beyond format and scaling down."""

    upscale: bool = False
    ratio: str | None = None  # "pad", "crop", or None: a ratio out of range stays a problem


@dataclass(frozen=True)
class Fixed:
    """One copy made (or found from an earlier run) and what it changed."""

    source: Path
    copy: Path
    change: str  # "street.webp: WEBP -> PNG, 4096x4096 -> 2048x2048 (over 2048 px)"


class _Unfixable(Exception):
    """This image cannot be made to pass: the message says why (and which option would help)."""


def heif_support() -> bool:
    """Whether HEIC/HEIF files can be read: pillow-heif (the `heic` extra) registers them with Pillow."""
    try:
        importlib.import_module("pillow_heif").register_heif_opener()
    except ImportError:
        return False
    return True


class ImageFixer:
    """The hook ``ImageRefs.fixer``: a local file and its field -> the file itself when it passes,
    a compliant copy (``FixedFile``), or a problem as a string. Each (file, field) once."""

    def __init__(self, schema: ModelSchema, folder: Path, options: FixOptions):
        self.schema = schema
        self.folder = Path(folder).resolve()  # the copies are sent as file:// URIs: absolute
        self.options = options
        self.fixed: list[Fixed] = []  # in the order met, each copy once
        self._done: dict[tuple[Path, str], Path | FixedFile | str] = {}
        self._heif = heif_support()
        self._listing: dict[str, list[str]] | None = None  # _copies

    def __call__(self, path: Path, field: str) -> Path | FixedFile | str:
        key = (path, field)
        if key not in self._done:
            self._done[key] = self._fix(path, field)
        return self._done[key]

    def changes(self) -> list[str]:
        return [f.change for f in self.fixed]

    def _fix(self, path: Path, field: str) -> Path | FixedFile | str:
        rules = self.schema.rules.get(field, []) if field in self.schema.image_fields() else []
        if not rules:
            return path
        try:
            info = probe_file(path)
        except ImageProbeError:
            if not self._heif and _is_heif(path):
                return (f"{path.name}: a HEIC/HEIF image, which batchgen reads only with pillow-heif "
                        "installed (pip install pillow-heif, or batchgen[heic])")
            return path  # unreadable: validation says why, as it does without --fix
        failing = [r for r in rules if not r.passes(info)]
        if not failing:
            return path
        try:
            made, change = self._make(path, info, rules, failing)
        except _Unfixable as exc:
            return f"{path.name}: {exc}"
        if not any(f.copy == made.path for f in self.fixed):
            self.fixed.append(Fixed(path, made.path, f"{path.name}: {change}"))
        return made

    def _make(self, path: Path, info: ImageInfo, rules: list[Rule], failing: list[Rule]) -> tuple[FixedFile, str]:
        if info.width * info.height > C.MAX_FIX_PIXELS:
            raise _Unfixable(f"{info.width}x{info.height} is {info.width * info.height:,} pixels, more than "
                             f"batchgen decodes to fix an image ({C.MAX_FIX_PIXELS:,}); scale it down yourself")
        limits = _Limits(rules)
        data = _read_source(path)
        with _opened(data) as im:
            oriented = _oriented_size(im)
            plan = limits.plan(oriented, self.options, failing, info)
            fmt = limits.target_format(info.format, _has_alpha(im))
            source = hashlib.sha256(data).hexdigest()
            # The job key: the source's bytes and what is done to them (not the options given,
            # so --upscale on an image that needs none is the same job; not how they are
            # encoded, so a copy encoded again is the same job).
            key = "fixed:" + json.dumps([source, fmt, plan.framed, plan.size, plan.ratio_step, limits.max_bytes],
                                        separators=(",", ":"))
            # The copy's name: that, and how it is encoded (a new FIX_VERSION makes new copies).
            recipe = json.dumps([FIX_VERSION, limits.min_w, limits.min_h], separators=(",", ":"))
            stem = hashlib.sha256(f"{key}\n{recipe}".encode()).hexdigest()[:32]
            ext = "jpg" if fmt == "jpeg" else fmt
            found = self._cached(stem, ext)  # made by an earlier run from the same bytes and rules
            if found is None:
                out, done = _render(im, plan, fmt, limits)
                copy = self.folder / f"{stem}-{hashlib.sha256(out).hexdigest()[:32]}.{ext}"
                try:
                    _write_atomically(copy, out)
                except OSError as exc:
                    raise _Unfixable(f"cannot write its copy into {self.folder}: {exc.strerror or exc}") from exc
                self._copies().setdefault(stem, []).append(copy.name)
            else:
                copy, done = found
        return FixedFile(copy, key), plan.describe(info, fmt, done, limits)

    def _copies(self) -> dict[str, list[str]]:
        """The copies in the folder by the stem of their name, listed once (one listing, not one
        per image: a batch may fix thousands)."""
        if self._listing is None:
            self._listing = {}
            with contextlib.suppress(OSError):  # no folder yet: no copies
                for name in sorted(os.listdir(self.folder)):
                    stem, dash, rest = name.partition("-")
                    if dash and not name.startswith("."):  # ".<name>.<pid>.part": a copy being written
                        self._listing.setdefault(stem, []).append(name)
        return self._listing

    def _cached(self, stem: str, ext: str) -> tuple[Path, ImageInfo] | None:
        """A copy made earlier, if one is whole: its name ends in the sha256 of its bytes, so a
        copy truncated, emptied or written over is known, removed and made again (never sent,
        and never a problem the user cannot get past)."""
        for name in self._copies().get(stem, []):
            path = self.folder / name
            expected = name.partition("-")[2].removesuffix(f".{ext}")
            if len(expected) != 32 or not name.endswith(f".{ext}"):
                continue
            try:
                data = path.read_bytes()
                if hashlib.sha256(data).hexdigest()[:32] == expected:
                    return path, probe_bytes(data, len(data))
            except (OSError, ImageProbeError):
                pass
            with contextlib.suppress(OSError):
                path.unlink()  # damaged: the copy is made again, under the name of its new bytes
        return None


class FixHints:
    """The hook ``ImageRefs.fixer`` of a plain validate or run (no --fix): every file is sent as
    it is, and the (file, field) pairs are only noted. If validation finds problems, ``hint``
    says in one line how many images --fix would fix, and with which options (the pixels are
    not decoded: the header, orientation and transparency decide)."""

    def __init__(self, schema: ModelSchema):
        self.schema = schema
        self._met: dict[tuple[Path, str], None] = {}  # in the order met, each once

    def __call__(self, path: Path, field: str) -> Path:
        self._met[(path, field)] = None
        return path

    def hint(self, manifest: Path) -> str | None:
        images: set[Path] = set()
        needs: set[str] = set()
        for path, field in self._met:
            found = _options_needed(self.schema, path, field)
            if found is not None:
                images.add(path)
                needs.update(found)
        if not images:
            return None
        options = "".join(f" {o}" for o in ("--upscale", "--fix-ratio pad") if o in needs)
        either = " (or --fix-ratio crop)" if "--fix-ratio pad" in needs else ""
        return (f"hint: {len(images)} image(s) can be fixed by copies: batchgen validate "
                f"{shlex.quote(str(manifest))} --fix{options}{either} shows what would change")


def _options_needed(schema: ModelSchema, path: Path, field: str) -> list[str] | None:
    """The options --fix would need to fix this image ([]: none), or None if it passes, or is
    not one --fix can fix."""
    rules = schema.rules.get(field, []) if field in schema.image_fields() else []
    try:
        info = probe_file(path)
    except ImageProbeError:
        return None
    failing = [r for r in rules if not r.passes(info)]
    if not failing or info.width * info.height > C.MAX_FIX_PIXELS or info.size > C.MAX_FIX_SOURCE_BYTES:
        return None
    limits = _Limits(rules)
    try:
        with _opened(path) as im:
            plan = limits.plan(_oriented_size(im), FixOptions(upscale=True, ratio="pad"), failing, info)
            limits.target_format(info.format, _has_alpha(im))
    except _Unfixable:
        return None
    return ((["--upscale"] if plan.size[0] > plan.framed[0] else [])
            + (["--fix-ratio pad"] if plan.ratio_step else []))


@dataclass(frozen=True)
class _Plan:
    """The pixel work, decided from the header: ratio fix, then one scale."""

    oriented: tuple[int, int]  # the picture as seen (EXIF orientation applied)
    framed: tuple[int, int]  # after padding or cropping
    size: tuple[int, int]  # after scaling
    ratio_step: str | None  # "padded" / "cropped"
    ratio_reason: str
    scale_reason: str

    def describe(self, info: ImageInfo, fmt: str, done: ImageInfo, limits: _Limits) -> str:
        """What the copy changed, in the words of the rule each change answers."""
        parts = []
        if _norm(info.format) != fmt:
            parts.append(f"{info.format.upper()} -> {fmt.upper()}")
        if self.oriented != (info.width, info.height):
            parts.append("turned upright (EXIF orientation)")
        w, h = self.oriented
        if self.ratio_step:
            parts.append(f"{w}x{h} {self.ratio_step} to {self.framed[0]}x{self.framed[1]} ({self.ratio_reason})")
            w, h = self.framed
        if (done.width, done.height) != (w, h):
            reason = self.scale_reason
            if (done.width, done.height) != self.size:
                reason = f"over {limits.max_bytes:,} bytes"
            parts.append(f"{w}x{h} -> {done.width}x{done.height} ({reason})")
        if limits.max_bytes is not None and info.size > limits.max_bytes:
            parts.append(f"{info.size:,} -> {done.size:,} bytes (over {limits.max_bytes:,})")
        return ", ".join(parts) or "re-encoded"


class _Limits:
    """A field's rules as numbers to aim at; ``ok`` (the rules themselves) has the last word."""

    def __init__(self, rules: list[Rule]):
        self.rules = rules
        self.types: list[str] | None = None
        self.max_w: int | None = None
        self.max_h: int | None = None
        self.min_w: int | None = None
        self.min_h: int | None = None
        self.max_ratio: Fraction | None = None
        self.min_ratio: Fraction | None = None
        self.max_bytes: int | None = None
        for r in rules:
            if r.subject == "file_type":
                kinds = r.value if isinstance(r.value, list) else [r.value]
                self.types = [_norm(str(k)) for k in kinds]
                continue
            if r.op == "_in":
                continue  # a list of exact values: nothing to aim at, `ok` decides
            v = Fraction(str(r.value))
            upper, lower = r.op in ("<", "<=", "=="), r.op in (">", ">=", "==")
            if r.subject == "file_size_mb" and upper:
                limit = v * 1_000_000
                self.max_bytes = _floor_below(limit, strict=r.op == "<")
            elif r.subject in ("width_pixels", "height_pixels"):
                attr = "w" if r.subject == "width_pixels" else "h"
                if upper:
                    setattr(self, f"max_{attr}", _floor_below(v, strict=r.op == "<"))
                if lower:
                    setattr(self, f"min_{attr}", _ceil_above(v, strict=r.op == ">"))
            elif r.subject == "width/height":
                if upper:
                    self.max_ratio = v
                if lower:
                    self.min_ratio = v

    def ok(self, w: int, h: int, subjects: tuple[str, ...] = _PIXEL_SUBJECTS) -> bool:
        probe = ImageInfo("png", w, h, 0)
        return all(r.passes(probe) for r in self.rules if r.subject in subjects)

    def plan(self, size: tuple[int, int], options: FixOptions, failing: list[Rule], info: ImageInfo) -> _Plan:
        w, h = size
        step, why = None, ""
        if not self.ok(w, h, ("width/height",)):
            ratio_rules = [r for r in self.rules if r.subject == "width/height" and not r.passes(info)]
            said = "; ".join(explain_failures(ratio_rules, info)) or f"width/height {w / h:.4g} is not allowed"
            if options.ratio is None:
                raise _Unfixable(f"{said} (--fix-ratio pad or --fix-ratio crop would fix it)")
            fw, fh = self._reframe(w, h, options.ratio)
            wide = self.max_ratio is not None and Fraction(w, h) >= self.max_ratio  # as _reframe decides
            bound = self.max_ratio if wide else self.min_ratio
            why = f"width/height {w / h:.4g} {'over' if wide else 'under'} {float(bound or 0):g}"
            step = "padded" if options.ratio == "pad" else "cropped"
            w, h = fw, fh
        framed = (w, h)
        down = min([m / n for m, n in ((self.max_w, w), (self.max_h, h)) if m is not None] or [1.0])
        up = max([m / n for m, n in ((self.min_w, w), (self.min_h, h)) if m is not None] or [1.0])
        reason = ""
        if down < 1 and up > 1:
            raise _Unfixable(f"{w}x{h} cannot be scaled to fit both the largest and the smallest size allowed")
        if down < 1:
            binding = self.max_w if self.max_w is not None and self.max_w / w == down else self.max_h
            reason = f"over {binding} px"
            w, h = self.fit(w, h, down)
        elif up > 1:
            binding = self.min_w if self.min_w is not None and self.min_w / w == up else self.min_h
            if not options.upscale:
                small = [r for r in failing if r.subject in ("width_pixels", "height_pixels")]
                said = "; ".join(explain_failures(small, info)) or f"{w}x{h} is under {binding} px"
                target = self.fit(w, h, up, up=True)
                raise _Unfixable(f"{said} (--upscale would scale it up to {target[0]}x{target[1]})")
            reason = f"under {binding} px"
            w, h = self.fit(w, h, up, up=True)
        return _Plan(size, framed, (w, h), step, why, reason)

    def _reframe(self, w: int, h: int, how: str) -> tuple[int, int]:
        """The smallest pad (or largest crop) that brings the ratio within its rules."""
        if self.max_ratio is not None and Fraction(w, h) >= self.max_ratio:  # too wide
            candidates = ((w, nh) for nh in range(max(1, math.ceil(w / self.max_ratio)), h * 4 + w)) \
                if how == "pad" else ((nw, h) for nw in range(math.floor(h * self.max_ratio), 0, -1))
        else:  # too tall
            low = self.min_ratio or Fraction(0)
            candidates = ((nw, h) for nw in range(max(1, math.ceil(h * low)), w * 4 + h)) \
                if how == "pad" else ((w, nh) for nh in range(math.floor(w / low) if low else h, 0, -1))
        for cw, ch in candidates:
            if self.ok(cw, ch, ("width/height",)):
                return cw, ch
        raise _Unfixable(f"no {how} of {w}x{h} meets the width/height rules")

    def fit(self, w: int, h: int, scale: float, up: bool = False) -> tuple[int, int]:
        """``w``x``h`` scaled, then nudged by a pixel or two until every pixel rule passes."""
        rnd = math.ceil if up else math.floor
        base = (max(1, rnd(w * scale)), max(1, rnd(h * scale)))
        for dw in (0, -1, 1, -2, 2):
            for dh in (0, -1, 1, -2, 2):
                cw, ch = base[0] + dw, base[1] + dh
                if cw > 0 and ch > 0 and self.ok(cw, ch):
                    return cw, ch
        raise _Unfixable(f"{w}x{h} cannot be scaled to meet every size rule")

    def target_format(self, source: str, alpha: bool) -> str:
        """What to write: the source's format if allowed (and writable), else PNG or JPEG."""
        src = _norm(source)
        if (self.types is None or src in self.types) and src in _WRITABLE:
            return src
        allowed = [t for t in (self.types or ["png", "jpeg"]) if t in _WRITABLE]
        if not allowed:
            raise _Unfixable(f"the field takes {', '.join(t.upper() for t in self.types or [])}, which batchgen "
                             "cannot write")
        if "jpeg" in allowed and src in _PHOTO_FORMATS and not alpha:
            return "jpeg"
        return "png" if "png" in allowed else allowed[0]


def _render(im: Image.Image, plan: _Plan, fmt: str, limits: _Limits) -> tuple[bytes, ImageInfo]:
    """Decode, orient, reframe, scale and encode; scaled down further while over the byte limit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im.seek(0)  # an animation: its first frame
            pic = ImageOps.exif_transpose(im.copy())
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Unfixable(f"cannot decode it to fix it: {exc}") from exc
    pic = _reframed(pic, plan)
    size = plan.size
    for _ in range(8):
        scaled = pic if pic.size == size else pic.resize(size, Image.Resampling.LANCZOS)
        out = _encode(scaled, fmt)
        if limits.max_bytes is None or len(out) <= limits.max_bytes:
            return out, probe_bytes(out, len(out))
        # Bytes grow with the square of the side: aim a tenth under the limit.
        shrink = math.sqrt(limits.max_bytes / len(out)) * 0.9
        try:
            size = limits.fit(size[0], size[1], shrink)
        except _Unfixable:  # smaller would break a pixel rule (the smallest size allowed)
            break
    raise _Unfixable(f"cannot get it to {limits.max_bytes:,} bytes or less while keeping to the size rules")


def _reframed(pic: Image.Image, plan: _Plan) -> Image.Image:
    w, h = pic.size
    fw, fh = plan.framed
    if (fw, fh) == (w, h):
        return pic
    if plan.ratio_step == "cropped":
        left, top = (w - fw) // 2, (h - fh) // 2
        return pic.crop((left, top, left + fw, top + fh))
    # Padding: transparent where the picture can be, else black (the bars a video player shows).
    mode = "RGBA" if _has_alpha(pic) else "RGB"
    canvas = Image.new(mode, (fw, fh), (0, 0, 0, 0) if mode == "RGBA" else (0, 0, 0))
    canvas.paste(pic.convert(mode), ((fw - w) // 2, (fh - h) // 2))
    return canvas


def _encode(pic: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    if fmt == "jpeg":
        if _has_alpha(pic):  # JPEG has no transparency: flattened onto white, as viewers show it
            rgba = pic.convert("RGBA")
            flat = Image.new("RGB", rgba.size, (255, 255, 255))
            flat.paste(rgba, mask=rgba.getchannel("A"))
            pic = flat
        elif pic.mode not in ("RGB", "L"):
            pic = pic.convert("RGB")
        pic.save(out, "JPEG", quality=C.FIX_JPEG_QUALITY)
    else:
        if pic.mode not in ("RGB", "RGBA", "L", "LA", "P"):
            pic = pic.convert("RGBA" if _has_alpha(pic) else "RGB")
        pic.save(out, _WRITABLE[fmt])
    return out.getvalue()


@contextmanager
def _opened(source: bytes | Path) -> Iterator[Image.Image]:
    """Image.open over bytes (or a file): lazily (the header only, until pixels are asked for),
    closed after."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Unfixable(f"cannot open it to fix it: {exc}") from exc
    with im:
        yield im


def _read_source(path: Path) -> bytes:
    """The source's bytes, at most MAX_FIX_SOURCE_BYTES of them: it is read whole."""
    cap = C.MAX_FIX_SOURCE_BYTES
    try:
        with path.open("rb") as fh:
            # Its size first (nothing read of a file far over), then at most one byte over (it may grow).
            over = os.fstat(fh.fileno()).st_size > cap
            data = b"" if over else fh.read(cap + 1)
    except OSError as exc:
        raise _Unfixable(f"cannot read it to fix it: {exc.strerror or exc}") from exc
    if over or len(data) > cap:
        raise _Unfixable(f"the file is over {cap:,} bytes, more than batchgen reads to fix an image; "
                         "convert or scale it down yourself")
    return data


def _write_atomically(path: Path, data: bytes) -> None:
    """A copy appears whole or not at all: a run killed mid-write leaves no half image to send."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    # os.open with a mode, not mkstemp (0600): the copy is as readable as any file the user makes.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _oriented_size(im: Image.Image) -> tuple[int, int]:
    """The size as seen: EXIF orientations 5-8 turn the picture a quarter."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: the picture as stored
        orientation = 1
    w, h = im.size
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info)


def _norm(name: str) -> str:
    name = name.strip().lower().removeprefix("image/").lstrip(".")
    return {"jpg": "jpeg", "jpe": "jpeg", "pjpeg": "jpeg", "mpo": "jpeg", "heic": "heif"}.get(name, name)


def _floor_below(v: Fraction, strict: bool) -> int:
    n = math.floor(v)
    return n - 1 if strict and n == v else n


def _ceil_above(v: Fraction, strict: bool) -> int:
    n = math.ceil(v)
    return n + 1 if strict and n == v else n


def _is_heif(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(12)
    except OSError:
        return False
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS
