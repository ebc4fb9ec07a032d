"""The docs stay true: every command has help with an example and is in README; CI runs the
README's test command; the README's examples name real options."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner
from conftest import REPO

from batchgen.cli import main

README = (REPO / "README.md").read_text()
COMMANDS = sorted(main.commands)


def test_quick_start_is_two_commands():
    block = README.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"```sh\n(.+?)\n```", block)
    assert commands[:2] == [
        "pip install . && batchgen run sample_manifests/quickstart.yaml --simulate && batchgen status",
        "pip install '.[test]' && pytest",
    ]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "pip install '.[test]' && pytest" in ci


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_help_with_an_example_and_is_documented(name):
    result = CliRunner().invoke(main, [name, "--help"])
    assert result.exit_code == 0
    assert "Example" in result.output and f"batchgen {name}" in result.output
    assert f"### `batchgen {name}" in README, f"README has no section for batchgen {name}"


@pytest.mark.parametrize("name", COMMANDS)
def test_options_named_in_readme_exist(name):
    section = re.split(r"\n##+ ", README.split(f"### `batchgen {name}", 1)[1], maxsplit=1)[0]
    options = {p.opts[0] for p in main.commands[name].params} | {
        o for p in main.commands[name].params for o in p.opts + p.secondary_opts}
    for opt in set(re.findall(r"`(--[a-z-]+)", section)):
        assert opt in options, f"README mentions {opt} for batchgen {name}, which has no such option"


def test_exit_codes_documented():
    from batchgen import cli

    codes = {v for k, v in vars(cli).items() if k.startswith("EXIT_")}
    for code in codes:
        assert re.search(rf"^\| {code} \|", README, re.M), f"exit code {code} not in README"


def test_report_formats_in_the_readme_and_help_are_the_registrys():
    # One registry (reportformats.py): the README's table and `report --help` are derived from it,
    # so a format added there cannot be left out of either.
    from batchgen import reportformats

    section = README.split("### `batchgen report", 1)[1].split("\n### ", 1)[0]
    assert reportformats.readme_table() in section
    help_text = " ".join(CliRunner().invoke(main, ["report", "--help"]).output.split())
    for fmt in reportformats.REPORT_FORMATS.values():
        assert fmt.ext in help_text and fmt.name in help_text.split("--format [", 1)[1].split("]", 1)[0]
        if fmt.needs:
            assert f"{fmt.ext} (needs {fmt.needs})" in help_text


def test_every_x_batchgen_key_is_documented_for_model_authors():
    # The keys batchgen reads from a schema's "x-batchgen" (schema.py; `note` in cli.py) and those
    # the bundled schemas use are all in the table a model author reads.
    import json

    doc = (REPO / "batchgen" / "models" / "README.md").read_text()
    table = doc.split("## `x-batchgen`", 1)[1]
    documented = set(re.findall(r"^\| `(\w+)` \|", table, re.M))
    source = (REPO / "batchgen" / "schema.py").read_text()
    read = set(re.findall(r'extra\.get\("(\w+)"\)', source)) | {"note"}
    assert {"output_kind", "base_price_usd", "price_unit", "origin"} <= read  # the pattern still finds them
    used = {k for f in (REPO / "batchgen" / "models").glob("*.json")
            for k in json.loads(f.read_text()).get("x-batchgen", {})}
    assert read | used <= documented
    assert "batchgen/models/README.md" in README
