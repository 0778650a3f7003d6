// Per-sample mean squared error on the CPU (see per_sample_mse.h).
//
// Work items are (row, chunk) pairs of at most CHUNK elements, so one long row still
// spreads over every thread; threads take contiguous ranges of items and the per-item
// fp64 partial sums are added per row in item order (deterministic).
#include "per_sample_mse.h"

#include <algorithm>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

#include "dtype_convert.h"
#include "weighted_sum.h"

namespace fastsoup {
namespace mse {
namespace {

constexpr int64_t BLOCK = 2048;
constexpr int64_t CHUNK = int64_t(1) << 16;        // elements per work item
constexpr int64_t MIN_PER_THREAD = int64_t(1) << 18;  // thread start-up costs ~tens of µs

template <typename T> inline float ld(const T* p, int64_t i);
template <> inline float ld<float>(const float* p, int64_t i) { return p[i]; }
template <> inline float ld<uint16_t>(const uint16_t* p, int64_t i) { return ws::bf16_bits_to_f32(p[i]); }
template <> inline float ld<_Float16>(const _Float16* p, int64_t i) { return static_cast<float>(p[i]); }

template <typename T> inline void st(T* p, int64_t i, float v);
template <> inline void st<float>(float* p, int64_t i, float v) { p[i] = v; }
template <> inline void st<uint16_t>(uint16_t* p, int64_t i, float v) { p[i] = ws::f32_to_bf16_bits(v); }
template <> inline void st<_Float16>(_Float16* p, int64_t i, float v) { p[i] = static_cast<_Float16>(v); }

template <typename TP, typename TT>
double chunk_sum(const TP* __restrict p, const TT* __restrict t, int64_t n) {
    double total = 0.0;
    for (int64_t b = 0; b < n; b += BLOCK) {
        const int64_t m = std::min(BLOCK, n - b);
        float lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 8 <= m; i += 8) {
            for (int l = 0; l < 8; ++l) {
                const float d = ld(p, b + i + l) - ld(t, b + i + l);
                lane[l] += d * d;
            }
        }
        float tail = 0.f;
        for (; i < m; ++i) {
            const float d = ld(p, b + i) - ld(t, b + i);
            tail += d * d;
        }
        total += static_cast<double>(((lane[0] + lane[1]) + (lane[2] + lane[3])) +
                                     ((lane[4] + lane[5]) + (lane[6] + lane[7])) + tail);
    }
    return total;
}

template <typename TP, typename TT>
void chunk_grad(const TP* __restrict p, const TT* __restrict t, float k, TP* __restrict gp,
                TT* __restrict gt, int64_t n) {
    float buf[BLOCK];
    for (int64_t b = 0; b < n; b += BLOCK) {
        const int64_t m = std::min(BLOCK, n - b);
        if (k == 0.f) {  // excluded row: exact zeros whatever the inputs hold
            for (int64_t i = 0; i < m; ++i) buf[i] = 0.f;
        } else {
            for (int64_t i = 0; i < m; ++i) buf[i] = k * (ld(p, b + i) - ld(t, b + i));
        }
        if (gp) for (int64_t i = 0; i < m; ++i) st(gp, b + i, buf[i]);
        if (gt) for (int64_t i = 0; i < m; ++i) st(gt, b + i, -buf[i]);
    }
}

int thread_count(int threads, int64_t total, int64_t items) {
    if (threads <= 0) threads = static_cast<int>(std::max(1u, ::fastsoup::ws::hardware_threads()));
    const int64_t by_size = std::max<int64_t>(1, total / MIN_PER_THREAD);
    return static_cast<int>(std::min<int64_t>({threads, by_size, items}));
}

// Runs fn(item) for item in [0, items) over nt threads (contiguous ranges).
template <typename F>
void parallel_items(int64_t items, int nt, F&& fn) {
    if (nt <= 1) {
        for (int64_t it = 0; it < items; ++it) fn(it);
        return;
    }
    std::vector<std::thread> pool;
    pool.reserve(nt - 1);
    auto range = [&](int r) {
        const int64_t lo = items * r / nt, hi = items * (r + 1) / nt;
        for (int64_t it = lo; it < hi; ++it) fn(it);
    };
    for (int r = 1; r < nt; ++r) pool.emplace_back(range, r);
    range(0);
    for (auto& th : pool) th.join();
}

// Calls f(P, T) with pred and target cast to the element types of their dtype codes.
template <typename F>
void with_rows(const void* pred, int pd, const void* target, int td, F&& f) {
    auto inner = [&](auto tp) {
        using TP = decltype(tp);
        const TP* P = static_cast<const TP*>(pred);
        switch (td) {
            case ws::F32: f(P, static_cast<const float*>(target)); break;
            case ws::F16: f(P, static_cast<const _Float16*>(target)); break;
            case ws::BF16: f(P, static_cast<const uint16_t*>(target)); break;
        }
    };
    switch (pd) {
        case ws::F32: inner(float{}); break;
        case ws::F16: inner(_Float16{}); break;
        case ws::BF16: inner(uint16_t{}); break;
    }
}

template <typename T>
using elem_t = std::remove_const_t<std::remove_pointer_t<T>>;

}  // namespace

void forward(const void* pred, int pred_dtype, int64_t pred_row_stride,
             const void* target, int target_dtype, int64_t target_row_stride,
             float* out, int64_t B, int64_t D, int threads) {
    if (B <= 0) return;
    const int64_t per_row = std::max<int64_t>(1, (D + CHUNK - 1) / CHUNK);
    const int64_t items = B * per_row;
    std::vector<double> partial(static_cast<size_t>(items), 0.0);
    const int nt = thread_count(threads, B * D, items);
    with_rows(pred, pred_dtype, target, target_dtype, [&](auto P, auto T) {
        parallel_items(items, nt, [&](int64_t it) {
            const int64_t b = it / per_row, c = it % per_row;
            const int64_t lo = c * CHUNK, n = std::min(CHUNK, D - lo);
            if (n > 0) partial[it] = chunk_sum(P + b * pred_row_stride + lo, T + b * target_row_stride + lo, n);
        });
    });
    for (int64_t b = 0; b < B; ++b) {
        double s = 0.0;
        for (int64_t c = 0; c < per_row; ++c) s += partial[b * per_row + c];
        out[b] = static_cast<float>(D > 0 ? s / static_cast<double>(D) : 0.0);
    }
}

void backward(const void* pred, int pred_dtype, int64_t pred_row_stride,
              const void* target, int target_dtype, int64_t target_row_stride,
              const float* coef, void* grad_pred, int64_t grad_pred_row_stride,
              void* grad_target, int64_t grad_target_row_stride,
              int64_t B, int64_t D, int threads) {
    if (B <= 0 || D <= 0) return;
    const int64_t per_row = (D + CHUNK - 1) / CHUNK;
    const int64_t items = B * per_row;
    const int nt = thread_count(threads, B * D, items);
    with_rows(pred, pred_dtype, target, target_dtype, [&](auto P, auto T) {
        auto* GP = static_cast<elem_t<decltype(P)>*>(grad_pred);
        auto* GT = static_cast<elem_t<decltype(T)>*>(grad_target);
        parallel_items(items, nt, [&](int64_t it) {
            const int64_t b = it / per_row, c = it % per_row;
            const int64_t lo = c * CHUNK, n = std::min(CHUNK, D - lo);
            chunk_grad(P + b * pred_row_stride + lo, T + b * target_row_stride + lo, coef[b],
                       GP ? GP + b * grad_pred_row_stride + lo : nullptr,
                       GT ? GT + b * grad_target_row_stride + lo : nullptr, n);
        });
    });
}

}  // namespace mse
}  // namespace fastsoup
