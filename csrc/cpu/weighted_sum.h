// Fused K-way weighted sum on the CPU: out[i] = sum_k w_k * in_k[i].
//
// Buffers are raw element arrays (no torch headers). Element types are given by
// fastsoup::ws::DType codes; inputs may have different dtypes. Accumulation is fp32
// (or fp64 when acc64 is set); the result is rounded once to the output dtype
// (round-to-nearest-even for fp16/bf16, NaN preserved). Each input element is read
// exactly once and each output element written exactly once, the accumulators in
// registers (inputs of one dtype, AVX2) or in blocks that stay in L1.
#pragma once

#include <cstddef>
#include <cstdint>

#include "fastsoup_abi.h"

namespace fastsoup {
namespace ws {

// The kernel dtype codes of csrc/include/fastsoup_abi.h, in this namespace.
enum DType : int { F32 = FASTSOUP_F32, F16 = FASTSOUP_F16, BF16 = FASTSOUP_BF16, F64 = FASTSOUP_F64 };

// Size in bytes of one element of `dtype`, or 0 for an unknown code.
size_t dtype_size(int dtype);

// out[i] = sum_{k<K} weights[k] * ins[k][i] for i in [0, n).
//   out, out_dtype: destination buffer (n elements) and its DType.
//   ins, in_dtypes: K source buffers (n elements each) and their DTypes.
//   weights: K weights (fp64; converted to the accumulation type once).
//   threads: worker threads (<= 0: hardware concurrency); small n runs on one thread.
//   acc64: accumulate in fp64 instead of fp32.
// The caller guarantees valid dtypes, K >= 1, and no overlap between out and any input.
void weighted_sum(void* out, int out_dtype, const void* const* ins, const int* in_dtypes,
                  const double* weights, int K, int64_t n, int threads, bool acc64);

// Read one byte per `page` bytes of [ptr, ptr + nbytes): faults a mapped range into the
// page tables ahead of use. Returns a checksum so the reads are not optimised away.
uint64_t prefault(const void* ptr, size_t nbytes, size_t page);

// std::thread::hardware_concurrency(), read once (glibc answers it by reading /sys: a
// few microseconds per call, as much as a small kernel call). 0: unknown.
unsigned hardware_threads();

// "avx2+f16c" or "generic": which inner-loop variant weighted_sum dispatches to.
const char* simd_variant();

}  // namespace ws
}  // namespace fastsoup
