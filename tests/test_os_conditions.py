"""The reliability contract (README "Reliability") under real operating conditions.

What the other suites do not reach: a disk that fills up while an output is written (a small tmpfs),
an unprivileged process (root with every capability dropped, so file modes apply) against a directory
it cannot write or a file it cannot read, C/ASCII locales with file names that are not UTF-8, names at
the file-system length limit and names starting with '-', two runs writing one output (expand) or one
resume state (finetune), SIGTERM/SIGHUP mid-write onto an existing output, and stdout that is a full
device or a pipe whose reader is gone.

Promise checked everywhere: the documented exit code, exactly one `Error:` line on stderr (no
traceback), no partial output, no `.NAME.*.tmp` left behind, an existing output (with --force) intact.

Tests that need root-only facilities (mount, dropping capabilities) skip when they are not available.
The tests of bugs found in that review were strict xfails until the code was fixed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import assert_one_error_line, run_cli, save_mlp, subprocess_env, temp_files, wait_until

_EXE = Path(sys.executable).parent / "fpe"
FPE = [str(_EXE)] if _EXE.exists() else [sys.executable, "-m", "fpe_cli"]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ---------------------------------------------------------------- helpers


def fpe(args, cwd: Path, *, env: dict | None = None, prefix: list[str] | None = None, timeout: float = 120,
        **kw) -> subprocess.CompletedProcess:
    """The real executable; args may be bytes (file names that are not UTF-8)."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    argv = [*(prefix or []), *FPE, *(a if isinstance(a, bytes) else str(a) for a in args)]
    return subprocess.run(argv, cwd=cwd, env=env or subprocess_env(), timeout=timeout, **kw)


def _text(data) -> str:
    return data.decode("utf-8", "backslashreplace") if isinstance(data, bytes) else (data or "")


def one_error_line(proc: subprocess.CompletedProcess, code: int, *needles: str, stdout_empty: bool = True) -> str:
    out, err = _text(proc.stdout), _text(proc.stderr)
    where = f"rc={proc.returncode}\nstdout={out[:400]!r}\nstderr={err[-1500:]!r}"
    assert proc.returncode == code, where
    assert "Traceback" not in out + err, where
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), where
    if stdout_empty:
        assert out == "", where
    for needle in needles:
        assert needle.lower() in lines[0].lower(), (needle, lines[0])
    return lines[0]


def entries(where: Path) -> list[str]:
    return sorted(str(p.relative_to(where)) for p in Path(where).rglob("*"))


