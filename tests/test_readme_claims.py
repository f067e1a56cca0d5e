"""README.md tells the truth: its examples run, the flags, defaults, key names, dtypes and metadata it
names exist, and the exit codes and refusals it lists happen. Most tests parse the README itself, so
they fail when the README and the code drift apart. (tests/test_docs.py checks that every command has a
README section and a --help example, and runs the two Python snippets of File formats; not repeated.)"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from safetensors import safe_open
from safetensors.numpy import load_file as load_np

import fpe_cli.cli  # noqa: F401  (registers every command)
from fpe_cli.cli.common import app

from conftest import assert_one_error_line, read_header_raw, run_cli, save_mlp, save_tensors, wait_until

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SAMPLES = ROOT / "sample_checkpoints"
CLICK = typer.main.get_command(app)


# ---------------------------------------------------------------- reading the README


def section(heading: str) -> str:
    """The text under a heading line (`## X` or `### X`) up to the next heading of the same or higher level."""
    m = re.search(rf"^(#+) {re.escape(heading)}\s*$", README, re.M)
    assert m, f"README has no heading {heading!r}"
    level = len(m.group(1))
    rest = README[m.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def paragraph(text: str, start: str) -> str:
    """From `start` to the next blank line."""
    i = text.index(start)
    j = text.find("\n\n", i)
    return text[i: j if j >= 0 else len(text)]


def ticks(text: str) -> list[str]:
    """Inline code spans (may span lines, as the README wraps them)."""
    return [s.replace("\n", " ") for s in re.findall(r"(?<!`)`([^`]+)`(?!`)", text)]


def options_of(command: str) -> set[str]:
    return {o for p in CLICK.commands[command].params for o in p.opts + p.secondary_opts if o.startswith("-")}


def default_of(command: str, option: str):
    (param,) = [p for p in CLICK.commands[command].params if option in p.opts]
    return param.default


def heading_before(pos: int) -> str:
    heads = [m for m in re.finditer(r"^#+ (.+)$", README, re.M) if m.start() < pos]
    return heads[-1].group(1).strip("`") if heads else "top"


def bash_examples() -> list[dict]:
    """Every `fpe ...` command in a ```bash block (indented ones too): argv, a piped jq filter, the
    `# -> NAME` output comment, where it is."""
    found = []
    for m in re.finditer(r"^([ \t]*)```bash\n(.*?)^\1```", README, re.S | re.M):
        first = README[: m.start(2)].count("\n") + 1
        for i, line in enumerate(m.group(2).splitlines()):
            if "fpe" not in line:
                continue
            lex = shlex.shlex(line, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            tokens = list(lex)
            pipelines, cur, cmd = [], [], []
            for tok in tokens + [";"]:
                if tok in (";", "&&", "||", "|"):
                    cur.append(cmd)
                    cmd = []
                    if tok != "|":
                        pipelines.append(cur)
                        cur = []
                else:
                    cmd.append(tok)
            arrow = re.search(r"#\s*->\s*(\S+)", line)
            for pipe in pipelines:
                head = pipe[0]
                if not head:
                    continue
                if head[0] == "fpe":
                    argv, runnable = head[1:], True
                elif "fpe_cli" in head:  # torchrun ... -m fpe_cli CMD
                    argv, runnable = head[head.index("fpe_cli") + 1:], False
                else:
                    continue
                jq = pipe[1][1] if len(pipe) > 1 and pipe[1][:1] == ["jq"] else None
                found.append({"line": first + i, "text": line.strip(), "argv": argv, "jq": jq, "runnable": runnable,
                              "arrow": arrow.group(1) if arrow else None, "where": heading_before(m.start())})
    return found


EXAMPLES = bash_examples()


def test_the_readme_has_the_examples_this_file_checks():
    commands = {e["argv"][0] for e in EXAMPLES}
    assert commands >= {"expand", "params", "inspect", "verify", "convert", "analyze", "data", "train", "finetune",
                        "evaluate"}
    assert len(EXAMPLES) >= 25


# ---------------------------------------------------------------- 1. examples: flags exist, lines run


@pytest.mark.parametrize("ex", EXAMPLES, ids=lambda e: f"L{e['line']}-{e['argv'][0]}")
def test_example_flags_exist_in_the_commands_help(ex):
    command, *args = ex["argv"]
    assert command in CLICK.commands, f"README line {ex['line']}: no command {command!r}"
    flags = {a.split("=", 1)[0] for a in args if re.match(r"--?[a-zA-Z]", a)}
    unknown = flags - options_of(command)
    assert not unknown, f"README line {ex['line']} ({ex['text']}): fpe {command} has no {sorted(unknown)}"


def test_every_flag_named_in_the_prose_exists():
    """Inline `--flag`s in Typical use, Commands, File formats and Reliability belong to some command."""
    text = "".join(section(h) for h in ("Typical use", "Commands", "File formats", "Reliability"))
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    named = {f for span in ticks(text) if not span.startswith(("python ", "bash ", ".venv"))
             for f in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span)}
    every = set().union(*(options_of(c) for c in CLICK.commands)) | {"--help", "-h"}
    assert len(named) >= 20
    assert not named - every, f"flags in the README that no command has: {sorted(named - every)}"


def _recipe_yaml() -> str:
    (block,) = re.findall(r"```yaml\n(.*?)```", README, re.S)
    return "\n".join(line[2:] if line.startswith("  ") else line for line in block.splitlines()) + "\n"


def _build(name: str, d: Path) -> None:
    """Create an input an example reads, the way the README's workflow makes it."""
    p = d / name
    if p.exists():
        return
    quiet = ["-q", "--probe-samples", "0"]
    if name in ("model.safetensors", "dense.safetensors", "a.safetensors"):
        shutil.copy(SAMPLES / "digits_mlp.safetensors", p)
    elif name == "dnf.safetensors":
        shutil.copy(SAMPLES / "dnf_mlp.safetensors", p)
    elif name == "clauses.json":
        shutil.copy(SAMPLES / "dnf_clauses.json", p)
    elif name == "recipe.yaml":
        p.write_text(_recipe_yaml())
    elif name == "deep.safetensors":  # `--targets 're:layers\.[0-2]' --ignore layers.1`: layers.N names
        torch.manual_seed(0)
        widths = [10, 8, 8, 8, 8, 4]
        t = {}
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            lin = torch.nn.Linear(a, b)
            t[f"layers.{i}.weight"], t[f"layers.{i}.bias"] = lin.weight.detach(), lin.bias.detach()
        save_tensors(p, t)
    elif name == "plan.safetensors":
        _build("model.safetensors", d)
        assert run_cli(["expand", d / "model.safetensors", "--alpha", "2", "--split", "gram", "--seed", "1",
                        "-o", d / "_planned.safetensors", "--save-plan", p, *quiet]).exit_code == 0
    elif name == "dnf.clause.safetensors":
        _build("dnf.safetensors", d)
        _build("clauses.json", d)
        assert run_cli(["expand", d / "dnf.safetensors", "--alpha", "2", "--split", "clause", "--clause-map",
                        d / "clauses.json", "-o", p, *quiet]).exit_code == 0
    elif name == "b.safetensors":
        _build("a.safetensors", d)
        assert run_cli(["expand", d / "a.safetensors", "--alpha", "2", "-o", p, *quiet]).exit_code == 0
    elif name.endswith(".fpe4.safetensors"):
        src = name.replace(".fpe4.safetensors", ".safetensors")
        _build(src, d)
        assert run_cli(["expand", d / src, "--alpha", "4", "-o", p, *quiet]).exit_code == 0
    elif name.endswith(".ft.safetensors"):
        src = name.replace(".ft.safetensors", ".safetensors")
        _build(src, d)
        assert run_cli(["finetune", d / src, "--data", "digits", "--epochs", "1", "--checkpoint-every", "0",
                        "-o", p, "-q"]).exit_code == 0
    else:
        raise AssertionError(f"no fixture for {name}")


