"""The safetensors writer of fastsoup.io: header layout and padding, the canonical
serializer (read back by the safetensors package and by our own reader), the dtype
table's kernel codes (from fastsoup.kernels.abi) and atomic file writes."""
import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load

from fastsoup.io import atomic
from fastsoup.io.safetensors import (DTYPES, TORCH_NAMES, encode_header, layout_header,
                                     parse_header, serialize, tensor_bytes, tensors_json)
from fastsoup.kernels import abi


def test_layout_header_places_tensors_back_to_back():
    obj, offsets = layout_header([("a", "F32", (2, 3), 24), ("b", "BF16", (0,), 0),
                                  ("c", "I64", (1,), 8)], {"k": "v"})
    assert offsets == {"a": 0, "b": 24, "c": 24}
    assert obj["c"] == {"dtype": "I64", "shape": [1], "data_offsets": [24, 32]}
    assert list(obj) == ["__metadata__", "a", "b", "c"]
    assert "__metadata__" not in layout_header([], None)[0]


def _both_writers(monkeypatch, compiled: bool):
    """``tensors_json`` through ``fastsoup._C.tensors_json`` or the Python loop."""
    from fastsoup.io import safetensors as sf

    ext = sf._ext.cpu_ext(warn=False)
    if compiled and getattr(ext, "tensors_json", None) is None:
        pytest.skip("fastsoup._C is not built")
    if not compiled:
        monkeypatch.setattr(sf._ext, "cpu_ext", lambda warn=False: None)


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("keys", [[], ["a"], ["é\"q\\", "tab\tnl\n\x01\x1f\x7f\b\f\r", "\u2028 𝄞",
                                              "model.layers.0.w"]])
def test_tensors_json_is_the_text_json_dumps_writes(keys, compiled, monkeypatch):
    _both_writers(monkeypatch, compiled)
    entries = [(k, ["F32", "BF16", "I64"][i % 3], tuple(range(i % 3)), 4 * i) for i, k in enumerate(keys)]
    entries += [(k + "#2", "F32", [1, 2], 8) for k in keys]  # repeated shapes, given as lists
    entries += [(k + "#3", "F32", (2**40, 0), 0) for k in keys]  # large dims, nothing stored
    obj, offsets = layout_header(entries, None)
    text, pos = tensors_json(entries)
    assert text == json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    assert pos == [offsets[e[0]] for e in entries]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(st.characters(blacklist_categories=("Cs",)), max_size=6),
                          st.sampled_from(["F32", "BF16", "I64"]),
                          st.lists(st.integers(0, 2**40), max_size=3), st.integers(0, 2**40)),
                max_size=5, unique_by=lambda e: e[0]))
def test_property_compiled_tensors_json_is_the_python_text(entries):
    from fastsoup.io import safetensors as sf

    write = getattr(sf._ext.cpu_ext(warn=False), "tensors_json", None)
    if write is None:
        return
    entries = [(k, d, tuple(s), n) for k, d, s, n in entries]
    obj, offsets = layout_header(entries, None)
    text, pos = write(entries)
    assert text == json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    assert pos == [offsets[e[0]] for e in entries]


@pytest.mark.parametrize("reserve", [0, 8, 40, 101])
def test_encode_header_pads_to_eight_and_to_the_reserve(reserve):
    blob = encode_header({"__metadata__": {"x": "é"}}, reserve=reserve)
    n = int.from_bytes(blob[:8], "little")
    assert len(blob) == 8 + n and len(blob) % 8 == 0 and len(blob) >= reserve
    assert json.loads(blob[8:].decode()) == {"__metadata__": {"x": "é"}}
    assert b"\\u00e9" in encode_header({"x": "é"}, canonical=True)


def test_serialize_is_canonical_and_readable():
    g = torch.Generator().manual_seed(0)
    tensors = {"z": torch.randn(3, 4, generator=g).t(), "a": torch.arange(5),
               "m": torch.randn(2, generator=g).bfloat16(), "e": torch.zeros(0, 2),
               "f": torch.tensor([True, False])}
    blob = serialize(tensors, {"b": "2", "a": "1"})
    assert blob == serialize(dict(reversed(list(tensors.items()))), {"a": "1", "b": "2"})
    back = load(blob)
    assert sorted(back) == sorted(tensors)
    for k, t in tensors.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t)
    header = parse_header(blob, len(blob))
    assert header.metadata == {"a": "1", "b": "2"}
    assert list(header.tensors) == sorted(tensors)  # laid out in key order
    assert (8 + int.from_bytes(blob[:8], "little")) % 8 == 0  # data section 8-aligned


def test_serialize_refuses_dtypes_safetensors_cannot_store():
    with pytest.raises(TypeError, match="cannot store x"):
        serialize({"x": torch.zeros(2, dtype=torch.complex64)}, {})


def test_tensor_bytes_are_the_raw_little_endian_bytes():
    t = torch.tensor([1.0, -2.0], dtype=torch.float32)
    assert tensor_bytes(t) == t.numpy().tobytes() and tensor_bytes(torch.zeros(0)) == b""


def test_dtype_table_kernel_codes_come_from_the_abi():
    for name, d in DTYPES.items():
        assert d.kernel_code == abi.DTYPE_CODES.get(name)
    assert {d.kernel_code for d in DTYPES.values()} - {None} == set(abi.DTYPE_CODES.values())
    assert set(TORCH_NAMES.values()) == set(DTYPES)
    for torch_name, name in TORCH_NAMES.items():
        dtype = getattr(torch, torch_name[len("torch."):])
        assert torch.empty(0, dtype=dtype).element_size() == DTYPES[name].itemsize


def test_atomic_write_file_replaces_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "bank.safetensors"
    path.write_bytes(b"old")
    atomic.atomic_write_file(str(path), b"new")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["bank.safetensors"]
    assert os.stat(path).st_mode & 0o777 == atomic.FILE_MODE

    def broken(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", broken)
    with pytest.raises(OSError):
        atomic.atomic_write_file(str(path), b"newer")
    assert path.read_bytes() == b"new" and os.listdir(tmp_path) == ["bank.safetensors"]
