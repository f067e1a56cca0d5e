"""Multi-step workflows and round trips, the way a compression engineer chains `fpe` in a pipeline script.

Every file is read back by an oracle written from the README alone (safetensors + zlib, the packed
layout's strip decoding, masks applied, tied columns widened), never by fpe itself, and the numbers fpe
prints are compared with a plain float64 forward pass, plain counts of mask entries and plain
interference metrics.

The first part pins behaviour QA round 10 found wrong (each test says what fpe once did); the second
pins workflow properties that no other test file chains together (re-expansion chains, convert/finetune
commuting, plans across layouts, every stage through evaluate and analyze against the oracle).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_error_line, run_cli
from safetensors import safe_open
from safetensors.torch import load_file

F = torch.nn.functional


# ---------------------------------------------------------------- CLI and file helpers


def ok(*args) -> dict:
    """`fpe ARGS --json` in-process; fail with its output unless it exits 0."""
    res = run_cli([*map(str, args), "--json"])
    assert res.exit_code == 0, (args, res.exit_code, res.stdout[-500:], res.stderr[-800:], res.exception)
    return res.json()


def meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as fh:
        return dict(fh.metadata() or {})


def meta_json(path: Path, key: str):
    m = meta(path)
    return json.loads(m[key]) if key in m else None


def decode_zmask(blob: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The README's recipe: 4-row strips, read column by column, little-endian bits, zlib."""
    strips = -(-rows // 4)
    bits = np.unpackbits(np.frombuffer(zlib.decompress(blob.numpy().tobytes()), np.uint8), bitorder="little")
    mask = bits[: strips * 4 * cols].reshape(strips, cols, 4).transpose(0, 2, 1).reshape(-1, cols)[:rows]
    return torch.from_numpy(mask.astype(bool).copy())


def chain_keys(t: dict, m: dict) -> list[str]:
    if "fpe.layers" in m:
        return json.loads(m["fpe.layers"])
    keys = [k for k in t if k.endswith(".weight") and not k.startswith("fpe.")]
    return sorted(keys, key=lambda k: int(k.split(".")[0]))  # nn.Sequential names in these tests


def layers(path: Path) -> list[dict]:
    """Each layer of the chain: W (file dtype, widened, zeros off the mask), mask (bool), bias, children, tied."""
    t, m = load_file(str(path)), meta(path)
    out = []
    for k in chain_keys(t, m):
        tied = t.get(f"fpe.tied:{k}")
        if f"fpe.values:{k}" in t:
            rows, cols = t[f"fpe.shape:{k}"].tolist()
            mask = decode_zmask(t[f"fpe.zmask:{k}"], rows, cols)
            w = torch.zeros(rows, cols, dtype=t[f"fpe.values:{k}"].dtype)
            w[mask] = t[f"fpe.values:{k}"]
            if tied is not None:  # packed tied: one column per parent
                w = torch.repeat_interleave(w, tied.long(), dim=1)
                mask = torch.repeat_interleave(mask, tied.long(), dim=1)
        else:
            w = t[k]
            mask = t.get(f"fpe.mask:{k}")
        out.append({"key": k, "W": w, "mask": mask, "bias": t.get(k[: -len("weight")] + "bias"),
                    "children": t.get(f"fpe.children:{k}"), "tied": tied})
    return out


def effective(layer: dict) -> torch.Tensor:
    w = layer["W"].double()
    return w * layer["mask"].double() if layer["mask"] is not None else w


ACT = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu, "sigmoid": torch.sigmoid}


def forward(path: Path, x) -> torch.Tensor:
    act = ACT[meta(path).get("fpe.activation", "relu")]
    h = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    ls = layers(path)
    for i, layer in enumerate(ls):
        h = h @ effective(layer).T + (layer["bias"].double() if layer["bias"] is not None else 0)
        if i < len(ls) - 1:
            h = act(h)
    return h


def oracle_eval(path: Path, npz: Path) -> dict:
    d = np.load(npz)
    out = {}
    for split in ("train", "test"):
        logits = forward(path, d[f"x_{split}"])
        y = torch.as_tensor(d[f"y_{split}"]).long()
        out[split] = {"accuracy": float((logits.argmax(1) == y).double().mean()),
                      "loss": float(F.cross_entropy(logits, y))}
    return out


def weights_count(path: Path) -> int:
    """Mask entries (tied copies once), or non-zeros where there is no mask."""
    total = 0
    for layer in layers(path):
        mask = layer["mask"] if layer["mask"] is not None else layer["W"] != 0
        if layer["tied"] is not None:
            starts = torch.cumsum(layer["tied"].long(), 0) - layer["tied"].long()
            mask = mask[:, starts]
        total += int(mask.sum())
    return total


def same_tensors(a: Path, b: Path) -> list[str]:
    """Names whose tensors differ (or exist in one file only)."""
    x, y = load_file(str(a)), load_file(str(b))
    return sorted(set(x) ^ set(y)) + sorted(k for k in set(x) & set(y) if x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k]))