def _inputs(argv: list[str]) -> list[str]:
    command, args = argv[0], argv[1:]
    takes_value = {o for p in CLICK.commands[command].params if p.param_type_name == "option"
                   and not getattr(p, "is_flag", False) for o in p.opts}
    inputs, i = [], 0
    while i < len(args):
        a = args[i]
        if a in takes_value:
            if a in ("--source", "--plan", "--recipe") or (a == "--clause-map" and command == "expand"):
                inputs.append(args[i + 1])
            i += 2
            continue
        if not a.startswith("-") and command != "data":
            inputs.append(a)
        i += 1
    return inputs


def _jq_split(text: str, sep: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "{[" and 1 or 0
        depth -= ch in "}]" and 1 or 0
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur]


def _jq_path(value, path: str) -> list:
    path = path.strip()
    assert re.fullmatch(r"(\.[A-Za-z_]\w*|\[\d*\])+|\.", path), f"mini-jq cannot read {path!r}"
    cur = [value]
    for name, idx in re.findall(r"\.([A-Za-z_]\w*)|\[(\d*)\]", path):
        if name:
            for c in cur:
                assert isinstance(c, dict) and name in c, f"jq path {path}: no key {name!r}"
            cur = [c[name] for c in cur]
        elif idx == "":
            cur = [x for c in cur for x in c]
        else:
            cur = [c[int(idx)] for c in cur]
    return cur


def jq(doc, filt: str) -> list:
    """The subset of jq the README uses: paths, `a, b`, `x[] | {k, k2: .p}`. Missing keys fail."""
    values = [doc]
    for stage in (s.strip() for s in _jq_split(filt, "|")):
        out = []
        for v in values:
            if stage.startswith("{"):
                obj = {}
                for entry in (e.strip() for e in _jq_split(stage[1:-1], ",")):
                    key, _, path = entry.partition(":")
                    (obj[key.strip()],) = _jq_path(v, path if path else "." + key.strip())
                out.append(obj)
            else:
                for p in _jq_split(stage, ","):
                    out.extend(_jq_path(v, p))
        values = out
    return values


def _interrupt_first_run(argv: list[str], monkeypatch) -> None:
    """Run `argv` without `--resume` and stop it with Ctrl-C in its second epoch, leaving a resume state."""
    import fpe_cli.train as train_mod

    real_epoch, calls = train_mod._epoch, []

    def dying_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_mod, "_epoch", dying_epoch)
    assert run_cli([a for a in argv if a != "--resume"]).exit_code == 130
    monkeypatch.setattr(train_mod, "_epoch", real_epoch)


@pytest.mark.parametrize("ex", [e for e in EXAMPLES if e["runnable"]], ids=lambda e: f"L{e['line']}-{e['argv'][0]}")
def test_example_runs_and_exits_0(ex, tmp_path, monkeypatch):
    """Each README example, in a fresh directory holding the inputs it names (epochs cut to 1; an example
    with `--resume` continues a first run of itself interrupted in its second of 3 epochs)."""
    argv = list(ex["argv"])
    resume = "--resume" in argv
    if "--epochs" in argv:
        argv[argv.index("--epochs") + 1] = "3" if resume else "1"
    if resume:
        argv[argv.index("--checkpoint-every") + 1] = "1"
    for name in _inputs(argv):
        _build(name, tmp_path)
    if resume:
        _interrupt_first_run(argv, monkeypatch)
        assert list(tmp_path.glob("*.resume.safetensors")), "the interrupted run left no resume state"
    res = run_cli(argv)
    assert res.exception is None and res.exit_code == 0, (
        f"README line {ex['line']}: {ex['text']}\nexit {res.exit_code}\n{res.stderr}")
    if ex["jq"]:
        values = jq(json.loads(res.stdout), ex["jq"])
        assert values and all(v is not None for v in values), (ex["jq"], values)
    if ex["arrow"]:
        assert (tmp_path / ex["arrow"]).is_file(), f"README line {ex['line']} promises {ex['arrow']}"
    if resume:
        assert not list(tmp_path.glob("*.resume.safetensors")), "the resume state outlived the finished run"


def test_typical_use_runs_in_order_in_one_directory(tmp_path):
    """The Typical use block as one script (epochs cut to 1): each step reads what the one before wrote."""
    block = section("Typical use")
    steps = [e for e in EXAMPLES if e["where"] == "Typical use"]
    assert len(steps) >= 6 and steps[0]["argv"][0] == "train"
    for ex in steps:
        argv = list(ex["argv"])
        if "--epochs" in argv:
            argv[argv.index("--epochs") + 1] = "1"
        res = run_cli(argv)
        assert res.exit_code == 0, (ex["text"], res.stderr)
    assert "same weight count" in block
    res = run_cli(["evaluate", "model.safetensors", "model.fpe4.ft.safetensors", "--data", "digits", "--json"])
    weights = [m["weights"] for m in res.json()["models"]]
    assert weights[0] == weights[1]


# ---------------------------------------------------------------- 2. documented defaults


def test_documented_defaults_match_the_options():
    cmds = section("Commands")
    assert re.search(r"`--probe-samples N`, default (\d+)", cmds).group(1) == str(default_of("expand", "--probe-samples"))
    assert "(default `4*alpha`)" in cmds and "[default: 4*alpha]" in " ".join(run_cli(["expand", "--help"]).stdout.split())
    every = re.search(r"`finetune` writes one every (\d+) epochs by default", cmds).group(1)
    assert str(default_of("finetune", "--checkpoint-every")) == every
    assert "`train` writes none unless asked" in " ".join(cmds.split())
    assert default_of("train", "--checkpoint-every") == 0
    top = re.search(r"top-(\d+) neurons", cmds).group(1)
    assert str(default_of("analyze", "--top")) == top
    assert "`packed` layout (default)" in section("File formats")
    assert default_of("expand", "--layout") == "packed"


