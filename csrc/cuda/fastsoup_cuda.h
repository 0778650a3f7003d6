// Plain C launchers of fastsoup's CUDA kernels. No torch headers: buffers, sizes,
// strides (in elements) and a stream in; a cudaError_t out. Dtype codes and block
// constants: csrc/include/fastsoup_abi.h.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "fastsoup_abi.h"

#ifdef __cplusplus
extern "C" {
#endif

// Row layout of a [B, ...] tensor: batch stride, then three inner strides; the inner
// sizes (S1, S2, S3) are shared by all tensors of a call (see fastsoup/kernels/layout.py).
typedef struct {
    int64_t batch_stride;
    int64_t s1, s2, s3;
} fastsoup_row_strides;

// partial[row * n_chunks + chunk] = inv_d * sum over the chunk of (pred - target)^2,
// accumulated in fp32. Grid: B * n_chunks blocks. `chunk` must be a multiple of
// FASTSOUP_MSE_CUDA_CHUNK_QUANTUM.
cudaError_t fastsoup_mse_forward(
    const void* pred, int pred_dtype, fastsoup_row_strides pred_strides,
    const void* target, int target_dtype, fastsoup_row_strides target_strides,
    float* partial, int64_t batch, int64_t row_numel, int64_t size2, int64_t size3,
    int dense, int64_t chunk, int64_t n_chunks, float inv_d, cudaStream_t stream);

// g = coef[row] * (pred - target) (exact 0 where coef[row] == 0);
// grad_pred = g (if grad_pred != NULL), grad_target = -g (if grad_target != NULL).
cudaError_t fastsoup_mse_backward(
    const void* pred, int pred_dtype, fastsoup_row_strides pred_strides,
    const void* target, int target_dtype, fastsoup_row_strides target_strides,
    const float* coef,
    void* grad_pred, fastsoup_row_strides grad_pred_strides,
    void* grad_target, fastsoup_row_strides grad_target_strides,
    int64_t batch, int64_t row_numel, int64_t size2, int64_t size3,
    int dense, int64_t chunk, int64_t n_chunks, cudaStream_t stream);

#ifdef __cplusplus
}
#endif
