// Per-sample mean squared error: forward partial sums and the backward gradient.
//
// One block per (row, chunk). Each block walks `chunk` consecutive elements of one
// sample through the shared row layout (dense: offset j; strided: three inner dims),
// reading fp32/fp16/bf16 and accumulating in fp32. On the dense path both kernels move
// 16 bytes of the narrower input per thread per step (4 fp32 or 8 fp16/bf16 elements:
// 128-bit loads and stores) when every row involved is 16-byte aligned.
// Offsets are int64 throughout. No torch headers: see fastsoup_cuda.h.
#include "fastsoup_cuda.h"
#include "dtype_convert.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kThreads = 256;

using fastsoup_cuda::from_f32;
using fastsoup_cuda::to_f32;

// Elements per thread per step on the vector path: 16 bytes of the narrower dtype.
template <typename TP, typename TT>
__host__ __device__ constexpr int vec_elems() {
    return 16 / static_cast<int>(sizeof(TP) < sizeof(TT) ? sizeof(TP) : sizeof(TT));
}

template <typename T, int N>
struct alignas(16) Vec {
    T v[N];
};

template <typename T>
__device__ __forceinline__ bool is_aligned(const T* p) {
    return (reinterpret_cast<uintptr_t>(p) % 16) == 0;
}

// Element j of a row. Strided rows have fewer than 2^32 elements (the launchers check),
// so the index splits with 32-bit division: a 64-bit division is a subroutine call whose
// saved registers spill to local memory. Offsets are 64-bit.
__device__ __forceinline__ int64_t inner_offset(int64_t j, const fastsoup_row_strides& s,
                                                int64_t size2, int64_t size3, bool dense) {
    if (dense) return j * s.s3;
    const uint32_t jj = static_cast<uint32_t>(j);
    const uint32_t n3 = static_cast<uint32_t>(size3), n2 = static_cast<uint32_t>(size2);
    const uint32_t i3 = jj % n3;
    const uint32_t q = jj / n3;
    return static_cast<int64_t>(q / n2) * s.s1 + static_cast<int64_t>(q % n2) * s.s2 +
           static_cast<int64_t>(i3) * s.s3;
}

__device__ __forceinline__ float block_sum(float v) {
    __shared__ float warp_sums[kThreads / 32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    v = (threadIdx.x < kThreads / 32) ? warp_sums[threadIdx.x] : 0.f;
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    }
    return v;
}

template <typename TP, typename TT>
__global__ void __launch_bounds__(kThreads) mse_forward_kernel(
    const TP* __restrict__ pred, fastsoup_row_strides ps,
    const TT* __restrict__ target, fastsoup_row_strides ts,
    float* __restrict__ partial, int64_t row_numel, int64_t size2, int64_t size3,
    bool dense, int64_t chunk, int64_t n_chunks, float inv_d) {
    const int64_t block = static_cast<int64_t>(blockIdx.x);
    const int64_t row = block / n_chunks;
    const int64_t c = block % n_chunks;
    const int64_t start = c * chunk;
    const int64_t stop = min(start + chunk, row_numel);
    const TP* prow = pred + row * ps.batch_stride;
    const TT* trow = target + row * ts.batch_stride;
    constexpr int kVec = vec_elems<TP, TT>();
    float acc = 0.f;
    const bool vec = dense && ps.s3 == 1 && ts.s3 == 1 && is_aligned<TP>(prow) &&
                     is_aligned<TT>(trow);
    if (vec) {
        const int64_t vstop = start + ((stop - start) / kVec) * kVec;
        for (int64_t j = start + threadIdx.x * kVec; j < vstop; j += kThreads * kVec) {
            const Vec<TP, kVec> p = *reinterpret_cast<const Vec<TP, kVec>*>(prow + j);
            const Vec<TT, kVec> t = *reinterpret_cast<const Vec<TT, kVec>*>(trow + j);
#pragma unroll
            for (int k = 0; k < kVec; ++k) {
                const float d = to_f32(p.v[k]) - to_f32(t.v[k]);
                acc = fmaf(d, d, acc);
            }
        }
        for (int64_t j = vstop + threadIdx.x; j < stop; j += kThreads) {
            const float d = to_f32(prow[j]) - to_f32(trow[j]);
            acc = fmaf(d, d, acc);
        }
    } else {
        for (int64_t j = start + threadIdx.x; j < stop; j += kThreads) {
            const float d = to_f32(prow[inner_offset(j, ps, size2, size3, dense)]) -
                            to_f32(trow[inner_offset(j, ts, size2, size3, dense)]);
            acc = fmaf(d, d, acc);
        }
    }
    acc = block_sum(acc);
    if (threadIdx.x == 0) partial[row * n_chunks + c] = acc * inv_d;
}

