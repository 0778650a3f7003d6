// Fused K-way weighted sum (see weighted_sum.h).
//
// Layout of this file: the inner kernels (section "kernels") are compiled twice, once
// for the baseline ISA and once with AVX2 + F16C enabled, by including this file into
// two namespaces; weighted_sum() picks the variant once at run time. Both variants do
// the same IEEE operations in the same order (no FMA contraction is enabled), so they
// produce bit-identical results.
//
// Work is split into blocks of BLOCK elements. For one block, the accumulator (fp32 or
// fp64, on the stack, in L1) is initialised from input 0 and updated from inputs 1..K-1;
// then it is rounded once into the output. Threads take contiguous ranges of blocks.
// The AVX2 variant first runs the usual case (inputs of one 2- or 4-byte dtype, fp32
// accumulation, a 2- or 4-byte output) in register tiles: same operations, same order.
#ifndef FASTSOUP_WS_KERNELS

#include "weighted_sum.h"
#include "dtype_convert.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

namespace fastsoup {
namespace ws {
namespace {

constexpr int64_t BLOCK = 2048;              // elements per block (8 KiB of fp32)
constexpr int64_t MIN_PER_THREAD = 1 << 17;  // below this, more threads cost more than they save

// fp64 -> fp32 with round-to-odd, so that a following fp32 -> bf16 rounding is correct
// (no double rounding): 24 significand bits >= 8 + 2.
inline float f64_to_f32_round_odd(double d) {
    float f = static_cast<float>(d);
    if (static_cast<double>(f) == d || std::isnan(d)) return f;
    if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
    uint32_t u;
    std::memcpy(&u, &f, 4);
    u |= 1u;
    std::memcpy(&f, &u, 4);
    return f;
}

}  // namespace
}  // namespace ws
}  // namespace fastsoup

#define FASTSOUP_WS_KERNELS 1
namespace fastsoup { namespace ws { namespace generic {
#include "weighted_sum.cpp"
}}}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTSOUP_WS_HAVE_AVX2 1
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define FASTSOUP_WS_TILES 1
namespace fastsoup { namespace ws { namespace avx2 {
#include "weighted_sum.cpp"
}}}
#undef FASTSOUP_WS_TILES
#pragma GCC pop_options
#endif

namespace fastsoup {
namespace ws {

size_t dtype_size(int dtype) {
    switch (dtype) {
        case F32: return 4;
        case F16: return 2;
        case BF16: return 2;
        case F64: return 8;
        default: return 0;
    }
}

namespace {

using RangeFn = void (*)(void*, int, const void* const*, const int*, const double*, int,
                         int64_t, int64_t, bool);

bool cpu_has_avx2() {
#ifdef FASTSOUP_WS_HAVE_AVX2
    static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    return ok;
#else
    return false;
#endif
}

RangeFn range_fn() {
#ifdef FASTSOUP_WS_HAVE_AVX2
    if (cpu_has_avx2()) return &avx2::run_range;
#endif
    return &generic::run_range;
}

}  // namespace

unsigned hardware_threads() {
    static const unsigned hc = std::thread::hardware_concurrency();
    return hc;
}

const char* simd_variant() { return cpu_has_avx2() ? "avx2+f16c" : "generic"; }

void weighted_sum(void* out, int out_dtype, const void* const* ins, const int* in_dtypes,
                  const double* weights, int K, int64_t n, int threads, bool acc64) {
    if (n <= 0) return;
    RangeFn fn = range_fn();
    const unsigned hc = hardware_threads();  // 0: unknown
    if (threads <= 0) threads = static_cast<int>(std::max(1u, hc));
    if (hc > 0 && static_cast<unsigned>(threads) > hc) threads = static_cast<int>(hc);
    int64_t by_size = std::max<int64_t>(1, n / MIN_PER_THREAD);
    int nt = static_cast<int>(std::min<int64_t>(threads, by_size));
    if (nt <= 1) {
        fn(out, out_dtype, ins, in_dtypes, weights, K, 0, n, acc64);
        return;
    }
    // Contiguous ranges of whole blocks per thread; the caller's thread takes the first.
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    int64_t per = (blocks + nt - 1) / nt;
    std::vector<std::thread> pool;
    pool.reserve(nt - 1);
    try {
        for (int t = 1; t < nt; ++t) {
            int64_t lo = std::min(n, t * per * BLOCK), hi = std::min(n, (t + 1) * per * BLOCK);
            if (lo >= hi) break;
            pool.emplace_back(fn, out, out_dtype, ins, in_dtypes, weights, K, lo, hi, acc64);
        }
    } catch (...) {
        // e.g. std::system_error when no thread can be created: never leave a joinable
        // std::thread to be destroyed (std::terminate); join what started, then report.
        for (auto& th : pool) th.join();
        throw;
    }
    fn(out, out_dtype, ins, in_dtypes, weights, K, 0, std::min(n, per * BLOCK), acc64);
    for (auto& th : pool) th.join();
}

uint64_t prefault(const void* ptr, size_t nbytes, size_t page) {
    if (page == 0) page = 4096;
    const volatile unsigned char* p = static_cast<const volatile unsigned char*>(ptr);
    uint64_t sum = 0;
    for (size_t i = 0; i < nbytes; i += page) sum += p[i];
    if (nbytes) sum += p[nbytes - 1];
    return sum;
}

}  // namespace ws
}  // namespace fastsoup

