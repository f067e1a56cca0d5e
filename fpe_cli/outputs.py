"""Outputs that never destroy anything: the checks before the work, atomic writes, publishing together.

`check_writable` refuses an output that would overwrite an input, a directory, a symlink, a special file
or (without --force) an existing file, and tries the directory for real. `atomic_output` writes a temp file
beside the output, fsyncs it and publishes it (a hard link without --force, so a file that appeared
meanwhile is not replaced; a rename with it); on any failure or interrupt the temp file goes.
`outputs_together` publishes a command's several outputs all or none.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import FPEError, OutputExistsError

_STAGED: list[list] | None = None  # inside outputs_together(): finished temp files waiting to be published


@contextlib.contextmanager
def outputs_together() -> Iterator[None]:
    """Publish every atomic_output of the block only once all of them are written: a command with several
    outputs (a checkpoint and its plan, a data set and its clause map, plots) that fails, e.g. on a full
    disk, leaves none of them, where separate writes left the first behind to block a rerun."""
    global _STAGED
    if _STAGED is not None:  # nested: the outputs join the outer block's
        yield
        return
    _STAGED = staged = []
    try:
        yield
        _publish_all(staged)
    except BaseException:
        for _, path, _, prefix in staged:
            _remove_temps(path.parent, prefix)
        raise
    finally:
        _STAGED = None


def _publish_all(staged: list[list]) -> None:
    """Publish staged outputs all or none: the new names (hard links) first, undone if one fails; then the
    --force replacements, which fail only on an OS error."""
    linked: list[Path] = []
    try:
        for tmp, path, force, prefix in staged:
            if not force:
                with _named(path, prefix):
                    _publish(tmp, path, False, keep_temp=True)
                linked.append(path)
    except BaseException:
        for path in linked:
            path.unlink(missing_ok=True)
        raise
    for tmp, path, force, prefix in staged:
        with _named(path, prefix):
            if force:
                os.replace(tmp, path)
            else:
                tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def _named(path: Path, prefix: str) -> Iterator[None]:
    """OSErrors raised while writing `path` name it, not its temp file (`No space left on device` alone named
    nothing, and `.out.safetensors.123-ab.xyz.tmp: Permission denied` a file the user never asked for)."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None or Path(str(exc.filename)).name.startswith(prefix):
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


def _temp_prefix(path: Path) -> str:
    """`.NAME.PID-RANDOM.`: unique to one call and known before the file exists (an interrupt that lands inside
    mkstemp, after it created the file but before it returned the name, still finds it). The name is cut so
    that the temp name fits the usual 255-byte limit when the output's own name does."""
    name = path.name.encode("utf-8", "surrogateescape")[:200].decode("utf-8", "ignore")
    return f".{name}.{os.getpid()}-{secrets.token_hex(4)}."


@contextlib.contextmanager
def atomic_output(path: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync and rename it over `path`, else remove it.
    Errors while writing name `path`, not the temp file (`No space left on device` alone named nothing)."""
    path = Path(path)
    check_writable(path, force=force)
    prefix = _temp_prefix(path)
    try:
        with _named(path, prefix):
            fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp_path = Path(tmp)
            yield tmp_path
            with open(tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp_path, _output_mode(path))  # mkstemp makes 0600; give the file the usual permissions
            if _STAGED is not None:
                _STAGED.append([tmp_path, path, force, prefix])
            else:
                _publish(tmp_path, path, force)
    except BaseException:
        _remove_temps(path.parent, prefix)
        raise


def _publish(tmp: Path, path: Path, force: bool, keep_temp: bool = False) -> None:
    """Move the finished temp file to `path`. Without --force, a file that appeared there while fpe was
    working (another run, another tool) is not replaced: a hard link fails when the name exists, where a
    rename would silently overwrite. Filesystems without hard links fall back to check-then-rename.
    `keep_temp`: leave the temp name too (outputs_together removes it once every output is published)."""
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OutputExistsError(f"{path}: output exists (it appeared while fpe was working)",
                                "pass --force to overwrite") from None
    except OSError:  # no hard links here (EPERM, ENOTSUP, ...): the check made before the work stands
        check_writable(path)
        os.replace(tmp, path)  # the temp name goes too (outputs_together's unlink then finds nothing)
        return
    if not keep_temp:
        tmp.unlink()


def _remove_temps(directory: Path, prefix: str) -> None:
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith(prefix) and entry.name.endswith(".tmp"):
                    Path(entry.path).unlink(missing_ok=True)
    except OSError:  # the directory itself went away: nothing left to clean, keep the original error
        pass


def _output_mode(path: Path) -> int:
    """Permissions for a new output: an overwritten file's own, else 0666 minus the umask (like open())."""
    if path.exists():
        return path.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _probe_directory(path: Path) -> None:
    """Files can be created beside `path`: refused before the work, not after it. Asked of the effective ids
    (a process with capabilities, a setuid wrapper) and of the mount (read-only), without creating a file."""
    parent = path.parent
    if os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    effective = os.access in os.supports_effective_ids
    if not os.access(parent, os.W_OK | os.X_OK, effective_ids=effective):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def check_writable(path: Path, *, force: bool = False, inputs: tuple[Path, ...] = (),
                   outputs: dict[str, Path] | None = None, flag: str = "the output") -> None:
    """Refuse outputs that would destroy something: an input, another output of the same command
    (`outputs`: flag -> path; `flag` names this one), a directory, a symlink, an existing file; and `-`,
    which names standard output in shell tools."""
    path = Path(path)
    if str(path) == "-":
        raise FPEError(f"-: {flag} is a file; fpe writes its outputs to files, not to standard output",
                       "name a file (--json prints the report on stdout)")
    for other_flag, other in (outputs or {}).items():
        if path.resolve() == Path(other).resolve():
            raise FPEError(f"{path}: {flag} and {other_flag} name the same file", "give each output its own path")
    if path.is_dir():
        raise FPEError(f"{path}: output path is a directory", "name a file, e.g. -o out.safetensors")
    if not path.parent.exists():
        tilde = str(path).startswith("~")  # quoted, so the shell left it: fpe takes paths as given
        raise FPEError(f"{path.parent}: output directory does not exist",
                       "the shell did not expand a quoted ~: write $HOME/... or leave ~ unquoted" if tilde
                       else "create it first (mkdir -p)")
    _probe_directory(path)
    for src in inputs:
        if path.exists() and src.exists() and os.path.samefile(path, src):
            raise FPEError(f"{path}: output path is the input file", "choose another output path")
        if path.resolve() == Path(src).resolve():
            raise FPEError(f"{path}: output path is the input file", "choose another output path")
    if path.is_symlink():
        raise FPEError(f"{path}: output path is a symbolic link; refusing to write through it", "choose a plain path")
    if path.exists() and not path.is_file():  # a FIFO, socket or device node: --force must not replace it
        raise FPEError(f"{path}: output path exists and is not a regular file", "choose a plain file path")
    if path.exists() and not force:
        raise OutputExistsError(f"{path}: output exists", "pass --force to overwrite")
