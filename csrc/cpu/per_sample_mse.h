// Per-sample mean squared error on the CPU, fused (no torch headers).
//
// Rows are dense: sample b's D elements start at base + b * row_stride (elements) and
// are contiguous. Dtype codes are fastsoup::ws::DType (F32, F16, BF16). Squares are
// summed in fp32 within blocks of 2048 elements (8 independent lanes) and the block sums
// in fp64, so results do not depend on the thread count.
#pragma once

#include <cstdint>

namespace fastsoup {
namespace mse {

// out[b] = mean_j (pred[b, j] - target[b, j])^2 for b in [0, B).
void forward(const void* pred, int pred_dtype, int64_t pred_row_stride,
             const void* target, int target_dtype, int64_t target_row_stride,
             float* out, int64_t B, int64_t D, int threads);

// g = coef[b] * (pred - target) (exact 0 where coef[b] == 0);
// grad_pred = g (if not null, pred's dtype), grad_target = -g (if not null, target's dtype).
// Gradients are dense rows with the given row strides.
void backward(const void* pred, int pred_dtype, int64_t pred_row_stride,
              const void* target, int target_dtype, int64_t target_row_stride,
              const float* coef, void* grad_pred, int64_t grad_pred_row_stride,
              void* grad_target, int64_t grad_target_row_stride,
              int64_t B, int64_t D, int threads);

}  // namespace mse
}  // namespace fastsoup
