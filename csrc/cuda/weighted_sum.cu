// Multi-tensor weighted sum: outs[p] = sum_k w_k * inputs[k][p], one launch per list.
//
// Tables (device memory, built by fastsoup/kernels/layout.py):
//   ptrs         int64 [P, K + 1]: address of outs[p], then of inputs[0..K-1][p]
//   numel        int64 [P]
//   block_tensor int32 [n_blocks]: which tensor table block b belongs to
//   block_start  int64 [n_blocks]: first element of block b inside its tensor
//   weights      fp32  [K]
// Each CUDA block handles one table block of kBlockElems elements (see the kernel): fp32
// accumulation in input order k = 0..K-1 without FMA contraction, one store per element.
// Inputs may differ in dtype (each is read in its own); all outputs share one dtype.
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
constexpr int kVec = 8;  // elements per thread on the aligned full-block path
static_assert(kThreads * kVec == kBlockElems, "one aligned pass covers a table block");

using fastsoup_cuda::from_f32;
using fastsoup_cuda::to_f32;

// 8 consecutive elements <-> fp32, with 16-byte vector accesses (the caller checked that
// the address is 16-byte aligned). The addresses come from the pointer table, so the
// compiler cannot infer their address space: __ldcg/__stcg make them global accesses
// (LDG/STG, cached in L2 only: coherent even where an output is one of the inputs).
__device__ __forceinline__ void load8(const float* p, float (&v)[kVec]) {
    const float4 a = __ldcg(reinterpret_cast<const float4*>(p));
    const float4 b = __ldcg(reinterpret_cast<const float4*>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
// 16-bit types: 8 elements are 4 pairs in one 16-byte word.
template <typename T> struct Pair2;
template <> struct Pair2<__half> { using type = __half2; };
template <> struct Pair2<__nv_bfloat16> { using type = __nv_bfloat162; };
__device__ __forceinline__ float2 pair_to_f32(__half2 h) { return __half22float2(h); }
__device__ __forceinline__ float2 pair_to_f32(__nv_bfloat162 h) { return __bfloat1622float2(h); }
template <typename T> __device__ __forceinline__ typename Pair2<T>::type pair_from_f32(float a, float b);
template <> __device__ __forceinline__ __half2 pair_from_f32<__half>(float a, float b) {
    return __floats2half2_rn(a, b);
}
template <> __device__ __forceinline__ __nv_bfloat162 pair_from_f32<__nv_bfloat16>(float a, float b) {
    return __floats2bfloat162_rn(a, b);
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[kVec]) {
    const uint4 raw = __ldcg(reinterpret_cast<const uint4*>(p));
    const auto* h = reinterpret_cast<const typename Pair2<T>::type*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = pair_to_f32(h[i]);
        v[2 * i] = f.x;
        v[2 * i + 1] = f.y;
    }
}
__device__ __forceinline__ void store8(float* p, const float (&v)[kVec]) {
    __stcg(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
    __stcg(reinterpret_cast<float4*>(p) + 1, make_float4(v[4], v[5], v[6], v[7]));
}
template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&v)[kVec]) {
    uint4 raw;
    auto* h = reinterpret_cast<typename Pair2<T>::type*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = pair_from_f32<T>(v[2 * i], v[2 * i + 1]);
    __stcg(reinterpret_cast<uint4*>(p), raw);
}

// acc + w * x rounded twice (no FMA contraction), exactly as the CPU kernel and the
// PyTorch reference round, so a soup summed here is bit-identical to one summed there.
__device__ __forceinline__ float axpy(float acc, float w, float x) {
    return __fadd_rn(acc, __fmul_rn(w, x));
}

// Input k's elements, by its dtype code (uniform across a block: no divergence).
__device__ __forceinline__ int64_t elem_bytes(int code) { return code == FASTSOUP_F32 ? 4 : 2; }

__device__ __forceinline__ void load8_as(int64_t addr, int code, int64_t i, float (&x)[kVec]) {
    switch (code) {
        case FASTSOUP_F32: load8(reinterpret_cast<const float*>(addr) + i, x); break;
        case FASTSOUP_F16: load8(reinterpret_cast<const __half*>(addr) + i, x); break;
        default: load8(reinterpret_cast<const __nv_bfloat16*>(addr) + i, x); break;
    }
}

