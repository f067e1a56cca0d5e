"""Reliability and security (issue 7): bad input never crashes, nothing is lost, nothing unsafe is loaded.

- every command against each case of the generated corpus (tests/corpus/make_corpus.py): exit 2 (3 for
  a failed verification), one `Error:` line naming the problem, no traceback, input bytes untouched,
  no output or temp file left; a subset through a real `python -m fpe_cli` process;
- hypothesis fuzzing of the checkpoint and plan readers, and a memory ceiling for hostile headers;
- `fpe expand` and `fpe finetune` killed (SIGTERM, SIGKILL) mid-run: the output is the old file or
  absent, and `finetune --resume` reaches the uninterrupted run's exact bytes;
- no unsafe loading: pickles refused (and never executed), no torch.load/pickle in fpe_cli, outputs
  that are symlinks, directories or inputs refused;
- determinism: byte-identical `fpe expand` across runs and 1 vs 2 threads; train/finetune across runs.
"""

from __future__ import annotations

import ast
import atexit
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import typer.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import assert_one_error_line, listing, run_cli
from corpus.make_corpus import Case, join_file, make_corpus, read_all, split_file
from fpe_cli.checkpoint import load_checkpoint
from fpe_cli.plan_file import load_plan
from fpe_cli.cli.common import app
from fpe_cli.errors import FPEError
from fpe_cli.plan import validate_layer_plan
from fpe_cli.stfile import read_safetensors
from fpe_cli.verify import check_invariants

REPO = Path(__file__).resolve().parents[1]
COMMANDS = {c.name or c.callback.__name__ for c in app.registered_commands}

# The corpus is generated once per session, outside the repository, at collection time (its cases
# parametrize the tests); each test copies what it needs into its own tmp_path.
CORPUS = Path(tempfile.mkdtemp(prefix="fpe-corpus-"))
atexit.register(shutil.rmtree, CORPUS, True)
CASES: list[Case] = make_corpus(CORPUS)
BASES = ("plain.safetensors", "packed.safetensors", "dense.safetensors", "plan.safetensors", "good.npz")


_CLICK_COMMAND = typer.testing._get_command(app)


@pytest.fixture(autouse=True)
def _build_the_cli_once(monkeypatch):
    """run_cli rebuilds the Click command from the Typer app on every call (~20 ms); these tests make
    hundreds of calls, so build it once. The command itself is exactly the same object Typer builds."""
    monkeypatch.setattr(typer.testing, "_get_command", lambda _app: _CLICK_COMMAND)


def _argv(case: Case, command: str) -> list[str]:
    """How each command is called on a case (paths relative to the test's cwd)."""
    f = case.file
    if case.kind == "plan":
        return ["expand", "plain.safetensors", "--plan", f, "-o", "out.safetensors"]
    if case.kind == "data":
        return {
            "expand": ["expand", "plain.safetensors", "--alpha", "2", "--data", f, "-o", "out.safetensors"],
            "expand-activation": ["expand", "plain.safetensors", "--alpha", "2", "--split", "activation", "--data", f],
            "analyze": ["analyze", "plain.safetensors", "--data", f],
            "train": ["train", "--data", f, "--hidden", "4", "--epochs", "1", "-o", "trained.safetensors"],
            "finetune": ["finetune", "packed.safetensors", "--data", f, "--epochs", "1"],
            "evaluate": ["evaluate", "plain.safetensors", "packed.safetensors", "--data", f],
        }[command]
    return {
        "expand": ["expand", f, "--alpha", "2"],  # default output beside the input
        "params": ["params", f],
        "inspect": ["inspect", f, "--json"],
        "verify": ["verify", f],
        "convert": ["convert", f, "--layout", "dense", "-o", "out.safetensors"],
        "analyze": ["analyze", f, "--json"],
        "finetune": ["finetune", f, "--data", "good.npz", "--epochs", "1"],  # default output beside the input
        "evaluate": ["evaluate", f, "--data", "good.npz"],
    }[command]


def _combos():
    for case in CASES:
        for command, code in case.expect.items():
            if command.split("-")[0] in COMMANDS:  # analyze/train/finetune/evaluate: once they exist
                yield pytest.param(case, command, code, id=f"{case.name}-{command}")


def _stage(case: Case, where: Path) -> dict[str, bytes]:
    """Copy the bases and the case's file into `where`; returns every file's bytes."""
    (where / "cases").mkdir(exist_ok=True)
    for name in BASES + (case.file,):
        shutil.copyfile(CORPUS / name, where / name)
    return {p: (where / p).read_bytes() for p in listing(where) if (where / p).is_file()}


