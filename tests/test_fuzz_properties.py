"""Property-based fuzzing (hypothesis) of the expansion core and of the checkpoint reader.

1. Core: random MLPs (widths down to 1, depth 1-4, every float dtype, with or without biases, weights
   with many exact zeros, all-equal magnitudes, subnormals, or values near the dtype's max) expanded
   with every split, outgoing rule, --expand-top, --group-size and target subset. Checked: the budget
   is exact, siblings are disjoint, children's edges are their parent's, biases and columns are
   copied (or split) bit for bit, the pruned weights are the globally smallest magnitudes with the
   documented tie rule (sorted exactly, in float64), determinism, save -> load bit-exact in both
   layouts, packed <-> dense conversion byte-exact, a saved plan re-applies to the same result, and
   `check_invariants` finds nothing. Refusals (FPEError) are accepted only where the README documents
   them and the input really is of that kind.
2. Reader: valid fpe files (packed, dense, tied) and a plain checkpoint, mutated at the tensor and
   metadata level (dtypes, shapes, values, names, lineage, fpe.* metadata) and at the byte level,
   loaded under a memory ceiling and a time limit: either FPEError or a consistent model, never
   another exception, never a hang, never a huge allocation.
Pinned regressions (each a bug found by this file) are the `test_bug_*` tests at the end.
"""

from __future__ import annotations

import contextlib
import json
import re
import resource
import signal
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import Phase, event, example, given, settings
from hypothesis import strategies as st

