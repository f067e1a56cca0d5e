"""Every number fpe prints is computed: an independent numpy oracle recomputes them from the files.

The oracle reads the safetensors files byte by byte (header JSON + raw buffers), decodes the packed
layout with numpy + zlib exactly as README "File formats" describes, runs the networks with a numpy
forward pass in float64, and recomputes every count, byte size, budget, drift, loss, accuracy and
analysis metric that `fpe params/expand/inspect/verify/evaluate/analyze --json` report. Nothing from
fpe_cli is used to compute an expected value. The human tables of `params` and `evaluate` must show
the same numbers as their JSON documents.

Models: plain torch.nn.Sequential checkpoints (1-3 hidden layers, with/without biases, float32,
float16, bfloat16, one with exact zeros), expanded with copy/split/tie, packed and dense layouts,
--expand-top, --group-size, and a recipe with per-target alpha.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as np_save_file

from conftest import make_sequential, run_cli, save_module

# ---------------------------------------------------------------- reading files with numpy alone

ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64,
             "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class STFile:
    """A safetensors file parsed by hand: header entries, raw numpy arrays, byte sizes, sha256."""

    def __init__(self, path: Path):
        data = Path(path).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        self.path = Path(path)
        self.meta: dict[str, str] = header.pop("__metadata__", None) or {}
        self.entries = header
        self.size = len(data)
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.arrays, self.dtypes, self.nbytes = {}, {}, {}
        for name, e in header.items():
            b, end = e["data_offsets"]
            self.arrays[name] = np.frombuffer(data[8 + n + b:8 + n + end], dtype=ST_DTYPES[e["dtype"]]).reshape(e["shape"])
            self.dtypes[name] = e["dtype"]
            self.nbytes[name] = end - b

    def float64(self, name: str) -> np.ndarray:
        a = self.arrays[name]
        if self.dtypes[name] == "BF16":  # numpy has no bfloat16: the upper half of a float32
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float64)


def decode_zmask(stream: bytes, rows: int, cols: int) -> np.ndarray:
    """README: strips of 4 rows, each read column by column, 4 bits per column, little-endian, zlib."""
    strips = -(-rows // 4)
    bits = np.unpackbits(np.frombuffer(zlib.decompress(stream), np.uint8), bitorder="little")
    return bits[:strips * 4 * cols].reshape(strips, cols, 4).transpose(0, 2, 1).reshape(-1, cols)[:rows].astype(bool)


@dataclass
class OLayer:
    key: str
    bias_key: str | None
    dtype: str  # safetensors dtype of the weight values
    W: np.ndarray  # float64 (out, in), widened (tied copies repeated), zeros off the mask in fpe files
    mask: np.ndarray | None  # bool, widened; None for a plain file
    P: np.ndarray  # the parameter matrix: W, or [out, parents] for tied columns
    pmask: np.ndarray | None
    bias: np.ndarray | None
    children: np.ndarray | None  # fpe.children: children per parent (lineage)
    tied: np.ndarray | None  # fpe.tied: copies per parent column
    nbytes: int  # bytes of every tensor of this layer

    @property
    def support(self) -> np.ndarray:
        return self.mask if self.mask is not None else self.W != 0

    @property
    def psupport(self) -> np.ndarray:
        return self.pmask if self.pmask is not None else self.P != 0

    @property
    def eff(self) -> np.ndarray:
        return self.W if self.mask is None else np.where(self.mask, self.W, 0.0)

    @property
    def parents(self) -> np.ndarray | None:
        return None if self.children is None else np.repeat(np.arange(len(self.children)), self.children)


@dataclass
class OModel:
    f: STFile
    layers: list[OLayer]
    layout: str

    @property
    def widths(self) -> list[int]:
        return [self.layers[0].W.shape[1]] + [L.W.shape[0] for L in self.layers]


def first_cols(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int)


def load_oracle(path: Path, keys: list[str]) -> OModel:
    f = STFile(path)
    layers, layout = [], "plain"
    for k in keys:
        bk = k[: -len("weight")] + "bias"
        bias_key = bk if bk in f.arrays else None
        children = f.arrays.get(f"fpe.children:{k}")
        tied = f.arrays.get(f"fpe.tied:{k}")
        children = None if children is None else children.astype(int)
        tied = None if tied is None else tied.astype(int)
        if f"fpe.values:{k}" in f.arrays:
            layout = "packed"
            rows, cols = (int(v) for v in f.arrays[f"fpe.shape:{k}"])
            pmask = decode_zmask(f.arrays[f"fpe.zmask:{k}"].tobytes(), rows, cols)
            P = np.zeros((rows, cols))
            P[pmask] = f.float64(f"fpe.values:{k}")
            dtype = f.dtypes[f"fpe.values:{k}"]
            if tied is not None:
                W, mask = np.repeat(P, tied, axis=1), np.repeat(pmask, tied, axis=1)
            else:
                W, mask = P, pmask
        else:
            W, dtype = f.float64(k), f.dtypes[k]
            mask = f.arrays[f"fpe.mask:{k}"].astype(bool) if f"fpe.mask:{k}" in f.arrays else None
            layout = "dense" if mask is not None else layout
            if tied is not None:
                P, pmask = W[:, first_cols(tied)], mask[:, first_cols(tied)]
            else:
                P, pmask = W, mask
        names = [k, bias_key] + [f"fpe.{t}:{k}" for t in ("mask", "children", "tied", "values", "zmask", "bitmask", "shape")]
        nbytes = sum(f.nbytes.get(n, 0) for n in names if n)
        bias = f.float64(bias_key) if bias_key else None
        layers.append(OLayer(k, bias_key, dtype, W, mask, P, pmask, bias, children, tied, nbytes))
    return OModel(f, layers, layout)


def keys_of(depth: int) -> list[str]:
    """nn.Sequential(Linear, ReLU, ...) weight names for `depth` hidden layers."""
    return [f"{2 * i}.weight" for i in range(depth + 1)]


# ---------------------------------------------------------------- numpy oracle computations


_erf = np.vectorize(math.erf)
NP_ACTIVATIONS = {
    "relu": lambda h: np.maximum(h, 0.0),
    "tanh": np.tanh,
    "sigmoid": lambda h: 1.0 / (1.0 + np.exp(-h)),
    "gelu": lambda h: 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0))),
    "silu": lambda h: h / (1.0 + np.exp(-h)),
    "leaky_relu": lambda h: np.where(h > 0, h, 0.01 * h),
    "identity": lambda h: h,
}


def np_hidden(model: OModel, x: np.ndarray, act: str = "relu") -> list[np.ndarray]:
    """Post-activation outputs of every hidden layer, float64."""
    h, out = x.astype(np.float64), []
    for L in model.layers[:-1]:
        h = NP_ACTIVATIONS[act](h @ L.eff.T + (L.bias if L.bias is not None else 0.0))
        out.append(h)
    return out


def np_forward(model: OModel, x: np.ndarray, act: str = "relu") -> np.ndarray:
    h = x.astype(np.float64)
    for i, L in enumerate(model.layers):
        h = h @ L.eff.T + (L.bias if L.bias is not None else 0.0)
        if i < len(model.layers) - 1:
            h = NP_ACTIVATIONS[act](h)
    return h


def nanmean(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(a.mean()) if a.size else math.nan


def oracle_drift(src: OModel, out: OModel, x: np.ndarray, act: str = "relu") -> dict:
    y0, y1 = np_forward(src, x, act), np_forward(out, x, act)
    d = y1 - y0
    return {"probe_samples": len(x),
            "relative_l2": float(np.linalg.norm(d) / max(np.linalg.norm(y0), 1e-12)),
            "max_abs_diff": float(np.abs(d).max()),
            "cosine": float((y0 * y1).sum() / (np.linalg.norm(y0) * np.linalg.norm(y1))),
            "argmax_agreement": float((y0.argmax(1) == y1.argmax(1)).mean()),
            "_margin": float(min(_margin(y0), _margin(y1)))}


def _margin(y: np.ndarray) -> float:
    """Smallest gap between the top two logits of a sample, exact ties (argmax: first index) aside."""
    if y.shape[1] < 2:
        return np.inf
    s = np.sort(y, axis=1)
    gap = s[:, -1] - s[:, -2]
    gap = gap[gap > 0]
    return gap.min() if gap.size else np.inf


def oracle_counts(model: OModel) -> dict:
    """params' per-layer and total counts, from the decoded file."""
    n = len(model.layers)
    layers = []
    for i, L in enumerate(model.layers):
        stored = L.P.size
        weights = int(L.psupport.sum())
        layers.append({
            "weight": L.key, "shape": list(L.W.shape), "dtype": DTYPE_NAMES[L.dtype], "stored_elements": stored,
            "weights": weights, "nonzero_weights": int((L.P != 0).sum()),
            "biases": 0 if L.bias is None else L.bias.size, "neurons_out": L.W.shape[0], "hidden": i < n - 1,
            "sparsity": 1.0 - weights / stored, "expanded": L.children is not None, "tied": L.tied is not None,
            "bytes_on_disk": L.nbytes,
        })
    total = {k: sum(r[k] for r in layers) for k in ("weights", "nonzero_weights", "biases", "stored_elements", "bytes_on_disk")}
    total["hidden_neurons"] = sum(r["neurons_out"] for r in layers if r["hidden"])
    return {"layers": layers, "total": total, "file_bytes": model.f.size, "layout": model.layout}


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    return float((lse - logits[np.arange(len(y)), y]).mean())


