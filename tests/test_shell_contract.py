"""The command contract as shell scripts and CI jobs meet it: the real `fpe` executable in subprocesses.

Contract (docs/design.md, README "Reliability"): exit codes 0/1/2/3 (130 interrupted); with --json
exactly one JSON document on stdout and nothing else (nothing at all on failure); diagnostics on
stderr; a failure is one `Error:` line, no traceback; no half-written outputs or temp files; no
silent overwrite; the same bytes for the same inputs.

Covered here (beyond the corpus, adversarial and reliability suites):
- every command with --json through a real process, on success and on each kind of failure, with
  --json before and after the positional arguments; every command's --help;
- the environments scripts run in: stdout or stderr closed (`>&-`, `2>&-`), stdout a pipe whose
  reader is gone (`| head`), a terminal of 80 or 20 columns, LC_ALL=C with non-ASCII paths, HOME unset
  and TMPDIR missing, stdin closed;
- paths: relative from another cwd, spaces and unicode, a leading dash, a symlinked input, no suffix,
  a directory as the model or the output, the input as the output under another spelling, a FIFO;
- concurrency and signals: two `fpe expand` writing one output, an output created by someone else
  while fpe works, SIGINT mid-write, a signal that lands while the arguments are being dispatched;
- repeated runs: byte-identical outputs, --force replacing atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import termios
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import assert_one_error_line, listing, run_cli, save_mlp, subprocess_env, temp_files, wait_until

_EXE = Path(sys.executable).parent / "fpe"
FPE = [str(_EXE)] if _EXE.exists() else [sys.executable, "-m", "fpe_cli"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# ---------------------------------------------------------------- helpers


def _default_sigint() -> None:
    """A child started from a non-interactive shell's background job inherits SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def fpe(args, cwd: Path, *, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the real `fpe` executable; stdout and stderr captured as text."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([*FPE, *map(str, args)], cwd=cwd, env=env or subprocess_env(), timeout=timeout, text=True, **kw)


def check_contract(proc: subprocess.CompletedProcess, code: int, *, json_out: bool, label: str = "") -> dict | None:
    """Exit code; no traceback; failure: empty stdout (with --json) and exactly one `Error:` line;
    success with --json: stdout is exactly one JSON document and stderr holds no error."""
    out, err = proc.stdout or "", proc.stderr or ""
    where = f"{label}\nrc={proc.returncode}\nstdout={out[:600]!r}\nstderr={err[-1200:]!r}"
    assert proc.returncode == code, where
    assert "Traceback" not in out + err, where
    if code != 0:
        lines = err.strip("\n").splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), where
        if json_out:
            assert out == "", where
        return None
    assert "Error:" not in err, where
    if json_out:
        doc = json.loads(out)  # one document: json.loads refuses trailing data
        assert isinstance(doc, dict), where
        return doc
    return None