def _assert_untouched(where: Path, before: list[str], snapshot: dict[str, bytes]) -> None:
    assert listing(where) == before, f"files left behind or removed: {sorted(set(listing(where)) ^ set(before))}"
    for p, data in snapshot.items():
        assert (where / p).read_bytes() == data, f"{p} was modified"


# ---------------------------------------------------------------- 1. the corpus, every command


def test_corpus_covers_the_issue():
    names = {c.name for c in CASES}
    for must in ("header_len_exceeds_file", "header_not_json", "offsets_overlap", "offsets_negative", "dtype_unknown",
                 "weight_1d", "weight_3d", "zero_sized_layer", "mask_shape_mismatch", "mask_dtype_mismatch",
                 "format_version_newer", "siblings_not_disjoint", "packed_bitcount_disagrees", "nan_labels",
                 "shape_negative", "shape_huge", "tensor_claims_1e15_bytes", "header_not_utf8", "duplicate_keys",
                 "metadata_not_strings", "empty_tensor_name", "torch_save_pt", "plan_alpha_huge"):
        assert must in names, must
    assert len(CASES) >= 60
    # every model case breaks the file for every reading command, except the invariant cases (verify -> 3)
    assert {c.name for c in CASES if 3 in c.expect.values()} >= {"siblings_not_disjoint", "off_mask_weight_nonzero"}


def test_corpus_is_reproducible(tmp_path):
    """The same script writes the same bytes (fpe's own outputs included)."""
    again = make_corpus(tmp_path / "again")
    assert [c.name for c in again] == [c.name for c in CASES]
    for name in BASES + tuple(c.file for c in again):
        assert (tmp_path / "again" / name).read_bytes() == (CORPUS / name).read_bytes(), name


@pytest.mark.parametrize(("case", "command", "code"), list(_combos()))
def test_corpus_case(tmp_path, case, command, code):
    snapshot = _stage(case, tmp_path)
    before = listing(tmp_path)
    res = run_cli(_argv(case, command))
    _check_error_line(case, command, assert_one_error_line(res, code=code))
    _assert_untouched(tmp_path, before, snapshot)


def _check_error_line(case: Case, command: str, line: str) -> None:
    """The needles must name the problem in the message itself, not match the case's file name."""
    message = line.replace(case.file, "<file>")
    for needle in case.needles_of(command):
        assert needle.lower() in message.lower(), f"{needle!r} not in {line!r}"


# one (case, command) per kind of problem, through a real process and the real main()
SUBPROCESS_SUBSET = [  # a broken container, a failed verification, a pickle, bad data
    ("header_nested_50000_deep", "inspect"), ("siblings_not_disjoint", "verify"), ("torch_save_pt", "expand"),
    ("nan_labels", "evaluate"),
]


def _run_fpe(argv, cwd, env=None, timeout=120):
    env = {k: v for k, v in (env or os.environ).items() if k != "FPE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "fpe_cli", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_corpus_subset_through_real_processes(tmp_path):
    by_name = {c.name: c for c in CASES}
    jobs = []
    for i, (name, command) in enumerate(SUBPROCESS_SUBSET):
        case = by_name[name]
        if command.split("-")[0] not in COMMANDS:
            continue
        where = tmp_path / f"p{i}"
        where.mkdir()
        snapshot = _stage(case, where)
        jobs.append((case, command, where, listing(where), snapshot))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda j: _run_fpe(_argv(j[0], j[1]), j[2]), jobs))
    for (case, command, where, before, snapshot), proc in zip(jobs, results):
        label = f"{case.name} / {command}"
        assert proc.returncode == case.expect[command], (label, proc.returncode, proc.stderr)
        assert proc.stdout == "", label
        lines = proc.stderr.strip("\n").splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (label, proc.stderr)
        assert "Traceback" not in proc.stderr
        _check_error_line(case, command, lines[0])
        _assert_untouched(where, before, snapshot)


# ---------------------------------------------------------------- 2. fuzzing the readers


FUZZ_BASES = {name: (CORPUS / name).read_bytes() for name in BASES[:4]}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=5,
)


