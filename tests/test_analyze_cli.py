"""`fpe analyze` end to end on real files: tables, --json, --csv, --plots, --data, dense vs. expanded."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import assert_one_error_line, listing, run_cli, save_mlp, save_tensors
from test_analysis import dnf_like_mlp

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def analyze_ok(*args) -> object:
    res = run_cli(["analyze", *args])
    assert res.exit_code == 0, res.stderr
    return res


@pytest.fixture
def pair(tmp_path, mlp_file):
    """A dense 12 -> 8 -> 3 model and its alpha-2 expansion (dense layout, explicit masks and lineage)."""
    res = run_cli(["expand", mlp_file, "--alpha", "2", "--seed", "3", "--layout", "dense", "-o", tmp_path / "x.safetensors"])
    assert res.exit_code == 0, res.stderr
    return mlp_file, tmp_path / "x.safetensors"


def npz_data(tmp_path: Path, d: int, classes: int = 3, n: int = 60) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "probe.npz"
    np.savez(path, x_train=rng.normal(size=(n, d)).astype(np.float32), y_train=rng.integers(0, classes, n),
             x_test=rng.normal(size=(n, d)).astype(np.float32), y_test=rng.integers(0, classes, n))
    return path


def test_help_has_an_example():
    res = run_cli(["analyze", "--help"])
    assert res.exit_code == 0 and "Example:" in res.stdout and "fpe analyze" in res.stdout


def test_single_model_json_document(mlp_file):
    res = analyze_ok(mlp_file, "--json", "--top", "3")
    assert res.stderr == ""  # no progress bar or notes off a terminal
    doc = res.json()
    assert doc["schema"] == "fpe.analyze/1" and doc["comparison"] is None and doc["data"] is None
    (model,) = doc["models"]
    assert model["role"] == "model" and model["widths"] == [12, 8, 3] and not model["expanded"]
    (layer,) = model["layers"]  # only hidden layers: the output layer's rows are not hidden neurons
    assert (layer["layer"], layer["neurons"], layer["features"], layer["alpha"]) == ("0.weight", 8, 12, None)
    m = layer["metrics"]
    assert 0 < m["capacity_mean"] <= 1 and m["capacity_sum"] <= 8 + 1e-9 and m["pairs"] == 28
    assert m["cosine_mean_abs_non_sibling"] == m["cosine_mean_abs"] and m["cosine_mean_abs_sibling"] is None
    assert "dead_fraction" not in m  # data metrics only with --data
    polys = [r["polysemanticity"] for r in layer["top_neurons"]]
    assert len(polys) == 3 and polys == sorted(polys, reverse=True) and all(1 <= p <= 12 for p in polys)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision_checkpoints(tmp_path, dtype):
    src = save_mlp(tmp_path / "m.safetensors", [12, 8, 3], dtype=dtype)
    ref = save_mlp(tmp_path / "ref.safetensors", [12, 8, 3])  # the same seed in float32
    got, want = (analyze_ok(p, "--json").json()["models"][0]["layers"][0]["metrics"] for p in (src, ref))
    assert got["capacity_mean"] == pytest.approx(want["capacity_mean"], rel=2e-2)
    assert got["cosine_mean_abs"] == pytest.approx(want["cosine_mean_abs"], rel=2e-2)


def test_nan_is_written_as_null(tmp_path):
    w = torch.randn(4, 5)
    w[:, 2] = 0  # a feature no neuron reads: capacity undefined
    w[3] = 0  # a neuron with no weights: polysemanticity undefined
    src = save_tensors(tmp_path / "z.safetensors", {"fc1.weight": w, "fc2.weight": torch.randn(2, 4)})
    res = analyze_ok(src, "--json", "--top", "4")
    assert "NaN" not in res.stdout
    layer = res.json()["models"][0]["layers"][0]
    assert layer["metrics"]["features_zero"] == 1 and layer["metrics"]["zero_rows"] == 1
    assert layer["top_neurons"][-1] == {"neuron": 3, "parent": None, "polysemanticity": None, "norm": 0.0,
                                        "class_selectivity": None, "density": None}


def test_dense_vs_expanded_fold_changes(pair):
    dense, expanded = pair
    doc = analyze_ok(dense, expanded, "--json", "--top", "2").json()
    d, x = doc["models"]
    assert (d["role"], x["role"], x["expanded"]) == ("dense", "expanded", True)
    xl = x["layers"][0]
    assert (xl["neurons"], xl["alpha"]) == (16, 2) and xl["metrics"]["cosine_mean_abs_sibling"] == 0.0
    (cmp,) = doc["comparison"]
    fc = cmp["fold_change"]
    assert fc["capacity_mean"] == pytest.approx(xl["metrics"]["capacity_mean"] / d["layers"][0]["metrics"]["capacity_mean"])
    assert fc["cosine_mean_abs_non_sibling"] == pytest.approx(
        xl["metrics"]["cosine_mean_abs_non_sibling"] / d["layers"][0]["metrics"]["cosine_mean_abs"])
    assert fc["dead_fraction"] is None  # no data: undefined, written as null
    top = cmp["top_parents"]
    assert [r["parent"] for r in top] == [r["neuron"] for r in d["layers"][0]["top_neurons"]]
    assert all(r["children"] == [2 * r["parent"], 2 * r["parent"] + 1] for r in top)
    assert all(r["polysemanticity_fold_change"] < 1 for r in top)  # each child reads part of its parent's inputs


def test_tables_on_stdout(pair):
    res = analyze_ok(*pair)
    for needle in ("fpe analyze", "capacity mean", "|cos| non-sib", "most polysemantic neurons",
                   "dense vs. expanded: 0.weight (8 -> 16 neurons)", "fold change", "most polysemantic parents"):
        assert needle in res.stdout, needle
    assert "nan" not in res.stdout.lower()


def test_data_metrics_and_csv(tmp_path, pair):
    data = npz_data(tmp_path, 12)
    doc = analyze_ok(*pair, "--data", data, "--json", "--csv", tmp_path / "n.csv").json()
    assert doc["data"] == {"source": str(data), "split": "test", "samples": 60, "num_classes": 3, "classes_present": 3,
                           "multilabel": False}
    for model in doc["models"]:
        m = model["layers"][0]["metrics"]
        assert 0 <= m["dead_fraction"] <= 1 and 0 <= m["activation_density"] <= 1 and m["samples"] == 60
        assert 1 <= m["class_selectivity_mean"] <= 3
    assert "class_selectivity_fold_change" in doc["comparison"][0]["top_parents"][0]
    rows = list(csv.DictReader((tmp_path / "n.csv").open()))
    assert len(rows) == 8 + 16 and rows[0].keys() == {"model", "role", "layer", "neuron", "parent", "polysemanticity",
                                                       "norm", "class_selectivity", "density"}
    assert [r["parent"] for r in rows if r["role"] == "expanded"][:4] == ["0", "0", "1", "1"]
    assert all(r["density"] != "" for r in rows)


def test_samples_limits_the_probe(tmp_path, mlp_file):
    doc = analyze_ok(mlp_file, "--data", npz_data(tmp_path, 12), "--samples", "7", "--json").json()
    assert doc["data"]["samples"] == 7 and doc["models"][0]["layers"][0]["metrics"]["samples"] == 7


def test_csv_is_never_overwritten_silently(tmp_path, mlp_file):
    out = tmp_path / "n.csv"
    out.write_text("keep me")
    assert_one_error_line(run_cli(["analyze", mlp_file, "--csv", out]), "n.csv", "--force")
    assert out.read_text() == "keep me"
    analyze_ok(mlp_file, "--csv", out, "--force", "-q")
    assert out.read_text().startswith("model,role,layer,neuron")


def test_plots_are_written(tmp_path, pair):
    pytest.importorskip("matplotlib")
    res = analyze_ok(*pair, "--plots", tmp_path / "plots")
    assert listing(tmp_path / "plots") == ["capacity.png", "gram.png", "weights.png"]
    for name in ("capacity.png", "gram.png", "weights.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    assert "wrote" in res.stderr and "gram.png" in res.stderr
    again = run_cli(["analyze", *pair, "--plots", tmp_path / "plots"])
    assert_one_error_line(again, "gram.png", "--force")


def test_plots_without_matplotlib_say_how_to_install(tmp_path, mlp_file, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    res = run_cli(["analyze", mlp_file, "--plots", tmp_path / "plots"])
    assert_one_error_line(res, "matplotlib", "pip install 'fpe[plots]'")
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize("case", ["missing", "unrelated", "width", "plots_file"])
def test_bad_input_is_one_error_line(tmp_path, mlp_file, case):
    if case == "missing":
        args, needles = [tmp_path / "nope.safetensors"], ["nope.safetensors"]
    elif case == "unrelated":
        other = save_mlp(tmp_path / "other.safetensors", [12, 5, 3])
        args, needles = [mlp_file, other], ["no lineage", "fpe expand"]
    elif case == "width":
        args, needles = [mlp_file, "--data", npz_data(tmp_path, 7)], ["7 features", "12 inputs"]
    else:
        (tmp_path / "p").write_text("")
        args, needles = [mlp_file, "--plots", tmp_path / "p"], ["needs a directory"]
    assert_one_error_line(run_cli(["analyze", *args]), *needles)


# ---------------------------------------------------------------- the Boolean DNF direction (must show)


def _dnf_direction(dense: Path, clauses: Path, tmp_path: Path) -> dict:
    out = tmp_path / "dnf.clause.safetensors"
    res = run_cli(["expand", dense, "--alpha", "2", "--split", "clause", "--clause-map", clauses, "-o", out])
    assert res.exit_code == 0, res.stderr
    doc = analyze_ok(dense, out, "--json").json()
    d, x = doc["models"][0]["layers"][0]["metrics"], doc["models"][1]["layers"][0]["metrics"]
    assert x["capacity_mean"] > d["capacity_mean"], (x["capacity_mean"], d["capacity_mean"])
    assert x["cosine_mean_abs_non_sibling"] < d["cosine_mean_abs"], (x["cosine_mean_abs_non_sibling"], d["cosine_mean_abs"])
    fc = doc["comparison"][0]["fold_change"]
    assert fc["capacity_mean"] > 1 and fc["cosine_mean_abs_non_sibling"] < 1
    return fc


def test_dnf_like_clause_split_direction(tmp_path):
    """Constructed DNF-like model (see test_analysis.dnf_like_mlp) through the real CLI path."""
    mlp, groups = dnf_like_mlp(seed=4)
    src = save_tensors(tmp_path / "dnf.safetensors", {"fc1.weight": mlp.layers[0].weight, "fc1.bias": mlp.layers[0].bias,
                                                      "fc2.weight": mlp.layers[1].weight})
    (tmp_path / "clauses.json").write_text(json.dumps({"groups": [torch.nonzero(groups == c).flatten().tolist()
                                                                  for c in range(int(groups.max()) + 1)]}))
    _dnf_direction(src, tmp_path / "clauses.json", tmp_path)


def test_dnf_sample_clause_split_raises_capacity_and_lowers_non_sibling_cosine(tmp_path):
    fc = _dnf_direction(SAMPLES / "dnf_mlp.safetensors", SAMPLES / "dnf_clauses.json", tmp_path)
    assert not math.isnan(fc["capacity_mean"])
