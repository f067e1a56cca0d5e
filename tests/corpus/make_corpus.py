"""Generate fpe's bad-input corpus: valid files written the way users write them, then broken.

The valid bases are a plain `torch.nn.Sequential` saved with `safetensors.torch.save_file`, fpe's own
packed and dense expansions of it, a saved split plan, and a `.npz` data set. Each `Case` is one
broken file (a checkpoint, a plan or a data set) plus what every command must do with it: the exit
code (2 bad input, 3 a failed verification) and the words its one `Error:` line must contain.

    python tests/corpus/make_corpus.py OUT_DIR      # writes the corpus and prints one line per case

`make_corpus(dir)` is what tests/test_reliability.py calls. Nothing here is random without a seed:
the same call writes the same bytes.
"""

from __future__ import annotations

import json
import pickle  # noqa: S403 - only to WRITE hostile test files; fpe itself never imports pickle
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

WIDTHS = [6, 6, 3]  # in=6 and an expanded width of 12: packed bit rows have padding bits
ALPHA = 2

# commands that read a checkpoint given as MODEL; the test knows how to call each
MODEL_COMMANDS = ("expand", "params", "inspect", "verify", "convert", "analyze", "finetune", "evaluate")
DATA_COMMANDS = ("expand", "expand-activation", "analyze", "train", "finetune", "evaluate")


@dataclass
class Case:
    name: str
    kind: str  # "model": the broken file is MODEL; "plan": a --plan for base/plain; "data": a --data
    file: str  # the broken file, relative to the corpus directory
    needles: tuple[str, ...]  # words the `Error:` line must contain (case-insensitive)
    expect: dict[str, int]  # command -> exit code
    about: str = ""
    needles_for: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per-command overrides

    def needles_of(self, command: str) -> tuple[str, ...]:
        return self.needles_for.get(command, self.needles)


# ---------------------------------------------------------------- raw safetensors surgery


def split_file(data: bytes) -> tuple[dict, bytes]:
    """(parsed header, data section) of a valid safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def join_file(header: dict | bytes, body: bytes, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + body


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})


def save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors' own writer, then `__metadata__` put in sorted order (safetensors 0.8 writes it in a
    random order on every save, upstream issue #584) so the corpus is the same bytes on every run."""
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    if metadata:
        header, body = split_file(path.read_bytes())
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        raw = json.dumps(header).encode()
        path.write_bytes(join_file(raw + b" " * (-len(raw) % 8), body))


# ---------------------------------------------------------------- valid bases


