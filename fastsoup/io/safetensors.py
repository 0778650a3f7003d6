"""The safetensors format: the one dtype table, header reader and header/file writer.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON + raw tensor data;
tensor ``data_offsets`` are relative to the start of the data section (``8 + N``).

Reading (:func:`read_header`, :func:`parse_header`) treats every byte as hostile and
checks, before any tensor data is trusted:

* the file holds the 8-byte length and the ``N`` header bytes (``N`` ≤ ``max_header``);
* the header is UTF-8 JSON, an object, without duplicate keys;
* ``__metadata__`` (optional) maps strings to strings;
* every tensor entry has a known ``dtype``, a ``shape`` of non-negative integers and
  ``data_offsets [begin, end]`` with ``begin ≤ end``;
* ``prod(shape) × itemsize == end − begin`` (the byte length matches dtype × shape);
* every range lies inside the file's data section and no two ranges overlap;
* the ranges cover the data section exactly: no gap between tensors, no trailing bytes.

The last rule matches the ``safetensors`` library (its readers refuse such files), so
fastsoup never accepts, hashes or averages a file the format's own readers reject, and
bytes outside every tensor cannot hide in an input. :func:`read_header` also records the
file's identity (device, inode, size, mtime, ctime: :attr:`Header.identity`) from the
descriptor it read the header through, so later readers can tell whether the file they
read is the one that was validated.

Writing: :func:`layout_header` lays tensors out back to back and :func:`encode_header`
serialises the JSON padded to a multiple of 8 bytes (the merge engine's pre-sized files
reserve header space this way); :func:`serialize` builds a whole file from torch tensors
with a canonical header (sorted keys: identical inputs give identical bytes).

Kernel dtype codes come from :mod:`fastsoup.kernels.abi` (the one copy). Importing this
module imports neither torch nor numpy.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools
import json
import math
import operator
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, NamedTuple, Optional, Tuple

from ..kernels import _ext
from ..kernels.abi import DTYPE_CODES


class HeaderError(ValueError):
    """A safetensors header is malformed or inconsistent with its file."""


# ------------------------------------------------------------------------- dtype table
@dataclass(frozen=True)
class DType:
    name: str            # safetensors name, e.g. "BF16"
    itemsize: int        # bytes per element
    kind: str            # "float", "int", "bool"

    @property
    def kernel_code(self) -> Optional[int]:
        """The ``_C``/CUDA kernel code (:mod:`fastsoup.kernels.abi`), None if no kernel
        averages this dtype."""
        return DTYPE_CODES.get(self.name)


_TABLE = [
    DType("F64", 8, "float"),
    DType("F32", 4, "float"),
    DType("F16", 2, "float"),
    DType("BF16", 2, "float"),
    DType("F8_E4M3", 1, "float"),
    DType("F8_E5M2", 1, "float"),
    DType("I64", 8, "int"),
    DType("I32", 4, "int"),
    DType("I16", 2, "int"),
    DType("I8", 1, "int"),
    DType("U64", 8, "int"),
    DType("U32", 4, "int"),
    DType("U16", 2, "int"),
    DType("U8", 1, "int"),
    DType("BOOL", 1, "bool"),
]
DTYPES: Dict[str, DType] = {d.name: d for d in _TABLE}
ITEMSIZE: Dict[str, int] = {d.name: d.itemsize for d in _TABLE}  # bytes per element, by name

# torch dtype (by its ``str``) → safetensors name: pickle inputs and :func:`serialize`.
TORCH_NAMES = {
    "torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16",
    "torch.bfloat16": "BF16", "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
    "torch.uint8": "U8", "torch.uint16": "U16", "torch.uint32": "U32", "torch.uint64": "U64",
    "torch.bool": "BOOL",
}


# ------------------------------------------------------------------------- reading
MAX_HEADER_BYTES = 100 * 1000 * 1000  # the limit the safetensors library uses


class TensorInfo(NamedTuple):
    """One tensor of a file: dtype name, shape, byte range relative to the data section.
    (A named tuple: checkpoints hold tens of thousands of these, built in bulk.)"""

    dtype: str
    shape: Tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass
class Header:
    """A validated header. ``data_start`` is the absolute file offset of the data section."""

    path: str
    file_size: int
    data_start: int
    tensors: Dict[str, TensorInfo]
    metadata: Optional[Dict[str, str]]
    raw: bytes = field(repr=False, default=b"")
    identity: Optional[Tuple[int, int, int, int, int]] = None  # see file_identity()

    def absolute(self, key: str) -> Tuple[int, int]:
        t = self.tensors[key]
        return self.data_start + t.begin, self.data_start + t.end


def _no_duplicates(pairs):
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: find the key for the message
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise HeaderError(f"duplicate key {k!r} in the JSON header")
            seen.add(k)
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


INT64_MAX = 2**63 - 1


def file_identity(st: os.stat_result) -> Tuple[int, int, int, int, int]:
    """``(device, inode, size, mtime_ns, ctime_ns)`` of a ``stat`` result: what changes when
    a file is replaced, truncated or written (the ctime cannot be set back by a user)."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)




