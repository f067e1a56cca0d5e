"""Adversarial QA of `fpe verify` (and convert / finetune / evaluate) on hand-edited expanded files.

Every input is an fpe-written file that a user or a buggy tool edited with safetensors; `verify`
must exit 3 naming each violation, 0 on intact files, 2 with one `Error:` line on unreadable input.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_one_error_line, run_cli, save_mlp


def read(path):
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return dict(load_file(str(path))), dict(meta or {})


def write(path, tensors, meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
    return path


def violations(path, source=None) -> str:
    args = ["verify", path] + (["--source", source] if source else [])
    return assert_one_error_line(run_cli(args), "violated", code=3)


def verify_ok(path, source=None):
    args = ["verify", path] + (["--source", source] if source else [])
    res = run_cli(args)
    assert res.exit_code == 0, res.stderr
    return res


@pytest.fixture
def files(tmp_path):
    """A 48-8-3 source, a second source of the same shape, and its alpha-4 expansion (dense and packed)."""
    src = save_mlp(tmp_path / "a.safetensors", [48, 8, 3], seed=0)
    other = save_mlp(tmp_path / "b.safetensors", [48, 8, 3], seed=5)
    dense, packed = tmp_path / "e.dense.safetensors", tmp_path / "e.packed.safetensors"
    for out, layout in ((dense, "dense"), (packed, "packed")):
        res = run_cli(["expand", src, "--alpha", "4", "--layout", layout, "-o", out, "--probe-samples", "0"])
        assert res.exit_code == 0, res.stderr
    return src, other, dense, packed


W = "0.weight"


def test_intact_files_verify(files, tmp_path):
    src, _, dense, packed = files
    for f in (dense, packed):
        verify_ok(f)
        verify_ok(f, src)
    deep = save_mlp(tmp_path / "deep.safetensors", [10, 8, 6, 6, 4], seed=1, dtype=torch.float16)
    for i, opts in enumerate((["--alpha", "3", "--outgoing", "split"], ["--alpha", "2", "--outgoing", "tie"],
                              ["--alpha", "3", "--expand-top", "0.5", "--outgoing", "split"])):
        out = tmp_path / f"deep{i}.safetensors"
        assert run_cli(["expand", deep, *opts, "-o", out, "--probe-samples", "0"]).exit_code == 0
        verify_ok(out, deep)


def test_off_mask_weight_and_flipped_mask_bits(files, tmp_path):
    src, _, dense, _ = files
    t, meta = read(dense)
    mask = t[f"fpe.mask:{W}"]
    w = t[W].clone()
    i, j = (~mask).nonzero()[0].tolist()
    w[i, j] = 0.5
    line = violations(write(tmp_path / "off.safetensors", {**t, W: w}, meta), src)
    assert "1 weight(s) off the mask are not zero" in line
    flipped = mask.clone()
    i, j = mask.nonzero()[0].tolist()
    flipped[i, j] = False  # a weight that exists loses its mask bit: off-mask non-zero and one weight short
    line = violations(write(tmp_path / "flip.safetensors", {**t, f"fpe.mask:{W}": flipped}, meta))
    assert "off the mask are not zero" in line and "recorded budget" in line


def test_siblings_sharing_an_edge_in_both_layouts(files, tmp_path):
    src, _, dense, _ = files
    t, meta = read(dense)
    mask, w = t[f"fpe.mask:{W}"].clone(), t[W].clone()
    j = next(j for j in mask[0].nonzero().flatten().tolist() if not mask[1, j])
    j2 = int(mask[1].nonzero()[0])
    mask[1, j], w[1, j] = True, w[0, j]
    mask[1, j2], w[1, j2] = False, 0.0  # the count stays the budget
    edited = write(tmp_path / "share.safetensors", {**t, W: w, f"fpe.mask:{W}": mask}, meta)
    assert "owned by more than one sibling" in violations(edited, src)
    packed = tmp_path / "share.packed.safetensors"
    assert run_cli(["convert", edited, "--layout", "packed", "-o", packed]).exit_code == 0
    assert "owned by more than one sibling" in violations(packed)


def test_edge_moved_to_a_child_of_another_parent(files, tmp_path):
    """Disjointness, budget and the (dense) source's edges all still hold; only the value betrays it."""
    src, _, dense, _ = files
    t, meta = read(dense)
    mask, w = t[f"fpe.mask:{W}"].clone(), t[W].clone()
    j = next(j for j in mask[0].nonzero().flatten().tolist() if not mask[4:8, j].any())
    mask[0, j], mask[4, j], w[4, j], w[0, j] = False, True, w[0, j], 0.0
    edited = write(tmp_path / "moved.safetensors", {**t, W: w, f"fpe.mask:{W}": mask}, meta)
    assert "1 weight(s) differ from their parent's in the source" in violations(edited, src)


