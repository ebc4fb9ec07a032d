"""The report of a real simulated run: one row per job, values checked against the store's files,
written as CSV, JSON, Parquet and Excel (or a clear error when the library is missing)."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from bigbatch import grow_batch
from conftest import local_ref
from simruns import settings

from batchgen import app
from batchgen.errors import UsageError
from batchgen.report import build_report, write_report
from batchgen.simulator import FaultConfig, SimConfig

COLUMNS = [
    "batch", "key", "output_name", "seq", "source", "model",
    "input.frames", "input.image_urls", "input.prompt", "input.seed",
    "meta._tags", "meta._take", "meta.matrix.frames",
    "simulated", "api", "request_id", "state", "attempts", "created_at", "submitted_at", "started_at", "finished_at",
    "queue_wait_s", "run_s", "outputs", "output_paths", "output_sha256", "output_bytes", "cost", "error",
    "error_code", "history", "retired",
]


async def simulated_run(samples: Path, workdir: Path, faults: list[str]) -> Path:
    """The quick start under --simulate, with notes on its first scene: a list and a value that
    is a number in one job and text in another."""
    path = samples / "quickstart.yaml"
    doc = yaml.safe_load(path.read_text())
    doc["jobs"][0]["_tags"] = ["dusk", "street"]
    doc["jobs"][0]["_take"] = 2
    doc["jobs"][1]["_take"] = "final"
    path.write_text(yaml.safe_dump(doc))
    target = app.Target(simulate=True, sim_config=SimConfig(duration=0.1, faults=FaultConfig.parse(faults)))
    await app.run(app.RunOptions(workdir=workdir, manifest=path, target=target, settings=settings()))
    return workdir


def utc(text: str) -> dt.datetime:
    when = dt.datetime.fromisoformat(text)
    assert when.utcoffset() == dt.timedelta(0), text
    return when


@pytest.fixture
async def mixed(samples, tmp_path) -> Path:
    """A batch where the first submit fails and the five others succeed."""
    return await simulated_run(samples, tmp_path / "work", ["script.submit=fail"])


async def test_one_row_per_job_with_inputs_notes_timings_and_outputs(mixed, samples):
    df = await build_report(mixed, "quickstart")
    assert list(df.columns) == COLUMNS
    assert list(df["seq"]) == list(range(6)) and set(df["batch"]) == {"quickstart"}
    assert sorted(df["state"]) == ["failed"] + ["succeeded"] * 5
    manifest = yaml.safe_load((samples / "quickstart.yaml").read_text())
    prompts = [j["prompt"] for j in manifest["jobs"] for _ in (121, 241)]
    assert list(df["input.prompt"]) == prompts
    assert list(df["input.frames"]) == [121, 241] * 3 == list(df["meta.matrix.frames"])
    assert set(df["input.seed"]) == {42}
    assert df["input.image_urls"][0] == local_ref(samples / "images" / "street.jpg")
    # Lists are joined; a note that is a number here and text there becomes text throughout.
    assert df["meta._tags"][0] == "dusk | street" and pd.isna(df["meta._tags"][2])
    assert list(df["meta._take"][:4]) == ["2", "2", "final", "final"]  # 2 frames each

    for _, row in df.iterrows():
        created, submitted, finished = utc(row["created_at"]), utc(row["submitted_at"]), utc(row["finished_at"])
        assert created <= submitted <= finished
        assert row["attempts"] == 1 and len(row["request_id"]) > 10
        if not pd.isna(row["started_at"]):
            started = utc(row["started_at"])
            assert row["queue_wait_s"] == pytest.approx((started - submitted).total_seconds(), abs=0.002)
            assert row["run_s"] == pytest.approx((finished - started).total_seconds(), abs=0.002)
        if row["state"] == "succeeded":
            # Output paths are absolute; the digest and size are those of the file on disk.
            path = Path(row["output_paths"])
            assert path.is_absolute() and path.parent == (mixed / "simulated" / "quickstart").resolve()
            data = path.read_bytes()
            assert row["output_sha256"] == hashlib.sha256(data).hexdigest()
            assert row["output_bytes"] == len(data) > 1000
            assert row["outputs"] == 1 and row["cost"] == pytest.approx(0.10) and pd.isna(row["error"])
        else:
            assert row["error"].startswith("Generation failed")
            assert row["outputs"] == 0 and pd.isna(row["output_paths"]) and pd.isna(row["output_sha256"])


async def test_failed_jobs_carry_their_error(samples, tmp_path):
    work = await simulated_run(samples, tmp_path / "work", ["fail=1"])
    df = await build_report(work, "quickstart")
    assert list(df["state"]) == ["failed"] * 6
    assert all(e.startswith("Generation failed") for e in df["error"])
    assert df["output_paths"].isna().all() and df["output_bytes"].isna().all()


async def test_csv_and_json_round_trip(mixed, tmp_path):
    df = await build_report(mixed, "quickstart")
    write_report(df, tmp_path / "out" / "r.csv")
    back = pd.read_csv(tmp_path / "out" / "r.csv")
    assert list(back.columns) == COLUMNS
    assert list(back["key"]) == list(df["key"]) and list(back["input.seed"]) == [42] * 6
    assert back["output_sha256"].fillna("").tolist() == df["output_sha256"].fillna("").tolist()

    write_report(df, tmp_path / "r.json")
    records = json.loads((tmp_path / "r.json").read_text())
    assert isinstance(records, list) and len(records) == 6 and list(records[0]) == COLUMNS
    by_state = {r["state"]: r for r in records}
    failed, succeeded = by_state["failed"], by_state["succeeded"]
    # Integers stay integers, missing values are null, paths are not escaped.
    assert records[0]["input.seed"] == 42 and records[0]["meta.matrix.frames"] == 121
    assert records[0]["meta._tags"] == "dusk | street" and records[2]["meta._tags"] is None
    assert failed["output_paths"] is None and failed["output_bytes"] is None and failed["error"]
    assert succeeded["output_paths"].startswith("/") and succeeded["error"] is None
    assert isinstance(succeeded["output_bytes"], int) and succeeded["output_bytes"] > 1000
    assert not list(tmp_path.glob(".*.tmp*")), "the temporary file was left behind"


@pytest.mark.parametrize("ext, package", [(".parquet", "pyarrow"), (".xlsx", "openpyxl")])
async def test_parquet_and_excel_or_a_clear_error(mixed, tmp_path, ext, package):
    df = await build_report(mixed, "quickstart")
    out = tmp_path / f"r{ext}"
    if importlib.util.find_spec(package) is None:
        with pytest.raises(UsageError, match=f"needs the {package} package: pip install {package}"):
            write_report(df, out)
        assert not out.exists()
        return
    write_report(df, out)
    back = pd.read_parquet(out) if ext == ".parquet" else pd.read_excel(out)
    assert list(back.columns) == COLUMNS
    assert list(back["key"]) == list(df["key"]) and list(back["state"]) == list(df["state"])
    assert back["output_sha256"].fillna("").tolist() == df["output_sha256"].fillna("").tolist()


async def test_unknown_format_batch_or_store_is_a_usage_error(mixed, tmp_path):
    df = await build_report(mixed, "quickstart")
    with pytest.raises(UsageError, match=r"'\.txt'; use one of: \.csv, \.json, \.parquet, \.xlsx"):
        write_report(df, tmp_path / "r.txt")
    with pytest.raises(UsageError, match="use one of"):
        write_report(df, tmp_path / "report")
    with pytest.raises(UsageError, match="no batch named 'nope'.*known: quickstart"):
        await build_report(mixed, "nope")
    with pytest.raises(UsageError, match="no batchgen store"):
        await build_report(tmp_path / "elsewhere", "quickstart")


@pytest.mark.parametrize("ext", [".csv", ".xlsx"])
async def test_spreadsheets_get_text_where_a_cell_would_be_a_formula(samples, tmp_path, ext):
    """An error message from the API (the simulator's hostile_text) and a prompt that start with
    '=' are text to a spreadsheet; a seed of -1 stays the number -1, and "-5" written as text too."""
    if importlib.util.find_spec("openpyxl") is None and ext == ".xlsx":
        pytest.skip("openpyxl is not installed")
    manifest = samples / "hostile.yaml"
    manifest.write_text('jobs: [{prompt: "=1+2", image: images/street.jpg, seed: -1, _a: "-5", _b: "@SUM(A1)", '
                        '_c: "+cmd|calc", _d: "\\ttab", _e: "-2.5e3"}]\n')
    target = app.Target(simulate=True, sim_config=SimConfig(duration=0.05, faults=FaultConfig.parse(
        ["fail=1", "hostile_text=1"])))
    await app.run(app.RunOptions(workdir=tmp_path / "work", manifest=manifest, target=target, settings=settings()))
    df = await build_report(tmp_path / "work", "hostile")
    assert df["error"][0].startswith('=HYPERLINK("https://evil.example/x","click") \x1b[31m')  # as recorded
    out = tmp_path / f"r{ext}"
    write_report(df, out)
    if ext == ".csv":
        import csv

        with out.open(newline="", encoding="utf-8") as fh:
            (row,) = csv.DictReader(fh)
    else:
        import openpyxl

        sheet = openpyxl.load_workbook(out)["jobs"]
        header, values = (list(r) for r in sheet.iter_rows(values_only=True))
        assert all(c.data_type != "f" for r in sheet.iter_rows() for c in r)  # no formula at all
        row = dict(zip(header, values, strict=True))
        assert row["input.seed"] == -1  # a number, not text
    assert row["error"].startswith("'=HYPERLINK(\"https://evil.example/x\",\"click\") \\x1b[31m\\x1b[2J")
    assert "\x1b" not in row["error"] and "\x00" not in row["error"] and "\x07" not in row["error"]
    assert row["input.prompt"] == "'=1+2" and str(row["input.seed"]) == "-1"
    assert (row["meta._a"], row["meta._b"], row["meta._c"], row["meta._d"]) == ("-5", "'@SUM(A1)", "'+cmd|calc",
                                                                                 "' tab")
    assert str(row["meta._e"]) == "-2.5e3"
    write_report(df, tmp_path / "r.json")  # JSON is for programs: the values as recorded
    (record,) = json.loads((tmp_path / "r.json").read_text())
    assert record["error"] == df["error"][0] and record["input.prompt"] == "=1+2"


# ---- streaming: chunks, stdout ------------------------------------------------------------------


async def test_chunks_have_the_whole_batchs_columns_and_types(samples, tmp_path):
    """Read two jobs at a time, every chunk has every column, typed for the whole batch: the note
    that is a number only in the first chunk is text in all of them, and the chunks joined are the
    report read at once."""
    from batchgen.report import report_chunks

    work = await simulated_run(samples, tmp_path / "work", ["script.submit=fail"])
    parts = [df async for df in report_chunks(work, "quickstart", chunk=2)]
    assert [len(p) for p in parts] == [2, 2, 2]
    assert all(list(p.columns) == COLUMNS for p in parts), list(parts[0].columns)
    assert all(dict(p.dtypes) == dict(parts[0].dtypes) for p in parts), [
        {c: t for c, t in p.dtypes.items() if t != parts[0][c].dtype} for p in parts]
    assert str(parts[0]["input.seed"].dtype) == "Int64" and list(parts[0]["meta._take"]) == ["2", "2"]
    assert parts[2]["meta._tags"].isna().all() and parts[2]["meta._tags"].dtype == object
    whole = await build_report(work, "quickstart")
    pd.testing.assert_frame_equal(pd.concat(parts, ignore_index=True), whole)


def _report_cli(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchgen.cli", "report", "quickstart", "--workdir", str(work),
                           *args], capture_output=True, text=True, timeout=60)


async def test_report_to_stdout_as_csv_or_json_lines(mixed, tmp_path):
    done = _report_cli(mixed, "-o", "-")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert len(rows) == 6 and list(rows[0]) == COLUMNS
    # The summary goes to stderr, so stdout is the report alone.
    assert "stdout: 6 job(s) of quickstart, simulated (5 succeeded, 1 failed)" in done.stderr

    done = _report_cli(mixed, "-o", "-", "--format", "jsonl")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == 6 and all(list(r) == COLUMNS for r in records)
    assert records[0]["input.seed"] == 42 and isinstance(records[0]["simulated"], bool)

    bad = _report_cli(mixed, "-o", "-", "--format", "parquet")
    assert bad.returncode != 0 and bad.stdout == ""
    assert "a report on stdout is one of: .csv, .jsonl" in bad.stderr and "Traceback" not in bad.stderr


async def test_a_reader_that_goes_away_stops_the_report_quietly(mixed):
    # `batchgen report B -o - | head`: the pipe closes long before the report is written. A
    # command-line tool then stops quietly with the shell's code for it, not "internal error"
    # (nor asyncio's complaint about reads ahead left open).
    grow_batch(mixed / "simulated" / "batchgen.sqlite3", 5_000)  # far more than a pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "batchgen.cli", "report", "quickstart", "--workdir", str(mixed),  # noqa: ASYNC220 - nothing else runs in this loop
                             "-o", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"batch,key,")
    proc.stdout.close()
    try:
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 141, err
    finally:
        proc.kill()
        proc.stderr.close()
    assert err == "", err


async def test_json_lines_and_json_files_agree(mixed, tmp_path):
    df = await build_report(mixed, "quickstart")
    write_report(df, tmp_path / "r.jsonl")
    write_report(df, tmp_path / "r.json")
    lines = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert lines == json.loads((tmp_path / "r.json").read_text())


@pytest.mark.parametrize("ext", ["csv", "jsonl", "json"])
async def test_the_command_s_plain_chunks_write_what_the_frames_write(mixed, tmp_path, ext):
    """The command writes CSV and JSON from plain columns without pandas (report_tables); the
    frames of build_report, written by write_report, give the same file, byte for byte: mixed
    kinds, lists, notes, missing values, spreadsheet escaping alike."""
    from batchgen.report import report_tables, stream_report

    counts = await stream_report(report_tables(mixed, "quickstart", chunk=2), tmp_path / f"plain.{ext}")
    write_report(await build_report(mixed, "quickstart"), tmp_path / f"frame.{ext}")
    assert sum(counts.values()) == 6
    assert (tmp_path / f"plain.{ext}").read_bytes() == (tmp_path / f"frame.{ext}").read_bytes()