def _parse_fast(text: str, data_start: int, data_len: int):
    """The tensors and metadata of a well-formed header, checked with bulk operations
    (tens of thousands of entries in a few tens of milliseconds), or None: then
    :func:`parse_header`'s entry-by-entry pass decides, and names the problem. Only a
    header that passes every rule of the module docstring is accepted here.

    Duplicate keys: ``json.loads`` keeps the last of duplicates, so the pairs the text
    holds are counted instead. Outside strings, a ``:`` separates a key from its value;
    without ``\\u`` escapes every other ``:`` of the text is one of the parsed strings'.
    The text holds a duplicate exactly when its pairs outnumber the parsed objects'."""
    if "\\u" in text:  # escapes may spell ':' or lone surrogates: the careful pass
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if type(obj) is not dict:
        return None
    metadata = obj.pop("__metadata__", None)
    pairs = len(obj)
    colons = 0
    if metadata is not None:
        if type(metadata) is not dict or not all(
                type(k) is str and type(v) is str for k, v in metadata.items()):
            return None
        pairs += 1 + len(metadata)
        colons += sum(k.count(":") + v.count(":") for k, v in metadata.items())
    if not obj or "" in obj:
        return None
    entries = list(obj.values())
    if set(map(type, entries)) != {dict} or set(map(len, entries)) != {3}:
        return None
    dtypes = [e.get("dtype") for e in entries]
    shapes = [e.get("shape") for e in entries]
    offsets = [e.get("data_offsets") for e in entries]
    try:
        if not set(dtypes) <= ITEMSIZE.keys():
            return None
    except TypeError:  # an unhashable dtype
        return None
    if set(map(type, shapes)) != {list} or set(map(type, offsets)) != {list} \
            or set(map(len, offsets)) != {2}:
        return None
    dims = [d for s in shapes for d in s]
    if dims and (set(map(type, dims)) != {int} or min(dims) < 0):
        return None
    begins = [o[0] for o in offsets]
    ends = [o[1] for o in offsets]
    if set(map(type, begins)) | set(map(type, ends)) != {int} or min(begins) < 0:
        return None
    pairs += 3 * len(entries)
    colons += sum(k.count(":") for k in obj)
    if text.count(":") - colons != pairs:
        return None  # a duplicate key somewhere: the careful pass names it
    numels = list(map(math.prod, shapes))
    nbytes = list(map(operator.mul, numels, map(ITEMSIZE.__getitem__, dtypes)))
    if max(nbytes) > INT64_MAX or 0 in numels and any(
            _extent(s, ITEMSIZE[d]) > INT64_MAX for s, d, k in zip(shapes, dtypes, numels)
            if k == 0):
        return None
    if list(map(operator.sub, ends, begins)) != nbytes or max(ends) > data_len:
        return None
    keys = list(obj)
    if not all(map(operator.lt, begins[:-1], begins[1:])):  # not written in offset order
        order = sorted(range(len(keys)), key=list(zip(begins, ends)).__getitem__)
        keys = [keys[i] for i in order]
        shapes = [shapes[i] for i in order]
        dtypes = [dtypes[i] for i in order]
        begins = [begins[i] for i in order]
        ends = [ends[i] for i in order]
    # back to back from byte 0 to the end of the data section: no gap, overlap or tail
    if begins[0] != 0 or ends[-1] != data_len or begins[1:] != ends[:-1]:
        return None
    return dict(zip(keys, _infos(dtypes, map(tuple, shapes), begins, ends))), metadata


