"""Data review (QA): `--data` files written the way users' own code writes them, checked against plain
numpy/torch computations from the files. Tests marked xfail(strict=True) demonstrate bugs found in review."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import assert_one_error_line, listing, run_cli


def _ok(args) -> dict:
    res = run_cli([*args, "--json"])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def _xy(n=40, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float16).astype(np.float32)  # exact in float16 too
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 0)  # classes 0, 1, 2
    return x, y


def _save_model(path: Path, widths, seed=0) -> Path:
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(nn.ReLU())
    save_file(nn.Sequential(*mods).state_dict(), str(path))
    return path


def _forward(model: Path, x: np.ndarray) -> torch.Tensor:
    """Plain torch forward of a one-hidden-layer nn.Sequential file (0.weight, 2.weight)."""
    t = load_file(str(model))
    h = torch.from_numpy(np.asarray(x, dtype=np.float32))
    h = torch.relu(h @ t["0.weight"].T + t["0.bias"])
    return h @ t["2.weight"].T + t["2.bias"]


def _oracle(model: Path, arrays: dict, split: str) -> dict:
    logits = _forward(model, arrays[f"x_{split}"])
    y = torch.from_numpy(np.asarray(arrays[f"y_{split}"]).astype(np.int64))
    return {"samples": len(y), "accuracy": float((logits.argmax(1) == y).double().mean()),
            "loss": float(torch.nn.functional.cross_entropy(logits.double(), y))}


@pytest.fixture
def m3(tmp_path):
    return _save_model(tmp_path / "m3.safetensors", [6, 8, 3])


@pytest.fixture
def m10(tmp_path):
    return _save_model(tmp_path / "m10.safetensors", [6, 8, 10], seed=1)


@pytest.fixture
def m1(tmp_path):
    return _save_model(tmp_path / "m1.safetensors", [6, 4, 1], seed=2)


# ---------------------------------------------------------------- correct numbers from user-written files


def _cases():
    x, y = _xy()
    te = slice(0, 10)
    return {
        "savez_compressed": ("m3", "compressed", dict(x_train=x, y_train=y, x_test=x[te], y_test=y[te])),
        "uint64_labels": ("m3", "savez", dict(x_train=x, y_train=y.astype(np.uint64), x_test=x[te], y_test=y[te].astype(np.uint64))),
        "int8_int16_labels": ("m3", "savez", dict(x_train=x, y_train=y.astype(np.int8), x_test=x[te], y_test=y[te].astype(np.int16))),
        "float64_and_longdouble_x": ("m3", "savez", dict(x_train=x.astype(np.float64), y_train=y,
                                                         x_test=x[te].astype(np.longdouble), y_test=y[te])),
        "extra_keys": ("m3", "savez", dict(x_train=x, y_train=y, x_test=x[te], y_test=y[te], x_val=x[:5], y_val=y[:5],
                                           feature_names=np.array(list("abcdef")))),
        "labels_with_gaps_on_a_wide_model": ("m10", "savez", dict(x_train=x, y_train=np.array([0, 3, 7])[y],
                                                                  x_test=x[te], y_test=np.array([0, 3, 7])[y[te]])),
        "test_class_not_in_train": ("m3", "savez", dict(x_train=x[y < 2], y_train=y[y < 2], x_test=x[te], y_test=y[te])),
        "test_with_one_class": ("m3", "savez", dict(x_train=x, y_train=y, x_test=x[y == 0][:5], y_test=y[y == 0][:5])),
        "fewer_classes_than_outputs": ("m10", "savez", dict(x_train=x, y_train=y, x_test=x[te], y_test=y[te])),
        "one_sample": ("m3", "savez", dict(x_train=x[:1], y_train=y[:1], x_test=x[1:2], y_test=y[1:2])),
    }


@pytest.mark.parametrize("case", sorted(_cases()))
def test_evaluate_matches_a_plain_torch_forward_and_counts_match_the_file(tmp_path, m3, m10, case):
    which, writer, arrays = _cases()[case]
    model = {"m3": m3, "m10": m10}[which]
    path = tmp_path / "d.npz"
    (np.savez_compressed if writer == "compressed" else np.savez)(path, **arrays)
    doc = _ok(["evaluate", model, "--data", path])
    labels = np.concatenate([arrays["y_train"], arrays["y_test"]]).astype(np.int64)
    assert doc["data"]["train"] == len(arrays["x_train"]) and doc["data"]["test"] == len(arrays["x_test"])
    assert doc["data"]["inputs"] == 6 and doc["data"]["outputs"] == int(labels.max()) + 1
    assert doc["data"]["multilabel"] is False
    for split in ("train", "test"):
        got, want = doc["models"][0][split], _oracle(model, arrays, split)
        assert got["samples"] == want["samples"]
        assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


def test_boolean_and_integer_label_matrices_read_like_float_ones(tmp_path, m3):
    x, _ = _xy()
    ml = x[:, :3] > 0
    for name, conv in (("f", np.float32), ("b", np.bool_), ("i", np.int8)):
        np.savez(tmp_path / f"{name}.npz", x_train=x, y_train=ml.astype(conv), x_test=x[:10], y_test=ml[:10].astype(conv))
    ref = _ok(["evaluate", m3, "--data", tmp_path / "f.npz"])
    for name in ("b", "i"):
        doc = _ok(["evaluate", m3, "--data", tmp_path / f"{name}.npz"])
        assert doc["data"]["multilabel"] and doc["models"][0]["test"] == ref["models"][0]["test"]
    logits = _forward(m3, x[:10])
    exact = ((logits > 0).numpy() == ml[:10]).all(axis=1).mean()
    assert ref["models"][0]["test"]["accuracy"] == pytest.approx(exact)


def test_bool_class_ids_are_two_classes(tmp_path, m3):
    x, y = _xy()
    yb = y > 0
    np.savez(tmp_path / "d.npz", x_train=x, y_train=yb, x_test=x[:10], y_test=yb[:10])
    doc = _ok(["evaluate", m3, "--data", tmp_path / "d.npz"])
    assert doc["data"]["outputs"] == 2 and not doc["data"]["multilabel"]
    want = _oracle(m3, {"x_test": x[:10], "y_test": yb[:10]}, "test")
    assert doc["models"][0]["test"]["accuracy"] == pytest.approx(want["accuracy"])


def test_a_batch_larger_than_the_data_is_one_full_batch(tmp_path):
    x, y = _xy()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    for bs in (40, 100000):
        _ok(["train", "--data", tmp_path / "d.npz", "--hidden", "4", "--epochs", "2", "--batch-size", bs,
             "-o", tmp_path / f"b{bs}.safetensors"])
    a, b = load_file(str(tmp_path / "b40.safetensors")), load_file(str(tmp_path / "b100000.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_analyze_data_counts_and_class_selectivity_match_numpy(tmp_path, m3):
    x, y = _xy()
    y = np.array([0, 3, 7])[y]  # gaps: classes without samples must not enter the entropy
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:30], y_test=y[:30])
    doc = _ok(["analyze", m3, "--data", tmp_path / "d.npz", "--samples", "25"])
    assert doc["data"] == {"source": str(tmp_path / "d.npz"), "split": "test", "samples": 25, "num_classes": 8,
                           "classes_present": 3, "multilabel": False}
    t = load_file(str(m3))
    h = torch.relu(torch.from_numpy(x[:25]) @ t["0.weight"].T + t["0.bias"]).double().numpy()  # (25, 8)
    means = np.stack([h[y[:25] == c].mean(axis=0) for c in np.unique(y[:25])])  # (classes seen, 8)
    p = np.abs(means) / np.abs(means).sum(axis=0)
    sel = np.exp(-(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(axis=0))
    metrics = doc["models"][0]["layers"][0]["metrics"]
    assert metrics["class_selectivity_mean"] == pytest.approx(np.nanmean(sel), rel=1e-6)
    assert metrics["dead_fraction"] == pytest.approx(float((h > 0).sum(axis=0).__eq__(0).mean()))
    assert metrics["activation_density"] == pytest.approx(float((h > 0).mean()))


def test_expand_drift_on_data_probes_matches_torch(tmp_path, m3):
    x, y = _xy()
    np.savez_compressed(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:12], y_test=y[:12])
    out = tmp_path / "e.safetensors"
    doc = _ok(["expand", m3, "--alpha", "2", "--layout", "dense", "--data", tmp_path / "d.npz", "-o", out])
    drift = doc["drift"]
    assert drift["probe_samples"] == 12 and "first 12 of 12" in drift["probe"]
    e = load_file(str(out))
    xe = torch.from_numpy(x[:12])
    y1 = torch.relu(xe @ e["0.weight"].T + e["0.bias"]) @ e["2.weight"].T + e["2.bias"]
    y0 = _forward(m3, x[:12])
    assert drift["relative_l2"] == pytest.approx(float((y1 - y0).norm() / y0.norm()), rel=1e-5)
    assert drift["argmax_agreement"] == pytest.approx(float((y1.argmax(1) == y0.argmax(1)).double().mean()))


# ---------------------------------------------------------------- refusals: one line, exit 2, nothing written


@pytest.mark.parametrize("cmd", ["evaluate", "finetune", "analyze", "expand", "train"])
def test_wrong_feature_count_and_nan_in_test_only_are_refused_by_every_command(tmp_path, m3, cmd):
    x, y = _xy()
    np.savez(tmp_path / "w5.npz", x_train=x[:, :5], y_train=y, x_test=x[:10, :5], y_test=y[:10])
    xt = x[:10].copy()
    xt[3, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x_train=x, y_train=y, x_test=xt, y_test=y[:10])
    args = {"evaluate": ["evaluate", m3], "finetune": ["finetune", m3, "-o", tmp_path / "o.safetensors"],
            "analyze": ["analyze", m3], "expand": ["expand", m3, "--alpha", "2", "-o", tmp_path / "o.safetensors"],
            "train": ["train", "--hidden", "4", "-o", tmp_path / "o.safetensors"]}[cmd]
    before = listing(tmp_path)
    if cmd != "train":  # train builds the model from the data: any width is right
        assert_one_error_line(run_cli([*args, "--data", tmp_path / "w5.npz"]), "5 features", "6 inputs")
    assert_one_error_line(run_cli([*args, "--data", tmp_path / "nan.npz"]), "x_test", "NaN")
    assert listing(tmp_path) == before


def test_a_directory_and_an_empty_test_split_are_refused(tmp_path, m3):
    (tmp_path / "set.npz").mkdir()
    assert_one_error_line(run_cli(["train", "--data", tmp_path / "set.npz", "--hidden", "4"]), "is a directory")
    x, y = _xy()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:0], y_test=y[:0])
    assert_one_error_line(run_cli(["evaluate", m3, "--data", tmp_path / "d.npz"]), "x_test: no samples")


def test_a_zip_of_something_else_is_named(tmp_path, m3):
    import zipfile

    with zipfile.ZipFile(tmp_path / "d.npz", "w") as z:
        z.writestr("data.csv", "1,2,3\n")
    assert_one_error_line(run_cli(["evaluate", m3, "--data", tmp_path / "d.npz"]), "data.csv", "not a numpy array")


# ---------------------------------------------------------------- bugs


def test_one_output_model_with_all_zero_class_ids_is_not_scored_as_perfect(tmp_path, m1):
    x, _ = _xy()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=np.zeros(40, np.int64), x_test=x[:10], y_test=np.zeros(10, np.int64))
    before = listing(tmp_path)
    assert_one_error_line(run_cli(["evaluate", m1, "--data", tmp_path / "d.npz"]), "1 outputs", "(N, 1)")
    assert_one_error_line(run_cli(["finetune", m1, "--data", tmp_path / "d.npz", "-o", tmp_path / "o.safetensors"]),
                          "1 outputs", "(N, 1)")
    assert listing(tmp_path) == before


def test_analyze_with_a_huge_class_id_stays_small(tmp_path, m3):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1100, 6)).astype(np.float32)
    y = rng.integers(0, 3, 1100)
    y[5] = 999_999
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    res = subprocess.run([sys.executable, "-m", "fpe_cli", "analyze", str(m3), "--data", str(tmp_path / "d.npz"), "--json"],
                         capture_output=True, text=True, preexec_fn=limit, timeout=120,
                         env={**os.environ, "FPE_DEBUG": "0"})
    assert "internal error" not in res.stderr and "Traceback" not in res.stderr
    assert res.returncode == 0, res.stderr  # the labels are renumbered to the 4 classes present
    data = json.loads(res.stdout)["data"]
    assert data["num_classes"] == 1_000_000 and data["classes_present"] == 4


def test_expand_does_not_record_a_data_file_it_never_read(tmp_path, m3):
    out = tmp_path / "e.safetensors"
    res = run_cli(["expand", m3, "--alpha", "2", "--data", tmp_path / "missing.npz", "--probe-samples", "0", "-o", out])
    assert_one_error_line(res, "missing.npz", "would not be read", "--probe-samples 0")
    assert not out.exists()
    x, y = _xy()  # where the data is read (the drift), it is recorded
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    assert run_cli(["expand", m3, "--alpha", "2", "--data", tmp_path / "d.npz", "-o", out, "-q"]).exit_code == 0
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["fpe.inputs"])["data"] == str(tmp_path / "d.npz")


def test_column_shaped_binary_class_ids_get_the_ravel_hint(tmp_path, m3):
    x, y = _xy()
    yc = (y > 0).astype(np.int64).reshape(-1, 1)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=yc, x_test=x[:10], y_test=yc[:10])
    assert_one_error_line(run_cli(["evaluate", m3, "--data", tmp_path / "d.npz"]), "y.ravel()")


def test_positional_savez_gets_the_keyword_form(tmp_path, m3):
    x, y = _xy()
    np.savez(tmp_path / "d.npz", x, y, x[:10], y[:10])
    assert_one_error_line(run_cli(["evaluate", m3, "--data", tmp_path / "d.npz"]), "arr_0", "x_train=")


def test_a_validation_split_gets_a_rename_hint(tmp_path, m3):
    x, y = _xy()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_val=x[:10], y_val=y[:10])
    assert_one_error_line(run_cli(["evaluate", m3, "--data", tmp_path / "d.npz"]), "x_val -> x_test")


def test_num_classes_contradicting_a_label_matrix_is_refused(tmp_path, m3):
    x, _ = _xy()
    ml = (x[:, :3] > 0).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=ml, x_test=x[:10], y_test=ml[:10], num_classes=5)
    assert_one_error_line(run_cli(["evaluate", m3, "--data", tmp_path / "d.npz"]), "num_classes")


def test_extra_files_beside_the_arrays_are_ignored_but_a_non_array_split_is_not(tmp_path, m3):
    """A README or JSON added to the archive is ignored like extra arrays; a required split stored as something
    other than a .npy member, or an archive with no array at all (a torch.save zip), is refused."""
    import zipfile

    x, y = _xy()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    plain = _ok(["evaluate", m3, "--data", tmp_path / "d.npz"])
    with zipfile.ZipFile(tmp_path / "d.npz", "a") as z:
        z.writestr("README.txt", "how these arrays were made")
    assert _ok(["evaluate", m3, "--data", tmp_path / "d.npz"])["models"] == plain["models"]
    np.savez(tmp_path / "e.npz", x_train=x, y_train=y, y_test=y[:10])
    with zipfile.ZipFile(tmp_path / "e.npz", "a") as z:
        z.writestr("x_test", "not an array")
    assert_one_error_line(run_cli(["evaluate", m3, "--data", tmp_path / "e.npz"]), "'x_test' is not a numpy array")
    with zipfile.ZipFile(tmp_path / "t.npz", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02")
    assert_one_error_line(run_cli(["evaluate", m3, "--data", tmp_path / "t.npz"]), "torch.save")


def test_a_binary_column_with_num_classes_2_is_the_one_output_layout(tmp_path, m1):
    """(N, 1) 0/1 labels beside num_classes=2 (two classes, one logit) evaluate as before; num_classes=3 is refused."""
    x, y = _xy()
    col = (y > 0).astype(np.float32).reshape(-1, 1)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=col, x_test=x[:10], y_test=col[:10], num_classes=2)
    doc = _ok(["evaluate", m1, "--data", tmp_path / "d.npz"])
    assert doc["data"]["multilabel"] and doc["data"]["outputs"] == 1
    np.savez(tmp_path / "e.npz", x_train=x, y_train=col, x_test=x[:10], y_test=col[:10], num_classes=3)
    assert_one_error_line(run_cli(["evaluate", m1, "--data", tmp_path / "e.npz"]), "num_classes=3")


def test_analyze_notes_one_hot_labels_like_the_other_commands(tmp_path, m3):
    x, y = _xy()
    onehot = np.eye(3, dtype=np.float32)[y]
    np.savez(tmp_path / "d.npz", x_train=x, y_train=onehot, x_test=x[:10], y_test=onehot[:10])
    res = run_cli(["analyze", m3, "--data", tmp_path / "d.npz", "--json"])
    assert res.exit_code == 0, res.stderr
    assert "one-hot" in res.stderr and "y.argmax(1)" in res.stderr
    json.loads(res.stdout)  # stdout keeps the one document