def _read_everything(path: Path, model: Path) -> None:
    """Every reader on a file; whatever loads is also checked (verify's core) or applied (plans)."""
    for reader in (read_safetensors, load_plan):
        try:
            reader(path)
        except FPEError:
            pass
    try:
        ckpt = load_checkpoint(path)
        check_invariants(ckpt.mlp, None)
    except FPEError:
        pass
    try:
        plan = load_plan(path)
    except FPEError:
        return
    weight = load_checkpoint(model).mlp.layers[0].weight
    for layer_plan in plan.layers:
        validate_layer_plan(layer_plan, weight != 0)


@st.composite
def byte_mutations(draw):
    base = draw(st.sampled_from(sorted(FUZZ_BASES)))
    data = bytearray(FUZZ_BASES[base])
    (n,) = struct.unpack("<Q", data[:8])
    op = draw(st.sampled_from(["flip", "flip", "truncate", "prefix", "splice"]))
    if op == "flip":  # mostly in the header, where a flip changes meaning
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(0, 8 + n - 1) if draw(st.booleans()) else st.integers(0, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
    elif op == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif op == "prefix":
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    else:
        pos = draw(st.integers(0, len(data)))
        data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
    return base, bytes(data)


@st.composite
def header_mutations(draw):
    base = draw(st.sampled_from(sorted(FUZZ_BASES)))
    header, body = split_file(FUZZ_BASES[base])
    for _ in range(draw(st.integers(1, 3))):
        if not header:
            break
        key = draw(st.sampled_from(sorted(header)))
        op = draw(st.sampled_from(["field", "field", "drop", "rename", "replace", "metadata"]))
        entry = header.get(key)
        if op == "field" and isinstance(entry, dict) and key != "__metadata__":
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON_VALUES)
        elif op == "drop":
            header.pop(key, None)
        elif op == "rename" and key in header:
            header[draw(st.text(max_size=12))] = header.pop(key)
        elif op == "replace":
            header[key] = draw(JSON_VALUES)
        else:
            meta = header.setdefault("__metadata__", {})
            if isinstance(meta, dict):
                meta[draw(st.sampled_from(["fpe.format_version", "fpe.layers", "fpe.plan", "fpe.budget",
                                           "fpe.activation", "fpe.kind"]))] = draw(st.text(max_size=12) | JSON_VALUES.map(json.dumps))
    return base, join_file(json.dumps(header).encode(), body)


@settings(max_examples=60, deadline=None)
@given(byte_mutations())
def test_fuzz_byte_mutations_raise_only_fpe_error(tmp_path, mutated):
    _, data = mutated
    (tmp_path / "m.safetensors").write_bytes(data)
    _read_everything(tmp_path / "m.safetensors", CORPUS / "plain.safetensors")


@settings(max_examples=60, deadline=None)
@given(header_mutations())
def test_fuzz_header_mutations_raise_only_fpe_error(tmp_path, mutated):
    _, data = mutated
    (tmp_path / "m.safetensors").write_bytes(data)
    _read_everything(tmp_path / "m.safetensors", CORPUS / "plain.safetensors")


MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from fpe_cli.errors import FPEError
    from fpe_cli.pipeline import ExpandOptions, expand_file, verify_file
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    ceiling = int(status["VmSize"].split()[0]) * 1024 + (384 << 20)  # what is mapped now + 384 MiB
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, ceiling))
    out = {}
    for kind, path in json.loads(sys.argv[1]):
        try:
            if kind == "plan":
                expand_file(ExpandOptions(Path("plain.safetensors"), plan=Path(path), output=Path("o.safetensors")))
            else:
                verify_file(Path(path))
            out[path] = "accepted"
        except FPEError as exc:
            out[path] = "FPEError"
        except MemoryError:
            out[path] = "MemoryError"
    print(json.dumps(out))