__device__ __forceinline__ float load1_as(int64_t addr, int code, int64_t i) {
    switch (code) {
        case FASTSOUP_F32: return reinterpret_cast<const float*>(addr)[i];
        case FASTSOUP_F16: return to_f32(reinterpret_cast<const __half*>(addr)[i]);
        default: return to_f32(reinterpret_cast<const __nv_bfloat16*>(addr)[i]);
    }
}

// Full blocks whose K + 1 addresses are 16-byte aligned take the vector path: each thread
// owns 8 consecutive elements, reads each input's address, dtype and weight once and loads
// the input with one or two 16-byte loads. Other blocks (a tensor's tail, unaligned views)
// take the element-wise path. Each input is read in its own dtype (no converted copies).
// Every input of an element is read before the element is written, so an output may be
// one of its inputs (in-place averaging).
template <typename TOut>
__global__ void __launch_bounds__(kThreads) weighted_sum_kernel(
    const int64_t* __restrict__ ptrs, const int64_t* __restrict__ numel,
    const int32_t* __restrict__ block_tensor, const int64_t* __restrict__ block_start,
    const float* __restrict__ weights, const int32_t* __restrict__ in_codes, int K) {
    const int64_t b = blockIdx.x;
    const int64_t t = block_tensor[b];
    const int64_t start = block_start[b];
    const int64_t n = numel[t];
    const int64_t end = min(n, start + kBlockElems);
    const int64_t* row = ptrs + t * (K + 1);
    TOut* out = reinterpret_cast<TOut*>(row[0]);
    bool aligned = end - start == kBlockElems && ((row[0] + start * sizeof(TOut)) & 15) == 0;
    for (int k = 0; k < K && aligned; ++k)
        aligned = ((row[1 + k] + start * elem_bytes(in_codes[k])) & 15) == 0;
    if (aligned) {
        const int64_t i = start + static_cast<int64_t>(threadIdx.x) * kVec;
        float acc[kVec];
        float x[kVec];
        load8_as(row[1], in_codes[0], i, x);
        const float w0 = weights[0];
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] = __fmul_rn(w0, x[e]);
        for (int k = 1; k < K; ++k) {
            load8_as(row[1 + k], in_codes[k], i, x);
            const float wk = weights[k];
#pragma unroll
            for (int e = 0; e < kVec; ++e) acc[e] = axpy(acc[e], wk, x[e]);
        }
        store8(out + i, acc);
        return;
    }
    for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
        float acc = __fmul_rn(weights[0], load1_as(row[1], in_codes[0], i));
        for (int k = 1; k < K; ++k) acc = axpy(acc, weights[k], load1_as(row[1 + k], in_codes[k], i));
        out[i] = from_f32<TOut>(acc);
    }
}

}  // namespace

extern "C" {

// Block size (elements per table block) the tables must be built with.
int64_t fastsoup_weighted_sum_block_elems(void) { return kBlockElems; }

// Launch the multi-tensor weighted sum on `stream`. `in_codes` (device, int32 [K]) holds
// each input's dtype code and `out_dtype` the outputs' (FASTSOUP_F32/F16/BF16 of
// csrc/include/fastsoup_abi.h; the caller validates the input codes). Returns
// cudaSuccess, cudaErrorInvalidValue for bad arguments, or the launch error.
cudaError_t fastsoup_weighted_sum(const int64_t* ptrs, const int64_t* numel,
                                  const int32_t* block_tensor, const int64_t* block_start,
                                  const float* weights, const int32_t* in_codes, int K,
                                  int64_t n_blocks, int out_dtype, cudaStream_t stream) {
    if (K < 1 || n_blocks < 0 || n_blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
    if (n_blocks == 0) return cudaSuccess;
    const dim3 grid(static_cast<unsigned>(n_blocks));
    switch (out_dtype) {
        case FASTSOUP_F32:
            weighted_sum_kernel<float><<<grid, kThreads, 0, stream>>>(ptrs, numel, block_tensor, block_start, weights, in_codes, K);
            break;
        case FASTSOUP_F16:
            weighted_sum_kernel<__half><<<grid, kThreads, 0, stream>>>(ptrs, numel, block_tensor, block_start, weights, in_codes, K);
            break;
        case FASTSOUP_BF16:
            weighted_sum_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(ptrs, numel, block_tensor, block_start, weights, in_codes, K);
            break;
        default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

}  // extern "C"