template <typename TP, typename TT>
__global__ void __launch_bounds__(kThreads) mse_backward_kernel(
    const TP* __restrict__ pred, fastsoup_row_strides ps,
    const TT* __restrict__ target, fastsoup_row_strides ts,
    const float* __restrict__ coef,
    TP* __restrict__ grad_pred, fastsoup_row_strides gps,
    TT* __restrict__ grad_target, fastsoup_row_strides gts,
    int64_t row_numel, int64_t size2, int64_t size3, bool dense,
    int64_t chunk, int64_t n_chunks) {
    const int64_t block = static_cast<int64_t>(blockIdx.x);
    const int64_t row = block / n_chunks;
    const int64_t c = block % n_chunks;
    const int64_t start = c * chunk;
    const int64_t stop = min(start + chunk, row_numel);
    constexpr int kVec = vec_elems<TP, TT>();
    const float k = coef[row];
    const TP* prow = pred + row * ps.batch_stride;
    const TT* trow = target + row * ts.batch_stride;
    TP* gprow = grad_pred ? grad_pred + row * gps.batch_stride : nullptr;
    TT* gtrow = grad_target ? grad_target + row * gts.batch_stride : nullptr;
    const bool vec = dense && ps.s3 == 1 && ts.s3 == 1 && (!gprow || gps.s3 == 1) &&
                     (!gtrow || gts.s3 == 1) && is_aligned<TP>(prow) && is_aligned<TT>(trow) &&
                     (!gprow || is_aligned<TP>(gprow)) && (!gtrow || is_aligned<TT>(gtrow));
    int64_t j0 = start + threadIdx.x;
    if (vec) {
        // `start` is a multiple of the chunk quantum, so aligned rows stay aligned here.
        const int64_t vstop = start + ((stop - start) / kVec) * kVec;
        for (int64_t j = start + threadIdx.x * kVec; j < vstop; j += kThreads * kVec) {
            const Vec<TP, kVec> p = *reinterpret_cast<const Vec<TP, kVec>*>(prow + j);
            const Vec<TT, kVec> t = *reinterpret_cast<const Vec<TT, kVec>*>(trow + j);
            Vec<TP, kVec> gp;
            Vec<TT, kVec> gt;
#pragma unroll
            for (int v = 0; v < kVec; ++v) {
                const float g = (k != 0.f) ? k * (to_f32(p.v[v]) - to_f32(t.v[v])) : 0.f;
                gp.v[v] = from_f32<TP>(g);
                gt.v[v] = from_f32<TT>(-g);
            }
            if (gprow) *reinterpret_cast<Vec<TP, kVec>*>(gprow + j) = gp;
            if (gtrow) *reinterpret_cast<Vec<TT, kVec>*>(gtrow + j) = gt;
        }
        j0 = vstop + threadIdx.x;  // scalar tail
    }
    for (int64_t j = j0; j < stop; j += kThreads) {
        float g = 0.f;
        if (k != 0.f) {
            g = k * (to_f32(prow[inner_offset(j, ps, size2, size3, dense)]) -
                     to_f32(trow[inner_offset(j, ts, size2, size3, dense)]));
        }
        if (gprow) gprow[inner_offset(j, gps, size2, size3, dense)] = from_f32<TP>(g);
        if (gtrow) gtrow[inner_offset(j, gts, size2, size3, dense)] = from_f32<TT>(-g);
    }
}