""")


def test_hostile_sizes_are_refused_before_allocating(tmp_path):
    """Under an address-space limit of (mapped now + 384 MiB), headers and tensors that declare
    terabytes are refused with FPEError; none gets as far as asking for the memory."""
    plain = (CORPUS / "plain.safetensors").read_bytes()
    header, body = split_file(plain)
    header["2.bias"].update(dtype="F32", shape=[2**40], data_offsets=[0, 2**42])
    (tmp_path / "claims_4tb.safetensors").write_bytes(join_file(header, body))
    tensors, meta = read_all(CORPUS / "packed.safetensors")
    tensors["fpe.children:0.weight"] = torch.full((4,), 2**30, dtype=torch.int32)
    save_file(tensors, str(tmp_path / "lineage_2e30.safetensors"), metadata=meta)
    files = [("model", "claims_4tb.safetensors"), ("model", "lineage_2e30.safetensors")]
    for name in ("tensor_claims_1e15_bytes", "shape_huge", "packed_shape_huge", "header_len_2_63"):
        shutil.copyfile(CORPUS / f"cases/{name}.safetensors", tmp_path / f"{name}.safetensors")
        files.append(("model", f"{name}.safetensors"))
    shutil.copyfile(CORPUS / "cases/plan_alpha_huge.safetensors", tmp_path / "plan_alpha_huge.safetensors")
    shutil.copyfile(CORPUS / "plain.safetensors", tmp_path / "plain.safetensors")
    files.append(("plan", "plan_alpha_huge.safetensors"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, json.dumps(files)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {path: "FPEError" for _, path in files}


# ---------------------------------------------------------------- 3. interrupted writes

ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # two processes share 2 cores; same math everywhere


def _temp_files(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir() if p.name.endswith(".tmp"))


def _kill_when(proc: subprocess.Popen, sig: int, ready, timeout: float = 90) -> object:
    """Send `sig` as soon as `ready()` returns something truthy (polled every 0.2 ms); returns that."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline and proc.poll() is None:
        seen = ready()
        if seen:
            break
        time.sleep(0.0002)
    assert proc.poll() is None, f"finished before the signal could be sent: {proc.communicate()}"
    proc.send_signal(sig)
    return seen


# `python -m fpe_cli`, with SIGHUP at its default first: a test runner started under nohup passes SIGHUP
# on ignored, and fpe (rightly) leaves an ignored SIGHUP ignored
HUP_DEFAULT = ("import runpy, signal; signal.signal(signal.SIGHUP, signal.SIG_DFL); "
               "runpy.run_module('fpe_cli', run_name='__main__', alter_sys=True)")


def _spawn(argv, cwd, env=None):
    env = {k: v for k, v in (env or os.environ).items() if k != "FPE_DEBUG"}
    return subprocess.Popen([sys.executable, "-c", HUP_DEFAULT, *map(str, argv)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """1024 -> 2048 -> 16 float32 (8.5 MB); its alpha-4 dense expansion is 42 MB, which takes a moment to write."""
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 16))
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def _expand_interrupted(where: Path, model: Path, sig: int, point: str, old: bytes | None):
    shutil.copyfile(model, where / "big.safetensors")
    out = where / "out.safetensors"
    if old is not None:
        out.write_bytes(old)
    proc = _spawn(["expand", "big.safetensors", "--alpha", "4", "--layout", "dense", "-o", out.name, "--force", "-q"],
                  where, dict(os.environ, **ONE_THREAD))
    if point == "write-start":  # the temp file exists: writing is about to begin
        seen = _kill_when(proc, sig, lambda: _temp_files(where))
    else:  # "mid-write": the temp file holds some, not all, of its 42 MB
        seen = _kill_when(proc, sig, lambda: [(n, s) for n in _temp_files(where)
                                              if 0 < (s := (where / n).stat().st_size) < 40_000_000])
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err, seen


def test_expand_killed_leaves_old_file_or_nothing(tmp_path, big_model):
    """SIGTERM and SIGKILL as the temp file appears and half-way through writing it (and SIGHUP), with
    and without an older output being replaced (--force): the output path holds the old bytes or nothing."""
    old = b"an older output the user asked to replace with --force"
    scenarios = [  # (signal, when, an old output present?)
        (signal.SIGTERM, "write-start", False), (signal.SIGTERM, "mid-write", True),
        (signal.SIGKILL, "write-start", True), (signal.SIGKILL, "mid-write", False),
        (signal.SIGHUP, "mid-write", True),  # the terminal went away
    ]
    dirs = []
    for i, _ in enumerate(scenarios):
        dirs.append(tmp_path / f"s{i}")
        dirs[-1].mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda a: _expand_interrupted(a[0], big_model, a[1][0], a[1][1], old if a[1][2] else None),
                                zip(dirs, scenarios)))
    for where, (sig, point, had_old), (rc, err, seen) in zip(dirs, scenarios, results):
        label = f"{signal.Signals(sig).name} at {point} {seen}"
        out = where / "out.safetensors"
        if had_old:
            assert out.read_bytes() == old, f"{label}: the old output was damaged"
        else:
            assert not out.exists(), f"{label}: a partial output was left"
        assert (where / "big.safetensors").read_bytes() == big_model.read_bytes()
        if sig != signal.SIGKILL:  # unwinds like Ctrl-C: exit 130, one line, the temp file removed
            assert rc == 130, (label, rc, err)
            assert err.strip().splitlines() == ["Error: interrupted"], (label, err)
            assert _temp_files(where) == [], f"{label}: temp files left: {_temp_files(where)}"
        else:  # nothing runs after SIGKILL: a temp file may stay, named so that it is recognisable
            assert rc == -signal.SIGKILL, (label, rc, err)
            assert all(n.startswith(".out.safetensors.") for n in _temp_files(where)), _temp_files(where)


