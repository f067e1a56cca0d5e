"""Expansion options, recipes, clause maps, plans and the numbers of `analyze`/`params`, written the way
users write them (adversarial QA). Every number is checked against plain numpy on the files' bytes."""

from __future__ import annotations

import json
import math
import zlib

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file

from conftest import assert_one_error_line, run_cli


# ---------------------------------------------------------------- helpers: models and an independent reader


def _mlp(widths, seed=0, names=None) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    sd = {}
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        lin = torch.nn.Linear(a, b)
        name = names[i] if names else str(2 * i)
        sd[f"{name}.weight"], sd[f"{name}.bias"] = lin.weight.detach().clone(), lin.bias.detach().clone()
    return sd


def _save(path, sd):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _dead_model(path):
    """12 -> 8 -> 3 with one neuron without any input edge and one with only two."""
    sd = _mlp([12, 8, 3])
    sd["0.weight"][3] = 0
    sd["0.weight"][5, :10] = 0
    return _save(path, sd)


def _ok(args) -> dict:
    res = run_cli([*args, "--json"])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def _chain(path) -> list[str]:
    with safe_open(str(path), "np") as f:
        keys = json.loads(f.metadata()["fpe.layers"])
    return [k if isinstance(k, str) else k[0] for k in keys]


def _decode(t: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(weight, mask) of one layer of an fpe file, packed (README's recipe) or dense; tied copies widened."""
    if f"fpe.values:{key}" in t:
        rows, cols = (int(v) for v in t[f"fpe.shape:{key}"])
        strips = -(-rows // 4)
        raw = np.frombuffer(zlib.decompress(t[f"fpe.zmask:{key}"].tobytes()), np.uint8)
        bits = np.unpackbits(raw, bitorder="little")
        mask = bits[:strips * 4 * cols].reshape(strips, cols, 4).transpose(0, 2, 1).reshape(-1, cols)[:rows].astype(bool)
        w = np.zeros((rows, cols), np.float64)
        w[mask] = t[f"fpe.values:{key}"]
        if f"fpe.tied:{key}" in t:
            counts = t[f"fpe.tied:{key}"]
            w, mask = np.repeat(w, counts, axis=1), np.repeat(mask, counts, axis=1)
        return w, mask
    w = t[key].astype(np.float64)
    m = t.get(f"fpe.mask:{key}")
    return w, (m.astype(bool) if m is not None else w != 0)


def _check_expansion(src, out, report=None, outgoing="copy") -> None:
    """The FPE invariants and the report's numbers, from the two files alone."""
    s, e = load_file(str(src)), load_file(str(out))
    keys = _chain(out)
    src_w = [s[k].astype(np.float64) for k in keys]
    src_nnz = [int((w != 0).sum()) for w in src_w]
    row_par = []
    for k, w in zip(keys, src_w):
        ch = e.get(f"fpe.children:{k}")
        row_par.append(np.repeat(np.arange(w.shape[0]), ch) if ch is not None else np.arange(w.shape[0]))
    col_par = [np.arange(src_w[0].shape[1])] + row_par[:-1]
    after, before_prune = [], []
    for k, w0, rp, cp in zip(keys, src_w, row_par, col_par):
        w, m = _decode(e, k)
        assert m.shape == (len(rp), len(cp)), k
        assert not np.any((w != 0) & ~m), f"{k}: non-zero off the mask"
        assert not np.any(m & ~(w0 != 0)[rp][:, cp]), f"{k}: a child owns an edge its parent does not have"
        owners = np.zeros((w0.shape[0], len(cp)), int)
        np.add.at(owners, rp, m.astype(int))
        assert owners.max(initial=0) <= 1, f"{k}: siblings share an edge"
        copies = np.bincount(cp, minlength=w0.shape[1])
        expect = w0[rp][:, cp] / (copies[cp][None, :] if outgoing == "split" else 1)
        assert np.allclose(w[m], expect[m], rtol=1e-6, atol=0), f"{k}: a weight is not its parent's value"
        tied = e.get(f"fpe.tied:{k}")
        if tied is not None:  # one shared parameter per parent column
            after.append(int(m[:, np.r_[0, np.cumsum(tied)[:-1]]].sum()))
        else:
            after.append(int(m.sum()))
        before_prune.append(int(((w0 != 0) * copies[None, :]).sum()))
    assert sum(after) == sum(src_nnz), (after, src_nnz)
    if report is not None:
        assert report["budget"] == sum(src_nnz) and report["weights_after"] == sum(after) and report["budget_holds"]
        for k, layer in enumerate(report["layers"]):
            assert layer["weights_before"] == src_nnz[k] and layer["weights_after"] == after[k]
            if outgoing != "tie":
                assert layer["pruned"] == before_prune[k] - after[k], (k, layer)
    res = run_cli(["verify", out, "--source", src])
    assert res.exit_code == 0, res.stdout + res.stderr


# ---------------------------------------------------------------- expansion options


@pytest.mark.parametrize("split", ["gram", "clause", "structured", "random", "activation"])
def test_expand_top_with_a_dead_neuron_works_for_every_split(tmp_path, split):
    """A neuron with no edges (and one with fewer than alpha) is never chosen by --expand-top; the
    group-dealing splits used to crash on it (IndexError in _fill_empty_children) before the choice applied."""
    src = _dead_model(tmp_path / "dead.safetensors")
    (tmp_path / "cm.json").write_text('{"groups": [[0,1,2],[3,4,5],[6,7,8],[9,10,11]]}')
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 12)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=rng.integers(0, 3, 64), x_test=x[:16], y_test=rng.integers(0, 3, 16))
    extra = {"clause": ["--clause-map", tmp_path / "cm.json"], "activation": ["--data", tmp_path / "d.npz"]}.get(split, [])
    out = tmp_path / "e.safetensors"
    rep = _ok(["expand", src, "--alpha", "4", "--expand-top", "2", "--split", split, *extra, "-o", out])
    _check_expansion(src, out, rep)
    children = load_file(str(out))["fpe.children:0.weight"]
    assert sorted(children.tolist()) == [1] * 6 + [4] * 2 and children[3] == 1 and children[5] == 1


def test_alpha_above_a_parents_edges_without_expand_top_is_one_error(tmp_path):
    src = _dead_model(tmp_path / "dead.safetensors")
    assert_one_error_line(run_cli(["expand", src, "--alpha", "2", "--split", "gram"]),
                          "larger than parent 3's 0 edges", "--expand-top")


@pytest.mark.parametrize("outgoing", ["copy", "split", "tie"])
def test_deep_model_some_layers_targeted_numbers_are_true(tmp_path, outgoing):
    src = _save(tmp_path / "deep.safetensors", _mlp([10, 8, 6, 6, 5, 4], seed=1))
    out = tmp_path / "e.safetensors"
    rep = _ok(["expand", src, "--alpha", "3", "--targets", "re:[26]\\.weight", "--outgoing", outgoing, "-o", out])
    assert [layer["alpha"] for layer in rep["layers"]] == [None, 3, None, 3, None]
    _check_expansion(src, out, rep, outgoing)


def test_recipe_per_target_clause_then_gram_on_a_deep_model(tmp_path):
    src = _save(tmp_path / "deep.safetensors", _mlp([10, 8, 6, 6, 4], seed=1))
    (tmp_path / "cm.yaml").write_text("groups:\n  - [0, 1]\n  - [2, 3, 4]\n  - [5, 6]\n  - [7, 8, 9]\n")
    (tmp_path / "r.yaml").write_text("alpha: 2\ntargets:\n  - match: '0'\n    split: clause\n    alpha: 3\n"
                                     "  - match: 're:[24]'\n    split: gram\n")
    out = tmp_path / "e.safetensors"
    rep = _ok(["expand", src, "--recipe", tmp_path / "r.yaml", "--clause-map", tmp_path / "cm.yaml", "-o", out,
               "--save-plan", tmp_path / "p.safetensors"])
    assert [(layer["split"], layer["alpha"]) for layer in rep["layers"]] == [("clause", 3), ("gram", 2), ("gram", 2), (None, None)]
    _check_expansion(src, out, rep)
    child = load_file(str(tmp_path / "p.safetensors"))["plan.child:0.weight"]
    for group in ([0, 1], [2, 3, 4], [5, 6], [7, 8, 9]):  # every clause stays inside one child of each parent
        assert all(len(set(row[group].tolist())) == 1 for row in child)


def test_plan_saved_from_one_model_applies_to_another_of_the_same_shape(tmp_path):
    a = _save(tmp_path / "a.safetensors", _mlp([10, 8, 6, 4], seed=1))
    b = _save(tmp_path / "b.safetensors", _mlp([10, 8, 6, 4], seed=2))
    plan = tmp_path / "plan.safetensors"
    _ok(["expand", a, "--alpha", "3", "--targets", "2", "--save-plan", plan, "-o", tmp_path / "ea.safetensors"])
    out = tmp_path / "eb.safetensors"
    rep = _ok(["expand", b, "--plan", plan, "--targets", "2", "-o", out])
    _check_expansion(b, out, rep)
    owner = load_file(str(plan))["plan.child:2.weight"]
    mask = _decode(load_file(str(out)), "2.weight")[1]
    assert np.all(~mask | (owner[np.repeat(np.arange(6), 3)] == np.tile(np.arange(3), 6)[:, None]))


# ---------------------------------------------------------------- recipes


def _fc_model(tmp_path):
    return _save(tmp_path / "fc.safetensors", _mlp([10, 8, 6, 4], seed=3, names=["fc1", "fc2", "fc3"]))


def test_recipe_targets_as_one_string_is_one_pattern_not_its_characters(tmp_path):
    src = _fc_model(tmp_path)
    (tmp_path / "r.yaml").write_text("alpha: 2\ntargets: 're:fc[12]'\n")
    rep = _ok(["expand", src, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "e.safetensors"])
    assert [layer["alpha"] for layer in rep["layers"]] == [2, 2, None]
    (tmp_path / "i.yaml").write_text("alpha: 2\nignore: fc1\n")
    rep = _ok(["expand", src, "--recipe", tmp_path / "i.yaml", "-o", tmp_path / "f.safetensors"])
    assert [layer["alpha"] for layer in rep["layers"]] == [None, 2, None]


def test_recipe_targets_as_a_mapping_is_one_error(tmp_path):
    src = _fc_model(tmp_path)
    (tmp_path / "r.yaml").write_text("alpha: 2\ntargets: {match: fc1, alpha: 3}\n")
    assert_one_error_line(run_cli(["expand", src, "--recipe", tmp_path / "r.yaml"]), "targets must be a list")


def test_recipe_numeric_key_is_an_unknown_key_not_an_internal_error(tmp_path):
    src = _fc_model(tmp_path)
    (tmp_path / "r.yaml").write_text("alpha: 2\n1: 2\n")
    assert_one_error_line(run_cli(["expand", src, "--recipe", tmp_path / "r.yaml"]), "unknown recipe key(s): 1")


def test_recipe_per_target_expand_top_of_one_and_a_half_is_refused_like_the_flag(tmp_path):
    src = _fc_model(tmp_path)
    (tmp_path / "r.yaml").write_text("alpha: 2\ntargets:\n  - match: fc1\n    expand_top: 1.5\n")
    assert_one_error_line(run_cli(["expand", src, "--recipe", tmp_path / "r.yaml"]), "expand_top must be", "1.5")


@pytest.mark.parametrize("text, needle", [
    ("alpha: 4.0\n", "alpha must be an integer"),
    ("alpha: '4'\n", "alpha must be an integer"),
    ("alpha: 2\ntargets:\n  - match: fc1\n    alhpa: 3\n", "bad target entry"),
    ("alpha: 2\ntargets: ['re:nothing.*']\n", "matches no hidden layer"),
    ("alpha: 2\nignore: ['re:.*']\n", "no hidden layer left"),
    ("alpha: !!python/object/apply:os.system ['true']\n", "cannot parse recipe"),
])
def test_recipe_mistakes_are_one_error_line(tmp_path, text, needle):
    src = _fc_model(tmp_path)
    (tmp_path / "r.yaml").write_text(text)
    assert_one_error_line(run_cli(["expand", src, "--recipe", tmp_path / "r.yaml"]), needle)
    assert not (tmp_path / "fc.fpe2.safetensors").exists() and not (tmp_path / "fc.fpe4.safetensors").exists()


# ---------------------------------------------------------------- clause maps


@pytest.mark.parametrize("name, text", [
    ("cm.json", '\ufeff{"groups": [[0,1,2],[3,4,5],[6,7,8],[9,10,11]]}'),
    ("cm.yaml", "\ufeffgroups:\n  - [0, 1, 2]\n  - [3, 4, 5]\n  - [6, 7, 8]\n  - [9, 10, 11]\n"),
])
def test_clause_map_with_a_byte_order_mark_is_read(tmp_path, name, text):
    """Windows editors (Notepad) save UTF-8 with a BOM; the map means the same as without it."""
    src = _save(tmp_path / "m.safetensors", _mlp([12, 8, 3]))
    (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "plain.json").write_text('{"groups": [[0,1,2],[3,4,5],[6,7,8],[9,10,11]]}')
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    _check_expansion(src, a, _ok(["expand", src, "--alpha", "2", "--split", "clause", "--clause-map", tmp_path / name, "-o", a]))
    _ok(["expand", src, "--alpha", "2", "--split", "clause", "--clause-map", tmp_path / "plain.json", "-o", b])
    ta, tb = load_file(str(a)), load_file(str(b))
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("text, needle", [
    ("0: 99999999999999999999999\n", "out of range"),
    ("groups:\n  - [0, 99999999999999999999999]\n", "out of range"),
    ("groups:\n  - &a [0, 1, 2]\n  - *a\n", "in two groups"),
    ("groups:\n  - [0, yes]\n", "must be integers"),
])
def test_clause_map_mistakes_are_one_error_line(tmp_path, text, needle):
    src = _save(tmp_path / "m.safetensors", _mlp([12, 8, 3]))
    (tmp_path / "cm.yaml").write_text(text)
    assert_one_error_line(run_cli(["expand", src, "--alpha", "2", "--split", "clause", "--clause-map", tmp_path / "cm.yaml"]),
                          needle)


# ---------------------------------------------------------------- analyze: numbers against numpy


def _layers(path) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(effective weight, bias, parents) per layer of a plain or fpe file."""
    t = load_file(str(path))
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
    keys = _chain(path) if "fpe.layers" in meta else sorted(
        (k for k in t if k.endswith(".weight")), key=lambda k: int(k.split(".")[0]))
    out = []
    for k in keys:
        w, m = _decode(t, k)
        ch = t.get(f"fpe.children:{k}")
        out.append((np.where(m, w, 0.0), t[k[:-6] + "bias"].astype(np.float64),
                    np.repeat(np.arange(len(ch)), ch) if ch is not None else None))
    return out


def _exp_entropy(p):
    total = p.sum()
    if total == 0:
        return math.nan
    p = p[p > 0] / total
    return math.exp(-(p * np.log(p)).sum())


def _weight_metrics(w, parents):
    g = w.T @ w
    cap = np.array([g[i, i] ** 2 / (g[i] ** 2).sum() for i in range(w.shape[1]) if g[i, i] > 0])
    keep = np.linalg.norm(w, axis=1) > 0
    u = w[keep] / np.linalg.norm(w[keep], axis=1, keepdims=True)
    iu = np.triu_indices(u.shape[0], 1)
    cos = np.abs(u @ u.T)[iu]
    non_sib = cos if parents is None else cos[parents[keep][iu[0]] != parents[keep][iu[1]]]
    poly = np.array([_exp_entropy(r ** 2) for r in w])
    return {"capacity_mean": cap.mean(), "capacity_median": np.median(cap), "capacity_sum": cap.sum(),
            "capacity_fraction_below_half": (cap < 0.5).mean(), "cosine_mean_abs": cos.mean(),
            "cosine_mean_abs_non_sibling": non_sib.mean(), "polysemanticity_mean": np.nanmean(poly),
            "polysemanticity_median": np.nanmedian(poly)}, poly


def _data_metrics(layers, x, y, classes):
    h, out = x.astype(np.float64), []
    onehot = np.eye(classes)[y]
    for w, b, _ in layers[:-1]:
        h = np.maximum(h @ w.T + b, 0)
        seen = onehot.sum(0) > 0
        means = (onehot.T @ h)[seen] / onehot.sum(0)[seen, None]
        out.append({"class_selectivity_mean": np.nanmean([_exp_entropy(np.abs(c)) for c in means.T]),
                    "dead_fraction": ((h > 0).sum(0) == 0).mean(), "activation_density": (h > 0).mean()})
    return out


def _close(a, b):
    return (b is None and math.isnan(a)) or (b is not None and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12))


def test_analyze_numbers_dense_vs_expansion_match_numpy(tmp_path):
    src = _save(tmp_path / "deep.safetensors", _mlp([10, 8, 6, 4], seed=1))
    exp = tmp_path / "e.safetensors"
    _ok(["expand", src, "--alpha", "3", "--expand-top", "5", "-o", exp])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 10)).astype(np.float32)
    y = rng.integers(0, 4, 80)
    y[y == 3] = 0  # a class the probe never shows
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y, num_classes=np.array(4))
    doc = _ok(["analyze", src, exp, "--data", tmp_path / "d.npz", "--top", "100", "--csv", tmp_path / "n.csv"])
    rows = (tmp_path / "n.csv").read_text().splitlines()
    assert len(rows) == 1 + 8 + 6 + (5 * 3 + 3) + 6 + 5 * 2  # header + dense neurons + expanded neurons
    for mi, path in enumerate((src, exp)):
        layers = _layers(path)
        data = _data_metrics(layers, x, y, 4)
        for li, (w, _, parents) in enumerate(layers[:-1]):
            mine, poly = _weight_metrics(w, parents)
            mine.update(data[li])
            got = doc["models"][mi]["layers"][li]
            for key, value in mine.items():
                assert _close(value, got["metrics"][key]), (path, li, key, value, got["metrics"][key])
            for row in got["top_neurons"]:
                assert _close(poly[row["neuron"]], row["polysemanticity"])
    for li, cmp in enumerate(doc["comparison"]):
        dense, expanded = doc["models"][0]["layers"][li]["metrics"], doc["models"][1]["layers"][li]["metrics"]
        for key, fold in cmp["fold_change"].items():
            d = dense["cosine_mean_abs" if key == "cosine_mean_abs_non_sibling" else key]
            assert _close(expanded[key] / d, fold) if d else fold is None


def test_analyze_refuses_non_finite_weights_instead_of_calling_them_zero(tmp_path):
    """A NaN weight used to make every feature count as an all-zero column (features_zero = all)."""
    sd = _mlp([12, 8, 3])
    sd["0.weight"][0, 0] = float("nan")
    src = _save(tmp_path / "nan.safetensors", sd)
    assert_one_error_line(run_cli(["analyze", src, "--json"]), "nan.safetensors", "non-finite", "0.weight")


def test_analyze_notes_an_expansion_of_another_dense_model(tmp_path):
    a = _save(tmp_path / "a.safetensors", _mlp([12, 8, 3], seed=1))
    b = _save(tmp_path / "b.safetensors", _mlp([12, 8, 3], seed=2))
    exp = tmp_path / "a.fpe2.safetensors"
    _ok(["expand", a, "--alpha", "2", "-o", exp])
    res = run_cli(["analyze", b, exp, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["comparison"]
    assert "expanded from another file" in " ".join(res.stderr.split())
    res = run_cli(["analyze", a, exp, "--json"])
    assert res.exit_code == 0 and res.stderr == ""


# ---------------------------------------------------------------- params against the file's bytes


def test_params_counts_match_the_file(tmp_path):
    sd = _mlp([10, 8, 6, 4], seed=1)
    sd["2.weight"][sd["2.weight"].abs() < 0.1] = 0  # pre-pruned
    src = _save(tmp_path / "s.safetensors", sd)
    out = tmp_path / "e.safetensors"
    _ok(["expand", src, "--alpha", "2", "--targets", "0", "-o", out])
    for path in (src, out):
        doc = _ok(["params", path])
        t = load_file(str(path))
        for layer, (w, b, _) in zip(doc["layers"], _layers(path)):
            key = layer["weight"]
            mask = _decode(t, key)[1]
            names = [n for n in t if n in (key, key[:-6] + "bias") or n.endswith(":" + key)]
            assert (layer["weights"], layer["nonzero_weights"], layer["biases"]) == (int(mask.sum()), int((w != 0).sum()), b.size)
            assert math.isclose(layer["sparsity"], 1 - mask.sum() / mask.size)
            assert layer["bytes_on_disk"] == sum(t[n].nbytes for n in names)
        assert doc["total"]["weights"] == int(sum((v != 0).sum() for k, v in load_file(str(src)).items() if k.endswith("weight")))
        assert doc["total"]["hidden_neurons"] == sum(layer["shape"][0] for layer in doc["layers"][:-1])
        assert doc["file_bytes"] == path.stat().st_size
