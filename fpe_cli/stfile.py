"""Low-level safetensors I/O: a validating reader and a canonical, atomic writer.

Reading parses and checks the header ourselves before any tensor is touched, so a hostile or broken
file gives an `FPEError` naming the problem instead of a crash or a huge allocation. Writing is
canonical (sorted keys, fixed JSON form) so the same tensors and metadata always give the same bytes
(safetensors' own writer orders `__metadata__` randomly), and atomic (temp file + fsync + rename).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import zipfile
from pathlib import Path

import torch

from .errors import JSON_ERRORS, FPEError
from .outputs import atomic_output
from .shards import missing_file_hint, refuse_text

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"}

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
# the other dtypes safetensors writes (quantization scales, token ids, float8 weights), read where this
# torch has them: a file holding them beside its MLP is a valid file (the chain's own dtypes are checked
# when the MLP is read)
DTYPES |= {name: getattr(torch, attr) for name, attr in (
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
) if hasattr(torch, attr)}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def check_readable(path: Path) -> None:
    """Refuse paths that cannot be a safetensors checkpoint, with a hint how to fix it."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise FPEError(f"{path}: a symbolic link to nothing (its target is missing, or it points to itself)")
    if not path.exists():
        raise FPEError(f"{path}: no such file", missing_file_hint(path))
    if path.is_dir():
        raise FPEError(f"{path}: is a directory, expected a .safetensors file")
    if not path.is_file():  # a FIFO, a process substitution <(...), a device: reading could block forever
        raise FPEError(f"{path}: not a regular file (a pipe or a device)", "save it to a file first")


def _refuse_pickle(path: Path, head: bytes) -> None:
    """Called once the file failed to parse as safetensors: a torch.save file (a zip archive, or a bare
    pickle of protocol 2-5), or anything named like one, gets a message that says what it is and how
    to convert; a numpy .npz archive is named as such. (A valid safetensors file is read whatever its name.)"""
    if head.startswith(b"PK\x03\x04") and _is_npz(path):
        raise FPEError(f"{path}: a numpy .npz archive (a data set?), not a safetensors checkpoint",
                       "pass data sets with --data; save models with safetensors.torch.save_file(model.state_dict(), path)")
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5) \
            or path.suffix.lower() in PICKLE_SUFFIXES:
        raise FPEError(
            f"{path}: not a safetensors file: it looks like a torch.save / pickle file, which is refused "
            "(loading it can execute code)",
            "convert it once in trusted code: safetensors.torch.save_file(torch.load(p, weights_only=True), 'model.safetensors')",
        )


def _is_npz(path: Path) -> bool:
    """A zip whose members are all .npy arrays (numpy.savez); reads the zip directory only."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return bool(names) and all(n.endswith(".npy") for n in names)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json object hook: a key given twice is ambiguous (json keeps the last, other readers the first)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(dup)
    return out


class _DuplicateKey(ValueError):
    pass


def _refuse_other_formats(path: Path, head: bytes) -> None:
    """Called once a file failed to parse as safetensors: say what it is instead, if that can be told (a
    torch.save or pickle file, a numpy .npz, a shard index or another text file)."""
    _refuse_pickle(path, head)
    refuse_text(path)


def read_header(path: Path) -> tuple[dict, dict[str, str], int]:
    """Parse and validate the header: (tensor entries, metadata, offset of the data section)."""
    check_readable(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            _refuse_other_formats(path, head)
            raise FPEError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            _refuse_other_formats(path, head)
            raise FPEError(f"{path}: not a safetensors file or truncated (header claims {n} bytes, file has {size})")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except _DuplicateKey as exc:
        raise FPEError(f"{path}: corrupt safetensors header: duplicate key {exc.args[0]!r}") from None
    # ValueError: e.g. an integer of more than 4300 digits; RecursionError: absurdly deep nesting
    except (UnicodeDecodeError, *JSON_ERRORS):
        _refuse_other_formats(path, head)
        raise FPEError(f"{path}: not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        _refuse_other_formats(path, head)
        raise FPEError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata  # null is what safetensors itself accepts for "none"
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FPEError(f"{path}: __metadata__ must map strings to strings")
    _validate_entries(path, header, size - 8 - n)
    return header, metadata, 8 + n


MAX_NUMEL = (1 << 63) - 1  # torch sizes are int64


def _short(value, limit: int = 80) -> str:
    """repr of a header value, cut for an error message (a corrupt header can hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse_unknown_dtypes(path: Path, header: dict) -> None:
    """A dtype name fpe does not know (a newer safetensors' F4, say) is not corruption: say which tensor."""
    unknown = {name: entry["dtype"] for name, entry in header.items()
               if isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] not in DTYPES
               and re.fullmatch(r"[A-Z][A-Z0-9_]{0,15}", entry["dtype"])}
    if unknown:
        name = next(iter(unknown))
        more = f" (and {len(unknown) - 1} more tensor(s))" if len(unknown) > 1 else ""
        raise FPEError(f"{path}: tensor {name!r} has dtype {unknown[name]}, which fpe cannot read{more}; it reads "
                       f"{', '.join(DTYPES)}", "save that tensor in one of those dtypes, or leave it out of the file")


