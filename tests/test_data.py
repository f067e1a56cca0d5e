"""The data contract: .npz validation, the digits split, the Boolean DNF generator, writers."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fpe_cli.dnf import make_dnf
from fpe_cli.data import (Dataset, check_input_width, check_output_width, load_dataset, write_clause_map,
                          write_dataset_npz)
from fpe_cli.errors import FPEError
from fpe_cli.recipe import load_clause_map


def good_arrays(n=6, m=4, d=3, classes=3, multilabel=False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    y = (lambda k: rng.integers(0, 2, (k, classes)).astype(np.float32)) if multilabel else (
        lambda k: rng.integers(0, classes, k).astype(np.int64))
    return {"x_train": rng.random((n, d), dtype=np.float32), "y_train": y(n),
            "x_test": rng.random((m, d), dtype=np.float32), "y_test": y(m)}


def save_npz(path: Path, arrays: dict) -> Path:
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------- .npz round trips and validation


@given(n=st.integers(1, 20), m=st.integers(1, 20), d=st.integers(1, 8), classes=st.integers(1, 6),
       multilabel=st.booleans())
def test_npz_round_trip_keeps_content_and_hash(tmp_path, n, m, d, classes, multilabel):
    arrays = good_arrays(n, m, d, classes, multilabel)
    src = load_dataset(save_npz(tmp_path / "in.npz", arrays))
    out = tmp_path / "out.npz"
    write_dataset_npz(src, out, force=True)
    again = load_dataset(out)
    assert again.sha256() == src.sha256()
    assert again.multilabel == multilabel and again.num_classes == src.num_classes
    for key in ("x_train", "y_train", "x_test", "y_test"):
        assert np.array_equal(getattr(again, key).numpy(), arrays[key].astype(getattr(again, key).numpy().dtype))


def test_sha256_depends_on_content_only():
    a = load_dataset("dnf:vars=6,clauses=2,k=2,train=20,test=10")
    b = load_dataset("dnf:vars=6,clauses=2,k=2,train=20,test=10")
    assert a.sha256() == b.sha256()
    b.name = "renamed"
    assert a.sha256() == b.sha256()
    b.x_train[0, 0] = 0.5
    assert a.sha256() != b.sha256()


BAD_CASES = {
    "missing key": (lambda a: a.pop("y_test"), ["y_test", "missing"]),
    "mismatched lengths": (lambda a: a.update(y_train=a["y_train"][:-1]), ["y_train", "6 labels", "(5,)"]),
    "integer inputs": (lambda a: a.update(x_train=np.ones((6, 3), np.int64)), ["x_train", "float", "int64"]),
    "float labels": (lambda a: a.update(y_train=np.zeros(6, np.float32)), ["y_train", "integer class labels (N,)"]),
    "NaN inputs": (lambda a: a["x_test"].__setitem__((0, 0), np.nan), ["x_test", "NaN"]),
    "Inf inputs": (lambda a: a["x_train"].__setitem__((1, 2), np.inf), ["x_train", "Inf"]),
    "negative label": (lambda a: a["y_test"].__setitem__(0, -1), ["y_test", "-1", "out of range"]),
    "3-D inputs": (lambda a: a.update(x_train=np.zeros((6, 3, 2), np.float32)), ["x_train", "2-D", "(6, 3, 2)"]),
    "test width": (lambda a: a.update(x_test=np.zeros((4, 5), np.float32)), ["x_test", "3 features", "(4, 5)"]),
    "empty train": (lambda a: a.update(x_train=np.zeros((0, 3), np.float32), y_train=np.zeros(0, np.int64)),
                    ["x_train", "no samples"]),
    "label kinds differ": (lambda a: a.update(y_test=np.zeros((4, 3), np.float32)), ["y_test", "same kind"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_npz_names_the_key(tmp_path, case):
    arrays = good_arrays()
    edit, needles = BAD_CASES[case]
    edit(arrays)
    with pytest.raises(FPEError) as err:
        load_dataset(save_npz(tmp_path / "bad.npz", arrays))
    assert err.value.exit_code == 2
    for needle in needles:
        assert needle in str(err.value)


def test_multilabel_values_must_be_binary_and_finite(tmp_path):
    arrays = good_arrays(multilabel=True)
    arrays["y_train"][0, 0] = 0.5
    with pytest.raises(FPEError, match="y_train: multi-label targets must be 0 or 1"):
        load_dataset(save_npz(tmp_path / "a.npz", arrays))
    arrays["y_train"][0, 0] = np.nan
    with pytest.raises(FPEError, match="y_train: NaN or Inf labels"):
        load_dataset(save_npz(tmp_path / "b.npz", arrays))


def test_label_beyond_num_classes(tmp_path):
    arrays = good_arrays(classes=3)
    arrays["num_classes"] = np.array(2)
    arrays["y_train"][:] = 2
    with pytest.raises(FPEError, match="y_train: label 2 out of range for num_classes=2"):
        load_dataset(save_npz(tmp_path / "a.npz", arrays))


def test_several_problems_are_reported_together(tmp_path):
    arrays = good_arrays()
    arrays["x_test"][0, 0] = np.nan
    arrays["y_train"] = arrays["y_train"][:2]
    message = str(pytest.raises(FPEError, load_dataset, save_npz(tmp_path / "a.npz", arrays)).value)
    assert "x_test" in message and "y_train" in message


def test_pickled_object_arrays_are_refused(tmp_path):
    arrays = good_arrays()
    arrays["x_train"] = np.array([object()] * 6, dtype=object)
    path = tmp_path / "pickled.npz"
    np.savez(path, **arrays)  # numpy pickles object arrays on save
    with pytest.raises(FPEError, match="pickled"):
        load_dataset(path)


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04garbage"])
def test_broken_archives_are_errors_not_crashes(tmp_path, content):
    path = tmp_path / "broken.npz"
    path.write_bytes(content)
    with pytest.raises(FPEError, match="broken.npz"):
        load_dataset(path)


def test_truncated_archive_and_npy_file(tmp_path):
    good = save_npz(tmp_path / "good.npz", good_arrays())
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(FPEError, match="cut.npz"):
        load_dataset(cut)
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(FPEError, match="single .npy array"):
        load_dataset(npy)
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as zf:
        zf.writestr("x_train.npy", b"\x93NUMPY junk")
    with pytest.raises(FPEError):
        load_dataset(tmp_path / "other.npz")


def test_unknown_spec_and_missing_file():
    with pytest.raises(FPEError, match="unknown data set 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(FPEError, match="no such file"):
        load_dataset("nope.npz")


def test_model_width_checks():
    ds = load_dataset("dnf:vars=6,clauses=2,k=2,train=20,test=10")
    check_input_width(ds, 6)
    with pytest.raises(FPEError, match=r"x_train has 6 features \(shape \(20, 6\)\) but fc1.weight takes 7 inputs"):
        check_input_width(ds, 7, "fc1.weight")
    check_output_width(ds, 2)
    with pytest.raises(FPEError, match=r"y_train holds class ids \(N,\) but the model has 1 outputs"):
        check_output_width(ds, 1)
    multi = load_dataset("dnf:vars=6,clauses=2,k=2,train=20,test=10,outputs=clauses")
    with pytest.raises(FPEError, match="2 labels per row but the model has 3 outputs"):
        check_output_width(multi, 3)


# ---------------------------------------------------------------- digits


def test_digits_split_is_stratified_scaled_and_fixed():
    ds = load_dataset("digits")
    assert ds.x_train.shape == (1347, 64) and ds.x_test.shape == (450, 64)
    assert ds.num_classes == 10 and not ds.multilabel
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    from sklearn.datasets import load_digits

    totals = np.bincount(load_digits().target)
    test_counts = ds.y_test.bincount(minlength=10).numpy()
    assert np.all(np.abs(test_counts - 0.25 * totals) <= 1)
    assert load_dataset("digits").sha256() == ds.sha256()
    assert load_dataset("digits:seed=1").sha256() != ds.sha256()


# ---------------------------------------------------------------- the DNF generator


def reference_labels(x: np.ndarray, literals: list, encoding: str, outputs: str) -> np.ndarray:
    """Evaluate the DNF written out literal by literal, in plain Python (independent of the generator)."""
    true_value = 1.0
    false_value = -1.0 if encoding == "pm1" else 0.0
    rows = []
    for sample in x:
        clause_values = []
        for clause in literals:
            holds = True
            for var, positive in clause:
                want = true_value if positive else false_value
                holds = holds and sample[var] == want
            clause_values.append(holds)
        rows.append([any(clause_values)] if outputs == "or" else clause_values)
    arr = np.array(rows, dtype=np.float32)
    return arr[:, 0].astype(np.int64) if outputs == "or" else arr


@settings(max_examples=25)
@given(n_vars=st.integers(2, 14), clauses=st.integers(1, 6), k=st.integers(1, 4), outputs=st.sampled_from(["or", "clauses"]),
       encoding=st.sampled_from(["pm1", "01"]), sampling=st.sampled_from(["planted", "uniform"]), seed=st.integers(0, 1000))
def test_dnf_labels_match_an_independent_evaluation(n_vars, clauses, k, outputs, encoding, sampling, seed):
    k = min(k, n_vars)
    ds = make_dnf(f"vars={n_vars},clauses={clauses},k={k},outputs={outputs},encoding={encoding},"
                  f"sampling={sampling},train=60,test=30,seed={seed}")
    values = {0.0, 1.0} if encoding == "01" else {-1.0, 1.0}
    assert set(np.unique(ds.x_train.numpy())) <= values
    literals = ds.info["literals"]
    assert len(literals) == clauses and all(len(c) == k and len({v for v, _ in c}) == k for c in literals)
    for split in ("train", "test"):
        x, y = getattr(ds, f"x_{split}").numpy(), getattr(ds, f"y_{split}").numpy()
        assert np.array_equal(y, reference_labels(x, literals, encoding, outputs))
    groups = ds.info["groups"]
    flat = [i for g in groups for i in g]
    assert len(flat) == len(set(flat))  # disjoint: a valid clause map
    for group, clause in zip(groups, literals):
        assert set(group) <= {v for v, _ in clause}
    if n_vars >= clauses * k:
        assert not ds.info["overlap"]
        assert [sorted(g) for g in groups] == [sorted(v for v, _ in c) for c in literals]


def test_dnf_planted_sampling_balances_labels():
    ds = make_dnf("vars=48,clauses=16,k=3,train=4000,test=2000,seed=3")
    assert abs(float(ds.y_train.float().mean()) - 0.5) < 0.03
    assert abs(float(ds.y_test.float().mean()) - 0.5) < 0.04
    uniform = make_dnf("vars=24,clauses=8,k=3,sampling=uniform,train=4000,seed=3")
    assert abs(float(uniform.y_train.float().mean()) - (1 - (7 / 8) ** 8)) < 0.03
    multi = make_dnf("vars=24,clauses=8,k=3,outputs=clauses,positives=0.3,train=4000,seed=3")
    assert multi.multilabel and multi.num_outputs == 8
    assert torch.all((multi.y_train.mean(dim=0) - 0.3).abs() < 0.04)


def test_dnf_is_deterministic_and_records_its_spec():
    a, b = make_dnf("seed=5,train=50,test=20"), make_dnf("train=50,test=20,seed=5")
    assert a.sha256() == b.sha256() and a.name == b.name
    assert a.name.startswith("dnf:vars=32,clauses=8,k=3,outputs=or,encoding=pm1")
    assert make_dnf("seed=6,train=50,test=20").sha256() != a.sha256()
    assert load_dataset(a.name).sha256() == a.sha256()  # the recorded name regenerates the data


@pytest.mark.parametrize("spec, needle", [
    ("dnf:vars=3,k=4", "k=4 literals per clause needs at least that many vars"),
    ("dnf:colour=red", "unknown or malformed setting 'colour=red'"),
    ("dnf:vars=many", "vars must be int, got 'many'"),
    ("dnf:outputs=xor", "outputs must be one of or/clauses"),
    ("dnf:positives=1.5", "positives must be a fraction"),
    ("dnf:train=0", "train must be >= 1"),
    ("digits:test=2", "test must be a fraction"),
])
def test_bad_specs(spec, needle):
    with pytest.raises(FPEError) as err:
        load_dataset(spec)
    assert needle in str(err.value) and err.value.exit_code == 2


def test_clause_map_file_is_read_by_expand(tmp_path):
    ds = make_dnf("vars=20,clauses=4,k=3,train=10,test=10")
    path = tmp_path / "clauses.json"
    write_clause_map(ds.info["groups"], path, ds.num_inputs)
    doc = json.loads(path.read_text())
    assert doc == {"groups": ds.info["groups"], "num_inputs": 20}
    groups = load_clause_map(path, 20)
    for g, members in enumerate(ds.info["groups"]):
        assert all(int(groups[i]) == g for i in members)
    assert int((groups >= 0).sum()) == 12
    with pytest.raises(FPEError, match="output exists"):
        write_clause_map(ds.info["groups"], path, 20)


def test_writers_refuse_to_overwrite_and_leave_no_temp_files(tmp_path):
    ds = Dataset("tiny", torch.zeros(2, 1), torch.zeros(2, dtype=torch.int64), torch.zeros(1, 1),
                 torch.zeros(1, dtype=torch.int64), False, 1)
    out = tmp_path / "tiny.npz"
    write_dataset_npz(ds, out)
    with pytest.raises(FPEError, match="pass --force"):
        write_dataset_npz(ds, out)
    write_dataset_npz(ds, out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "_home") == ["tiny.npz"]
    again = load_dataset(out)
    assert again.name == str(out) and again.info["written_from"] == "tiny"
