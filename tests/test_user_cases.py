"""Checkpoints, flags and data the way users write them (found by a QA pass)."""

import numpy as np
import torch
from safetensors.torch import save_file

from conftest import assert_one_error_line, run_cli


class Words(torch.nn.Module):
    def __init__(self, d=8, h=8):
        super().__init__()
        self.input_layer, self.hidden_layer, self.output_layer = (torch.nn.Linear(d, h), torch.nn.Linear(h, h),
                                                                  torch.nn.Linear(h, d))


def test_word_names_with_equal_shapes_follow_their_roles_not_the_alphabet(tmp_path):
    """input_layer / hidden_layer / output_layer (8 -> 8 -> 8 -> 8): the alphabet says hidden, input, output;
    the words say input, hidden, output. First, second, third likewise."""
    import json

    save_file(Words().state_dict(), str(tmp_path / "m.safetensors"))
    res = run_cli(["inspect", tmp_path / "m.safetensors", "--json"])
    assert res.exit_code == 0, res.stderr
    assert [c["weight"] for c in json.loads(res.stdout)["chain"]] == ["input_layer.weight", "hidden_layer.weight",
                                                                      "output_layer.weight"]
    ordinal = {f"{w}.weight": torch.randn(6, 6) for w in ("third", "first", "second")}
    save_file(ordinal, str(tmp_path / "o.safetensors"))
    res = run_cli(["inspect", tmp_path / "o.safetensors", "--json"])
    assert [c["weight"] for c in json.loads(res.stdout)["chain"]] == ["first.weight", "second.weight", "third.weight"]


def test_word_names_with_distinct_shapes_find_the_unique_chain(tmp_path):
    class Distinct(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layer, self.hidden_layer, self.output_layer = (torch.nn.Linear(10, 8), torch.nn.Linear(8, 6),
                                                                      torch.nn.Linear(6, 3))

    save_file(Distinct().state_dict(), str(tmp_path / "m.safetensors"))
    res = run_cli(["params", tmp_path / "m.safetensors", "--json"])
    assert res.exit_code == 0
    import json

    assert [r["weight"] for r in json.loads(res.stdout)["layers"]] == [
        "input_layer.weight", "hidden_layer.weight", "output_layer.weight"]


def test_verify_source_reads_the_source_with_the_files_chain(tmp_path):
    sd = {"emb.weight": torch.randn(20, 10), "fc1.weight": torch.randn(8, 10), "fc1.bias": torch.zeros(8),
          "fc2.weight": torch.randn(3, 8), "fc2.bias": torch.zeros(3)}
    save_file(sd, str(tmp_path / "m.safetensors"))
    out = tmp_path / "e.safetensors"
    assert run_cli(["expand", tmp_path / "m.safetensors", "--alpha", "2", "--layers", "fc1,fc2", "-o", out]).exit_code == 0
    res = run_cli(["verify", out, "--source", tmp_path / "m.safetensors"])
    assert res.exit_code == 0, res.stderr


def test_setting_values_are_checked(tmp_path):
    save_file(Words(8, 6).state_dict(), str(tmp_path / "m.safetensors"))
    m = tmp_path / "m.safetensors"
    layers = ["--layers", "input_layer,hidden_layer,output_layer"]
    cases = [(["--seed", str(10**20)], "seed must be an integer"),
             (["--expand-top", "1.5"], "expand-top must be"),
             (["--split", "gram", "--group-size", "2"], "--group-size applies to --split random"),
             (["--group-size", "0"], "group-size must be an integer"),
             (["--ignore", "nothing"], "ignore 'nothing' matches no hidden layer")]
    for flags, needle in cases:
        assert_one_error_line(run_cli(["expand", m, "--alpha", "2", *layers, *flags, "-o", tmp_path / "o.safetensors"]),
                              needle)
    (tmp_path / "r.yaml").write_text("alpha: 2\nseed: 1e30\n")
    assert_one_error_line(run_cli(["expand", m, *layers, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "o.safetensors"]),
                          "seed must be an integer")
    assert not (tmp_path / "o.safetensors").exists()


def test_diverged_training_is_exit_3_and_writes_nothing(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    res = run_cli(["train", "--data", tmp_path / "d.npz", "--hidden", "4", "--lr", "1e38", "--optimizer", "sgd",
                   "--epochs", "3", "-o", tmp_path / "m.safetensors"])
    assert_one_error_line(res, "non-finite", "lower --lr", code=3)
    assert not (tmp_path / "m.safetensors").exists()


def test_column_vector_class_ids_get_a_hint(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=(30, 1))
    np.savez(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    res = run_cli(["train", "--data", tmp_path / "d.npz", "--hidden", "4", "--epochs", "1", "-o", tmp_path / "m.safetensors"])
    assert_one_error_line(res, "y.ravel()")