def _default_signals() -> None:
    """Background jobs of a non-interactive shell inherit SIGINT ignored; nohup-like parents SIGHUP."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


# ---------------------------------------------------------------- inputs (built in-process: fast)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """m.safetensors (64-32-10, digits-shaped), e2.safetensors (its alpha-2 expansion), digits.npz."""
    where = tmp_path_factory.mktemp("os-inputs")
    save_mlp(where / "m.safetensors", [64, 32, 10])
    cwd = os.getcwd()
    os.chdir(where)
    try:
        assert run_cli(["expand", "m.safetensors", "--alpha", "2", "-q", "-o", "e2.safetensors"]).exit_code == 0
        assert run_cli(["data", "digits", "-o", "digits.npz", "-q"]).exit_code == 0
    finally:
        os.chdir(cwd)
    return where


def _copy(src: Path, dest: Path, *names: str) -> None:
    for name in names:
        shutil.copyfile(src / name, dest / name)


# ---------------------------------------------------------------- a disk that fills up (tmpfs)


@pytest.fixture
def small_fs(tmp_path):
    """A 64 KiB tmpfs mounted at tmp_path/full; always unmounted afterwards."""
    if not IS_ROOT:
        pytest.skip("mounting a tmpfs needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("mount/umount not installed")
    point = tmp_path / "full"
    point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0777", "tmpfs", str(point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield point
    finally:
        if subprocess.run(["umount", str(point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(point)], capture_output=True)


def fill(point: Path, leave: int = 0) -> None:
    """Fill the file system at `point` until `leave` bytes are free."""
    st = os.statvfs(point)
    free = st.f_bavail * st.f_frsize
    with open(point / "filler", "ab") as fh:
        with contextlib.suppress(OSError):
            fh.write(b"\0" * max(0, free - leave))


# (argv, the outputs the command names, outputs that may be named by the error line)
def _disk_full_cases(full: str):
    return {
        "expand": (["expand", "m.safetensors", "--alpha", "2", "-o", f"{full}/out.safetensors", "-q"],
                   ["out.safetensors"]),
        "expand-save-plan": (["expand", "m.safetensors", "--alpha", "2", "-o", f"{full}/out.safetensors",
                              "--save-plan", f"{full}/plan.safetensors", "-q"], ["out.safetensors", "plan.safetensors"]),
        "convert": (["convert", "e2.safetensors", "--layout", "dense", "-o", f"{full}/dense.safetensors"],
                    ["dense.safetensors"]),
        "data": (["data", "digits", "-o", f"{full}/d.npz"], ["d.npz"]),
        "data-clause-map": (["data", "dnf:vars=12,clauses=4,k=3,train=64,test=32", "-o", f"{full}/dnf.npz",
                             "--clause-map", f"{full}/clauses.json"], ["dnf.npz", "clauses.json"]),
        "analyze-csv": (["analyze", "m.safetensors", "--csv", f"{full}/n.csv", "--json"], ["n.csv"]),
        "train": (["train", "--data", "digits.npz", "--hidden", "8", "--epochs", "1", "-o", f"{full}/t.safetensors"],
                  ["t.safetensors"]),
        "finetune": (["finetune", "e2.safetensors", "--data", "digits.npz", "--epochs", "2", "--checkpoint-every", "1",
                      "-o", f"{full}/ft.safetensors"], ["ft.safetensors", "ft.resume.safetensors"]),
    }


DISK_FULL = list(_disk_full_cases("X"))


@pytest.mark.parametrize("case", DISK_FULL)
def test_disk_full_is_exit_1_one_error_line_and_leaves_nothing(tmp_path, inputs, small_fs, case):
    """ENOSPC while the output is written: a runtime failure (exit 1), one `Error:` line saying so,
    no output, no temp file (--json: stdout empty)."""
    _copy(inputs, tmp_path, "m.safetensors", "e2.safetensors", "digits.npz")
    fill(small_fs)
    argv, _ = _disk_full_cases(str(small_fs))[case]
    res = run_cli(argv)
    assert_one_error_line(res, "no space left on device", code=1)
    assert entries(small_fs) == ["filler"]
    assert temp_files(tmp_path) == []


@pytest.mark.parametrize("case", ["expand", "convert", "data", "analyze-csv", "train", "finetune"])
def test_disk_full_error_line_names_the_file(tmp_path, inputs, small_fs, case):
    _copy(inputs, tmp_path, "m.safetensors", "e2.safetensors", "digits.npz")
    fill(small_fs)
    argv, names = _disk_full_cases(str(small_fs))[case]
    res = run_cli(argv)
    line = assert_one_error_line(res, "no space left on device", code=1)
    assert any(name in line for name in names), line


@pytest.mark.parametrize("case", ["expand", "convert", "data"])
def test_disk_full_with_force_leaves_the_existing_output_intact(tmp_path, inputs, small_fs, case):
    _copy(inputs, tmp_path, "m.safetensors", "e2.safetensors", "digits.npz")
    argv, names = _disk_full_cases(str(small_fs))[case]
    target = small_fs / names[0]
    target.write_bytes(b"the previous result")
    fill(small_fs)
    res = run_cli([*argv, "--force"])
    assert_one_error_line(res, "no space left on device", code=1)
    assert target.read_bytes() == b"the previous result"
    assert entries(small_fs) == sorted(["filler", names[0]])


def test_disk_full_at_the_second_resume_state_keeps_the_first_and_resume_finishes_it(tmp_path, inputs, small_fs):
    """64 KiB holds one resume state (~41 KB) but not the temp file of the next one: exit 1, the epoch-1
    state intact; after space is freed, --resume writes the bytes an uninterrupted run writes."""
    _copy(inputs, tmp_path, "m.safetensors", "digits.npz")
    out = small_fs / "r.safetensors"
    args = ["finetune", "m.safetensors", "--data", "digits.npz", "--epochs", "3", "--checkpoint-every", "1", "-q"]
    res = run_cli([*args, "-o", out])
    assert_one_error_line(res, "no space left on device", code=1)
    assert entries(small_fs) == ["r.resume.safetensors"]
    from safetensors import safe_open
    with safe_open(str(small_fs / "r.resume.safetensors"), "pt") as fh:
        assert json.loads(fh.metadata()["fpe.resume"])["epoch"] == 1
    assert subprocess.run(["mount", "-o", "remount,size=2m", str(small_fs)], capture_output=True).returncode == 0
    assert run_cli([*args, "-o", out, "--resume"]).exit_code == 0
    assert run_cli([*args, "-o", tmp_path / "ref.safetensors"]).exit_code == 0
    assert out.read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert entries(small_fs) == ["r.safetensors"]


def test_a_failed_save_plan_does_not_leave_the_expanded_output(tmp_path, inputs, small_fs):
    _copy(inputs, tmp_path, "m.safetensors")
    fill(small_fs)
    res = run_cli(["expand", "m.safetensors", "--alpha", "2", "-o", "out.safetensors",
                   "--save-plan", small_fs / "plan.safetensors", "-q"])
    assert_one_error_line(res, "no space left on device", code=1)
    assert temp_files(tmp_path) == []
    assert not (tmp_path / "out.safetensors").exists(), "the command failed but its -o output was published"


def test_a_failed_clause_map_does_not_leave_the_data_set(tmp_path, small_fs):
    fill(small_fs)
    res = run_cli(["data", "dnf:vars=12,clauses=4,k=3,train=64,test=32", "-o", "dnf.npz",
                   "--clause-map", small_fs / "clauses.json"])
    assert_one_error_line(res, "no space left on device", code=1)
    assert not (tmp_path / "dnf.npz").exists(), "the command failed but its -o output was published"


def test_disk_full_while_plotting_leaves_no_plot(tmp_path, inputs, small_fs):
    pytest.importorskip("matplotlib")
    _copy(inputs, tmp_path, "m.safetensors")
    res = run_cli(["analyze", "m.safetensors", "--plots", small_fs / "plots", "--json"])
    assert_one_error_line(res, "no space left on device", code=1)
    assert temp_files(small_fs) == []
    assert list((small_fs / "plots").glob("*.png")) == [], sorted(p.name for p in (small_fs / "plots").iterdir())


# ---------------------------------------------------------------- file names at the length limit


def test_an_output_name_near_the_length_limit_is_written(tmp_path, inputs):
    _copy(inputs, tmp_path, "m.safetensors")
    name = "o" * (240 - len(".safetensors")) + ".safetensors"
    res = run_cli(["expand", "m.safetensors", "--alpha", "2", "-q", "-o", name])
    assert res.exit_code == 0, res.stderr
    assert (tmp_path / name).is_file()


def test_a_255_byte_input_name_reads_and_its_too_long_default_output_is_one_error_line(tmp_path, inputs):
    name = "L" * (255 - len(".safetensors")) + ".safetensors"
    shutil.copyfile(inputs / "m.safetensors", tmp_path / name)
    assert run_cli(["params", name, "--json"]).json()["total"]["weights"] == 64 * 32 + 32 * 10
    res = run_cli(["expand", name, "--alpha", "2", "-q"])  # default NAME.fpe2.safetensors: over NAME_MAX
    assert_one_error_line(res, "file name too long", ".fpe2.safetensors", code=2)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "_home") == [name]


# ---------------------------------------------------------------- an unprivileged process


def _unprivileged_prefix() -> list[str]:
    """Root without capabilities: file modes apply to it as to any user, while it can still run the
    interpreter under /root (which uid 65534 cannot reach here)."""
    if not IS_ROOT:
        pytest.skip("dropping privileges needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    prefix = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    probe = subprocess.run([*prefix, "cat", "/proc/self/status"], capture_output=True, text=True)
    if probe.returncode != 0 or "CapEff:\t0000000000000000" not in probe.stdout:
        pytest.skip(f"cannot drop capabilities here: {probe.stderr.strip()}")
    return prefix


@pytest.fixture
def locked(tmp_path, inputs):
    """ro/ (owned by nobody, 0755) holding a readable m.safetensors; secret.safetensors (nobody, 0600)."""
    prefix = _unprivileged_prefix()
    ro = tmp_path / "ro"
    ro.mkdir()
    _copy(inputs, tmp_path, "m.safetensors", "digits.npz")
    shutil.copyfile(inputs / "m.safetensors", ro / "m.safetensors")
    shutil.copyfile(inputs / "m.safetensors", tmp_path / "secret.safetensors")
    try:
        for p in (ro, tmp_path / "secret.safetensors"):
            os.chown(p, 65534, 65534)
    except PermissionError as exc:  # root without CAP_CHOWN (a container that dropped it)
        pytest.skip(f"cannot give files to another user here: {exc}")
    ro.chmod(0o755)
    (tmp_path / "secret.safetensors").chmod(0o600)
    return prefix


UNWRITABLE = {
    "expand": ["expand", "m.safetensors", "--alpha", "2", "-q", "-o", "ro/out.safetensors"],
    "expand-default-beside-model": ["expand", "ro/m.safetensors", "--alpha", "2", "-q"],
    "train": ["train", "--data", "digits.npz", "--hidden", "4", "--epochs", "1", "-q", "-o", "ro/t.safetensors"],
    "analyze-csv": ["analyze", "m.safetensors", "--csv", "ro/n.csv", "--json"],
}


def test_an_unwritable_directory_is_exit_2_one_error_line_and_nothing_written(tmp_path, locked):
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(UNWRITABLE, pool.map(lambda a: fpe(a, tmp_path, prefix=locked, text=True), UNWRITABLE.values())))
    for case, proc in procs.items():
        one_error_line(proc, 2, "permission denied")
    assert sorted(p.name for p in (tmp_path / "ro").iterdir()) == ["m.safetensors"]


def test_an_unwritable_directory_error_names_the_output_not_a_temp_file(tmp_path, locked):
    line = one_error_line(fpe(UNWRITABLE["expand"], tmp_path, prefix=locked, text=True), 2, "permission denied")
    assert ".tmp" not in line and "out.safetensors" in line, line


def test_unreadable_input_and_a_readable_model_in_an_unwritable_directory(tmp_path, locked):
    one_error_line(fpe(["params", "secret.safetensors", "--json"], tmp_path, prefix=locked, text=True), 2,
                   "secret.safetensors")
    proc = fpe(["params", "ro/m.safetensors", "--json"], tmp_path, prefix=locked, text=True)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["total"]["weights"] == 64 * 32 + 32 * 10
    assert sorted(p.name for p in (tmp_path / "ro").iterdir()) == ["m.safetensors"]


# ---------------------------------------------------------------- locales, encodings, odd names


@pytest.mark.parametrize("env", [{"LANG": "C", "LC_ALL": "C"}, {"LC_ALL": "C", "PYTHONIOENCODING": "ascii"}],
                         ids=["LC_ALL=C", "C+ascii"])
def test_non_utf8_file_names_under_c_and_ascii_locales(tmp_path, inputs, env):
    src = os.fsencode(tmp_path) + b"/m\xe9.safetensors"
    shutil.copyfile(inputs / "m.safetensors", src)
    proc = fpe(["expand", b"m\xe9.safetensors", "--alpha", "2", "--json"], tmp_path, env=subprocess_env(**env))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # one ASCII document; the name escaped, not an encoding error
    assert doc["output"].encode("utf-8", "surrogateescape") == b"m\xe9.fpe2.safetensors"
    assert os.path.isfile(os.fsencode(tmp_path) + b"/m\xe9.fpe2.safetensors")
    one_error_line(fpe(["params", b"n\xe9.safetensors"], tmp_path, env=subprocess_env(**env)), 2)  # missing: one line
    assert temp_files(tmp_path) == []


def test_names_starting_with_a_dash(tmp_path, inputs):
    shutil.copyfile(inputs / "m.safetensors", tmp_path / "-m.safetensors")
    proc = fpe(["params", "--json", "--", "-m.safetensors"], tmp_path, text=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["total"]["weights"] == 64 * 32 + 32 * 10, proc.stderr
    proc = fpe(["expand", "--alpha", "2", "-q", "-o", "-x.safetensors", "--", "-m.safetensors"], tmp_path, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "-x.safetensors").is_file()
    one_error_line(fpe(["params", "-m.safetensors"], tmp_path, text=True), 2, "-m")


# ---------------------------------------------------------------- concurrency and signals


def test_two_concurrent_expands_without_force_one_wins_the_other_is_refused(tmp_path, inputs):
    _copy(inputs, tmp_path, "m.safetensors")
    refs = {}
    for seed in (0, 1):
        assert run_cli(["expand", "m.safetensors", "--alpha", "2", "--seed", seed, "-q", "-o", f"r{seed}.safetensors"]).exit_code == 0
        refs[seed] = (tmp_path / f"r{seed}.safetensors").read_bytes()
    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(lambda s: fpe(["expand", "m.safetensors", "--alpha", "2", "--seed", s, "-q", "-o", "same.safetensors"],
                                            tmp_path, text=True), (0, 1)))
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [(p.returncode, p.stderr) for p in procs]
    loser = next(p for p in procs if p.returncode == 2)
    one_error_line(loser, 2, "output exists")
    assert (tmp_path / "same.safetensors").read_bytes() == refs[[p.returncode for p in procs].index(0)]
    assert temp_files(tmp_path) == []


# Both runs pass their "is there a resume state already?" check before either writes one (as two jobs
# started at the same moment do); the wrapper only holds each run after the real check until both got there.
SAME_MOMENT = textwrap.dedent("""
    import os, sys, time
    import fpe_cli.train_pipeline as tp
    check = tp.check_run_outputs
    def held(*args, **kwargs):
        check(*args, **kwargs)
        open(os.path.join(os.environ["QA_DIR"], f"ready.{os.getpid()}"), "w").close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and len([n for n in os.listdir(os.environ["QA_DIR"]) if n.startswith("ready.")]) < 2:
            time.sleep(0.01)
    tp.check_run_outputs = held
    from fpe_cli.cli import main
    sys.argv = ["fpe", *sys.argv[1:]]
    main()
