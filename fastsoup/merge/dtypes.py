"""The safetensors dtype table: byte sizes, numpy views and the ``_C`` kernel codes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str            # safetensors name, e.g. "BF16"
    itemsize: int        # bytes per element
    kind: str            # "float", "int", "bool"
    kernel_code: Optional[int]  # fastsoup._C weighted_sum code, None if it cannot be averaged
    numpy: str           # numpy dtype used to view raw bytes ("<u2" for bf16)


_TABLE = [
    DType("F64", 8, "float", 3, "<f8"),
    DType("F32", 4, "float", 0, "<f4"),
    DType("F16", 2, "float", 1, "<f2"),
    DType("BF16", 2, "float", 2, "<u2"),
    DType("F8_E4M3", 1, "float", None, "u1"),
    DType("F8_E5M2", 1, "float", None, "u1"),
    DType("I64", 8, "int", None, "<i8"),
    DType("I32", 4, "int", None, "<i4"),
    DType("I16", 2, "int", None, "<i2"),
    DType("I8", 1, "int", None, "i1"),
    DType("U64", 8, "int", None, "<u8"),
    DType("U32", 4, "int", None, "<u4"),
    DType("U16", 2, "int", None, "<u2"),
    DType("U8", 1, "int", None, "u1"),
    DType("BOOL", 1, "bool", None, "u1"),
]
DTYPES: Dict[str, DType] = {d.name: d for d in _TABLE}

# Names accepted by --dtype, and the torch dtype names used by pickle inputs.
USER_NAMES = {"fp32": "F32", "float32": "F32", "fp16": "F16", "float16": "F16", "half": "F16",
              "bf16": "BF16", "bfloat16": "BF16", "fp64": "F64", "float64": "F64"}
TORCH_NAMES = {
    "torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16",
    "torch.bfloat16": "BF16", "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
    "torch.uint8": "U8", "torch.uint16": "U16", "torch.uint32": "U32", "torch.uint64": "U64",
    "torch.bool": "BOOL",
}


def user_dtype(name: str) -> str:
    """``"bf16"`` → ``"BF16"``; raises ValueError for a name --dtype does not accept."""
    key = name.strip().lower()
    if key not in USER_NAMES:
        raise ValueError(f"unknown output dtype {name!r} (choose fp32, fp16, bf16 or fp64)")
    return USER_NAMES[key]


def np_view(buf, dtype: str) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.dtype(DTYPES[dtype].numpy))
