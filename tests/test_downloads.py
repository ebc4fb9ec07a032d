"""Downloads against a real loopback server: atomic files, sha256, Range resume, truncation."""

from __future__ import annotations

import hashlib

import pytest
from aiohttp import web
from conftest import loopback

from batchgen import constants as C
from batchgen import downloads as D
from batchgen.downloads import download, make_session
from batchgen.errors import DownloadError

BODY = bytes(range(256)) * 1000  # 256,000 bytes


@pytest.fixture(params=["in memory", "streamed"])
async def files(request, monkeypatch):
    """A file server whose behaviour each test sets: cut the body short, ignore Range, expire.
    Every test runs twice: outputs small enough to be received in memory, and outputs streamed
    to their .part file."""
    if request.param == "streamed":
        monkeypatch.setattr(C, "DOWNLOAD_IN_MEMORY", 0)
    state = {"cut_at": None, "ranges": True, "status": 200, "hits": []}

    async def handler(request):  # noqa: F811 - the aiohttp request, not pytest's
        state["hits"].append(request.headers.get("Range"))
        if state["status"] != 200:
            return web.Response(status=state["status"])
        start = 0
        rng = request.headers.get("Range")
        resp_status, headers = 200, {}
        if rng and state["ranges"]:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            resp_status = 206
            headers["Content-Range"] = f"bytes {start}-{len(BODY) - 1}/{len(BODY)}"
        body = BODY[start:]
        resp = web.StreamResponse(status=resp_status, headers=headers)
        resp.content_length = len(body)
        await resp.prepare(request)
        cut = state["cut_at"]
        if cut is not None:
            state["cut_at"] = None
            await resp.write(body[: cut - start])
            request.transport.close()
            return resp
        await resp.write(body)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/out/{name}", handler)
    async with loopback(app) as root, make_session() as session:
        state["url"] = f"{root}/out/video.mp4"
        state["session"] = session
        yield state


def test_partials_of_one_job_are_discarded_and_nothing_else(tmp_path):
    for name in ("k1.mp4.part", "k1-1.png.part", "k1.mp4", "k2.mp4.part", "k10.mp4.part", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    D.discard_partials(tmp_path, "k1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1.mp4", "k10.mp4.part", "k2.mp4.part", "notes.txt"]
    D.discard_partials(tmp_path / "missing", "k1")  # no folder yet: nothing to do


def test_partials_of_a_named_job_are_its_own_exactly(tmp_path):
    # Names from output_name may hold dots and dashes: only "<stem>[-<n>].<media>.part" is its.
    names = ("cat.mp4.part", "cat-2.png.part", "cat.v2.mp4.part", "cat-x.mp4.part", "cat_2.mp4.part",
             "Cat.mp4.part", "cat.txt.part", "cat.mp4")
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    D.discard_partials(tmp_path, "cat")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - {"cat.mp4.part", "cat-2.png.part"})


def test_a_partial_listed_decomposed_is_discarded_too(tmp_path):
    # On macOS "café" in NFD (as HFS+ lists it) and in NFC (the recorded stem) are one name: an
    # old partial kept under it would be resumed into the job's next generation.
    (tmp_path / "cafe\u0301.mp4.part").write_bytes(b"x")
    (tmp_path / "cafe.mp4.part").write_bytes(b"x")
    D.discard_partials(tmp_path, "caf\u00e9")
    assert [p.name for p in tmp_path.iterdir()] == ["cafe.mp4.part"]


async def test_whole_file_with_digest(files, tmp_path):
    got = await download(files["session"], files["url"], tmp_path / "output.mp4")
    assert got.size == len(BODY) and got.sha256 == hashlib.sha256(BODY).hexdigest()
    assert (tmp_path / "output.mp4").read_bytes() == BODY
    assert not (tmp_path / "output.mp4.part").exists()


async def test_truncated_transfer_is_never_a_file_and_resumes_with_range(files, tmp_path):
    dest = tmp_path / "output.mp4"
    files["cut_at"] = 100_000
    with pytest.raises(DownloadError):
        await download(files["session"], files["url"], dest)
    assert not dest.exists()
    assert (tmp_path / "output.mp4.part").stat().st_size == 100_000
    got = await download(files["session"], files["url"], dest)
    assert got.resumed and got.sha256 == hashlib.sha256(BODY).hexdigest()
    assert files["hits"][-1] == "bytes=100000-"


async def test_server_ignoring_range_restarts_cleanly(files, tmp_path):
    dest = tmp_path / "output.mp4"
    files["cut_at"] = 50_000
    files["ranges"] = False
    with pytest.raises(DownloadError):
        await download(files["session"], files["url"], dest)
    got = await download(files["session"], files["url"], dest)
    assert not got.resumed and dest.read_bytes() == BODY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output.mp4"]  # no stale .part left


@pytest.mark.parametrize("status", [403, 404, 410])
async def test_expired_urls_are_flagged(files, tmp_path, status):
    files["status"] = status
    with pytest.raises(DownloadError) as info:
        await download(files["session"], files["url"], tmp_path / "o.mp4")
    assert info.value.expired


async def test_refuses_non_http_urls(files, tmp_path):
    with pytest.raises(DownloadError, match="refusing"):
        await download(files["session"], "file:///etc/passwd", tmp_path / "o")