def test_edited_values_and_budget(files, tmp_path):
    src, _, _, packed = files
    t, meta = read(packed)
    values = t[f"fpe.values:{W}"].clone()
    values[3] += 1.0
    assert "differ from their parent's" in violations(write(tmp_path / "v.safetensors", {**t, f"fpe.values:{W}": values}, meta), src)
    budget = json.loads(meta["fpe.budget"])
    for value, needle in ((budget["weights"] + 1, "recorded budget"),):  # a boolean: malformed, exit 2 (below)
        bad = write(tmp_path / "budget.safetensors", t, {**meta, "fpe.budget": json.dumps({**budget, "weights": value})})
        assert needle in violations(bad)
    stripped = write(tmp_path / "nobudget.safetensors", t, {k: v for k, v in meta.items() if k != "fpe.budget"})
    assert "records no budget" in violations(stripped)
    verify_ok(stripped, src)  # with the source the count is compared with the source's


def test_edited_lineage(files, tmp_path):
    src, _, dense, _ = files
    t, meta = read(dense)
    children = t[f"fpe.children:{W}"].clone()
    children[0], children[1] = 3, 5
    line = violations(write(tmp_path / "ch.safetensors", {**t, f"fpe.children:{W}": children}, meta), src)
    assert "more than one sibling" in line and "0.bias" in line
    fewer = torch.full((4,), 8, dtype=torch.int32)  # same sum, 4 parents instead of 8
    line = violations(write(tmp_path / "ch2.safetensors", {**t, f"fpe.children:{W}": fewer}, meta), src)
    assert "names 4 parents, but the source's weight has 8 outputs" in line
    dropped = write(tmp_path / "nolin.safetensors", {k: v for k, v in t.items() if not k.startswith("fpe.children")}, meta)
    assert "no lineage (fpe.children)" in violations(dropped, src)


def test_dense_file_whose_masks_were_dropped(files, tmp_path):
    src, _, dense, _ = files
    t, meta = read(dense)
    bare = {k: v for k, v in t.items() if not k.startswith("fpe.mask")}
    line = violations(write(tmp_path / "nomask.safetensors", bare, meta))
    assert f"{W}: the expanded model has no mask" in line and "2.weight: the expanded model has no mask" in line
    w = bare[W].clone()
    j = int(t[f"fpe.mask:{W}"][0].nonzero()[0])
    w[1, j] = 0.3  # siblings share an edge: found on the non-zeros when the masks are gone
    line = violations(write(tmp_path / "nomask2.safetensors", {**bare, W: w}, meta), src)
    assert "owned by more than one sibling" in line


def test_wrong_or_edited_source(files, tmp_path):
    src, other, dense, _ = files
    line = violations(dense, other)
    assert "sha256" in line and "differ from their parent's" in line
    s, smeta = read(src)
    changed = s["0.weight"].clone()
    changed[0, 0] += 1.0
    assert "is not the recorded" in violations(dense, write(tmp_path / "a2.safetensors", {**s, "0.weight": changed}, smeta))
    t, meta = read(dense)
    nosha = write(tmp_path / "nosha.safetensors", t, {k: v for k, v in meta.items() if k != "fpe.source_sha256"})
    line = violations(nosha, other)
    assert "records no fpe.source_sha256" in line and "differ from their parent's" in line
    assert "records no fpe.source_sha256" in violations(nosha, src)


def test_unequal_tied_copies(tmp_path):
    src = save_mlp(tmp_path / "a.safetensors", [12, 8, 3])
    tied = tmp_path / "t.safetensors"
    assert run_cli(["expand", src, "--alpha", "4", "--outgoing", "tie", "--layout", "dense", "-o", tied,
                    "--probe-samples", "0"]).exit_code == 0
    t, meta = read(tied)
    w = t["2.weight"].clone()
    i, j = t["fpe.mask:2.weight"].nonzero()[0].tolist()
    w[i, j] += 1.0
    edited = write(tmp_path / "t2.safetensors", {**t, "2.weight": w}, meta)
    assert "tied column entr(ies) differ" in violations(edited, src)
    res = run_cli(["convert", edited, "--layout", "packed", "-o", tmp_path / "t2.packed.safetensors"])
    assert_one_error_line(res, "lossless", code=3)