def _finetune_args(out: str, *extra: str) -> list[str]:
    return ["finetune", "model.safetensors", "--data", "train.npz", "--epochs", "6", "--checkpoint-every", "1",
            "--optimizer", "sgd", "--weight-decay", "0.01", "--seed", "3", "-o", out, "-q", *extra]


@pytest.fixture(scope="module")
def finetune_inputs(tmp_path_factory) -> Path:
    """An expanded 64 -> 128*4 -> 4 model and 2048 training samples."""
    assert "finetune" in COMMANDS
    where = tmp_path_factory.mktemp("ft")
    torch.manual_seed(1)
    module = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 4))
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(where / "dense.safetensors"))
    assert run_cli(["expand", where / "dense.safetensors", "--alpha", "4", "-o", where / "model.safetensors"]).exit_code == 0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2048 + 256, 64)).astype(np.float32)
    y = (x @ rng.normal(size=(64, 4))).argmax(axis=1)
    np.savez(where / "train.npz", x_train=x[:2048], y_train=y[:2048], x_test=x[2048:], y_test=y[2048:])
    return where


def _state_epoch(path: Path) -> int | None:
    try:
        return json.loads(read_safetensors(path)[1]["fpe.resume"])["epoch"]
    except (FPEError, KeyError, FileNotFoundError):
        return None


def _finetune_killed(where: Path, inputs: Path, sig: int, point: str) -> dict:
    for name in ("model.safetensors", "train.npz"):
        shutil.copyfile(inputs / name, where / name)
    state = where / "ft.resume.safetensors"
    proc = _spawn(_finetune_args("ft.safetensors"), where, dict(os.environ, **ONE_THREAD))
    if point == "between-epochs":  # the second resume state has replaced the first (a new inode)
        inodes: set[int] = set()

        def ready():
            try:
                inodes.add(state.stat().st_ino)
            except FileNotFoundError:
                pass
            return len(inodes) >= 2 and f"{len(inodes)} states written"
        seen = _kill_when(proc, sig, ready)
    else:  # "state-write": a resume state exists and the next one's temp file appeared
        seen = _kill_when(proc, sig, lambda: state.exists() and _temp_files(where))
    _, err = proc.communicate(timeout=60)
    return {"rc": proc.returncode, "err": err, "seen": seen, "temps": _temp_files(where),
            "output": (where / "ft.safetensors").exists(), "state_epoch": _state_epoch(state)}


def test_finetune_killed_then_resumed_equals_uninterrupted(tmp_path, finetune_inputs, monkeypatch):
    """`fpe finetune` killed between epochs (SIGKILL) and while writing its resume state (SIGTERM):
    no output appears, the resume state is whole, and `--resume` then writes exactly the bytes of
    an uninterrupted run (all runs one thread: the same arithmetic)."""
    scenarios = [(signal.SIGKILL, "between-epochs"), (signal.SIGTERM, "state-write")]
    dirs = []
    for i, _ in enumerate(scenarios):
        dirs.append(tmp_path / f"k{i}")
        dirs[-1].mkdir()
    with ThreadPoolExecutor(max_workers=2) as pool:
        killed = list(pool.map(lambda a: _finetune_killed(a[0], finetune_inputs, *a[1]), zip(dirs, scenarios)))
    torch.set_num_threads(1)  # (restored by the autouse fixture)
    ref = tmp_path / "ref"
    ref.mkdir()
    for name in ("model.safetensors", "train.npz"):
        shutil.copyfile(finetune_inputs / name, ref / name)
    monkeypatch.chdir(ref)
    res = run_cli(_finetune_args("ft.safetensors"))
    assert res.exit_code == 0, res.stderr
    reference = (ref / "ft.safetensors").read_bytes()
    assert not (ref / "ft.resume.safetensors").exists(), "the resume state outlived a finished run"
    for where, (sig, point), info in zip(dirs, scenarios, killed):
        label = f"{signal.Signals(sig).name} at {point}: {info}"
        assert not info["output"], f"{label}: an output appeared although the run was killed"
        assert info["state_epoch"] is not None and 1 <= info["state_epoch"] < 6, f"{label}: no usable resume state"
        if sig == signal.SIGTERM:
            assert info["rc"] == 130 and info["temps"] == [], label
        monkeypatch.chdir(where)
        res = run_cli(_finetune_args("ft.safetensors", "--resume"))
        assert res.exit_code == 0, (label, res.stderr)
        assert (where / "ft.safetensors").read_bytes() == reference, f"{label}: resumed output differs"
        assert not (where / "ft.resume.safetensors").exists(), label


