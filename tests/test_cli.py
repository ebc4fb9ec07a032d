"""The command line as a user meets it, in a non-TTY (as under cron): exit codes, readable logs,
status, plan, models, config files."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner
from imagefactory import make_image

from batchgen.cli import main


def cli(*args: str, env: dict | None = None):
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


@pytest.fixture
def done(samples):
    """A work directory where the quick start has run."""
    result = cli("run", str(samples / "quickstart.yaml"), "--simulate")
    assert result.exit_code == 0, result.output
    return result


def test_run_logs_plain_lines_without_control_characters(done):
    assert "\x1b" not in done.output and "\r" not in done.output
    lines = [line for line in done.output.splitlines() if "quickstart/" in line]
    assert lines and all(re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", line) for line in lines)
    assert "quickstart: 6 succeeded" in done.output


def test_rerun_submits_nothing(done, samples):
    again = cli("run", str(samples / "quickstart.yaml"), "--simulate")
    assert again.exit_code == 0 and "0 new job(s) recorded, 0 submitted" in again.output


def test_status_and_json(done):
    text = cli("status")
    assert text.exit_code == 0 and "succeeded         6" in text.output
    data = json.loads(cli("status", "--json").output)
    (batch,) = data["batches"]
    assert batch["states"] == {"succeeded": 6} and batch["spent_usd"] == pytest.approx(0.6)
    assert cli("status", "nope").exit_code == 2


def test_status_suggests_what_to_do_next(samples):
    cli("run", str(samples / "quickstart.yaml"), "--simulate")
    import sqlite3

    with sqlite3.connect("jobs/batchgen.sqlite3") as db:
        db.execute("UPDATE jobs SET state='unknown', error='lost' WHERE rowid IN (1, 2)")
        db.execute("UPDATE jobs SET state='failed', error='Generation failed' WHERE rowid = 3")
    out = cli("status").output
    assert "2 unknown: lost" in out and "batchgen retry --unknown quickstart" in out
    assert "batchgen retry quickstart" in out


def test_json_log_format_and_log_file(samples, tmp_path):
    log = tmp_path / "run.log"
    result = cli("run", str(samples / "plain.csv"), "--simulate", "--log-format", "json",
                 "--log-file", str(log))
    assert result.exit_code == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["event"] for r in records} >= {"in_queue", "succeeded"}
    assert all("time" in r for r in records)


def test_plan_and_dry_run_submit_nothing(samples):
    plan = cli("plan", str(samples / "quickstart.yaml"), "--simulate")
    assert plan.exit_code == 0 and "new: 6" in plan.output and "$0.60" in plan.output
    dry = cli("run", str(samples / "quickstart.yaml"), "--simulate", "--dry-run")
    assert dry.exit_code == 0 and "would submit: 6" in dry.output
    assert cli("status").exit_code == 2  # nothing was recorded: there is no store yet


def test_bad_manifest_exit_code_and_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs:\n  - {prompt: hi, image: nope.jpg, frames: 120}\n")
    result = cli("run", str(bad), "--simulate")
    assert result.exit_code == 2
    assert "bad.yaml, line 2, field 'frames': must be one of 121, 241, got 120" in result.output
    assert "Traceback" not in result.output


def test_real_api_needs_a_token(samples):
    result = cli("run", str(samples / "quickstart.yaml"))  # local images: valid for the real API too
    assert result.exit_code == 2 and "RUNCOMFY_API_TOKEN" in result.output


def test_config_file_fills_unset_options(samples):
    (samples.parent / "jobs").mkdir(exist_ok=True)
    (samples.parent / "jobs" / "batchgen.toml").write_text('log_format = "json"\nconcurrency = 2\n')
    result = cli("run", str(samples / "plain.csv"), "--simulate")
    assert result.exit_code == 0
    assert any(line.startswith("{") for line in result.output.splitlines())
    (samples.parent / "jobs" / "batchgen.toml").write_text('token = "abc"\n')
    result = cli("run", str(samples / "plain.csv"), "--simulate")
    assert result.exit_code == 2 and "RUNCOMFY_API_TOKEN in the environment" in result.output


def test_models_lists_bundled_schemas():
    out = cli("models").output
    for model in ("bytedance/dreamina-3-0/pro/image-to-video", "wan-ai/wan-2-2/image-to-video",
                  "kling/kling-o1/image-to-video"):
        assert model in out
    detail = cli("models", "bytedance/dreamina-3-0/pro/image-to-video").output
    assert "one of 121, 241" in detail
    assert cli("models", "nobody/nothing").exit_code == 2


@pytest.mark.parametrize(
    ("model", "field"),
    [("wan-ai/wan-2-2/image-to-video", "img_url"), ("kling/kling-2-1/standard/image-to-video", "image_url")],
)
def test_other_models_run_end_to_end(tmp_path, model, field):
    make_image(tmp_path / "a.jpg", 640, 480)
    manifest = tmp_path / "other.yaml"
    manifest.write_text(f"model: {model}\njobs: [{{prompt: p, image: a.jpg}}]\n")
    result = cli("run", str(manifest), "--simulate")
    assert result.exit_code == 0, result.output
    assert "other: 1 succeeded" in result.output


def test_cancel_unknown_batch_is_a_usage_error(done):
    result = cli("cancel", "nope")
    assert result.exit_code == 2 and "known: quickstart" in result.output


def test_report_and_gallery_commands(done, tmp_path):
    out = tmp_path / "r.csv"
    result = cli("report", "quickstart", "-o", str(out))
    assert result.exit_code == 0 and "6 job(s) of quickstart (6 succeeded)" in result.output
    assert out.read_text().count("\n") == 7
    bad = cli("report", "quickstart", "-o", str(tmp_path / "r.txt"))
    assert bad.exit_code == 2 and ".csv, .json" in bad.output
    page = cli("gallery", "quickstart")
    assert page.exit_code == 0 and page.output.strip().endswith("quickstart/gallery.html")
