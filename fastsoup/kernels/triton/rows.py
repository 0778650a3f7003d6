"""``@triton.jit`` helpers shared by the row kernels: element offsets of a
:class:`fastsoup.kernels.layout.RowLayout` row (int64) and fp32 loads through them."""
import triton
import triton.language as tl


@triton.jit
def inner_offsets(j, s1, s2, s3, S2, S3, DENSE: tl.constexpr):
    """Offset of element ``j`` of a row with inner strides ``(s1, s2, s3)`` and sizes
    ``(·, S2, S3)``; a dense row is just ``j * s3``."""
    if DENSE:
        return j * s3
    i3 = j % S3
    q = j // S3
    i2 = q % S2
    i1 = q // S2
    return i1 * s1 + i2 * s2 + i3 * s3


@triton.jit
def row_offsets(row, sb, s1, s2, s3, j, S2, S3, DENSE: tl.constexpr):
    """Offset of element ``j`` of sample ``row`` (batch stride ``sb``)."""
    return row * sb + inner_offsets(j, s1, s2, s3, S2, S3, DENSE)


@triton.jit
def load_f32(ptr, row, sb, s1, s2, s3, j, mask, S2, S3, DENSE: tl.constexpr):
    """Masked load of element ``j`` of sample ``row`` (0 where masked), as fp32."""
    return tl.load(ptr + row_offsets(row, sb, s1, s2, s3, j, S2, S3, DENSE),
                   mask=mask, other=0.0).to(tl.float32)
