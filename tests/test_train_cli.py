"""`fpe data`, `train`, `finetune`, `evaluate` end to end on real files, and the 2-process torchrun run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_error_line, run_cli
from safetensors.torch import load_file

from fpe_cli import train as train_mod
from fpe_cli.checkpoint import load_checkpoint
from fpe_cli.data import load_dataset

DNF = "dnf:vars=12,clauses=3,k=2,train=300,test=120,seed=1"
FAST = ["--epochs", "3", "--batch-size", "32", "--lr", "0.01"]


def cli_ok(*args) -> dict | None:
    res = run_cli(args)
    assert res.exit_code == 0, (res.stdout, res.stderr, res.exception)
    return res.json() if "--json" in args else None


@pytest.fixture
def dense(tmp_path) -> Path:
    """A small trained dense model on the DNF task (plain layout)."""
    out = tmp_path / "dense.safetensors"
    cli_ok("train", "--data", DNF, "--hidden", "8", *FAST, "-o", out)
    return out


@pytest.fixture
def expanded(tmp_path, dense) -> Path:
    out = tmp_path / "dense.fpe2.safetensors"
    cli_ok("expand", dense, "--alpha", "2", "--seed", "0", "-o", out, "-q")
    return out


# ---------------------------------------------------------------- fpe data


def test_data_writes_npz_and_clause_map(tmp_path):
    doc = cli_ok("data", DNF, "-o", tmp_path / "dnf.npz", "--clause-map", tmp_path / "clauses.json", "--json")
    assert doc["data"]["train"] == 300 and doc["data"]["inputs"] == 12 and sum(doc["label_counts"]) == 300
    again = load_dataset(tmp_path / "dnf.npz")
    assert again.sha256() == load_dataset(DNF).sha256() == doc["data"]["sha256"]
    clauses = json.loads((tmp_path / "clauses.json").read_text())
    assert clauses["num_inputs"] == 12 and len(clauses["groups"]) == 3
    res = run_cli(["data", DNF, "-o", tmp_path / "dnf.npz"])
    assert_one_error_line(res, "output exists", "--force")
    assert_one_error_line(run_cli(["data", "digits", "-o", tmp_path / "d.npz", "--clause-map", tmp_path / "c.json"]),
                          "only dnf data sets")
    assert not (tmp_path / "d.npz").exists()


# ---------------------------------------------------------------- fpe train


def test_train_records_settings_data_hash_and_metrics(tmp_path, dense):
    tensors = load_file(str(dense))
    assert sorted(tensors) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    net.load_state_dict(tensors)  # plain nn.Sequential names
    meta = load_checkpoint(dense).metadata
    settings = json.loads(meta["fpe.train.settings"])
    assert settings["hidden"] == [8] and settings["epochs"] == 3 and settings["seed"] == 0 and settings["lr"] == 0.01
    assert json.loads(meta["fpe.train.data"])["sha256"] == load_dataset(DNF).sha256()
    assert 0 <= json.loads(meta["fpe.train.metrics"])["test"]["accuracy"] <= 1


def test_train_json_is_one_document_and_stderr_is_quiet(tmp_path):
    res = run_cli(["train", "--data", DNF, "--hidden", "4,4", *FAST, "-o", tmp_path / "m.safetensors", "--json"])
    assert res.exit_code == 0 and res.stderr == ""
    doc = res.json()
    assert doc["widths"] == [12, 4, 4, 2] and doc["counts"]["weights"] == 12 * 4 + 4 * 4 + 4 * 2
    assert set(doc["test"]) >= {"loss", "accuracy"}


def test_same_seed_gives_identical_files(tmp_path):
    for name in ("a", "b"):
        cli_ok("train", "--data", DNF, "--hidden", "8", *FAST, "--seed", "7", "-o", tmp_path / f"{name}.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    cli_ok("train", "--data", DNF, "--hidden", "8", *FAST, "--seed", "8", "-o", tmp_path / "c.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() != (tmp_path / "c.safetensors").read_bytes()
    for name in ("a", "b"):
        cli_ok("finetune", tmp_path / "a.safetensors", "--data", DNF, *FAST, "-o", tmp_path / f"ft_{name}.safetensors")
    assert (tmp_path / "ft_a.safetensors").read_bytes() == (tmp_path / "ft_b.safetensors").read_bytes()


def test_bad_hidden_and_optimizer(tmp_path):
    assert_one_error_line(run_cli(["train", "--data", DNF, "--hidden", "8,x"]), "--hidden")
    assert_one_error_line(run_cli(["train", "--data", DNF, "--hidden", "8", "--optimizer", "lion"]), "optimizer")
    assert not list(Path.cwd().glob("*.safetensors"))


# ---------------------------------------------------------------- fpe finetune


@pytest.mark.parametrize("layout", ["packed", "dense"])
def test_finetune_keeps_layout_and_masks(tmp_path, dense, layout):
    src = tmp_path / f"wide.{layout}.safetensors"
    cli_ok("expand", dense, "--alpha", "2", "--layout", layout, "-o", src, "-q")
    doc = cli_ok("finetune", src, "--data", DNF, *FAST, "--json")
    out = Path(doc["output"])
    assert out == tmp_path / f"wide.{layout}.ft.safetensors" and doc["layout"] == layout
    before, after = load_checkpoint(src), load_checkpoint(out)
    assert after.layout == layout
    for a, b in zip(before.mlp.layers, after.mlp.layers):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.parents if a.parents is not None else torch.zeros(0),
                                                           b.parents if b.parents is not None else torch.zeros(0))
        assert int(((b.weight != 0) & ~b.mask).sum()) == 0
    assert doc["counts"]["weights"] == doc["counts_before"]["weights"]
    assert json.loads(after.metadata["fpe.finetune.settings"])["masks_locked"] is True
    assert after.metadata["fpe.budget"] == before.metadata["fpe.budget"]  # the expansion record is kept
    res = run_cli(["verify", out, "--source", dense])
    assert res.exit_code == 0, res.stdout + res.stderr


def test_finetune_plain_in_plain_out(tmp_path, dense):
    doc = cli_ok("finetune", dense, "--data", DNF, *FAST, "-o", tmp_path / "ft.safetensors", "--json")
    assert doc["layout"] == "plain" and doc["settings"]["masks_locked"] is False
    assert sorted(load_file(str(tmp_path / "ft.safetensors"))) == ["0.bias", "0.weight", "2.bias", "2.weight"]


def test_finetune_resume_after_interruption_is_byte_identical(tmp_path, expanded, monkeypatch):
    cli_ok("finetune", expanded, "--data", DNF, *FAST, "--checkpoint-every", "1", "-o", tmp_path / "full.safetensors")
    real_epoch, calls = train_mod._epoch, []

    def dying_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # what Ctrl-C or SIGTERM does (SIGTERM is mapped to it)
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_epoch", dying_epoch)
    out = tmp_path / "cut.safetensors"
    res = run_cli(["finetune", expanded, "--data", DNF, *FAST, "--checkpoint-every", "1", "-o", out])
    assert res.exit_code == 130 and not out.exists()
    state = tmp_path / "cut.resume.safetensors"
    assert state.exists()
    monkeypatch.setattr(train_mod, "_epoch", real_epoch)
    doc = cli_ok("finetune", expanded, "--data", DNF, *FAST, "--checkpoint-every", "1", "-o", out, "--resume", "--json")
    assert doc["resumed_at_epoch"] == 2
    assert out.read_bytes() == (tmp_path / "full.safetensors").read_bytes()
    assert not state.exists()  # removed once the output is written


def test_resume_without_state_and_existing_output(tmp_path, expanded):
    assert_one_error_line(run_cli(["finetune", expanded, "--data", DNF, "--resume", "-o", tmp_path / "x.safetensors"]),
                          "no resume state")
    assert_one_error_line(run_cli(["finetune", expanded, "--data", DNF, "-o", expanded]), "input file")


def test_revived_weights_exit_3_and_write_nothing(tmp_path, expanded, monkeypatch):
    monkeypatch.setattr(train_mod, "lock_gradients", lambda module: [])
    monkeypatch.setattr(train_mod, "enforce_masks", lambda module: None)
    monkeypatch.setattr(train_mod, "zero_masked_state", lambda optimizer, module: None)
    out = tmp_path / "bad.safetensors"
    res = run_cli(["finetune", expanded, "--data", DNF, *FAST, "-o", out])
    assert_one_error_line(res, "off the mask are not zero", code=3)
    assert not out.exists()


# ---------------------------------------------------------------- fpe evaluate


def test_evaluate_side_by_side(tmp_path, dense, expanded):
    tuned = tmp_path / "tuned.safetensors"
    cli_ok("finetune", expanded, "--data", DNF, *FAST, "-o", tuned)
    doc = cli_ok("evaluate", dense, expanded, tuned, "--data", DNF, "--json")
    rows = doc["models"]
    assert [Path(r["model"]).name for r in rows] == ["dense.safetensors", "dense.fpe2.safetensors", "tuned.safetensors"]
    assert rows[0]["weights"] == rows[1]["weights"] == rows[2]["weights"]  # equal budget
    assert rows[0]["widths"] == [12, 8, 2] and rows[1]["widths"] == [12, 16, 2]
    assert rows[2]["test"]["accuracy"] == json.loads(load_checkpoint(tuned).metadata["fpe.finetune.metrics"])["test"]["accuracy"]
    table = run_cli(["evaluate", dense.name, tuned.name, "--data", DNF])  # cwd is tmp_path
    assert table.exit_code == 0 and "dense.safetensors" in table.stdout and "test acc" in table.stdout


def test_evaluate_multilabel(tmp_path):
    spec = "dnf:vars=12,clauses=3,k=2,train=200,test=100,outputs=clauses"
    cli_ok("train", "--data", spec, "--hidden", "6", *FAST, "-o", tmp_path / "m.safetensors")
    doc = cli_ok("evaluate", tmp_path / "m.safetensors", "--data", spec, "--json")
    test = doc["models"][0]["test"]
    assert test["accuracy"] == test["exact_match"] and len(test["per_label_accuracy"]) == 3
    assert "label acc" in run_cli(["evaluate", tmp_path / "m.safetensors", "--data", spec]).stdout


# ---------------------------------------------------------------- bad data through the CLI


def npz_with(tmp_path, **changes) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.random((10, 12), dtype=np.float32), "y_train": rng.integers(0, 2, 10),
              "x_test": rng.random((5, 12), dtype=np.float32), "y_test": rng.integers(0, 2, 5)}
    arrays.update(changes)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


BAD = {
    "missing": (dict(y_test=None), ["missing array(s) y_test"]),
    "lengths": (dict(y_train=np.zeros(9, np.int64)), ["y_train", "expected 10 labels"]),
    "dtype": (dict(x_train=np.zeros((10, 12), np.int32)), ["x_train", "float"]),
    "nan": (dict(x_test=np.full((5, 12), np.nan, np.float32)), ["x_test", "NaN"]),
    "label range": (dict(y_test=np.array([0, 1, 2, 3, 9])), ["labels go up to 9", "2 outputs"]),
    "width": (dict(x_train=np.zeros((10, 7), np.float32), x_test=np.zeros((5, 7), np.float32)),
              ["x_train has 7 features", "takes 12 inputs"]),
    "pickle": (dict(x_train=np.array([None] * 10, dtype=object)), ["pickled"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("command", ["finetune", "evaluate"])
def test_bad_data_files_exit_2_naming_the_key(tmp_path, dense, case, command):
    changes, needles = BAD[case]
    data = npz_with(tmp_path, **changes)
    res = run_cli([command, dense, "--data", data, "-q" if command == "finetune" else "--json"])
    assert_one_error_line(res, *needles)


def test_broken_npz_exit_2(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really")
    assert_one_error_line(run_cli(["train", "--data", tmp_path / "junk.npz", "--hidden", "4"]), "junk.npz")


def test_help_has_examples():
    for command in ("data", "train", "finetune", "evaluate"):
        res = run_cli([command, "--help"])
        assert res.exit_code == 0 and "Example:" in res.stdout and f"fpe {command}" in res.stdout


# ---------------------------------------------------------------- data parallel: 2 processes under torchrun


def torchrun(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FPE_DEBUG": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fpe_cli", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_two_process_run_matches_single_process(tmp_path, expanded):
    args = ["finetune", expanded, "--data", DNF, "--epochs", "3", "--batch-size", "30", "--lr", "0.01",
            "--checkpoint-every", "1", "--json"]
    cli_ok(*args, "-o", tmp_path / "one.safetensors")
    proc = torchrun([*args, "-o", tmp_path / "two.safetensors"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # exactly one document: only rank 0 prints
    assert doc["world_size"] == 2 and doc["resumed_at_epoch"] == 0
    one, two = load_checkpoint(tmp_path / "one.safetensors"), load_checkpoint(tmp_path / "two.safetensors")
    for a, b in zip(one.mlp.layers, two.mlp.layers):
        assert torch.equal(a.mask, b.mask)
        assert int(((b.weight != 0) & ~b.mask).sum()) == 0  # masks locked on every rank
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.bias, b.bias, rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        "dense.fpe2.safetensors", "dense.safetensors", "one.safetensors", "two.safetensors"]  # no stray states
    assert json.loads(two.metadata["fpe.finetune.settings"])["world_size"] == 2


@pytest.mark.slow
def test_two_process_training_matches_single_process(tmp_path):
    args = ["train", "--data", "dnf:vars=12,clauses=3,k=2,train=300,test=100,outputs=clauses", "--hidden", "8",
            "--epochs", "3", "--batch-size", "33", "--optimizer", "sgd", "--lr", "0.1", "--weight-decay", "0.01"]
    cli_ok(*args, "-o", tmp_path / "one.safetensors")
    proc = torchrun([*args, "-o", tmp_path / "two.safetensors", "-q"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    one, two = load_file(str(tmp_path / "one.safetensors")), load_file(str(tmp_path / "two.safetensors"))
    assert sorted(one) == sorted(two)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)