def exp_entropy_rows(p_unnorm: np.ndarray) -> np.ndarray:
    tot = p_unnorm.sum(axis=1, keepdims=True)
    out = np.full(p_unnorm.shape[0], np.nan)
    ok = tot[:, 0] > 0
    p = p_unnorm[ok] / tot[ok]
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1)
    out[ok] = np.exp(ent)
    return out


def oracle_layer_metrics(L: OLayer, acts: np.ndarray | None, y: np.ndarray | None, num_classes: int | None) -> dict:
    W = L.eff
    G = W.T @ W
    diag = np.diag(G)
    keep = diag > 0
    cap = (diag[keep] ** 2) / (G[keep] ** 2).sum(axis=1)
    norms = np.linalg.norm(W, axis=1)
    nz = norms > 0
    U = W[nz] / norms[nz, None]
    C = np.abs(U @ U.T)
    iu = np.triu_indices(U.shape[0], 1)
    all_pairs = C[iu]
    par = L.parents[nz] if L.parents is not None else np.arange(U.shape[0])
    non_sib = all_pairs[par[iu[0]] != par[iu[1]]]
    poly = exp_entropy_rows(W ** 2)
    out = {"capacity_mean": cap.mean(), "capacity_median": float(np.median(cap)), "capacity_sum": cap.sum(),
           "capacity_fraction_below_half": float((cap < 0.5).mean()), "features_counted": int(keep.sum()),
           "features_zero": int((~keep).sum()), "neurons": W.shape[0],
           "cosine_mean_abs": all_pairs.mean(), "cosine_mean_abs_non_sibling": non_sib.mean() if non_sib.size else math.nan,
           "pairs": int(all_pairs.size), "zero_rows": int((~nz).sum()),
           "polysemanticity_mean": nanmean(poly), "polysemanticity_median": float(np.nanmedian(poly)),
           "_poly": poly, "_norms": norms}
    if acts is not None:
        means = np.stack([acts[y == c].mean(axis=0) for c in range(num_classes) if (y == c).any()])  # (C_seen, h)
        sel = exp_entropy_rows(np.abs(means).T)
        out.update(class_selectivity_mean=nanmean(sel), dead_fraction=float(((acts > 0).sum(axis=0) == 0).mean()),
                   activation_density=float((acts > 0).mean()), samples=len(acts), _sel=sel, _density=(acts > 0).mean(axis=0))
    return out


# ---------------------------------------------------------------- scenario helpers


def close(a, b, rel=1e-4, abs_=1e-6) -> bool:
    """a (fpe's, NaN printed as null) within tolerance of b (the oracle's)."""
    if b is not None and math.isnan(float(b)):
        return a is None or (isinstance(a, float) and math.isnan(a))
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(float(a), float(b), rel_tol=rel, abs_tol=abs_)


def assert_close_dict(have: dict, want: dict, where: str, rel=1e-4, abs_=1e-6) -> None:
    bad = []
    for k, v in want.items():
        if k.startswith("_"):
            continue
        if k not in have:
            bad.append(f"{k}: missing (want {v})")
        elif isinstance(v, (float, np.floating)) or (isinstance(v, int) and isinstance(have[k], float)):
            if not close(have[k], float(v), rel, abs_):
                bad.append(f"{k}: fpe {have[k]!r} vs oracle {float(v)!r}")
        elif have[k] != v:
            bad.append(f"{k}: fpe {have[k]!r} vs oracle {v!r}")
    assert not bad, f"{where}:\n  " + "\n  ".join(bad)


def make_model(path: Path, widths: list[int], *, bias=True, dtype=torch.float32, seed=0, zeros=False) -> Path:
    net = make_sequential(widths, bias=bias, seed=seed, dtype=dtype)
    if zeros:  # exact zeros in every weight (never a whole row), and one input feature unused entirely
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for m in net:
                if isinstance(m, torch.nn.Linear):
                    drop = torch.rand(m.weight.shape, generator=g) < 0.25
                    drop[:, 0] = False  # keep every row alive (>= alpha edges)
                    drop[:, 1] = False
                    drop[:, 2] = False
                    m.weight[drop] = 0
            first = next(m for m in net if isinstance(m, torch.nn.Linear))
            first.weight[:, -1] = 0
    return save_module(net, path)


def make_data(path: Path, d_in: int, classes: int, seed: int = 0, n_train=48, n_test=37) -> dict:
    rng = np.random.default_rng(seed)
    data = {"x_train": rng.normal(size=(n_train, d_in)).astype(np.float32), "y_train": rng.integers(0, classes, n_train),
            "x_test": rng.normal(size=(n_test, d_in)).astype(np.float32), "y_test": rng.integers(0, classes, n_test)}
    data["y_train"][:classes] = np.arange(classes)  # every class present
    np.savez(path, **data)
    return data


def cli_json(*args):
    res = run_cli([*args, "--json"])
    assert res.exit_code == 0 and res.exception is None, (args, res.exit_code, res.stdout, res.stderr, res.exception)
    return res.json()


# scenario: (id, widths, bias, dtype, zeros, expand args, alpha per hidden layer (None: not expanded), outgoing)
SCENARIOS = [
    ("d1-f32-copy-packed", [12, 8, 3], True, torch.float32, False, ["--alpha", "2"], [2], "copy", "packed"),
    ("d2-f16-nobias-split-dense", [10, 7, 6, 4], False, torch.float16, False,
     ["--alpha", "3", "--outgoing", "split", "--layout", "dense", "--probe-samples", "20"], [3, 3], "split", "dense"),
    ("d3-bf16-tie-packed", [9, 6, 6, 5, 3], True, torch.bfloat16, False,
     ["--alpha", "2", "--outgoing", "tie", "--seed", "3"], [2, 2, 2], "tie", "packed"),
    ("d2-f32-zeros-copy-packed", [10, 8, 6, 4], True, torch.float32, True, ["--alpha", "2", "--seed", "1"], [2, 2], "copy", "packed"),
    ("d1-f32-top-copy-dense", [12, 8, 3], True, torch.float32, False,
     ["--alpha", "3", "--expand-top", "3", "--layout", "dense"], [3], "copy", "dense"),
    ("d2-f32-top-frac-split-packed", [10, 8, 6, 4], True, torch.float32, False,
     ["--alpha", "2", "--expand-top", "0.5", "--outgoing", "split"], [2, 2], "split", "packed"),
    ("d1-bf16-group-tie-dense", [12, 8, 3], False, torch.bfloat16, False,
     ["--alpha", "2", "--group-size", "4", "--outgoing", "tie", "--layout", "dense"], [2], "tie", "dense"),
    ("d2-f16-group-copy-packed", [10, 8, 6, 4], True, torch.float16, False,
     ["--alpha", "2", "--group-size", "3"], [2, 2], "copy", "packed"),
    ("d3-f32-recipe-copy-packed", [9, 6, 8, 5, 3], True, torch.float32, False, ["--recipe", "recipe.yaml"], [3, 2, None], "copy", "packed"),
    ("d3-f16-recipe-tie-dense", [9, 6, 8, 5, 3], True, torch.float16, False,
     ["--recipe", "recipe.yaml", "--outgoing", "tie", "--layout", "dense"], [3, 2, None], "tie", "dense"),
]
RECIPE = """alpha: 2
split: random
seed: 4
targets:
  - match: 0.weight
    alpha: 3
  - match: 2.weight
    split: structured
ignore: ["4.weight"]
"""