def _sequential(widths: list[int], seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    mods: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        mods.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def _dataset(d: int, classes: int, n: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n + n // 2, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d, classes))).argmax(axis=1).astype(np.int64)
    return {"x_train": x[:n], "y_train": y[:n], "x_test": x[n:], "y_test": y[n:]}


def write_bases(root: Path) -> None:
    """plain.safetensors (torch.nn), packed/dense (fpe expand), plan.safetensors, good.npz."""
    from fpe_cli.pipeline import ExpandOptions, expand_file

    module = _sequential(WIDTHS)
    save(root / "plain.safetensors", {k: v.detach() for k, v in module.state_dict().items()})
    expand_file(ExpandOptions(root / "plain.safetensors", ALPHA, output=root / "packed.safetensors",
                              save_plan=root / "plan.safetensors", force=True))
    expand_file(ExpandOptions(root / "plain.safetensors", ALPHA, output=root / "dense.safetensors", layout="dense",
                              force=True))
    np.savez(root / "good.npz", **_dataset(WIDTHS[0], WIDTHS[-1]))


# ---------------------------------------------------------------- the cases


class _Builder:
    def __init__(self, root: Path):
        self.root = root
        self.cases: list[Case] = []

    def bytes_of(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def add(self, name: str, data: bytes | None, needles, *, kind: str = "model", expect=None, base: str = "plain",
            about: str = "", suffix: str = ".safetensors", needles_for=None) -> None:
        file = f"cases/{name}{suffix}"
        if data is not None:
            (self.root / file).write_bytes(data)
        commands = {"model": MODEL_COMMANDS, "plan": ("expand",), "data": DATA_COMMANDS}[kind]
        expect = expect if expect is not None else {c: 2 for c in commands}
        self.cases.append(Case(name, kind, file, tuple(needles), dict(expect), about, dict(needles_for or {})))

    def edit_header(self, base: str, edit) -> bytes:
        header, body = split_file(self.bytes_of(base))
        edit(header)
        return join_file(header, body)

    def edit_tensors(self, name: str, base: str, edit, needles, **kw) -> None:
        tensors, meta = read_all(self.root / base)
        edit(tensors, meta)
        save(self.root / f"cases/{name}.safetensors", tensors, meta)
        self.add(name, None, needles, **kw)


def _container_cases(b: _Builder) -> None:
    """Broken safetensors containers (the same reader serves models, plans and resume states)."""
    plain = b.bytes_of("plain.safetensors")
    size = len(plain)
    b.add("header_len_exceeds_file", struct.pack("<Q", size) + plain[8:], ["not a safetensors file", "header claims"])
    b.add("header_len_2_63", struct.pack("<Q", 2**63) + plain[8:], ["not a safetensors file", "header claims"])
    b.add("only_length_prefix", plain[:8], ["not a safetensors file"])
    b.add("header_not_json", join_file(b"{this is not json}", b""), ["header is not JSON"])
    b.add("header_not_utf8", join_file(b'{"a\xff\xfe": 1}', b""), ["not JSON"])
    b.add("header_json_list", join_file(b"[1, 2, 3]", b""), ["not a JSON object"])
    b.add("header_nested_50000_deep", join_file(b"[" * 50000 + b"]" * 50000, b""), ["not JSON"],
          about="a JSON nesting bomb must not reach Python's recursion limit")
    header, body = split_file(plain)
    header["0.bias"]["shape"] = [123456789]
    raw = json.dumps(header).encode().replace(b"123456789", b"9" * 5000)
    b.add("header_5000_digit_integer", join_file(raw, body), ["not JSON"],
          about="Python refuses int() of more than 4300 digits with a plain ValueError")

    def overlap(h):
        b0, e0 = h["0.weight"]["data_offsets"]
        h["2.bias"]["data_offsets"] = [b0, b0 + (h["2.bias"]["data_offsets"][1] - h["2.bias"]["data_offsets"][0])]
    b.add("offsets_overlap", b.edit_header("plain.safetensors", overlap), ["overlapping data_offsets"])
    b.add("offsets_negative", b.edit_header("plain.safetensors", lambda h: h["0.bias"].update(data_offsets=[-24, 0])),
          ["0.bias", "outside the data section"])
    b.add("offsets_reversed", b.edit_header("plain.safetensors", lambda h: h["0.bias"].update(
        data_offsets=h["0.bias"]["data_offsets"][::-1])), ["0.bias", "data_offsets"])
    b.add("offsets_past_end", b.edit_header("plain.safetensors", lambda h: h["2.bias"].update(
        data_offsets=[10_000, 10_012])), ["truncated", "need"])
    b.add("offsets_not_ints", b.edit_header("plain.safetensors", lambda h: h["0.bias"].update(data_offsets=["0", "24"])),
          ["0.bias", "bad data_offsets"])
    b.add("offsets_wrong_length", b.edit_header("plain.safetensors", lambda h: h["0.weight"].update(shape=[6, 5])),
          ["0.weight", "bytes for shape"])
    b.add("dtype_unknown", b.edit_header("plain.safetensors", lambda h: h["0.weight"].update(dtype="F4")),
          ["0.weight", "dtype F4", "cannot read"])
    b.add("dtype_float8_wrong_size", b.edit_header("plain.safetensors", lambda h: h["0.weight"].update(dtype="F8_E4M3")),
          ["0.weight", "bytes for shape"])  # float8 is read, so 4 bytes per entry are a corrupt size
    b.add("dtype_not_a_string", b.edit_header("plain.safetensors", lambda h: h["0.weight"].update(dtype=["F32"])),
          ["0.weight", "dtype"])
    b.add("shape_negative", b.edit_header("plain.safetensors", lambda h: h["0.weight"].update(shape=[-6, -6])),
          ["0.weight", "bad shape"])
    b.add("shape_boolean", b.edit_header("plain.safetensors", lambda h: h["0.bias"].update(shape=[True, 6])),
          ["0.bias", "bad shape"])
    b.add("shape_huge", b.edit_header("plain.safetensors", lambda h: h["0.weight"].update(shape=[10**12, 10**12])),
          ["0.weight", "more elements than a tensor can hold"])
    b.add("tensor_claims_1e15_bytes", b.edit_header("plain.safetensors", lambda h: h["0.weight"].update(
        dtype="F64", shape=[125_000_000_000_000], data_offsets=[0, 10**15])), ["truncated", "need"],
          about="must be refused before anything is allocated")
    b.add("entry_not_an_object", b.edit_header("plain.safetensors", lambda h: h.update({"0.bias": 7})),
          ["0.bias", "lacks"])
    b.add("entry_missing_shape", b.edit_header("plain.safetensors", lambda h: h["0.bias"].pop("shape")),
          ["0.bias", "lacks"])
    raw = json.dumps(split_file(plain)[0])
    first = raw.index('"0.bias"')
    dup = raw[:first] + '"2.bias": ' + json.dumps(split_file(plain)[0]["0.bias"]) + ", " + raw[first:]
    b.add("duplicate_keys", join_file(dup.encode(), split_file(plain)[1]), ["duplicate", "2.bias"],
          about="json.loads keeps the last duplicate; another reader may keep the first")
    b.add("metadata_not_strings", b.edit_header("plain.safetensors", lambda h: h.update(
        __metadata__={"fpe.activation": 1})), ["__metadata__", "strings"])
    b.add("metadata_not_a_mapping", b.edit_header("plain.safetensors", lambda h: h.update(__metadata__=[])),
          ["__metadata__"])
    b.add("empty_tensor_name", b.edit_header("plain.safetensors", lambda h: h.update({"": h.pop("2.bias")})),
          ["empty name"])


def _model_cases(b: _Builder) -> None:
    """Valid containers holding something that is not a usable MLP checkpoint."""
    def flat(t, m):
        t["0.weight"] = t["0.weight"].reshape(-1)
    b.edit_tensors("weight_1d", "plain.safetensors", flat, ["0.weight", "1-D", "(36,)"])

    def cube(t, m):
        t["0.weight"] = t["0.weight"].reshape(6, 2, 3)
    b.edit_tensors("weight_3d", "plain.safetensors", cube, ["0.weight", "3-D"])

    def ints(t, m):
        t["0.weight"] = (t["0.weight"] * 100).to(torch.int32)
    b.edit_tensors("weight_int32", "plain.safetensors", ints, ["0.weight", "floating point", "int32"])

    def zero_layer(t, m):
        t.update({"0.weight": torch.zeros(0, 6), "0.bias": torch.zeros(0), "2.weight": torch.zeros(3, 0)})
    b.edit_tensors("zero_sized_layer", "plain.safetensors", zero_layer, ["0.weight", "zero-sized"])

    def zero_input(t, m):
        t["0.weight"] = torch.zeros(6, 0)
    b.edit_tensors("zero_width_input", "plain.safetensors", zero_input, ["0.weight", "zero-sized"])

    def mask_shape(t, m):
        t["fpe.mask:0.weight"] = t["fpe.mask:0.weight"][:, :4].contiguous()
    b.edit_tensors("mask_shape_mismatch", "dense.safetensors", mask_shape, ["mask of 0.weight", "(12, 6)", "(12, 4)"])

    def mask_dtype(t, m):
        t["fpe.mask:0.weight"] = t["fpe.mask:0.weight"].to(torch.uint8)
    b.edit_tensors("mask_dtype_mismatch", "dense.safetensors", mask_dtype, ["mask of 0.weight", "bool", "uint8"])

    def newer(t, m):
        m["fpe.format_version"] = "99"
    b.edit_tensors("format_version_newer", "packed.safetensors", newer, ["format version", "'99'", "upgrade"])

    def garbled(t, m):
        m["fpe.format_version"] = "1.5"
    b.edit_tensors("format_version_not_integer", "dense.safetensors", garbled, ["format version", "'1.5'"])

    def bitcount(t, m):
        t["fpe.values:0.weight"] = t["fpe.values:0.weight"][:-1].contiguous()
    b.edit_tensors("packed_bitcount_disagrees", "packed.safetensors", bitcount, ["0.weight", "packed values hold",
                                                                                  "bits set"])

    def padding(t, m):
        _as_bitmask(t, m)
        bits = t["fpe.bitmask:0.weight"].clone()
        bits[0, 0] |= 0b1000_0000  # column 7 of a 6-column weight
        t["fpe.bitmask:0.weight"] = bits
    b.edit_tensors("packed_padding_bits_set", "packed.safetensors", padding, ["0.weight", "past column 6"])

    def bits_shape(t, m):
        _as_bitmask(t, m)
        t["fpe.bitmask:2.weight"] = t["fpe.bitmask:2.weight"][:2].contiguous()
    b.edit_tensors("packed_bitmask_shape_wrong", "packed.safetensors", bits_shape, ["2.weight", "packed bitmask"])

    def huge_shape(t, m):
        _as_bitmask(t, m)
        t["fpe.shape:0.weight"] = torch.tensor([12, 2**40], dtype=torch.int64)
    b.edit_tensors("packed_shape_huge", "packed.safetensors", huge_shape, ["0.weight", "12x1099511627776", "GiB"],
                   about="a 12 x 2^40 weight must be refused before anything is allocated")

    def shape_dtype(t, m):
        t["fpe.shape:0.weight"] = t["fpe.shape:0.weight"].to(torch.int32)
    b.edit_tensors("packed_shape_int32", "packed.safetensors", shape_dtype, ["0.weight", "shape tensor"])

    def no_bits(t, m):
        _as_bitmask(t, m)
        del t["fpe.bitmask:2.weight"]
    b.edit_tensors("packed_bitmask_missing", "packed.safetensors", no_bits, ["2.weight", "lacks its mask"])
    _zmask_cases(b)

    def both(t, m):
        t["0.weight"] = torch.zeros(12, 6)
    b.edit_tensors("packed_and_dense_copy", "packed.safetensors", both, ["0.weight", "both"],
                   about="two stored versions of one weight: which one is meant?")

    def lineage_dtype(t, m):
        t["fpe.children:0.weight"] = t["fpe.children:0.weight"].to(torch.int64)
    b.edit_tensors("lineage_int64", "packed.safetensors", lineage_dtype, ["lineage of 0.weight", "int32"])

    def lineage_sum(t, m):
        t["fpe.children:0.weight"] = torch.full((6,), 3, dtype=torch.int32)
    b.edit_tensors("lineage_sum_wrong", "dense.safetensors", lineage_sum, ["lineage of 0.weight", "add up to 18"])

    def layers_meta(t, m):
        m["fpe.layers"] = json.dumps(["0.weight", "9.weight"])
    b.edit_tensors("layers_metadata_unknown", "packed.safetensors", layers_meta, ["9.weight"])

    def act_meta(t, m):
        m["fpe.activation"] = "swishy"
    b.edit_tensors("activation_metadata_unknown", "packed.safetensors", act_meta, ["unknown activation", "swishy"])

    # ---- structurally valid, but FPE's invariants are broken: `fpe verify` exits 3 ----
    def siblings(t, m):
        mask, w = t["fpe.mask:0.weight"].clone(), t["0.weight"].clone()
        j = int(mask[0].nonzero()[0])  # an edge child 0 of parent 0 owns ...
        mask[1, j], w[1, j] = True, 0.25  # ... now owned by its sibling too
        t["fpe.mask:0.weight"], t["0.weight"] = mask, w
        m2, w2 = t["fpe.mask:2.weight"].clone(), t["2.weight"].clone()
        r, c = (int(v) for v in m2.nonzero()[0])
        m2[r, c], w2[r, c] = False, 0.0  # drop one weight elsewhere so the budget still holds
        t["fpe.mask:2.weight"], t["2.weight"] = m2, w2
    b.edit_tensors("siblings_not_disjoint", "dense.safetensors", siblings, ["0.weight", "more than one sibling"],
                   expect={"verify": 3}, about="masks edited so two children of one parent share an input edge")

    def off_mask(t, m):
        mask, w = t["fpe.mask:0.weight"], t["0.weight"].clone()
        r, c = (int(v) for v in (~mask).nonzero()[0])
        w[r, c] = 0.5
        t["0.weight"] = w
    b.edit_tensors("off_mask_weight_nonzero", "dense.safetensors", off_mask, ["0.weight", "off the mask"],
                   expect={"verify": 3, "convert": 3}, about="convert would silently drop the value")

    def budget(t, m):
        info = json.loads(m["fpe.budget"])
        info["weights"] += 1
        m["fpe.budget"] = json.dumps(info)
    b.edit_tensors("budget_recorded_wrong", "packed.safetensors", budget, ["budget"], expect={"verify": 3})

    def nan(t, m):
        v = t["fpe.values:2.weight"].clone()
        v[0] = float("nan")
        t["fpe.values:2.weight"] = v
    b.edit_tensors("nan_weight_packed", "packed.safetensors", nan, ["2.weight", "non-finite"],
                   expect={"verify": 3, "expand": 2})  # finetune: see the report (it trains on NaN weights)

    def bad_budget_json(t, m):
        m["fpe.budget"] = "{"
    b.edit_tensors("metadata_value_not_json", "packed.safetensors", bad_budget_json, ["fpe.budget", "not valid JSON"],
                   expect={"verify": 2, "params": 2})


def _pickle_cases(b: _Builder) -> None:
    """Pickle-based checkpoints (torch.save) are refused, whatever their name says."""
    state = _sequential(WIDTHS).state_dict()
    for suffix in (".pt", ".bin", ".ckpt", ".pth"):
        torch.save(state, b.root / f"cases/torch_save_{suffix[1:]}{suffix}")
        b.add(f"torch_save_{suffix[1:]}", None, ["pickle", "refused", "safetensors.torch.save_file"], suffix=suffix)
    torch.save(state, b.root / "cases/torch_save_named_safetensors.safetensors")
    b.add("torch_save_named_safetensors", None, ["torch.save", "pickle"])
    (b.root / "cases/raw_pickle_named_safetensors.safetensors").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    b.add("raw_pickle_named_safetensors", None, ["pickle"])


def _plan_cases(b: _Builder) -> None:
    plan = b.bytes_of("plan.safetensors")

    def meta_edit(name, edit, needles):
        tensors, meta = read_all(b.root / "plan.safetensors")
        info = json.loads(meta["fpe.plan"])
        edit(tensors, meta, info)
        meta["fpe.plan"] = json.dumps(info)
        save(b.root / f"cases/{name}.safetensors", tensors, meta)
        b.add(name, None, needles, kind="plan")

    b.add("plan_truncated", plan[: len(plan) - 10], ["<file>", "truncated"], kind="plan")
    b.add("plan_header_not_json", join_file(b"{]", b""), ["<file>", "not JSON"], kind="plan")
    meta_edit("plan_alpha_huge", lambda t, m, i: i["layers"][0].update(alpha=10**9), ["alpha 1000000000", "2..32767"])
    meta_edit("plan_alpha_bool", lambda t, m, i: i["layers"][0].update(alpha=True), ["alpha", "True"])
    meta_edit("plan_format_newer", lambda t, m, i: m.update({"fpe.format_version": "7"}), ["format version"])
    meta_edit("plan_child_float", lambda t, m, i: t.update({"plan.child:0.weight": t["plan.child:0.weight"].float()}),
              ["0.weight", "integer child tensor"])
    meta_edit("plan_child_1d", lambda t, m, i: t.update({"plan.child:0.weight": t["plan.child:0.weight"].reshape(-1)}),
              ["0.weight", "2-D integer child tensor"])
    meta_edit("plan_children_counts_wrong", lambda t, m, i: t.update(
        {"plan.children:0.weight": torch.ones(3, dtype=torch.int64)}), ["0.weight", "children counts"])

    def siblings(t, m, i):
        child = t["plan.child:0.weight"].clone()
        child[child == 1] = 0  # every edge to child 0: child 1 of each parent is left without edges
        t["plan.child:0.weight"] = child
    meta_edit("plan_child_left_empty", siblings, ["plan does not match", "without edges"])


def _data_cases(b: _Builder) -> None:
    good = dict(np.load(b.root / "good.npz"))

    def npz(name, needles, expect=None, **changes):
        arrays = {k: v for k, v in {**good, **changes}.items() if v is not None}
        np.savez(b.root / f"cases/{name}.npz", **arrays)
        b.add(name, None, needles, kind="data", suffix=".npz", expect=expect)

    y = good["y_train"].astype(np.float32)
    y[3] = np.nan
    npz("nan_labels", ["y_train", "integer class labels"], y_train=y)
    multi = np.eye(3, dtype=np.float32)[good["y_train"]]
    multi[5, 1] = np.nan
    npz("nan_labels_multilabel", ["y_train", "NaN"], y_train=multi, y_test=np.eye(3, dtype=np.float32)[good["y_test"]])
    x = good["x_train"].copy()
    x[0, 0] = np.inf
    npz("inf_inputs", ["x_train", "NaN or Inf"], x_train=x)
    npz("missing_y_test", ["missing array", "y_test"], y_test=None)
    npz("lengths_differ", ["y_train", "expected 64 labels"], y_train=good["y_train"][:50])
    npz("wrong_input_width", ["features", "takes 6 inputs"], expect={c: 2 for c in DATA_COMMANDS if c != "train"},
        x_train=good["x_train"][:, :5], x_test=good["x_test"][:, :5])
    npz("labels_beyond_outputs", ["label", "3 outputs"], expect={"finetune": 2, "evaluate": 2},
        y_train=np.where(np.arange(64) == 0, 7, good["y_train"]))
    objects = np.empty(2, dtype=object)
    objects[:] = [{"a": 1}, None]
    np.savez(b.root / "cases/object_arrays.npz", **good, extra=objects)
    b.add("object_arrays", None, ["pickled"], kind="data", suffix=".npz")
    (b.root / "cases/not_a_zip.npz").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    b.add("not_a_zip", None, ["not a readable .npz"], kind="data", suffix=".npz")


def _as_bitmask(t: dict[str, torch.Tensor], m: dict[str, str]) -> None:
    """Rewrite a packed file's compressed masks as format version 1 bit rows (both are read)."""
    from fpe_cli.masks import decode_zmask, pack_mask

    for name in [n for n in t if n.startswith("fpe.zmask:")]:
        key = name.split(":", 1)[1]
        shape = tuple(int(s) for s in t[f"fpe.shape:{key}"])
        t[f"fpe.bitmask:{key}"] = pack_mask(decode_zmask(t.pop(name), shape, key))
    m["fpe.format_version"] = "1"


def _zmask_cases(b: "_Builder") -> None:
    """Compressed masks (format version 3) that do not decode to the weight's mask."""
    import zlib

    from fpe_cli.masks import _strips

    def stream(data: bytes) -> torch.Tensor:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def truncated(t, m):
        t["fpe.zmask:0.weight"] = t["fpe.zmask:0.weight"][:-3].contiguous()
    b.edit_tensors("zmask_truncated", "packed.safetensors", truncated, ["0.weight", "compressed mask"])

    def trailed(t, m):
        t["fpe.zmask:0.weight"] = torch.cat([t["fpe.zmask:0.weight"], torch.zeros(4, dtype=torch.uint8)])
    b.edit_tensors("zmask_trailing_bytes", "packed.safetensors", trailed, ["0.weight", "compressed mask", "trailed"])

    def garbage(t, m):
        t["fpe.zmask:0.weight"] = stream(bytes(range(7, 40)))
    b.edit_tensors("zmask_not_zlib", "packed.safetensors", garbage, ["0.weight", "not a valid zlib stream"])

    def padding_row(t, m):  # 2.weight is 3 x 12: its one strip has a fourth, padding row
        bits = np.zeros((4, 12), dtype=np.bool_)
        bits[3, 5] = True
        t["fpe.zmask:2.weight"] = stream(zlib.compress(_strips(bits).tobytes()))
    b.edit_tensors("zmask_padding_row_set", "packed.safetensors", padding_row, ["2.weight", "past row 3"])

    def huge_shape(t, m):
        t["fpe.shape:0.weight"] = torch.tensor([2**40, 2**40], dtype=torch.int64)
    b.edit_tensors("zmask_shape_huge", "packed.safetensors", huge_shape, ["0.weight", "claims", "bias holds 12"],
                   about="a 2^80-entry weight must be refused from what the file holds, not inflated")

    def rows_unlike_lineage(t, m):  # a claim the bias cannot contradict (no bias), the lineage can
        del t["0.bias"]
        t["fpe.shape:0.weight"] = torch.tensor([4096, 6], dtype=torch.int64)
        t["fpe.zmask:0.weight"] = stream(zlib.compress(bytes(4096 * 6 // 2)))
        t["fpe.values:0.weight"] = torch.zeros(0)
    b.edit_tensors("zmask_rows_unlike_lineage", "packed.safetensors", rows_unlike_lineage,
                   ["lineage of 0.weight", "children add up to 12", "claims 4096 rows"])

    def two_masks(t, m):
        from fpe_cli.masks import decode_zmask, pack_mask
        t["fpe.bitmask:0.weight"] = pack_mask(decode_zmask(t["fpe.zmask:0.weight"], (12, 6)))
    b.edit_tensors("zmask_and_bitmask", "packed.safetensors", two_masks, ["0.weight", "two masks"])

    def flat_dtype(t, m):
        t["fpe.zmask:0.weight"] = t["fpe.zmask:0.weight"].to(torch.int16)
    b.edit_tensors("zmask_dtype", "packed.safetensors", flat_dtype, ["0.weight", "1-D uint8"])


def make_corpus(root: Path) -> list[Case]:
    """Write the valid bases and every broken case under `root`; returns the cases."""
    root = Path(root)
    (root / "cases").mkdir(parents=True, exist_ok=True)
    write_bases(root)
    b = _Builder(root)
    _container_cases(b)
    _model_cases(b)
    _pickle_cases(b)
    _plan_cases(b)
    _data_cases(b)
    return b.cases


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/corpus/make_corpus.py OUT_DIR")
    for case in make_corpus(Path(sys.argv[1])):
        codes = ", ".join(f"{c}={e}" for c, e in case.expect.items())
        print(f"{case.kind:5} {case.name:32} {case.file:45} {codes}")
