"""Data files and checkpoints written the way users' own scripts write them, and the chains they run
(adversarial QA, second round: `--data` contents, plain-torch checkpoints, expand -> finetune -> evaluate
-> verify -> convert -> params)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import assert_one_error_line, listing, run_cli


def _ok(args) -> dict:
    res = run_cli([*args, "--json"])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)  # exactly one JSON document on stdout


def _xy(n=40, d=6, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0) if classes == 3 else (x[:, 0] > 0).astype(np.int64)
    return x, y


def _npz(path, x, y, **extra):
    np.savez(path, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10], **extra)
    return path


@pytest.fixture
def model(model6):
    return model6


# ---------------------------------------------------------------- data files as users save them


@pytest.mark.parametrize("xk, yk", [("X", "y"), ("x", "labels"), ("features", "targets"), ("data", "target")])
def test_unsplit_arrays_get_named_and_a_split_recipe(tmp_path, model, xk, yk):
    x, y = _xy()
    np.savez(tmp_path / "d.npz", **{xk: x, yk: y})
    before = listing(tmp_path)
    for cmd in (["evaluate", model], ["train", "--hidden", "4"], ["finetune", model], ["analyze", model]):
        line = assert_one_error_line(run_cli([*cmd, "--data", tmp_path / "d.npz", "--json"]),
                                     "missing array(s) x_train, y_train, x_test, y_test",
                                     f"found {xk} (40, 6), {yk} (40,)",
                                     f"x_train={xk}[:n]", f"y_test={yk}[n:]")
        assert "found no arrays" not in line
    assert listing(tmp_path) == before


def test_capitalised_keys_get_a_rename_hint(tmp_path, model):
    x, y = _xy()
    np.savez(tmp_path / "d.npz", X_train=x, y_train=y, X_test=x, y_test=y)
    assert_one_error_line(run_cli(["evaluate", model, "--data", tmp_path / "d.npz"]),
                          "missing array(s) x_train, x_test", "rename X_train -> x_train, X_test -> x_test")


def test_a_safetensors_data_file_is_named_as_such(tmp_path, model):
    x, y = _xy()
    np_save_file({"x_train": x, "y_train": y, "x_test": x, "y_test": y}, str(tmp_path / "d.safetensors"))
    assert_one_error_line(run_cli(["evaluate", model, "--data", tmp_path / "d.safetensors"]),
                          "a safetensors file, expected an .npz archive", "safetensors.numpy.load_file")


@pytest.mark.parametrize("header", [True, False])
def test_csv_gets_a_recipe_to_read_it(tmp_path, model, header):
    x, y = _xy()
    np.savetxt(tmp_path / "d.csv", np.c_[x, y], delimiter=",", header="a,b,c,d,e,f,label" if header else "",
               comments="")
    assert_one_error_line(run_cli(["evaluate", model, "--data", tmp_path / "d.csv"]), "text file (CSV?)", "np.loadtxt",
                          "skiprows", "np.savez")


def test_string_class_labels_are_refused_with_a_numbering_recipe(tmp_path, model):
    x, y = _xy()
    names = np.array(["cat", "dog", "eel"])[y]
    np.savez(tmp_path / "d.npz", x_train=x, y_train=names, x_test=x, y_test=names)
    assert_one_error_line(run_cli(["train", "--data", tmp_path / "d.npz", "--hidden", "4"]), "y_train", "<U3",
                          "class names", "np.unique")
    assert not (tmp_path / "d_mlp.safetensors").exists()


def test_labels_starting_at_1_are_named(tmp_path, model):
    x, y = _xy()
    _npz(tmp_path / "d.npz", x, y + 1)
    assert_one_error_line(run_cli(["evaluate", model, "--data", tmp_path / "d.npz"]), "labels go up to 3", "3 outputs",
                          "start at 1", "y - 1")


def test_float_class_labels_are_refused_with_a_cast(tmp_path, model):
    x, y = _xy()
    _npz(tmp_path / "d.npz", x, y.astype(np.float64))
    assert_one_error_line(run_cli(["finetune", model, "--data", tmp_path / "d.npz"]), "y_train", "float64",
                          "y.astype(np.int64)")


def test_num_classes_beyond_the_model_is_not_reported_as_labels(tmp_path, model):
    x, y = _xy()
    _npz(tmp_path / "d.npz", x, y, num_classes=10)
    line = assert_one_error_line(run_cli(["evaluate", model, "--data", tmp_path / "d.npz"]), "num_classes is 10",
                                 "3 outputs", "labels go up to 2", "num_classes=3")
    assert "up to 9" not in line  # the labels never went that high


def test_one_output_model_with_class_ids_gets_the_binary_format(tmp_path):
    torch.manual_seed(0)
    save_file(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1)).state_dict(), str(tmp_path / "b.safetensors"))
    x, y = _xy(classes=2)
    _npz(tmp_path / "d.npz", x, y)
    assert_one_error_line(run_cli(["evaluate", tmp_path / "b.safetensors", "--data", tmp_path / "d.npz"]),
                          "holds class ids (N,)", "1 outputs", "(N, 1) 0/1 matrix")
    _npz(tmp_path / "d1.npz", x, y.reshape(-1, 1).astype(np.float32))  # the suggested format works
    doc = _ok(["evaluate", tmp_path / "b.safetensors", "--data", tmp_path / "d1.npz"])
    assert doc["data"]["multilabel"] and doc["models"][0]["test"]["samples"] == 10


def test_zero_features_are_bad_input_not_an_internal_error(tmp_path, model):
    x, y = _xy()
    _npz(tmp_path / "d.npz", np.zeros((40, 0), np.float32), y)
    assert_one_error_line(run_cli(["evaluate", model, "--data", tmp_path / "d.npz"]), "x_train: no features", "(40, 0)")


def test_scalar_labels_are_one_problem(tmp_path, model):
    x, y = _xy()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.int64(1), x_test=x, y_test=y)
    line = assert_one_error_line(run_cli(["evaluate", model, "--data", tmp_path / "d.npz"]), "y_train",
                                 "found shape ()")
    assert line.count("y_train") == 1


def test_an_object_array_is_named(tmp_path, model):
    x, y = _xy()
    _npz(tmp_path / "d.npz", x, y, class_names=np.array(["a", "b", None], dtype=object))
    assert_one_error_line(run_cli(["evaluate", model, "--data", tmp_path / "d.npz"]), "d.npz: class_names",
                          "object (pickled) array")
    _npz(tmp_path / "s.npz", x, y, class_names=np.array(["a", "b", "c"]))  # a string array beside them is fine
    assert _ok(["evaluate", model, "--data", tmp_path / "s.npz"])["data"]["train"] == 40


def test_a_single_class_cannot_train_a_classifier(tmp_path, model):
    x, _ = _xy()
    _npz(tmp_path / "d.npz", x, np.zeros(40, np.int64))
    before = listing(tmp_path)
    assert_one_error_line(run_cli(["train", "--data", tmp_path / "d.npz", "--hidden", "4", "--json"]),
                          "every label is 0", "at least two classes")
    assert listing(tmp_path) == before
    assert _ok(["evaluate", model, "--data", tmp_path / "d.npz"])["models"][0]["test"]["accuracy"] >= 0  # a subset
    _npz(tmp_path / "d2.npz", x, np.zeros(40, np.int64), num_classes=2)  # a class missing from this sample
    assert _ok(["train", "--data", tmp_path / "d2.npz", "--hidden", "4", "--epochs", "1",
                "-o", tmp_path / "t.safetensors"])


def test_one_hot_labels_are_read_as_multilabel_and_say_so(tmp_path, model):
    x, y = _xy()
    _npz(tmp_path / "d.npz", x, np.eye(3, dtype=np.float32)[y])
    res = run_cli(["evaluate", model, "--data", tmp_path / "d.npz"])
    assert res.exit_code == 0 and "one-hot" in res.stderr and "y.argmax(1)" in res.stderr
    doc = _ok(["evaluate", model, "--data", tmp_path / "d.npz"])
    assert doc["data"]["multilabel"] and any("one-hot" in n for n in doc["notes"])
    _npz(tmp_path / "m.npz", x, (x[:, :3] > 0).astype(np.float32))  # genuinely multi-label: no note
    assert "notes" not in _ok(["evaluate", model, "--data", tmp_path / "m.npz"])
    torch.manual_seed(0)
    save_file(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1)).state_dict(), str(tmp_path / "b.safetensors"))
    _npz(tmp_path / "b.npz", x, np.ones((40, 1), np.float32))  # one binary label, all positive: not one-hot
    assert "notes" not in _ok(["evaluate", tmp_path / "b.safetensors", "--data", tmp_path / "b.npz"])


@pytest.mark.parametrize("writer", [
    lambda x, y: dict(x_train=x.astype(np.float16), y_train=y, x_test=x[:10].astype(np.float16), y_test=y[:10]),
    lambda x, y: dict(x_train=x.astype(">f4"), y_train=y.astype(">i8"), x_test=x[:10], y_test=y[:10].astype(np.uint8)),
    lambda x, y: dict(x_train=np.asfortranarray(x), y_train=y.astype(np.int32), x_test=x[::4], y_test=y[::4]),
])
def test_other_float_and_int_dtypes_give_the_same_numbers(tmp_path, model, writer):
    x, y = _xy()
    x = x.astype(np.float16).astype(np.float32)  # exactly representable in every variant
    _npz(tmp_path / "ref.npz", x, y)
    np.savez(tmp_path / "d.npz", **writer(x, y))
    got = _ok(["evaluate", model, "--data", tmp_path / "d.npz"])["models"][0]
    ref = _ok(["evaluate", model, "--data", tmp_path / "ref.npz"])["models"][0]
    assert got["train"] == ref["train"]


# ---------------------------------------------------------------- checkpoints from plain torch code


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def test_tensors_outside_the_chain_are_named_by_evaluate_and_finetune(tmp_path):
    torch.manual_seed(0)
    net = WithBatchNorm()
    net(torch.randn(16, 6))  # num_batches_tracked, running stats
    save_file(net.state_dict(), str(tmp_path / "bn.safetensors"))
    x, y = _xy()
    _npz(tmp_path / "d.npz", x, y)
    # the norm sits inside the chain (width 8 = fc1's outputs): refused unless the linear layers are named
    for command in (["evaluate"], ["finetune", "--epochs", "1"], ["expand", "--alpha", "2"]):
        res = run_cli([command[0], tmp_path / "bn.safetensors", *command[1:], "--data", tmp_path / "d.npz"])
        assert_one_error_line(res, "normalization layer", "bn.running_mean", "width 8", "fc1.weight",
                              "--layers fc1.weight,fc2.weight")
    named = ["--layers", "fc1.weight,fc2.weight"]
    res = run_cli(["evaluate", tmp_path / "bn.safetensors", "--data", tmp_path / "d.npz", *named])
    assert res.exit_code == 0 and "not part of the MLP chain, so not applied" in res.stderr
    assert "bn.running_mean" in res.stderr
    out = tmp_path / "ft.safetensors"
    doc = _ok(["finetune", tmp_path / "bn.safetensors", "--data", tmp_path / "d.npz", "--epochs", "1", "-o", out,
               *named])
    assert "bn.num_batches_tracked" in doc["dropped_tensors"] and any("not written" in n for n in doc["notes"])
    assert not any(k.startswith("bn.") for k in load_file(str(out)))
    plain = tmp_path / "plain.safetensors"
    save_file(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).state_dict(), str(plain))
    doc = _ok(["finetune", plain, "--data", tmp_path / "d.npz", "--epochs", "1", "-o", tmp_path / "p.safetensors"])
    assert doc["dropped_tensors"] == [] and "notes" not in doc


def _sequential(kind: str) -> tuple[dict, list[str]]:
    """A state dict as plain torch code saves it, and the extra flags fpe needs for it."""
    torch.manual_seed(1)
    act = {"gelu": nn.GELU(), "tanh": nn.Tanh(), "silu": nn.SiLU()}.get(kind, nn.ReLU())
    bias = kind != "nobias"
    net = nn.Sequential(nn.Linear(6, 8, bias=bias), act, nn.Dropout(0.1), nn.Linear(8, 8, bias=bias), act,
                        nn.Linear(8, 3, bias=bias))
    if kind == "half":
        net = net.half()
    if kind == "bf16":
        net = net.to(torch.bfloat16)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    if kind == "ddp":
        state = {f"module._orig_mod.{k}": v for k, v in state.items()}
    return state, (["--activation", kind] if kind in ("gelu", "tanh", "silu") else [])


@pytest.mark.parametrize("kind", ["half", "bf16", "nobias", "ddp", "gelu", "tanh"])
def test_expand_finetune_evaluate_verify_convert_params_chain(tmp_path, kind):
    state, flags = _sequential(kind)
    root = tmp_path / "my runs"
    (root / "in put").mkdir(parents=True)
    src = root / "in put" / "model.safetensors"
    save_file(state, str(src), metadata={"format": "pt"})
    x, y = _xy(60)
    data = _npz(root / "my data.npz", x, y)
    out = root / "out dir"
    out.mkdir()
    exp = _ok(["expand", src, "--alpha", "2", "--data", data, "-o", out / "e.safetensors", *flags])
    assert exp["budget_holds"]
    ft = _ok(["finetune", out / "e.safetensors", "--data", data, "--epochs", "2", "-o", out / "ft.safetensors", *flags])
    assert ft["counts"]["weights"] == ft["counts_before"]["weights"]
    ev = _ok(["evaluate", src, out / "ft.safetensors", "--data", data, *flags])
    dense, wide = ev["models"]
    assert wide["weights"] == dense["weights"] and wide["widths"] == [6, 16, 16, 3]
    assert _ok(["verify", out / "ft.safetensors", "--source", src, *flags])["ok"]
    _ok(["convert", out / "ft.safetensors", "--layout", "dense", "-o", out / "d.safetensors"])
    params = _ok(["params", out / "d.safetensors"])
    assert params["total"]["weights"] == dense["weights"] and params["budget_holds"]
    inspect = _ok(["inspect", out / "d.safetensors"])
    want_dtype = {"half": "float16", "bf16": "bfloat16"}.get(kind, "float32")
    assert {c["dtype"] for c in inspect["chain"]} == {want_dtype}
    assert inspect["activation"] == (flags[1] if flags else "relu")  # recorded: later commands need no flag
    assert not [p for p in listing(tmp_path) if "resume" in p or p.endswith(".tmp")]


def test_rerun_without_force_keeps_the_output_and_force_replaces_it(tmp_path, model):
    x, y = _xy()
    data = _npz(tmp_path / "d.npz", x, y)
    _ok(["expand", model, "--alpha", "2"])
    wide = tmp_path / "m.fpe2.safetensors"
    _ok(["finetune", wide, "--data", data, "--epochs", "1"])
    out = tmp_path / "m.fpe2.ft.safetensors"
    first = out.read_bytes()
    assert_one_error_line(run_cli(["finetune", wide, "--data", data, "--epochs", "3", "--json"]), "output exists",
                          "--force")
    assert out.read_bytes() == first
    _ok(["finetune", wide, "--data", data, "--epochs", "3", "--force"])
    assert out.read_bytes() != first


def test_force_without_checkpoints_removes_a_stale_resume_state(tmp_path, model):
    x, y = _xy()
    data = _npz(tmp_path / "d.npz", x, y)
    out, state = tmp_path / "o.safetensors", tmp_path / "o.resume.safetensors"
    state.write_bytes(b"left by an interrupted run")
    args = ["finetune", model, "--data", data, "--epochs", "1", "-o", out, "--checkpoint-every", "0"]
    assert_one_error_line(run_cli(args), "a resume state of an earlier run exists", "--force")
    _ok([*args, "--force"])
    assert out.exists() and not state.exists()  # it would block or be resumed by the next run


def test_a_torch_save_file_named_npz_is_refused_unread(tmp_path, model):
    torch.save({"x_train": torch.zeros(4, 6)}, tmp_path / "d.npz")  # a zip archive too, but of pickles
    assert_one_error_line(run_cli(["evaluate", model, "--data", tmp_path / "d.npz"]), "is not a numpy array",
                          "torch.save", "np.savez")


def test_an_ema_copy_beside_the_model_gets_one_layers_suggestion_per_copy(tmp_path):
    torch.manual_seed(0)
    state = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).state_dict()
    save_file({**{k: v.clone() for k, v in state.items()}, **{f"ema.{k}": v.clone() + 1 for k, v in state.items()}},
              str(tmp_path / "m.safetensors"))
    assert_one_error_line(run_cli(["expand", tmp_path / "m.safetensors", "--alpha", "2"]), "do not chain",
                          "2 copies of an MLP", "--layers 0.weight,2.weight or --layers ema.0.weight,ema.2.weight")
    doc = _ok(["inspect", tmp_path / "m.safetensors", "--layers", "ema.0.weight,ema.2.weight"])
    assert [c["weight"] for c in doc["chain"]] == ["ema.0.weight", "ema.2.weight"]


def test_empty_data_name_and_samples_without_data_are_refused(tmp_path, model):
    for cmd in (["evaluate", model], ["finetune", model], ["train", "--hidden", "4"], ["analyze", model]):
        assert_one_error_line(run_cli([*cmd, "--data", ""]), "the data set name is empty")
    assert_one_error_line(run_cli(["analyze", model, "--samples", "5", "--json"]), "--samples", "no --data")


def test_train_default_output_from_a_data_path_with_a_colon(tmp_path):
    x, y = _xy()
    (tmp_path / "run:1").mkdir()
    data = _npz(tmp_path / "run:1" / "set.npz", x, y)
    doc = _ok(["train", "--data", data, "--hidden", "4", "--epochs", "1"])
    assert doc["output"] == "set_mlp.safetensors" and (tmp_path / "set_mlp.safetensors").exists()


def test_uint8_images_get_a_cast_and_scale_and_3d_images_a_flatten(tmp_path, model):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(40, 2, 3), dtype=np.uint8)
    _, y = _xy()
    _npz(tmp_path / "u8.npz", img.reshape(40, -1), y)
    assert_one_error_line(run_cli(["finetune", model, "--data", tmp_path / "u8.npz"]), "found uint8",
                          "x.astype(np.float32) / 255")
    _npz(tmp_path / "3d.npz", img.astype(np.float32) / 255, y)
    assert_one_error_line(run_cli(["expand", model, "--alpha", "2", "--data", tmp_path / "3d.npz"]),
                          "x_train: expected a 2-D array (N, d), found shape (40, 2, 3)", "x.reshape(len(x), -1)")
    assert not (tmp_path / "m.fpe2.safetensors").exists()
