"""Parsing of safetensors headers, treating every byte as hostile.

A safetensors file is ``u64 little-endian N`` + ``N`` bytes of JSON + raw tensor data.
:func:`parse_header` checks, before any tensor data is trusted:

* the file holds the 8-byte length and the ``N`` header bytes (``N`` ≤ ``max_header``);
* the header is UTF-8 JSON, an object, without duplicate keys;
* ``__metadata__`` (optional) maps strings to strings;
* every tensor entry has a known ``dtype``, a ``shape`` of non-negative integers and
  ``data_offsets [begin, end]`` with ``begin ≤ end``;
* ``prod(shape) × itemsize == end − begin`` (the byte length matches dtype × shape);
* every range lies inside the file's data section and no two ranges overlap.

Offsets are relative to the start of the data section (``8 + N``), as in the format.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from .dtypes import DTYPES
from .errors import HeaderError

MAX_HEADER_BYTES = 100 * 1000 * 1000  # the limit the safetensors library uses


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a file: dtype name, shape, byte range relative to the data section."""

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

    def absolute(self, key: str) -> Tuple[int, int]:
        t = self.tensors[key]
        return self.data_start + t.begin, self.data_start + t.end


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise HeaderError(f"duplicate key {k!r} in the JSON header")
        out[k] = v
    return out


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


INT64_MAX = 2**63 - 1


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
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise fail(f"the header is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
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
    for key, entry in obj.items():
        if not key:
            raise fail("empty tensor name")
        if not encodable(key):
            raise fail(f"tensor name {key.encode('utf-8', 'backslashreplace').decode()!r} holds a "
                       "lone surrogate escape (not valid Unicode)")
        if not isinstance(entry, dict):
            raise fail(f"tensor {key!r}: entry is not an object")
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise fail(f"tensor {key!r}: unknown dtype {dtype!r} "
                       f"(known: {', '.join(sorted(DTYPES))})")
        if not isinstance(shape, list) or not all(_is_int(s) and s >= 0 for s in shape):
            raise fail(f"tensor {key!r}: shape must be a list of non-negative integers, "
                       f"got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_int(o) and o >= 0 for o in offsets)):
            raise fail(f"tensor {key!r}: data_offsets must be [begin, end] non-negative "
                       f"integers, got {offsets!r}")
        itemsize = DTYPES[dtype].itemsize
        extent = itemsize
        for d in shape:  # zero-sized dimensions do not excuse others that overflow
            extent *= max(d, 1)
        if any(d > INT64_MAX for d in shape) or extent > INT64_MAX:
            raise fail(f"tensor {key!r}: shape {shape!r} overflows a 64-bit element count or "
                       "byte size")
        begin, end = offsets
        if begin > end:
            raise fail(f"tensor {key!r}: data_offsets begin {begin} > end {end}")
        info = TensorInfo(dtype, tuple(shape), begin, end)
        expected = info.numel * DTYPES[dtype].itemsize
        if expected != end - begin:
            raise fail(f"tensor {key!r}: {dtype} {list(shape)} needs {expected} bytes but "
                       f"data_offsets [{begin}, {end}] hold {end - begin}")
        if end > data_len:
            raise fail(f"tensor {key!r}: data_offsets [{begin}, {end}] run past the end of "
                       f"the data section ({data_len} bytes): truncated file?")
        tensors[key] = info

    ordered = sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    prev_key, prev_end = None, 0
    for key, info in ordered:
        if info.nbytes == 0:
            continue
        if info.begin < prev_end:
            raise fail(f"tensors {prev_key!r} and {key!r} overlap (byte {info.begin} < "
                       f"{prev_end})")
        prev_key, prev_end = key, info.end
    return Header(path=path, file_size=file_size, data_start=data_start,
                  tensors=dict(ordered), metadata=metadata, raw=raw)


def read_header(path: str, max_header: int = MAX_HEADER_BYTES) -> Header:
    """Read and validate the header of the safetensors file at ``path`` (no data read)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
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
    return parse_header(prefix, size, path=path, max_header=max_header)