def on_terminal(args, cwd: Path, columns: int) -> tuple[int, str]:
    """Run fpe with stdin, stdout and stderr on a pseudo-terminal of `columns` columns."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    proc = subprocess.Popen([*FPE, *map(str, args)], cwd=cwd, env=subprocess_env(COLUMNS=str(columns), TERM="xterm"),
                            stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=120)
    os.close(master)
    return proc.returncode, ANSI.sub("", b"".join(chunks).decode("utf-8", "replace"))


# ---------------------------------------------------------------- shared inputs (built in-process: fast)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """m.safetensors (12-8-3), its expansion, a plan, a dense copy, one with a weight off its mask, data."""
    where = tmp_path_factory.mktemp("shell")
    save_mlp(where / "m.safetensors", [12, 8, 3])
    cwd = os.getcwd()
    os.chdir(where)
    try:
        assert run_cli(["expand", "m.safetensors", "--alpha", "2", "-q", "-o", "m.fpe2.safetensors",
                        "--save-plan", "plan.safetensors"]).exit_code == 0
        assert run_cli(["convert", "m.fpe2.safetensors", "--layout", "dense", "-o", "dense.safetensors"]).exit_code == 0
    finally:
        os.chdir(cwd)
    from safetensors import safe_open
    from safetensors.torch import load_file
    tensors = load_file(str(where / "dense.safetensors"))
    with safe_open(str(where / "dense.safetensors"), "pt") as fh:
        meta = fh.metadata()
    off = (~tensors["fpe.mask:0.weight"]).nonzero()[0]
    tensors["0.weight"][off[0], off[1]] = 0.5
    save_file(tensors, str(where / "offmask.safetensors"), metadata=meta)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 12)).astype(np.float32)
    y = (x @ rng.normal(size=(12, 3))).argmax(axis=1)
    np.savez(where / "d.npz", x_train=x[:160], y_train=y[:160], x_test=x[160:], y_test=y[160:])
    return where


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """1024 -> 2048 -> 16 float32 (8.5 MB): its alpha-4 dense expansion (42 MB) takes a moment to write."""
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    save_mlp(path, [1024, 2048, 16])
    return path


@pytest.fixture(scope="module")
def realistic(tmp_path_factory) -> Path:
    """A checkpoint as a model's MLP block is named, 512 -> 1024 -> 10, and its alpha-4 expansion."""
    where = tmp_path_factory.mktemp("real")
    torch.manual_seed(0)
    save_file({"encoder.mlp.fc1.weight": torch.randn(1024, 512), "encoder.mlp.fc1.bias": torch.randn(1024),
               "encoder.mlp.fc2.weight": torch.randn(10, 1024), "encoder.mlp.fc2.bias": torch.randn(10)},
              str(where / "real.safetensors"))
    res = run_cli(["expand", where / "real.safetensors", "--alpha", "4", "--probe-samples", "0", "-q",
                   "-o", where / "real.fpe4.safetensors"])
    assert res.exit_code == 0, res.stderr
    return where


def _copy(files: Path, dest: Path, *names: str) -> None:
    for name in names:
        shutil.copyfile(files / name, dest / name)


# ---------------------------------------------------------------- 1. --json and exit codes, real processes


def _json_cases():
    """(argv, expected exit code): success and each kind of failure, --json before and after MODEL."""
    ok = [
        ["expand", "m.safetensors", "--alpha", "2", "-o", "e1.safetensors", "--json"],
        ["expand", "--json", "m.safetensors", "--plan", "plan.safetensors", "-o", "e2.safetensors"],
        ["params", "--json", "m.fpe2.safetensors"],
        ["inspect", "m.fpe2.safetensors", "--json"],
        ["verify", "m.fpe2.safetensors", "--source", "m.safetensors", "--json"],
        ["convert", "--json", "m.fpe2.safetensors", "--layout", "dense", "-o", "c.safetensors"],
        ["analyze", "m.safetensors", "m.fpe2.safetensors", "--data", "d.npz", "--json"],
        ["evaluate", "m.safetensors", "m.fpe2.safetensors", "--data", "d.npz", "--json"],
        ["data", "dnf:vars=12,clauses=3,k=3,train=64,test=32", "-o", "dnf.npz", "--json"],
        ["train", "--data", "d.npz", "--hidden", "4", "--epochs", "1", "-o", "t.safetensors", "--json"],
        ["finetune", "m.fpe2.safetensors", "--data", "d.npz", "--epochs", "1", "-o", "ft.safetensors", "--json"],
    ]
    fail = [
        (["verify", "offmask.safetensors", "--json"], 3),
        (["convert", "offmask.safetensors", "--layout", "packed", "-o", "x.safetensors", "--json"], 3),
        (["expand", "m.safetensors", "--alpha", "2", "--json"], 2),  # m.fpe2.safetensors exists
        (["expand", "--json", "m.safetensors", "--alpha", "two"], 2),
        (["expand", "m.safetensors", "--alpha", "2", "--seed", "x", "--json"], 2),  # Click's own usage error
        (["params", "missing.safetensors", "--json"], 2),
        (["inspect", "d.npz", "--json"], 2),
        (["convert", "m.fpe2.safetensors", "--json"], 2),  # --layout and -o missing
        (["evaluate", "--json", "m.safetensors", "--data", "nope.npz"], 2),
        (["train", "--data", "d.npz", "--hidden", "0", "--json", "-o", "t0.safetensors"], 2),
        (["nosuchcommand", "--json"], 2),
        (["params", "m.safetensors", "--json", "--no-such-flag"], 2),
    ]
    return [(argv, 0) for argv in ok] + fail


