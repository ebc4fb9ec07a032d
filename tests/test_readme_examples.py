"""README's command examples stay true: each one is parsed by the CLI, and the ones that run
against the built-in simulator from the sample manifests are run, in README's order, and their
output compared with what README shows, line by line, by shape.

A line's shape is the line with what changes from run to run (times, numbers, keys, request ids,
the scratch folder) replaced by placeholders; a README line of ``...`` stands for any lines. So a
renamed option, a reworded message, a new report column or an example that no longer matches what
the command does fails here, and README is fixed with the code.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from conftest import REPO, SAMPLES

from batchgen.cli import main

README = REPO / "README.md"
# Where README's examples pretend to run; the tests' own folder is put in its place.
README_DIR = "/tmp/scratch/demo"


@dataclass
class Example:
    line: int  # README line of the command
    command: str  # after "$ ", comments and shell glue removed
    output: list[str]


def examples() -> list[Example]:
    found: list[Example] = []
    fenced = False
    current: Example | None = None
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if line.startswith("```"):
            fenced = not fenced
            current = None
            continue
        if not fenced:
            continue
        if line.startswith("$ "):
            current = Example(number, _command(line[2:]), [])
            found.append(current)
        elif current is not None:
            current.output.append(line)
    return found


def _command(text: str) -> str:
    text = re.sub(r"\s+#.*$", "", text)  # a trailing comment
    text = re.sub(r";\s*echo \$\?$", "", text)
    text = re.sub(r"^: > \S+; ", "", text)  # "truncate the store, then ..."
    return text.strip()


def batchgen_args(command: str) -> list[str] | None:
    """The arguments of a ``batchgen ...`` command line (an env prefix allowed), else None."""
    words = shlex.split(command)
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words.pop(0)
    if not words or words[0] != "batchgen":
        return None
    return words[1:]


BATCHGEN_EXAMPLES = [e for e in examples() if batchgen_args(e.command) is not None]


def test_readme_has_examples_to_check():
    assert len(BATCHGEN_EXAMPLES) >= 30


@pytest.mark.parametrize("example", BATCHGEN_EXAMPLES, ids=lambda e: f"line{e.line}")
def test_every_readme_command_parses(example):
    """Every option an example uses exists on its command, and its values are accepted."""
    args = batchgen_args(example.command)
    assert args is not None
    try:
        with main.make_context("batchgen", list(args), resilient_parsing=False) as ctx:
            # click 8.2 keeps the command name apart (protected_args is deprecated)
            words = [*getattr(ctx, "_protected_args", []), *ctx.args]
            name, sub, rest = main.resolve_command(ctx, words)
            assert sub is not None, f"README line {example.line}: no command in {example.command!r}"
            with sub.make_context(name, rest, parent=ctx):
                pass
    except click.exceptions.Exit as exc:  # --help: shown, and parsed
        assert exc.exit_code == 0
    except click.UsageError as exc:  # pragma: no cover - the failure message is the point
        pytest.fail(f"README line {example.line}: {example.command!r}: {exc.format_message()}")


# --- running the examples -----------------------------------------------------------------------

_SHAPES = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"\b[0-9a-f]{64}\b"), "<sha>"),
    (re.compile(r"\b[0-9a-f]{16}\b"), "<key>"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:?\d\d|Z)?"), "<time>"),
    (re.compile(r"\b\d\d:\d\d:\d\d\b"), "<time>"),
    (re.compile(r"\d+(\.\d+)?"), "<n>"),
]


def shape(line: str, here: str) -> str:
    line = line.replace(here, "<dir>").replace(README_DIR, "<dir>")
    for pattern, placeholder in _SHAPES:
        line = pattern.sub(placeholder, line)
    return line.rstrip()


def assert_same_shape(example: Example, actual: str, here: str) -> None:
    expected = [shape(line, here) for line in example.output]
    got = [shape(line, here) for line in actual.splitlines()]
    if expected and expected[0].startswith("{"):  # a JSON example, folded to fit the page
        keys = set(re.findall(r'"(\w+)":', " ".join(example.output)))
        assert keys <= set(re.findall(r'"(\w+)":', actual)), (example.line, keys, actual)
        json.loads(actual)
        return
    # README's lines must appear in order; "..." stands for any number of lines.
    at = 0
    skipping = False
    for want in expected:
        if want.strip() == "...":
            skipping = True
            continue
        while at < len(got) and got[at] != want:
            assert skipping, (
                f"README line {example.line} ({example.command}): expected\n  {want}\n"
                f"but the command printed\n  {got[at]}\nwhole output:\n{actual}")
            at += 1
        assert at < len(got), (
            f"README line {example.line} ({example.command}): missing\n  {want}\n"
            f"whole output:\n{actual}")
        at += 1
        skipping = False


def find(command: str) -> Example:
    matches = [e for e in examples() if e.command == command]
    assert matches, f"README no longer shows `$ {command}`: update this test with it"
    return matches[0]


def run_example(example: Example, here: str) -> str:
    if example.command.startswith("head -2 "):
        path = Path(example.command.split()[-1])
        return "\n".join(path.read_text().splitlines()[:2])
    if example.command.startswith("ls "):  # a folder's names, one a line, as ls prints to a pipe
        return "\n".join(sorted(p.name for p in Path(example.command.split()[-1]).iterdir()))
    args = batchgen_args(example.command)
    assert args is not None
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    return result.output


@pytest.fixture
def demo(tmp_path):
    """README's folder: the sample manifests in ``sample_manifests/``, the work directory in jobs/."""
    shutil.copytree(SAMPLES, tmp_path / "sample_manifests")
    return str(tmp_path)