def _validate_entries(path: Path, header: dict, data_len: int) -> None:
    _refuse_unknown_dtypes(path, header)
    if "" in header:  # safetensors writes and reads it, but which layer it belongs to cannot be told
        raise FPEError(f"{path}: a tensor has an empty name (''); fpe cannot tell what it is or which layer it "
                       "belongs to", "give it a name (or leave it out) and save the file again")
    problems, spans, needed = [], [], 0
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            problems.append(f"{name}: entry lacks dtype/shape/data_offsets")
            continue
        dtype, shape, offs = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            problems.append(f"{name}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
            continue
        if not (isinstance(shape, list) and all(_is_int(s) and 0 <= s <= MAX_NUMEL for s in shape)):
            problems.append(f"{name}: bad shape {_short(shape)}")
            continue
        if math.prod(s for s in shape if s) > MAX_NUMEL:  # torch cannot even describe it (an empty one included)
            problems.append(f"{name}: shape {_short(shape)} has more elements than a tensor can hold")
            continue
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)):
            problems.append(f"{name}: bad data_offsets {_short(offs)}")
            continue
        begin, end = offs
        needed = max(needed, end)
        expected = math.prod(shape) * _itemsize(DTYPES[dtype])
        if not 0 <= begin <= end <= data_len:
            problems.append(f"{name}: data_offsets {offs} outside the data section of {data_len} bytes")
        elif end - begin != expected:
            problems.append(f"{name}: {end - begin} bytes for shape {shape} of {dtype} (expected {expected})")
        else:
            spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            problems.append(f"{n0} and {n1}: overlapping data_offsets")
    if needed > data_len:
        raise FPEError(f"{path}: truncated: its tensors need {needed} bytes of data but the file holds {data_len}",
                       "copy or save the checkpoint again")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise FPEError(f"{path}: corrupt safetensors header: {shown}")


READ_CHUNK = 1 << 24  # bytes per read (and hash update) while loading a file


def read_safetensors(path: Path, digest=None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor (validated first) and the metadata in one sequential pass over the file.

    `digest` (a hashlib object), when given, is fed every byte of the file as it is read: the hash is
    of exactly the bytes the tensors came from, without reading the file a second time. Tensors share
    one buffer (disjoint regions, so writing to one never changes another).
    """
    path = Path(path)
    header, metadata, data_start = read_header(path)
    needed = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    with open(path, "rb") as fh:
        head = fh.read(data_start)
        if digest is not None:
            digest.update(head)
        data = bytearray(needed)  # the tensors' bytes; anything after them is only hashed
        view, got = memoryview(data), 0
        while got < len(data) and (n := fh.readinto(view[got:got + READ_CHUNK])):
            if digest is not None:
                digest.update(view[got:got + n])
            got += n
        view.release()
        while digest is not None and (block := fh.read(READ_CHUNK)):
            digest.update(block)
    if len(head) != data_start or got != len(data):
        raise FPEError(f"{path}: truncated while reading (the file changed or shrank)")
    tensors = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        if end > len(data):
            raise FPEError(f"{path}: truncated while reading {name}")
        flat = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin) if end > begin \
            else torch.empty(0, dtype=torch.uint8)
        if begin % 16:  # keep every tensor aligned as its own allocation would be
            flat = flat.clone()
        tensors[name] = flat.view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return tensors, dict(metadata)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def encode_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """Canonical header bytes (length prefix included) and the order of the data section."""
    order = sorted(tensors)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in DTYPE_NAMES:
            raise FPEError(f"{name}: dtype {t.dtype} cannot be written to safetensors")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":"), sort_keys=False, ensure_ascii=True).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data section is 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, order


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      *, force: bool = False) -> int:
    """Write tensors canonically and atomically; returns the bytes written."""
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    head, order = encode_header(tensors, metadata)
    with atomic_output(path, force=force) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(head)
            for name in order:
                fh.write(_tensor_bytes(tensors[name]))
        size = tmp.stat().st_size  # the temp file's: inside outputs_together() it is published later
    return size
