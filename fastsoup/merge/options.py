"""Merge options."""
from __future__ import annotations

# Names accepted by --dtype / ``dtype=``.
USER_NAMES = {"fp32": "F32", "float32": "F32", "fp16": "F16", "float16": "F16", "half": "F16",
              "bf16": "BF16", "bfloat16": "BF16", "fp64": "F64", "float64": "F64"}


def user_dtype(name: str) -> str:
    """``"bf16"`` → ``"BF16"``; raises ValueError for a name --dtype does not accept."""
    key = name.strip().lower()
    if key not in USER_NAMES:
        raise ValueError(f"unknown output dtype {name!r} (choose fp32, fp16, bf16 or fp64)")
    return USER_NAMES[key]