@dataclass
class Expanded:
    src_path: Path
    out_path: Path
    keys: list[str]
    src: OModel
    out: OModel
    report: dict
    data: dict
    alphas: list
    outgoing: str
    args: list


def run_scenario(tmp_path: Path, scenario) -> Expanded:
    name, widths, bias, dtype, zeros, args, alphas, outgoing, layout = scenario
    depth = len(widths) - 2
    keys = keys_of(depth)
    src_path = make_model(tmp_path / "src.safetensors", widths, bias=bias, dtype=dtype, seed=depth, zeros=zeros)
    data = make_data(tmp_path / "probe.npz", widths[0], widths[-1])
    if "--recipe" in args:
        (tmp_path / "recipe.yaml").write_text(RECIPE)
    out_path = tmp_path / "out.safetensors"
    report = cli_json("expand", src_path, *args, "--data", tmp_path / "probe.npz", "-o", out_path)
    return Expanded(src_path, out_path, keys, load_oracle(src_path, keys), load_oracle(out_path, keys), report, data,
                    alphas, outgoing, args)


def pre_prune_counts(e: Expanded) -> list[int]:
    """Weights of each matrix after splitting and copying, before the budget pruning."""
    out, prev_children = [], None
    for L_src, L_out in zip(e.src.layers, e.out.layers):
        S = L_src.support.astype(int)
        if prev_children is None or L_out.tied is not None:
            out.append(int(S.sum()))  # a split only partitions edges; tied copies count once
        else:
            out.append(int((S * prev_children[None, :]).sum()))
        prev_children = L_out.children if L_out.children is not None else None
    return out


def source_value_of(e: Expanded, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, support) every entry of the expanded layer k would hold before pruning: its parent's."""
    L_src, L_out = e.src.layers[k], e.out.layers[k]
    rows = L_out.parents if L_out.parents is not None else np.arange(L_out.W.shape[0])
    prev = e.out.layers[k - 1] if k else None
    cols = prev.parents if prev is not None and prev.parents is not None else np.arange(L_out.W.shape[1])
    want = L_src.W[rows][:, cols]
    if e.outgoing == "split" and prev is not None and prev.children is not None:
        want = want / prev.children[cols][None, :]
    return want, L_src.support[rows][:, cols]


# ---------------------------------------------------------------- params on plain checkpoints


@pytest.mark.parametrize("widths,bias,dtype,zeros", [
    ([12, 8, 3], True, torch.float32, False),
    ([12, 8, 3], False, torch.float16, True),
    ([10, 7, 5, 4], True, torch.bfloat16, True),
    ([9, 6, 6, 5, 3], False, torch.float32, False),
], ids=["d1-f32", "d1-f16-nobias-zeros", "d2-bf16-zeros", "d3-f32-nobias"])
def test_params_plain_matches_oracle(tmp_path, widths, bias, dtype, zeros):
    path = make_model(tmp_path / "m.safetensors", widths, bias=bias, dtype=dtype, zeros=zeros)
    doc = cli_json("params", path)
    model = load_oracle(path, keys_of(len(widths) - 2))
    want = oracle_counts(model)
    assert len(doc["layers"]) == len(want["layers"])
    for have_l, want_l in zip(doc["layers"], want["layers"]):
        assert_close_dict(have_l, want_l, f"params layer {want_l['weight']}")
    assert_close_dict(doc["total"], want["total"], "params total")
    assert doc["file_bytes"] == want["file_bytes"] and doc["layout"] == "plain"
    assert "source" not in doc and "budget_holds" not in doc  # a plain file has no budget to claim
    _check_params_table(path, doc)


