"""The Python copy of the shared kernel constants (fastsoup/kernels/abi.py) equals the C
copy (csrc/include/fastsoup_abi.h) that each compiled extension was built with, and the
header itself says what abi.py says (so a change to one without the other fails here even
where no extension is built)."""
import os
import re

import pytest

from fastsoup.kernels import _ext, abi

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEADER = os.path.join(ROOT, "csrc", "include", "fastsoup_abi.h")


def _header_values():
    text = open(HEADER).read()
    values = {m.group(1): int(m.group(2)) for m in re.finditer(r"FASTSOUP_(\w+)\s*=\s*(\d+)", text)}
    values.update({m.group(1): int(m.group(2))
                   for m in re.finditer(r"#define FASTSOUP_(\w+)\s+(\d+)", text)})
    return values


def test_header_matches_python():
    assert _header_values() == abi.c_values()


def test_cpu_extension_matches_python():
    ext = _ext.cpu_ext(warn=False)
    if ext is None:
        pytest.skip(f"fastsoup._C not built ({_ext.load_error('_C')})")
    assert dict(ext.abi()) == abi.c_values()


def test_cuda_extension_matches_python():
    ext = _ext.cuda_ext(warn=False)
    if ext is None:
        pytest.skip(f"fastsoup._cuda not built ({_ext.load_error('_cuda')})")
    assert dict(ext.abi()) == abi.c_values()


def test_dtype_codes_accept_torch_dtypes_and_names():
    torch = pytest.importorskip("torch")
    assert abi.dtype_code(torch.bfloat16) == abi.dtype_code("BF16") == abi.BF16
    with pytest.raises(KeyError):
        abi.dtype_code(torch.int64)
