"""What a job's output files are called: the rules, in one place.

A job's files are ``<stem><ext>``, ``<stem>-1<ext>``, ``<stem>-2<ext>``, … in its batch's folder
(``file_name``). The stem (``Job.file_stem``) is the job's key (16 hex characters) unless the
manifest gives ``output_name``, a template such as ``"{subject}_{seed}"``: then it is that
template filled for the job (manifest/expand.py), made safe for every file system
(``safe_stem``), and, when the job is recorded, made unique in its batch (``NameBook``). The
stem is recorded with the job (``jobs.output_name``, m009) and never changes afterwards: a file
already downloaded keeps its name, and a later template renames nothing, so the name is not part
of the job's key either (renaming cannot make a job new, nor pay for it twice).
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Iterable, Iterator

# A stem is cut to this many characters, and to MAX_STEM_BYTES of UTF-8: with a collision suffix
# ("_12"), an output index ("-3"), an extension and ".part" it stays well under the 255 bytes a
# file name may have on ext4, APFS and NTFS alike.
MAX_STEM_CHARS = 120
MAX_STEM_BYTES = 200
# Names Windows keeps for devices, with any extension ("con.mp4" too): no file may have them.
DEVICE_NAMES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10))})

# The extensions an output file may get: media a model returns. Any other ending of a URL (.sh,
# .html, .part, ...) is ignored and the file is named by its kind: a name taken verbatim from an
# API answer could drop a script, or a file posing as something else, into the batch's folder.
EXTENSIONS = frozenset({
    ".mp4", ".webm", ".mov", ".m4v", ".mkv",
    ".png", ".jpg", ".jpeg", ".webp", ".gif", ".avif",
    ".wav", ".mp3", ".m4a", ".ogg", ".flac",
})
_DEFAULT_EXT = {"video": ".mp4", "image": ".png"}
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

_MARK = "\x00"  # stands for an unsafe character until runs of them become one "_"
_MARKS = re.compile(_MARK + "+")


class _Unsafe(dict[int, str]):
    """A ``str.translate`` table: each character a file name cannot hold somewhere (path
    separators, Windows' reserved punctuation, Unicode's "other" categories: control, format
    such as a bidi override or a zero-width space, private, unassigned) or whitespace (a name is
    easier to use in a shell without) to _MARK, any other to itself. Filled as characters are
    met: one dictionary look-up per character, in C, instead of a category call."""

    def __missing__(self, code: int) -> str:
        c = chr(code)
        self[code] = out = _MARK if c in '/\\:*?"<>|' or unicodedata.category(c)[0] in "CZ" else c
        return out


_UNSAFE = _Unsafe()
# A name that ends like an output index: "<stem>-<n>" is also the name of <stem>'s output n.
_NUMBERED = re.compile(r"(.*)-[0-9]+")


def file_name(stem: str, idx: int, kind: str, url: str) -> str:
    """The file name of a job's output ``idx``: <stem>.mp4, <stem>-1.mp4, … (extension from the
    URL when it is one of EXTENSIONS, else from the kind). One flat folder per batch: a file per
    output and no folder per job, which also halves the inodes a job costs the file system (on
    ext4 creating one is the dearest call batchgen makes). A key is hex, and a stem from a
    template is never "<another stem>-<n>" (NameBook), so "<stem>-1" is no other job's name."""
    # The URL's path (no query, no fragment, no host), read by hand: urlsplit and a PurePosixPath
    # per output were a measurable share of a fast batch's time.
    path = url.partition("?")[0].partition("#")[0]
    if _SCHEME.match(path):
        host_and_path = path.partition("//")[2]
        path = host_and_path[len(host_and_path.partition("/")[0]):]
    while path.endswith(("/", "/.")):  # as a path: "a/b.mp4/" and "a/b.mp4/." name b.mp4
        path = path[:-1] if path.endswith("/") else path[:-2]
    suffix = os.path.splitext(path.rpartition("/")[2])[1].lower()
    if suffix not in EXTENSIONS:
        suffix = _DEFAULT_EXT.get(kind, ".bin")
    return (stem if idx == 0 else f"{stem}-{idx}") + suffix


def stem_of(name: str) -> str | None:
    """The stem of an output file's (or its ``.part`` file's) name; None for any other file of
    a batch folder (gallery.html, thumbs/)."""
    if name.endswith(".part"):
        name = name[:-5]
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in EXTENSIONS and stem else None


def is_partial_of(name: str, stem: str) -> bool:
    """Whether ``name`` is the ``.part`` file of one of the outputs of the job named ``stem``
    (exactly: "cat.v2.mp4.part" is not one of "cat"'s)."""
    if not name.endswith(".part"):
        return False
    rest = name[:-5]
    base, ext = os.path.splitext(rest)
    if ext.lower() not in EXTENSIONS:
        return False
    if base == stem:
        return True
    numbered = _NUMBERED.fullmatch(base)
    return numbered is not None and numbered[1] == stem


