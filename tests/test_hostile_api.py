"""What batchgen does when the API (or whatever answers in its place) misbehaves or is hostile:
each scenario runs against the real simulator, with a fault knob making it misbehave."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from click.testing import CliRunner

from batchgen.cli import main
from batchgen.text import printable, spreadsheet_cell

# --- hostile input and text ---


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """batchgen in its own process, as a user runs it: its logging set up as in real life."""
    return subprocess.run([sys.executable, "-m", "batchgen.cli", *args], capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items() if k != "BATCHGEN_TRACEBACK"})


def _inert(text: str) -> bool:
    """Nothing a terminal or a log tool would act on: no ESC, BEL, NUL, CSI (C1) or bidi control."""
    return not any(ch in text for ch in "\x1b\x07\x00\x9b\u202e")


def test_error_text_from_the_api_is_shown_never_obeyed(samples, tmp_path):
    """Every failed job's error, and the error envelope of a submit, carry a spreadsheet formula,
    colour, clear-screen, an OSC 8 link, a window title and a NUL (simulator fault hostile_text).
    None of it reaches the terminal, the log file, status or the gallery as control characters."""
    log = tmp_path / "logs" / "run.log"
    run = _run_cli("run", str(samples / "quickstart.yaml"), "--simulate", "-v", "--log-file", str(log),
                   "--sim-fault", "fail=1", "--sim-fault", "hostile_text=1", "--sim-fault", "script.submit=error200")
    assert run.returncode == 1, run.stderr
    for text in (run.stdout, run.stderr, log.read_text()):
        assert _inert(text)
    # Shown as text: escaped, each message on its one line.
    assert "failed: =HYPERLINK(\"https://evil.example/x\",\"click\") \\x1b[31m\\x1b[2J\\x1b]8;;" in run.stderr
    assert "\\x1b]0;pwned\\x07\\x00 Internal error, please try again" in run.stderr  # the envelope, in a retry

    runner = CliRunner()
    status = runner.invoke(main, ["status"], catch_exceptions=False)
    assert status.exit_code == 0 and _inert(status.output)
    assert "6 failed: =HYPERLINK" in status.output and "\\x1b[31m" in status.output
    as_json = runner.invoke(main, ["status", "--json"], catch_exceptions=False).output
    assert _inert(as_json) and json.loads(as_json)["batches"][0]["failures"][0]["error"].startswith("=HYPERLINK")

    page = runner.invoke(main, ["gallery", "quickstart"], catch_exceptions=False)
    html = (tmp_path / "jobs" / "quickstart" / "gallery.html").read_text()
    assert page.exit_code == 0 and _inert(html)
    assert "=HYPERLINK(&quot;https://evil.example/x&quot;,&quot;click&quot;) \\x1b[31m" in html


async def test_account_error_text_is_shown_never_obeyed(samples, simulator):
    """The last line of a run the API stopped with its own words (a refused token) is escaped too."""
    sim = await simulator(token="the-right-one", faults=["hostile_text=1"])
    manifest = samples / "real.yaml"
    manifest.write_text(f"image_base_url: {sim.root_url}/inputs\njobs: [{{prompt: p, image: images/street.jpg}}]\n")
    env = {**os.environ, "RUNCOMFY_API_TOKEN": "a-wrong-one", "RUNCOMFY_API_URL": sim.base_url}
    env.pop("BATCHGEN_TRACEBACK", None)
    result = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "batchgen.cli", "run", str(manifest)],
                                     capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 5, result.stderr
    assert _inert(result.stderr) and "a-wrong-one" not in result.stderr
    assert "error: submit /models/bytedance/dreamina-3-0/pro/image-to-video: =HYPERLINK(" in result.stderr
    assert "\\x1b]0;pwned\\x07\\x00 Invalid or missing API token" in result.stderr


def test_printable_escapes_controls_and_keeps_text():
    assert printable("plain text, é, 日本") == "plain text, é, 日本"
    assert printable("\x1b[2J\x1b]8;;http://x\x07ok\x00\x9b1m\u202eevil\tand\r\nmore") == (
        "\\x1b[2J\\x1b]8;;http://x\\x07ok\\x00\\x9b1m\\u202eevil and  more")
    assert printable("two\nlines\x1b", keep_newlines=True) == "two\nlines\\x1b"
    assert [spreadsheet_cell(v) for v in ("=1", "+1", "-1", "-x", "@a", "\tb", "\rc", "ok", -1, 2.5, None)] == [
        "'=1", "+1", "-1", "'-x", "'@a", "' b", "' c", "ok", -1, 2.5, None]
