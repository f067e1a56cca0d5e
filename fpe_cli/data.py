"""Data sets: the `.npz` contract, the built-in `digits` set and the Boolean DNF generator.

A data set is four arrays: `x_train (N, d)` and `x_test (M, d)` float inputs; labels `y_train`,
`y_test` either integer class ids `(N,)` (single-label) or 0/1 matrices `(N, C)` (multi-label).
Specs accepted by `load_dataset`:
  - a path to an `.npz` file with those four keys (optional `num_classes` scalar; `name` string);
  - `digits` or `digits:test=0.25,seed=0` (scikit-learn's bundled 8x8 digits, pixels / 16);
  - `dnf:vars=32,clauses=8,k=3,...` (Boolean DNF task, see `fpe_cli.dnf`).
Nothing here prints; every problem is an `FPEError` naming the array and the expected shape. The checks
that arrays must pass and the in-memory `Dataset` are fpe_cli.dataset's; this module reads and writes files,
makes the built-in sets and checks a data set against a model.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from .dataset import KEYS, MAX_CLASSES, SAVE, Dataset, from_arrays
from .errors import JSON_ERRORS, FPEError
from .outputs import atomic_output


def label_notes(dataset: Dataset) -> list[str]:
    """Warnings about labels that are valid but probably not meant as read: a one-hot matrix is multi-label."""
    if not dataset.multilabel or dataset.num_classes < 2:  # (N, 1): one binary label, not one-hot
        return []
    if not all(len(y) and bool((y.sum(dim=1) == 1).all()) for y in (dataset.y_train, dataset.y_test)):
        return []
    return [f"{dataset.name}: y_train {tuple(dataset.y_train.shape)} is one-hot (one 1 per row) and is read as "
            f"{dataset.num_classes} independent 0/1 labels (BCE loss, exact-match accuracy, a logit > 0 predicts 1); "
            "for single-label classes save the class ids y.argmax(1) instead"]


def check_input_width(dataset: Dataset, d_in: int, key: str = "the model") -> None:
    if dataset.num_inputs != d_in:
        raise FPEError(
            f"{dataset.name}: x_train has {dataset.num_inputs} features (shape {tuple(dataset.x_train.shape)}) "
            f"but {key} takes {d_in} inputs", "use the data set the model was trained on")


ONE_OUTPUT_HINT = ("a model with one output is a binary (multi-label) classifier here: save y as an (N, 1) 0/1 matrix, "
                   "y.reshape(-1, 1)")


def check_output_width(dataset: Dataset, d_out: int, key: str = "the model") -> None:
    if dataset.multilabel and dataset.num_outputs != d_out:
        hint = ("y is an (N, 1) column, read as one 0/1 label per row; for class ids save y.ravel() (shape (N,))"
                if dataset.num_outputs == 1 else None)
        raise FPEError(f"{dataset.name}: y_train has {dataset.num_outputs} labels per row but {key} has {d_out} outputs",
                       hint)
    if not dataset.multilabel and d_out == 1:  # a softmax over one logit scores every sample as right
        raise FPEError(f"{dataset.name}: y_train holds class ids (N,) but {key} has 1 outputs", ONE_OUTPUT_HINT)
    if not dataset.multilabel and dataset.num_classes > d_out:
        ys = [y for y in (dataset.y_train, dataset.y_test) if y.numel()]
        top, low = max(int(y.max()) for y in ys), min(int(y.min()) for y in ys)
        if top < d_out:  # the labels fit: the file's num_classes asks for more outputs than the model has
            raise FPEError(f"{dataset.name}: num_classes is {dataset.num_classes} but {key} has {d_out} outputs "
                           f"(the labels go up to {top})", f"set num_classes={d_out} in the .npz, or leave it out")
        if low >= 1 and top == d_out:
            hint = f"the labels start at {low}: class ids are 0..{d_out - 1}, save y - 1"
        else:
            hint = f"expected y_train (N,) with labels 0..{d_out - 1}"
        raise FPEError(f"{dataset.name}: labels go up to {top} but {key} has {d_out} outputs", hint)


# ---------------------------------------------------------------- .npz files


def load_npz(path: Path) -> Dataset:
    path = Path(path)
    if not path.exists():
        raise FPEError(f"{path}: no such file", "give an .npz file or a built-in: digits, dnf:vars=32,clauses=8,k=3")
    if path.is_dir():
        raise FPEError(f"{path}: is a directory, expected an .npz file")
    _check_zip(path)  # an unreadable file is reported as such (permissions), not as a broken archive
    key = None
    try:
        npz = np.load(path, allow_pickle=False)
        with npz:
            arrays, other = {}, []
            for key in npz.files:  # one by one, so that an object array is named
                value = npz[key]
                if isinstance(value, np.ndarray):
                    arrays[key] = value
                else:  # np.load hands members that are no .npy over as bytes
                    other.append(key)
            if other and (not arrays or any(k in KEYS for k in other)):  # extra files beside the arrays are ignored
                raise FPEError(f"{path}: a zip archive whose member {other[0]!r} is not a numpy array (a torch.save "
                               "file?), expected an .npz archive", f"save the arrays with {SAVE}")
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise FPEError(f"{path}: {key}: holds an object (pickled) array, which is refused",
                           "save plain numeric or string arrays only (np.asarray(a, dtype=...))") from None
        raise FPEError(f"{path}: not a readable .npz archive ({exc})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise FPEError(f"{path}: not a readable .npz archive ({type(exc).__name__}: {exc})",
                       "the file may be truncated or corrupt: write it again with np.savez") from None
    num_classes = _scalar_int(arrays.pop("num_classes", None), path)
    origin = arrays.pop("name", None)
    info = _info(arrays.pop("info", None))
    if origin is not None and origin.dtype.kind == "U" and origin.shape == ():
        info["written_from"] = str(origin)  # the built-in spec `fpe data` wrote it from
    return from_arrays(str(path), arrays, num_classes, info)


def _check_zip(path: Path) -> None:
    """An .npz is a zip archive: name what else it is (np.load calls anything unknown 'pickled data')."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.startswith(b"PK"):
        return
    if head.startswith(b"\x93NUMPY"):
        kind = "a single .npy array"
    elif len(head) > 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000:
        kind = "a safetensors file"  # 8-byte header length, then the JSON header
    elif not head:
        kind = "an empty file"
    elif head[:1] == b"\x80":
        kind = "a pickle file, which is refused (loading it can execute code)"
    elif all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        kind = "a text file (CSV?)"
    else:
        kind = "an unknown binary format"
    save = SAVE
    if kind == "a safetensors file":
        hint = ("fpe reads data sets from .npz: np.savez('data.npz', **safetensors.numpy.load_file(path)) "
                f"with the keys of {save}")
    elif kind.startswith("a text file"):
        hint = (f"read it with a = np.loadtxt(path, delimiter=',', skiprows=1) (skiprows=0 without a header row), "
                "x = a[:, :-1].astype(np.float32), y = a[:, -1].astype(np.int64) (label column last), "
                f"split it and save {save}")
    else:
        hint = f"save the arrays with {save}"
    raise FPEError(f"{path}: {kind}, expected an .npz archive", hint)