def safe_stem(text: str) -> str | None:
    """``text`` (a rendered ``output_name``) made a file name stem every system accepts; None
    if nothing is left (the job then keeps its key as its name).

    - Unicode in its composed form (NFC), as macOS keeps names: "é" is one name, not two.
    - Path separators, ``:*?"<>|``, control and format characters (bidi overrides that would
      show a name backwards, zero-width characters) and whitespace: each run becomes "_".
    - No leading "." (a hidden file, "..") or "-" (read as an option by command-line tools), no
      trailing "." (Windows drops it).
    - A Windows device name (``CON``, ``nul.x``, ``COM1``) gets a leading "_".
    - At most MAX_STEM_CHARS characters and MAX_STEM_BYTES bytes of UTF-8.
    """
    text = text.strip()
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    text = _MARKS.sub("_", text.translate(_UNSAFE))
    text = _trim(text.lstrip(".-"))
    if not text:
        return None
    if text.split(".")[0].upper() in DEVICE_NAMES:
        text = _trim("_" + text)
    return text


def _trim(text: str, room: int = 0) -> str:
    """``text`` cut to the caps less ``room`` characters (and bytes) for a suffix, never inside
    a character; no trailing "." (Windows drops one, so two names would meet)."""
    text = text[:MAX_STEM_CHARS - room]
    while not text.isascii() and len(text.encode()) > MAX_STEM_BYTES - room:
        text = text[:-1]
    return text.rstrip(".")


def _fold(stem: str) -> str:
    # macOS and Windows ignore case: "Cat" and "cat" are one file there. macOS also ignores the
    # Unicode form: "café" composed (NFC) and decomposed (NFD) are one file there too.
    if stem.isascii():
        return stem.casefold()
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", stem).casefold())


class NameBook:
    """The stems taken in one batch's folder, and new ones made unique against them.

    A stem is free when no stem taken is the same (ignoring case), and neither is
    "<the other>-<n>": the files of a job named "cat" are "cat.mp4", "cat-1.mp4", …, so a job
    named "cat-1" would meet "cat"'s second output. A stem that is not free gets the first
    suffix "_2", "_3", … that makes it free: in the order stems are claimed (the manifest's), so
    the same manifest recorded in a fresh work directory gives the same names."""

    def __init__(self, taken: Iterable[str] = ()):
        self._taken: set[str] = set()
        self._bases: set[str] = set()  # "cat" for every "cat-<n>" taken
        self._next: dict[str, int] = {}  # the next suffix to try for a stem: no quadratic search
        for stem in taken:
            self.take(stem)

    def take(self, stem: str) -> None:
        """Mark ``stem`` as taken (a recorded job's, a key, a file already in the folder)."""
        folded = _fold(stem)
        self._taken.add(folded)
        numbered = _NUMBERED.fullmatch(folded)
        if numbered is not None:
            self._bases.add(numbered[1])

    def is_free(self, stem: str) -> bool:
        folded = _fold(stem)
        if folded in self._taken or folded in self._bases:
            return False
        numbered = _NUMBERED.fullmatch(folded)
        return numbered is None or numbered[1] not in self._taken

    def claim(self, stem: str) -> str:
        """``stem``, or the first of ``stem_2``, ``stem_3``, … that is free; taken from now on."""
        candidate = stem
        folded = _fold(stem)
        n = self._next.get(folded, 1)
        while not self.is_free(candidate):
            n += 1
            suffix = f"_{n}"
            candidate = _trim(stem, len(suffix.encode())) + suffix
        self._next[folded] = n
        self.take(candidate)
        return candidate


def composed(name: str) -> str:
    """A file name as listed from a folder, in NFC, the form stems are made in (safe_stem): to
    compare with them, never to open (the name on disk is what it is)."""
    return name if name.isascii() else unicodedata.normalize("NFC", name)


def stems_in(folder: str | os.PathLike[str]) -> Iterator[str]:
    """The stems of the output files (and partial files) in a batch's folder, whoever recorded
    them: a file left by a forgotten job is never written over by a new one. In NFC, as stems
    are made (safe_stem): a name listed decomposed (NFD: HFS+ keeps names so, and a file copied
    from there keeps its bytes) is the same name on macOS."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        stem = stem_of(composed(name))
        if stem is not None:
            yield stem


def assign(wanted: Iterable[tuple[str, str | None]], recorded: dict[str, str | None],
           on_disk: Iterable[str]) -> dict[str, str]:
    """The names of a batch's jobs about to be recorded. ``wanted``: (key, safe stem or None)
    of each job of the manifest, in its order; ``recorded``: the batch's jobs already recorded
    (key -> output name, None for a key); ``on_disk``: the stems of files in its folder.

    Returns key -> unique stem for each job not yet recorded that wants a name. A recorded job
    keeps its name (even one still to download: the name was fixed when it was recorded), and
    every name recorded, every key naming files, and every file already there stays taken."""
    book = NameBook(on_disk)
    for key, name in recorded.items():
        book.take(name or key)
    new = [(key, name) for key, name in wanted if key not in recorded]
    for key, name in new:
        if name is None:
            book.take(key)
    return {key: book.claim(name) for key, name in new if name is not None}
