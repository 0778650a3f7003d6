// The constants shared by fastsoup's C++/CUDA kernels and its Python launchers.
//
// The one C copy: csrc/cpu and csrc/cuda include this header; fastsoup/kernels/abi.py is
// the one Python copy, and tests/kernels/test_abi.py holds the two equal (both compiled
// extensions export these values through their `abi()` function).
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

// Element types of kernel buffers.
enum fastsoup_dtype {
    FASTSOUP_F32 = 0,
    FASTSOUP_F16 = 1,
    FASTSOUP_BF16 = 2,
    FASTSOUP_F64 = 3,  // CPU weighted_sum only
};

// Elements per block of the CUDA multi-tensor weighted_sum block table.
#define FASTSOUP_WEIGHTED_SUM_CUDA_BLOCK 2048
// The CUDA per-sample MSE kernels take row chunks that are multiples of this.
#define FASTSOUP_MSE_CUDA_CHUNK_QUANTUM 1024
// Most elements of a strided (non-dense) row the CUDA row kernels index (32-bit split).
#define FASTSOUP_MAX_STRIDED_ROW 4294967295

#ifdef __cplusplus
}

#include <cstdint>
#include <map>
#include <string>

// The values above by name, as the extensions' abi() reports them (the Python side's
// fastsoup/kernels/abi.py:c_values() must return the same).
inline std::map<std::string, int64_t> fastsoup_abi_values() {
    return {{"F32", FASTSOUP_F32}, {"F16", FASTSOUP_F16}, {"BF16", FASTSOUP_BF16}, {"F64", FASTSOUP_F64},
            {"WEIGHTED_SUM_CUDA_BLOCK", FASTSOUP_WEIGHTED_SUM_CUDA_BLOCK},
            {"MSE_CUDA_CHUNK_QUANTUM", FASTSOUP_MSE_CUDA_CHUNK_QUANTUM},
            {"MAX_STRIDED_ROW", FASTSOUP_MAX_STRIDED_ROW}};
}
#endif
