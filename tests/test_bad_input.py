"""Bad input: exit code 2, exactly one `Error:` line naming the problem, no traceback, nothing left behind."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_error_line, listing, make_sequential, run_cli, save_mlp, save_module, save_tensors


def _model(tmp_path: Path) -> Path:
    return save_mlp(tmp_path / "model.safetensors", [6, 4, 3])


def _plan_for(tmp_path: Path, widths, name="plan.safetensors") -> Path:
    """Save a plan made on a model of the given widths (in a side directory, then moved beside)."""
    side = tmp_path / "side"
    side.mkdir(exist_ok=True)
    src = save_mlp(side / "other.safetensors", widths)
    res = run_cli(["expand", src, "--alpha", "2", "--save-plan", side / name, "-o", side / "o.safetensors"])
    assert res.exit_code == 0, res.stderr
    return side / name


def case_missing_file(tmp_path):
    return ["expand", tmp_path / "nothere.safetensors", "--alpha", "2"], ["nothere.safetensors", "no such file"]


def case_empty_file(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    return ["expand", tmp_path / "empty.safetensors", "--alpha", "2"], ["not a safetensors file"]


def case_random_bytes(tmp_path):
    (tmp_path / "noise.safetensors").write_bytes(random.Random(0).randbytes(4096))
    return ["expand", tmp_path / "noise.safetensors", "--alpha", "2"], ["not a safetensors file"]


def case_random_bytes_small_header(tmp_path):
    # a plausible header length followed by noise: must still be a clean error
    data = (64).to_bytes(8, "little") + random.Random(1).randbytes(200)
    (tmp_path / "noise2.safetensors").write_bytes(data)
    return ["expand", tmp_path / "noise2.safetensors", "--alpha", "2"], ["not a safetensors file"]


def case_truncated_data(tmp_path):
    src = _model(tmp_path)
    data = src.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 40])
    src.unlink()
    return ["expand", tmp_path / "cut.safetensors", "--alpha", "2"], ["truncated"]


def case_truncated_header(tmp_path):
    src = _model(tmp_path)
    data = src.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:30])
    src.unlink()
    return ["expand", tmp_path / "cut.safetensors", "--alpha", "2"], ["truncated"]


def case_no_2d_weight(tmp_path):
    save_tensors(tmp_path / "vec.safetensors", {"a": torch.randn(5), "b.weight": torch.randn(3)})
    return ["expand", tmp_path / "vec.safetensors", "--alpha", "2"], ["no 2-D weight"]


def case_no_tensors(tmp_path):
    save_tensors(tmp_path / "none.safetensors", {})
    return ["params", tmp_path / "none.safetensors"], ["no 2-D weight", "no tensors"]


def case_shapes_do_not_chain(tmp_path):
    save_tensors(tmp_path / "bad.safetensors", {"fc1.weight": torch.randn(5, 6), "fc2.weight": torch.randn(3, 4)})
    return ["expand", tmp_path / "bad.safetensors", "--alpha", "2"], ["do not chain", "fc1.weight (5, 6)", "fc2.weight (3, 4)"]


def case_bias_shape_wrong(tmp_path):
    save_tensors(tmp_path / "bias.safetensors", {"fc1.weight": torch.randn(5, 6), "fc1.bias": torch.randn(4),
                                                 "fc2.weight": torch.randn(3, 5)})
    return ["expand", tmp_path / "bias.safetensors", "--alpha", "2"], ["fc1.bias", "(5,)"]


def _alpha_case(value, needles):
    def case(tmp_path):
        return ["expand", _model(tmp_path), "--alpha", value], needles
    case.__name__ = f"case_alpha_{value}"
    return case


def case_recipe_alpha_not_integer(tmp_path):
    (tmp_path / "r.yaml").write_text("alpha: 2.5\n")
    return ["expand", _model(tmp_path), "--recipe", tmp_path / "r.yaml"], ["alpha must be an integer", "2.5"]


def case_alpha_larger_than_edges(tmp_path):
    return ["expand", _model(tmp_path), "--alpha", "7"], ["alpha 7 is larger than parent 0's 6 edges"]


def case_alpha_larger_than_sparse_parent(tmp_path):
    t = {k: v for k, v in load_file(str(_model(tmp_path))).items()}
    t["0.weight"][2, :5] = 0  # parent 2 keeps a single edge
    save_file(t, str(tmp_path / "model.safetensors"))
    return ["expand", tmp_path / "model.safetensors", "--alpha", "2"], ["larger than parent 2's 1 edges"]


def _nonfinite_case(value):
    def case(tmp_path):
        t = load_file(str(_model(tmp_path)))
        t["2.weight"][1, 1] = value
        save_file(t, str(tmp_path / "model.safetensors"))
        return ["expand", tmp_path / "model.safetensors", "--alpha", "2"], ["non-finite", "2.weight"]
    case.__name__ = f"case_weight_{value}"
    return case


def case_nan_bias(tmp_path):
    t = load_file(str(_model(tmp_path)))
    t["0.bias"][0] = float("nan")
    save_file(t, str(tmp_path / "model.safetensors"))
    return ["expand", tmp_path / "model.safetensors", "--alpha", "2"], ["non-finite", "0.bias"]


def case_output_is_input(tmp_path):
    src = _model(tmp_path)
    return ["expand", src, "--alpha", "2", "-o", src, "--force"], ["output path is the input"]


def case_output_is_input_other_spelling(tmp_path):
    _model(tmp_path)
    (tmp_path / "sub").mkdir()
    return ["expand", "model.safetensors", "--alpha", "2", "-o", "sub/../model.safetensors", "--force"], ["is the input"]


def case_output_dir_missing(tmp_path):
    return ["expand", _model(tmp_path), "--alpha", "2", "-o", tmp_path / "nodir" / "o.safetensors"], \
        ["output directory does not exist", "nodir"]


def case_output_exists(tmp_path):
    src = _model(tmp_path)
    (tmp_path / "model.fpe2.safetensors").write_bytes(b"precious")
    return ["expand", src, "--alpha", "2"], ["model.fpe2.safetensors", "output exists", "--force"]


def case_save_plan_exists(tmp_path):
    src = _model(tmp_path)
    (tmp_path / "plan.safetensors").write_bytes(b"precious")
    return ["expand", src, "--alpha", "2", "--save-plan", tmp_path / "plan.safetensors"], ["plan.safetensors", "exists"]


def case_plan_other_shapes(tmp_path):
    plan = _plan_for(tmp_path, [7, 4, 3])
    return ["expand", _model(tmp_path), "--alpha", "2", "--plan", plan, "-o", "o.safetensors"], \
        ["plan does not match", "(4, 7)", "(4, 6)"]


def case_plan_other_layers(tmp_path):
    side = tmp_path / "side"
    side.mkdir()
    src = save_module(make_sequential([6, 4, 4, 3]), side / "deep.safetensors")
    assert run_cli(["expand", src, "--alpha", "2", "--targets", "2", "--save-plan", side / "p.safetensors",
                    "-o", side / "o.safetensors"]).exit_code == 0
    return ["expand", _model(tmp_path), "--alpha", "2", "--plan", side / "p.safetensors"], ["the plan splits 2.weight",
                                                                                             "not a hidden layer"]


def case_plan_broken_coverage(tmp_path):
    src = _model(tmp_path)
    side = tmp_path / "side"
    side.mkdir()
    assert run_cli(["expand", src, "--alpha", "2", "--save-plan", side / "p.safetensors",
                    "-o", side / "o.safetensors"]).exit_code == 0
    from safetensors import safe_open
    with safe_open(str(side / "p.safetensors"), "pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["plan.child:0.weight"][1, 3] = -1  # an edge of parent 1 now belongs to no child
    save_file(tensors, str(side / "p.safetensors"), metadata=meta)
    return ["expand", src, "--alpha", "2", "--plan", side / "p.safetensors"], ["plan does not match", "unassigned"]


def case_plan_child_out_of_range(tmp_path):
    src = _model(tmp_path)
    side = tmp_path / "side"
    side.mkdir()
    assert run_cli(["expand", src, "--alpha", "2", "--save-plan", side / "p.safetensors",
                    "-o", side / "o.safetensors"]).exit_code == 0
    t = load_file(str(side / "p.safetensors"))
    from safetensors import safe_open
    with safe_open(str(side / "p.safetensors"), "pt") as fh:
        meta = fh.metadata()
    t["plan.child:0.weight"][0, 0] = 5
    save_file(t, str(side / "p.safetensors"), metadata=meta)
    return ["expand", src, "--alpha", "2", "--plan", side / "p.safetensors"], ["outside [-1, 2)"]


def _plan_meta_case(name, plan_json):
    def case(tmp_path):
        src = _model(tmp_path)
        side = tmp_path / "side"
        side.mkdir()
        assert run_cli(["expand", src, "--alpha", "2", "--save-plan", side / "p.safetensors",
                        "-o", side / "o.safetensors"]).exit_code == 0
        from safetensors import safe_open
        with safe_open(str(side / "p.safetensors"), "pt") as fh:
            meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
        save_file(tensors, str(side / "p.safetensors"), metadata=dict(meta, **{"fpe.plan": plan_json}))
        return ["expand", src, "--alpha", "2", "--plan", side / "p.safetensors"], ["p.safetensors", "plan"]
    case.__name__ = f"case_plan_metadata_{name}"
    return case


def case_layers_metadata_malformed(tmp_path):
    t = load_file(str(_model(tmp_path)))
    save_file(t, str(tmp_path / "model.safetensors"), metadata={"fpe.layers": "[1, 2]"})
    return ["params", tmp_path / "model.safetensors"], ["fpe.layers", "list of weight names"]


def case_lineage_out_of_range(tmp_path):
    src = _model(tmp_path)
    assert run_cli(["expand", src, "--alpha", "2", "-o", tmp_path / "e.safetensors"]).exit_code == 0
    from safetensors import safe_open
    with safe_open(str(tmp_path / "e.safetensors"), "pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    tensors["fpe.children:0.weight"] = torch.full((4,), 2**30, dtype=torch.int32)  # hostile: must not allocate
    save_file(tensors, str(tmp_path / "e.safetensors"), metadata=meta)
    return ["verify", tmp_path / "e.safetensors"], ["lineage of 0.weight", "children add up to"]


def case_plan_is_not_a_plan(tmp_path):
    src = _model(tmp_path)
    return ["expand", src, "--alpha", "2", "--plan", src, "-o", "o.safetensors"], ["not an fpe split plan"]


def _clause_case(name, content, needles):
    def case(tmp_path):
        (tmp_path / "clauses.json").write_text(content)
        return ["expand", _model(tmp_path), "--alpha", "2", "--split", "clause", "--clause-map",
                tmp_path / "clauses.json"], needles
    case.__name__ = f"case_clause_{name}"
    return case


def case_clause_map_missing(tmp_path):
    return ["expand", _model(tmp_path), "--alpha", "2", "--split", "clause", "--clause-map",
            tmp_path / "nope.json"], ["nope.json", "no such clause map"]


def case_pickle_refused(tmp_path):
    torch.save(make_sequential([6, 4, 3]).state_dict(), tmp_path / "model.pt")
    return ["expand", tmp_path / "model.pt", "--alpha", "2"], ["pickle", "refused", "safetensors.torch.save_file"]


def case_unknown_split(tmp_path):
    return ["expand", _model(tmp_path), "--alpha", "2", "--split", "magic"], ["unknown split", "random"]


def case_unknown_layout(tmp_path):
    return ["expand", _model(tmp_path), "--alpha", "2", "--layout", "zip"], ["unknown layout"]


def case_verify_missing(tmp_path):
    return ["verify", tmp_path / "gone.safetensors"], ["no such file"]


def case_convert_to_itself(tmp_path):
    src = _model(tmp_path)
    return ["convert", src, "--layout", "dense", "-o", src, "--force"], ["is the input"]


CASES = [
    case_missing_file, case_empty_file, case_random_bytes, case_random_bytes_small_header, case_truncated_data,
    case_truncated_header, case_no_2d_weight, case_no_tensors, case_shapes_do_not_chain, case_bias_shape_wrong,
    _alpha_case("1", ["alpha must be an integer >= 2", "1"]),
    _alpha_case("0", ["alpha must be an integer >= 2"]),
    _alpha_case("-3", ["alpha must be an integer >= 2", "-3"]),
    _alpha_case("2.5", ["alpha must be an integer", "2.5"]),
    _alpha_case("two", ["alpha must be an integer", "two"]),
    case_recipe_alpha_not_integer, case_alpha_larger_than_edges, case_alpha_larger_than_sparse_parent,
    _nonfinite_case(float("nan")), _nonfinite_case(float("inf")), _nonfinite_case(float("-inf")), case_nan_bias,
    case_output_is_input, case_output_is_input_other_spelling, case_output_dir_missing, case_output_exists,
    case_save_plan_exists, case_plan_other_shapes, case_plan_other_layers, case_plan_broken_coverage,
    case_plan_child_out_of_range, case_plan_is_not_a_plan, case_layers_metadata_malformed, case_lineage_out_of_range,
    _plan_meta_case("entry_not_mapping", json.dumps({"layers": ["x"]})),
    _plan_meta_case("seed_not_int", json.dumps({"seed": "abc", "layers": [{"weight_key": "0.weight", "alpha": 2}]})),
    _plan_meta_case("layers_not_list", json.dumps({"layers": 5})),
    _plan_meta_case("not_json", "{"),
    _plan_meta_case("alpha_1", json.dumps({"layers": [{"weight_key": "0.weight", "alpha": 1}]})),
    _clause_case("out_of_range", json.dumps({"groups": [[0, 1], [2, 9]]}), ["input 9 is out of range", "6 inputs"]),
    _clause_case("negative_index", json.dumps({"groups": [[0, -2]]}), ["input -2 is out of range"]),
    _clause_case("list_too_long", json.dumps([0, 0, 1, 1, 2, 2, 3, 3]), ["lists 8 inputs", "has 6"]),
    _clause_case("wrong_type_str", json.dumps({"groups": "abc"}), ["list of lists"]),
    _clause_case("wrong_type_float", json.dumps({"groups": [[0, 1.5]]}), ["must be integers", "1.5"]),
    _clause_case("wrong_type_scalar", "7", ["a clause map must be"]),
    _clause_case("not_json", "{oops", ["cannot parse clause map"]),
    _clause_case("two_groups", json.dumps({"groups": [[0, 1], [1, 2]]}), ["input 1 is in two groups"]),
    case_clause_map_missing, case_pickle_refused, case_unknown_split, case_unknown_layout, case_verify_missing,
    case_convert_to_itself,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("case_") for c in CASES])
def test_bad_input(tmp_path, case):
    args, needles = case(tmp_path)
    before = listing(tmp_path)
    snapshot = {p: (tmp_path / p).read_bytes() for p in before if (tmp_path / p).is_file()}
    res = run_cli(args)
    assert_one_error_line(res, *needles)
    assert listing(tmp_path) == before, "a file was left behind (or removed)"
    for p, data in snapshot.items():
        assert (tmp_path / p).read_bytes() == data, f"{p} was modified"


@pytest.mark.parametrize("command", ["expand", "params", "inspect", "verify"])
def test_every_reading_command_rejects_garbage(tmp_path, command):
    (tmp_path / "noise.safetensors").write_bytes(random.Random(2).randbytes(333))
    args = [command, tmp_path / "noise.safetensors"] + (["--alpha", "2"] if command == "expand" else [])
    assert_one_error_line(run_cli(args), "not a safetensors file")


def test_json_mode_errors_keep_stdout_empty(tmp_path):
    res = run_cli(["expand", tmp_path / "missing.safetensors", "--alpha", "2", "--json"])
    assert_one_error_line(res, "no such file")


def test_traceback_only_with_fpe_debug(tmp_path):
    """A real process: stderr is one line without FPE_DEBUG, a traceback with FPE_DEBUG=1."""
    (tmp_path / "empty.safetensors").write_bytes(b"")
    env = {k: v for k, v in os.environ.items() if k != "FPE_DEBUG"}
    cmd = [sys.executable, "-m", "fpe_cli", "params", "empty.safetensors"]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert plain.returncode == 2 and plain.stdout == ""
    assert plain.stderr.splitlines() == [plain.stderr.strip()] and plain.stderr.startswith("Error: ")
    debug = subprocess.run(cmd, capture_output=True, text=True, env=dict(env, FPE_DEBUG="1"), cwd=tmp_path, timeout=60)
    assert debug.returncode == 2 and "Traceback" in debug.stderr and debug.stderr.startswith("Error: ")