def _scalar_int(value: np.ndarray | None, path: Path) -> int | None:
    if value is None:
        return None
    value = value.reshape(()) if value.size == 1 else value  # np.array([10]) is meant as 10
    if value.shape != () or not np.issubdtype(value.dtype, np.integer) or not 1 <= int(value) <= MAX_CLASSES:
        shown = f"{value.dtype} {value.shape}" if value.shape != () else repr(value.item())
        raise FPEError(f"{path}: num_classes: expected a positive integer scalar up to {MAX_CLASSES}, found {shown}")
    return int(value)


def _info(value: np.ndarray | None) -> dict:
    try:
        return json.loads(str(value)) if value is not None and value.dtype.kind == "U" else {}
    except JSON_ERRORS:
        return {}


def write_dataset_npz(dataset: Dataset, path: Path, force: bool = False) -> int:
    """Write the four arrays (plus name, num_classes, info) atomically; returns the bytes written."""
    arrays = {k: getattr(dataset, k).numpy() for k in KEYS}
    arrays["num_classes"] = np.array(dataset.num_classes, dtype=np.int64)
    arrays["name"] = np.array(dataset.name)
    arrays["info"] = np.array(json.dumps(dataset.info, sort_keys=True))
    with atomic_output(Path(path), force=force) as tmp:
        with open(tmp, "wb") as fh:  # a file object: np.savez would otherwise append ".npz" to the name
            np.savez_compressed(fh, **arrays)
        size = tmp.stat().st_size  # the temp file's: inside outputs_together() it is published later
    return size