def test_every_command_with_json_through_a_real_process(tmp_path, files):
    """One JSON document (json.loads-clean) on success, nothing on stdout on failure, one Error: line,
    the documented exit code; files written on success are valid, failures leave no temp file."""
    _copy(files, tmp_path, "m.safetensors", "m.fpe2.safetensors", "plan.safetensors", "offmask.safetensors", "d.npz")
    cases = _json_cases()
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda c: fpe(c[0], tmp_path), cases))
    for (argv, code), proc in zip(cases, procs):
        doc = check_contract(proc, code, json_out=True, label=" ".join(argv))
        if doc is not None and argv[0] in ("expand", "convert", "train", "finetune"):
            out = doc["output"]
            assert (tmp_path / out).is_file(), (argv, doc)
    assert temp_files(tmp_path) == []
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "t0.safetensors").exists()


def test_every_command_has_help_with_an_example_and_exit_0(tmp_path):
    commands = ["expand", "params", "inspect", "verify", "convert", "analyze", "data", "train", "finetune", "evaluate"]
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda c: fpe([c, "--help"], tmp_path), commands))
    for command, proc in zip(commands, procs):
        assert proc.returncode == 0, (command, proc.stderr)
        assert "Example" in proc.stdout and "Traceback" not in proc.stderr, command
    root = fpe(["--help"], tmp_path)
    assert root.returncode == 0 and all(c in root.stdout for c in commands)
    version = fpe(["--version"], tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("fpe ")


# ---------------------------------------------------------------- 2. closed streams and broken pipes


def test_expand_quiet_with_stdout_closed_still_writes_its_output(tmp_path, files):
    """`fpe expand ... -q >&-` (cron jobs, daemons, `exec >&-` in a script): -q needs no stdout, so the
    output must be written and the exit code 0. BUG: fpe crashes at import with a traceback
    (AttributeError: 'NoneType' object has no attribute 'isatty', cli/common.py) and writes nothing."""
    _copy(files, tmp_path, "m.safetensors")
    proc = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *FPE, "expand", "m.safetensors", "--alpha", "2", "-q",
                           "-o", "out.safetensors"], cwd=tmp_path, env=subprocess_env(), stderr=subprocess.PIPE, text=True,
                          timeout=120)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert run_cli(["verify", tmp_path / "out.safetensors", "--source", tmp_path / "m.safetensors"]).exit_code == 0


def test_json_with_stdout_closed_is_one_error_line_not_a_traceback(tmp_path, files):
    """`fpe params m --json >&-`: the document cannot be written: a runtime failure, i.e. exit 1 and one
    `Error:` line. BUG: a 10-line traceback from cli/common.py (sys.stdout is None)."""
    _copy(files, tmp_path, "m.fpe2.safetensors")
    proc = subprocess.run(["sh", "-c", 'exec "$@" >&-', "sh", *FPE, "params", "m.fpe2.safetensors", "--json"],
                          cwd=tmp_path, env=subprocess_env(), stderr=subprocess.PIPE, text=True, timeout=120)
    check_contract(subprocess.CompletedProcess(proc.args, proc.returncode, "", proc.stderr), 1, json_out=True,
                   label="params --json >&-")


