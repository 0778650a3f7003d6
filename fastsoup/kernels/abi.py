"""The constants fastsoup's kernels and launchers share: the one Python copy.

The C copy is ``csrc/include/fastsoup_abi.h``; both compiled extensions export it as
``abi()`` and ``tests/kernels/test_abi.py`` holds the two equal. Torch-free: dtypes are
named by their safetensors names (``"F32"``), and :func:`dtype_code` also accepts a torch
dtype (by its name, so this module never imports torch).
"""
from __future__ import annotations

from typing import Dict

# ---------------------------------------------------------------- kernel dtype codes
F32, F16, BF16, F64 = 0, 1, 2, 3
DTYPE_CODES: Dict[str, int] = {"F32": F32, "F16": F16, "BF16": BF16, "F64": F64}
# dtypes the fused GPU kernels (Triton, CUDA) and the CPU MSE kernel take; F64 is the
# checking dtype (the PyTorch reference) except in the CPU weighted sum.
GPU_DTYPES = ("F32", "F16", "BF16")
_TORCH_NAMES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
                "torch.float64": "F64"}


def dtype_name(dtype) -> str:
    """``"F32"`` for ``torch.float32`` or ``"F32"``; KeyError for a dtype no kernel takes."""
    name = dtype if isinstance(dtype, str) else str(dtype)
    name = _TORCH_NAMES.get(name, name)
    if name not in DTYPE_CODES:
        raise KeyError(f"no fastsoup kernel takes dtype {dtype}")
    return name


def dtype_code(dtype) -> int:
    """The kernel code of a dtype given as a safetensors name or a torch dtype."""
    return DTYPE_CODES[dtype_name(dtype)]


# ---------------------------------------------------------------- block sizes
WEIGHTED_SUM_CUDA_BLOCK = 2048     # elements per block of the CUDA weighted-sum table
MSE_CUDA_CHUNK_QUANTUM = 1024      # CUDA per-sample MSE: row chunks are multiples of this
MAX_STRIDED_ROW = 2 ** 32 - 1      # CUDA row kernels: most elements of a strided row

# ---------------------------------------------------------------- ambient coefficient table
# One [B, 16] table of per-sample coefficients drives every ambient kernel: bilinear A at
# columns 0..5, B at 6..11, the row scale c_i at 12 (ℓ_i = c_i · mean(u v), exactly 0 where
# c_i = 0), the validity flag at 13 (samples counted by the mean); the row-linear map's
# C_mk at column 4m + k.
COEF_COLS = 16
COL_A, COL_B = 0, 6
COL_SCALE, COL_VALID = 12, 13
MAX_BILINEAR_INPUTS = 6
MAX_LINEAR_INPUTS = 4
MAX_LINEAR_OUTPUTS = 4
# Coefficient kinds, in the order of the Triton coefficient kernel's KIND constexpr.
COEF_KINDS = ("vp_x0", "vp_eps", "ve", "consistency_eps", "step", "step_eps")


def linear_col(m: int, k: int) -> int:
    """Column of the row-linear coefficient ``C_mk`` (output ``m``, input ``k``)."""
    return 4 * m + k


def c_values() -> Dict[str, int]:
    """The values the C header defines, keyed as the extensions' ``abi()`` reports them."""
    return {"F32": F32, "F16": F16, "BF16": BF16, "F64": F64,
            "WEIGHTED_SUM_CUDA_BLOCK": WEIGHTED_SUM_CUDA_BLOCK,
            "MSE_CUDA_CHUNK_QUANTUM": MSE_CUDA_CHUNK_QUANTUM, "MAX_STRIDED_ROW": MAX_STRIDED_ROW}