def write_clause_map(groups: list[list[int]], path: Path, num_inputs: int, force: bool = False) -> int:
    """JSON `{"groups": [[inputs of clause 0], ...], "num_inputs": d}`, as `fpe expand --clause-map` reads."""
    text = json.dumps({"groups": [list(map(int, g)) for g in groups], "num_inputs": int(num_inputs)}) + "\n"
    with atomic_output(Path(path), force=force) as tmp:
        tmp.write_text(text)
    return len(text.encode())


# ---------------------------------------------------------------- built-ins and specs


def parse_spec(text: str, defaults: dict, what: str) -> dict:
    """`key=value,key=value` -> dict typed like `defaults`; unknown keys and bad values are errors."""
    out = dict(defaults)
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in defaults:
            raise FPEError(f"{what}: unknown or malformed setting {part!r}",
                           f"settings: {', '.join(f'{k}={v}' for k, v in defaults.items())}")
        kind = type(defaults[key])
        try:
            out[key] = kind(value.strip())
        except ValueError:
            raise FPEError(f"{what}: {key} must be {kind.__name__}, got {value.strip()!r}") from None
    return out


def spec_string(prefix: str, settings: dict) -> str:
    return prefix + ":" + ",".join(f"{k}={v}" for k, v in settings.items())


DIGITS_DEFAULTS = {"test": 0.25, "seed": 0}


def load_digits_dataset(spec: str = "") -> Dataset:
    """scikit-learn's 8x8 digits (1797 x 64, 10 classes), pixels / 16, stratified seeded split."""
    cfg = parse_spec(spec, DIGITS_DEFAULTS, "digits")
    if not 0 < cfg["test"] < 1:
        raise FPEError(f"digits: test must be a fraction in (0, 1), got {cfg['test']}")
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise FPEError("the digits data set needs scikit-learn", "pip install 'fpe[data]'") from None
    bunch = load_digits()
    x, y = bunch.data.astype(np.float32) / 16.0, bunch.target.astype(np.int64)
    test_idx = _stratified_test_indices(y, cfg["test"], cfg["seed"])
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    arrays = {"x_train": x[~is_test], "y_train": y[~is_test], "x_test": x[is_test], "y_test": y[is_test]}
    return from_arrays(spec_string("digits", cfg), arrays, 10, {"source": "sklearn.datasets.load_digits", **cfg})


def _stratified_test_indices(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Per class, a seeded permutation (torch.Generator, stable across versions); the first share is test."""
    gen = torch.Generator().manual_seed(seed)
    picked = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        perm = torch.randperm(len(idx), generator=gen).numpy()
        picked.append(idx[perm[: int(round(fraction * len(idx)))]])
    return np.sort(np.concatenate(picked))


def load_dataset(spec: str | Path) -> Dataset:
    """A data set from an `.npz` path or a built-in spec (`digits[:...]`, `dnf:...`)."""
    text = str(spec).strip()
    if not text:
        raise FPEError("the data set name is empty", "give an .npz file (x_train, y_train, x_test, y_test) "
                       "or a built-in: digits, dnf:vars=32,clauses=8,k=3")
    name, _, rest = text.partition(":")
    if name == "digits":
        return load_digits_dataset(rest)
    if name == "dnf":
        from .dnf import make_dnf  # the generator imports this module's contract

        return make_dnf(rest)
    if text.endswith(".npz") or Path(text).exists():
        return load_npz(Path(text))
    raise FPEError(f"unknown data set {text!r}",
                   "give an .npz file (x_train, y_train, x_test, y_test) or a built-in: digits, dnf:vars=32,clauses=8,k=3")