def test_default_output_names_are_the_documented_ones(tmp_path):
    cmds = section("Commands")
    exp = re.search(r"No `-o` writes `MODEL\.fpe<alpha>\.safetensors` beside the input", cmds)
    ft = re.search(r"\(default `MODEL\.ft\.safetensors`\)", cmds)
    assert exp and ft
    sub = tmp_path / "sub"
    sub.mkdir()
    save_mlp(sub / "net.safetensors", [64, 6, 10])
    assert run_cli(["expand", sub / "net.safetensors", "--alpha", "3", "-q", "--probe-samples", "0"]).exit_code == 0
    assert (sub / "net.fpe3.safetensors").is_file()
    assert run_cli(["finetune", sub / "net.fpe3.safetensors", "--data", "digits", "--epochs", "1", "-q"]).exit_code == 0
    assert (sub / "net.fpe3.ft.safetensors").is_file()
    assert not list(sub.glob("*.resume.safetensors"))  # the state is removed once the output is written


def test_gram_clusters_default_is_4_alpha(tmp_path):
    m = save_mlp(tmp_path / "m.safetensors", [16, 6, 3])
    a = run_cli(["expand", m, "--alpha", "2", "--split", "gram", "-o", tmp_path / "a.safetensors", "--probe-samples", "0"])
    b = run_cli(["expand", m, "--alpha", "2", "--split", "gram", "--clusters", "8", "-o", tmp_path / "b.safetensors",
                 "--probe-samples", "0"])
    assert a.exit_code == b.exit_code == 0
    ta, tb = load_np(tmp_path / "a.safetensors"), load_np(tmp_path / "b.safetensors")
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


# ---------------------------------------------------------------- 3. File formats: names, dtypes, metadata


@pytest.fixture
def written(tmp_path):
    """A source 12-8-3 and its alpha-2 expansions: packed, dense, tied packed, tied dense; and a plan."""
    src = save_mlp(tmp_path / "src.safetensors", [12, 8, 3])
    out = {"src": src}
    for key, extra in {"packed": [], "dense": ["--layout", "dense"], "tie": ["--outgoing", "tie"],
                       "tie_dense": ["--outgoing", "tie", "--layout", "dense"]}.items():
        out[key] = tmp_path / f"{key}.safetensors"
        more = ["--save-plan", tmp_path / "plan.safetensors"] if key == "packed" else []
        res = run_cli(["expand", src, "--alpha", "2", "-o", out[key], "--probe-samples", "0", "-q", *extra, *more])
        assert res.exit_code == 0, res.stderr
    out["plan"] = tmp_path / "plan.safetensors"
    return out


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "np") as f:
        return f.metadata()


def _metadata_paragraph() -> str:
    return paragraph(section("File formats"), "Metadata (strings only;")


def test_every_metadata_key_the_readme_lists_is_written(written):
    para = _metadata_paragraph()
    keys = {s.split(":")[0] for s in ticks(para) if s.startswith("fpe.") or s.startswith("format:")}
    assert len(keys) >= 12, keys
    for layout in ("packed", "dense"):
        missing = keys - set(_meta(written[layout]))
        assert not missing, f"{layout}: listed in the README but not written: {sorted(missing)}"
    assert _meta(written["packed"])["format"] == "pt" and _meta(written["packed"])["fpe.kind"] == "expanded"


def test_metadata_encoding_is_the_documented_one(written):
    """Plain text for the keys listed as such; JSON-encoded values for the rest."""
    para = " ".join(_metadata_paragraph().split())
    plain_part, json_part = para.split("JSON-encoded values for the rest", 1)
    plain = [s.split(":")[0] for s in ticks(plain_part) if s.startswith(("fpe.", "format"))]
    as_json = [s for s in ticks(json_part) if s.startswith("fpe.")]
    assert set(plain) == {"format", "fpe.version", "fpe.format_version", "fpe.layout", "fpe.activation", "fpe.kind",
                          "fpe.source_sha256", "fpe.source_file"}
    meta = _meta(written["packed"])
    wrong = [f"{k}={meta[k]!r} is JSON-quoted" for k in plain if meta[k].startswith('"')]
    for k in as_json:
        try:
            json.loads(meta[k])
        except ValueError:
            wrong.append(f"{k}={meta[k][:24]!r} is not JSON")
    assert not wrong, "README says: " + "; ".join(wrong)


def test_settings_and_budget_metadata_hold_what_the_readme_says(written):
    para = _metadata_paragraph()
    items = re.search(r"`fpe\.settings` \(([^)]*)\)", " ".join(para.split())).group(1).split(", ")
    wanted = {re.sub(r" rule$", "", i.strip()).replace(" ", "_") for i in items}
    settings = json.loads(_meta(written["packed"])["fpe.settings"])
    assert wanted <= set(settings), wanted - set(settings)
    budget = json.loads(_meta(written["packed"])["fpe.budget"])
    assert budget["weights"] == 12 * 8 + 8 * 3 == sum(budget["source_weights"]) and budget["source_biases"] == 11
    recipe = json.loads(_meta(written["packed"])["fpe.recipe"])
    assert all({"alpha", "split"} <= set(t) for t in recipe["targets"])


def test_packed_layout_tensors_names_dtypes_shapes(written):
    para = paragraph(section("File formats"), "Output, `packed` layout (default)")
    names = sorted({s for s in ticks(para) if s.endswith(":K")})
    assert names == ["fpe.children:K", "fpe.shape:K", "fpe.values:K", "fpe.zmask:K"], names
    t = load_np(written["packed"])
    for k in ("0.weight", "2.weight"):
        for n in ("fpe.values", "fpe.zmask", "fpe.shape"):
            assert f"{n}:{k}" in t
        assert t[f"fpe.zmask:{k}"].dtype == np.uint8 and t[f"fpe.zmask:{k}"].ndim == 1
        assert t[f"fpe.shape:{k}"].dtype == np.int64
    assert t["fpe.shape:0.weight"].tolist() == [16, 12] and t["fpe.shape:2.weight"].tolist() == [3, 16]
    ch = t["fpe.children:0.weight"]
    assert ch.dtype == np.int32 and ch.shape == (8,) and ch.sum() == 16  # one entry per parent
    assert "0.bias" in t and "2.bias" in t and "0.weight" not in t


def test_dense_layout_tensors_names_dtypes(written):
    para = paragraph(section("File formats"), "Output, `dense` layout")
    assert "`fpe.mask:K` (bool)" in para and "`fpe.children:K`" in para
    t = load_np(written["dense"])
    assert t["0.weight"].shape == (16, 12) and t["fpe.mask:0.weight"].dtype == np.bool_
    assert t["fpe.mask:0.weight"].shape == t["0.weight"].shape
    assert np.all(t["0.weight"][~t["fpe.mask:0.weight"]] == 0)
    assert t["fpe.children:0.weight"].dtype == np.int32


def test_tied_columns_format(written):
    para = paragraph(section("File formats"), "Tied columns (`--outgoing tie`)")
    assert "`fpe.tied:K` (int32" in para and "`[out, parents]`" in para
    packed, dense = load_np(written["tie"]), load_np(written["tie_dense"])
    tied = packed["fpe.tied:2.weight"]
    assert tied.dtype == np.int32 and np.array_equal(tied, packed["fpe.children:0.weight"])  # lineage before
    assert packed["fpe.shape:2.weight"].tolist() == [3, 8]  # each shared column once
    w = dense["2.weight"]
    assert w.shape == (3, 16)
    assert np.array_equal(w, np.repeat(w[:, np.cumsum(tied) - tied], tied, axis=1))  # every copy stored, equal


