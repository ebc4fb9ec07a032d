"""The command line as a user meets it, in a non-TTY (as under cron): exit codes, readable logs,
status, plan, models, config files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from imagefactory import make_image

from batchgen import cli as cli_module
from batchgen.cli import main
from batchgen.runner import RunSummary, StopReason


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

    with sqlite3.connect("jobs/simulated/batchgen.sqlite3") as db:
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
    result = cli("cancel", "nope", "--simulate")
    assert result.exit_code == 2 and "known: quickstart" in result.output


def test_report_and_gallery_commands(done, tmp_path):
    out = tmp_path / "r.csv"
    result = cli("report", "quickstart", "-o", str(out))
    assert result.exit_code == 0 and "6 job(s) of quickstart, simulated (6 succeeded)" in result.output
    assert out.read_text().count("\n") == 7
    bad = cli("report", "quickstart", "-o", str(tmp_path / "r.txt"))
    assert bad.exit_code == 2 and ".csv, .json" in bad.output
    page = cli("gallery", "quickstart")
    assert page.exit_code == 0 and page.output.strip().endswith("quickstart/gallery.html")


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_lost_store_is_refused_not_silently_recreated(done, samples, damage):
    store = Path("jobs/simulated/batchgen.sqlite3")
    if damage == "truncate":
        store.write_bytes(b"")
    else:
        store.unlink()
    again = cli("run", str(samples / "quickstart.yaml"), "--simulate")
    assert again.exit_code == 70
    said = again.output.replace("\n", " ")
    assert ("is empty (0 bytes)" if damage == "truncate" else "is missing") in said
    assert "quickstart/" in said and "batchgen.lock" in said  # what says earlier runs were here
    assert "start over on purpose: rm -r jobs/simulated" in said
    # Nothing was made of it: no new store, nothing submitted.
    assert (store.stat().st_size == 0) if damage == "truncate" else not store.exists()
    assert "submitted" not in said
    # Reading commands do not give it a new schema either.
    assert cli("status").exit_code == 70
    assert (store.stat().st_size == 0) if damage == "truncate" else not store.exists()


def test_a_work_directory_without_leftovers_gets_a_new_store(samples):
    Path("jobs").mkdir()
    Path("jobs/batchgen.toml").write_text("concurrency = 6\n")
    assert cli("run", str(samples / "quickstart.yaml"), "--simulate").exit_code == 0


# ---- hostile or mistaken input: limits, names, URLs, log files, crashes --------------------------


def test_max_expand_refuses_a_manifest_bomb_and_can_be_raised(samples):
    bomb = samples / "bomb.yaml"
    bomb.write_text("jobs: [{prompt: p, image: images/street.jpg}]\nmatrix: {seed: [1, 2, 3]}\n"
                    "repeat: 1000000000\n")
    for command in (["validate", str(bomb)], ["plan", str(bomb)], ["run", str(bomb), "--simulate"]):
        result = cli(*command)
        assert result.exit_code == 2, result.output
        assert ("bomb.yaml, line 2, field 'matrix': the manifest expands to 3,000,000,000 jobs" in result.output
                and "--max-expand N" in result.output)
    bomb.write_text("jobs: [{prompt: p, image: images/street.jpg}]\nmatrix: {seed: [1, 2, 3]}\n")
    assert cli("validate", str(bomb), "--simulate", "--max-expand", "2").exit_code == 2
    ok = cli("validate", str(bomb), "--simulate", "--max-expand", "3")
    assert ok.exit_code == 0 and "3 job(s), all valid" in ok.output


def test_batch_names_that_collide_with_the_work_directory(samples):
    quick = str(samples / "quickstart.yaml")
    result = cli("run", quick, "--simulate", "--batch", "batchgen.sqlite3")
    assert result.exit_code == 2 and "batch name 'batchgen.sqlite3' is reserved" in result.output
    (samples.parent / "jobs").mkdir()
    (samples.parent / "jobs" / "README.md").write_text("my notes\n")
    for command in ("run", "plan"):
        result = cli(command, quick, "--simulate", "--batch", "README.md")
        assert result.exit_code == 2 and "batch name 'README.md' is taken by the file" in result.output
    assert (samples.parent / "jobs" / "README.md").read_text() == "my notes\n"


@pytest.mark.parametrize("url", ["http://api.example.com/v1", "http://10.0.0.5:8787/v1", "ftp://example.com/v1"])
def test_a_token_is_never_sent_in_clear_text(done, url):
    cli("cancel", "quickstart")  # something left to do, and so to send the token for
    env = {"RUNCOMFY_API_TOKEN": "secret-token"}
    by_flag = cli("retry", "quickstart", "--api-url", url, env=env)
    by_env = cli("run", env={**env, "RUNCOMFY_API_URL": url})
    Path("jobs/batchgen.toml").write_text(f'api_url = "{url}"\n')
    by_config = cli("run", "--batch", "quickstart", env=env)
    for result in (by_flag, by_env, by_config):
        assert result.exit_code == 2, result.output
        assert f"error: API URL '{url}' is" in result.output and "secret-token" not in result.output


@pytest.mark.parametrize("url", ["http://127.0.0.1:8787/v1", "http://127.9.9.9/v1", "http://[::1]:8787/v1",
                                 "http://localhost:8787/v1", "https://api.example.com/v1"])
def test_plain_http_is_fine_on_this_machine(url):
    from batchgen import app

    assert app.resolve_api_url(app.Target(api_url=url + "/")) == url


def test_log_file_in_a_missing_folder(samples):
    (samples.parent / "jobs").mkdir()
    (samples.parent / "jobs" / "batchgen.toml").write_text('log_file = "logs/batchgen.log"\n')  # as in the README
    result = cli("run", str(samples / "plain.csv"), "--simulate")
    assert result.exit_code == 0, result.output
    assert "succeeded" in (samples.parent / "logs" / "batchgen.log").read_text()
    (samples.parent / "blocked").write_text("a file, not a folder")
    result = cli("run", str(samples / "plain.csv"), "--simulate", "--log-file", "blocked/run.log")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: cannot open the log file blocked/run.log: blocked is a file, not a folder"]


CRASHING_RUN = """
import sys
from batchgen import runner
from batchgen import cli as cli_module
from batchgen.cli import main
from batchgen.runner import RunSummary, StopReason