def _infos(dtypes, shapes, begins, ends):
    """:class:`TensorInfo` of each column entry, through ``tuple.__new__`` in C (not the
    named tuple's Python ``__new__``, per entry)."""
    return itertools.starmap(tuple.__new__, zip(
        itertools.repeat(TensorInfo), zip(dtypes, shapes, begins, ends)))


def _parse_columns(raw: bytes, data_len: int):
    """The tensors and metadata of a header in the canonical compact form the safetensors
    writers produce (no whitespace but the trailing padding, no escapes, each entry's
    fields in the order dtype, shape, data_offsets, tensors in offset order), read in one
    compiled pass (``fastsoup._C.header_columns``: no JSON objects per entry); None when
    the extension is missing or the header is not in that form or breaks a rule: then
    :func:`_parse_fast` and the careful pass decide."""
    scan = getattr(_ext.cpu_ext(warn=False), "header_columns", None)
    if scan is None:
        return None
    cols = scan(raw, ITEMSIZE, data_len)
    if cols is None:
        return None
    keys, dtypes, shapes, begins, ends, span = cols
    metadata = None
    if span is not None:  # a flat object of strings without escapes (checked by the scan)
        text = raw[span[0]:span[1]].decode("utf-8")
        metadata = json.loads(text)
        inner = sum(k.count(":") + v.count(":") for k, v in metadata.items())
        if text.count(":") - inner != len(metadata):
            return None  # a duplicate metadata key: the careful pass names it
    tensors = dict(zip(keys, _infos(dtypes, shapes, begins, ends)))
    if len(tensors) != len(keys):
        return None  # a duplicate key: the careful pass names it
    return tensors, metadata


def _extent(shape, itemsize: int) -> int:
    """Bytes the shape would span if its zero-sized dimensions were 1 (an overflow check:
    zero-sized dimensions do not excuse others that overflow)."""
    extent = itemsize
    for d in shape:
        extent *= d if d > 1 else 1
    return extent


_SHARED: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar(
    "fastsoup_shared_headers", default=None)


