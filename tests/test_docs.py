"""Every command is documented in the README and has help text with an example."""

from pathlib import Path

import pytest

import fpe_cli.cli  # noqa: F401  (registers every command)
from fpe_cli.cli.common import app

from conftest import run_cli

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def test_the_expected_commands_exist():
    assert set(COMMANDS) >= {"expand", "analyze", "params", "inspect", "verify", "convert", "data", "train",
                             "finetune", "evaluate"}


@pytest.mark.parametrize("name", COMMANDS)
def test_command_is_in_the_readme_with_an_example(name):
    assert f"### `fpe {name}`" in README
    section = README.split(f"### `fpe {name}`", 1)[1].split("\n### ", 1)[0]
    assert f"fpe {name} " in section, f"the README section of {name} has no example invocation"


@pytest.mark.parametrize("name", COMMANDS)
def test_help_has_an_example(name):
    res = run_cli([name, "--help"])
    assert res.exit_code == 0
    assert "Example" in res.stdout and f"fpe {name}" in res.stdout