def bug(self, *args, **kwargs):
    raise RuntimeError("a bug in a runner task")

runner.Runner._finished = bug  # the first job to finish crashes its task
main(sys.argv[1:])
"""


@pytest.mark.parametrize("verbose", [[], ["-v"]])
def test_a_crashed_runner_task_is_one_error_line(samples, verbose):
    import subprocess
    import sys

    def crash(**env):
        return subprocess.run([sys.executable, "-c", CRASHING_RUN, "run", str(samples / "quickstart.yaml"),
                               "--simulate", "-q", *verbose], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **env})

    result = crash()
    assert result.returncode == 70
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() and "stopping" not in line]
    assert errors == ["error: internal error: RuntimeError: a bug in a runner task "
                      "(set BATCHGEN_TRACEBACK=1 for details)"], result.stderr
    assert "Traceback" not in result.stderr
    assert "Traceback" in crash(BATCHGEN_TRACEBACK="1").stderr


def test_a_bug_outside_the_event_loop_is_one_error_line(done, monkeypatch):
    from batchgen import cli as cli_module

    def bug(counts):
        raise KeyError("a bug while printing")

    monkeypatch.setattr(cli_module, "_ordered", bug)  # status prints its counts through it
    result = cli("status")
    assert result.exit_code == 70
    assert result.output.splitlines()[-1:] == [
        "error: internal error: KeyError: 'a bug while printing' (set BATCHGEN_TRACEBACK=1 for details)"]
    assert "Traceback" not in result.output
    monkeypatch.setenv("BATCHGEN_TRACEBACK", "1")
    with pytest.raises(KeyError):
        cli("status")


def test_a_run_with_and_without_its_manifest_agree_on_the_exit_code(samples):
    manifest = str(samples / "quickstart.yaml")
    assert cli("run", manifest, "--simulate").exit_code == 0
    import sqlite3

    with sqlite3.connect("jobs/simulated/batchgen.sqlite3") as db:
        db.execute("UPDATE jobs SET state='timed_out', error='not finished in time' WHERE rowid = 1")
    with_manifest, alone = cli("run", manifest, "--simulate"), cli("run", "--simulate")
    assert with_manifest.exit_code == alone.exit_code == 1, alone.output
    assert "quickstart: 5 succeeded, 1 timed_out" in alone.output


def test_next_lines_paste_as_they_are(samples, tmp_path):
    import shlex

    config = tmp_path / "my settings.toml"
    config.write_text("concurrency = 2\n")
    work = tmp_path / "other work"
    run = cli("--config", str(config), "run", str(samples / "quickstart.yaml"), "--simulate",
              "--workdir", str(work), "--sim-fault", "script.submit=fail")
    assert run.exit_code == 1
    (line,) = [ln for ln in run.output.splitlines() if "next:" in ln]
    command = line.split(": ", 2)[2]
    assert command == (f"batchgen --config {shlex.quote(str(config))} retry quickstart "
                       f"--workdir {shlex.quote(str(work))} --simulate")
    status = cli("--config", str(config), "status", "--workdir", str(work)).output
    assert f"next: 1 job(s) failed or timed out: {command}" in status
    pasted = cli(*shlex.split(command)[1:])
    assert pasted.exit_code == 0 and "quickstart: 6 succeeded" in pasted.output


async def test_next_lines_carry_the_api_the_batch_ran_against(tmp_path, simulator):
    from conftest import image_manifest

    from batchgen import app

    sim = await simulator(faults=["script.submit=fail"])
    manifest = image_manifest(tmp_path, sim, "night", 1)
    await app.run(app.RunOptions(workdir=tmp_path / "jobs", manifest=manifest,
                                 target=app.Target(api_url=sim.base_url, token="t")))
    (night,) = await app.status(tmp_path / "jobs")
    assert night.next_steps == [f"1 job(s) failed or timed out: batchgen retry night --api-url {sim.base_url}"]


# --- --concurrency auto ---------------------------------------------------------------------------


def test_concurrency_auto_is_the_default_says_why_the_cap_moves_and_is_remembered(samples):
    first = cli("run", str(samples / "quickstart.yaml"), "--simulate", "-v")
    assert first.exit_code == 0, first.output
    assert "cap 2 -> 3: jobs start at once" in first.output
    # the simulator of --simulate runs 4 at once: the cap stops near it, and says so
    assert "waiting at the provider" in first.output
    again = cli("run", str(samples / "quickstart.yaml"), "--simulate", "-v", "--batch", "second")
    assert again.exit_code == 0, again.output
    assert re.search(r"cap starts at \d+: learned by an earlier run", again.output)


@pytest.mark.parametrize(("value", "moves"), [("4", False), ("auto:2", False), ("auto:3", True)])
def test_a_number_fixes_the_cap_and_auto_takes_a_ceiling(samples, value, moves):
    result = cli("run", str(samples / "quickstart.yaml"), "--simulate", "-v", "-c", value)
    assert result.exit_code == 0, result.output
    assert ("cap 2 -> 3" in result.output) is moves
    assert "cap 3 -> " not in result.output


@pytest.mark.parametrize("value", ["0", "auto:0", "lots", "auto:x"])
def test_a_bad_concurrency_is_a_usage_error(samples, value):
    result = cli("run", str(samples / "quickstart.yaml"), "--simulate", "-c", value)
    assert result.exit_code == 2 and "--concurrency" in result.output


def test_concurrency_auto_in_the_config_file(samples):
    (samples.parent / "jobs").mkdir(exist_ok=True)
    (samples.parent / "jobs" / "batchgen.toml").write_text('concurrency = "auto:3"\n')
    result = cli("run", str(samples / "quickstart.yaml"), "--simulate", "-v")
    assert result.exit_code == 0, result.output
    assert "cap 2 -> 3" in result.output and "cap 3 -> " not in result.output


# Each reason a run stops, and the exit code it gives: the counts are what such a run leaves
# (jobs pending or at the provider unless it ran out of work).
_LEFT = {"b": {"succeeded": 2, "pending": 3}}
_STOP_EXITS = {
    StopReason.INTERRUPTED: (_LEFT, cli_module.EXIT_INTERRUPTED),
    StopReason.DEADLINE: (_LEFT, cli_module.EXIT_INTERRUPTED),
    StopReason.MAX_JOBS: (_LEFT, cli_module.EXIT_INTERRUPTED),
    StopReason.BUDGET: (_LEFT, cli_module.EXIT_INTERRUPTED),
    StopReason.BALANCE: (_LEFT, cli_module.EXIT_ACCOUNT),
    StopReason.REFUSED: (_LEFT, cli_module.EXIT_REFUSED),
    StopReason.OUTAGE: (_LEFT, cli_module.EXIT_INTERRUPTED),
    StopReason.CANCELLED: ({"b": {"succeeded": 2, "cancelled": 3}}, cli_module.EXIT_JOBS_FAILED),
    StopReason.ERROR: (_LEFT, cli_module.EXIT_INTERRUPTED),  # raised as well: the CLI shows that error
    StopReason.LEASE_LOST: (_LEFT, cli_module.EXIT_INTERRUPTED),  # run again: it joins the other runners
}


def test_every_stop_reason_has_an_exit_code():
    assert set(_STOP_EXITS) == set(StopReason)


@pytest.mark.parametrize("reason", list(StopReason))
def test_each_stop_reason_gives_its_exit_code(reason):
    counts, code = _STOP_EXITS[reason]
    summary = RunSummary(stop_reason=reason,
                         account_error="balance spent" if reason is StopReason.BALANCE else None)
    assert cli_module.run_exit(summary, counts)[0] == code
    assert cli_module.run_exit(RunSummary(), {"b": {"succeeded": 5}}) == (cli_module.EXIT_OK, None)


def test_simulate_offers_the_account_knobs():
    out = cli("simulate", "--help").output
    assert "--max-queued" in out and "--duration-jitter" in out


def test_simulate_help_lists_every_fault():
    from batchgen.simulator.faults import FAULTS, OUTCOMES

    out = cli("simulate", "--help").output
    faults = out[out.index("Faults (--fault"):]
    assert all(f"  {f.name}={f.value}" in faults for f in FAULTS), faults
    assert all(o in faults for o in OUTCOMES)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_simulate_stops_on_a_signal_with_exit_0_and_one_line(sig):
    """Ctrl-C (or SIGTERM) is how a standalone simulator is meant to stop: exit 0, one line,
    nothing from aiohttp about the request it cut short (a status call held by a slow fault)."""
    sim = subprocess.Popen([sys.executable, "-m", "batchgen.cli", "simulate", "--port", "0",
                            "--fault", "script.status=slow", "--fault", "slow_seconds=60"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sim.stderr is not None
        listening = sim.stderr.readline()
        base = re.search(r"http://\S+/v1", listening)
        assert base, listening
        held = threading.Thread(target=_ask_quietly, args=(f"{base[0]}/requests/r1/status",), daemon=True)
        held.start()
        _wait_for_call(base[0].removesuffix("/v1") + "/_sim/requests", "status")
        sim.send_signal(sig)
        out, err = sim.communicate(timeout=30)
    finally:
        if sim.poll() is None:
            sim.kill()
            sim.communicate()
    assert sim.returncode == 0, err
    assert out == "" and err == f"simulator stopped ({sig.name})\n"


def _ask_quietly(url: str) -> None:
    with contextlib.suppress(OSError):  # the simulator stops under it
        urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Bearer t"}), timeout=60)


def _wait_for_call(url: str, endpoint: str) -> None:
    """Until the simulator has counted a call to ``endpoint`` (it counts on arrival)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=10) as answer:
            if json.load(answer)["calls"].get(endpoint):
                return
        time.sleep(0.02)
    raise AssertionError(f"no {endpoint} call reached the simulator")