def test_json_with_stderr_closed_still_prints_the_document(tmp_path, files):
    """`fpe params m --json 2>&-`: stdout is fine, so the document must come out with exit 0.
    BUG: exit 1 and an empty stdout (the crash at import has nowhere to go)."""
    _copy(files, tmp_path, "m.fpe2.safetensors")
    proc = subprocess.run(["sh", "-c", 'exec "$@" 2>&-', "sh", *FPE, "params", "m.fpe2.safetensors", "--json"],
                          cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stdout)
    assert json.loads(proc.stdout)["total"]["weights"] == 120


def _into_closed_pipe(args, cwd: Path) -> subprocess.CompletedProcess:
    """stdout is a pipe whose reader has gone (`fpe ... | head -c1` once head has exited)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        return subprocess.run([*FPE, *map(str, args)], cwd=cwd, env=subprocess_env(), stdout=write_end, stderr=subprocess.PIPE,
                              text=True, timeout=120)
    finally:
        os.close(write_end)


def test_output_into_a_closed_pipe_is_success_or_one_error_line(tmp_path, files):
    """`fpe params m | head -n1`: either a quiet success or a failure that says so in one `Error:` line.
    --json does the latter (exit 1, `Error: Broken pipe`). BUG: a table (params, inspect, verify) exits
    1 with nothing at all on stderr (rich's Console catches BrokenPipeError and raises SystemExit(1),
    which bypasses handle_errors in cli/common.py)."""
    _copy(files, tmp_path, "m.fpe2.safetensors")
    cases = [["params", "m.fpe2.safetensors", "--json"], ["params", "m.fpe2.safetensors"]]
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda a: _into_closed_pipe(a, tmp_path), cases))
    for argv, proc in zip(cases, procs):
        assert "Traceback" not in proc.stderr, (argv, proc.stderr)
        if proc.returncode != 0:
            lines = proc.stderr.strip("\n").splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: "), (argv, proc.returncode, proc.stderr)


# ---------------------------------------------------------------- 3. terminals and locales


def _expected_params_cells(path: Path) -> list[str]:
    doc = run_cli(["params", path, "--json"]).json()
    cells = []
    for row in [*doc["layers"], doc["total"]]:
        for key in ("stored_elements", "weights", "nonzero_weights", "biases", "bytes_on_disk"):
            cells.append(f"{row[key]:,}")
    return cells


def test_params_table_on_an_80_column_terminal_keeps_every_number(realistic):
    """A user types `fpe params model.fpe4.safetensors` in a standard 80-column terminal. The table must
    not drop digits. BUG: every column is cut with an ellipsis (`495,7…`, `2,097…`, `encod…`): report.py
    render_params adds columns with rich's default overflow="ellipsis" and the table does not fit."""
    code, text = on_terminal(["params", "real.fpe4.safetensors"], realistic, columns=80)
    assert code == 0, text
    missing = [c for c in _expected_params_cells(realistic / "real.fpe4.safetensors") if c not in text]
    assert missing == [] and "…" not in text, f"numbers lost: {missing}\n{text}"


def test_evaluate_table_on_an_80_column_terminal_keeps_widths_and_numbers(tmp_path, files):
    """`fpe evaluate` at 80 columns: the layout and widths columns collapse to `…`. BUG (cli/train_cmds.py
    evaluation_table: overflow="ellipsis" on layout/widths)."""
    _copy(files, tmp_path, "m.safetensors", "m.fpe2.safetensors", "d.npz")
    doc = run_cli(["evaluate", tmp_path / "m.safetensors", tmp_path / "m.fpe2.safetensors", "--data",
                   tmp_path / "d.npz", "--json"]).json()
    code, text = on_terminal(["evaluate", "m.safetensors", "m.fpe2.safetensors", "--data", "d.npz"], tmp_path, 80)
    assert code == 0, text
    expected = []
    for row in doc["models"]:
        expected += [row["layout"], "-".join(map(str, row["widths"])), f"{row['weights']:,}",
                     f"{row['test']['accuracy']:.4f}"]
    missing = [c for c in expected if c not in text]
    assert missing == [] and "…" not in text, f"lost: {missing}\n{text}"