def test_finetune_resume_from_a_damaged_state_is_one_error_line(tmp_path, finetune_inputs):
    """A resume state cut short (e.g. copied off a full disk) is bad input, not a crash."""
    for name in ("model.safetensors", "train.npz"):
        shutil.copyfile(finetune_inputs / name, tmp_path / name)
    header, body = split_file((CORPUS / "packed.safetensors").read_bytes())
    (tmp_path / "ft.resume.safetensors").write_bytes(join_file(header, body)[:-100])
    before = listing(tmp_path)
    snapshot = {p: (tmp_path / p).read_bytes() for p in before if (tmp_path / p).is_file()}
    assert_one_error_line(run_cli(_finetune_args("ft.safetensors", "--resume")), "ft.resume.safetensors", "truncated")
    _assert_untouched(tmp_path, before, snapshot)


# ---------------------------------------------------------------- 4. no unsafe loading


class _Payload:
    """Unpickling this creates a file: proof of code execution if any fpe command ever unpickles."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt", ".pth", ".safetensors"])
def test_pickled_checkpoints_are_refused_and_never_executed(tmp_path, suffix):
    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil{suffix}"
    torch.save({"0.weight": torch.zeros(4, 6), "x": _Payload(marker)}, evil)
    torch.save({"x": _Payload(marker)}, tmp_path / "evil.npz")  # a zip, like real npz files
    before = listing(tmp_path)
    runs = [[c, evil] for c in ("params", "inspect", "verify")] + [
        ["expand", evil, "--alpha", "2"], ["convert", evil, "--layout", "dense", "-o", "o.safetensors"],
        ["expand", CORPUS / "plain.safetensors", "--alpha", "2", "--plan", evil, "-o", "o.safetensors"],
        ["expand", CORPUS / "plain.safetensors", "--alpha", "2", "--data", tmp_path / "evil.npz", "-o", "o.safetensors"],
    ]
    runs += [["analyze", evil]] * ("analyze" in COMMANDS) + [["evaluate", evil, "--data", "digits"]] * ("evaluate" in COMMANDS)
    runs += [["finetune", CORPUS / "packed.safetensors", "--data", tmp_path / "evil.npz", "-o", "o.safetensors"]] * (
        "finetune" in COMMANDS)
    for argv in runs:
        line = assert_one_error_line(run_cli(argv))
        if suffix != ".safetensors" and argv[1] == evil:
            assert "pickle" in line and "safetensors.torch.save_file" in line, line
        assert not marker.exists(), f"{argv}: the pickle was executed"
    assert listing(tmp_path) == before
    # the payload is real: an unsafe load would have run it
    with pytest.raises(Exception):
        torch.load(evil, weights_only=True)
    assert not marker.exists()
    proof = tmp_path / "proof.pt"  # (torch.load hands *.safetensors names to safetensors itself)
    shutil.copyfile(evil, proof)
    torch.load(proof, weights_only=False)  # noqa: S614 - deliberately unsafe, to prove the point
    assert marker.exists()


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "jsonpickle"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            yield node, owner, name


def _kw(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def test_no_unsafe_deserialisation_in_fpe_cli():
    """Statically: no torch.load without weights_only=True, no pickle-family imports, no
    allow_pickle=True, no yaml.load/unsafe loaders, no eval/exec, in any module of fpe_cli."""
    files = sorted((REPO / "fpe_cli").rglob("*.py"))
    assert len(files) >= 15
    problems = []
    for path in files:
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
                problems.append(f"{where}: from {node.module} import ...")
        for node, owner, name in _calls(tree):
            if name == "load" and owner == "torch" and _kw(node, "weights_only") is not True:
                problems.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            if owner == "jit" or (owner == "torch" and name in ("jit",)):
                problems.append(f"{where}:{node.lineno}: torch.jit")
            if _kw(node, "allow_pickle") not in (None, False):
                problems.append(f"{where}:{node.lineno}: allow_pickle={_kw(node, 'allow_pickle')}")
            if owner == "yaml" and name in ("load", "unsafe_load", "full_load", "load_all", "unsafe_load_all"):
                problems.append(f"{where}:{node.lineno}: yaml.{name}")
            if owner == "" and name in ("eval", "exec", "__import__"):
                problems.append(f"{where}:{node.lineno}: {name}()")
    assert problems == []


def test_static_check_catches_what_it_should(tmp_path):
    """The scanner above is not vacuous: it flags each pattern in a planted module."""
    bad = ast.parse("import pickle\nimport torch, numpy as np, yaml\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
                    "np.load('x', allow_pickle=True)\nyaml.load('x')\neval('1')\n")
    found = [(o, n) for _, o, n in _calls(bad)]
    assert ("torch", "load") in found and ("yaml", "load") in found and ("", "eval") in found
    assert [_kw(node, "weights_only") for node, o, n in _calls(bad) if n == "load" and o == "torch"] == [None, False]


def _output_refusals(tmp_path: Path):
    src = tmp_path / "model.safetensors"
    shutil.copyfile(CORPUS / "plain.safetensors", src)
    shutil.copyfile(CORPUS / "plan.safetensors", tmp_path / "plan.safetensors")
    shutil.copyfile(CORPUS / "packed.safetensors", tmp_path / "packed.safetensors")
    shutil.copyfile(CORPUS / "good.npz", tmp_path / "good.npz")
    (tmp_path / "precious.txt").write_text("not yours")
    (tmp_path / "link_to_input").symlink_to(src)
    (tmp_path / "link_to_packed").symlink_to(tmp_path / "packed.safetensors")
    (tmp_path / "link_elsewhere").symlink_to(tmp_path / "precious.txt")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere.safetensors")
    (tmp_path / "outdir").mkdir()
    yield ["expand", src, "--alpha", "2", "-o", "link_to_input", "--force"], ["is the input"]
    yield ["expand", src, "--alpha", "2", "-o", "link_elsewhere", "--force"], ["symbolic link"]
    yield ["expand", src, "--alpha", "2", "-o", "dangling", "--force"], ["symbolic link"]
    yield ["expand", src, "--alpha", "2", "-o", "outdir", "--force"], ["outdir", "is a directory"]
    yield ["expand", src, "--alpha", "2", "--save-plan", "link_to_input", "--force", "-o", "o.safetensors"], ["is the input"]
    yield ["expand", src, "--alpha", "2", "--save-plan", "outdir", "-o", "o.safetensors"], ["is a directory"]
    yield ["expand", src, "--plan", "plan.safetensors", "-o", "plan.safetensors", "--force"], ["is the input"]
    yield ["convert", src, "--layout", "dense", "-o", "link_to_input", "--force"], ["is the input"]
    yield ["convert", src, "--layout", "dense", "-o", "outdir"], ["is a directory"]
    yield ["convert", src, "--layout", "dense", "-o", "link_elsewhere", "--force"], ["symbolic link"]
    if "finetune" in COMMANDS:
        yield ["finetune", "packed.safetensors", "--data", "good.npz", "-o", "link_to_packed", "--force"], ["is the input"]
        yield ["finetune", "packed.safetensors", "--data", "good.npz", "-o", "outdir"], ["is a directory"]
    if "train" in COMMANDS:
        yield ["train", "--data", "good.npz", "--hidden", "4", "-o", "outdir"], ["is a directory"]
        yield ["train", "--data", "good.npz", "--hidden", "4", "-o", "link_elsewhere", "--force"], ["symbolic link"]
    if "analyze" in COMMANDS:
        yield ["analyze", src, "--csv", "link_elsewhere", "--force"], ["symbolic link"]
        yield ["analyze", src, "--csv", "outdir"], ["is a directory"]


def test_outputs_that_are_symlinks_directories_or_inputs_are_refused(tmp_path):
    cases = list(_output_refusals(tmp_path))
    snapshot = {p: (tmp_path / p).read_bytes() for p in listing(tmp_path) if (tmp_path / p).is_file()}
    before = listing(tmp_path)
    for argv, needles in cases:
        assert_one_error_line(run_cli(argv), *needles)
        _assert_untouched(tmp_path, before, snapshot)
    assert (tmp_path / "link_to_input").is_symlink() and (tmp_path / "dangling").is_symlink()


# ---------------------------------------------------------------- 5. determinism


DRIVER = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from fpe_cli.cli import main
    for argv in json.loads(sys.argv[1]):
        sys.argv = ["fpe", *argv]
        try:
            main()
        except SystemExit as exc:
            assert exc.code in (0, None), (argv, exc.code)
    print(torch.get_num_threads())
""")