def test_format_versions_are_the_documented_ones(written):
    para = paragraph(section("File formats"), "Tied columns (`--outgoing tie`)")
    packed = re.search(r"(\d+) for packed files", para).group(1)
    tied_dense = re.search(r"(\d+) for dense files with tied columns", para).group(1)
    dense = re.search(r"(\d+) for other dense files", para).group(1)
    assert _meta(written["packed"])["fpe.format_version"] == packed
    assert _meta(written["tie"])["fpe.format_version"] == packed
    assert _meta(written["tie_dense"])["fpe.format_version"] == tied_dense
    assert _meta(written["dense"])["fpe.format_version"] == dense


def test_header_is_written_with_sorted_keys(written):
    _, header = read_header_raw(written["packed"])
    names = [k for k in header if k != "__metadata__"]
    assert names == sorted(names) and list(header["__metadata__"]) == sorted(header["__metadata__"])


def test_split_plan_format(tmp_path):
    para = paragraph(section("File formats"), "Split plan (`--save-plan`/`--plan`)")
    assert "`plan.child:K` (int16" in para and "-1 where the parent has no edge" in para
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with torch.no_grad():
        net[0].weight[2, 5] = 0.0  # a missing edge: no mask, so a zero weight does not exist
    src = save_tensors(tmp_path / "src.safetensors", {k: v.detach().clone() for k, v in net.state_dict().items()})
    plan = tmp_path / "plan.safetensors"
    res = run_cli(["expand", src, "--alpha", "3", "--seed", "5", "--save-plan", plan, "-o", tmp_path / "o.safetensors",
                   "--probe-samples", "0"])
    assert res.exit_code == 0, res.stderr
    child = load_np(plan)["plan.child:0.weight"]
    assert child.dtype == np.int16 and child.shape == (8, 12) and child[2, 5] == -1
    assert (child[np.arange(8) != 2] >= 0).all()
    meta = json.loads(_meta(plan)["fpe.plan"])
    assert meta["seed"] == 5 and meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert all({"alpha", "split"} <= set(layer) for layer in meta["layers"])


def test_plan_refuses_the_options_the_readme_lists(tmp_path):
    para = paragraph(section("File formats"), "Split plan (`--save-plan`/`--plan`)")
    sentence = re.search(r"own seed; (.*?) are refused beside it", " ".join(para.split())).group(1)
    flags = re.findall(r"`(--[a-z-]+)`", sentence)
    assert set(flags) == {"--split", "--group-size", "--clusters", "--expand-top", "--seed"}
    src = save_mlp(tmp_path / "src.safetensors", [12, 8, 3])
    plan = tmp_path / "plan.safetensors"
    assert run_cli(["expand", src, "--alpha", "2", "--seed", "1", "--save-plan", plan, "-o", tmp_path / "x.safetensors",
                    "--probe-samples", "0"]).exit_code == 0
    value = {"--split": "random", "--group-size": "4", "--clusters": "4", "--expand-top": "4", "--seed": "7"}
    for flag in flags:
        res = run_cli(["expand", src, "--plan", plan, flag, value[flag], "-o", tmp_path / "y.safetensors"])
        assert_one_error_line(res, flag)
    assert not (tmp_path / "y.safetensors").exists()


def test_clause_map_in_every_documented_form_gives_the_same_expansion(tmp_path):
    para = paragraph(section("File formats"), "Clause map (`--clause-map`, JSON or YAML)")
    assert "one group id per input" in para and "`{input: group}`" in para and "`-1`/`null`" in para
    src = save_mlp(tmp_path / "src.safetensors", [9, 4, 2])
    groups = [[0, 1, 2], [3, 4], [6, 7, 8]]  # input 5 in no group
    ids = [0, 0, 0, 1, 1, None, 2, 2, 2]
    forms = {"groups.json": json.dumps({"groups": groups}), "list.json": json.dumps(ids),
             "ids_minus1.json": json.dumps([-1 if i is None else i for i in ids]),
             "map.json": json.dumps({str(i): g for i, g in enumerate(ids) if g is not None}),
             "groups.yaml": "groups:\n" + "".join(f"  - {g}\n" for g in groups)}
    results = {}
    for name, text in forms.items():
        (tmp_path / name).write_text(text)
        out = tmp_path / f"out.{name}.safetensors"
        res = run_cli(["expand", src, "--alpha", "2", "--split", "clause", "--clause-map", tmp_path / name, "-o", out,
                       "--probe-samples", "0"])
        assert res.exit_code == 0, (name, res.stderr)
        results[name] = load_np(out)
    ref = results["groups.json"]
    for name, t in results.items():
        assert all(np.array_equal(ref[k], t[k]) for k in ref), name


def test_input_naming_conventions_the_readme_lists(tmp_path):
    """`layers.N` in natural order (`layers.10` after `layers.9`), `W1`/`b1`, words ordered by shapes,
    activation from the `activation` metadata key, safetensors read whatever its name."""
    text = section("File formats")
    assert "`layers.10` follows `layers.9`" in text and "`W1`/`b1`" in text and "`activation`)" in text
    torch.manual_seed(0)
    t = {}
    for i in range(12):
        lin = torch.nn.Linear(5, 5 if i < 11 else 3)
        t[f"layers.{i}.weight"], t[f"layers.{i}.bias"] = lin.weight.detach(), lin.bias.detach()
    save_tensors(tmp_path / "nat.safetensors", t, {"activation": "tanh"})
    doc = run_cli(["inspect", tmp_path / "nat.safetensors", "--json"]).json()
    assert [c["weight"] for c in doc["chain"]] == [f"layers.{i}.weight" for i in range(12)]
    assert doc["activation"] == "tanh" and doc["activation_source"] == "metadata"
    w = {"W1": torch.randn(6, 4), "b1": torch.randn(6), "W2": torch.randn(2, 6), "b2": torch.randn(2)}
    save_tensors(tmp_path / "w.bin", w)  # a safetensors file under a pickle-ish name
    doc = run_cli(["inspect", tmp_path / "w.bin", "--json"]).json()
    assert [(c["weight"], c["bias"]) for c in doc["chain"]] == [("W1", "b1"), ("W2", "b2")]
    words = {"output_layer.weight": torch.randn(3, 7), "input_layer.weight": torch.randn(9, 4),
             "hidden_layer.weight": torch.randn(7, 9)}
    save_tensors(tmp_path / "words.safetensors", words)
    doc = run_cli(["inspect", tmp_path / "words.safetensors", "--json"]).json()
    assert [c["weight"] for c in doc["chain"]] == ["input_layer.weight", "hidden_layer.weight", "output_layer.weight"]


def _kept_dtypes() -> list[str]:
    m = re.search(r"((?:b?float\d+, )*b?float\d+,? and b?float\d+) are kept as they are",
                  " ".join(section("File formats").split()))
    assert m, "README no longer lists the dtypes that are kept"
    return re.findall(r"b?float\d+", m.group(1))


