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


def _python_blocks(containing: str) -> list[str]:
    blocks = README.split("```python\n")[1:]
    return [b.split("```", 1)[0] for b in blocks if containing in b.split("```", 1)[0]]


def test_the_readme_snippets_that_load_each_layout_without_fpe_work(tmp_path, monkeypatch):
    import numpy as np
    import torch

    from fpe_cli.checkpoint import load_checkpoint

    sample = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "digits_mlp.safetensors"  # 64-32-10
    monkeypatch.chdir(tmp_path)
    assert run_cli(["expand", sample, "--alpha", "4", "-o", "model.fpe4.safetensors"]).exit_code == 0
    assert run_cli(["expand", sample, "--alpha", "4", "--layout", "dense", "-o", "model.fpe4.dense.safetensors"]).exit_code == 0
    expected = load_checkpoint(tmp_path / "model.fpe4.safetensors").mlp.layers[0]

    (packed,) = _python_blocks('"fpe.zmask:0.weight"')
    scope: dict = {}
    exec(packed, scope)  # noqa: S102 - the README's own snippet, run as a reader would
    assert np.array_equal(scope["mask"], expected.mask.numpy())
    assert np.array_equal(scope["w"], expected.weight.numpy())

    (dense,) = _python_blocks("load_state_dict")
    scope = {}
    exec(dense, scope)  # noqa: S102
    assert torch.equal(scope["net"][0].weight.detach(), expected.weight)


def test_help_and_usage_errors_do_not_import_torch():
    """`fpe --help` answers in a fraction of a second: torch (over a second to import) loads only when a
    command runs."""
    import subprocess
    import sys

    code = "import sys, fpe_cli.cli; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