@pytest.fixture(scope="module")
def det_inputs(tmp_path_factory) -> Path:
    """A 128 -> 256 -> 10 MLP (ops large enough to run multi-threaded) and a matching data set."""
    where = tmp_path_factory.mktemp("det")
    torch.manual_seed(2)
    module = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(where / "m.safetensors"))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(768, 128)).astype(np.float32)
    y = rng.integers(0, 10, size=768)
    np.savez(where / "d.npz", x_train=x[:512], y_train=y[:512], x_test=x[512:], y_test=y[512:])
    return where


def _expand_runs(tag: str) -> list[list[str]]:
    splits = [("random", ["--split", "random"]), ("gram", ["--split", "gram"])]
    if (REPO / "fpe_cli" / "data.py").exists():  # --split activation needs calibration data
        splits.append(("activation", ["--split", "activation", "--data", "d.npz"]))
    runs = [["expand", "m.safetensors", "--alpha", "4", "--seed", "5", *flags, "-q", "-o", f"{tag}.{split}.packed.safetensors"]
            for split, flags in splits]
    runs.append(["expand", "m.safetensors", "--alpha", "4", "--seed", "5", "--split", "gram", "--layout", "dense", "-q",
                 "-o", f"{tag}.gram.dense.safetensors"])
    return runs