#else  // ------------------------------------------------------------------- kernels
// Compiled once per ISA variant, inside namespace fastsoup::ws::<variant>.

using ::fastsoup::ws::BLOCK;
using ::fastsoup::ws::bf16_bits_to_f32;
using ::fastsoup::ws::f32_to_bf16_bits;
using ::fastsoup::ws::f64_to_f32_round_odd;

// acc[i] (=|+=) w * x[i] for one block. `first` initialises instead of accumulating.
template <typename Acc>
static void accumulate_block(Acc* __restrict acc, const void* src, int dtype, Acc w,
                             int64_t m, bool first) {
    switch (dtype) {
        case ::fastsoup::ws::F32: {
            const float* __restrict x = static_cast<const float*>(src);
            if (first) for (int64_t i = 0; i < m; ++i) acc[i] = w * static_cast<Acc>(x[i]);
            else for (int64_t i = 0; i < m; ++i) acc[i] += w * static_cast<Acc>(x[i]);
            break;
        }
        case ::fastsoup::ws::F64: {
            const double* __restrict x = static_cast<const double*>(src);
            // fp64 inputs are rounded to the accumulator type first (fp32 accumulation
            // means fp32 arithmetic); with acc64 they are exact.
            if (first) for (int64_t i = 0; i < m; ++i) acc[i] = w * static_cast<Acc>(x[i]);
            else for (int64_t i = 0; i < m; ++i) acc[i] += w * static_cast<Acc>(x[i]);
            break;
        }
        case ::fastsoup::ws::BF16: {
            const uint16_t* __restrict x = static_cast<const uint16_t*>(src);
            if (first) for (int64_t i = 0; i < m; ++i) acc[i] = w * static_cast<Acc>(bf16_bits_to_f32(x[i]));
            else for (int64_t i = 0; i < m; ++i) acc[i] += w * static_cast<Acc>(bf16_bits_to_f32(x[i]));
            break;
        }
        case ::fastsoup::ws::F16: {
            const _Float16* __restrict x = static_cast<const _Float16*>(src);
            if (first) for (int64_t i = 0; i < m; ++i) acc[i] = w * static_cast<Acc>(static_cast<float>(x[i]));
            else for (int64_t i = 0; i < m; ++i) acc[i] += w * static_cast<Acc>(static_cast<float>(x[i]));
            break;
        }
    }
}

