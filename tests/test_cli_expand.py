"""End to end through the CLI on real files: expand, params, inspect, verify, convert."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import listing, make_sequential, run_cli, save_module, save_mlp
from fpe_cli.checkpoint import load_checkpoint

COMMANDS = ["expand", "params", "inspect", "verify", "convert"]
SAMPLES = sorted((Path(__file__).resolve().parents[1] / "sample_checkpoints").glob("*.safetensors"))


def expand_ok(*args):
    res = run_cli(["expand", *args])
    assert res.exit_code == 0, res.stderr
    return res


# ---------------------------------------------------------------- expand


def test_default_output_name_beside_input(tmp_path, mlp_file):
    sub = tmp_path / "models"
    sub.mkdir()
    src = mlp_file.rename(sub / "model.safetensors")
    res = expand_ok(src, "--alpha", "4")
    assert (sub / "model.fpe4.safetensors").is_file()
    assert listing(sub) == ["model.fpe4.safetensors", "model.safetensors"]
    assert res.stdout == ""  # the table goes to stderr; stdout stays clean for pipes
    assert "budget" in res.stderr and "fine-tune" in res.stderr
    again = run_cli(["expand", src, "--alpha", "4"])
    assert again.exit_code == 2 and "--force" in again.stderr
    expand_ok(src, "--alpha", "4", "--force")


def test_single_output_model_table(tmp_path):
    src = save_mlp(tmp_path / "one.safetensors", [5, 4, 1])
    res = expand_ok(src, "--alpha", "2")
    assert "argmax agreement n/a" in res.stderr and "nan" not in res.stderr.lower()
    doc = expand_ok(src, "--alpha", "2", "--json", "--force").json()
    assert doc["drift"]["argmax_agreement"] is None  # NaN is not JSON


def test_children_emptied_by_pruning_are_reported(tmp_path):
    # few outputs, many copied columns: the budget pruning takes every edge of some children
    src = save_mlp(tmp_path / "narrow.safetensors", [6, 5, 1])
    doc = expand_ok(src, "--alpha", "4", "--json", "-o", "a.safetensors").json()
    dead = doc["layers"][0]["rows_without_edges"]
    assert dead > 0
    res = expand_ok(src, "--alpha", "4", "-o", "b.safetensors")
    assert f"rows left without input edges by the budget pruning: 0.weight: {dead}" in res.stderr


def test_json_is_one_document_with_budget(tmp_path, deep_file):
    res = expand_ok(deep_file, "--alpha", "2", "--json")
    doc = json.loads(res.stdout)  # exactly one JSON document: json.loads refuses trailing data
    assert res.stdout.strip().startswith("{") and res.stdout.count("\n{") == 0
    assert doc["budget_holds"] is True and doc["weights_after"] == doc["budget"] == 10 * 8 + 8 * 6 + 6 * 6 + 6 * 4
    assert doc["hidden_widths_before"] == [8, 6, 6] and doc["hidden_widths_after"] == [16, 12, 12]
    assert [layer["shape_after"] for layer in doc["layers"]] == [[16, 10], [12, 16], [12, 12], [4, 12]]
    assert sum(layer["weights_after"] for layer in doc["layers"]) == doc["budget"]
    assert set(doc["drift"]) >= {"relative_l2", "max_abs_diff", "cosine", "argmax_agreement", "probe"}
    assert doc["drift"]["relative_l2"] > 0  # FPE is not function-preserving, and says so
    assert res.stderr == ""


def test_save_plan_then_plan_reproduces_bytes(tmp_path, deep_file):
    expand_ok(deep_file, "--alpha", "2", "--seed", "5", "--save-plan", "plan.safetensors", "-o", "a.safetensors")
    expand_ok(deep_file, "--alpha", "2", "--plan", "plan.safetensors", "-o", "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with safe_open(str(tmp_path / "plan.safetensors"), "pt") as fh:
        meta = fh.metadata()
        assert meta["fpe.kind"] == "plan"
        assert sorted(fh.keys()) == ["plan.child:0.weight", "plan.child:2.weight", "plan.child:4.weight"]
    # the same seed without a plan gives the same file too; another seed does not
    expand_ok(deep_file, "--alpha", "2", "--seed", "5", "-o", "c.safetensors")
    expand_ok(deep_file, "--alpha", "2", "--seed", "6", "-o", "d.safetensors")
    assert (tmp_path / "c.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    assert (tmp_path / "d.safetensors").read_bytes() != (tmp_path / "a.safetensors").read_bytes()


def test_plan_alpha_must_agree_with_alpha(tmp_path, mlp_file):
    expand_ok(mlp_file, "--alpha", "2", "--save-plan", "plan.safetensors", "-o", "a.safetensors")
    before = listing(tmp_path)
    res = run_cli(["expand", mlp_file, "--alpha", "3", "--plan", "plan.safetensors", "-o", "b.safetensors"])
    assert res.exit_code == 2 and "alpha" in res.stderr
    assert listing(tmp_path) == before


def test_recipe_per_target_alpha_and_split(tmp_path, deep_file):
    (tmp_path / "recipe.yaml").write_text(
        "alpha: 2\n"
        "seed: 3\n"
        "targets:\n"
        "  - match: '0'\n"
        "    alpha: 3\n"
        "    split: structured\n"
        "  - match: 're:[24]\\.weight'\n"
        "    split: gram\n"
    )
    res = expand_ok(deep_file, "--recipe", "recipe.yaml", "--json", "-o", "r.safetensors")
    doc = json.loads(res.stdout)
    assert [(layer["alpha"], layer["split"]) for layer in doc["layers"]] == [(3, "structured"), (2, "gram"), (2, "gram"), (None, None)]
    assert doc["hidden_widths_after"] == [24, 12, 12] and doc["budget_holds"]
    meta = load_checkpoint(tmp_path / "r.safetensors").metadata
    recipe = json.loads(meta["fpe.recipe"])
    assert recipe["targets"] == [{"weight": "0.weight", "alpha": 3, "split": "structured"},
                                 {"weight": "2.weight", "alpha": 2, "split": "gram"},
                                 {"weight": "4.weight", "alpha": 2, "split": "gram"}]
    assert json.loads(meta["fpe.settings"])["seed"] == 3
    assert run_cli(["verify", "r.safetensors", "--source", deep_file]).exit_code == 0


def test_recipe_ignore_and_flag_overrides(tmp_path, deep_file):
    (tmp_path / "recipe.yaml").write_text("alpha: 4\nsplit: structured\nignore: ['re:.*4.*']\n")
    doc = expand_ok(deep_file, "--recipe", "recipe.yaml", "--alpha", "2", "--json", "-o", "o.safetensors").json()
    assert [layer["alpha"] for layer in doc["layers"]] == [2, 2, None, None]
    assert [layer["split"] for layer in doc["layers"]][:2] == ["structured", "structured"]


@pytest.mark.parametrize("flags, expanded", [
    (["--targets", "2"], [False, True, False]),
    (["--targets", "re:[02]"], [True, True, False]),
    (["--ignore", "re:(0|4)\\.weight"], [False, True, False]),
    (["--targets", "0,4.weight"], [True, False, True]),
    (["--targets", "re:.*", "--ignore", "2"], [True, False, True]),
])
def test_targets_and_ignore(tmp_path, deep_file, flags, expanded):
    doc = expand_ok(deep_file, "--alpha", "2", *flags, "--json", "-o", "o.safetensors").json()
    assert [layer["alpha"] is not None for layer in doc["layers"][:3]] == expanded
    assert doc["hidden_widths_after"] == [w * (2 if e else 1) for w, e in zip([8, 6, 6], expanded)]
    assert doc["budget_holds"]
    assert run_cli(["verify", "o.safetensors", "--source", deep_file]).exit_code == 0


def test_target_matching_nothing_is_an_error(deep_file):
    res = run_cli(["expand", deep_file, "--alpha", "2", "--targets", "re:nothing.*"])
    assert res.exit_code == 2 and "matches no hidden layer" in res.stderr


def test_layout_dense(tmp_path, mlp_file):
    expand_ok(mlp_file, "--alpha", "2", "--layout", "dense", "-o", "d.safetensors")
    tensors = load_file(str(tmp_path / "d.safetensors"))
    assert set(tensors) == {"0.weight", "0.bias", "2.weight", "2.bias", "fpe.mask:0.weight", "fpe.mask:2.weight",
                            "fpe.children:0.weight"}
    assert tensors["0.weight"].shape == (16, 12) and tensors["2.weight"].shape == (3, 16)
    assert torch.equal(tensors["0.bias"], load_file(str(mlp_file))["0.bias"].repeat_interleave(2))
    assert load_checkpoint(tmp_path / "d.safetensors").layout == "dense"


@pytest.mark.parametrize("fmt", ["groups-json", "list-json", "mapping-yaml"])
def test_clause_split_with_clause_map(tmp_path, mlp_file, fmt):
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    if fmt == "groups-json":
        path = tmp_path / "clauses.json"
        path.write_text(json.dumps({"groups": groups}))
    elif fmt == "list-json":
        path = tmp_path / "clauses.json"
        path.write_text(json.dumps([j // 3 for j in range(12)]))
    else:
        path = tmp_path / "clauses.yaml"
        path.write_text("".join(f"{j}: {j // 3}\n" for j in range(12)))
    expand_ok(mlp_file, "--alpha", "2", "--split", "clause", "--clause-map", path, "--save-plan", "p.safetensors",
              "--layout", "dense", "-o", "c.safetensors", "--json")
    child = load_file(str(tmp_path / "p.safetensors"))["plan.child:0.weight"]
    for i in range(8):
        for members in groups:
            assert len({int(child[i, j]) for j in members}) == 1, f"clause {members} split in parent {i}"
        assert sorted(set(child[i].tolist())) == [0, 1]
    assert run_cli(["verify", "c.safetensors", "--source", mlp_file]).exit_code == 0


def test_clause_split_without_map_is_refused(mlp_file):
    res = run_cli(["expand", mlp_file, "--alpha", "2", "--split", "clause"])
    assert res.exit_code == 2 and "clause map" in res.stderr


def test_outgoing_split_divides_columns(tmp_path, mlp_file):
    expand_ok(mlp_file, "--alpha", "2", "--layout", "dense", "-o", "copy.safetensors", "--save-plan", "p.safetensors")
    expand_ok(mlp_file, "--alpha", "2", "--layout", "dense", "-o", "split.safetensors", "--outgoing", "split",
              "--plan", "p.safetensors")
    src = load_file(str(mlp_file))["2.weight"]
    for name, scale in (("copy.safetensors", 1.0), ("split.safetensors", 0.5)):
        t = load_file(str(tmp_path / name))
        w2, m2 = t["2.weight"], t["fpe.mask:2.weight"]
        want = src.repeat_interleave(2, dim=1) * scale
        assert torch.equal(w2[m2], want[m2])
        assert int(m2.sum()) + int(t["fpe.mask:0.weight"].sum()) == 12 * 8 + 8 * 3
    meta = load_checkpoint(tmp_path / "split.safetensors").metadata
    assert json.loads(meta["fpe.settings"])["outgoing"] == "split"


# ---------------------------------------------------------------- the bundled samples


@pytest.mark.parametrize("sample", SAMPLES, ids=[s.stem for s in SAMPLES])
def test_sample_checkpoints_end_to_end(tmp_path, sample):
    src = Path(shutil.copy(sample, tmp_path / sample.name))  # work on a copy: never write into the repo
    before = run_cli(["params", src, "--json"]).json()
    doc = expand_ok(src, "--alpha", "2", "--json").json()
    out = Path(doc["output"])
    assert out.parent == tmp_path and out.name.endswith(".fpe2.safetensors") and doc["budget_holds"]
    after = run_cli(["params", out, "--json"]).json()
    assert after["total"]["weights"] == before["total"]["weights"] and after["budget_holds"] is True
    assert run_cli(["verify", out, "--source", src]).exit_code == 0
    clauses = sorted(sample.parent.glob(f"{sample.stem}*clause*.json")) + sorted(sample.parent.glob(f"{sample.stem}*clause*.y*ml"))
    if clauses:
        expand_ok(src, "--alpha", "2", "--split", "clause", "--clause-map", clauses[0], "-o", tmp_path / "c.safetensors")
        assert run_cli(["verify", tmp_path / "c.safetensors", "--source", src]).exit_code == 0


# ---------------------------------------------------------------- params, inspect


def test_params_json(tmp_path, deep_file):
    src = run_cli(["params", deep_file, "--json"])
    assert src.exit_code == 0 and src.stderr == ""
    src_doc = src.json()
    assert src_doc["total"]["weights"] == 188 and src_doc["layout"] == "plain" and "budget_holds" not in src_doc
    expand_ok(deep_file, "--alpha", "3", "-o", "e.safetensors")
    res = run_cli(["params", "e.safetensors", "--json"])
    assert res.exit_code == 0
    doc = res.json()
    assert doc["total"]["weights"] == src_doc["total"]["weights"]
    assert doc["budget_holds"] is True and doc["source"]["weights"] == 188
    assert doc["source"]["weights_per_layer"] == [80, 48, 36, 24]
    assert doc["total"]["hidden_neurons"] == 3 * src_doc["total"]["hidden_neurons"]
    assert doc["layout"] == "packed" and doc["file_bytes"] == (tmp_path / "e.safetensors").stat().st_size
    assert [layer["shape"] for layer in doc["layers"]] == [[24, 10], [18, 24], [18, 18], [4, 18]]
    human = run_cli(["params", "e.safetensors"])
    assert human.exit_code == 0 and "holds" in human.stdout


def test_inspect_json(tmp_path, deep_file):
    expand_ok(deep_file, "--alpha", "2", "-o", "e.safetensors")
    res = run_cli(["inspect", "e.safetensors", "--json"])
    assert res.exit_code == 0 and res.stderr == ""
    doc = res.json()
    assert doc["layout"] == "packed" and doc["expanded"] is True
    assert doc["widths"] == [10, 16, 12, 12, 4]
    assert [c["weight"] for c in doc["chain"]] == ["0.weight", "2.weight", "4.weight", "6.weight"]
    assert all(c["mask"] and c["dtype"] == "float32" for c in doc["chain"])
    assert [c["lineage"] for c in doc["chain"]] == [True, True, True, False]
    assert doc["metadata"]["fpe.budget"]["weights"] == 188
    assert doc["metadata"]["format"] == "pt"
    names = [t["name"] for t in doc["tensors"]]
    assert "fpe.zmask:0.weight" in names and names == sorted(names)
    plain = run_cli(["inspect", deep_file, "--json"]).json()
    assert plain["layout"] == "plain" and plain["expanded"] is False and plain["activation_source"] == "default"


# ---------------------------------------------------------------- verify


def _dense(tmp_path, src, name="d.safetensors"):
    expand_ok(src, "--alpha", "2", "--layout", "dense", "-o", name)
    path = tmp_path / name
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata()
    return path, {k: v.clone() for k, v in load_file(str(path)).items()}, meta


def test_verify_good_files(tmp_path, deep_file):
    path, _, _ = _dense(tmp_path, deep_file)
    for args in ([path], [path, "--source", deep_file]):
        res = run_cli(["verify", *args])
        assert res.exit_code == 0 and "OK" in res.stdout, res.stderr
    expand_ok(deep_file, "--alpha", "2", "-o", "p.safetensors")
    doc = run_cli(["verify", "p.safetensors", "--json"]).json()
    assert doc["ok"] is True and "siblings own disjoint edges" in doc["checks"]


def _broken(tmp_path, tensors, meta, name="broken.safetensors"):
    path = tmp_path / name
    save_file(tensors, str(path), metadata=meta)
    return path


def test_verify_catches_shared_edge(tmp_path, mlp_file):
    path, t, meta = _dense(tmp_path, mlp_file)
    m, w = t["fpe.mask:0.weight"], t["0.weight"]
    # give child 1 of parent p an edge that child 0 owns (an extra weight), then drop a weight elsewhere
    # in the last layer so that the budget still holds and only disjointness is violated
    p = next(p for p in range(8) if bool(m[2 * p].any()))
    j = int(m[2 * p].nonzero()[0])
    m[2 * p + 1, j], w[2 * p + 1, j] = True, 0.25
    m2, w2 = t["fpe.mask:2.weight"], t["2.weight"]
    r, c = (int(v) for v in m2.nonzero()[0])
    m2[r, c], w2[r, c] = False, 0.0
    res = run_cli(["verify", _broken(tmp_path, t, meta)])
    assert res.exit_code == 3
    assert "more than one sibling" in res.stderr and "budget" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and res.stderr.startswith("Error:")


def test_verify_catches_off_mask_weight(tmp_path, mlp_file):
    path, t, meta = _dense(tmp_path, mlp_file)
    m, w = t["fpe.mask:2.weight"], t["2.weight"]
    off = (~m).nonzero()[0]
    w[off[0], off[1]] = 1.5
    res = run_cli(["verify", _broken(tmp_path, t, meta)])
    assert res.exit_code == 3 and "2.weight: 1 weight(s) off the mask are not zero" in res.stderr
    # convert refuses to drop such a value silently
    conv = run_cli(["convert", "broken.safetensors", "--layout", "packed", "-o", "x.safetensors"])
    assert conv.exit_code == 3 and not (tmp_path / "x.safetensors").exists()


def test_verify_catches_budget_change(tmp_path, mlp_file):
    path, t, meta = _dense(tmp_path, mlp_file)
    m, w = t["fpe.mask:0.weight"], t["0.weight"]
    r, c = (int(v) for v in m.nonzero()[0])
    m[r, c], w[r, c] = False, 0.0
    res = run_cli(["verify", _broken(tmp_path, t, meta)])
    assert res.exit_code == 3 and "recorded budget" in res.stderr
    # an edited budget in the metadata is caught as well
    path, t, meta = _dense(tmp_path, mlp_file, "d2.safetensors")
    budget = json.loads(meta["fpe.budget"])
    budget["weights"] += 1
    res = run_cli(["verify", _broken(tmp_path, t, dict(meta, **{"fpe.budget": json.dumps(budget)}), "b2.safetensors")])
    assert res.exit_code == 3 and "budget" in res.stderr


def test_verify_against_wrong_source(tmp_path, mlp_file):
    path, _, _ = _dense(tmp_path, mlp_file)
    other = save_mlp(tmp_path / "other.safetensors", [12, 8, 3], seed=9)
    res = run_cli(["verify", path, "--source", other])
    assert res.exit_code == 3 and "sha256" in res.stderr


def test_verify_catches_edge_not_of_parent(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 8, generator=g)
    w[0, :4] = 0  # parent 0 has only edges 4..7
    src = save_module(make_sequential([8, 6, 3]), tmp_path / "s.safetensors")
    tensors = load_file(str(src))
    tensors["0.weight"] = w
    save_file(tensors, str(src))
    path, t, meta = _dense(tmp_path, src)
    m, wt = t["fpe.mask:0.weight"], t["0.weight"]
    m[0, 0], wt[0, 0] = True, 1.0  # child 0 of parent 0 claims an edge the parent never had
    m2 = t["fpe.mask:2.weight"]
    r, c = (int(v) for v in m2.nonzero()[0])
    m2[r, c], t["2.weight"][r, c] = False, 0.0
    res = run_cli(["verify", _broken(tmp_path, t, meta), "--source", src])
    assert res.exit_code == 3 and "not edges of the parent" in res.stderr


# ---------------------------------------------------------------- convert


def test_convert_round_trip_is_lossless(tmp_path, deep_file):
    expand_ok(deep_file, "--alpha", "2", "-o", "p.safetensors")
    expand_ok(deep_file, "--alpha", "2", "--layout", "dense", "-o", "d.safetensors")
    r1 = run_cli(["convert", "p.safetensors", "--layout", "dense", "-o", "p2d.safetensors"])
    r2 = run_cli(["convert", "p2d.safetensors", "--layout", "packed", "-o", "p2d2p.safetensors", "--json"])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.stderr + r2.stderr
    assert r2.json()["from_layout"] == "dense" and r2.json()["to_layout"] == "packed"
    read = lambda n: (tmp_path / n).read_bytes()  # noqa: E731
    assert read("p2d2p.safetensors") == read("p.safetensors")
    assert read("p2d.safetensors") == read("d.safetensors")
    assert run_cli(["verify", "p2d.safetensors", "--source", deep_file]).exit_code == 0
    refuse = run_cli(["convert", "p.safetensors", "--layout", "dense", "-o", "p2d.safetensors"])
    assert refuse.exit_code == 2 and "--force" in refuse.stderr


def test_convert_plain_layout_refuses_an_expansion(tmp_path, mlp_file):
    """An expanded file's lineage and masks (which may hold weights of value 0) have no place in a plain file."""
    expand_ok(mlp_file, "--alpha", "2", "-o", "p.safetensors")
    res = run_cli(["convert", "p.safetensors", "--layout", "plain", "-o", "x.safetensors"])
    assert res.exit_code == 2 and "plain layout cannot store an expanded model's lineage and masks" in res.stderr
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------- help


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_help_has_an_example(command):
    res = run_cli([command, "--help"])
    assert res.exit_code == 0
    assert "Example" in res.stdout