@pytest.mark.parametrize("dtype", _kept_dtypes())
def test_the_dtypes_the_readme_lists_are_kept(tmp_path, dtype):
    src = save_mlp(tmp_path / "h.safetensors", [12, 8, 3], dtype=getattr(torch, dtype))
    for layout in ("packed", "dense"):
        out = tmp_path / f"{layout}.safetensors"
        res = run_cli(["expand", src, "--alpha", "2", "--layout", layout, "-o", out, "--probe-samples", "0"])
        assert res.exit_code == 0, res.stderr
        assert {c["dtype"] for c in run_cli(["inspect", out, "--json"]).json()["chain"]} == {dtype}


def test_a_norm_at_a_hidden_width_is_refused_with_the_layers_hint(tmp_path):
    torch.manual_seed(0)
    t = {"fc1.weight": torch.randn(8, 6), "fc1.bias": torch.randn(8), "bn1.weight": torch.ones(8),
         "bn1.bias": torch.zeros(8), "bn1.running_mean": torch.zeros(8), "bn1.running_var": torch.ones(8),
         "fc2.weight": torch.randn(3, 8), "fc2.bias": torch.randn(3)}
    save_tensors(tmp_path / "bn.safetensors", t)
    assert_one_error_line(run_cli(["expand", tmp_path / "bn.safetensors", "--alpha", "2"]), "--layers", "running_var")


# ---------------------------------------------------------------- 4. commands: behaviour the prose promises