def test_a_20_column_terminal_and_dumb_settings_do_not_crash(tmp_path, files):
    """COLUMNS=20 on a terminal: no crash, no traceback; NO_COLOR/TERM=dumb in a pipe: no escape codes."""
    _copy(files, tmp_path, "m.fpe2.safetensors")
    code, text = on_terminal(["verify", "m.fpe2.safetensors"], tmp_path, columns=20)
    assert code == 0 and "Traceback" not in text, text
    proc = fpe(["params", "m.fpe2.safetensors"], tmp_path, env=subprocess_env(NO_COLOR="1", TERM="dumb", COLUMNS="20"))
    assert proc.returncode == 0 and "\x1b[" not in proc.stdout + proc.stderr, proc.stdout
    assert all(f"{n}" in proc.stdout for n in ("120", "81", "39")), proc.stdout  # not a TTY: full width


def test_c_locale_with_spaces_and_unicode_in_paths(tmp_path, files):
    """LANG=C LC_ALL=C (minimal CI images), a directory with a space and non-ASCII names, run from
    another directory with a relative path; HOME unset, TMPDIR missing, stdin closed."""
    where = tmp_path / "run dir" / "mödels ü"
    where.mkdir(parents=True)
    shutil.copyfile(files / "m.safetensors", where / "mödel ü.safetensors")
    env = subprocess_env(LANG="C", LC_ALL="C", TMPDIR=str(tmp_path / "no-such-tmp"))
    env.pop("HOME", None)
    rel = Path("mödels ü") / "mödel ü.safetensors"
    proc = fpe(["expand", rel, "--alpha", "2", "--json"], tmp_path / "run dir", env=env, stdin=subprocess.DEVNULL)
    doc = check_contract(proc, 0, json_out=True, label="expand under LC_ALL=C")
    assert doc["output"] == str(Path("mödels ü") / "mödel ü.fpe2.safetensors")
    assert (where / "mödel ü.fpe2.safetensors").is_file()
    again = fpe(["params", rel, "--json"], tmp_path / "run dir", env=env)
    check_contract(again, 0, json_out=True)
    missing = fpe(["params", Path("mödels ü") / "nöpe.safetensors"], tmp_path / "run dir", env=env)
    check_contract(missing, 2, json_out=False)


# ---------------------------------------------------------------- 4. paths


def test_path_spellings_scripts_use(tmp_path, files):
    """In-process (fast): a leading dash behind ./, no .safetensors suffix, a symlinked input, the
    input as output under another spelling, a directory as model or output."""
    _copy(files, tmp_path, "m.safetensors")
    (tmp_path / "sub").mkdir()
    os.symlink("m.safetensors", tmp_path / "link.safetensors")
    assert run_cli(["expand", "m.safetensors", "--alpha", "2", "-q", "-o", "./-x.safetensors"]).exit_code == 0
    assert run_cli(["verify", "./-x.safetensors", "--source", "m.safetensors"]).exit_code == 0
    assert run_cli(["expand", "m.safetensors", "--alpha", "2", "-q", "-o", "widened"]).exit_code == 0
    assert run_cli(["params", "widened", "--json"]).json()["total"]["weights"] == 120
    assert run_cli(["expand", "link.safetensors", "--alpha", "2", "-q"]).exit_code == 0  # output beside the link
    assert (tmp_path / "link.fpe2.safetensors").is_file() and (tmp_path / "link.safetensors").is_symlink()
    before = (tmp_path / "m.safetensors").read_bytes()
    assert_one_error_line(run_cli(["expand", "m.safetensors", "--alpha", "2", "-o", "sub/../m.safetensors", "--force"]),
                          "input")
    assert_one_error_line(run_cli(["expand", "link.safetensors", "--alpha", "2", "-o", "m.safetensors", "--force"]),
                          "input")
    assert_one_error_line(run_cli(["params", "sub"]), "directory")
    assert_one_error_line(run_cli(["expand", "m.safetensors", "--alpha", "2", "-o", "sub", "--force"]), "directory")
    assert (tmp_path / "m.safetensors").read_bytes() == before
    assert temp_files(tmp_path) == []