def write_npz(path: Path, d=12, classes=4, n_train=240, n_test=90, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n_train + n_test, d)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(d, classes)) + 0.3 * rng.normal(size=(len(x), classes)), axis=1)
    np.savez(path, x_train=x[:n_train], y_train=y[:n_train], x_test=x[n_train:], y_test=y[n_train:],
             num_classes=np.int64(classes))
    return path


# ---------------------------------------------------------------- a small trained pipeline, built once per module


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """data -> train (one and three hidden layers) -> expand -> finetune, the files every test starts from."""
    root = tmp_path_factory.mktemp("workflow")
    f = {"root": root, "data": write_npz(root / "data.npz")}
    f["dense"] = root / "dense.safetensors"
    ok("train", "--data", f["data"], "--hidden", "8", "--epochs", "4", "--lr", "0.01", "--seed", "0", "-o", f["dense"])
    f["deep"] = root / "deep.safetensors"
    ok("train", "--data", f["data"], "--hidden", "10,8,6", "--epochs", "4", "--lr", "0.01", "--seed", "1", "-o", f["deep"])
    f["e4"] = root / "e4.safetensors"
    ok("expand", f["dense"], "--alpha", "4", "--seed", "0", "--probe-samples", "0", "-o", f["e4"])
    f["e4ft"] = root / "e4ft.safetensors"
    ok("finetune", f["e4"], "--data", f["data"], "--epochs", "3", "--lr", "0.01", "--seed", "0", "-o", f["e4ft"])
    return f


def fresh(work, tmp_path, name) -> Path:
    """A copy of a module file in this test's directory (tests never write beside the shared files)."""
    dst = tmp_path / Path(work[name]).name
    dst.write_bytes(Path(work[name]).read_bytes())
    return dst


# ================================================================ found wrong in QA round 10, fixed