def test_unreadable_input_is_exit_2(files, tmp_path):
    src, _, dense, _ = files
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(dense.read_bytes()[:300])
    for args in (["verify", trunc], ["verify", dense, "--source", trunc], ["verify", tmp_path / "missing.safetensors"]):
        assert_one_error_line(run_cli(args + ["--json"]), code=2)


def test_convert_refuses_lossy_and_round_trips(files, tmp_path):
    _, _, dense, packed = files
    to_dense, back = tmp_path / "d.safetensors", tmp_path / "p.safetensors"
    assert run_cli(["convert", packed, "--layout", "dense", "-o", to_dense]).exit_code == 0
    assert run_cli(["convert", to_dense, "--layout", "packed", "-o", back]).exit_code == 0
    assert back.read_bytes() == packed.read_bytes()
    t, meta = read(dense)
    w = t[W].clone()
    i, j = (~t[f"fpe.mask:{W}"]).nonzero()[0].tolist()
    w[i, j] = 0.25
    edited = write(tmp_path / "off.safetensors", {**t, W: w}, meta)
    for layout in ("packed", "dense"):
        assert_one_error_line(run_cli(["convert", edited, "--layout", layout, "-o", tmp_path / f"x.{layout}"]),
                              "off the mask", code=3)


def _own_eval(tensors, x, y):
    h = x
    for k, key in enumerate(("0.weight", "2.weight")):
        w = tensors[key].float() * tensors[f"fpe.mask:{key}"]
        h = F.linear(h, w, tensors[key[:-6] + "bias"].float())
        h = torch.relu(h) if k == 0 else h
    return float(F.cross_entropy(h, y)), float((h.argmax(1) == y).float().mean())


def test_finetune_keeps_masks_locked_and_evaluate_matches_torch(files, tmp_path):
    src, _, dense, packed = files
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 48)).astype(np.float32)
    y = (x[:, :3].argmax(1)).astype(np.int64)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x[:160], y_train=y[:160], x_test=x[160:], y_test=y[160:], num_classes=np.int64(3))
    before, _ = read(dense)
    budget = sum(int(before[f"fpe.mask:{k}"].sum()) for k in ("0.weight", "2.weight"))
    for model, extra in ((dense, []), (packed, ["--optimizer", "sgd", "--momentum", "0.9"])):
        out = tmp_path / f"ft.{model.name}"
        res = run_cli(["finetune", model, "--data", data, "--epochs", "3", "--lr", "0.05", "-o", out, *extra])
        assert res.exit_code == 0, res.stderr
        verify_ok(out, src)
        as_dense = tmp_path / f"ftd.{model.name}"
        if model == packed:
            assert run_cli(["convert", out, "--layout", "dense", "-o", as_dense]).exit_code == 0
        else:
            as_dense = out
        after, _ = read(as_dense)
        nonzero = 0
        for key in ("0.weight", "2.weight"):
            assert torch.equal(after[f"fpe.mask:{key}"], before[f"fpe.mask:{key}"])
            assert int(((after[key] != 0) & ~after[f"fpe.mask:{key}"]).sum()) == 0
            nonzero += int((after[key] != 0).sum())
        assert nonzero <= budget
        assert not torch.equal(after["0.weight"], before["0.weight"])  # it did train
        res = run_cli(["evaluate", out, "--data", data, "--json"])
        assert res.exit_code == 0, res.stderr
        doc = json.loads(res.stdout)["models"][0]
        loss, acc = _own_eval(after, torch.from_numpy(x[160:]), torch.from_numpy(y[160:]))
        assert doc["test"]["accuracy"] == pytest.approx(acc, abs=1e-6)
        assert doc["test"]["loss"] == pytest.approx(loss, rel=1e-5)


# ---------------------------------------------------------------- leftovers fixed outside verify.py