def test_leading_dash_model_without_dot_slash_is_a_usage_error(tmp_path, files):
    """`fpe params -x.safetensors` is read as an option: exit 2, one line (the hint names --help)."""
    _copy(files, tmp_path, "m.safetensors")
    shutil.copyfile(tmp_path / "m.safetensors", tmp_path / "-x.safetensors")
    check_contract(fpe(["params", "-x.safetensors", "--json"], tmp_path), 2, json_out=True)
    check_contract(fpe(["params", "--json", "--", "-x.safetensors"], tmp_path), 0, json_out=True)


def test_force_onto_a_fifo_does_not_replace_it(tmp_path, files):
    """`-o /dev/null --force` (discarding the result in a check script) or a named pipe: the output is a
    special file, not an older output. fpe must refuse it (or write into it), never rename a regular
    file over it: as root that replaces the system's /dev/null. BUG: stfile.check_writable only refuses
    directories and symlinks; atomic_output then os.replace()s the temp file over the FIFO."""
    _copy(files, tmp_path, "m.safetensors")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    res = run_cli(["expand", "m.safetensors", "--alpha", "2", "-o", "fifo", "--force", "-q"])
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode), "the named pipe was replaced by a regular file"
    assert_one_error_line(res)


# ---------------------------------------------------------------- 5. concurrency and signals


def test_two_concurrent_force_expands_leave_one_valid_output(tmp_path, files):
    """Two CI jobs write the same output at once (--force, different seeds): the file is exactly one
    of the two results, never a mix, and no temp file is left."""
    _copy(files, tmp_path, "m.safetensors")
    refs = {}
    for seed in (0, 1):
        assert run_cli(["expand", "m.safetensors", "--alpha", "2", "--seed", seed, "-q", "-o", f"ref{seed}.safetensors"]).exit_code == 0
        refs[seed] = (tmp_path / f"ref{seed}.safetensors").read_bytes()
    assert refs[0] != refs[1]
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda s: fpe(["expand", "m.safetensors", "--alpha", "2", "--seed", s, "--force", "-q",
                                             "-o", "same.safetensors"], tmp_path), (0, 1)))
    for proc in procs:
        check_contract(proc, 0, json_out=False)
    assert (tmp_path / "same.safetensors").read_bytes() in (refs[0], refs[1])
    assert temp_files(tmp_path) == []


def test_an_output_created_while_expand_runs_is_not_overwritten(tmp_path, big):
    """No silent overwrite, checked where it matters: at the rename. Another job (or a second `fpe
    expand` of the same output) creates the file after fpe looked but before it renamed its temp file
    over it. Without --force fpe must not destroy that file: exit 2 `output exists`. BUG: the existence
    check runs once before the work (stfile.check_writable) and atomic_output ends with os.replace(),
    which clobbers whatever appeared meanwhile (two concurrent `fpe expand -o same` both exit 0)."""
    shutil.copyfile(big, tmp_path / "big.safetensors")
    out = tmp_path / "out.safetensors"
    proc = subprocess.Popen([*FPE, "expand", "big.safetensors", "--alpha", "4", "--layout", "dense", "--probe-samples",
                             "0", "-q", "-o", out.name], cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_until(proc, lambda: temp_files(tmp_path))  # fpe checked the path and started writing
    theirs = b"another job's result, written while fpe was busy"
    out.write_bytes(theirs)
    stdout, stderr = proc.communicate(timeout=120)
    assert out.read_bytes() == theirs, "the file that appeared meanwhile was silently overwritten"
    check_contract(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), 2, json_out=False)
    assert temp_files(tmp_path) == []


