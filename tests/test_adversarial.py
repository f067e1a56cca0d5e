"""Checkpoints, data sets and broken files written the way users' own code writes them (adversarial QA)."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn
from torch.nn.utils import prune

from conftest import assert_one_error_line, listing, run_cli


def _ok(args) -> dict | None:
    res = run_cli([*args, "--json"])
    assert res.exit_code == 0, res.stderr
    return json.loads(res.stdout)


def _chain(path) -> list[str]:
    return [c["weight"] for c in _ok(["inspect", path])["chain"]]


# ---------------------------------------------------------------- chains found from names and shapes


class ProjHead(nn.Module):
    """Word names whose alphabetical order (classifier, fc, proj) looks like (in, out) weights."""

    def __init__(self, h=16):
        super().__init__()
        self.proj, self.fc, self.classifier = nn.Linear(12, h), nn.Linear(h, 8), nn.Linear(8, 3)


class InHiddenOut(nn.Module):
    """input layer, a list of equal square hidden layers, output layer: shapes alone allow many orders."""

    def __init__(self, h=8, n=3):
        super().__init__()
        self.input_layer = nn.Linear(6, h)
        self.hidden = nn.ModuleList([nn.Linear(h, h) for _ in range(n)])
        self.output_layer = nn.Linear(h, 3)


def test_word_names_that_sort_like_transposed_weights_find_their_chain(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "m.safetensors"
    save_file(ProjHead().state_dict(), str(src))
    assert _chain(src) == ["proj.weight", "fc.weight", "classifier.weight"]
    out = tmp_path / "d.safetensors"
    doc = _ok(["expand", src, "--alpha", "2", "--layout", "dense", "-o", out])
    assert doc["hidden_widths_after"] == [32, 16] and doc["budget_holds"]
    wide = ProjHead(h=32)
    wide.fc = nn.Linear(32, 16)
    wide.classifier = nn.Linear(16, 3)
    wide.load_state_dict({k: v for k, v in load_file(str(out)).items() if not k.startswith("fpe.")})


def test_numbered_family_keeps_its_order_among_word_names(tmp_path):
    torch.manual_seed(0)
    for n in (3, 9):  # 9 hidden layers: 11 weights, more than an exhaustive search of orders allows
        src = tmp_path / f"m{n}.safetensors"
        save_file(InHiddenOut(n=n).state_dict(), str(src))
        assert _chain(src) == ["input_layer.weight", *[f"hidden.{i}.weight" for i in range(n)], "output_layer.weight"]


def test_equal_square_word_layers_follow_their_role_words_or_stay_ambiguous(tmp_path):
    """Several orders fit square shapes: names that say in -> mid -> out (whatever their alphabetical order)
    give the order; names without role words, or two layers with the same role, stay an error."""
    sd = {"c_in.weight": torch.randn(4, 4), "a_mid.weight": torch.randn(4, 4), "b_out.weight": torch.randn(4, 4)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    assert _chain(tmp_path / "m.safetensors") == ["c_in.weight", "a_mid.weight", "b_out.weight"]
    for names in (("alpha_proj", "beta_proj", "gamma_proj"), ("x_in", "y_in", "z_out")):
        save_file({f"{n}.weight": torch.randn(4, 4) for n in names}, str(tmp_path / "a.safetensors"))
        assert_one_error_line(run_cli(["inspect", tmp_path / "a.safetensors"]), "cannot tell the layer order",
                              "several orders fit", "--layers")


def test_keras_kernels_are_still_named_as_in_out(tmp_path):
    sd = {"dense.kernel": torch.randn(8, 10), "dense.bias": torch.randn(10), "dense_1.kernel": torch.randn(10, 3)}
    save_file(sd, str(tmp_path / "k.safetensors"))
    assert_one_error_line(run_cli(["params", tmp_path / "k.safetensors"]), "(in, out)")


def test_an_embedding_beside_the_mlp_gets_a_layers_suggestion(tmp_path):
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.fc1, self.fc2 = nn.Embedding(20, 8), nn.Linear(8, 12), nn.Linear(12, 4)

    save_file(Emb().state_dict(), str(tmp_path / "m.safetensors"))
    assert_one_error_line(run_cli(["inspect", tmp_path / "m.safetensors"]), "do not chain",
                          "--layers fc1.weight,fc2.weight")


def test_norm_inside_a_sequential_is_named_and_the_suggested_layers_work(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "m.safetensors"
    save_file(nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).state_dict(), str(src))
    line = assert_one_error_line(run_cli(["expand", src, "--alpha", "2"]), "normalization layer", "1.weight")
    assert line.endswith("--layers 0.weight,3.weight)")
    assert _ok(["expand", src, "--alpha", "2", "--layers", "0.weight,3.weight", "-o", tmp_path / "o.safetensors"])


# ---------------------------------------------------------------- layers torch saves under other names


class FC(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)


def test_tied_weight_from_save_model_is_not_silently_dropped(tmp_path):
    model = FC()
    model.fc2.weight = model.fc1.weight
    save_model(model, str(tmp_path / "tied.safetensors"))  # stores fc1.weight once; fc2.bias stays
    before = listing(tmp_path)
    for cmd in (["inspect"], ["params"], ["expand", "--alpha", "2"]):
        assert_one_error_line(run_cli([cmd[0], tmp_path / "tied.safetensors", *cmd[1:]]), "fc2.weight (= fc1.weight)",
                              "more than once", "save_model")
    assert listing(tmp_path) == before


def test_pruning_and_weight_norm_reparametrizations_get_a_fix(tmp_path):
    model = FC()
    prune.l1_unstructured(model.fc1, "weight", 0.5)
    save_file(model.state_dict(), str(tmp_path / "pruned.safetensors"))
    assert_one_error_line(run_cli(["params", tmp_path / "pruned.safetensors"]), "fc1.weight_orig", "prune.remove")
    model = FC()
    model.fc2 = torch.nn.utils.parametrizations.weight_norm(model.fc2)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "wn.safetensors"))
    assert_one_error_line(run_cli(["params", tmp_path / "wn.safetensors"]), "parametrization", "remove_parametrizations")


def test_single_linear_layer_says_so(tmp_path):
    save_file(nn.Linear(8, 3).state_dict(), str(tmp_path / "lin.safetensors"))
    assert_one_error_line(run_cli(["expand", tmp_path / "lin.safetensors", "--alpha", "2"]), "single linear layer",
                          "weight (3, 8)")


def test_unknown_layout_is_refused_before_expanding(tmp_path):
    save_file(FC().state_dict(), str(tmp_path / "m.safetensors"))
    assert_one_error_line(run_cli(["expand", tmp_path / "m.safetensors", "--alpha", "2", "--layout", "plain"]),
                          "unknown layout 'plain'", "packed, dense")


# ---------------------------------------------------------------- data sets as users write them


def _xy(n=30, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x, (x[:, 0] > 0)


def test_boolean_class_labels_are_classes_0_and_1(tmp_path, model6):
    x, y = _xy()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    doc = _ok(["evaluate", model6, "--data", tmp_path / "d.npz"])
    assert doc["data"]["outputs"] == 2 and not doc["data"]["multilabel"]


@pytest.mark.parametrize("name, writer, needles", [
    ("data.csv", lambda p, x, y: np.savetxt(p, np.c_[x, y], delimiter=","), ["text file (CSV?)", "np.savez"]),
    ("data.npz", lambda p, x, y: p.write_bytes(b""), ["empty file"]),
    ("x.npy", lambda p, x, y: np.save(p, x), ["single .npy array"]),
    ("big.npz", lambda p, x, y: np.savez(p, x_train=x, y_train=np.full(len(x), 2**40), x_test=x, y_test=y.astype(int)),
     ["label 1099511627776", "np.unique"]),
    ("f64.npz", lambda p, x, y: np.savez(p, x_train=x.astype(np.float64) * 1e300, y_train=y, x_test=x, y_test=y),
     ["exceed the float32 range"]),
])
def test_data_files_users_write_by_mistake(tmp_path, model6, name, writer, needles):
    x, y = _xy()
    writer(tmp_path / name, x, y)
    path = tmp_path / name if (tmp_path / name).exists() else tmp_path / (name + ".npy")
    before = listing(tmp_path)
    for cmd in (["evaluate", model6, "--data", path, "--json"], ["train", "--data", path, "--hidden", "4", "--json"]):
        assert_one_error_line(run_cli(cmd), *needles)
    assert listing(tmp_path) == before


def test_num_classes_saved_as_a_one_element_array(tmp_path, model6):
    x, y = _xy()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y.astype(int), x_test=x, y_test=y.astype(int), num_classes=np.array([3]))
    assert _ok(["evaluate", model6, "--data", tmp_path / "d.npz"])["data"]["outputs"] == 3


# ---------------------------------------------------------------- files that cannot be read, runs that fail


def test_unreadable_files_are_bad_input_not_internal_errors(tmp_path, model6, monkeypatch):
    x, y = _xy()
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)

    def denied(file, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(file))

    monkeypatch.setattr("fpe_cli.stfile.open", denied, raising=False)  # root ignores chmod 000
    assert_one_error_line(run_cli(["params", model6]), "m.safetensors: permission denied", "permissions")
    monkeypatch.undo()
    monkeypatch.setattr("fpe_cli.data.open", denied, raising=False)
    assert_one_error_line(run_cli(["evaluate", model6, "--data", tmp_path / "d.npz"]), "d.npz: permission denied")


def test_diverged_finetune_leaves_no_resume_state(tmp_path, model6):
    x, y = _xy(64)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    before = listing(tmp_path)
    args = ["--data", tmp_path / "d.npz", "--epochs", "2", "--lr", "1e38", "--optimizer", "sgd", "-o", tmp_path / "o.safetensors"]
    assert_one_error_line(run_cli(["finetune", model6, *args]), "diverged", code=3)
    assert listing(tmp_path) == before  # no OUT.resume.safetensors that would block the next run
    assert_one_error_line(run_cli(["finetune", model6, *args[:-2], "--checkpoint-every", "-1", "-o", tmp_path / "o.safetensors"]),
                          "--checkpoint-every must be >= 0")


def test_biases_beside_weights_n_and_2d_biases(tmp_path):
    g = np.random.default_rng(0)
    w1, w2 = g.normal(size=(8, 6)).astype(np.float32), g.normal(size=(3, 8)).astype(np.float32)
    b1, b2 = np.ones(8, np.float32), np.ones(3, np.float32)
    save_file({"weights.0": torch.from_numpy(w1), "biases.0": torch.from_numpy(b1), "weights.1": torch.from_numpy(w2),
               "biases.1": torch.from_numpy(b2)}, str(tmp_path / "wb.safetensors"))
    doc = _ok(["inspect", tmp_path / "wb.safetensors"])
    assert [(c["weight"], c["bias"]) for c in doc["chain"]] == [("weights.0", "biases.0"), ("weights.1", "biases.1")]
    assert doc["unused_tensors"] == []  # the biases were silently left out of the network before
    save_file({"W1": torch.from_numpy(w1), "b1": torch.from_numpy(b1[None]), "W2": torch.from_numpy(w2),
               "b2": torch.from_numpy(b2[None])}, str(tmp_path / "row.safetensors"))
    assert_one_error_line(run_cli(["params", tmp_path / "row.safetensors"]), "b1: a bias of shape (1, 8)", "reshape(-1)")


def test_fpe_data_never_overwrites_its_input_npz(tmp_path):
    x, y = _xy()
    np.savez(tmp_path / "d.npz", x_train=x.astype(np.float64), y_train=y, x_test=x, y_test=y)
    before = (tmp_path / "d.npz").read_bytes()
    assert_one_error_line(run_cli(["data", tmp_path / "d.npz", "-o", tmp_path / "d.npz", "--force"]), "is the input file")
    assert_one_error_line(run_cli(["data", "dnf:vars=8,clauses=2,k=3", "-o", tmp_path / "o.npz", "--clause-map",
                                   tmp_path / "o.npz"]), "o.npz")
    assert (tmp_path / "d.npz").read_bytes() == before and not (tmp_path / "o.npz").exists()


# ---------------------------------------------------------------- files that are not plain checkpoints


def _seq(tmp_path, name="m.safetensors", widths=(8, 10, 3)):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(widths[0], widths[1]), nn.ReLU(), nn.Linear(widths[1], widths[2]))
    save_file(m.state_dict(), str(tmp_path / name))
    return tmp_path / name, m


def test_a_fifo_is_refused_instead_of_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    import os

    os.mkfifo(fifo)
    assert_one_error_line(run_cli(["inspect", fifo]), "not a regular file", "save it to a file first")


def test_a_symlink_loop_is_named(tmp_path):
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    assert_one_error_line(run_cli(["params", loop]), "symbolic link")


def test_an_npz_given_as_a_model_is_named(tmp_path):
    np.savez(tmp_path / "d.npz", x_train=np.zeros((2, 3)))
    assert_one_error_line(run_cli(["params", tmp_path / "d.npz"]), ".npz archive", "--data")


def test_a_safetensors_file_is_read_whatever_its_suffix(tmp_path):
    path, m = _seq(tmp_path, "model.pt")
    doc = _ok(["params", path])
    assert doc["total"]["weights"] == sum(int((p != 0).sum()) for n, p in m.state_dict().items() if n.endswith("weight"))
    torch.save(m.state_dict(), tmp_path / "real.pt")  # a real torch.save file: refused, never unpickled
    assert_one_error_line(run_cli(["params", tmp_path / "real.pt"]), "pickle", "safetensors.torch.save_file")


def test_dead_neurons_are_left_whole_by_expand_top(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 3))
    with torch.no_grad():
        m[0].weight[2].zero_()  # a dead (or fully pruned) neuron: no input edge
    save_file(m.state_dict(), str(tmp_path / "dead.safetensors"))
    src = tmp_path / "dead.safetensors"
    assert_one_error_line(run_cli(["expand", src, "--alpha", "2", "-o", tmp_path / "a.safetensors"]),
                          "parent 2's 0 edges", "--expand-top")
    doc = _ok(["expand", src, "--alpha", "2", "--expand-top", "9", "-o", tmp_path / "b.safetensors"])
    assert doc["hidden_widths_after"] == [19] and doc["budget_holds"]
    assert run_cli(["verify", tmp_path / "b.safetensors", "--source", src]).exit_code == 0
    assert_one_error_line(run_cli(["expand", src, "--alpha", "2", "--expand-top", "10", "-o", tmp_path / "c.safetensors"]),
                          "only 9 of 10")


def test_verify_against_a_source_without_the_layers_is_a_failed_verification(tmp_path):
    src, m = _seq(tmp_path)
    sd = m.state_dict()
    other = tmp_path / "named.safetensors"
    save_file({"l1.weight": sd["0.weight"], "l1.bias": sd["0.bias"], "l2.weight": sd["2.weight"],
               "l2.bias": sd["2.bias"]}, str(other))
    assert run_cli(["expand", other, "--alpha", "2", "-o", tmp_path / "x.safetensors"]).exit_code == 0
    line = assert_one_error_line(run_cli(["verify", tmp_path / "x.safetensors", "--source", src]), "not the file that was expanded",
                                 code=3)
    assert "--layers" not in line


def test_analyze_refuses_an_expansion_of_another_model(tmp_path):
    a, _ = _seq(tmp_path, "a.safetensors", (8, 10, 3))
    b, _ = _seq(tmp_path, "b.safetensors", (5, 7, 3))
    assert run_cli(["expand", b, "--alpha", "2", "-o", tmp_path / "b2.safetensors"]).exit_code == 0
    assert_one_error_line(run_cli(["analyze", a, tmp_path / "b2.safetensors"]), "not expanded from it")


def test_analyze_csv_keeps_a_non_utf8_model_name(tmp_path):
    import os

    src, _ = _seq(tmp_path)
    odd = os.path.join(os.fsencode(tmp_path), b"mod\xe9l.safetensors")
    os.link(src, odd)
    import subprocess
    import sys

    # a real process (the test runner's captured streams are strict UTF-8, a terminal's are not)
    res = subprocess.run([sys.executable, "-m", "fpe_cli", "analyze", odd, "--csv", tmp_path / "n.csv"],
                         capture_output=True)
    assert res.returncode == 0, res.stderr
    assert b"mod\xe9l.safetensors" in (tmp_path / "n.csv").read_bytes()


# ---------------------------------------------------------------- leftovers of the second QA round


def test_empty_activation_flag_is_refused_not_read_as_absent(tmp_path):
    src = tmp_path / "m.safetensors"
    save_file({k: v.detach() for k, v in nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).state_dict().items()},
              str(src))
    assert_one_error_line(run_cli(["params", src, "--activation", " "]), "--activation is empty")


def test_drift_probe_names_the_rows_it_really_used(tmp_path):
    src = tmp_path / "m.safetensors"
    save_file({k: v.detach() for k, v in nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).state_dict().items()},
              str(src))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x_train=rng.normal(size=(40, 6)).astype(np.float32), y_train=rng.integers(0, 3, 40),
             x_test=rng.normal(size=(20, 6)).astype(np.float32), y_test=rng.integers(0, 3, 20))
    doc = _ok(["expand", src, "--alpha", "2", "--data", tmp_path / "d.npz", "-o", tmp_path / "e.safetensors"])
    assert doc["drift"]["probe"].endswith("(test split, first 20 of 20)")


def test_ctrl_c_while_the_cli_imports_is_one_error_line(tmp_path):
    import subprocess
    import sys

    # an import hook raises KeyboardInterrupt where a real Ctrl-C would land: inside the command imports
    code = ("import sys\n"
            "class Hook:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'fpe_cli.cli.train_cmds':\n"
            "            raise KeyboardInterrupt\n"
            "sys.meta_path.insert(0, Hook())\n"
            "from fpe_cli.cli import main\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 130
    assert res.stderr.strip() == "Error: interrupted"


def test_a_comma_inside_a_targets_regex_belongs_to_the_regex(tmp_path):
    from fpe_cli.cli.expand_cmds import _split_list

    assert _split_list(r"re:[0-9]{1,2}\.weight, fc1 ,re:(a|b),c") == [r"re:[0-9]{1,2}\.weight", "fc1", "re:(a|b)", "c"]
    src = tmp_path / "m.safetensors"
    save_file({k: v.detach() for k, v in nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                                         nn.Linear(8, 3)).state_dict().items()}, str(src))
    doc = _ok(["expand", src, "--alpha", "2", "--targets", "re:^[0-9]{1,2}$", "--ignore", "re:^[2-9]{1,1}$",
               "-o", tmp_path / "e.safetensors"])
    assert [layer["alpha"] for layer in doc["layers"]] == [2, None, None]


def test_a_plan_saved_for_some_targets_applies_to_those_targets(tmp_path):
    src = tmp_path / "m.safetensors"
    torch.manual_seed(0)
    save_file({k: v.detach() for k, v in nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                                                         nn.Linear(8, 3)).state_dict().items()}, str(src))
    first, again, plan = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "p.safetensors"
    _ok(["expand", src, "--alpha", "3", "--targets", "2", "--seed", "4", "--save-plan", plan, "-o", first])
    doc = _ok(["expand", src, "--plan", plan, "-o", again])  # the documented re-application, no --targets
    assert [layer["alpha"] for layer in doc["layers"]] == [None, 3, None] and doc["settings"]["seed"] == 4
    assert first.read_bytes() == again.read_bytes()


@pytest.mark.parametrize("flags, needles", [
    (["--split", "gram"], ["--split cannot change an applied --plan"]),
    (["--group-size", "2", "--expand-top", "0.5"], ["--group-size, --expand-top cannot change"]),
    (["--seed", "5"], ["--seed 5 differs from the applied plan's seed 0"]),
])
def test_settings_an_applied_plan_would_ignore_are_refused(tmp_path, model6, flags, needles):
    plan = tmp_path / "p.safetensors"
    _ok(["expand", model6, "--alpha", "2", "--save-plan", plan, "-o", tmp_path / "a.safetensors"])
    assert_one_error_line(run_cli(["expand", model6, "--plan", plan, *flags, "-o", tmp_path / "b.safetensors"]), *needles)
    assert not (tmp_path / "b.safetensors").exists()
    _ok(["expand", model6, "--plan", plan, "--seed", "0", "-o", tmp_path / "c.safetensors"])  # the plan's own seed


@pytest.mark.parametrize("edit", [{"seed": -5}, {"split": 5}])
def test_plan_metadata_is_checked_like_the_flags(tmp_path, model6, edit):
    plan = tmp_path / "p.safetensors"
    _ok(["expand", model6, "--alpha", "2", "--save-plan", plan, "-o", tmp_path / "a.safetensors"])
    tensors = load_file(str(plan))
    from safetensors import safe_open
    with safe_open(str(plan), "pt") as fh:
        meta = fh.metadata()
    info = json.loads(meta["fpe.plan"])
    if "seed" in edit:
        info["seed"] = edit["seed"]
    else:
        info["layers"][0]["split"] = edit["split"]
    save_file(tensors, str(plan), metadata={**meta, "fpe.plan": json.dumps(info)})
    assert_one_error_line(run_cli(["expand", model6, "--plan", plan, "-o", tmp_path / "b.safetensors"]),
                          "malformed plan metadata")