static void store_block(void* dst, int dtype, const float* __restrict acc, int64_t m) {
    switch (dtype) {
        case ::fastsoup::ws::F32: std::memcpy(dst, acc, m * sizeof(float)); break;
        case ::fastsoup::ws::F64: {
            double* __restrict y = static_cast<double*>(dst);
            for (int64_t i = 0; i < m; ++i) y[i] = acc[i];
            break;
        }
        case ::fastsoup::ws::BF16: {
            uint16_t* __restrict y = static_cast<uint16_t*>(dst);
            for (int64_t i = 0; i < m; ++i) y[i] = f32_to_bf16_bits(acc[i]);
            break;
        }
        case ::fastsoup::ws::F16: {
            _Float16* __restrict y = static_cast<_Float16*>(dst);
            for (int64_t i = 0; i < m; ++i) y[i] = static_cast<_Float16>(acc[i]);
            break;
        }
    }
}

static void store_block(void* dst, int dtype, const double* __restrict acc, int64_t m) {
    switch (dtype) {
        case ::fastsoup::ws::F32: {
            float* __restrict y = static_cast<float*>(dst);
            for (int64_t i = 0; i < m; ++i) y[i] = static_cast<float>(acc[i]);
            break;
        }
        case ::fastsoup::ws::F64: std::memcpy(dst, acc, m * sizeof(double)); break;
        case ::fastsoup::ws::BF16: {
            uint16_t* __restrict y = static_cast<uint16_t*>(dst);
            for (int64_t i = 0; i < m; ++i) y[i] = f32_to_bf16_bits(f64_to_f32_round_odd(acc[i]));
            break;
        }
        case ::fastsoup::ws::F16: {
            _Float16* __restrict y = static_cast<_Float16*>(dst);
            for (int64_t i = 0; i < m; ++i) y[i] = static_cast<_Float16>(acc[i]);
            break;
        }
    }
}

// ---- register tiles (AVX2 variant): every input of one 2- or 4-byte dtype, fp32
// accumulation, a 2- or 4-byte output (the usual soup). TILE accumulators stay in
// registers while the K inputs are added into them, in the same order and with the same
// roundings as accumulate_block (acc = w_0 x_0, then acc = acc + w_k x_k, each product
// and sum rounded to fp32; no FMA): bit-identical results, without the load and store
// of the accumulator per input and element that the block path pays.
#ifdef FASTSOUP_WS_TILES
constexpr int64_t TILE = 32;