def test_sigint_mid_write_leaves_no_output_and_no_temp_file(tmp_path, big):
    """Ctrl-C (SIGINT) while the 42 MB output is being written: exit 130, `Error: interrupted`, no output
    and no temp file; the input untouched."""
    shutil.copyfile(big, tmp_path / "big.safetensors")
    proc = subprocess.Popen([*FPE, "expand", "big.safetensors", "--alpha", "4", "--layout", "dense", "--probe-samples",
                             "0", "-o", "out.safetensors", "--json"], cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    wait_until(proc, lambda: [n for n in temp_files(tmp_path) if (tmp_path / n).stat().st_size > 0])
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    check_contract(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), 130, json_out=True)
    assert stderr.strip() == "Error: interrupted"
    assert [p for p in listing(tmp_path) if not p.startswith("_home")] == ["big.safetensors"]
    assert (tmp_path / "big.safetensors").read_bytes() == big.read_bytes()


SIGNAL_WHILE_DISPATCHING = textwrap.dedent("""
    import functools, os, signal, sys
    from fpe_cli.cli import main
    from fpe_cli.cli.common import app
    callback = app.registered_callback.callback

    @functools.wraps(callback)
    def signalled(*args, **kwargs):  # runs while Click dispatches, before the command body
        os.kill(os.getpid(), getattr(signal, os.environ["QA_SIGNAL"]))
        return callback(*args, **kwargs)

    app.registered_callback.callback = signalled
    sys.argv = ["fpe", *sys.argv[1:]]
    main()
""")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_while_arguments_are_dispatched_is_exit_130_with_one_error_line(tmp_path, files, sig):
    """A SIGTERM/Ctrl-C that lands after fpe installed its handlers but before the command body runs
    (observed with `timeout`-style kills about 0.1-0.2 s after start: exit 130, empty stderr). The
    contract: 130 and `Error: interrupted`. BUG: Typer's core turns the KeyboardInterrupt into Exit(130)
    silently (typer/core.py _main), and cli/__init__.py main() returns the code without a message."""
    _copy(files, tmp_path, "m.fpe2.safetensors")
    proc = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_DISPATCHING, "params", "m.fpe2.safetensors", "--json"],
                          cwd=tmp_path, env=subprocess_env(QA_SIGNAL=sig), capture_output=True, text=True, timeout=120,
                          preexec_fn=_default_sigint)
    check_contract(proc, 130, json_out=True, label=sig)
    assert proc.stderr.strip() == "Error: interrupted"


SIGNAL_WHILE_IMPORTING = textwrap.dedent("""
    import os, runpy, signal, sys

    class SignalOnImport:  # the signal lands while `fpe` is still importing its CLI framework
        def find_spec(self, name, path=None, target=None):
            if name == "typer.exceptions":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), getattr(signal, os.environ["QA_SIGNAL"]))
            return None

    sys.meta_path.insert(0, SignalOnImport())
    sys.argv = ["fpe", *sys.argv[1:]]
    runpy.run_module("fpe_cli", run_name="__main__", alter_sys=True)
""")


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_signal_during_startup_imports_is_exit_130_with_one_error_line(tmp_path, files, sig):
    """Ctrl-C or SIGTERM in the first ~0.1 s (a script killed right after starting it; observed with
    SIGINT 0.05 s after start: a KeyboardInterrupt traceback and exit -2). cli/__init__.py guards the
    imports of `.common` and the commands with `except KeyboardInterrupt`, but `from typer.exceptions
    import TyperException` (cli/__init__.py:12, ~45 ms of imports) runs before that try, and the SIGTERM
    handler is only installed in main(), after every import. BUG: SIGINT gives a traceback, SIGTERM
    kills the process by signal (rc -15) instead of exit 130 with `Error: interrupted`."""
    _copy(files, tmp_path, "m.fpe2.safetensors")
    proc = subprocess.run([sys.executable, "-c", SIGNAL_WHILE_IMPORTING, "params", "m.fpe2.safetensors", "--json"],
                          cwd=tmp_path, env=subprocess_env(QA_SIGNAL=sig), capture_output=True, text=True, timeout=120,
                          preexec_fn=_default_sigint)
    check_contract(proc, 130, json_out=True, label=sig)
    assert proc.stderr.strip() == "Error: interrupted"


