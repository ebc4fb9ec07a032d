"""The naming rules of output files (outputnames.py): a stem made safe, made unique in its
batch, and the file names made of it. Pure functions: tables of cases."""

from __future__ import annotations

import pytest

from batchgen.outputnames import (
    MAX_STEM_BYTES,
    MAX_STEM_CHARS,
    NameBook,
    assign,
    file_name,
    is_partial_of,
    safe_stem,
    stem_of,
    stems_in,
)

SAFE = [
    # (rendered output_name, stem)
    ("fox_42_121", "fox_42_121"),
    ("red fox  in snow", "red_fox_in_snow"),  # whitespace: one "_" a run
    ("  padded  ", "padded"),  # ends trimmed, not made "_"
    ("a/b\\c", "a_b_c"),  # path separators
    ("../../etc/passwd", "_.._etc_passwd"),  # no way out of the batch folder
    ("/abs/path", "_abs_path"),
    ('what?<is>:this*"|', "what_is_this_"),  # Windows' reserved punctuation
    ("tab\there\nnewline\x00nul\x7fdel", "tab_here_newline_nul_del"),  # control characters
    ("\x1b[31mred\x1b[0m", "_[31mred_[0m"),  # a terminal escape is no escape any more
    (".hidden", "hidden"),  # no hidden files
    ("...", None),  # nothing left: the key names it
    ("-rf", "rf"),  # not an option to the next command line tool
    ("-.-x", "x"),
    ("trailing.", "trailing"),  # Windows drops a trailing dot
    ("v1.5_final", "v1.5_final"),  # dots inside are kept
    ("CON", "_CON"), ("con", "_con"), ("nul.tar", "_nul.tar"), ("COM1", "_COM1"), ("lpt9", "_lpt9"),
    ("CONSOLE", "CONSOLE"), ("COM10", "COM10"), ("icon", "icon"),  # not device names
    ("", None), ("   ", None),
    ("café", "café"), ("cafe\u0301", "café"),  # one form (NFC): the name macOS would keep
    ("日本の夏", "日本の夏"),
    ("evil\u202egpj.mp4", "evil_gpj.mp4"),  # a bidi override cannot show the name backwards
    ("zero\u200bwidth", "zero_width"), ("nb\u00a0sp", "nb_sp"), ("line\u2028sep", "line_sep"),
    ("\ue000private", "_private"),
    ("fox 😀", "fox_😀"),
]


@pytest.mark.parametrize(("text", "stem"), SAFE)
def test_safe_stem(text, stem):
    assert safe_stem(text) == stem


@pytest.mark.parametrize("text", ["x" * 500, "é" * 500, "日" * 500, "😀" * 500, "a" * 119 + "..."])
def test_a_long_name_is_cut_within_the_caps_never_inside_a_character(text):
    stem = safe_stem(text)
    assert stem and len(stem) <= MAX_STEM_CHARS and len(stem.encode()) <= MAX_STEM_BYTES
    assert text.startswith(stem) and not stem.endswith(".")
    for suffix_room in (NameBook([stem]).claim(stem),):  # a suffix stays within the caps too
        assert len(suffix_room) <= MAX_STEM_CHARS and len(suffix_room.encode()) <= MAX_STEM_BYTES


CLAIMS = [
    # (taken before, stems claimed in order, names given)
    ([], ["a", "b", "c"], ["a", "b", "c"]),
    ([], ["a", "a", "a"], ["a", "a_2", "a_3"]),  # the first keeps its name
    ([], ["Cat", "cat", "CAT"], ["Cat", "cat_2", "CAT_3"]),  # one file where case is ignored
    (["a"], ["a"], ["a_2"]),  # a recorded job keeps its name
    (["a_2"], ["a", "a"], ["a", "a_3"]),  # a suffix never takes another job's name
    ([], ["a_2", "a", "a"], ["a_2", "a", "a_3"]),
    (["cat"], ["cat-1", "cat-12"], ["cat-1_2", "cat-12_2"]),  # would be cat's second output
    (["cat-1"], ["cat"], ["cat_2"]),  # whose second output would be cat-1's file
    (["cat-x"], ["cat"], ["cat"]),  # not an output index
    (["cat"], ["cat-1x", "cat_1"], ["cat-1x", "cat_1"]),
    (["0123456789abcdef"], ["0123456789abcdef"], ["0123456789abcdef_2"]),  # a key's files
]


@pytest.mark.parametrize(("taken", "claimed", "given"), CLAIMS)
def test_claims_are_unique_and_stable(taken, claimed, given):
    book = NameBook(taken)
    assert [book.claim(stem) for stem in claimed] == given
    again = NameBook(taken)  # the same order: the same names
    assert [again.claim(stem) for stem in claimed] == given


def test_many_copies_of_one_name_cost_linear_time():
    book = NameBook()
    names = [book.claim("clip") for _ in range(20_000)]
    assert names[-1] == "clip_20000" and len(set(names)) == 20_000