static inline __m256 tile_load(const uint16_t* x) {  // bf16 bits -> fp32 (exact)
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline __m256 tile_load(const _Float16* x) {  // fp16 -> fp32 (exact)
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}
static inline __m256 tile_load(const float* x) { return _mm256_loadu_ps(x); }

static inline void tile_store(float* y, __m256 v) { _mm256_storeu_ps(y, v); }
static inline void tile_store(_Float16* y, __m256 v) {  // round to nearest even, as a cast
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
static inline void tile_store(uint16_t* y, __m256 v) {  // f32_to_bf16_bits, 8 at a time
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i is_nan = _mm256_cmpgt_epi32(
        _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    const __m256i bits = _mm256_blendv_epi8(rounded, quiet, is_nan);  // each in [0, 0xffff]
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(y), _mm256_castsi256_si128(packed));
}

// Elements [lo, lo + TILE * floor((hi - lo) / TILE)); returns where it stopped.
template <typename In, typename Out>
static int64_t tile_range(void* out, const void* const* ins, const float* w, int K,
                          int64_t lo, int64_t hi) {
    Out* y = static_cast<Out*>(out);
    int64_t i = lo;
    for (; i + TILE <= hi; i += TILE) {
        const In* x = static_cast<const In*>(ins[0]) + i;
        __m256 wk = _mm256_set1_ps(w[0]);
        __m256 a0 = _mm256_mul_ps(wk, tile_load(x));
        __m256 a1 = _mm256_mul_ps(wk, tile_load(x + 8));
        __m256 a2 = _mm256_mul_ps(wk, tile_load(x + 16));
        __m256 a3 = _mm256_mul_ps(wk, tile_load(x + 24));
        for (int k = 1; k < K; ++k) {
            x = static_cast<const In*>(ins[k]) + i;
            wk = _mm256_set1_ps(w[k]);
            a0 = _mm256_add_ps(a0, _mm256_mul_ps(wk, tile_load(x)));
            a1 = _mm256_add_ps(a1, _mm256_mul_ps(wk, tile_load(x + 8)));
            a2 = _mm256_add_ps(a2, _mm256_mul_ps(wk, tile_load(x + 16)));
            a3 = _mm256_add_ps(a3, _mm256_mul_ps(wk, tile_load(x + 24)));
        }
        tile_store(y + i, a0);
        tile_store(y + i + 8, a1);
        tile_store(y + i + 16, a2);
        tile_store(y + i + 24, a3);
    }
    return i;
}

template <typename In>
static int64_t tile_range_out(void* out, int out_dtype, const void* const* ins, const float* w,
                              int K, int64_t lo, int64_t hi) {
    switch (out_dtype) {
        case ::fastsoup::ws::F32: return tile_range<In, float>(out, ins, w, K, lo, hi);
        case ::fastsoup::ws::BF16: return tile_range<In, uint16_t>(out, ins, w, K, lo, hi);
        case ::fastsoup::ws::F16: return tile_range<In, _Float16>(out, ins, w, K, lo, hi);
    }
    return lo;  // fp64 output: the block path
}

// The tiled part of [lo, hi) where the tiles apply; returns where the block path
// takes over (lo where they do not).
static int64_t tiled_prefix(void* out, int out_dtype, const void* const* ins,
                            const int* in_dtypes, const double* weights, int K, int64_t lo,
                            int64_t hi) {
    const int d = in_dtypes[0];
    for (int k = 1; k < K; ++k)
        if (in_dtypes[k] != d) return lo;
    if (d == ::fastsoup::ws::F64 || out_dtype == ::fastsoup::ws::F64 || hi - lo < TILE) return lo;
    constexpr int STACK_K = 64;
    float stack_w[STACK_K];
    std::vector<float> heap_w;
    float* w = stack_w;
    if (K > STACK_K) {
        heap_w.resize(K);
        w = heap_w.data();
    }
    for (int k = 0; k < K; ++k) w[k] = static_cast<float>(weights[k]);
    switch (d) {
        case ::fastsoup::ws::BF16: return tile_range_out<uint16_t>(out, out_dtype, ins, w, K, lo, hi);
        case ::fastsoup::ws::F16: return tile_range_out<_Float16>(out, out_dtype, ins, w, K, lo, hi);
        case ::fastsoup::ws::F32: return tile_range_out<float>(out, out_dtype, ins, w, K, lo, hi);
    }
    return lo;
}
#endif  // FASTSOUP_WS_TILES

template <typename Acc>
static void run_range_t(void* out, int out_dtype, const void* const* ins, const int* in_dtypes,
                        const double* weights, int K, int64_t lo, int64_t hi) {
    alignas(64) Acc acc[BLOCK];
    const size_t out_es = ::fastsoup::ws::dtype_size(out_dtype);
#ifdef FASTSOUP_WS_TILES
    if constexpr (sizeof(Acc) == sizeof(float))
        lo = tiled_prefix(out, out_dtype, ins, in_dtypes, weights, K, lo, hi);
#endif
    for (int64_t start = lo; start < hi; start += BLOCK) {
        int64_t m = std::min<int64_t>(BLOCK, hi - start);
        for (int k = 0; k < K; ++k) {
            const size_t es = ::fastsoup::ws::dtype_size(in_dtypes[k]);
            const char* src = static_cast<const char*>(ins[k]) + start * es;
            accumulate_block<Acc>(acc, src, in_dtypes[k], static_cast<Acc>(weights[k]), m, k == 0);
        }
        store_block(static_cast<char*>(out) + start * out_es, out_dtype, acc, m);
    }
}

void run_range(void* out, int out_dtype, const void* const* ins, const int* in_dtypes,
               const double* weights, int K, int64_t lo, int64_t hi, bool acc64) {
    if (acc64) run_range_t<double>(out, out_dtype, ins, in_dtypes, weights, K, lo, hi);
    else run_range_t<float>(out, out_dtype, ins, in_dtypes, weights, K, lo, hi);
}

#endif  // FASTSOUP_WS_KERNELS