template <typename F>
cudaError_t dispatch2(int a, int b, F&& f) {
    // Calls f(TP{}, TT{}) with the C++ types of the two dtype codes.
    auto inner = [&](auto ta) -> cudaError_t {
        switch (b) {
            case FASTSOUP_F32: return f(ta, float{});
            case FASTSOUP_F16: return f(ta, __half{});
            case FASTSOUP_BF16: return f(ta, __nv_bfloat16{});
            default: return cudaErrorInvalidValue;
        }
    };
    switch (a) {
        case FASTSOUP_F32: return inner(float{});
        case FASTSOUP_F16: return inner(__half{});
        case FASTSOUP_BF16: return inner(__nv_bfloat16{});
        default: return cudaErrorInvalidValue;
    }
}

// Checks what every row launch shares (a chunk of the quantum, a 1-d grid of at most
// 2^31 - 1 blocks, strided rows the 32-bit index split covers), then calls
// f(TP{}, TT{}, grid) with the C++ types of the two dtype codes.
template <typename F>
cudaError_t launch_rows(int pred_dtype, int target_dtype, int64_t batch, int64_t row_numel,
                        int dense, int64_t chunk, int64_t n_chunks, F&& f) {
    if (batch <= 0 || n_chunks <= 0) return cudaSuccess;
    if (!dense && row_numel > static_cast<int64_t>(FASTSOUP_MAX_STRIDED_ROW)) return cudaErrorInvalidValue;
    if (chunk <= 0 || chunk % FASTSOUP_MSE_CUDA_CHUNK_QUANTUM != 0 || batch * n_chunks > 0x7fffffffLL)
        return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(batch * n_chunks));
    return dispatch2(pred_dtype, target_dtype, [&](auto tp, auto tt) { return f(tp, tt, grid); });
}

}  // namespace

extern "C" cudaError_t fastsoup_mse_forward(
    const void* pred, int pred_dtype, fastsoup_row_strides pred_strides,
    const void* target, int target_dtype, fastsoup_row_strides target_strides,
    float* partial, int64_t batch, int64_t row_numel, int64_t size2, int64_t size3,
    int dense, int64_t chunk, int64_t n_chunks, float inv_d, cudaStream_t stream) {
    return launch_rows(pred_dtype, target_dtype, batch, row_numel, dense, chunk, n_chunks,
                       [&](auto tp, auto tt, dim3 grid) {
        using TP = decltype(tp);
        using TT = decltype(tt);
        mse_forward_kernel<TP, TT><<<grid, kThreads, 0, stream>>>(
            static_cast<const TP*>(pred), pred_strides, static_cast<const TT*>(target),
            target_strides, partial, row_numel, size2, size3, dense != 0, chunk, n_chunks, inv_d);
        return cudaGetLastError();
    });
}

extern "C" cudaError_t fastsoup_mse_backward(
    const void* pred, int pred_dtype, fastsoup_row_strides pred_strides,
    const void* target, int target_dtype, fastsoup_row_strides target_strides,
    const float* coef,
    void* grad_pred, fastsoup_row_strides grad_pred_strides,
    void* grad_target, fastsoup_row_strides grad_target_strides,
    int64_t batch, int64_t row_numel, int64_t size2, int64_t size3,
    int dense, int64_t chunk, int64_t n_chunks, cudaStream_t stream) {
    return launch_rows(pred_dtype, target_dtype, batch, row_numel, dense, chunk, n_chunks,
                       [&](auto tp, auto tt, dim3 grid) {
        using TP = decltype(tp);
        using TT = decltype(tt);
        mse_backward_kernel<TP, TT><<<grid, kThreads, 0, stream>>>(
            static_cast<const TP*>(pred), pred_strides, static_cast<const TT*>(target),
            target_strides, coef, static_cast<TP*>(grad_pred), grad_pred_strides,
            static_cast<TT*>(grad_target), grad_target_strides, row_numel, size2, size3,
            dense != 0, chunk, n_chunks);
        return cudaGetLastError();
    });
}