# ---------------------------------------------------------------- 6. repeated runs


def test_same_command_twice_gives_the_same_bytes_and_force_replaces_atomically(tmp_path, files):
    """Rerunning a pipeline step gives byte-identical files (expand, convert, data, analyze --csv);
    --force replaces an older output with the complete new file, keeping its permissions."""
    _copy(files, tmp_path, "m.safetensors", "m.fpe2.safetensors")
    steps = [
        ["expand", "m.safetensors", "--alpha", "2", "--split", "gram", "--seed", "3", "-o", "{}.safetensors"],
        ["convert", "m.fpe2.safetensors", "--layout", "dense", "-o", "{}.safetensors"],
        ["data", "dnf:vars=12,clauses=3,k=3,train=64,test=32", "-o", "{}.npz"],
    ]

    def run_twice(step):
        return [fpe([a.format(f"{step[0]}{i}") for a in step], tmp_path) for i in (1, 2)]

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run_twice, steps))
    for step, procs in zip(steps, results):
        for proc in procs:
            check_contract(proc, 0, json_out=False, label=" ".join(step))
        suffix = Path(step[-1]).suffix
        assert (tmp_path / f"{step[0]}1{suffix}").read_bytes() == (tmp_path / f"{step[0]}2{suffix}").read_bytes(), step
    target = tmp_path / "expand1.safetensors"
    target.write_bytes(b"stale")
    os.chmod(target, 0o640)
    proc = fpe(["expand", "m.safetensors", "--alpha", "2", "--split", "gram", "--seed", "3", "-o", target.name,
                "--force", "-q"], tmp_path)
    check_contract(proc, 0, json_out=False)
    assert target.read_bytes() == (tmp_path / "expand2.safetensors").read_bytes()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------------- found while fixing the above


def test_fpe_alone_prints_the_help_without_an_empty_error_line(tmp_path):
    proc = fpe([], tmp_path)
    assert proc.returncode == 2  # Click's convention for a missing command
    assert "Usage: fpe" in proc.stdout + proc.stderr and "expand" in proc.stdout + proc.stderr
    assert "Error:" not in proc.stderr, proc.stderr


def test_an_unknown_split_or_outgoing_is_named_before_an_existing_output(tmp_path, files):
    _copy(files, tmp_path, "m.safetensors", "m.fpe2.safetensors")
    for flag in (["--split", "nope"], ["--outgoing", "nope"]):
        line = assert_one_error_line(run_cli(["expand", tmp_path / "m.safetensors", "--alpha", "2", *flag]), "nope")
        assert "exists" not in line and "choose one of" in line


def test_convert_counts_only_the_violations(tmp_path, files):
    _copy(files, tmp_path, "offmask.safetensors")
    line = assert_one_error_line(run_cli(["convert", tmp_path / "offmask.safetensors", "--layout", "packed",
                                          "-o", tmp_path / "p.safetensors"]), "not be lossless", code=3)
    assert line.startswith("Error: 1 invariant(s) violated"), line


# ---------------------------------------------------------------- a terminal that cannot show a name


@pytest.mark.parametrize("json_out", [False, True])
def test_a_name_the_output_encoding_cannot_show_is_escaped_not_an_internal_error(tmp_path, json_out):
    """PYTHONIOENCODING=ascii (or a C locale on an old Python) and a model named modèle: the table prints
    the name escaped and exits 0; --json stays valid JSON that decodes to the real name."""
    model = save_mlp(tmp_path / "modèle.safetensors", [12, 8, 3])
    proc = fpe(["params", model.name, *(["--json"] if json_out else [])], tmp_path, env=subprocess_env(PYTHONIOENCODING="ascii"))
    doc = check_contract(proc, 0, json_out=json_out, label="ascii output")
    if json_out:
        assert doc["model"].endswith("modèle.safetensors")
    else:
        assert "mod\\xe8le.safetensors" in proc.stdout
        assert "8x12" in proc.stdout and "120" in proc.stdout  # the shape and the 96 + 24 weights
