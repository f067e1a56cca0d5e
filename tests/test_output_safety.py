"""Outputs never overwrite inputs: data files, models through their resume state, CSV reports."""

import json

from safetensors.torch import load_file, save_file

from conftest import assert_one_error_line, make_sequential, run_cli, save_module


def _setup(tmp_path):
    model = save_module(make_sequential([64, 8, 10]), tmp_path / "m.safetensors")
    assert run_cli(["data", "digits", "-o", tmp_path / "d.npz", "-q"]).exit_code == 0
    return model, tmp_path / "d.npz"


def _snapshot(tmp_path):
    return {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}


def test_finetune_and_train_refuse_to_overwrite_the_data(tmp_path):
    model, data = _setup(tmp_path)
    before = _snapshot(tmp_path)
    res = run_cli(["finetune", model, "--data", data, "-o", data, "--force", "--epochs", "1"])
    assert_one_error_line(res, "output path is the input")
    res = run_cli(["train", "--data", data, "--hidden", "4", "-o", data, "--force", "--epochs", "1"])
    assert_one_error_line(res, "output path is the input")
    assert _snapshot(tmp_path) == before


def test_resume_state_path_may_not_be_an_input(tmp_path):
    model, data = _setup(tmp_path)
    src = tmp_path / "x.resume.safetensors"
    src.write_bytes(model.read_bytes())
    before = _snapshot(tmp_path)
    res = run_cli(["finetune", src, "--data", data, "-o", tmp_path / "x.safetensors", "--force", "--epochs", "1",
                   "--checkpoint-every", "1"])
    assert_one_error_line(res, "resume state", "would overwrite an input")
    assert _snapshot(tmp_path) == before


def test_stale_resume_state_needs_resume_or_force(tmp_path):
    model, data = _setup(tmp_path)
    (tmp_path / "out.resume.safetensors").write_bytes(b"anything the user put there")
    before = _snapshot(tmp_path)
    res = run_cli(["finetune", model, "--data", data, "-o", tmp_path / "out.safetensors", "--epochs", "1"])
    assert_one_error_line(res, "resume state of an earlier run exists")
    assert _snapshot(tmp_path) == before


def test_damaged_resume_state_is_exit_2(tmp_path):
    model, data = _setup(tmp_path)
    out = tmp_path / "out.safetensors"
    state = tmp_path / "out.resume.safetensors"
    good = tmp_path / "good.resume.safetensors"  # a real state, then damaged in three ways
    _write_state(good, model, data, tmp_path)
    tensors = load_file(str(good))
    from safetensors import safe_open
    with safe_open(str(good), "pt") as fh:
        meta = fh.metadata()
    info = json.loads(meta["fpe.resume"])
    for damage in ("epoch", "shape", "missing"):
        t, m = dict(tensors), dict(meta)
        if damage == "epoch":
            m["fpe.resume"] = json.dumps({**info, "epoch": -5})
        elif damage == "shape":
            key = next(k for k in t if k.startswith("model.") and t[k].ndim == 2)
            t[key] = t[key].flatten()
        else:
            t.pop(next(k for k in t if k.startswith("model.")))
        save_file(t, str(state), metadata=m)
        res = run_cli(["finetune", model, "--data", data, "-o", out, "--force", "--epochs", "3", "--checkpoint-every",
                       "1", "--resume"])
        assert_one_error_line(res, "resume state")


def _write_state(path, model, data, tmp_path):
    """A real resume state: the one an interrupted 3-epoch run leaves after epoch 1."""
    from fpe_cli.checkpoint import load_checkpoint
    from fpe_cli.data import load_dataset
    from fpe_cli.resume import fingerprint, save_state
    from fpe_cli.train import TrainConfig, build_module, make_optimizer
    import torch

    mlp = load_checkpoint(model).mlp
    ds = load_dataset(str(data))
    cfg = TrainConfig(epochs=3, seed=0)
    module = build_module(mlp)
    save_state(path, module, make_optimizer(module, cfg), torch.Generator().manual_seed(0), 1,
               fingerprint(mlp, cfg, ds.sha256()))


def test_analyze_csv_may_not_overwrite_the_model(tmp_path):
    model, _ = _setup(tmp_path)
    before = _snapshot(tmp_path)
    res = run_cli(["analyze", model, "--csv", model, "--force"])
    assert_one_error_line(res, "output path is the input")
    assert _snapshot(tmp_path) == before