from conftest import run_cli
from fpe_cli.checkpoint import load_checkpoint, recorded_budget, save_checkpoint
from fpe_cli.plan_file import load_plan, save_plan
from fpe_cli.errors import FPEError
from fpe_cli.expand import PlanInputs, Target, expand_mlp
from fpe_cli.model import MLP, Layer, check_chain
from fpe_cli.stfile import read_safetensors
from fpe_cli.verify import check_invariants, model_counts

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
FUZZ = dict(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's raw bit patterns (bit-exact comparisons that NaN or -0.0 cannot fool)."""
    return t.contiguous().view(INT_VIEW[t.element_size()]) if t.is_floating_point() else t


def same_bits(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


# ================================================================ 1. the core


def _values(style: str, shape: tuple[int, int], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Weights of one style; every style is exactly representable in `dtype`."""
    fi = torch.finfo(dtype)
    sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    if style == "normal":
        w = torch.randn(shape, generator=g, dtype=torch.float64)
    elif style == "zeros":  # many exact zeros (rows may end up with fewer edges than alpha)
        w = torch.randn(shape, generator=g, dtype=torch.float64) * (torch.rand(shape, generator=g) < 0.4)
    elif style == "equal":  # one magnitude everywhere: every pruning decision is a tie
        w = sign * 0.5
    elif style == "tiny":  # subnormals: small multiples of the smallest one
        w = sign * torch.randint(1, 8, shape, generator=g).to(torch.float64) * float(fi.smallest_normal) * float(fi.eps)
    elif style == "huge":  # near the dtype's max
        w = sign * float(fi.max) * (0.5 + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64))
    else:  # mixed, element by element
        parts = [_values(s, shape, dtype, g).to(torch.float64) for s in ("normal", "zeros", "equal", "tiny", "huge")]
        pick = torch.randint(0, len(parts), shape, generator=g)
        w = torch.stack(parts).gather(0, pick[None])[0]
    return w.to(dtype)


def build_mlp(widths: list[int], dtype: torch.dtype, bias: bool, style: str, seed: int) -> MLP:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for k, (d, h) in enumerate(zip(widths, widths[1:])):
        w = _values(style, (h, d), dtype, g)
        b = torch.randn(h, generator=g).to(dtype) if bias else None
        layers.append(Layer(f"{2 * k}.weight", w, f"{2 * k}.bias" if bias else None, b))
    return MLP(layers, "relu")


@st.composite
def core_cases(draw):
    depth = draw(st.integers(1, 4))  # hidden layers
    alpha = draw(st.integers(2, 6))
    # mostly wide enough for alpha; sometimes 1-3 wide (1 input, 1 output, width-1 hidden layers)
    widths = [draw(st.integers(1, 3) if draw(st.integers(0, 4)) == 0 else st.integers(alpha, alpha + 9))
              for _ in range(depth + 2)]
    split = draw(st.sampled_from(["random", "random", "structured", "gram", "clause", "activation"]))
    n_targets = draw(st.integers(1, depth))
    targets = sorted(draw(st.permutations(list(range(depth))))[:n_targets])
    top = draw(st.sampled_from([None, None, None, 1, 2, 0.5, 0.3]))
    group_size = draw(st.sampled_from([None, 1, 2, 3])) if split == "random" else None
    groups = None
    if split == "clause":
        groups = draw(st.lists(st.integers(-1, 3), min_size=widths[0], max_size=widths[0]))
    return dict(widths=widths, alpha=alpha, split=split, targets=targets, top=top, group_size=group_size,
                groups=groups, dtype=draw(st.sampled_from(DTYPES)), bias=draw(st.booleans()),
                style=draw(st.sampled_from(["normal", "normal", "zeros", "equal", "tiny", "huge", "mixed"])),
                outgoing=draw(st.sampled_from(["copy", "split", "tie"])), seed=draw(st.integers(0, 2**20)))


def _make_targets(case) -> list[Target]:
    # a clause split needs input features: the first layer; deeper targets use random
    return [Target(k, case["alpha"], case["split"] if case["split"] != "clause" or k == 0 else "random", case["top"])
            for k in case["targets"]]


def _inputs(case) -> PlanInputs:
    groups = torch.tensor(case["groups"], dtype=torch.int64) if case["groups"] is not None else None
    calib = torch.randn(24, case["widths"][0], generator=torch.Generator().manual_seed(case["seed"]))
    return PlanInputs(groups=groups, group_size=case["group_size"],
                      calibration=calib if case["split"] == "activation" else None)


def expected_refusal(src: MLP, case) -> str | None:
    """What the README says must be refused for this input, computed without fpe: 'alpha' (a parent to be
    split has fewer edges than alpha), 'top' (--expand-top asks for more splittable neurons than exist),
    None (must succeed), or 'unknown' (depends on an earlier --expand-top choice or a shared split)."""
    alpha, top, tie = case["alpha"], case["top"], case["outgoing"] == "tie"
    copies = None  # children per input column of the current producer (None: one each)
    for k in case["targets"]:
        support = src.layers[k].support().to(torch.int64)
        if copies is not None and k - 1 in case["targets"] and not tie:
            edges = support @ copies  # columns were copied by the previous target
        else:
            edges = support.sum(dim=1)
        if top is None:
            if bool((edges < alpha).any()):
                return "alpha"
            copies = torch.full((support.shape[0],), alpha, dtype=torch.int64)
        else:
            h = support.shape[0]
            want = int(top) if top >= 1 else max(1, round(top * h))
            if want > h or want > int((edges >= alpha).sum()):
                return "top"
            if want != h and k + 1 in case["targets"] and not tie:
                return "unknown"  # which parents get alpha children decides the next layer's edge counts
            copies = torch.full((h,), alpha if want == h else 1, dtype=torch.int64)
    return None


ALLOWED = {"alpha": r"alpha \d+ is larger than parent", "top": r"--expand-top .* selects",
           "group": r"the shared split leaves a child"}


def _check_refusal(exc: FPEError, src: MLP, case) -> None:
    msg, why = str(exc), expected_refusal(src, case)
    if case["group_size"] and re.search(ALLOWED["group"], msg):
        return  # documented: a shared partition of a sparse layer can leave a child empty
    if why == "unknown" and any(re.search(p, msg) for p in (ALLOWED["alpha"], ALLOWED["top"])):
        return
    assert why in ALLOWED and re.search(ALLOWED[why], msg), f"refused a valid input ({why=}): {msg}"


def _oracle_pruned_masks(full: MLP, budget: int) -> list[torch.Tensor]:
    """The documented rule, by exact sorting: drop the smallest |w| (compared in float64, exact for every
    dtype) among existing weights until `budget` remain; ties: earlier layer, then row-major."""
    mags, layer_ids, flat_ids = [], [], []
    for li, layer in enumerate(full.layers):
        m = layer.mask.reshape(-1)
        idx = m.nonzero().flatten()
        mags.append(layer.weight.reshape(-1)[idx].to(torch.float64).abs().numpy())
        layer_ids.append(np.full(idx.numel(), li))
        flat_ids.append(idx.numpy())
    mags, layer_ids, flat_ids = map(np.concatenate, (mags, layer_ids, flat_ids))
    order = np.lexsort((flat_ids, layer_ids, mags))
    excess = max(0, len(order) - budget)
    masks = [layer.mask.clone() for layer in full.layers]
    for i in order[:excess]:
        masks[layer_ids[i]].view(-1)[flat_ids[i]] = False
    return masks


def _col_parents(mlp: MLP, k: int) -> torch.Tensor:
    prev = mlp.layers[k - 1].parents if k else None
    return prev if prev is not None else torch.arange(mlp.layers[k].in_features)


def check_expansion(src: MLP, case, full, res) -> None:
    """Every documented property of an expansion result `res` (and of its unpruned twin `full`)."""
    outgoing = case["outgoing"]
    # budget: exact, over every weight matrix (tied copies once)
    assert res.budget == src.weight_budget()
    assert res.mlp.weight_budget() == res.budget, "the budget does not hold"
    assert sum(res.after) == res.budget
    for k, (layer, s, f) in enumerate(zip(res.mlp.layers, src.layers, full.mlp.layers)):
        rows = layer.parents if layer.parents is not None else torch.arange(layer.out_features)
        cols = _col_parents(res.mlp, k)
        assert (layer.parents is not None) == (k in case["targets"])
        assert layer.weight.dtype == s.weight.dtype and tuple(layer.weight.shape) == (rows.numel(), cols.numel())
        assert layer.mask is not None and layer.mask.dtype == torch.bool
        # biases copied from the parent, bit for bit
        assert same_bits(layer.bias, None if s.bias is None else s.bias[rows])
        # children's edges are a subset of their parent's; off-mask weights are exact zeros
        parent_support = s.support()[rows][:, cols]
        assert not bool((layer.mask & ~parent_support).any()), "a child owns an edge its parent lacks"
        assert not bool((f.mask & ~parent_support).any())
        assert not bool(((layer.weight != 0) & ~layer.mask).any()), "a weight off the mask is not zero"
        # siblings disjoint, and before pruning their union is exactly the parent's edges
        if layer.parents is not None:
            owners = torch.zeros(s.out_features, layer.in_features, dtype=torch.int64)
            owners.index_add_(0, f.parents, f.mask.to(torch.int64))
            assert int(owners.max()) <= 1, "siblings share an edge"
            assert torch.equal(owners.bool(), s.support()[:, cols]), "the children's union is not the parent's edges"
        # values: the parent's (copy, tie) or a 1/children share (split), bit for bit, where the weight exists
        want = s.weight
        if outgoing == "split" and k > 0 and res.mlp.layers[k - 1].parents is not None:
            want = want / torch.bincount(cols, minlength=s.in_features).to(want.dtype)
        want = want[rows][:, cols]
        assert torch.equal(bits(torch.where(f.mask, f.weight, torch.zeros((), dtype=f.weight.dtype))),
                           bits(torch.where(f.mask, want, torch.zeros((), dtype=want.dtype)))), "values not copied"
        # pruning only removes: the pruned result is the unpruned one with some weights zeroed
        assert not bool((layer.mask & ~f.mask).any())
        zero = torch.zeros((), dtype=f.weight.dtype)  # off the mask: any zero (a source's -0.0 may be carried)
        assert torch.equal(bits(torch.where(layer.mask, layer.weight, zero)), bits(torch.where(layer.mask, f.weight, zero)))
        # tied copies (outgoing tie): equal values and masks within each group
        if outgoing == "tie" and k > 0 and res.mlp.layers[k - 1].parents is not None:
            assert layer.tied is not None and torch.equal(layer.tied, cols)
    # pruning: exactly the globally smallest magnitudes, ties to the earlier layer then row-major
    if outgoing != "tie":
        for k, (layer, want) in enumerate(zip(res.mlp.layers, _oracle_pruned_masks(full.mlp, res.budget))):
            assert torch.equal(layer.mask, want), f"layer {k}: pruned weights are not the globally smallest"
    else:
        assert res.pruned == [0] * len(res.pruned)
    meta = dict(res.mlp.metadata)
    res.mlp.metadata["fpe.settings"] = json.dumps({"outgoing": outgoing})  # what `fpe expand` records
    try:
        assert check_invariants(res.mlp, res.budget, src) == []
    finally:
        res.mlp.metadata = meta


def same_mlp(a: MLP, b: MLP) -> None:
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        assert x.weight_key == y.weight_key and x.bias_key == y.bias_key
        # off the mask any zero counts (a source's -0.0 may be carried in memory; files store +0.0)
        wx, wy = (torch.where(l.mask, l.weight, torch.zeros((), dtype=l.weight.dtype)) if l.mask is not None
                  else l.weight for l in (x, y))
        assert same_bits(wx, wy), f"{x.weight_key}: weights differ"
        assert not bool((x.weight != wx).any() or (y.weight != wy).any())
        assert same_bits(x.bias, y.bias) and same_bits(x.mask, y.mask)
        assert same_bits(x.parents, y.parents) and same_bits(x.tied, y.tied)


def check_files(src: MLP, res, case) -> None:
    """save -> load bit-exact in both layouts, packed <-> dense byte-exact, plan re-application identical."""
    meta = {"fpe.budget": json.dumps({"weights": res.budget})}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = {lay: tmp / f"e.{lay}.safetensors" for lay in ("packed", "dense")}
        for lay, path in files.items():
            save_checkpoint(res.mlp, path, lay, meta)
            ck = load_checkpoint(path)
            assert ck.layout == lay
            same_mlp(res.mlp, ck.mlp)
            assert check_invariants(ck.mlp, recorded_budget(ck.metadata)) == []
        for lay, other in (("packed", "dense"), ("dense", "packed")):  # fpe convert
            conv = tmp / f"c.{lay}-to-{other}.safetensors"
            ck = load_checkpoint(files[lay])
            save_checkpoint(ck.mlp, conv, other, {k: v for k, v in ck.metadata.items() if k != "fpe.layout"})
            assert conv.read_bytes() == files[other].read_bytes(), f"{lay} -> {other} is not byte-exact"
        # --save-plan / --plan: the plan file re-applies to the very same model
        save_plan(res.plan, tmp / "plan.safetensors")
        again = expand_mlp(src, _make_targets(case), seed=case["seed"], outgoing=case["outgoing"],
                           plan=load_plan(tmp / "plan.safetensors"), inputs=_inputs(case))
        same_mlp(res.mlp, again.mlp)


def run_core_case(case) -> None:
    src = build_mlp(case["widths"], case["dtype"], case["bias"], case["style"], case["seed"])
    targets, kw = _make_targets(case), dict(seed=case["seed"], outgoing=case["outgoing"], inputs=_inputs(case))
    try:
        res = expand_mlp(src, targets, **kw)
    except FPEError as exc:
        event(f"refused: {str(exc)[:40]}")
        _check_refusal(exc, src, case)
        return
    event(f"expanded {case['dtype']} {case['style']} {case['outgoing']}")
    assert expected_refusal(src, case) in (None, "unknown"), "an input the README says is refused was expanded"
    full = expand_mlp(src, _make_targets(case), prune=False, **kw)
    check_expansion(src, case, full, res)
    same_mlp(res.mlp, expand_mlp(src, _make_targets(case), **kw).mlp)  # determinism
    check_files(src, res, case)


@settings(max_examples=150, **FUZZ)
@given(core_cases())
def test_core_expansion_properties(case):
    run_core_case(case)


def test_core_cases_mostly_expand():
    """The refusal predicate accepts ordinary dense models (else the core property would test little)."""
    ok = 0
    for seed in range(40):
        case = dict(widths=[6, 5, 4, 3], alpha=2 + seed % 3, split="random", targets=[0, 1], top=None,
                    group_size=None, groups=None, dtype=DTYPES[seed % 4], bias=bool(seed % 2), style="normal",
                    outgoing=["copy", "split", "tie"][seed % 3], seed=seed)
        src = build_mlp(case["widths"], case["dtype"], case["bias"], case["style"], seed)
        ok += expected_refusal(src, case) is None
    assert ok >= 20


# ================================================================ 2. the reader


@contextlib.contextmanager
def memory_ceiling(headroom: int = 1 << 31):
    """RLIMIT_AS = what is mapped now + headroom, restored afterwards: a huge allocation fails at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    ceiling = int(status["VmSize"].split()[0]) * 1024 + headroom
    if hard != resource.RLIM_INFINITY:
        ceiling = min(ceiling, hard)
    resource.setrlimit(resource.RLIMIT_AS, (ceiling, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _base_files(where: Path) -> dict[str, bytes]:
    """A plain checkpoint, its alpha-2 expansion (packed and dense), and a tied expansion (packed, dense)."""
    src = build_mlp([6, 5, 4, 3], torch.float32, True, "normal", 7)
    save_checkpoint(src, where / "plain.safetensors", "plain")
    out = {"plain": (where / "plain.safetensors").read_bytes()}
    for name, outgoing, targets in (("exp", "copy", [Target(0, 2), Target(1, 2, top=2)]), ("tie", "tie", [Target(0, 2)])):
        res = expand_mlp(src, targets, outgoing=outgoing, seed=3)
        meta = {"fpe.budget": json.dumps({"weights": res.budget}), "fpe.settings": json.dumps({"outgoing": outgoing}),
                "fpe.source_sha256": "0" * 64}
        for lay in ("packed", "dense"):
            path = where / f"{name}.{lay}.safetensors"
            save_checkpoint(res.mlp, path, lay, meta)
            out[f"{name}.{lay}"] = path.read_bytes()
    return out


BASES = _base_files(Path(tempfile.mkdtemp(prefix="fpe-fuzz-")))


def split_file(data: bytes) -> tuple[dict, dict[str, tuple[str, list[int], bytes]], dict[str, str]]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    body = data[8 + n:]
    tensors = {k: (e["dtype"], e["shape"], body[e["data_offsets"][0]:e["data_offsets"][1]]) for k, e in header.items()}
    return header, tensors, meta


def join_file(tensors: dict[str, tuple[str, list[int], bytes]], meta: dict | None) -> bytes:
    header, body = {}, b""
    if meta is not None:
        header["__metadata__"] = meta
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(body), len(body) + len(raw)]}
        body += raw
    raw_header = json.dumps(header).encode()
    return struct.pack("<Q", len(raw_header)) + raw_header + body


NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "I16": np.int16,
      "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
BIG_INTS = st.sampled_from([0, 1, 2, 3, 4, 5, 8, 10, -1, 2**31 - 1, 2**32, 2**40, 2**62, 2**63 - 1])
SMALL_SHAPES = st.lists(st.integers(0, 6), min_size=0, max_size=3)
META_KEYS = ["fpe.format_version", "fpe.layers", "fpe.budget", "fpe.activation", "activation", "fpe.settings",
             "fpe.layout", "fpe.source_sha256", "fpe.kind", "fpe.finetune.epochs"]
META_VALUES = st.one_of(
    st.text(max_size=8),
    st.sampled_from(['["0.weight", "2.weight", "4.weight"]', '["4.weight", "0.weight"]', '["0.weight"]', "[]", "{}",
                     '{"weights": 40}', '{"weights": -1}', '{"weights": true}', '{"weights": 1e999}', "NaN",
                     '{"outgoing": "split"}', '{"outgoing": "tie"}', '{"outgoing": "copy", "bias": "zero"}',
                     "1", "3", "4", "99", "01", " 3", "٣", "²", "gelu", "nn.Tanh()", "none", "identity",
                     "packed", "dense", "plain", "plan"]),
)


def _tensor_bytes(dtype: str, shape: list[int], values: list[int]) -> bytes:
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    vals = (values * (n // max(1, len(values)) + 1))[:n] if values else [0] * n
    if dtype == "BF16":
        return np.array(vals, dtype=np.float32).view(np.uint32).__rshift__(16).astype(np.uint16).tobytes()
    if dtype == "BOOL":
        return np.array([bool(v) for v in vals], dtype=np.bool_).tobytes()
    info = np.iinfo(NP[dtype]) if np.issubdtype(NP[dtype], np.integer) else None
    if info is not None:
        vals = [min(max(v, info.min), info.max) for v in vals]
    with np.errstate(over="ignore"):  # huge ints as F16/F32 become Inf on purpose
        return np.array(vals, dtype=NP[dtype]).tobytes()


class Mutated:
    """A mutated file and how it was made (the short description is what a failure prints)."""

    def __init__(self, base: str, data: bytes, ops: list[str]):
        self.base, self.data, self.ops = base, data, ops

    def __repr__(self) -> str:
        return f"Mutated({self.base!r}, <{len(self.data)} bytes>, ops={self.ops!r})"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...<{len(text)} chars>"


@st.composite
def structural_mutations(draw):
    """A base file with 1-3 edits of its tensors (type, shape, values, names, lineage) or fpe.* metadata."""
    base = draw(st.sampled_from(sorted(BASES)))
    _, tensors, meta = split_file(BASES[base])
    ops = []
    for _ in range(draw(st.integers(1, 3))):
        before = {k: (v[0], v[1]) for k, v in tensors.items()}, dict(meta)
        names = sorted(tensors)
        op = draw(st.sampled_from(["retype", "reshape", "revalue", "drop", "rename", "add", "lineage", "meta",
                                   "meta", "zmask"]))
        name = draw(st.sampled_from(names)) if names else None
        if op == "retype" and name:
            dtype = draw(st.sampled_from(sorted(NP) + ["BF16"]))
            _, shape, _ = tensors[name]
            tensors[name] = (dtype, shape, _tensor_bytes(dtype, shape, draw(st.lists(BIG_INTS, max_size=4))))
        elif op == "reshape" and name:
            dtype, shape, raw = tensors[name]
            new = draw(SMALL_SHAPES | st.lists(BIG_INTS.filter(lambda v: v >= 0), min_size=1, max_size=2)
                       .map(lambda s: s + [0]))  # huge dimensions only beside a 0, so the bytes stay small
            tensors[name] = (dtype, new, _tensor_bytes(dtype, new, draw(st.lists(BIG_INTS, max_size=4))))
        elif op == "revalue" and name:
            dtype, shape, _ = tensors[name]
            tensors[name] = (dtype, shape, _tensor_bytes(dtype, shape, draw(st.lists(BIG_INTS, min_size=1, max_size=6))))
        elif op == "drop" and name:
            del tensors[name]
        elif op == "rename" and name:
            kind = draw(st.sampled_from(["fpe.mask:", "fpe.children:", "fpe.tied:", "fpe.values:", "fpe.zmask:",
                                         "fpe.bitmask:", "fpe.shape:", "", "x."]))
            key = draw(st.sampled_from(["0.weight", "2.weight", "4.weight", "0.bias", "9.weight", ""]))
            tensors[kind + key] = tensors.pop(name)
        elif op == "add":
            kind = draw(st.sampled_from(["fpe.children:", "fpe.tied:", "fpe.mask:", "fpe.shape:", "fpe.zmask:", "6."]))
            key = draw(st.sampled_from(["0.weight", "2.weight", "4.weight", "bogus", "weight"]))
            dtype = draw(st.sampled_from(["I32", "I64", "BOOL", "U8", "F32"]))
            shape = draw(SMALL_SHAPES)
            tensors[kind + key] = (dtype, shape, _tensor_bytes(dtype, shape, draw(st.lists(BIG_INTS, max_size=4))))
        elif op == "lineage":  # the same counts as a layer's children and a consumer's ties
            counts = draw(st.lists(st.sampled_from([1, 2, 3, 2**31 - 1]), min_size=1, max_size=4))
            raw = _tensor_bytes("I32", [len(counts)], counts)
            tensors[f"fpe.children:{draw(st.sampled_from(['0.weight', '2.weight', 'bogus']))}"] = ("I32", [len(counts)], raw)
            tensors[f"fpe.tied:{draw(st.sampled_from(['2.weight', '4.weight']))}"] = ("I32", [len(counts)], raw)
        elif op == "zmask":  # a valid zlib stream of other content
            key = draw(st.sampled_from(["0.weight", "2.weight", "4.weight"]))
            raw = zlib.compress(draw(st.binary(max_size=64)))
            tensors[f"fpe.zmask:{key}"] = ("U8", [len(raw)], raw)
        else:
            if draw(st.booleans()):
                meta[draw(st.sampled_from(META_KEYS))] = draw(META_VALUES)
            else:
                meta.pop(draw(st.sampled_from(META_KEYS)), None)
        changed = sorted(k for k in set(before[0]) | set(tensors) if before[0].get(k) != (tensors[k][:2] if k in tensors else None))
        changed += [f"raw:{k}" for k in tensors if k in before[0] and k not in changed]
        ops.append(f"{op}: " + ", ".join(f"{k}={tensors[k][:2] if k in tensors else 'dropped'}" for k in changed[:3])
                   + "".join(f" meta[{k}]={_short(meta.get(k))}" for k in META_KEYS if meta.get(k) != before[1].get(k)))
    return Mutated(base, join_file(tensors, meta), ops)


@st.composite
def byte_mutations(draw):
    """A base file with bytes flipped or overwritten (header or data), truncated, or extended."""
    base = draw(st.sampled_from(sorted(BASES)))
    data = bytearray(BASES[base])
    (n,) = struct.unpack("<Q", data[:8])
    op = draw(st.sampled_from(["flip_data", "flip_data", "overwrite", "flip_header", "truncate", "extend"]))
    if op == "flip_data":
        for _ in range(draw(st.integers(1, 4))):
            pos = draw(st.integers(8 + n, len(data) - 1))
            data[pos] ^= 1 << draw(st.integers(0, 7))
    elif op == "overwrite":
        pos = draw(st.integers(0, len(data) - 1))
        chunk = draw(st.binary(min_size=1, max_size=8))
        data[pos:pos + len(chunk)] = chunk
    elif op == "flip_header":
        pos = draw(st.integers(8, 8 + n - 1))
        data[pos] ^= 1 << draw(st.integers(0, 6))
    elif op == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    else:
        data += draw(st.binary(min_size=1, max_size=32))
    return Mutated(base, bytes(data), [op])


def _check_loaded(path: Path) -> None:
    """Load like the CLI does: FPEError, or a model whose parts are consistent and whose checks run."""
    try:
        ck = load_checkpoint(path)
    except FPEError:
        return
    mlp = ck.mlp
    assert check_chain(mlp.layers) == []
    for k, layer in enumerate(mlp.layers):
        assert layer.weight.ndim == 2 and layer.weight.is_floating_point()
        if layer.mask is not None:
            assert layer.mask.dtype == torch.bool and layer.mask.shape == layer.weight.shape
        if layer.parents is not None:
            assert layer.parents.numel() == layer.out_features
        if layer.tied is not None:
            assert layer.tied.numel() == layer.in_features and k > 0
            assert torch.equal(layer.tied, mlp.layers[k - 1].parents)
    model_counts(mlp)
    try:
        budget = recorded_budget(ck.metadata)
    except FPEError:
        budget = None
    problems = check_invariants(mlp, budget)
    assert isinstance(problems, list)


def _check_cli(path: Path) -> None:
    for args, codes in ((["verify", path], (0, 2, 3)), (["params", path, "--json"], (0, 2))):
        res = run_cli(args)
        assert res.exception is None, f"fpe {args[0]}: {res.exception!r}"
        assert res.exit_code in codes, (args[0], res.exit_code, res.stderr)
        if res.exit_code:
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("Error: ") and "internal error" not in lines[0], res.stderr


def fuzz_one(tmp_path: Path, data: bytes, cli: bool) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    with memory_ceiling(), time_limit(10):
        _check_loaded(path)
        if cli:
            _check_cli(path)


def _meta_edit(base: str, **meta) -> Mutated:
    _, tensors, m = split_file(BASES[base])
    return Mutated(base, join_file(tensors, {**m, **meta}), [f"meta[{k}]={_short(v)}" for k, v in meta.items()])


@settings(max_examples=400, **FUZZ)
@given(structural_mutations(), st.integers(0, 5))
@example(_meta_edit("exp.packed", **{"fpe.format_version": "²"}), 1)  # bug: ValueError from int()
@example(_meta_edit("plain", **{"fpe.layers": "[" * 100_000}), 1)  # bug: RecursionError
@example(_meta_edit("exp.dense", **{"fpe.budget": '{"weights": ' + "1" * 5000 + "}"}), 1)  # bug: ValueError
def test_reader_structural_mutations_raise_only_fpe_error(tmp_path, mutated, cli_roll):
    fuzz_one(tmp_path, mutated.data, cli=cli_roll == 0)


@settings(max_examples=300, **FUZZ)
@given(byte_mutations(), st.integers(0, 5))
def test_reader_byte_mutations_raise_only_fpe_error(tmp_path, mutated, cli_roll):
    fuzz_one(tmp_path, mutated.data, cli=cli_roll == 0)


def test_unmutated_bases_load_and_verify(tmp_path):
    for name, data in BASES.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        ck = load_checkpoint(path)
        assert check_invariants(ck.mlp, recorded_budget(ck.metadata)) == [], name
        res = run_cli(["verify", path])
        assert res.exit_code == 0, (name, res.stderr)


# ================================================================ pinned bugs found by this file


def _float64_mlp(w1, w2) -> MLP:
    return MLP([Layer("0.weight", torch.tensor(w1, dtype=torch.float64)),
                Layer("2.weight", torch.tensor(w2, dtype=torch.float64))])


def test_bug_float64_pruning_ranks_exact_magnitudes_not_float32_rounded():
    """Budget 6, 8 weights after expansion: the two smallest are the two copies of W2's 1.0. The float64
    weight 1 + 1e-12 rounds to 1.0 in float32 and must not be pruned in their place."""
    src = _float64_mlp([[1.0 + 1e-12, 5.0], [7.0, 9.0]], [[1.0, 3.0]])
    res = expand_mlp(src, [Target(0, 2)])
    kept_w1 = res.mlp.layers[0].weight[res.mlp.layers[0].mask].tolist()
    assert 1.0 + 1e-12 in kept_w1, f"pruned 1 + 1e-12 although two weights of 1.0 are smaller: kept {kept_w1}"
    assert res.mlp.layers[1].mask.sum() == 2  # both copies of 1.0 pruned, both copies of 3.0 kept


def test_bug_float64_weights_beyond_float32_range_can_be_expanded():
    """A finite float64 weight larger than float32's max is a valid weight: expansion must not call it Inf."""
    src = _float64_mlp([[1e300, 2.0], [3.0, 4.0]], [[1.0, 2.0]])
    res = expand_mlp(src, [Target(0, 2)])
    assert res.mlp.weight_budget() == src.weight_budget()


def test_bug_float64_huge_weight_through_the_cli(tmp_path):
    src = _float64_mlp([[1e300, 2.0], [3.0, 4.0]], [[1.0, 2.0]])
    save_checkpoint(src, tmp_path / "m.safetensors", "plain")
    res = run_cli(["expand", tmp_path / "m.safetensors", "--alpha", "2", "--probe-samples", "0", "-o", tmp_path / "o.safetensors"])
    assert res.exit_code == 0, res.stderr


@pytest.mark.parametrize("key,value", [
    ("fpe.format_version", "²"),  # str.isdigit() accepts it, int() does not
    ("fpe.format_version", "1" * 5000),  # int() refuses more than 4300 digits
    ("fpe.layers", "[" * 100_000),  # json: RecursionError
    ("fpe.layers", "1" * 5000),  # json: ValueError (digit limit), not JSONDecodeError
])
def test_bug_broken_metadata_values_raise_fpe_error_on_load(tmp_path, key, value):
    path = tmp_path / "m.safetensors"
    path.write_bytes(_meta_edit("exp.packed", **{key: value}).data)
    with pytest.raises(FPEError):
        load_checkpoint(path)
    res = run_cli(["params", path])
    assert res.exit_code == 2 and "internal error" not in res.stderr, res.stderr


@pytest.mark.parametrize("command", ["verify", "params"])
@pytest.mark.parametrize("value", ["[" * 100_000, '{"weights": ' + "1" * 5000 + "}"])
def test_bug_broken_fpe_budget_is_bad_input_not_an_internal_error(tmp_path, command, value):
    path = tmp_path / "m.safetensors"
    path.write_bytes(_meta_edit("exp.dense", **{"fpe.budget": value}).data)
    res = run_cli([command, path])
    assert res.exit_code == 2 and "internal error" not in res.stderr, res.stderr


@pytest.mark.parametrize("base", ["tie.dense", "tie.packed"])
def test_bug_tied_lineage_bomb_is_refused_without_allocating(tmp_path, base):
    """A 1 KB file whose fpe.tied counts equal a (stray or unchecked) fpe.children tensor of two 2**31-1
    entries makes the reader build a 2**32-entry int64 index (32 GiB) before any size check."""
    _, tensors, meta = split_file(BASES[base])
    raw = _tensor_bytes("I32", [2], [2**31 - 1, 2**31 - 1])
    tensors["fpe.children:0.weight" if base == "tie.dense" else "fpe.children:bogus"] = ("I32", [2], raw)
    tensors["fpe.tied:2.weight"] = ("I32", [2], raw)
    path = tmp_path / "m.safetensors"
    path.write_bytes(join_file(tensors, meta))
    assert path.stat().st_size < 4096
    with memory_ceiling(1 << 30):
        with pytest.raises(FPEError):
            load_checkpoint(path)


def test_bug_packed_weight_claiming_huge_rows_and_zero_columns_does_not_hang(tmp_path):
    """fpe.shape [2**62, 0] with an empty zlib mask needs 0 bytes, so the size checks pass; the strip
    decoder then loops over 2**60 strips (forever) before the zero-sized weight is refused."""
    _, tensors, meta = split_file(BASES["exp.packed"])
    del tensors["4.bias"]
    tensors["fpe.shape:4.weight"] = ("I64", [2], _tensor_bytes("I64", [2], [2**62, 0]))
    tensors["fpe.values:4.weight"] = ("F32", [0], b"")
    empty = zlib.compress(b"")
    tensors["fpe.zmask:4.weight"] = ("U8", [len(empty)], empty)
    path = tmp_path / "m.safetensors"
    path.write_bytes(join_file(tensors, meta))
    with time_limit(5):
        with pytest.raises(FPEError):
            load_checkpoint(path)


def test_bug_malformed_shape_tensor_error_message_does_not_list_a_huge_tensor(tmp_path):
    """fpe.shape of shape [2**31 - 1, 0] (0 bytes) is malformed; the error message calls shape.tolist(),
    which builds 2**31 empty Python lists (MemoryError, or tens of GB without a ceiling)."""
    _, tensors, meta = split_file(BASES["exp.packed"])
    tensors["fpe.shape:0.weight"] = ("I64", [2**31 - 1, 0], b"")
    path = tmp_path / "m.safetensors"
    path.write_bytes(join_file(tensors, meta))
    with memory_ceiling(1 << 30), time_limit(10):
        with pytest.raises(FPEError):
            load_checkpoint(path)


@pytest.mark.parametrize("shape", [[2**32, 2**32, 0], [2**63, 0], [2**64, 0]])
def test_bug_header_shapes_that_overflow_int64_are_refused_as_corrupt(tmp_path, shape):
    """A zero-sized tensor whose other dimensions overflow int64 passes the header check (0 bytes expected),
    then torch's reshape raises RuntimeError / TypeError."""
    header = json.dumps({"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(FPEError):
        read_safetensors(path)
    res = run_cli(["inspect", path])
    assert res.exit_code == 2 and "internal error" not in res.stderr, res.stderr


def test_bug_saved_expand_top_plan_with_a_dead_neuron_reapplies(tmp_path):
    """`--expand-top` leaves a neuron without edges whole (one child, no edges) and `--save-plan` writes that;
    re-applying the plan with `--plan` to the same model is refused: 'plan leaves 1 child(ren) without edges'."""
    m = MLP([Layer("0.weight", torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [4.0, -5.0, 6.0]])),
             Layer("2.weight", torch.tensor([[1.0, 2.0, 3.0]]))])
    save_checkpoint(m, tmp_path / "m.safetensors", "plain")
    first = run_cli(["expand", tmp_path / "m.safetensors", "--alpha", "2", "--expand-top", "1", "--probe-samples", "0",
                     "--save-plan", tmp_path / "plan.safetensors", "-o", tmp_path / "a.safetensors"])
    assert first.exit_code == 0, first.stderr
    again = run_cli(["expand", tmp_path / "m.safetensors", "--plan", tmp_path / "plan.safetensors", "--probe-samples", "0",
                     "-o", tmp_path / "b.safetensors"])
    assert again.exit_code == 0, again.stderr
    a, b = load_checkpoint(tmp_path / "a.safetensors"), load_checkpoint(tmp_path / "b.safetensors")
    same_mlp(a.mlp, b.mlp)


@pytest.mark.parametrize("command", ["verify-source", "inspect"])
def test_bug_deeply_nested_fpe_settings_is_bad_input_not_an_internal_error(tmp_path, command):
    """verify.py _expansion_settings and pipeline.inspect_report catch only JSONDecodeError."""
    (tmp_path / "src.safetensors").write_bytes(BASES["plain"])
    path = tmp_path / "m.safetensors"
    path.write_bytes(_meta_edit("exp.packed", **{"fpe.settings": "[" * 100_000}).data)
    args = ["verify", path, "--source", tmp_path / "src.safetensors"] if command == "verify-source" else ["inspect", path, "--json"]
    res = run_cli(args)
    assert res.exit_code in (0, 2, 3) and "internal error" not in res.stderr, res.stderr