def test_top_level_help_and_version():
    res = run_cli(["--help"])
    assert res.exit_code == 0 and "Example" in res.stdout
    assert all(c in res.stdout for c in COMMANDS)
    assert run_cli(["--version"]).stdout.startswith("fpe ")


def test_probe_samples_sets_or_skips_the_drift(tmp_path, mlp_file):
    doc = expand_ok(mlp_file, "--alpha", "2", "--probe-samples", "8", "--json", "-o", tmp_path / "a.safetensors").json()
    assert doc["drift"]["probe_samples"] == 8 and "8 standard-normal inputs" in doc["drift"]["probe"]
    doc = expand_ok(mlp_file, "--alpha", "2", "--probe-samples", "0", "--json", "-o", tmp_path / "b.safetensors").json()
    assert doc["drift"] is None and doc["budget_holds"]
    res = expand_ok(mlp_file, "--alpha", "2", "--probe-samples", "0", "-o", tmp_path / "c.safetensors")
    assert "drift not measured (--probe-samples 0)" in res.stderr and "fine-tune" in res.stderr
    # the same file either way: the drift is a report, not part of the output
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    res = run_cli(["expand", mlp_file, "--alpha", "2", "--probe-samples", "-1", "-o", tmp_path / "d.safetensors"])
    assert res.exit_code == 2 and "probe-samples" in res.stderr and not (tmp_path / "d.safetensors").exists()