def make_shots(here: Path) -> None:
    """The images README's `--fix` example starts from, made from the samples: a WEBP, a JPEG
    over 4096 px, and a banner wider than 3:1 (shots.yaml names them)."""
    from PIL import Image

    shots = here / "shots"
    shots.mkdir()
    with Image.open(here / "sample_manifests" / "images" / "street.jpg") as im:
        im.save(shots / "street.webp")
        im.resize((4800, 2700)).save(shots / "harbour.jpg", quality=90)
        im.resize((1600, 900)).crop((0, 250, 1600, 650)).save(shots / "banner.png")
    (here / "shots.yaml").write_text(
        "name: shots\nmodel: bytedance/dreamina-3-0/pro/image-to-video\njobs:\n" + "".join(
            f"  - prompt: {prompt}\n    image: shots/{name}\n" for name, prompt in (
                ("street.webp", "Rain begins to fall on the street."),
                ("harbour.jpg", "Boats rock gently in the harbour."),
                ("banner.png", "The city lights flicker on."))))


# Each scenario is a sequence of README examples that, run in order in a fresh folder, leave the
# state the next one shows; a function in it prepares the folder for the examples after it.
SCENARIOS: dict[str, list[Any]] = {
    "quick start, then its report and gallery": [
        "batchgen validate sample_manifests/street-scenes.yaml --simulate",
        "batchgen plan sample_manifests/street-scenes.yaml --simulate",
        "batchgen run sample_manifests/quickstart.yaml --simulate",
        "batchgen report quickstart --simulated -o quickstart.csv",
        "head -2 quickstart.csv",
        "batchgen gallery quickstart --simulated",
    ],
    "a failed job, its status, and retry": [
        "batchgen run sample_manifests/street-scenes.yaml --simulate --sim-fault script.submit=fail -q",
        "batchgen status street-scenes",
        "batchgen status --json",
        "batchgen retry street-scenes --simulate -q",
    ],
    "fixing images on request": [
        make_shots,
        "batchgen validate shots.yaml --fix",
        "batchgen validate shots.yaml --fix --fix-ratio pad",
        "batchgen run shots.yaml --simulate --fix-images --fix-ratio pad -q",
    ],
    "output files named by the manifest": [
        "batchgen run sample_manifests/named-outputs.yaml --simulate -q",
        "ls jobs/simulated/named-outputs",
    ],
    "a batch named like another but for case": [
        "batchgen run sample_manifests/quickstart.yaml --simulate --max-jobs 2 -q",
        "batchgen run sample_manifests/quickstart.yaml --simulate --batch Quickstart -q",
    ],
    "cancel what is left": [
        "batchgen run sample_manifests/quickstart.yaml --simulate --max-jobs 2 -q",
        "batchgen cancel quickstart --simulate",
    ],
    "the simulator's faults": ["batchgen simulate --help"],
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_readme_examples_print_what_readme_shows(scenario, demo):
    for command in SCENARIOS[scenario]:
        if callable(command):
            command(Path(demo))
            continue
        example = find(command)
        assert_same_shape(example, run_example(example, demo), demo)