@contextlib.contextmanager
def shared_headers():
    """Within this context, a header byte for byte equal to one parsed before in it (files
    of the same size) is not parsed again: its :class:`Header` shares the first one's
    ``tensors`` mapping (read-only for every user). Fine-tunes saved by one tool carry
    identical headers; a merge of many checkpoints of 10⁵ tensors parses one."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def parse_header(prefix: bytes, file_size: int, path: str = "<bytes>",
                 max_header: int = MAX_HEADER_BYTES) -> Header:
    """Validate the header held in ``prefix`` (the first ``8 + N`` bytes or more of a file
    of ``file_size`` bytes). Raises :class:`HeaderError` naming ``path`` and the problem."""

    def fail(msg: str) -> HeaderError:
        return HeaderError(f"{path}: {msg}")

    if file_size < 8 or len(prefix) < 8:
        raise fail(f"truncated file: {file_size} bytes, a safetensors file starts with an "
                   "8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > max_header:
        raise fail(f"header length {n} bytes exceeds the limit of {max_header} bytes")
    if 8 + n > file_size:
        raise fail(f"header length {n} bytes runs past the end of the file "
                   f"({file_size} bytes): truncated or not a safetensors file")
    if len(prefix) < 8 + n:
        raise fail(f"only {len(prefix)} header bytes available, need {8 + n}")
    raw = bytes(prefix[8:8 + n])
    if n == 0 or raw[:1] != b"{":
        raise fail("the header is not a JSON object (must start with '{')")
    shared = _SHARED.get()
    known = shared.get((file_size, raw)) if shared is not None else None
    if known is not None:  # the same bytes were validated already: the same result
        tensors, metadata = known
        return Header(path=path, file_size=file_size, data_start=8 + n, tensors=tensors,
                      metadata=None if metadata is None else dict(metadata), raw=raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"the header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    fast = _parse_columns(raw, file_size - 8 - n) or _parse_fast(text, 8 + n, file_size - 8 - n)
    if fast is not None:
        tensors, metadata = fast
        if shared is not None:
            shared[(file_size, raw)] = (tensors, None if metadata is None else dict(metadata))
        return Header(path=path, file_size=file_size, data_start=8 + n, tensors=tensors,
                      metadata=metadata, raw=raw)
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicates)
    except HeaderError as exc:
        raise fail(str(exc)) from None
    except (ValueError, RecursionError) as exc:
        raise fail(f"the header is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise fail("the header is not a JSON object")

    data_start = 8 + n
    data_len = file_size - data_start
    metadata = obj.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise fail("__metadata__ must map strings to strings")

    def encodable(text: str) -> bool:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True

    if metadata is not None and not all(encodable(k) and encodable(v)
                                        for k, v in metadata.items()):
        raise fail("__metadata__ holds a lone surrogate escape (not valid Unicode)")
    tensors: Dict[str, TensorInfo] = {}
    # lone surrogates can only come from JSON \u escapes: check the names only if there are any
    check_names = "\\u" in text
    for key, entry in obj.items():
        if not key:
            raise fail("empty tensor name")
        if check_names and not encodable(key):
            raise fail(f"tensor name {key.encode('utf-8', 'backslashreplace').decode()!r} holds a "
                       "lone surrogate escape (not valid Unicode)")
        if type(entry) is not dict:
            if not isinstance(entry, dict):
                raise fail(f"tensor {key!r}: entry is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        spec = DTYPES.get(dtype) if type(dtype) is str else None
        if spec is None:
            raise fail(f"tensor {key!r}: unknown dtype {dtype!r} "
                       f"(known: {', '.join(sorted(DTYPES))})")
        if type(shape) is not list:
            shape_ok = False
        else:
            shape_ok = True
            for d in shape:  # ints (never bools), non-negative
                if type(d) is not int or d < 0:
                    shape_ok = False
                    break
        if not shape_ok:
            raise fail(f"tensor {key!r}: shape must be a list of non-negative integers, "
                       f"got {shape!r}")
        if (type(offsets) is not list or len(offsets) != 2
                or type(offsets[0]) is not int or type(offsets[1]) is not int
                or offsets[0] < 0 or offsets[1] < 0):
            raise fail(f"tensor {key!r}: data_offsets must be [begin, end] non-negative "
                       f"integers, got {offsets!r}")
        itemsize = spec.itemsize
        numel = math.prod(shape)
        if _extent(shape, itemsize) > INT64_MAX:  # any dimension > INT64_MAX makes the extent overflow too
            raise fail(f"tensor {key!r}: shape {shape!r} overflows a 64-bit element count or "
                       "byte size")
        begin, end = offsets
        if begin > end:
            raise fail(f"tensor {key!r}: data_offsets begin {begin} > end {end}")
        expected = numel * itemsize
        if expected != end - begin:
            raise fail(f"tensor {key!r}: {dtype} {list(shape)} needs {expected} bytes but "
                       f"data_offsets [{begin}, {end}] hold {end - begin}")
        if end > data_len:
            raise fail(f"tensor {key!r}: data_offsets [{begin}, {end}] run past the end of "
                       f"the data section ({data_len} bytes): truncated file?")
        tensors[key] = TensorInfo(dtype, tuple(shape), begin, end)

    ordered = sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    prev_key, prev_end = None, 0
    for key, info in ordered:
        if info.nbytes == 0:
            continue
        if info.begin < prev_end:
            raise fail(f"tensors {prev_key!r} and {key!r} overlap (byte {info.begin} < "
                       f"{prev_end})")
        prev_key, prev_end = key, info.end
    pos, prev_key = 0, None
    for key, info in ordered:  # no gaps, no trailing bytes (the safetensors library's rule)
        if info.begin != pos:
            after = f"after tensor {prev_key!r}" if prev_key is not None else "at its start"
            raise fail(f"tensor {key!r}: data_offsets [{info.begin}, {info.end}] leave bytes "
                       f"{pos}..{info.begin} of the data section {after} unused; the "
                       "safetensors format stores tensors back to back and its readers "
                       "refuse gaps")
        pos, prev_key = info.end, key
    if pos != data_len:
        raise fail(f"{data_len - pos} trailing bytes after the last tensor (the data section "
                   f"holds {data_len} bytes, the tensors {pos}); the safetensors format's "
                   "readers refuse them")
    return Header(path=path, file_size=file_size, data_start=data_start,
                  tensors=dict(ordered), metadata=metadata, raw=raw)


def read_header(path: str, max_header: int = MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of the safetensors file at ``path`` (no data read)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            head = f.read(8)
            prefix = head
            if len(head) == 8:
                (n,) = struct.unpack("<Q", head)
                if n <= max_header and 8 + n <= size:
                    prefix = head + f.read(n)
    except IsADirectoryError:
        raise HeaderError(f"{path}: is a directory, expected a .safetensors file") from None
    except OSError as exc:
        raise HeaderError(f"{path}: cannot read ({exc.strerror or exc})") from None
    header = parse_header(prefix, size, path=path, max_header=max_header)
    header.identity = file_identity(st)
    return header


# ------------------------------------------------------------------------- writing
def layout_header(tensors: Iterable[Tuple[str, str, Tuple[int, ...], int]],
                  metadata: Optional[Mapping[str, str]]) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """The header object for ``(key, dtype, shape, nbytes)`` tensors stored back to back in
    the given order, and each tensor's offset in the data section. ``__metadata__`` is
    included when ``metadata`` is not None."""
    obj: Dict[str, Any] = {}
    if metadata is not None:
        obj["__metadata__"] = dict(metadata)
    offsets: Dict[str, int] = {}
    pos = 0
    for key, dtype, shape, nbytes in tensors:
        obj[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        offsets[key] = pos
        pos += nbytes
    return obj, offsets


def tensors_json(tensors: Iterable[Tuple[str, str, Tuple[int, ...], int]]) -> Tuple[str, List[int]]:
    """The JSON object :func:`layout_header` builds for ``(key, dtype, shape, nbytes)``
    tensors (no ``__metadata__``), as the text ``json.dumps(obj, separators=(",", ":"),
    ensure_ascii=False)`` writes, and each tensor's offset: written as text, without the
    intermediate objects (a header of 10⁵ tensors in a fraction of the time), by
    ``fastsoup._C.tensors_json`` when the extension is built."""
    write = getattr(_ext.cpu_ext(warn=False), "tensors_json", None)
    if write is not None:  # takes any iterable of 4-tuples
        return write(tensors)
    enc = json.encoder.encode_basestring
    parts = []
    offsets = []
    pos = 0
    head: Dict[tuple, str] = {}  # (dtype, shape) -> the entry's text up to its offsets
    for key, dtype, shape, nbytes in tensors:
        shape = tuple(shape)
        mid = head.get((dtype, shape))
        if mid is None:  # checkpoints repeat a few shapes many times
            mid = head[(dtype, shape)] = (f':{{"dtype":{enc(dtype)},"shape":['
                                          f'{",".join(map(str, shape))}],"data_offsets":[')
        parts.append(f"{enc(key)}{mid}{pos},{pos + nbytes}]}}")
        offsets.append(pos)
        pos += nbytes
    return "{" + ",".join(parts) + "}", offsets


def encode_header(obj: Mapping[str, Any], reserve: int = 0, canonical: bool = False) -> bytes:
    """8-byte length + JSON of ``obj``, padded with spaces to a multiple of 8 bytes and to
    at least ``reserve`` bytes in all. ``canonical``: sorted keys, ASCII only (the bytes
    depend on nothing but the content); else insertion order and UTF-8."""
    text = json.dumps(obj, separators=(",", ":"), sort_keys=canonical,
                      ensure_ascii=canonical).encode("utf-8")
    n = max(len(text), reserve - 8)
    n += (-(8 + n)) % 8
    text += b" " * (n - len(text))
    return len(text).to_bytes(8, "little") + text


def tensor_bytes(t) -> bytes:
    """The raw little-endian bytes of a torch tensor (detached, on the CPU, contiguous)."""
    import torch

    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def serialize(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> bytes:
    """A safetensors file of torch tensors as bytes, with a canonical header.

    Tensors are laid out in sorted key order; ``__metadata__`` is written with sorted keys
    (the ``safetensors`` package's writer orders its entries arbitrarily). Identical
    inputs give identical bytes. Raises TypeError for a dtype safetensors cannot store.
    """
    entries, blobs = [], []
    for key in sorted(tensors):
        t = tensors[key]
        name = TORCH_NAMES.get(str(t.dtype))
        if name is None:
            raise TypeError(f"cannot store {key} of dtype {t.dtype} in safetensors")
        data = tensor_bytes(t)
        entries.append((key, name, tuple(t.shape), len(data)))
        blobs.append(data)
    obj, _ = layout_header(entries, dict(sorted(metadata.items())))
    return encode_header(obj, canonical=True) + b"".join(blobs)