@pytest.mark.parametrize("command", [["report", "b", "-o", "-"], ["gallery", "b"], ["forget", "b", "--yes"]])
def test_the_simulated_results_are_named_by_simulate_as_in_run(command):
    """`--simulate` picks a batch's simulated results wherever `run`, `retry` and `cancel` take it."""
    for flag in ("--simulate", "--simulated"):
        result = CliRunner().invoke(main, [*command, flag])
        assert "No such option" not in result.output, result.output
        assert result.output.startswith("error: no store of --simulate runs"), result.output


# --- the live panel and the summary, at a terminal ------------------------------------------------


def test_at_a_terminal_every_failure_stays_and_the_last_frame_is_the_summary(samples):
    from conftest import panel_rows, run_in_terminal, terminal_screen

    code, raw = run_in_terminal("run", str(samples / "quickstart.yaml"), "--simulate",
                                "--sim-fault", "script.submit=fail,fail,fail,fail,fail,fail")
    screen = terminal_screen(raw)
    assert code == 1, "\n".join(screen)
    failures = [line for line in screen if " failed: " in line and "quickstart/" in line]
    assert len(failures) == 6  # each one, none redrawn away by the panel
    (totals,) = [line for line in screen if line.startswith("  quickstart: ")]
    assert totals == "  quickstart: 6 failed"
    last = panel_rows(screen)[-1]
    assert last["failed"] == 6 and sum(last.values()) == 6, last