PLAN_CASES = {
    "expand-top": ["--alpha", "3", "--expand-top", "3"],
    "gram-clusters": ["--alpha", "2", "--split", "gram", "--clusters", "5"],
    "group-size": ["--alpha", "2", "--group-size", "2"],
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_reapplied_plan_reproduces_the_expansion_it_was_saved_from(work, tmp_path, case):
    """The options a plan fixes are refused beside --plan because they would be recorded as if they had
    produced its split; applying the saved plan to the same model records the settings that did produce it
    (the plan carries them), so it gives the same file. It once recorded expand_top null / default_split
    random / clusters null / group_size null."""
    deep = fresh(work, tmp_path, "deep")
    a, b, plan = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "plan.safetensors"
    ok("expand", deep, *PLAN_CASES[case], "--seed", "2", "--save-plan", plan, "--probe-samples", "0", "-o", a)
    ok("expand", deep, "--plan", plan, "--probe-samples", "0", "-o", b)
    assert same_tensors(a, b) == []
    assert meta_json(b, "fpe.settings") == meta_json(a, "fpe.settings")
    assert meta_json(b, "fpe.recipe") == meta_json(a, "fpe.recipe")
    assert b.read_bytes() == a.read_bytes()


def test_reapplied_activation_plan_records_the_activation_split(work, tmp_path):
    """The re-applied activation plan records the activation split (it once said default_split 'random')."""
    deep = fresh(work, tmp_path, "deep")
    a, b, plan = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "plan.safetensors"
    ok("expand", deep, "--alpha", "2", "--split", "activation", "--data", work["data"], "--seed", "2", "--save-plan", plan,
       "--probe-samples", "0", "-o", a)
    ok("expand", deep, "--plan", plan, "--probe-samples", "0", "-o", b)
    assert same_tensors(a, b) == []
    assert meta_json(b, "fpe.settings")["default_split"] == "activation"
    assert {t["split"] for t in meta_json(b, "fpe.recipe")["targets"]} == {"activation"}


def test_plan_made_with_group_size_finetunes_like_the_expansion_it_was_saved_from(work, tmp_path):
    """finetune picks FPELinear's grouped kernel from the recorded group_size: the re-applied plan, which
    once recorded group_size null and so trained through the dense kernel (other float rounding), gives the
    same fine-tuned weights as the expansion the plan was saved from."""
    deep = fresh(work, tmp_path, "deep")
    a, b, plan = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "plan.safetensors"
    ok("expand", deep, "--alpha", "2", "--group-size", "2", "--seed", "3", "--save-plan", plan, "--probe-samples", "0", "-o", a)
    ok("expand", deep, "--plan", plan, "--probe-samples", "0", "-o", b)
    assert same_tensors(a, b) == []
    args = ["--data", work["data"], "--epochs", "3", "--lr", "0.01", "--seed", "4"]
    ok("finetune", a, *args, "-o", tmp_path / "a.ft.safetensors")
    ok("finetune", b, *args, "-o", tmp_path / "b.ft.safetensors")
    assert same_tensors(tmp_path / "a.ft.safetensors", tmp_path / "b.ft.safetensors") == []


def test_a_recipe_targets_split_beside_a_plan_is_refused_like_the_flag(work, tmp_path):
    """`--split gram` and a recipe's top-level `split: gram` beside --plan are refused (exit 2); so is the same
    request as a per-target `split:`, once silently dropped (exit 0, the plan's random split)."""
    dense = fresh(work, tmp_path, "dense")
    plan = tmp_path / "plan.safetensors"
    ok("expand", dense, "--alpha", "4", "--seed", "5", "--save-plan", plan, "--probe-samples", "0", "-o", tmp_path / "a.safetensors")
    assert_one_error_line(run_cli(["expand", dense, "--plan", plan, "--split", "gram", "-o", tmp_path / "b.safetensors"]), "split")
    (tmp_path / "top.yaml").write_text("split: gram\n")
    assert_one_error_line(run_cli(["expand", dense, "--plan", plan, "--recipe", tmp_path / "top.yaml",
                                   "-o", tmp_path / "b.safetensors"]), "split")
    (tmp_path / "per.yaml").write_text('targets:\n  - match: "0"\n    split: gram\n')
    res = run_cli(["expand", dense, "--plan", plan, "--recipe", tmp_path / "per.yaml", "--probe-samples", "0",
                   "-o", tmp_path / "b.safetensors"])
    assert_one_error_line(res, "split")
    assert not (tmp_path / "b.safetensors").exists()


def test_a_recipe_targets_expand_top_beside_a_plan_is_refused(work, tmp_path):
    """A recipe target's own `expand_top:` beside --plan would be dropped (the plan fixes which parents split),
    like its `split:`; refused, nothing written."""
    dense = fresh(work, tmp_path, "dense")
    plan = tmp_path / "plan.safetensors"
    ok("expand", dense, "--alpha", "4", "--save-plan", plan, "--probe-samples", "0", "-o", tmp_path / "a.safetensors")
    (tmp_path / "per.yaml").write_text('targets:\n  - match: "0"\n    expand_top: 2\n')
    assert_one_error_line(run_cli(["expand", dense, "--plan", plan, "--recipe", tmp_path / "per.yaml",
                                   "-o", tmp_path / "b.safetensors"]), "--expand-top", "--plan")
    assert not (tmp_path / "b.safetensors").exists()


def _rewrite_plan(plan: Path, edit) -> None:
    from safetensors.torch import save_file as st_save
    tensors, m = load_file(str(plan)), meta(plan)
    info = json.loads(m["fpe.plan"])
    edit(info)
    m["fpe.plan"] = json.dumps(info)
    st_save(tensors, str(plan), metadata=m)


def test_a_plan_written_before_settings_were_recorded_still_applies(work, tmp_path):
    """Plans from earlier fpe versions record no settings: the layers' own split is taken (the output says
    gram), and one without a split at all (read as 'unknown') falls back to the default; both apply and give
    the plan's tensors."""
    dense = fresh(work, tmp_path, "dense")
    a, plan = tmp_path / "a.safetensors", tmp_path / "plan.safetensors"
    ok("expand", dense, "--alpha", "2", "--split", "gram", "--save-plan", plan, "--probe-samples", "0", "-o", a)
    _rewrite_plan(plan, lambda info: info.pop("settings"))
    ok("expand", dense, "--plan", plan, "--probe-samples", "0", "-o", tmp_path / "b.safetensors")
    assert same_tensors(a, tmp_path / "b.safetensors") == []
    assert meta_json(tmp_path / "b.safetensors", "fpe.settings")["default_split"] == "gram"
    _rewrite_plan(plan, lambda info: [layer.pop("split") for layer in info["layers"]])
    ok("expand", dense, "--plan", plan, "--probe-samples", "0", "-o", tmp_path / "c.safetensors")
    assert same_tensors(a, tmp_path / "c.safetensors") == []
    assert meta_json(tmp_path / "c.safetensors", "fpe.settings")["default_split"] == "random"


@pytest.mark.parametrize("settings, needle", [("abc", "settings must map"), ({"colour": 1}, "settings must map"),
                                              ({"group_size": -3}, "recorded settings are malformed"),
                                              ({"split": "magic"}, "recorded settings are malformed")])
def test_a_plan_with_malformed_settings_is_refused(work, tmp_path, settings, needle):
    dense = fresh(work, tmp_path, "dense")
    plan = tmp_path / "plan.safetensors"
    ok("expand", dense, "--alpha", "2", "--save-plan", plan, "--probe-samples", "0", "-o", tmp_path / "a.safetensors")
    _rewrite_plan(plan, lambda info: info.update(settings=settings))
    assert_one_error_line(run_cli(["expand", dense, "--plan", plan, "-o", tmp_path / "b.safetensors"]), needle)
    assert not (tmp_path / "b.safetensors").exists()


def interrupted_state(tmp_path, monkeypatch, model: Path, data: Path, *opt) -> Path:
    """Ctrl-C during the third epoch of `fpe finetune --checkpoint-every 1`: its resume state stays behind."""
    from fpe_cli import train as train_mod

    real, calls = train_mod._epoch, []

    def dying_epoch(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(train_mod, "_epoch", dying_epoch)
    out = tmp_path / "run.safetensors"
    res = run_cli(["finetune", model, "--data", data, "--epochs", "6", "--checkpoint-every", "1", *opt, "-o", out])
    monkeypatch.setattr(train_mod, "_epoch", real)
    assert res.exit_code == 130 and not out.exists()
    state = tmp_path / "run.resume.safetensors"
    assert state.exists() and meta(state)["fpe.kind"] == "resume-state"
    return state


READERS = {
    "inspect": lambda m, t, d: ["inspect", m],
    "params": lambda m, t, d: ["params", m],
    "verify": lambda m, t, d: ["verify", m],
    "analyze": lambda m, t, d: ["analyze", m],
    "evaluate": lambda m, t, d: ["evaluate", m, "--data", d],
    "convert": lambda m, t, d: ["convert", m, "--layout", "dense", "-o", t / "x.safetensors"],
    "expand": lambda m, t, d: ["expand", m, "--alpha", "2", "--probe-samples", "0", "-o", t / "x.safetensors"],
    "finetune": lambda m, t, d: ["finetune", m, "--data", d, "--epochs", "1", "-o", t / "x.safetensors"],
}


@pytest.mark.parametrize("optimizer", [["--optimizer", "sgd", "--momentum", "0"], ["--optimizer", "adam"]],
                         ids=["sgd-no-momentum", "adam"])
def test_a_resume_state_given_as_the_model_is_refused_as_such(work, tmp_path, monkeypatch, optimizer):
    """A resume state (fpe.kind=resume-state) is not a model. With SGD without momentum it holds nothing but
    model.weights.N/model.biases.N and every command once took it for a plain MLP: no masks (finetune then
    trained every off-mask weight), no lineage, and relu whatever the run used (evaluate printed another
    network's accuracy); with Adam the error blamed a chain that does not fit. Every command refuses it in
    one line that says it is a resume state."""
    tanh = tmp_path / "tanh.safetensors"
    ok("train", "--data", work["data"], "--hidden", "8", "--epochs", "1", "--activation", "tanh", "-o", tanh)
    wide = tmp_path / "tanh.fpe2.safetensors"
    ok("expand", tanh, "--alpha", "2", "--probe-samples", "0", "-o", wide)
    state = interrupted_state(tmp_path, monkeypatch, wide, work["data"], *optimizer)
    before = state.read_bytes()
    for name, build in READERS.items():
        res = run_cli(build(state, tmp_path, work["data"]))
        assert_one_error_line(res, "resume state")
        assert not (tmp_path / "x.safetensors").exists(), name
    assert state.read_bytes() == before


def test_a_split_plan_given_as_the_model_is_refused_as_such(work, tmp_path):
    """A plan (fpe.kind=plan) given where a model belongs once got 'weights must be floating point ... a
    quantized checkpoint?' (one hidden layer) or 'the 2-D weights do not chain' (deeper): advice that sent
    the user after the wrong problem. It is named as a split plan."""
    for model in ("dense", "deep"):
        src = fresh(work, tmp_path, model)
        plan = tmp_path / f"{model}.plan.safetensors"
        ok("expand", src, "--alpha", "2", "--save-plan", plan, "--probe-samples", "0", "-o", tmp_path / f"{model}.e.safetensors")
        for name, build in READERS.items():
            line = assert_one_error_line(run_cli(build(plan, tmp_path, work["data"])), "plan")
            assert "quantized" not in line and "do not chain" not in line, (name, line)


@pytest.mark.parametrize("via", ["packed", "dense"])
def test_a_plain_file_converted_to_a_masked_layout_converts_back_to_plain(work, tmp_path, via):
    """`convert` is lossless: plain -> packed/dense and back gives plain again with the original tensors (the
    way back was refused, 'the plain layout cannot store masks', although the file is not expanded and its
    masks are exactly its non-zero pattern)."""
    dense = fresh(work, tmp_path, "dense")
    mid, back = tmp_path / "mid.safetensors", tmp_path / "back.safetensors"
    ok("convert", dense, "--layout", via, "-o", mid)
    ok("convert", mid, "--layout", "plain", "-o", back)
    assert same_tensors(dense, back) == []


def test_a_fresh_expansion_does_not_present_its_sources_training_record_as_its_own(work, tmp_path):
    """expand drops the source's fpe.finetune.* because it describes the source, not the untrained expansion;
    it once kept fpe.train.*, so the expanded file claimed the dense model's hidden widths and test accuracy.
    Each file's records are its own: the source's training record, none on the fresh expansion, and the
    fine-tuned file's record of its own accuracy."""
    dense, e4, e4ft = work["dense"], work["e4"], work["e4ft"]
    assert meta_json(dense, "fpe.train.settings")["hidden"] == ok("inspect", dense)["widths"][1:-1]
    assert not [k for k in meta(e4) if k.startswith(("fpe.train.", "fpe.finetune."))]
    own = ok("evaluate", e4ft, "--data", work["data"])["models"][0]["test"]["accuracy"]
    assert meta_json(e4ft, "fpe.finetune.metrics")["test"]["accuracy"] == pytest.approx(own, abs=1e-12)
    assert not [k for k in meta(e4ft) if k.startswith("fpe.train.")]


def test_convert_takes_quiet_like_every_other_command_that_writes(work, tmp_path):
    """data/train/expand/finetune/analyze take -q/--quiet, and so does convert (which prints a 'wrote ...'
    line on stderr; it once refused -q as an unknown option)."""
    res = run_cli(["convert", work["e4"], "--layout", "dense", "-o", tmp_path / "d.safetensors", "-q"])
    assert res.exit_code == 0, res.stderr
    assert res.stderr == ""
    assert same_tensors(work["e4"], tmp_path / "d.safetensors") != []  # it did convert


# ================================================================ workflows that behave well (regression guards)


def test_train_expand_finetune_verify_convert_evaluate_params_chain(work, tmp_path):
    """The README's chain, every file read back by every next command, numbers against the oracle."""
    dense, e4, ft = work["dense"], work["e4"], work["e4ft"]
    assert ok("verify", ft, "--source", dense)["ok"]
    d, p = tmp_path / "ft.dense.safetensors", tmp_path / "ft.packed.safetensors"
    ok("convert", ft, "--layout", "dense", "-o", d)
    ok("convert", d, "--layout", "packed", "-o", p)
    assert p.read_bytes() == Path(ft).read_bytes()  # packed -> dense -> packed: the same bytes
    assert same_tensors(d, tmp_path / "ft.dense.safetensors") == []
    for f in (d, p):
        assert ok("verify", f, "--source", dense)["ok"]
    budget = meta_json(e4, "fpe.budget")["weights"]
    assert budget == weights_count(dense)
    doc = ok("evaluate", dense, e4, ft, d, p, "--data", work["data"])
    for row in doc["models"]:
        want = oracle_eval(Path(row["model"]), work["data"])
        for split in ("train", "test"):
            assert row[split]["accuracy"] == pytest.approx(want[split]["accuracy"], abs=1e-12), (row["model"], split)
            assert row[split]["loss"] == pytest.approx(want[split]["loss"], rel=1e-5), (row["model"], split)
        assert row["weights"] == weights_count(Path(row["model"])) == budget
    for f in (e4, ft, d, p):
        par = ok("params", f)
        assert par["total"]["weights"] == weights_count(f) == budget and par["budget_holds"]
    # fine-tuning kept every mask: same support, nothing off it
    for before, after in zip(layers(e4), layers(ft)):
        assert torch.equal(before["mask"], after["mask"])
        assert not (after["W"][~after["mask"]] != 0).any()


def check_expansion(src: Path, out: Path, outgoing: str = "copy") -> None:
    """Oracle for one expansion step (also of an fpe file, whose masks define its edges): every kept weight is
    its parent's (copied column, or its 1/children share in the file's dtype), siblings own disjoint edges,
    the kept weights are exactly the largest |w| of the widened multiset, and they number the budget."""
    widened, kept, prev = [], [], None
    for s, e in zip(layers(src), layers(out)):
        ms = s["mask"] if s["mask"] is not None else s["W"] != 0
        me = e["mask"] if e["mask"] is not None else e["W"] != 0
        ch = e["children"].long() if e["children"] is not None else torch.ones(s["W"].shape[0], dtype=torch.long)
        cc = prev if prev is not None else torch.ones(s["W"].shape[1], dtype=torch.long)
        base = s["W"] if not (outgoing == "split" and prev is not None) else s["W"] / cc.to(s["W"].dtype)[None, :]
        base = base.double() * ms
        rows = torch.repeat_interleave(torch.arange(base.shape[0]), ch)
        parent = base[rows].repeat_interleave(cc, dim=1)
        pmask = ms[rows].repeat_interleave(cc, dim=1)
        assert not (me & ~pmask).any(), f"{e['key']}: an edge its parent does not have"
        assert torch.equal(e["W"].double()[me], parent[me]), f"{e['key']}: a weight that is not its parent's"
        if e["children"] is not None:
            for p in range(base.shape[0]):
                assert (me[rows == p].long().sum(0) <= 1).all(), f"{e['key']}: parent {p} edge in two children"
            widened.append(base.abs().repeat_interleave(cc, dim=1)[ms.repeat_interleave(cc, dim=1)])
        else:
            widened.append(parent.abs()[pmask])
        kept.append(e["W"].double().abs()[me])
        prev = ch
    w, k = torch.cat(widened).sort().values, torch.cat(kept).sort().values
    assert k.numel() == meta_json(out, "fpe.budget")["weights"]
    assert torch.equal(w[w.numel() - k.numel():], k), "kept weights are not the largest of the widened set"


def test_reexpansion_chain_on_a_deep_model_stays_truthful_and_locked(work, tmp_path):
    """deep -> expand layer 2 -> finetune -> expand layers 0 and 4 at alpha 3 -> finetune: each step checks
    against the file it came from (not the original), masks stay locked, budget and lineage stay truthful."""
    deep = fresh(work, tmp_path, "deep")
    a, aft, b, bft = (tmp_path / n for n in ("a.safetensors", "a.ft.safetensors", "b.safetensors", "b.ft.safetensors"))
    ok("expand", deep, "--alpha", "2", "--targets", "2", "--seed", "3", "--probe-samples", "0", "-o", a)
    check_expansion(deep, a)
    ok("finetune", a, "--data", work["data"], "--epochs", "2", "--lr", "0.01", "-o", aft)
    ok("expand", aft, "--alpha", "3", "--targets", "0,4", "--seed", "4", "--probe-samples", "0", "-o", b)
    check_expansion(aft, b)
    assert meta(b)["fpe.source_sha256"] == ok("inspect", aft)["sha256"]
    assert meta_json(b, "fpe.budget")["weights"] == weights_count(aft) == weights_count(deep)
    assert not any(k.startswith("fpe.finetune.") for k in meta(b))  # b's weights are untrained
    assert [t["weight"] for t in meta_json(b, "fpe.recipe")["targets"]] == ["0.weight", "4.weight"]
    children = [l["children"] for l in layers(b)]
    assert children[1] is None and children[3] is None  # lineage only for the layers this step split
    assert children[0].tolist() == [3] * 10 and children[2].tolist() == [3] * 6
    v = ok("verify", b, "--source", aft)
    assert "weights equal the source's" in v["checks"]
    res = run_cli(["verify", b, "--source", deep])
    assert res.exit_code == 3 and "sha256" in res.stderr and "Traceback" not in res.stderr
    ok("finetune", b, "--data", work["data"], "--epochs", "2", "--lr", "0.01", "-o", bft)
    assert ok("verify", bft, "--source", aft)["ok"]
    for before, after in zip(layers(b), layers(bft)):
        assert torch.equal(before["mask"], after["mask"]), before["key"]
        assert not (after["W"][~after["mask"]] != 0).any(), before["key"]
    assert ok("params", bft)["total"]["weights"] == weights_count(bft) == weights_count(deep)


@pytest.mark.parametrize("outgoing", ["copy", "split", "tie"])
def test_finetune_and_convert_commute(work, tmp_path, outgoing):
    """finetune(convert(x)) and convert(finetune(x)) hold the same tensors, for every outgoing rule."""
    deep = fresh(work, tmp_path, "deep")
    e = tmp_path / "e.safetensors"
    ok("expand", deep, "--alpha", "2", "--outgoing", outgoing, "--seed", "1", "--probe-samples", "0", "-o", e)
    if outgoing == "split":
        check_expansion(deep, e, "split")
    args = ["--data", work["data"], "--epochs", "2", "--lr", "0.01", "--seed", "2"]
    ok("finetune", e, *args, "-o", tmp_path / "ft.safetensors")
    ok("convert", tmp_path / "ft.safetensors", "--layout", "dense", "-o", tmp_path / "ft.d.safetensors")
    ok("convert", e, "--layout", "dense", "-o", tmp_path / "d.safetensors")
    ok("finetune", tmp_path / "d.safetensors", *args, "-o", tmp_path / "d.ft.safetensors")
    assert same_tensors(tmp_path / "ft.d.safetensors", tmp_path / "d.ft.safetensors") == []
    ok("convert", tmp_path / "d.ft.safetensors", "--layout", "packed", "-o", tmp_path / "d.ft.p.safetensors")
    assert same_tensors(tmp_path / "ft.safetensors", tmp_path / "d.ft.p.safetensors") == []
    assert ok("verify", tmp_path / "d.ft.p.safetensors", "--source", deep)["ok"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_a_low_or_high_precision_source_keeps_its_dtype_through_the_pipeline(work, tmp_path, dtype):
    """expand -> finetune (float32 master weights, cast back) -> convert both ways: the dtype stays, the
    expansion oracle holds in the file's dtype, evaluate and the recorded metrics equal the oracle."""
    from safetensors.torch import save_file

    src = tmp_path / "src.safetensors"
    save_file({k: v.to(dtype) for k, v in load_file(str(work["deep"])).items()}, str(src))
    e, ft, d, p = (tmp_path / n for n in ("e.safetensors", "ft.safetensors", "d.safetensors", "p.safetensors"))
    ok("expand", src, "--alpha", "3", "--outgoing", "split", "--seed", "1", "--probe-samples", "0", "-o", e)
    check_expansion(src, e, "split")
    assert ok("verify", e, "--source", src)["ok"]
    doc = ok("finetune", e, "--data", work["data"], "--epochs", "2", "--lr", "0.01", "-o", ft)
    ok("convert", ft, "--layout", "dense", "-o", d)
    ok("convert", d, "--layout", "packed", "-o", p)
    assert p.read_bytes() == ft.read_bytes()
    for f in (e, ft, d):
        assert {str(l["W"].dtype) for l in layers(f)} == {str(dtype)}
        assert {c["dtype"] for c in ok("inspect", f)["chain"]} == {str(dtype).replace("torch.", "")}
    want = oracle_eval(ft, work["data"])
    assert doc["test"]["accuracy"] == pytest.approx(want["test"]["accuracy"], abs=1e-12)  # measured on the cast weights
    assert meta_json(ft, "fpe.finetune.metrics")["test"]["accuracy"] == pytest.approx(want["test"]["accuracy"], abs=1e-12)
    rows = ok("evaluate", src, e, ft, d, "--data", work["data"])["models"]
    for row in rows:
        want = oracle_eval(Path(row["model"]), work["data"])
        assert row["test"]["accuracy"] == pytest.approx(want["test"]["accuracy"], abs=1e-12), row["model"]
        assert row["test"]["loss"] == pytest.approx(want["test"]["loss"], rel=1e-4), row["model"]


def test_a_plan_saved_on_a_packed_file_applies_to_its_dense_conversion(work, tmp_path):
    """Re-expanding a fine-tuned expansion: the plan saved on the packed file, applied to the same file in
    the dense layout, gives the same tensors as expanding the dense file with the same seed."""
    ft = fresh(work, tmp_path, "e4ft")
    d = tmp_path / "ft.dense.safetensors"
    ok("convert", ft, "--layout", "dense", "-o", d)
    plan = tmp_path / "plan.safetensors"
    # e4's children have 1+ edges after pruning: split only the neurons with the most input features
    ok("expand", ft, "--alpha", "2", "--expand-top", "8", "--seed", "9", "--save-plan", plan, "--probe-samples", "0",
       "-o", tmp_path / "r1.safetensors")
    ok("expand", d, "--plan", plan, "--probe-samples", "0", "-o", tmp_path / "r2.safetensors")
    assert same_tensors(tmp_path / "r1.safetensors", tmp_path / "r2.safetensors") == []
    check_expansion(ft, tmp_path / "r1.safetensors")
    assert ok("verify", tmp_path / "r2.safetensors", "--source", d)["ok"]


def test_one_evaluate_over_every_kind_of_file_matches_the_oracle(work, tmp_path):
    """dense, expanded, fine-tuned, tied (packed and dense), split, expand-top, re-expanded: one evaluate call."""
    deep = fresh(work, tmp_path, "deep")
    files = [deep, work["e4"], work["e4ft"]]
    for name, args in {"tie": ["--outgoing", "tie"], "split": ["--outgoing", "split"], "top": ["--expand-top", "3"]}.items():
        out = tmp_path / f"{name}.safetensors"
        ok("expand", deep, "--alpha", "3", *args, "--seed", "6", "--probe-samples", "0", "-o", out)
        files.append(out)
    ok("convert", tmp_path / "tie.safetensors", "--layout", "dense", "-o", tmp_path / "tie.d.safetensors")
    ok("expand", work["e4ft"], "--alpha", "2", "--expand-top", "4", "--probe-samples", "0", "-o", tmp_path / "re.safetensors")
    files += [tmp_path / "tie.d.safetensors", tmp_path / "re.safetensors"]
    doc = ok("evaluate", *files, "--data", work["data"])
    assert [Path(r["model"]) for r in doc["models"]] == [Path(f) for f in files]
    for row in doc["models"]:
        want = oracle_eval(Path(row["model"]), work["data"])
        for split in ("train", "test"):
            assert row[split]["accuracy"] == pytest.approx(want[split]["accuracy"], abs=1e-12), (row["model"], split)
            assert row[split]["loss"] == pytest.approx(want[split]["loss"], rel=1e-5), (row["model"], split)
        assert row["weights"] == weights_count(Path(row["model"])), row["model"]


def _entropy_exp(p: np.ndarray) -> np.ndarray:
    tot = p.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = p / tot
        h = -np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0).sum(1)
    out = np.exp(h)
    out[tot[:, 0] == 0] = np.nan
    return out


def oracle_analyze(path: Path, npz: Path) -> list[dict]:
    d = np.load(npz)
    x, y = torch.tensor(d["x_test"], dtype=torch.float64), d["y_test"]
    act = ACT[meta(path).get("fpe.activation", "relu")]
    out, h = [], x
    ls = layers(path)
    for layer in ls[:-1]:
        w = effective(layer)
        wn = w.numpy()
        g = wn.T @ wn
        diag, den = np.diag(g), (g * g).sum(1)
        cap = np.where(diag > 0, diag ** 2 / np.where(den > 0, den, 1), np.nan)
        cap = cap[~np.isnan(cap)]
        norms = np.linalg.norm(wn, axis=1)
        keep = norms > 0
        u = wn[keep] / norms[keep, None]
        iu = np.triu_indices(u.shape[0], 1)
        s = np.abs(u @ u.T)[iu]
        m = {"capacity_mean": cap.mean(), "capacity_sum": cap.sum(), "capacity_median": np.median(cap),
             "capacity_fraction_below_half": (cap < 0.5).mean(), "cosine_mean_abs": s.mean()}
        if layer["children"] is not None:
            par = np.repeat(np.arange(len(layer["children"])), layer["children"].numpy())[keep]
            m["cosine_mean_abs_non_sibling"] = s[par[iu[0]] != par[iu[1]]].mean()
        poly = _entropy_exp(wn ** 2)
        m.update(polysemanticity_mean=np.nanmean(poly), polysemanticity_median=np.nanmedian(poly))
        h = act(h @ w.T + (layer["bias"].double() if layer["bias"] is not None else 0))
        a = h.numpy()
        means = np.stack([a[y == c].mean(0) for c in sorted(set(y.tolist()))])
        m.update(class_selectivity_mean=np.nanmean(_entropy_exp(np.abs(means).T)),
                 dead_fraction=((a > 0).sum(0) == 0).mean(), activation_density=(a > 0).mean())
        out.append(m)
    return out


def test_analyze_at_every_stage_of_a_chain_matches_the_oracle(work, tmp_path):
    """analyze --data on the dense model, its expansion, the fine-tuned file, its dense conversion, a tied
    re-expansion of it and a fine-tuned deep re-expansion: every summary metric against the oracle, plus the
    CSV's parent column against the lineage."""
    tie = tmp_path / "tie.safetensors"
    ok("expand", work["e4ft"], "--alpha", "2", "--expand-top", "4", "--outgoing", "tie", "--probe-samples", "0", "-o", tie)
    d = tmp_path / "ft.d.safetensors"
    ok("convert", work["e4ft"], "--layout", "dense", "-o", d)
    deep2 = tmp_path / "deep2.safetensors"
    ok("expand", work["deep"], "--alpha", "2", "--targets", "2,4", "--probe-samples", "0", "-o", deep2)
    for f in (work["dense"], work["e4"], work["e4ft"], d, tie, deep2):
        csv = tmp_path / f"{Path(f).stem}.csv"
        doc = ok("analyze", f, "--data", work["data"], "--csv", csv)
        for got, want in zip(doc["models"][0]["layers"], oracle_analyze(Path(f), work["data"])):
            for k, v in want.items():
                assert got["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-9), (f, got["layer"], k)
        rows = [line.split(",") for line in csv.read_text().splitlines()[1:]]
        for layer in layers(Path(f))[:-1]:
            parents = [r[4] for r in rows if r[2] == layer["key"]]
            if layer["children"] is None:
                assert set(parents) == {""}
            else:
                want = np.repeat(np.arange(len(layer["children"])), layer["children"].numpy()).tolist()
                assert parents == [str(p) for p in want], (f, layer["key"])


def test_multilabel_clause_pipeline_keeps_every_clause_in_one_child_through_reexpansion(tmp_path):
    """dnf data with clause labels and its clause map -> train -> clause split -> finetune -> clause split again:
    at both steps each parent's clause inputs stay in one child; evaluate's multi-label numbers equal the oracle."""
    spec = "dnf:vars=24,clauses=6,k=3,outputs=clauses,train=400,test=150,seed=1"
    data, cmap = tmp_path / "ml.npz", tmp_path / "clauses.json"
    ok("data", spec, "-o", data, "--clause-map", cmap)
    m, c, cft, cc = (tmp_path / n for n in ("m.safetensors", "c.safetensors", "cft.safetensors", "cc.safetensors"))
    ok("train", "--data", data, "--hidden", "6", "--epochs", "3", "--lr", "0.01", "-o", m)
    ok("expand", m, "--alpha", "2", "--split", "clause", "--clause-map", cmap, "--probe-samples", "0", "-o", c)
    ok("finetune", c, "--data", data, "--epochs", "2", "--lr", "0.01", "-o", cft)
    ok("expand", cft, "--alpha", "2", "--split", "clause", "--clause-map", cmap, "--probe-samples", "0", "-o", cc)
    assert ok("verify", cc, "--source", cft)["ok"]
    groups = json.loads(cmap.read_text())["groups"]
    for f in (c, cc):
        first = layers(f)[0]
        mask = first["mask"].numpy()
        par = np.repeat(np.arange(len(first["children"])), first["children"].numpy())
        for p in range(len(first["children"])):
            for g in groups:
                owners = {r for r in np.where(par == p)[0] for col in g if mask[r, col]}
                assert len(owners) <= 1, (f, p, g, owners)
    npz = np.load(data)
    for row in ok("evaluate", m, c, cft, cc, "--data", data)["models"]:
        logits = forward(Path(row["model"]), npz["x_test"])
        y = torch.as_tensor(npz["y_test"]).double()
        pred = (logits > 0).double()
        assert row["test"]["exact_match"] == pytest.approx(float((pred == y).all(1).double().mean()), abs=1e-12)
        assert row["test"]["per_label_accuracy"] == pytest.approx((pred == y).double().mean(0).tolist(), abs=1e-12)
        assert row["test"]["loss"] == pytest.approx(float(F.binary_cross_entropy_with_logits(logits, y)), rel=1e-5)