async def test_an_empty_partial_left_by_a_kill_is_removed_once_the_file_is_whole(files, tmp_path):
    """A run killed while keeping a broken transfer's bytes can leave an empty .part: nothing to
    resume, but not to be left behind either."""
    (tmp_path / "output.mp4.part").write_bytes(b"")
    got = await download(files["session"], files["url"], tmp_path / "output.mp4")
    assert not got.resumed and files["hits"] == [None]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output.mp4"]


@pytest.mark.parametrize("way", ["resumed", "fresh", "broken"])
async def test_a_part_file_is_never_written_through_a_symlink(files, tmp_path, monkeypatch, way):
    """A link planted under the .part name (a shared folder, a hostile name) must not make the
    download write where it points: the link is replaced, never followed."""
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious")
    dest = tmp_path / "output.mp4"
    (tmp_path / "output.mp4.part").symlink_to(victim)
    monkeypatch.setattr(D, "_O_TMPFILE", 0)  # small files through a named .part as well
    if way == "broken":
        files["cut_at"] = 100_000
        with pytest.raises(DownloadError):
            await download(files["session"], files["url"], dest, resume=False)
        part = tmp_path / "output.mp4.part"
        assert not part.is_symlink() and part.stat().st_size == 100_000
    else:
        got = await download(files["session"], files["url"], dest, resume=way == "resumed")
        assert not got.resumed and not dest.is_symlink() and dest.read_bytes() == BODY
        assert files["hits"] == [None]  # no range asked for on the strength of the link's target
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize("size", ["small", "large"])
async def test_a_small_output_is_returned_unflushed_a_large_one_fsynced(files, tmp_path, monkeypatch, size):
    from batchgen import durability

    flushed = []
    monkeypatch.setattr(durability, "make_durable", lambda paths: flushed.append(paths))
    fsynced = []
    real_fsync = D.os.fsync
    monkeypatch.setattr(D.os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd)))
    monkeypatch.setattr(C, "DOWNLOAD_IN_MEMORY", 1 << 20 if size == "small" else 0)
    got = await download(files["session"], files["url"], tmp_path / "output.mp4")
    assert (tmp_path / "output.mp4").read_bytes() == BODY
    assert got.sha256 == hashlib.sha256(BODY).hexdigest() and got.size == len(BODY)
    # A small file is left to the runner's Flusher (recorded first, flushed later); a large one
    # is on disk when download returns.
    assert got.durable is (size == "large")
    assert flushed == [] and bool(fsynced) is (size == "large")


async def test_a_small_file_that_cannot_be_put_in_place_leaves_no_part(files, tmp_path):
    if not C.DOWNLOAD_IN_MEMORY:
        pytest.skip("streamed outputs keep their .part on purpose, for a Range resume")
    dest = tmp_path / "output.mp4"
    dest.mkdir()  # something in the way: the rename fails, as it would on a full disk
    (dest / "x").write_bytes(b"x")
    with pytest.raises(DownloadError, match="download broke"):
        await download(files["session"], files["url"], dest)
    assert not (tmp_path / "output.mp4.part").exists()
    (dest / "x").unlink()
    dest.rmdir()
    got = await download(files["session"], files["url"], dest)
    assert not got.resumed and dest.read_bytes() == BODY and files["hits"][-1] is None


@pytest.mark.parametrize("way", ["unnamed file", "named .part", "no /proc", "link refused", "unsupported"])
def test_a_small_file_appears_whole_under_its_name_and_nothing_else(tmp_path, monkeypatch, way):
    import errno
    import os

    if way == "named .part":
        monkeypatch.setattr(D, "_O_TMPFILE", 0)
    elif not D._O_TMPFILE:
        pytest.skip("no O_TMPFILE on this system: only the .part way exists")
    elif way in ("no /proc", "link refused"):
        real_link = os.link
        err = errno.ENOENT if way == "no /proc" else errno.EXDEV  # EXDEV: the link not followed

        def link(src, dst, **kw):
            if str(src).startswith("/proc/"):
                raise OSError(err, os.strerror(err), src)
            return real_link(src, dst, **kw)

        monkeypatch.setattr(os, "link", link)
    elif way == "unsupported":
        real_open = os.open

        def open_(path, flags, *a, **kw):
            if flags & D._O_TMPFILE == D._O_TMPFILE:
                raise OSError(errno.EOPNOTSUPP, "not supported", path)
            return real_open(path, flags, *a, **kw)

        monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(D, "_no_tmpfile", set())
    folder = tmp_path / "batch"  # not there yet: made by the first file
    dest, part = str(folder / "k.mp4"), str(folder / "k.mp4.part")
    D._write_file(dest, part, bytearray(b"first"))
    assert os.listdir(folder) == ["k.mp4"] and (folder / "k.mp4").read_bytes() == b"first"
    D._write_file(dest, part, bytearray(b"second try"))  # a file of an earlier try is replaced
    assert os.listdir(folder) == ["k.mp4"] and (folder / "k.mp4").read_bytes() == b"second try"
    assert (folder / "k.mp4").stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert bool(D._no_tmpfile) == (way in ("no /proc", "link refused", "unsupported"))


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