def _table_rows(text: str) -> list[list[str]]:
    """Body rows of a rich table: the cells between the vertical bars."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in text.splitlines()
            if line.strip().startswith("│")]


def _num(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def _check_params_table(path: Path, doc: dict) -> None:
    res = run_cli(["params", path])
    assert res.exit_code == 0, res.stderr
    rows = _table_rows(res.stdout)
    assert len(rows) == len(doc["layers"]) + 1, res.stdout
    for row, r in zip(rows, doc["layers"]):
        layer, shape, dtype, stored, weights, nnz, biases, sparsity, nbytes = row
        assert layer == r["weight"] and shape == "x".join(map(str, r["shape"])) and dtype == r["dtype"]
        assert [_num(stored), _num(weights), _num(nnz), _num(biases), _num(nbytes)] == \
            [r["stored_elements"], r["weights"], r["nonzero_weights"], r["biases"], r["bytes_on_disk"]], (row, r)
        assert abs(_num(sparsity) - 100 * r["sparsity"]) <= 0.05 + 1e-9, (row, r)
    total = rows[-1]
    t = doc["total"]
    assert total[0] == "total"
    assert [_num(total[3]), _num(total[4]), _num(total[5]), _num(total[6]), _num(total[8])] == \
        [t["stored_elements"], t["weights"], t["nonzero_weights"], t["biases"], t["bytes_on_disk"]], (total, t)
    m = re.search(r"hidden neurons:\s*([\d,]+); file:\s*([\d,]+) bytes", res.stdout)
    assert m and _num(m.group(1)) == t["hidden_neurons"] and _num(m.group(2)) == doc["file_bytes"], res.stdout
    if "source" in doc:
        m = re.search(r"source:\s*([\d,]+) weights,\s*([\d,]+) biases; budget (\w+)", res.stdout)
        assert m, res.stdout
        assert _num(m.group(1)) == doc["source"]["weights"] and _num(m.group(2)) == doc["source"]["biases"]
        assert (m.group(3) == "holds") == doc["budget_holds"]


# ---------------------------------------------------------------- expand, params, inspect, verify of expansions


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_expand_report_matches_oracle(tmp_path, scenario):
    e = run_scenario(tmp_path, scenario)
    check_expand_report(e, scenario[8])


def check_expand_report(e: Expanded, layout: str) -> None:
    r = e.report
    src, out = e.src, e.out
    budget = sum(int(L.support.sum()) for L in src.layers)
    after = [int(L.psupport.sum()) for L in out.layers]
    pre = pre_prune_counts(e)
    assert r["hidden_widths_before"] == src.widths[1:-1]
    assert r["hidden_widths_after"] == out.widths[1:-1]
    assert r["budget"] == budget, (r["budget"], budget)
    assert r["weights_after"] == sum(after), (r["weights_after"], after)
    assert r["budget_holds"] == (sum(after) == budget) and r["budget_holds"]
    assert r["output_bytes"] == out.f.size and r["input_bytes"] == src.f.size
    assert r["layout"] == layout == out.layout
    assert len(r["layers"]) == len(src.layers)
    for k, (row, Ls, Lo) in enumerate(zip(r["layers"], src.layers, out.layers)):
        assert row["weight"] == Ls.key
        assert row["shape_before"] == list(Ls.W.shape) and row["shape_after"] == list(Lo.W.shape), row
        assert row["weights_before"] == int(Ls.support.sum()), (row, int(Ls.support.sum()))
        assert row["weights_after"] == after[k], (row, after[k])
        assert row["pruned"] == pre[k] - after[k], (row, pre[k], after[k])
        assert row["weights_widened"] == pre[k], (row, pre[k])
        assert row["rows_without_edges"] == int((~Lo.support.any(axis=1)).sum()), row
        alpha = e.alphas[k] if k < len(e.alphas) else None
        assert row["alpha"] == alpha, (row, alpha)
        if alpha is not None:  # the lineage in the file agrees with the alpha reported
            assert Lo.children is not None and Lo.children.max() == alpha, (row, Lo.children)
        else:
            assert row["split"] is None and Lo.children is None
    assert sum(pre) - sum(after) == sum(row["pruned"] for row in r["layers"])
    if e.outgoing == "tie":
        assert all(row["pruned"] == 0 for row in r["layers"])

    # the drift, on the probe inputs known from the npz (first N of the test split)
    x = e.data["x_test"]
    n = int(e.args[e.args.index("--probe-samples") + 1]) if "--probe-samples" in e.args else 256
    x = x[:n]
    want = oracle_drift(src, out, x)
    d = r["drift"]
    assert d["probe_samples"] == len(x) and f"first {len(x)} of {len(e.data['x_test'])}" in d["probe"], d
    assert_close_dict(d, {k: v for k, v in want.items() if k != "argmax_agreement"}, "drift", rel=1e-5, abs_=1e-6)
    if want["_margin"] > 1e-3:  # no near-tie that float32 rounding could flip
        assert d["argmax_agreement"] == pytest.approx(want["argmax_agreement"], abs=1e-6), (d, want)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s[0] for s in SCENARIOS])
def test_expanded_params_inspect_verify_match_oracle(tmp_path, scenario):
    e = run_scenario(tmp_path, scenario)
    # params
    doc = cli_json("params", e.out_path)
    want = oracle_counts(e.out)
    for have_l, want_l in zip(doc["layers"], want["layers"]):
        assert_close_dict(have_l, want_l, f"params layer {want_l['weight']}")
    assert_close_dict(doc["total"], want["total"], "params total")
    assert doc["file_bytes"] == want["file_bytes"] and doc["layout"] == want["layout"]
    src_weights = [int(L.support.sum()) for L in e.src.layers]
    src_biases = sum(L.bias.size for L in e.src.layers if L.bias is not None)
    assert doc["source"] == {"weights": sum(src_weights), "biases": src_biases, "weights_per_layer": src_weights}, doc["source"]
    assert doc["budget_holds"] == (want["total"]["weights"] == sum(src_weights))
    _check_params_table(e.out_path, doc)

    # inspect
    ins = cli_json("inspect", e.out_path)
    _check_inspect(ins, e.out, e.out_path)
    ins_src = cli_json("inspect", e.src_path)
    _check_inspect(ins_src, e.src, e.src_path)

    # verify: every check it claims holds in the oracle
    for args in ([], ["--source", e.src_path]):
        v = cli_json("verify", e.out_path, *args)
        assert v["ok"] is True and v["expanded"] is True and v["has_masks"] is True
        claims = oracle_claims(e, with_source=bool(args))
        unknown = [c for c in v["checks"] if c not in claims]
        assert not unknown, f"verify claims checks the oracle does not know: {unknown}"
        false = [c for c in v["checks"] if not claims[c]]
        assert not false, f"verify claims {false}, the oracle finds them false"
        expected = {"finite weights", "off-mask weights are zero", "siblings own disjoint edges",
                    "weights equal the recorded budget"}
        if any(L.tied is not None for L in e.out.layers):
            expected.add("tied column copies are equal")
        if args:
            expected |= {"source sha256 matches", "children's edges are their parent's", "weights equal the source's"}
        assert set(v["checks"]) == expected, (v["checks"], expected)


def _check_inspect(ins: dict, model: OModel, path: Path) -> None:
    f = model.f
    assert ins["sha256"] == f.sha256 and ins["file_bytes"] == f.size and ins["layout"] == model.layout
    assert ins["widths"] == model.widths
    assert ins["expanded"] == any(L.children is not None for L in model.layers)
    assert ins["activation"] == "relu"
    assert [c["weight"] for c in ins["chain"]] == [L.key for L in model.layers]
    for c, L in zip(ins["chain"], model.layers):
        assert c["bias"] == L.bias_key and c["shape"] == list(L.W.shape) and c["dtype"] == DTYPE_NAMES[L.dtype], (c, L.key)
        assert c["mask"] == (L.mask is not None) and c["lineage"] == (L.children is not None) and c["tied"] == (L.tied is not None)
    want_tensors = [{"name": n, "dtype": e["dtype"], "shape": e["shape"]} for n, e in sorted(f.entries.items())]
    assert ins["tensors"] == want_tensors
    assert ins["unused_tensors"] == []
    def parsed(k, v):
        try:
            return json.loads(v) if k.startswith("fpe.") else v
        except json.JSONDecodeError:  # fpe.activation is written as a bare name
            return v
    want_meta = {k: parsed(k, v) for k, v in f.meta.items()}
    assert ins["metadata"] == want_meta


def oracle_claims(e: Expanded, with_source: bool) -> dict[str, bool]:
    out, src = e.out, e.src
    claims = {
        "finite weights": all(np.isfinite(L.W).all() and (L.bias is None or np.isfinite(L.bias).all()) for L in out.layers),
        "off-mask weights are zero": all(L.mask is None or not (L.W[~L.mask] != 0).any() for L in out.layers),
        "siblings own disjoint edges": all(
            L.parents is None or all(L.support[L.parents == p].sum(axis=0).max(initial=0) <= 1 for p in range(len(L.children)))
            for L in out.layers),
        "tied column copies are equal": all(
            L.tied is None or all(np.array_equal(L.W[:, c], L.W[:, f]) and np.array_equal(L.support[:, c], L.support[:, f])
                                  for p, f in enumerate(first_cols(L.tied)) for c in range(f, f + L.tied[p]))
            for L in out.layers),
        "weights equal the recorded budget": sum(int(L.psupport.sum()) for L in out.layers)
        == json.loads(out.f.meta["fpe.budget"])["weights"],
    }
    if with_source:
        claims["source sha256 matches"] = out.f.meta.get("fpe.source_sha256") == src.f.sha256
        sub, vals = True, True
        for k, L in enumerate(out.layers):
            want, parent_support = source_value_of(e, k)
            sub &= not (L.support & ~parent_support).any()
            # one unit in the last place of the stored dtype (a split divides)
            eps = {"F32": 2.0 ** -23, "F16": 2.0 ** -10, "BF16": 2.0 ** -7}[L.dtype]
            vals &= bool((np.abs(L.W - want) <= eps * np.maximum(np.abs(L.W), np.abs(want)))[L.support].all())
            src_b = e.src.layers[k].bias
            if L.bias is not None:
                rows = L.parents if L.parents is not None else np.arange(L.W.shape[0])
                vals &= bool(np.array_equal(L.bias, src_b[rows]))
        claims["children's edges are their parent's"] = bool(sub)
        claims["weights equal the source's"] = bool(vals)
    return claims


# ---------------------------------------------------------------- pruning is global magnitude (what "pruned" counts)


@pytest.mark.parametrize("scenario", [s for s in SCENARIOS if s[7] != "tie"], ids=[s[0] for s in SCENARIOS if s[7] != "tie"])
def test_pruned_weights_are_the_globally_smallest(tmp_path, scenario):
    e = run_scenario(tmp_path, scenario)
    kept, pruned = [], []
    for k, L in enumerate(e.out.layers):
        want, parent_support = source_value_of(e, k)
        rows = L.parents if L.parents is not None else np.arange(L.W.shape[0])
        if L.children is not None:
            # a split layer: each parent edge went to exactly one child, so a parent edge no child holds was pruned
            n_par = len(L.children)
            owned = np.zeros((n_par, L.W.shape[1]), dtype=int)
            np.add.at(owned, rows, L.support.astype(int))
            src_sup = parent_support[first_cols(L.children)]
            lost = src_sup & (owned == 0)
            pruned.append(np.abs(want[first_cols(L.children)][lost]))
        else:
            pruned.append(np.abs(want[parent_support & ~L.support]))
        kept.append(np.abs(want[L.support]))
    kept_all, pruned_all = np.concatenate(kept), np.concatenate(pruned)
    rows = e.report["layers"]
    assert pruned_all.size == sum(r["pruned"] for r in rows), (pruned_all.size, [r["pruned"] for r in rows])
    if pruned_all.size:
        assert pruned_all.max() <= kept_all.min() * (1 + 1e-6), (pruned_all.max(), kept_all.min())


# ---------------------------------------------------------------- evaluate


def test_evaluate_side_by_side_matches_oracle(tmp_path):
    widths = [10, 8, 6, 4]
    src_path = make_model(tmp_path / "a.safetensors", widths, dtype=torch.float32, seed=5, zeros=True)
    data = make_data(tmp_path / "data.npz", widths[0], widths[-1], seed=2)
    paths = [src_path]
    for name, args in (("b.safetensors", ["--alpha", "2"]),
                       ("c.safetensors", ["--alpha", "3", "--outgoing", "tie", "--layout", "dense"]),
                       ("d.safetensors", ["--alpha", "2", "--outgoing", "split", "--expand-top", "4"])):
        run = run_cli(["expand", src_path, *args, "-o", tmp_path / name, "-q", "--probe-samples", "0"])
        assert run.exit_code == 0, run.stderr
        paths.append(tmp_path / name)
    # a bfloat16 model beside them (same widths)
    bf = make_model(tmp_path / "e.safetensors", widths, dtype=torch.bfloat16, seed=6, bias=False)
    paths.append(bf)
    rel = [p.name for p in paths]  # cwd is tmp_path (conftest): short names keep the table on one line
    doc = cli_json("evaluate", *rel, "--data", "data.npz")
    assert [m["model"] for m in doc["models"]] == rel
    assert doc["data"]["test"] == len(data["y_test"]) and doc["data"]["train"] == len(data["y_train"])
    for row, p in zip(doc["models"], paths):
        model = load_oracle(p, keys_of(2))
        counts = oracle_counts(model)["total"]
        assert row["widths"] == model.widths and row["layout"] == model.layout and row["sha256"] == model.f.sha256
        assert row["expanded"] == any(L.children is not None for L in model.layers)
        for k in ("weights", "nonzero_weights", "biases", "hidden_neurons"):
            assert row[k] == counts[k], (p.name, k, row[k], counts[k])
        for split in ("test", "train"):
            x, y = data[f"x_{split}"], data[f"y_{split}"]
            logits = np_forward(model, x)
            assert row[split]["samples"] == len(y)
            assert row[split]["loss"] == pytest.approx(cross_entropy(logits, y), rel=1e-4), (p.name, split)
            assert _margin(logits) > 1e-4
            assert row[split]["accuracy"] == pytest.approx(float((logits.argmax(1) == y).mean()), abs=1e-9), (p.name, split)
    # the table shows the same numbers
    res = run_cli(["evaluate", *rel, "--data", "data.npz"])
    assert res.exit_code == 0, res.stderr
    rows = _table_rows(res.stdout)
    assert len(rows) == len(doc["models"]), res.stdout
    for cells, m in zip(rows, doc["models"]):
        model, layout, w, weights, nnz, biases, loss, acc, tacc = cells
        assert model == m["model"] and layout == m["layout"] and w == "-".join(map(str, m["widths"]))
        assert [_num(weights), _num(nnz), _num(biases)] == [m["weights"], m["nonzero_weights"], m["biases"]], cells
        assert _num(loss) == pytest.approx(m["test"]["loss"], abs=5.1e-5), cells
        assert _num(acc) == pytest.approx(m["test"]["accuracy"], abs=5.1e-5), cells
        assert _num(tacc) == pytest.approx(m["train"]["accuracy"], abs=5.1e-5), cells


# ---------------------------------------------------------------- analyze


@pytest.mark.parametrize("dtype,outgoing,layout", [(torch.float32, "copy", "packed"), (torch.float16, "tie", "dense"),
                                                   (torch.bfloat16, "split", "packed")])
def test_analyze_metrics_match_oracle(tmp_path, dtype, outgoing, layout):
    widths = [10, 8, 6, 4]
    src_path = make_model(tmp_path / "a.safetensors", widths, dtype=dtype, seed=7, zeros=True)
    data = make_data(tmp_path / "data.npz", widths[0], widths[-1], seed=3)
    out_path = tmp_path / "b.safetensors"
    run = run_cli(["expand", src_path, "--alpha", "2", "--outgoing", outgoing, "--layout", layout, "-o", out_path,
                   "-q", "--probe-samples", "0"])
    assert run.exit_code == 0, run.stderr
    top = 5
    doc = cli_json("analyze", src_path, out_path, "--data", tmp_path / "data.npz", "--top", str(top))
    x, y = data["x_test"], data["y_test"]
    assert doc["data"]["samples"] == len(x) and doc["data"]["num_classes"] == widths[-1]
    oracle = []
    for mdoc, p in zip(doc["models"], (src_path, out_path)):
        model = load_oracle(p, keys_of(2))
        acts = np_hidden(model, x)
        assert mdoc["widths"] == model.widths and mdoc["sha256"] == model.f.sha256
        per_layer = []
        for ldoc, L, a in zip(mdoc["layers"], model.layers[:-1], acts):
            want = oracle_layer_metrics(L, a, y, widths[-1])
            per_layer.append(want)
            assert ldoc["neurons"] == L.W.shape[0] and ldoc["features"] == L.W.shape[1]
            assert_close_dict(ldoc["metrics"], want, f"analyze {p.name} {L.key}", rel=1e-4, abs_=1e-7)
            # top neurons: ranked by polysemanticity (ties by index), with their own numbers
            poly = want["_poly"]
            order = np.argsort(-np.nan_to_num(poly, nan=-np.inf), kind="stable")[:top]
            got = [t["neuron"] for t in ldoc["top_neurons"]]
            assert np.allclose(poly[got], poly[order], rtol=1e-6), (got, order.tolist())
            for t in ldoc["top_neurons"]:
                i = t["neuron"]
                assert t["polysemanticity"] == pytest.approx(poly[i], rel=1e-5)
                assert t["norm"] == pytest.approx(want["_norms"][i], rel=1e-5)
                assert t["density"] == pytest.approx(want["_density"][i], abs=1e-9)
                assert close(t["class_selectivity"], want["_sel"][i], 1e-4, 1e-7)
                assert t["parent"] == (int(L.parents[i]) if L.parents is not None else None)
        oracle.append(per_layer)
    # fold changes (expanded / dense); the dense layer's non-sibling value is its all-pairs value
    for comp, d, x_ in zip(doc["comparison"], oracle[0], oracle[1]):
        fc = comp["fold_change"]
        for m in ("capacity_mean", "polysemanticity_mean", "cosine_mean_abs", "activation_density", "class_selectivity_mean"):
            assert close(fc[m], x_[m] / d[m], 1e-4, 1e-7), (m, fc[m], x_[m] / d[m])
        assert close(fc["cosine_mean_abs_non_sibling"], x_["cosine_mean_abs_non_sibling"] / d["cosine_mean_abs"], 1e-4, 1e-7)


# ---------------------------------------------------------------- verify never claims what does not hold


def _dense_expanded(tmp_path) -> tuple[Path, Path, dict, dict]:
    src = make_model(tmp_path / "s.safetensors", [8, 6, 3], seed=9)
    out = tmp_path / "x.safetensors"
    run = run_cli(["expand", src, "--alpha", "2", "--outgoing", "tie", "--layout", "dense", "-o", out, "-q",
                   "--probe-samples", "0"])
    assert run.exit_code == 0, run.stderr
    f = STFile(out)
    arrays = {k: np.array(v) for k, v in f.arrays.items()}
    return src, out, arrays, dict(f.meta)


@pytest.mark.parametrize("tamper", ["off_mask", "value", "shared_edge", "tied_copy", "budget"])
def test_verify_refuses_what_the_oracle_finds_false(tmp_path, tamper):
    src, out, t, meta = _dense_expanded(tmp_path)
    w0, m0, w1 = t["0.weight"], t["fpe.mask:0.weight"], t["2.weight"]
    if tamper == "off_mask":
        r, c = np.argwhere(~m0)[0]
        w0[r, c] = 0.5
    elif tamper == "value":
        r, c = np.argwhere(m0)[0]
        w0[r, c] = w0[r, c] * 1.5 + 0.25
    elif tamper == "shared_edge":  # a sibling also takes an edge its sibling owns (and the count moves by one)
        c = int(np.argwhere(m0[0])[0][0])
        m0[1, c], w0[1, c] = True, w0[0, c]
    elif tamper == "tied_copy":
        w1[0, 1] = w1[0, 0] + 1.0
    elif tamper == "budget":
        meta["fpe.budget"] = json.dumps({**json.loads(meta["fpe.budget"]), "weights": json.loads(meta["fpe.budget"])["weights"] + 1},
                                        sort_keys=True)
    bad = tmp_path / "bad.safetensors"
    np_save_file(t, str(bad), metadata=meta)
    res = run_cli(["verify", bad, "--source", src, "--json"])
    assert res.exit_code == 3, (tamper, res.exit_code, res.stdout, res.stderr)
    assert res.stdout == ""


# ---------------------------------------------------------------- more drift: exact fractions, one output, seeded probes


def test_drift_argmax_agreement_is_an_exact_fraction_of_the_probes(tmp_path):
    """argmax_agreement is (samples whose arg-max agrees) / (probe samples): k / N, so
    `agreement * probe_samples` must be an integer. 30 of 37 must print 30/37, not a float32 rounding of it
    (0.8108108043670654 * 37 = 29.99999976, which `int()` turns into 29)."""
    e = run_scenario(tmp_path, SCENARIOS[0])
    d = e.report["drift"]
    want = oracle_drift(e.src, e.out, e.data["x_test"])
    assert want["_margin"] > 1e-3
    agree = int(round(want["argmax_agreement"] * d["probe_samples"]))
    assert 0 < agree < d["probe_samples"]  # a fraction that float32 cannot hold exactly
    assert d["argmax_agreement"] == agree / d["probe_samples"], (d["argmax_agreement"], f"{agree}/{d['probe_samples']}")


def test_drift_single_output_and_seeded_probes(tmp_path):
    src_path = make_model(tmp_path / "one.safetensors", [6, 5, 1], seed=2)
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "one.npz", x_train=rng.normal(size=(20, 6)).astype(np.float32),
             y_train=(rng.random((20, 1)) > 0.5).astype(np.float32), x_test=rng.normal(size=(9, 6)).astype(np.float32),
             y_test=(rng.random((9, 1)) > 0.5).astype(np.float32))
    out_path = tmp_path / "o.safetensors"
    r = cli_json("expand", src_path, "--alpha", "2", "--data", tmp_path / "one.npz", "-o", out_path)
    src, out = load_oracle(src_path, keys_of(1)), load_oracle(out_path, keys_of(1))
    want = oracle_drift(src, out, np.load(tmp_path / "one.npz")["x_test"])
    assert r["drift"]["argmax_agreement"] is None  # one output: no arg-max to agree on
    assert_close_dict(r["drift"], {k: v for k, v in want.items() if k != "argmax_agreement"}, "drift", rel=1e-5)
    # without --data: N standard-normal probes from a generator seeded with the expansion seed
    r = cli_json("expand", src_path, "--alpha", "2", "--seed", "5", "--probe-samples", "7", "-o", out_path, "--force")
    assert r["drift"]["probe"] == "7 standard-normal inputs (seed 5)"
    x = torch.randn(7, 6, generator=torch.Generator().manual_seed(5)).numpy()
    want = oracle_drift(src, load_oracle(out_path, keys_of(1)), x)
    assert_close_dict(r["drift"], {k: v for k, v in want.items() if k != "argmax_agreement"}, "seeded drift", rel=1e-5)


# ---------------------------------------------------------------- params on files edited by hand


@pytest.mark.parametrize("outgoing,layout", [("copy", "packed"), ("copy", "dense"), ("tie", "packed"), ("tie", "dense")])
def test_params_counts_trained_zeros_on_the_mask(tmp_path, outgoing, layout):
    """A weight on the mask can be exactly 0 (trained to it): it still exists (weights) but is not non-zero."""
    src = make_model(tmp_path / "s.safetensors", [8, 6, 4], seed=11)
    out = tmp_path / "x.safetensors"
    run = run_cli(["expand", src, "--alpha", "2", "--outgoing", outgoing, "--layout", layout, "-o", out, "-q",
                   "--probe-samples", "0"])
    assert run.exit_code == 0, run.stderr
    f = STFile(out)
    t = {k: np.array(v) for k, v in f.arrays.items()}
    if layout == "packed":
        t["fpe.values:0.weight"][[0, 3]] = 0.0
        t["fpe.values:2.weight"][1] = 0.0  # with tie: one shared parameter, stored once
    else:
        t["0.weight"][tuple(np.argwhere(t["fpe.mask:0.weight"])[[0, 3]].T)] = 0.0
        r, c = np.argwhere(t["fpe.mask:2.weight"])[0]
        t["2.weight"][r, c:c + (2 if outgoing == "tie" else 1)] = 0.0  # every tied copy of the parameter
    edited = tmp_path / "edited.safetensors"
    np_save_file(t, str(edited), metadata=f.meta)
    doc = cli_json("params", edited)
    want = oracle_counts(load_oracle(edited, keys_of(1)))
    assert [r["nonzero_weights"] for r in want["layers"]] == [r["weights"] - n for r, n in zip(want["layers"], (2, 1))]
    for have_l, want_l in zip(doc["layers"], want["layers"]):
        assert_close_dict(have_l, want_l, f"params layer {want_l['weight']}")
    assert_close_dict(doc["total"], want["total"], "params total")
    assert doc["budget_holds"] is True
    _check_params_table(edited, doc)


def test_params_budget_violated_when_the_count_moves(tmp_path):
    """budget_holds is recomputed from the masks: a recorded budget the masks do not reach is VIOLATED."""
    src, out, t, meta = _dense_expanded(tmp_path)
    r, c = np.argwhere(~t["fpe.mask:0.weight"])[0]
    t["fpe.mask:0.weight"][r, c] = True  # one more weight (value 0: a trained zero), same recorded budget
    edited = tmp_path / "edited.safetensors"
    np_save_file(t, str(edited), metadata=meta)
    doc = cli_json("params", edited)
    want = oracle_counts(load_oracle(edited, keys_of(1)))
    assert doc["total"]["weights"] == want["total"]["weights"] == json.loads(meta["fpe.budget"])["weights"] + 1
    assert doc["total"]["nonzero_weights"] == want["total"]["nonzero_weights"]
    assert doc["budget_holds"] is False
    _check_params_table(edited, doc)
    res = run_cli(["params", edited])
    assert "VIOLATED" in res.stdout


# ---------------------------------------------------------------- multi-label evaluate


def test_evaluate_multilabel_matches_oracle(tmp_path):
    widths = [7, 6, 3]
    paths = [make_model(tmp_path / "a.safetensors", widths, seed=12, dtype=torch.float16)]
    run = run_cli(["expand", paths[0], "--alpha", "2", "-o", tmp_path / "b.safetensors", "-q", "--probe-samples", "0"])
    assert run.exit_code == 0, run.stderr
    paths.append(tmp_path / "b.safetensors")
    rng = np.random.default_rng(4)
    data = {"x_train": rng.normal(size=(30, 7)).astype(np.float32), "y_train": (rng.random((30, 3)) > 0.5).astype(np.float32),
            "x_test": rng.normal(size=(23, 7)).astype(np.float32), "y_test": (rng.random((23, 3)) > 0.5).astype(np.float32)}
    np.savez(tmp_path / "ml.npz", **data)
    doc = cli_json("evaluate", "a.safetensors", "b.safetensors", "--data", "ml.npz")
    assert doc["data"]["multilabel"] is True
    for row, p in zip(doc["models"], paths):
        model = load_oracle(p, keys_of(1))
        for split in ("test", "train"):
            z, y = np_forward(model, data[f"x_{split}"]), data[f"y_{split}"]
            bce = np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))
            hits = (z > 0) == (y > 0.5)
            got = row[split]
            assert got["loss"] == pytest.approx(bce.mean(), rel=1e-4)
            assert got["accuracy"] == pytest.approx(hits.all(axis=1).mean(), abs=1e-12)
            assert got["exact_match"] == pytest.approx(hits.all(axis=1).mean(), abs=1e-12)
            assert got["per_label_accuracy"] == pytest.approx(hits.mean(axis=0).tolist(), abs=1e-12)
            assert got["label_accuracy"] == pytest.approx(hits.mean(), abs=1e-12)
    res = run_cli(["evaluate", "a.safetensors", "b.safetensors", "--data", "ml.npz"])
    rows = _table_rows(res.stdout)
    for cells, m in zip(rows, doc["models"]):
        assert _num(cells[6]) == pytest.approx(m["test"]["loss"], abs=5.1e-5)
        assert _num(cells[7]) == pytest.approx(m["test"]["accuracy"], abs=5.1e-5)
        assert _num(cells[9]) == pytest.approx(m["test"]["label_accuracy"], abs=5.1e-5)


# ---------------------------------------------------------------- analyze: CSV, top parents, selective expansion


def test_analyze_csv_and_top_parents_match_oracle(tmp_path):
    widths = [10, 8, 6, 4]
    src_path = make_model(tmp_path / "a.safetensors", widths, seed=13)
    data = make_data(tmp_path / "data.npz", widths[0], widths[-1], seed=5)
    out_path = tmp_path / "b.safetensors"
    run = run_cli(["expand", src_path, "--alpha", "3", "--expand-top", "4", "-o", out_path, "-q", "--probe-samples", "0"])
    assert run.exit_code == 0, run.stderr
    doc = cli_json("analyze", "a.safetensors", "b.safetensors", "--data", "data.npz", "--top", "3", "--csv", "n.csv")
    x, y = data["x_test"], data["y_test"]
    models = [load_oracle(p, keys_of(2)) for p in (src_path, out_path)]
    metrics = [[oracle_layer_metrics(L, a, y, widths[-1]) for L, a in zip(m.layers[:-1], np_hidden(m, x))] for m in models]
    import csv
    rows = list(csv.DictReader(open(tmp_path / "n.csv")))
    assert len(rows) == sum(L.W.shape[0] for m in models for L in m.layers[:-1])
    by = {(r["model"], r["layer"], int(r["neuron"])): r for r in rows}
    for name, m, mm in zip(("a.safetensors", "b.safetensors"), models, metrics):
        for L, want in zip(m.layers[:-1], mm):
            for i in range(L.W.shape[0]):
                r = by[(name, L.key, i)]
                assert r["parent"] == ("" if L.parents is None else str(L.parents[i]))
                assert float(r["polysemanticity"]) == pytest.approx(want["_poly"][i], rel=1e-6)
                assert float(r["norm"]) == pytest.approx(want["_norms"][i], rel=1e-5)
                assert float(r["density"]) == pytest.approx(want["_density"][i], abs=1e-12)
                if math.isnan(want["_sel"][i]):
                    assert r["class_selectivity"] == ""
                else:
                    assert float(r["class_selectivity"]) == pytest.approx(want["_sel"][i], rel=1e-5)
    for comp, L, d, xm in zip(doc["comparison"], models[1].layers, metrics[0], metrics[1]):
        order = np.argsort(-d["_poly"], kind="stable")[:3]
        assert [t["parent"] for t in comp["top_parents"]] == order.tolist()
        for t in comp["top_parents"]:
            p = t["parent"]
            kids = np.flatnonzero(L.parents == p)
            assert t["children"] == kids.tolist()
            assert t["polysemanticity_dense"] == pytest.approx(d["_poly"][p], rel=1e-6)
            assert t["polysemanticity_children_mean"] == pytest.approx(nanmean(xm["_poly"][kids]), rel=1e-6)
            assert t["polysemanticity_fold_change"] == pytest.approx(nanmean(xm["_poly"][kids]) / d["_poly"][p], rel=1e-6)
            assert close(t["class_selectivity_children_mean"], nanmean(xm["_sel"][kids]), 1e-5, 1e-9)
            assert close(t["class_selectivity_dense"], d["_sel"][p], 1e-5, 1e-9)


@pytest.mark.parametrize("seed,args", [(5, ["--alpha", "3", "--expand-top", "3"]),
                                       (1, ["--alpha", "2", "--expand-top", "2", "--outgoing", "split"])])
def test_expand_top_splits_the_neurons_analyze_ranks_highest(tmp_path, seed, args):
    """README: --expand-top N splits the N most polysemantic neurons of each layer, "score as in fpe analyze".
    The neurons split in every hidden layer are the top N that `fpe analyze` lists for the source model
    (and the oracle's polysemanticity ranking agrees)."""
    src_path = make_model(tmp_path / "s.safetensors", [10, 8, 6, 4], seed=seed)
    n = int(args[args.index("--expand-top") + 1])
    out = tmp_path / "o.safetensors"
    run = run_cli(["expand", src_path, *args, "-o", out, "-q", "--probe-samples", "0"])
    assert run.exit_code == 0, run.stderr
    doc = cli_json("analyze", src_path, "--top", str(n))
    src, expanded = load_oracle(src_path, keys_of(2)), load_oracle(out, keys_of(2))
    for k, (ldoc, L) in enumerate(zip(doc["models"][0]["layers"], src.layers[:-1])):
        poly = exp_entropy_rows(L.eff ** 2)
        ranked = np.argsort(-poly, kind="stable")[:n].tolist()
        assert [t["neuron"] for t in ldoc["top_neurons"]] == ranked
        split = np.flatnonzero(expanded.layers[k].children > 1).tolist()
        assert split == sorted(ranked), (f"layer {L.key}: split {split}, analyze's top {n}: {sorted(ranked)}",
                                         np.round(poly, 3).tolist())


# ---------------------------------------------------------------- other activations (from metadata or --activation)


@pytest.mark.parametrize("act,how", [("tanh", "meta"), ("gelu", "meta"), ("sigmoid", "flag"), ("silu", "meta"),
                                     ("leaky_relu", "flag")])
def test_drift_evaluate_analyze_use_the_activation(tmp_path, act, how):
    widths = [8, 6, 5, 3]
    net = make_sequential(widths, seed=14)
    src_path = save_module(net, tmp_path / "a.safetensors", metadata={"activation": act} if how == "meta" else None)
    flag = ["--activation", act] if how == "flag" else []
    data = make_data(tmp_path / "data.npz", widths[0], widths[-1], seed=6)
    out_path = tmp_path / "b.safetensors"
    r = cli_json("expand", "a.safetensors", "--alpha", "2", "--group-size", "2", "--data", "data.npz", "-o", "b.safetensors", *flag)
    src, out = load_oracle(src_path, keys_of(2)), load_oracle(out_path, keys_of(2))
    assert r["activation"] == act
    want = oracle_drift(src, out, data["x_test"], act)
    assert_close_dict(r["drift"], {k: v for k, v in want.items() if k != "argmax_agreement"}, f"drift ({act})", rel=1e-5)
    if want["_margin"] > 1e-4:
        assert r["drift"]["argmax_agreement"] == pytest.approx(want["argmax_agreement"], abs=1e-6)
    # the expanded file records the activation: no flag needed from here on
    doc = cli_json("evaluate", "a.safetensors", "b.safetensors", "--data", "data.npz", *flag)
    for row, m in zip(doc["models"], (src, out)):
        for split in ("test", "train"):
            logits = np_forward(m, data[f"x_{split}"], act)
            assert row[split]["loss"] == pytest.approx(cross_entropy(logits, data[f"y_{split}"]), rel=1e-5), (act, split)
            assert row[split]["accuracy"] == pytest.approx(float((logits.argmax(1) == data[f"y_{split}"]).mean()), abs=1e-12)
    doc = cli_json("analyze", "a.safetensors", "b.safetensors", "--data", "data.npz", "--samples", "20", *flag)
    assert doc["data"]["samples"] == 20
    x, y = data["x_test"][:20], data["y_test"][:20]
    for mdoc, m in zip(doc["models"], (src, out)):
        assert mdoc["activation"] == act
        for ldoc, L, a in zip(mdoc["layers"], m.layers[:-1], np_hidden(m, x, act)):
            want = oracle_layer_metrics(L, a, y, widths[-1])
            keys = ("class_selectivity_mean", "dead_fraction", "activation_density", "samples")
            assert_close_dict(ldoc["metrics"], {k: want[k] for k in keys}, f"analyze {act} {L.key}", rel=1e-5, abs_=1e-7)


def test_evaluate_and_analyze_grouped_expansion_match_oracle(tmp_path):
    """--group-size models run through the grouped kernel in evaluate and analyze: same numbers as masked dense."""
    widths = [12, 8, 8, 4]
    make_model(tmp_path / "a.safetensors", widths, seed=15, dtype=torch.bfloat16)
    data = make_data(tmp_path / "data.npz", widths[0], widths[-1], seed=7)
    names = ["a.safetensors"]
    for name, args in (("g.safetensors", ["--alpha", "2", "--group-size", "4"]),
                       ("gt.safetensors", ["--alpha", "4", "--group-size", "8", "--outgoing", "tie"]),
                       ("s.safetensors", ["--alpha", "2", "--split", "structured", "--layout", "dense"])):
        run = run_cli(["expand", "a.safetensors", *args, "-o", name, "-q", "--probe-samples", "0"])
        assert run.exit_code == 0, run.stderr
        names.append(name)
    doc = cli_json("evaluate", *names, "--data", "data.npz")
    for row, name in zip(doc["models"], names):
        m = load_oracle(tmp_path / name, keys_of(2))
        logits = np_forward(m, data["x_test"])
        assert row["test"]["loss"] == pytest.approx(cross_entropy(logits, data["y_test"]), rel=1e-5), name
        assert row["test"]["accuracy"] == pytest.approx(float((logits.argmax(1) == data["y_test"]).mean()), abs=1e-12), name
    for name in names[1:]:
        doc = cli_json("analyze", "a.safetensors", name, "--data", "data.npz")
        m = load_oracle(tmp_path / name, keys_of(2))
        for ldoc, L, a in zip(doc["models"][1]["layers"], m.layers[:-1], np_hidden(m, data["x_test"])):
            want = oracle_layer_metrics(L, a, data["y_test"], widths[-1])
            assert_close_dict(ldoc["metrics"], want, f"analyze {name} {L.key}", rel=1e-5, abs_=1e-7)


# ---------------------------------------------------------------- re-expanding an expanded file; a saved plan


def test_reexpanding_an_expanded_file_counts_its_masks(tmp_path):
    """An fpe file carries masks: its budget is the mask count, trained zeros on the mask included."""
    widths = [10, 8, 6, 4]
    make_model(tmp_path / "a.safetensors", widths, seed=16)
    data = make_data(tmp_path / "probe.npz", widths[0], widths[-1], seed=8)
    run = run_cli(["expand", "a.safetensors", "--alpha", "2", "-o", "b.safetensors", "-q", "--probe-samples", "0"])
    assert run.exit_code == 0, run.stderr
    f = STFile(tmp_path / "b.safetensors")
    t = {k: np.array(v) for k, v in f.arrays.items()}
    t["fpe.values:0.weight"][[1, 5, 9]] = 0.0  # trained to exactly zero: still weights
    meta = {k: v for k, v in f.meta.items()}
    meta["fpe.finetune.settings"] = json.dumps({"epochs": 1})  # as a fine-tuned file records it
    np_save_file(t, str(tmp_path / "b.safetensors"), metadata=meta)
    # the first layer's children hold 1+ edges after pruning: split the second layer (16 widened inputs) again
    r = cli_json("expand", "b.safetensors", "--alpha", "2", "--seed", "2", "--targets", "2.weight", "--data", "probe.npz",
                 "-o", "c.safetensors")
    keys = keys_of(2)
    e = Expanded(tmp_path / "b.safetensors", tmp_path / "c.safetensors", keys, load_oracle(tmp_path / "b.safetensors", keys),
                 load_oracle(tmp_path / "c.safetensors", keys), r, data, [None, 2], "copy", [])
    assert r["budget"] == sum(int(L.pmask.sum()) for L in e.src.layers) == json.loads(f.meta["fpe.budget"])["weights"]
    assert e.out.f.meta["fpe.source_sha256"] == e.src.f.sha256  # c records b as its source
    # the report's numbers (the lineage this expansion made: 0.weight was not split again, 2.weight was)
    stale = e.out.layers[0].children
    e.out.layers[0].children = None
    check_expand_report(e, "packed")
    e.out.layers[0].children = stale
    # c was expanded from b and records b's sha256: verify against b must hold. The untargeted 0.weight
    # must not keep its lineage from b's own source (8 parents; b's 0.weight has 16 outputs).
    res = run_cli(["verify", "c.safetensors", "--source", "b.safetensors", "--json"])
    assert res.exit_code == 0, (res.exit_code, res.stderr)
    assert stale is None or np.array_equal(stale, np.ones(16, int)), f"0.weight keeps a stale lineage {stale}"
    v = res.json()
    e.out.layers[0].children = None
    claims = oracle_claims(e, with_source=True)
    assert all(claims[c] for c in v["checks"]), (v["checks"], claims)


def test_applied_plan_reports_the_same_numbers(tmp_path):
    widths = [10, 8, 6, 4]
    make_model(tmp_path / "a.safetensors", widths, seed=17, dtype=torch.float16)
    data = make_data(tmp_path / "probe.npz", widths[0], widths[-1], seed=9)
    r1 = cli_json("expand", "a.safetensors", "--alpha", "3", "--seed", "7", "--save-plan", "plan.safetensors",
                  "--data", "probe.npz", "-o", "b.safetensors")
    r2 = cli_json("expand", "a.safetensors", "--plan", "plan.safetensors", "--data", "probe.npz", "-o", "c.safetensors")
    keys = keys_of(2)
    for r, name in ((r1, "b.safetensors"), (r2, "c.safetensors")):
        e = Expanded(tmp_path / "a.safetensors", tmp_path / name, keys, load_oracle(tmp_path / "a.safetensors", keys),
                     load_oracle(tmp_path / name, keys), r, data, [3, 3], "copy", [])
        check_expand_report(e, "packed")
    # the plan file: plan.child:K holds the child owning each edge (-1: no edge), the output's rows agree
    plan = STFile(tmp_path / "plan.safetensors")
    src = load_oracle(tmp_path / "a.safetensors", keys)
    for k, L in enumerate(src.layers[:-1]):
        child = plan.arrays[f"plan.child:{L.key}"].astype(int)
        if k == 0:
            assert np.array_equal(child >= 0, L.support)
        assert child.max() == 2


# ---------------------------------------------------------------- format version 1 (bit rows), still read


def test_params_and_evaluate_read_format_version_1_bit_rows(tmp_path):
    widths = [11, 7, 3]
    make_model(tmp_path / "a.safetensors", widths, seed=18)
    data = make_data(tmp_path / "d.npz", widths[0], widths[-1], seed=10)
    run = run_cli(["expand", "a.safetensors", "--alpha", "2", "-o", "b.safetensors", "-q", "--probe-samples", "0"])
    assert run.exit_code == 0, run.stderr
    f = STFile(tmp_path / "b.safetensors")
    t = {}
    for k, v in f.arrays.items():
        if k.startswith("fpe.zmask:"):
            key = k.split(":", 1)[1]
            rows, cols = (int(x) for x in f.arrays[f"fpe.shape:{key}"])
            mask = decode_zmask(v.tobytes(), rows, cols)
            t[f"fpe.bitmask:{key}"] = np.ascontiguousarray(np.packbits(mask, axis=1, bitorder="little"))  # (rows, ceil(cols/8))
        else:
            t[k] = np.array(v)
    meta = dict(f.meta, **{"fpe.format_version": "1"})
    np_save_file(t, str(tmp_path / "v1.safetensors"), metadata=meta)
    v1 = STFile(tmp_path / "v1.safetensors")
    doc = cli_json("params", "v1.safetensors")
    want = oracle_counts(load_oracle(tmp_path / "b.safetensors", keys_of(1)))
    for have_l, want_l in zip(doc["layers"], want["layers"]):
        want_l = dict(want_l, bytes_on_disk=sum(n for name, n in v1.nbytes.items()
                                                if name.endswith(":" + want_l["weight"]) or name in (want_l["weight"], want_l["weight"][:-6] + "bias")))
        assert_close_dict(have_l, want_l, f"params v1 layer {want_l['weight']}")
    assert doc["file_bytes"] == v1.size
    ev = cli_json("evaluate", "b.safetensors", "v1.safetensors", "--data", "d.npz")
    assert ev["models"][0]["test"] == ev["models"][1]["test"]
    logits = np_forward(load_oracle(tmp_path / "b.safetensors", keys_of(1)), data["x_test"])
    assert ev["models"][1]["test"]["loss"] == pytest.approx(cross_entropy(logits, data["y_test"]), rel=1e-5)


def test_params_nonzero_weights_never_exceed_weights(tmp_path):
    """A dense-layout file edited so that an off-mask entry is non-zero: that entry is no weight (the network
    masks it: evaluate ignores it), so it is not a non-zero weight either."""
    src, out, t, meta = _dense_expanded(tmp_path)
    r, c = np.argwhere(~t["fpe.mask:0.weight"])[0]
    t["0.weight"][r, c] = 0.75
    edited = tmp_path / "edited.safetensors"
    np_save_file(t, str(edited), metadata=meta)
    doc = cli_json("params", edited)
    L = load_oracle(edited, keys_of(1)).layers[0]
    assert doc["layers"][0]["weights"] == int(L.mask.sum())
    assert doc["layers"][0]["nonzero_weights"] == int((L.eff != 0).sum()), doc["layers"][0]
    assert doc["layers"][0]["nonzero_weights"] <= doc["layers"][0]["weights"]


def test_analyze_single_linear_layer_and_no_data(tmp_path):
    """A single linear layer is analyzed itself; without --data only the weight metrics are reported."""
    lin = torch.nn.Sequential(torch.nn.Linear(9, 5))
    torch.manual_seed(19)
    path = save_module(lin, tmp_path / "lin.safetensors")
    doc = cli_json("analyze", path, "--top", "3")
    assert doc["data"] is None and doc["comparison"] is None
    L = load_oracle(path, ["0.weight"]).layers[0]
    (ldoc,) = doc["models"][0]["layers"]
    want = oracle_layer_metrics(L, None, None, None)
    assert_close_dict(ldoc["metrics"], want, "analyze single layer", rel=1e-5, abs_=1e-7)
    assert "dead_fraction" not in ldoc["metrics"] or ldoc["metrics"]["dead_fraction"] is None
    r = cli_json("expand", make_model(tmp_path / "m.safetensors", [6, 4, 2], seed=20), "--alpha", "2", "--probe-samples", "0")
    assert r["drift"] is None
