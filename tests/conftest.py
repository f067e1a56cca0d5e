"""Shared test fixtures: isolation from the user's home and the repo, checkpoint builders, a CLI runner."""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from safetensors.torch import save_file
from typer.testing import CliRunner

import fpe_cli.cli  # noqa: F401  - registers every command on the app
from fpe_cli.cli.common import app

# Hypothesis: small and fast; no example database written into the repo; the autouse isolation
# fixture below is function-scoped but harmless to share between examples (it only sets HOME/cwd).
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / f"fpe-tests-hypothesis-{os.getuid()}")  # not the repo
settings.register_profile(
    "fpe",
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.load_profile("fpe")


@pytest.fixture(autouse=True)
def _grouped_kernel_for_small_groups(monkeypatch):
    """Test models are tiny: let KernelMLP take the grouped kernel for any group size, so the grouped
    path is exercised (its speed threshold, layers.MIN_GROUP, has its own test in test_layers.py)."""
    import fpe_cli.layers

    monkeypatch.setattr(fpe_cli.layers, "MIN_GROUP", 1)


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """Keep every test out of the user's home and the repository: HOME and cwd are temp dirs."""
    home = tmp_path / "_home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    monkeypatch.delenv("FPE_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- checkpoints from plain torch.nn


def make_sequential(widths: list[int], *, bias: bool = True, seed: int = 0, dtype=torch.float32) -> torch.nn.Sequential:
    """nn.Sequential(Linear, ReLU, Linear, ...) with the given widths: keys 0.weight, 2.weight, ..."""
    torch.manual_seed(seed)
    mods: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        mods.append(torch.nn.Linear(a, b, bias=bias))
        if i < len(widths) - 2:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods).to(dtype)


def state_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path = Path(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def save_module(module: torch.nn.Module, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """A plain torch.nn module's state_dict as safetensors (what users hand to fpe)."""
    return save_tensors(path, state_tensors(module), metadata)


def save_mlp(path: Path, widths: list[int], *, bias: bool = True, seed: int = 0, dtype=torch.float32) -> Path:
    return save_module(make_sequential(widths, bias=bias, seed=seed, dtype=dtype), path)


@pytest.fixture
def mlp_file(tmp_path) -> Path:
    """A one-hidden-layer float32 MLP 12 -> 8 -> 3 (nn.Sequential naming) in tmp_path/model.safetensors."""
    return save_mlp(tmp_path / "model.safetensors", [12, 8, 3])


@pytest.fixture
def deep_file(tmp_path) -> Path:
    """A three-hidden-layer MLP 10 -> 8 -> 6 -> 6 -> 4 in tmp_path/deep.safetensors."""
    return save_mlp(tmp_path / "deep.safetensors", [10, 8, 6, 6, 4], seed=1)


# ---------------------------------------------------------------- reading files without fpe

NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,  # bf16: raw bits
             "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def read_header_raw(path: Path) -> tuple[bytes, dict]:
    """(raw header bytes, parsed header) of a safetensors file, parsed by hand."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    raw = data[8:8 + n]
    return raw, json.loads(raw)


def read_numpy(path: Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, str]]:
    """Every tensor as (safetensors dtype, numpy array) using numpy alone (bf16 as uint16 bits)."""
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, e in header.items():
        b, end = e["data_offsets"]
        arr = np.frombuffer(data[8 + n + b:8 + n + end], dtype=NP_DTYPES[e["dtype"]]).reshape(e["shape"])
        out[name] = (e["dtype"], arr)
    return out, meta


def listing(path: Path) -> list[str]:
    """Every entry below a directory (hidden and temp files included), for before/after comparisons."""
    path = Path(path)
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


# ---------------------------------------------------------------- the CLI


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None = None

    def json(self):
        return json.loads(self.stdout)


def run_cli(args, env: dict[str, str] | None = None) -> CliResult:
    """Invoke `fpe ARGS` in-process; stdout and stderr are captured separately (Typer's CliRunner)."""
    result = CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=True)
    exc = result.exception if not isinstance(result.exception, SystemExit) else None
    return CliResult(result.exit_code, result.stdout, result.stderr, exc)


def assert_one_error_line(res: CliResult, *needles: str, code: int = 2) -> str:
    """Exit code, exactly one `Error:` line on stderr (and nothing else there), no traceback, empty stdout."""
    assert res.exception is None, f"unexpected exception {res.exception!r}"
    assert res.exit_code == code, (res.exit_code, res.stdout, res.stderr)
    lines = res.stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{res.stderr}"
    line = lines[0]
    assert line.startswith("Error: "), line
    assert "Traceback" not in res.stderr + res.stdout
    assert res.stdout == ""
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in {line!r}"
    return line


@pytest.fixture
def model6(tmp_path):
    """m.safetensors: a 6-8-3 nn.Sequential as torch code saves it (seeded)."""
    torch.manual_seed(0)
    path = tmp_path / "m.safetensors"
    save_file(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).state_dict(), str(path))
    return path


# ---------------------------------------------------------------- subprocess helpers (tests that run the real executable)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for an `fpe` child process: no FPE_DEBUG, one thread each (2 shared cores)."""
    env = {k: v for k, v in os.environ.items() if k != "FPE_DEBUG"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.update(extra)
    return env


def temp_files(where: Path) -> list[str]:
    """fpe's temp files (`.NAME.*.tmp`) anywhere below `where`."""
    return sorted(p.name for p in Path(where).rglob("*") if p.name.endswith(".tmp"))


def wait_until(proc, ready, timeout: float = 90):
    """Poll `ready()` every 0.2 ms until it returns something truthy (the process must still run)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        seen = ready()
        if seen:
            return seen
        time.sleep(0.0002)
    raise AssertionError(f"the process finished before the moment to act on came: {proc.communicate()}")