""")


def test_two_finetunes_with_the_same_output_do_not_share_a_resume_state(tmp_path, inputs):
    _copy(inputs, tmp_path, "m.safetensors", "digits.npz")
    sync = tmp_path / "sync"
    sync.mkdir()
    base = ["finetune", "m.safetensors", "--data", "digits.npz", "--epochs", "25", "--checkpoint-every", "1", "-q",
            "-o", "ft.safetensors"]
    procs = [subprocess.Popen([sys.executable, "-c", SAME_MOMENT, *base, "--lr", lr], cwd=tmp_path,
                              env=subprocess_env(QA_DIR=str(sync)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for lr in ("0.001", "0.0005")]
    from safetensors import safe_open
    seen = set()
    state = tmp_path / "ft.resume.safetensors"
    while any(p.poll() is None for p in procs):
        with contextlib.suppress(Exception):  # replaced or removed between the calls: look again
            with safe_open(str(state), "pt") as fh:
                seen.add(json.loads(fh.metadata()["fpe.resume"])["run"]["settings"]["lr"])
        time.sleep(0.01)
    results = [(p.returncode, *p.communicate()) for p in procs]
    assert len(seen) <= 1, f"the resume state was written by both runs (lr {sorted(seen)}): {results}"
    assert sorted(r[0] for r in results) == [0, 2], results
    assert not state.exists(), "a resume state outlived the finished output"
    assert temp_files(tmp_path) == []


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    """1024 -> 2048 -> 16 float32: its alpha-4 dense expansion (42 MB) takes a moment to write."""
    path = tmp_path_factory.mktemp("os-big") / "big.safetensors"
    save_mlp(path, [1024, 2048, 16])
    return path


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_mid_write_with_force_keeps_the_old_output_and_leaves_no_temp_file(tmp_path, big, sig):
    shutil.copyfile(big, tmp_path / "big.safetensors")
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"the previous result")
    proc = subprocess.Popen([*FPE, "expand", "big.safetensors", "--alpha", "4", "--layout", "dense", "--probe-samples",
                             "0", "--force", "-o", out.name, "--json"], cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    wait_until(proc, lambda: [n for n in temp_files(tmp_path) if (tmp_path / n).stat().st_size > 0])
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), 130, "interrupted")
    assert out.read_bytes() == b"the previous result"
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------------- stdout and stdin


def _sh(script: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    """A shell line with "$@" = the fpe command (pipes and redirections as scripts write them)."""
    return subprocess.run(["sh", "-c", script, "sh", *FPE], cwd=cwd, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120, **kw)


def test_stdout_on_dev_full_is_exit_1_one_line_and_quiet_runs_still_succeed(tmp_path, inputs):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    _copy(inputs, tmp_path, "m.safetensors")
    one_error_line(_sh('"$@" params m.safetensors --json > /dev/full', tmp_path), 1, "no space left")
    # expand writes its file, then cannot print the report: exit 1; the file itself is complete
    proc = _sh('"$@" expand m.safetensors --alpha 2 -o e.safetensors --json > /dev/full', tmp_path)
    one_error_line(proc, 1, "no space left")
    assert run_cli(["verify", "e.safetensors", "--source", "m.safetensors"]).exit_code == 0
    proc = _sh('"$@" expand m.safetensors --alpha 2 -q -o q.safetensors > /dev/full', tmp_path)  # nothing on stdout
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert temp_files(tmp_path) == []


def test_stdout_on_dev_full_error_says_it_is_stdout(tmp_path, inputs):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    _copy(inputs, tmp_path, "m.safetensors")
    line = one_error_line(_sh('"$@" params m.safetensors --json > /dev/full', tmp_path), 1, "no space left")
    assert "stdout" in line.lower() or "standard output" in line.lower(), line


def _reader_goes_away(args, cwd: Path, read: int) -> subprocess.CompletedProcess:
    """`fpe ARGS | head -c READ` (READ 0: `| false`): the reader takes READ bytes, then closes the pipe."""
    proc = subprocess.Popen([*FPE, *map(str, args)], cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    if read:
        proc.stdout.read(read)
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, b"", err)


def test_a_reader_that_goes_away_and_a_closed_stdin(tmp_path, inputs):
    _copy(inputs, tmp_path, "m.safetensors", "digits.npz")
    for args in (["params", "m.safetensors"], ["params", "m.safetensors", "--json"]):  # | head -c1
        proc = _reader_goes_away(args, tmp_path, 1)
        if proc.returncode:  # 0 when everything fit in the pipe buffer before head left
            one_error_line(proc, 1, "broken pipe")
    # `expand ... --json | false`: exit 0 or 1 with one line; the output itself is complete either way
    proc = _reader_goes_away(["expand", "m.safetensors", "--alpha", "2", "-o", "p.safetensors", "--json"], tmp_path, 0)
    assert proc.returncode in (0, 1), proc.stderr
    if proc.returncode:
        one_error_line(proc, 1, "broken pipe")
    assert run_cli(["verify", "p.safetensors", "--source", "m.safetensors"]).exit_code == 0
    proc = _sh('"$@" train --data digits.npz --hidden 4 --epochs 1 -q -o t.safetensors <&-', tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert (tmp_path / "t.safetensors").is_file()
    assert temp_files(tmp_path) == []


# ---------------------------------------------------------------- publishing several outputs (review findings)


def test_outputs_published_together_are_all_or_none(tmp_path):
    """The second output appearing meanwhile (another run) fails the publish: the first, already linked, is
    taken back; nested blocks join the outer one; no temp file is left."""
    from fpe_cli.errors import FPEError
    from fpe_cli.outputs import atomic_output, outputs_together

    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    with pytest.raises(FPEError, match="b.bin: output exists"):
        with outputs_together():
            with atomic_output(a) as tmp:
                tmp.write_bytes(b"a")
            with atomic_output(b) as tmp:
                tmp.write_bytes(b"b")
            b.write_bytes(b"another run's")
    assert not a.exists() and b.read_bytes() == b"another run's" and temp_files(tmp_path) == []
    with pytest.raises(RuntimeError):
        with outputs_together():
            with outputs_together():
                with atomic_output(a) as tmp:
                    tmp.write_bytes(b"a")
            raise RuntimeError("the outer block fails after the inner one")
    assert not a.exists() and temp_files(tmp_path) == []
    with outputs_together():
        for p in (a, tmp_path / "c.bin"):
            with atomic_output(p) as tmp:
                tmp.write_bytes(p.name.encode())
    assert a.read_bytes() == b"a.bin" and (tmp_path / "c.bin").read_bytes() == b"c.bin" and temp_files(tmp_path) == []


def test_a_staged_publish_error_names_the_output(tmp_path):
    """--force onto a name that became a directory while fpe worked: the error names the output, not the temp."""
    from fpe_cli.outputs import atomic_output, outputs_together

    a = tmp_path / "a.bin"
    with pytest.raises(OSError) as info:
        with outputs_together():
            with atomic_output(a, force=True) as tmp:
                tmp.write_bytes(b"a")
            a.mkdir()
    assert info.value.filename == str(a) and temp_files(tmp_path) == []


def test_a_read_only_file_system_is_named_as_such_before_the_work(tmp_path, small_fs, inputs):
    """The directory is tried for real: a read-only mount says so (EROFS), as root too, and nothing is written."""
    _copy(inputs, tmp_path, "m.safetensors")
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], capture_output=True).returncode == 0
    proc = fpe(["expand", "m.safetensors", "--alpha", "2", "-q", "-o", f"{small_fs.name}/e.safetensors"], tmp_path,
               text=True)
    one_error_line(proc, 2, "read-only file system", "e.safetensors")
    assert list(small_fs.iterdir()) == []


def test_a_table_on_a_full_stdout_says_standard_output(tmp_path, inputs):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    _copy(inputs, tmp_path, "m.safetensors")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([*FPE, "params", "m.safetensors"], cwd=tmp_path, env=subprocess_env(), stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    one_error_line(proc, 1, "standard output: No space left on device")
