"""A data set in memory and the checks that user arrays must pass to become one (pure: arrays in, Dataset out).

`validate_arrays` collects every problem of the four arrays (`x_train`, `y_train`, `x_test`, `y_test`) and
raises one FPEError naming each key, what was expected and how to fix it; `from_arrays` wraps valid arrays
as torch tensors. Files and built-in sets are fpe_cli.data's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import FPEError

KEYS = ("x_train", "y_train", "x_test", "y_test")
MAX_CLASSES = 1_000_000  # a larger class id is a mislabelled file (and would ask for a huge output layer)
EXPECTED = ("expected x_train (N, d) float, y_train (N,) integer labels or (N, C) 0/1 matrix, "
            "x_test (M, d) float, y_test (M,) or (M, C)")


@dataclass
class Dataset:
    """Train and test split of one classification task, as torch tensors."""

    name: str
    x_train: torch.Tensor  # (N, d) float32
    y_train: torch.Tensor  # (N,) int64 class ids, or (N, C) float32 0/1 when multilabel
    x_test: torch.Tensor  # (M, d) float32
    y_test: torch.Tensor  # (M,) or (M, C)
    multilabel: bool = False
    num_classes: int = 0  # classes (single-label) or labels (multi-label)
    info: dict = field(default_factory=dict)  # generator settings, clause definitions, ...

    @property
    def num_inputs(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_outputs(self) -> int:
        """Logits a model needs: one per class, or one per label."""
        return self.num_classes

    def sha256(self) -> str:
        """Hash of the content (arrays, dtypes, shapes and the label kind), not of the name."""
        digest = hashlib.sha256(f"fpe-data-v1 multilabel={self.multilabel} classes={self.num_classes}".encode())
        for key in KEYS:
            t = getattr(self, key).contiguous()
            digest.update(f"{key} {t.dtype} {tuple(t.shape)}".encode())
            digest.update(t.numpy().tobytes())
        return digest.hexdigest()

    def summary(self) -> dict:
        return {"name": self.name, "sha256": self.sha256(), "train": len(self.x_train), "test": len(self.x_test),
                "inputs": self.num_inputs, "outputs": self.num_outputs, "multilabel": self.multilabel}


# ---------------------------------------------------------------- validation


def _labels_problems(key: str, y: np.ndarray, n: int) -> list[str]:
    if y.ndim not in (1, 2):
        return [f"{key}: expected (N,) integer labels or an (N, C) 0/1 matrix, found shape {y.shape}"]
    problems = []
    if y.shape[:1] != (n,):
        x_key = key.replace("y_", "x_")
        problems.append(f"{key}: expected {n} labels to match {x_key} ({n} rows), found shape {y.shape}")
    if y.ndim == 1 and y.dtype.kind in "USO":  # class names: number them (the same classes in both splits)
        problems.append(f"{key}: expected integer class labels (N,), found {y.dtype} (class names? number them "
                        "over both splits: ids = np.unique(np.concatenate([y_train, y_test]), return_inverse=True)[1])")
    elif y.ndim == 1 and not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):  # bool: classes 0/1
        problems.append(f"{key}: expected integer class labels (N,), found {y.dtype} "
                        "(use y.astype(np.int64); multi-label targets are a 0/1 matrix (N, C))")
    elif y.ndim == 2 and not (np.issubdtype(y.dtype, np.number) or y.dtype == np.bool_):
        problems.append(f"{key}: expected a 0/1 float matrix (N, C), found dtype {y.dtype}")
    elif np.issubdtype(y.dtype, np.floating) and not np.isfinite(y).all():
        problems.append(f"{key}: NaN or Inf labels")
    elif y.ndim == 1 and y.size and y.min() < 0:
        problems.append(f"{key}: label {int(y.min())} out of range (labels are class ids 0..C-1)")
    elif y.ndim == 1 and y.size and int(y.max()) >= MAX_CLASSES:
        problems.append(f"{key}: label {int(y.max())} would mean {int(y.max()) + 1} classes (labels are class ids "
                        "0..C-1; renumber them with np.unique(y, return_inverse=True)[1])")
    elif y.ndim == 2 and not np.isin(y, (0, 1)).all():
        hint = " (class ids must be shaped (N,): use y.ravel())" if y.ndim == 2 and y.shape[1] == 1 else ""
        problems.append(f"{key}: multi-label targets must be 0 or 1, found other values{hint}")
    return problems


def _input_problems(key: str, x: np.ndarray) -> list[str]:
    if x.ndim != 2:
        return [f"{key}: expected a 2-D array (N, d), found shape {x.shape} (flatten with x.reshape(len(x), -1))"]
    if not np.issubdtype(x.dtype, np.floating):
        scale = " / 255 for 8-bit pixels" if x.dtype == np.uint8 else ""
        return [f"{key}: expected float inputs (N, d), found {x.dtype} (use x.astype(np.float32){scale})"]
    if len(x) == 0:
        return [f"{key}: no samples (shape {x.shape}; every split needs at least one)"]
    if x.shape[1] == 0:
        return [f"{key}: no features (shape {x.shape}; expected (N, d) with d >= 1)"]
    if not np.isfinite(x).all():
        return [f"{key}: NaN or Inf inputs (expected finite floats)"]
    biggest = float(np.abs(x).max())
    if biggest > float(np.finfo(np.float32).max):  # float64 inputs are used as float32: they would become Inf
        return [f"{key}: values up to {biggest:.3g} exceed the float32 range fpe computes in (scale the inputs)"]
    return []


def validate_arrays(arrays: dict[str, np.ndarray], where: str, num_classes: int | None = None) -> None:
    """Collect every problem of the four arrays and raise one FPEError listing them."""
    if any(k not in arrays for k in KEYS):
        _missing_keys(where, arrays)
    problems = _input_problems("x_train", arrays["x_train"]) + _input_problems("x_test", arrays["x_test"])
    for split in ("train", "test"):
        problems += _labels_problems(f"y_{split}", arrays[f"y_{split}"], len(arrays[f"x_{split}"]))
    x_tr, y_tr, x_te, y_te = (arrays[k] for k in KEYS)
    if not problems and x_tr.shape[1] != x_te.shape[1]:
        problems.append(f"x_test: expected {x_tr.shape[1]} features like x_train, found shape {x_te.shape}")
    if not problems and y_tr.ndim != y_te.ndim:
        problems.append(f"y_test: shape {y_te.shape} is not the same kind of label as y_train {y_tr.shape}")
    if not problems and y_tr.ndim == 2 and y_tr.shape[1] != y_te.shape[1]:
        problems.append(f"y_test: expected {y_tr.shape[1]} labels per row like y_train, found shape {y_te.shape}")
    binary = y_tr.ndim == 2 and y_tr.shape[1] == 1 and num_classes == 2  # one 0/1 column: two classes
    if not problems and num_classes is not None and y_tr.ndim == 2 and num_classes != y_tr.shape[1] and not binary:
        problems.append(f"num_classes={num_classes} contradicts y_train {y_tr.shape}, a matrix of "
                        f"{y_tr.shape[1]} 0/1 labels per row (leave num_classes out, or set it to {y_tr.shape[1]})")
    if not problems and num_classes is not None and y_tr.ndim == 1:
        for key, y in (("y_train", y_tr), ("y_test", y_te)):
            if y.size and y.max() >= num_classes:
                problems.append(f"{key}: label {int(y.max())} out of range for num_classes={num_classes}")
    if problems:
        raise FPEError(f"{where}: " + "; ".join(problems))


SAVE = "np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)"
VALIDATION_SUFFIXES = ("_val", "_valid", "_validation", "_dev")
X_NAMES = ("x", "X", "data", "features", "inputs", "input", "images", "x_all")
Y_NAMES = ("y", "Y", "labels", "label", "target", "targets", "classes", "y_all")


def _missing_keys(where: str, arrays: dict[str, np.ndarray]) -> None:
    """Raise the error for an archive without the four arrays, naming what it holds and what to rename."""
    missing = [k for k in KEYS if k not in arrays]
    found = ", ".join(f"{k} {tuple(v.shape)}" for k, v in arrays.items())
    raise FPEError(f"{where}: missing array(s) {', '.join(missing)}; found {found or 'no arrays'}",
                   _missing_hint(arrays, missing))


def _missing_hint(arrays: dict[str, np.ndarray], missing: list[str]) -> str:
    """What to rename: the same key in other case (`X_train`), or one unsplit x/y pair that needs a split."""
    lower = {k.lower(): k for k in arrays}
    renames = [f"{lower[k]} -> {k}" for k in missing if k in lower]
    if renames:
        return f"the names are lower-case: rename {', '.join(renames)}; {EXPECTED}"
    if any(k.startswith("arr_") for k in arrays) and all(k.startswith("arr_") or k == "num_classes" for k in arrays):
        return f"np.savez stored unnamed arrays as arr_0, arr_1, ...: pass them by name, {SAVE}"
    renames = [f"{k} -> {target}" for target in missing if target.endswith("_test")
               for k in (target.replace("_test", suffix) for suffix in VALIDATION_SUFFIXES) if k in arrays]
    if renames:
        return f"fpe evaluates on the test split: rename {', '.join(renames)}; {EXPECTED}"
    x = next((k for k in X_NAMES if k in arrays), None)
    y = next((k for k in Y_NAMES if k in arrays), None)
    if x and y:
        return (f"fpe needs a train and a test split: n = int(0.8 * len({x})); np.savez(path, x_train={x}[:n], "
                f"y_train={y}[:n], x_test={x}[n:], y_test={y}[n:]) (shuffle first if the rows are sorted)")
    return EXPECTED


def from_arrays(name: str, arrays: dict[str, np.ndarray], num_classes: int | None = None,
                info: dict | None = None) -> Dataset:
    """Validate numpy arrays and wrap them as a Dataset (inputs float32, labels int64 or float32)."""
    validate_arrays(arrays, name, num_classes)
    multilabel = arrays["y_train"].ndim == 2
    if multilabel:
        ys = [torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.float32)) for k in ("y_train", "y_test")]
        classes = int(arrays["y_train"].shape[1])
    else:
        ys = [torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.int64)) for k in ("y_train", "y_test")]
        classes = num_classes or int(max(ys[0].max(), ys[1].max() if ys[1].numel() else 0)) + 1
    xs = [torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.float32)) for k in ("x_train", "x_test")]
    return Dataset(name, xs[0], ys[0], xs[1], ys[1], multilabel, classes, dict(info or {}))
