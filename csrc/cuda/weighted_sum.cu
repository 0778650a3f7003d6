// Multi-tensor weighted sum: outs[p] = sum_k w_k * inputs[k][p], one launch per list.
//
// Tables (device memory, built by fastsoup/kernels/layout.py):
//   ptrs         int64 [P, K + 1]: address of outs[p], then of inputs[0..K-1][p]
//   numel        int64 [P]
//   block_tensor int32 [n_blocks]: which tensor table block b belongs to
//   block_start  int64 [n_blocks]: first element of block b inside its tensor
//   weights      fp32  [K]
// Each CUDA block handles one table block of kBlockElems elements; threads stride over
// it, accumulate in fp32 (inputs read once, in order k = 0..K-1) and store once, so an
// output may alias one of its inputs. All inputs share one dtype, all outputs another.
// No torch headers: plain C launcher below.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "dtype_convert.cuh"
#include "fastsoup_abi.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kBlockElems = FASTSOUP_WEIGHTED_SUM_CUDA_BLOCK;

using fastsoup_cuda::from_f32;
using fastsoup_cuda::to_f32;

template <typename TIn, typename TOut>
__global__ void __launch_bounds__(kThreads) weighted_sum_kernel(
    const int64_t* __restrict__ ptrs, const int64_t* __restrict__ numel,
    const int32_t* __restrict__ block_tensor, const int64_t* __restrict__ block_start,
    const float* __restrict__ weights, int K) {
    const int64_t b = blockIdx.x;
    const int64_t t = block_tensor[b];
    const int64_t start = block_start[b];
    const int64_t n = numel[t];
    const int64_t end = min(n, start + kBlockElems);
    const int64_t* row = ptrs + t * (K + 1);
    TOut* out = reinterpret_cast<TOut*>(row[0]);
    for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
        const TIn* x0 = reinterpret_cast<const TIn*>(row[1]);
        float acc = weights[0] * to_f32(x0[i]);
        for (int k = 1; k < K; ++k) {
            const TIn* xk = reinterpret_cast<const TIn*>(row[1 + k]);
            acc += weights[k] * to_f32(xk[i]);
        }
        out[i] = from_f32<TOut>(acc);
    }
}

template <typename TIn>
cudaError_t launch_out(int out_dtype, const int64_t* ptrs, const int64_t* numel,
                       const int32_t* bt, const int64_t* bs, const float* w, int K,
                       int64_t n_blocks, cudaStream_t stream) {
    dim3 grid(static_cast<unsigned>(n_blocks));
    switch (out_dtype) {
        case 0: weighted_sum_kernel<TIn, float><<<grid, kThreads, 0, stream>>>(ptrs, numel, bt, bs, w, K); break;
        case 1: weighted_sum_kernel<TIn, __half><<<grid, kThreads, 0, stream>>>(ptrs, numel, bt, bs, w, K); break;
        case 2: weighted_sum_kernel<TIn, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(ptrs, numel, bt, bs, w, K); break;
        default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

}  // namespace

extern "C" {

// Block size (elements per table block) the tables must be built with.
int64_t fastsoup_weighted_sum_block_elems(void) { return kBlockElems; }

// Launch the multi-tensor weighted sum on `stream`. Dtype codes: 0 fp32, 1 fp16, 2 bf16
// (FASTSOUP_F32/F16/BF16). Returns cudaSuccess, cudaErrorInvalidValue for bad
// arguments, or the launch error.
cudaError_t fastsoup_weighted_sum(const int64_t* ptrs, const int64_t* numel,
                                  const int32_t* block_tensor, const int64_t* block_start,
                                  const float* weights, int K, int64_t n_blocks,
                                  int in_dtype, int out_dtype, cudaStream_t stream) {
    if (K < 1 || n_blocks < 0 || n_blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
    if (n_blocks == 0) return cudaSuccess;
    switch (in_dtype) {
        case 0: return launch_out<float>(out_dtype, ptrs, numel, block_tensor, block_start, weights, K, n_blocks, stream);
        case 1: return launch_out<__half>(out_dtype, ptrs, numel, block_tensor, block_start, weights, K, n_blocks, stream);
        case 2: return launch_out<__nv_bfloat16>(out_dtype, ptrs, numel, block_tensor, block_start, weights, K, n_blocks, stream);
        default: return cudaErrorInvalidValue;
    }
}

}  // extern "C"