def _dense_expansion(tmp_path):
    from conftest import save_mlp

    src = save_mlp(tmp_path / "m.safetensors", [6, 8, 3], seed=1)
    out = tmp_path / "e.safetensors"
    assert run_cli(["expand", src, "--alpha", "2", "--layout", "dense", "-o", out]).exit_code == 0
    return src, out


def test_finetune_refuses_an_expansion_whose_masks_were_dropped(tmp_path):
    import numpy as np
    from safetensors.torch import load_file as _load, save_file as _save
    from safetensors import safe_open

    src, out = _dense_expansion(tmp_path)
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    tensors = {k: v for k, v in _load(str(out)).items() if not k.startswith("fpe.mask:")}
    _save(tensors, str(out), metadata=meta)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.normal(size=(20, 6)).astype(np.float32), y_train=rng.integers(0, 3, 20),
             x_test=rng.normal(size=(8, 6)).astype(np.float32), y_test=rng.integers(0, 3, 8))
    res = run_cli(["finetune", out, "--data", tmp_path / "d.npz", "--epochs", "1", "-o", tmp_path / "ft.safetensors"])
    assert res.exit_code == 3 and "no mask" in res.stderr and "breaks FPE's invariants" in res.stderr
    assert not (tmp_path / "ft.safetensors").exists()


def test_a_boolean_budget_is_malformed_and_expanding_a_finetuned_file_drops_its_record(tmp_path):
    import json as _json

    from safetensors import safe_open
    from safetensors.torch import load_file as _load, save_file as _save

    src, out = _dense_expansion(tmp_path)
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    _save(_load(str(out)), str(out), metadata={**meta, "fpe.budget": _json.dumps({"weights": True})})
    res = run_cli(["verify", out])
    assert res.exit_code == 2 and "fpe.budget is malformed" in res.stderr
    tuned = tmp_path / "tuned.safetensors"  # a dense source that records a fine-tuning of its own
    with safe_open(str(src), "pt") as fh:
        smeta = fh.metadata() or {}
    _save(_load(str(src)), str(tuned), metadata={**smeta, "fpe.finetune.settings": "{}"})
    again = tmp_path / "again.safetensors"
    assert run_cli(["expand", tuned, "--alpha", "2", "-o", again]).exit_code == 0
    with safe_open(str(again), "pt") as fh:
        assert not any(k.startswith("fpe.finetune.") for k in fh.metadata())
    doc = json.loads(run_cli(["verify", again, "--source", tuned, "--json"]).stdout)
    assert doc["ok"] and "weights equal the source's" in doc["checks"]


# ---------------------------------------------------------------- the fast checks against plain references

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fpe_cli.verify import _differ, all_finite  # noqa: E402


@settings(max_examples=80, deadline=None)
@given(n=st.integers(0, 3000), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       bad=st.lists(st.tuples(st.integers(0, 2999), st.sampled_from([float("nan"), float("inf"), float("-inf")])),
                    max_size=3), seed=st.integers(0, 2**31 - 1))
def test_all_finite_is_isfinite_all(n, dtype, bad, seed):
    """The extremes-based finiteness check against torch.isfinite(t).all(), NaN and +-Inf anywhere."""
    t = (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 1e3).to(dtype)
    for i, v in bad:
        if i < n:
            t[i] = v
    assert all_finite(t) == bool(torch.isfinite(t).all())


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_differ_counts_what_a_float64_loop_counts_on_the_support(seed, dtype):
    """Entries differing by more than one unit in the last place, among `where` only: against a loop."""
    g = torch.Generator().manual_seed(seed)
    want = torch.randn(7, 9, generator=g).to(dtype)
    have = want.clone()
    eps = torch.finfo(dtype).eps
    change = torch.rand(7, 9, generator=g)
    have[change < 0.2] = have[change < 0.2] * (1 + 8 * eps)  # a few units: differs
    have[change > 0.9] = torch.nextafter(have[change > 0.9].to(torch.float32), torch.tensor(float("inf"))).to(dtype) \
        if dtype == torch.float32 else have[change > 0.9]  # one float32 ulp: rounding, not a difference
    where = torch.rand(7, 9, generator=g) < 0.6
    got = _differ(have, want, where)
    for i in range(7):
        for j in range(9):
            h, w = float(have[i, j]), float(want[i, j])
            expect = bool(where[i, j]) and abs(h - w) > eps * max(abs(h), abs(w))
            assert bool(got[i, j]) == expect, (i, j, h, w)