def test_splits_do_what_the_readme_says(tmp_path):
    """structured: edge k -> child k mod alpha; random: part sizes differ by at most one; --group-size:
    one partition per group of G parents; --expand-top: a count or a fraction < 1 of the neurons."""
    src = save_mlp(tmp_path / "s.safetensors", [14, 8, 3])

    def plan(*args):
        p = tmp_path / f"plan{len(list(tmp_path.iterdir()))}.safetensors"
        res = run_cli(["expand", src, *args, "--save-plan", p, "-o", p.with_suffix(".out"), "--probe-samples", "0"])
        assert res.exit_code == 0, res.stderr
        return load_np(p)["plan.child:0.weight"]

    assert np.array_equal(plan("--alpha", "3", "--split", "structured"), np.tile(np.arange(14) % 3, (8, 1)))
    for row in plan("--alpha", "3", "--split", "random", "--seed", "4"):
        sizes = np.bincount(row, minlength=3)
        assert sizes.max() - sizes.min() <= 1
    g = plan("--alpha", "2", "--group-size", "4", "--seed", "2")
    assert all(np.array_equal(g[i], g[i // 4 * 4]) for i in range(8))
    for top, parents in (("2", 2), ("0.25", 2)):
        out = tmp_path / f"top{top}.safetensors"
        assert run_cli(["expand", src, "--alpha", "2", "--expand-top", top, "-o", out, "--probe-samples", "0"]).exit_code == 0
        assert int((load_np(out)["fpe.children:0.weight"] > 1).sum()) == parents


@pytest.mark.parametrize("extra", [[], ["--split", "structured"], ["--split", "gram"], ["--outgoing", "split"],
                                   ["--outgoing", "tie"], ["--layout", "dense"]])
def test_budget_holds_exactly_and_verify_source_passes(tmp_path, extra):
    src = save_mlp(tmp_path / "s.safetensors", [12, 8, 8, 3])
    res = run_cli(["expand", src, "--alpha", "3", *extra, "-o", tmp_path / "o.safetensors", "--json", "--probe-samples", "0"])
    doc = res.json()
    assert doc["budget_holds"] and doc["weights_after"] == doc["budget"] == 12 * 8 + 8 * 8 + 8 * 3
    assert run_cli(["verify", tmp_path / "o.safetensors", "--source", src]).exit_code == 0
    params = run_cli(["params", tmp_path / "o.safetensors", "--json"]).json()
    assert params["total"]["weights"] == doc["budget"] and params["budget_holds"] is True


def test_children_copy_the_parents_bias(tmp_path):
    src = save_mlp(tmp_path / "s.safetensors", [12, 8, 3])
    assert run_cli(["expand", src, "--alpha", "3", "-o", tmp_path / "o.safetensors", "--probe-samples", "0"]).exit_code == 0
    out, before = load_np(tmp_path / "o.safetensors"), load_np(src)
    assert np.array_equal(out["0.bias"], np.repeat(before["0.bias"], out["fpe.children:0.weight"]))


def test_same_inputs_and_seed_give_a_byte_identical_file(tmp_path):
    src = save_mlp(tmp_path / "s.safetensors", [12, 8, 3])
    for name in ("a", "b"):
        assert run_cli(["expand", src, "--alpha", "3", "--seed", "9", "-o", tmp_path / f"{name}.safetensors"]).exit_code == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_expand_output_rules(tmp_path):
    """Never overwrites without --force; the output may not be the input; alpha > edges is an error."""
    src = save_mlp(tmp_path / "s.safetensors", [5, 4, 2])
    assert run_cli(["expand", src, "--alpha", "2", "-q"]).exit_code == 0
    before = (tmp_path / "s.fpe2.safetensors").read_bytes()
    assert_one_error_line(run_cli(["expand", src, "--alpha", "2", "--seed", "3"]), "--force")
    assert (tmp_path / "s.fpe2.safetensors").read_bytes() == before
    assert run_cli(["expand", src, "--alpha", "2", "--seed", "3", "-f", "-q"]).exit_code == 0
    assert_one_error_line(run_cli(["expand", src, "--alpha", "2", "-o", src, "--force"]), "input")
    assert_one_error_line(run_cli(["expand", src, "--alpha", "6", "-o", tmp_path / "x.safetensors"]), "alpha 6")


def test_probe_samples_0_skips_the_drift_and_data_probes_test_inputs(tmp_path):
    src = save_mlp(tmp_path / "s.safetensors", [64, 6, 10])
    none = run_cli(["expand", src, "--alpha", "2", "-o", tmp_path / "a.safetensors", "--json", "--probe-samples", "0"])
    assert none.json()["drift"] is None
    doc = run_cli(["expand", src, "--alpha", "2", "-o", tmp_path / "b.safetensors", "--json", "--data", "digits"]).json()
    # relative L2 change of the outputs, max abs diff, cosine and argmax agreement
    assert {"relative_l2", "max_abs_diff", "cosine", "argmax_agreement"} <= set(doc["drift"])
    assert doc["drift"]["probe_samples"] == 256 and "test" in doc["drift"]["probe"]


def test_tied_copies_count_once_and_verify_checks_they_are_equal(tmp_path, written):
    params = run_cli(["params", written["tie"], "--json"]).json()
    assert params["total"]["weights"] == 12 * 8 + 8 * 3 and params["budget_holds"]
    t = load_np(written["tie_dense"])
    t["2.weight"] = t["2.weight"].copy()
    t["2.weight"][0, 1] += 1.0  # one copy of a shared column no longer equals its sibling
    from safetensors.numpy import save_file
    save_file(t, str(tmp_path / "broken.safetensors"), metadata=_meta(written["tie_dense"]))
    assert_one_error_line(run_cli(["verify", tmp_path / "broken.safetensors"]), code=3)


def test_verify_names_violations_with_exit_3_and_the_budget_rule(tmp_path, written):
    from safetensors.numpy import save_file
    t, meta = load_np(written["dense"]), _meta(written["dense"])
    off = np.argwhere(~t["fpe.mask:0.weight"])[0]
    t["0.weight"] = t["0.weight"].copy()
    t["0.weight"][tuple(off)] = 0.5
    save_file(t, str(tmp_path / "off.safetensors"), metadata=meta)
    assert_one_error_line(run_cli(["verify", tmp_path / "off.safetensors"]), "off the mask", code=3)
    # an expanded file without a recorded budget is a violation unless --source is given
    nob = {k: v for k, v in meta.items() if k != "fpe.budget"}
    save_file(load_np(written["dense"]), str(tmp_path / "nob.safetensors"), metadata=nob)
    assert_one_error_line(run_cli(["verify", tmp_path / "nob.safetensors"]), "budget", code=3)
    assert run_cli(["verify", tmp_path / "nob.safetensors", "--source", written["src"]]).exit_code == 0


def test_convert_is_lossless_and_refuses_off_mask_weights(tmp_path, written):
    from safetensors.numpy import save_file
    d, p = tmp_path / "d.safetensors", tmp_path / "p.safetensors"
    assert run_cli(["convert", written["packed"], "--layout", "dense", "-o", d]).exit_code == 0
    assert run_cli(["convert", d, "--layout", "packed", "-o", p]).exit_code == 0
    a, b = load_np(written["packed"]), load_np(p)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    t = load_np(d)
    t["2.weight"] = t["2.weight"].copy()
    t["2.weight"][tuple(np.argwhere(~t["fpe.mask:2.weight"])[0])] = 1.0
    save_file(t, str(tmp_path / "bad.safetensors"), metadata=_meta(d))
    assert "is refused (exit 3)" in section("`fpe convert`")
    assert_one_error_line(run_cli(["convert", tmp_path / "bad.safetensors", "--layout", "packed", "-o",
                                   tmp_path / "x.safetensors"]), code=3)
    assert not (tmp_path / "x.safetensors").exists()


def test_data_writes_the_documented_keys_and_dnf_defaults(tmp_path):
    sec = section("`fpe data`")
    keys = set(re.search(r"\(`(x_train[^`]*)`", sec).group(1).split(", "))
    keys |= set(re.findall(r"`(\w+)`", re.search(r"plus (`num_classes`.*?)and `info`", sec, re.S).group(1))) | {"info"}
    res = run_cli(["data", "dnf", "-o", tmp_path / "d.npz", "--clause-map", tmp_path / "c.json", "-q"])
    assert res.exit_code == 0, res.stderr
    z = np.load(tmp_path / "d.npz", allow_pickle=False)
    assert keys == {"x_train", "y_train", "x_test", "y_test", "num_classes", "name", "info"} and keys <= set(z.files)
    defaults = re.search(r"`dnf:key=value,\.\.\.` \(defaults `([^`]*)`", section("Data"), re.S).group(1)
    spec = ",".join(kv.split("|")[0] for kv in defaults.replace("\n", " ").replace(" ", "").split(","))
    assert str(z["name"]) == f"dnf:{spec}"
    assert "groups" in json.loads((tmp_path / "c.json").read_text())
    assert_one_error_line(run_cli(["data", "dnf", "-o", tmp_path / "d.npz"]), "--force")
    assert run_cli(["data", "dnf", "-o", tmp_path / "d.npz", "--force", "-q"]).exit_code == 0


def test_train_writes_plain_sequential_names_and_its_metadata(tmp_path):
    sec = section("`fpe train`")
    keys = re.findall(r"`(fpe\.train\.\w+)`", sec)
    assert sorted(keys) == ["fpe.train.data", "fpe.train.metrics", "fpe.train.settings"]
    out = tmp_path / "t.safetensors"
    assert run_cli(["train", "--data", "digits", "--hidden", "5,4", "--epochs", "1", "-o", out, "-q"]).exit_code == 0
    meta = _meta(out)
    assert set(keys) <= set(meta) and meta["fpe.layout"] == "plain"
    data = json.loads(meta["fpe.train.data"])
    assert {"name", "sha256", "train", "test"} <= set(data)  # name, sha256, sizes
    assert set(load_np(out)) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}


def test_finetune_metadata_layout_and_lineage(tmp_path):
    sec = section("`fpe finetune`")
    m = re.search(r"`fpe\.finetune\.(\w+)/\.(\w+)/\.(\w+)` \(([^)]*)\)", sec)
    keys = [f"fpe.finetune.{m.group(i)}" for i in (1, 2, 3)]
    metrics_keys = set(m.group(4).split(", "))
    src = save_mlp(tmp_path / "s.safetensors", [64, 6, 10])
    exp = tmp_path / "e.safetensors"
    assert run_cli(["expand", src, "--alpha", "2", "--layout", "dense", "-o", exp, "--probe-samples", "0"]).exit_code == 0
    out = tmp_path / "e.ft.safetensors"
    assert run_cli(["finetune", exp, "--data", "digits", "--epochs", "1", "-o", out, "-q"]).exit_code == 0
    meta = _meta(out)
    assert set(keys) <= set(meta) and metrics_keys == {"before", "train", "test"}
    assert metrics_keys <= set(json.loads(meta["fpe.finetune.metrics"]))
    assert meta["fpe.layout"] == "dense"  # writes the same layout back
    assert run_cli(["verify", out, "--source", src]).exit_code == 0  # the expansion record is kept


def test_finetune_refusals_and_exit_codes(tmp_path):
    sec = " ".join(section("`fpe finetune`").split())
    assert "Non-finite or negative lr, momentum or weight decay is refused (exit 2)" in sec
    assert "Training that diverges to NaN/Inf exits 3 and writes nothing" in sec
    src = save_mlp(tmp_path / "s.safetensors", [64, 6, 10])
    for flag, value in (("--lr", "-1"), ("--lr", "nan"), ("--momentum", "inf"), ("--weight-decay", "-0.5")):
        res = run_cli(["finetune", src, "--data", "digits", flag, value, "-o", tmp_path / "x.safetensors"])
        assert_one_error_line(res, code=2)
    res = run_cli(["finetune", src, "--data", "digits", "--lr", "1e30", "--epochs", "2", "-o", tmp_path / "x.safetensors"])
    assert_one_error_line(res, "lr", code=3)
    assert not list(tmp_path.glob("x*"))
    # an expanded file that breaks FPE's invariants (a dropped mask) is refused, naming them (exit 3)
    from safetensors.numpy import save_file
    exp = tmp_path / "e.safetensors"
    assert run_cli(["expand", src, "--alpha", "2", "--layout", "dense", "-o", exp, "--probe-samples", "0"]).exit_code == 0
    t = load_np(exp)
    del t["fpe.mask:0.weight"]
    save_file(t, str(tmp_path / "nomask.safetensors"), metadata=_meta(exp))
    res = run_cli(["finetune", tmp_path / "nomask.safetensors", "--data", "digits", "-o", tmp_path / "y.safetensors"])
    assert_one_error_line(res, "mask", code=3)
    assert not (tmp_path / "y.safetensors").exists()


def test_analyze_json_schema_matches_the_readme(tmp_path):
    sec = section("`fpe analyze`")
    schema = re.search(r"schema `([^`]+)` \(NaN as null\):\s*`(.*?)`\. `--csv`", sec, re.S)
    name, spec_text = schema.group(1), " ".join(schema.group(2).split())
    tokens = re.findall(r"\.\.\.|[A-Za-z_]\w*|[{}\[\]:,|]", spec_text)
    pos = [0]

    def take():
        pos[0] += 1
        return tokens[pos[0] - 1]

    def value():
        tok = take()
        if tok == "{":
            return obj()
        if tok == "[":
            inner = value()
            while tokens[pos[0]] != "]":
                take()
            take()
            return [inner]
        if tok == "null" and tokens[pos[0]] == "|":
            take()
            return ("nullable", value())
        return tok

    def obj():
        keys, open_ = {}, False
        while (tok := take()) != "}":
            if tok == ",":
                continue
            if tok == "...":
                open_ = True
                continue
            if tokens[pos[0]] == ":":
                take()
                keys[tok] = value()
            else:
                keys[tok] = None
        return {"keys": keys, "open": open_}

    assert take() == "{"
    spec = obj()

    def check(doc, sp, where):
        if isinstance(sp, tuple):
            return check(doc, sp[1], where) if doc is not None else None
        if isinstance(sp, list):
            assert isinstance(doc, list) and doc, where
            return [check(d, sp[0], f"{where}[]") for d in doc]
        if isinstance(sp, dict):
            assert isinstance(doc, dict), where
            missing = set(sp["keys"]) - set(doc)
            assert not missing, f"{where}: README names {sorted(missing)}, not in the document"
            for k, sub in sp["keys"].items():
                if sub not in (None, "..."):
                    check(doc[k], sub, f"{where}.{k}")

    src = save_mlp(tmp_path / "s.safetensors", [64, 6, 10])
    assert run_cli(["expand", src, "--alpha", "2", "-o", tmp_path / "e.safetensors", "--probe-samples", "0"]).exit_code == 0
    doc = run_cli(["analyze", src, tmp_path / "e.safetensors", "--data", "digits", "--json"]).json()
    assert doc["schema"] == name
    check(doc, spec, "doc")
    header = re.search(r"`--csv`: one row per neuron\s*\(`([^`]+)`\)", sec).group(1)
    csv = tmp_path / "n.csv"
    assert run_cli(["analyze", src, "--csv", csv, "-q"]).exit_code == 0
    assert csv.read_text().splitlines()[0] == header


def test_analyze_plots_are_the_files_the_readme_names(tmp_path):
    pytest.importorskip("matplotlib")
    sec = section("`fpe analyze`")
    names = set(re.findall(r"`(\w+\.png)`", paragraph(sec, "- `--plots DIR`")))
    assert names == {"gram.png", "weights.png", "capacity.png"}
    src = save_mlp(tmp_path / "s.safetensors", [8, 4, 2])
    assert run_cli(["analyze", src, "--plots", tmp_path / "plots", "-q"]).exit_code == 0
    assert {p.name for p in (tmp_path / "plots").iterdir()} == names


def test_analyze_numbers_quoted_for_the_dnf_sample(tmp_path):
    """`(mean 0.138 -> 0.213; non-sibling |cos| 0.129 -> 0.114)`, as scripts/make_analyze_plots.sh makes them."""
    m = re.search(r"mean ([\d.]+) -> ([\d.]+); non-sibling \|cos\| ([\d.]+) -> ([\d.]+)", section("`fpe analyze`"))
    cap0, cap1, cos0, cos1 = m.groups()
    exp = tmp_path / "dnf.clause.safetensors"
    assert run_cli(["expand", SAMPLES / "dnf_mlp.safetensors", "--alpha", "2", "--split", "clause", "--clause-map",
                    SAMPLES / "dnf_clauses.json", "-o", exp, "-q"]).exit_code == 0
    doc = run_cli(["analyze", SAMPLES / "dnf_mlp.safetensors", exp, "--json"]).json()
    (dense,), (wide,) = (m_["layers"] for m_ in doc["models"])
    assert f"{dense['metrics']['capacity_mean']:.3f}" == cap0 and f"{wide['metrics']['capacity_mean']:.3f}" == cap1
    assert f"{dense['metrics']['cosine_mean_abs_non_sibling']:.3f}" == cos0
    assert f"{wide['metrics']['cosine_mean_abs_non_sibling']:.3f}" == cos1


# ---------------------------------------------------------------- 5. the shell contract and Reliability


@pytest.mark.parametrize("command", ["expand", "convert", "data", "train", "finetune", "evaluate", "analyze",
                                     "params", "inspect", "verify"])
def test_tables_go_where_the_readme_says(tmp_path, command):
    """'diagnostics and tables for humans go to stderr (results of `params`/`inspect`/`verify`/`analyze`/`evaluate`
    to stdout)'."""
    claim = ("diagnostics and tables for humans go to stderr (results of `params`/`inspect`/`verify`/`analyze`/"
             "`evaluate` to stdout)")
    assert claim in section("Commands").replace("\n", " ")
    to_stdout = set(re.findall(r"`(\w+)`", claim.split("(", 1)[1]))
    src = save_mlp(tmp_path / "s.safetensors", [64, 6, 10])
    exp = tmp_path / "e.safetensors"
    assert run_cli(["expand", src, "--alpha", "2", "-o", exp, "-q"]).exit_code == 0
    argv = {"expand": ["expand", src, "--alpha", "2", "-o", tmp_path / "x.safetensors"],
            "convert": ["convert", exp, "--layout", "dense", "-o", tmp_path / "x.safetensors"],
            "data": ["data", "digits", "-o", tmp_path / "d.npz"],
            "train": ["train", "--data", "digits", "--hidden", "4", "--epochs", "1", "-o", tmp_path / "x.safetensors"],
            "finetune": ["finetune", exp, "--data", "digits", "--epochs", "1", "-o", tmp_path / "x.safetensors"],
            "evaluate": ["evaluate", src, exp, "--data", "digits"],
            "analyze": ["analyze", src],
            "params": ["params", exp], "inspect": ["inspect", exp], "verify": ["verify", exp]}[command]
    res = run_cli(argv)
    assert res.exit_code == 0, res.stderr
    if command in to_stdout:
        assert res.stdout.strip(), f"fpe {command}: its result should be on stdout"
    else:
        assert res.stdout == "", f"fpe {command} printed its table on stdout, the README says stderr:\n{res.stdout[:300]}"
        assert res.stderr.strip()


def _fpe_process(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "fpe_cli", *map(str, args)], stdout=kw.pop("stdout", subprocess.PIPE),
                            stderr=subprocess.PIPE, text=True, **kw)


def _exit_code_table() -> dict[int, str]:
    return {int(c): m for c, m in re.findall(r"^\| (\d+) \| (.+?) \|$", section("Reliability"), re.M)}


def test_exit_code_table_lists_0_1_2_3_130():
    assert sorted(_exit_code_table()) == [0, 1, 2, 3, 130]


@pytest.mark.parametrize("code", sorted(_exit_code_table()))
def test_each_documented_exit_code_occurs_in_its_situation(tmp_path, code):
    meaning = _exit_code_table()[code]
    src = save_mlp(tmp_path / "s.safetensors", [64, 6, 10])
    if code == 0:
        assert "success" in meaning and run_cli(["params", src]).exit_code == 0
    elif code == 1:
        # a closed stdout where something must be printed: one line, exit 1 (Scripts and terminals)
        proc = subprocess.run([sys.executable, "-m", "fpe_cli", "params", str(src), "--json"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=120, close_fds=True,
                              preexec_fn=lambda: __import__("os").close(1))
        assert proc.returncode == 1 and proc.stderr.count("Error: ") == 1 and "Traceback" not in proc.stderr
    elif code == 2:
        assert "missing" in meaning and "corrupt" in meaning
        assert_one_error_line(run_cli(["params", tmp_path / "missing.safetensors"]), code=2)
        (tmp_path / "corrupt.safetensors").write_bytes(b"\xff" * 64)
        assert_one_error_line(run_cli(["params", tmp_path / "corrupt.safetensors"]), code=2)
        assert_one_error_line(run_cli(["expand", src, "--alpha", "0"]), code=2)
    elif code == 3:
        assert "verification failed" in meaning
        from safetensors.numpy import save_file
        assert run_cli(["expand", src, "--alpha", "2", "--layout", "dense", "-o", tmp_path / "e.safetensors"]).exit_code == 0
        t = load_np(tmp_path / "e.safetensors")
        t["2.weight"] = t["2.weight"].copy()
        t["2.weight"][tuple(np.argwhere(~t["fpe.mask:2.weight"])[0])] = 1.0
        save_file(t, str(tmp_path / "bad.safetensors"), metadata=_meta(tmp_path / "e.safetensors"))
        assert_one_error_line(run_cli(["verify", tmp_path / "bad.safetensors"]), code=3)
    elif code == 130:
        assert "SIGTERM" in meaning
        out = tmp_path / "long.safetensors"
        proc = _fpe_process(["finetune", src, "--data", "digits", "--epochs", "100000", "--checkpoint-every", "1",
                             "-o", out], cwd=tmp_path)
        # training is under way once the first resume state is there (a fixed sleep flaked under load)
        wait_until(proc, lambda: (tmp_path / "long.resume.safetensors").exists())
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 130, (proc.returncode, err)
        assert err.strip().splitlines() == ["Error: interrupted"]
        assert not out.exists() and not list(tmp_path.glob(".long.safetensors.*.tmp"))


@pytest.mark.parametrize("argv", [["params", "nope.safetensors"], ["expand", "s.safetensors", "--alpha", "1"],
                                  ["evaluate", "s.safetensors", "--data", "nope.npz"]])
def test_with_json_stdout_stays_empty_on_failure(tmp_path, argv):
    save_mlp(tmp_path / "s.safetensors", [64, 6, 10])
    assert_one_error_line(run_cli([*argv, "--json"]), code=2)


def test_pickle_checkpoints_the_readme_lists_are_refused(tmp_path):
    bullet = paragraph(section("Reliability"), "- Pickle-based checkpoints")
    exts = re.findall(r"`(\.\w+)`", bullet.split("and `torch.save`")[0])
    assert exts == [".pt", ".pth", ".bin", ".ckpt", ".pkl"]
    state = {"0.weight": torch.randn(4, 3), "2.weight": torch.randn(2, 4)}
    for ext in [*exts, ".safetensors"]:  # torch.save content under any name
        p = tmp_path / f"model{ext}"
        torch.save(state, p)
        assert_one_error_line(run_cli(["inspect", p]), "pickle", code=2)


def test_outputs_that_would_destroy_an_input_are_refused_even_with_force(tmp_path):
    bullet = paragraph(section("Reliability"), "- Outputs that would destroy something")
    flags = re.findall(r"`(--[a-z-]+)`", bullet.split("even with `--force`")[0])
    assert flags == ["--plan", "--clause-map", "--recipe", "--data"]
    src = save_mlp(tmp_path / "s.safetensors", [6, 4, 2])
    plan = tmp_path / "p.safetensors"
    assert run_cli(["expand", src, "--alpha", "2", "--save-plan", plan, "-o", tmp_path / "o.safetensors"]).exit_code == 0
    (tmp_path / "c.json").write_text(json.dumps({"groups": [[0, 1], [2, 3], [4, 5]]}))
    (tmp_path / "r.yaml").write_text("alpha: 2\n")
    np.savez(tmp_path / "d.npz", x_train=np.random.rand(20, 6).astype(np.float32), y_train=np.arange(20) % 2,
             x_test=np.random.rand(10, 6).astype(np.float32), y_test=np.arange(10) % 2)
    cases = {"model": ["expand", src, "--alpha", "2", "-o", src],
             "--plan": ["expand", src, "--plan", plan, "-o", plan],
             "--clause-map": ["expand", src, "--alpha", "2", "--split", "clause", "--clause-map", tmp_path / "c.json",
                              "-o", tmp_path / "c.json"],
             "--recipe": ["expand", src, "--recipe", tmp_path / "r.yaml", "-o", tmp_path / "r.yaml"],
             "--data": ["finetune", src, "--data", tmp_path / "d.npz", "-o", tmp_path / "d.npz"]}
    assert set(flags) <= set(cases)
    for what, argv in cases.items():
        target = Path(argv[-1])
        before = target.read_bytes()
        assert_one_error_line(run_cli([*argv, "--force"]), code=2)
        assert target.read_bytes() == before, what
    assert_one_error_line(run_cli(["expand", src, "--alpha", "2", "-o", tmp_path, "--force"]), code=2)  # a directory
    assert_one_error_line(run_cli(["expand", src, "--alpha", "2", "-o", tmp_path / "no" / "x.safetensors"]), code=2)


def test_packed_size_ratios_quoted_in_file_formats(tmp_path):
    """'About 1.06x the dense input's size for one hidden layer and 1.10x for five layers (float32, alpha 4)'
    (measured here at 512 wide; the ratio barely moves with width: Performance quotes 1.065x and 1.10x)."""
    text = " ".join(section("File formats").split())
    m = re.search(r"About ([\d.]+)x the dense input's size for one hidden layer and ([\d.]+)x for five layers", text)
    assert m, "README no longer quotes the packed size ratios"
    for quoted, widths in ((float(m.group(1)), [512, 2048, 512]), (float(m.group(2)), [512] * 6)):
        src = save_mlp(tmp_path / "m.safetensors", widths)
        out = tmp_path / "o.safetensors"
        res = run_cli(["expand", src, "--alpha", "4", "-o", out, "--force", "-q", "--probe-samples", "0"])
        assert res.exit_code == 0, res.stderr
        ratio = out.stat().st_size / src.stat().st_size
        assert abs(ratio - quoted) <= 0.015, f"{len(widths) - 2} hidden layer(s): README {quoted}x, measured {ratio:.3f}x"