def test_expand_is_byte_identical_across_runs_and_thread_counts(tmp_path, det_inputs, monkeypatch):
    """The real main() in a process with OMP_NUM_THREADS=1 and one with 2 (torch.set_num_threads to
    match), and again in this process with one thread: every split's output byte-identical."""
    for name in ("m.safetensors", "d.npz"):
        shutil.copyfile(det_inputs / name, tmp_path / name)
    outputs = [r[-1] for r in _expand_runs("x")]
    assert [o.split(".")[1] for o in outputs] == ["random", "gram", "activation", "gram"]

    def run(tag_threads):
        tag, threads = tag_threads
        env = {k: v for k, v in os.environ.items() if k != "FPE_DEBUG"}
        # passive: idle OpenMP threads sleep instead of spinning (only how they wait, not how work is split);
        # on a busy 2-core machine spinning threads cost several times the CPU of the work itself
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
        proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(_expand_runs(tag))], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [str(threads)]

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(run, [("t1", 1), ("t2", 2)]))
    torch.set_num_threads(1)
    for argv in _expand_runs("again"):
        assert run_cli(argv).exit_code == 0
    for out in outputs:
        first = (tmp_path / out.replace("x.", "t1.", 1)).read_bytes()
        for tag in ("t2", "again"):
            assert (tmp_path / out.replace("x.", f"{tag}.", 1)).read_bytes() == first, (out, tag)
    assert (tmp_path / "t1.random.packed.safetensors").read_bytes() != (tmp_path / "t1.gram.packed.safetensors").read_bytes()


def test_train_and_finetune_are_byte_identical_across_runs(tmp_path):
    assert {"train", "finetune"} <= COMMANDS
    shutil.copyfile(CORPUS / "good.npz", tmp_path / "good.npz")
    shutil.copyfile(CORPUS / "packed.safetensors", tmp_path / "packed.safetensors")
    outputs = {}
    for run in ("a", "b"):
        for cmd, argv in (("train", ["train", "--data", "good.npz", "--hidden", "8", "--epochs", "3", "--seed", "4"]),
                          ("finetune", ["finetune", "packed.safetensors", "--data", "good.npz", "--epochs", "3", "--seed", "4"])):
            out = tmp_path / f"{cmd}.{run}.safetensors"
            res = run_cli([*argv, "-o", out, "-q"])
            assert res.exit_code == 0, res.stderr
            outputs[cmd, run] = out.read_bytes()
    assert outputs["train", "a"] == outputs["train", "b"]
    assert outputs["finetune", "a"] == outputs["finetune", "b"]