def test_verbose_prints_each_event_once(samples):
    import subprocess
    import sys

    # A process of its own: under pytest, logging already has pytest's handler, not batchgen's.
    result = subprocess.run([sys.executable, "-m", "batchgen.cli", "run", str(samples / "street-scenes.yaml"),
                             "--simulate", "-v"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    submitted = [line for line in result.stderr.splitlines() if "submitted as" in line]
    assert len(submitted) == 4, submitted
    assert "applied store migration" in result.stderr  # -v still shows the library's own records


def test_json_log_format_makes_the_summary_json_too(samples):
    result = cli("run", str(samples / "quickstart.yaml"), "--simulate", "--log-format", "json",
                 "--sim-fault", "script.submit=fail")
    assert result.exit_code == 1
    (summary,) = [json.loads(line) for line in result.stdout.splitlines()]  # nothing else on stdout
    assert summary["event"] == "summary" and summary["submitted"] == 6
    assert summary["finished"] == {"failed": 1, "succeeded": 5}
    (batch,) = summary["batches"]
    assert batch["states"] == {"succeeded": 5, "failed": 1}
    assert Path(batch["outputs"]) == Path("jobs/simulated/quickstart")
    assert batch["next_steps"] == ["1 job(s) failed or timed out: batchgen retry quickstart --simulate"]
    assert batch["look"][0].endswith("batchgen gallery quickstart --simulate")


def test_summary_and_status_say_where_the_outputs_are_and_where_to_look(samples, tmp_path):
    import shlex

    work = tmp_path / "my work"
    run = cli("run", str(samples / "quickstart.yaml"), "--simulate", "--workdir", str(work))
    assert run.exit_code == 0
    assert f"  outputs: {work / 'simulated' / 'quickstart'}\n" in run.output
    looks = [line.split(": ", 2)[2] for line in run.output.splitlines() if line.startswith("  look: ")]
    status = cli("status", "--workdir", str(work)).output
    assert [line.split(": ", 2)[2] for line in status.splitlines() if line.startswith("  look: ")] == looks
    gallery, table = looks
    assert gallery == f"batchgen gallery quickstart --workdir {shlex.quote(str(work))} --simulate"
    assert cli(*shlex.split(gallery)[1:]).exit_code == 0
    assert cli(*shlex.split(table)[1:]).exit_code == 0 and Path("quickstart.csv").exists()


# --- options in one place work everywhere ---------------------------------------------------------


def test_workdir_and_config_go_before_or_after_the_command_name(samples, tmp_path):
    work = tmp_path / "elsewhere"
    config = tmp_path / "settings.toml"
    config.write_text('log_format = "json"\n')
    before = cli("--workdir", str(work), "--config", str(config), "run", str(samples / "plain.csv"), "--simulate")
    assert before.exit_code == 0, before.output
    assert (work / "simulated" / "batchgen.sqlite3").exists() and not Path("jobs").exists()
    assert json.loads(before.stdout)["event"] == "summary"  # the config file was read
    after = cli("run", str(samples / "plain.csv"), "--simulate", "--config", str(config), "-w", str(work))
    assert after.exit_code == 0 and json.loads(after.stdout)["new_jobs"] == 0
    for args in (["-w", str(work), "status"], ["status", "-w", str(work)], ["--config", str(config), "status",
                                                                             "--workdir", str(work)]):
        assert "succeeded" in cli(*args).output, args
    # A pasted next command keeps a work directory given before the command name.
    failing = cli("-w", str(work), "run", str(samples / "quickstart.yaml"), "--simulate",
                  "--sim-fault", "script.submit=fail")
    assert f"batchgen retry quickstart --workdir {work} --simulate" in failing.output


@pytest.mark.parametrize(("typo", "meant"), [("concurency", "concurrency"), ("max-cost", "max_cost"),
                                             ("Log_Format", "log_format")])
def test_a_config_key_typo_gets_a_did_you_mean(samples, typo, meant):
    Path("batchgen.toml").write_text(f"{typo} = 2\n")
    result = cli("--config", "batchgen.toml", "run", str(samples / "plain.csv"), "--simulate")
    assert result.exit_code == 2
    assert f"unknown setting '{typo}' (did you mean '{meant}'?)" in result.output


def test_plan_estimates_auto_at_the_cap_learned_for_the_model(done, samples):
    # Issue 17: with --concurrency auto (the default), the estimate uses the cap an earlier run
    # found for the model at this API, not the fixed default; a number is used as given.
    import asyncio

    from batchgen.store import Store

    async def learn(cap: int) -> None:
        async with await Store.open(samples.parent / "jobs" / "simulated" / "batchgen.sqlite3") as store:
            await store.remember_cap(["bytedance/dreamina-3-0/pro/image-to-video"], "simulator", cap, True)

    quick = samples / "quickstart.yaml"
    quick.write_text(quick.read_text().replace("seed: 42", "seed: 43"))  # 6 new jobs of a batch that ran
    asyncio.run(learn(3))
    plan = cli("plan", str(quick), "--simulate").output
    minutes = re.search(r"estimated duration: ([\d.]+) min at 3 at once \(the cap --concurrency auto found", plan)
    assert minutes, plan
    two = cli("plan", str(quick), "--simulate", "-c", "2").output
    assert re.search(r"estimated duration: [\d.]+ min at --concurrency 2$", two, re.M), two
    ceiling = cli("run", str(quick), "--simulate", "--dry-run", "-c", "auto:1").output
    assert "min at 1 at once (the cap --concurrency auto found" in ceiling, ceiling
    # two rounds of jobs at 3 at once, against three at 2 and six at 1
    one_round = float(minutes.group(1)) / 2
    assert float(re.search(r"([\d.]+) min at --concurrency 2", two).group(1)) == pytest.approx(3 * one_round, abs=0.06)