def test_assign_keeps_recorded_names_and_avoids_keys_and_files():
    wanted = [("k1", "fox"), ("k2", "fox"), ("k3", None), ("k4", "k3"), ("k5", "old"), ("k6", "left")]
    recorded = {"k1": "fox", "k9": None}  # k1 recorded before (its name kept), k9 named by its key
    names = assign(wanted, recorded, on_disk=["left", "k9"])
    # k1: recorded, not renamed; k3: no name wanted (its key); k6's name is a file already there.
    assert names == {"k2": "fox_2", "k4": "k3_2", "k5": "old", "k6": "left_2"}


FILES = [
    # (stem, index, kind, url, file name)
    ("fox_42", 0, "video", "https://x/a/b.MP4?sig=1", "fox_42.mp4"),
    ("fox_42", 2, "image", "https://x/a/noext", "fox_42-2.png"),
    ("v1.5", 1, "video", "https://x/o.webm", "v1.5-1.webm"),
]


@pytest.mark.parametrize(("stem", "idx", "kind", "url", "name"), FILES)
def test_file_names(stem, idx, kind, url, name):
    assert file_name(stem, idx, kind, url) == name
    assert stem_of(name) == (stem if idx == 0 else f"{stem}-{idx}")
    assert is_partial_of(name + ".part", stem) and not is_partial_of(name, stem)


@pytest.mark.parametrize(("name", "stem"), [
    ("fox.mp4", "fox"), ("fox.mp4.part", "fox"), ("v1.5.PNG", "v1.5"), ("gallery.html", None),
    ("gallery-data.js", None), ("thumbs", None), (".mp4", None), ("notes.txt", None),
])
def test_stem_of(name, stem):
    assert stem_of(name) == stem


def test_stems_in_a_folder(tmp_path):
    for name in ("a.mp4", "b-1.png", "c.webm.part", "gallery.html"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "thumbs").mkdir()
    assert sorted(stems_in(tmp_path)) == ["a", "b-1", "c"]
    assert list(stems_in(tmp_path / "missing")) == []


def test_a_decomposed_name_on_disk_blocks_the_same_composed_name(tmp_path):
    # "café" as macOS's HFS+ lists it (NFD: e + combining acute), and as a manifest gives it
    # (NFC, which safe_stem makes): one name on macOS, so the new job must not get it.
    (tmp_path / "cafe\u0301.mp4").write_bytes(b"")
    (tmp_path / "Cre\u0300me-1.png").write_bytes(b"")
    assert sorted(stems_in(tmp_path)) == ["Crème-1", "café"]
    names = assign([("k1", safe_stem("café")), ("k2", safe_stem("CRÈME"))], {}, stems_in(tmp_path))
    assert names == {"k1": "café_2", "k2": "CRÈME_2"}
    # Recorded names and stems claimed meet whatever their form or case.
    book = NameBook(["cafe\u0301"])
    assert not book.is_free("CAFÉ") and book.claim("Café") == "Café_2"


def test_file_names_are_stable():
    assert file_name("0123abcd", 0, "video", "https://x/a/b.MP4?sig=1") == "0123abcd.mp4"
    assert file_name("0123abcd", 2, "image", "https://x/a/noext") == "0123abcd-2.png"
    # Only the path's last segment counts: not the host, the query or the fragment.
    assert file_name("k", 0, "video", "https://cdn.example.com") == "k.mp4"
    assert file_name("k", 0, "video", "https://cdn.example.com/") == "k.mp4"
    assert file_name("k", 0, "image", "https://h/x.v2/file?name=a.jpg#b.gif") == "k.png"
    assert file_name("k", 0, "image", "https://h/a/b.webp#frag") == "k.webp"
    assert file_name("k", 0, "video", "https://h/a/b.mp4.part") == "k.mp4"  # .part: not a media type
    assert file_name("k", 0, "video", "https://h/a/.hidden") == "k.mp4"
    assert file_name("k", 0, "video", "https://h/a/b.") == "k.mp4"
    assert file_name("k", 0, "video", "https://h/a/b.toolong7") == "k.mp4"
    assert file_name("k", 1, "video", "/relative/clip.MOV") == "k-1.mov"
    assert file_name("k", 0, "image", "https://h/a/b.webp/") == "k.webp"  # as a path would read
    assert file_name("k", 0, "image", "https://h/a/b.webp/.") == "k.webp"
    assert file_name("k", 0, "video", "ftp://files.example.com") == "k.mp4"  # a host is no name


@pytest.mark.parametrize("ending", [".sh", ".html", ".exe", ".py", ".desktop", ".svg", ".mp4.sh", ".part"])
def test_an_output_extension_comes_from_the_media_list_never_from_the_url(ending):
    assert file_name("k", 0, "video", f"https://h/out/evil{ending}?x=1") == "k.mp4"
    assert file_name("k", 1, "image", f"https://h/out/evil{ending}") == "k-1.png"


@pytest.mark.parametrize("ext", [".webm", ".mov", ".jpg", ".jpeg", ".gif", ".webp", ".wav", ".mp3"])
def test_media_extensions_are_kept(ext):
    assert file_name("k", 0, "video", f"https://h/out/clip{ext.upper()}") == f"k{ext}"
