// fastsoup._C: CPU kernels exposed through pybind11. Kernels take raw buffers
// (Python buffer protocol / numpy arrays), never torch headers.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "header_columns.h"
#include "per_sample_mse.h"
#include "weighted_sum.h"

namespace py = pybind11;

static py::dict build_info() {
    py::dict d;
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
#if defined(__AVX512F__)
    d["simd"] = "avx512";
#elif defined(__AVX2__)
    d["simd"] = "avx2";
#elif defined(__SSE2__) || defined(__x86_64__)
    d["simd"] = "sse2";
#elif defined(__ARM_NEON)
    d["simd"] = "neon";
#else
    d["simd"] = "none";
#endif
    d["hardware_threads"] = fastsoup::ws::hardware_threads();
    return d;
}

// A contiguous Python buffer (numpy array, memoryview of an mmap, bytearray), held for
// the lifetime of this object. `writable` requests a writable export.
class ByteBuffer {
  public:
    ByteBuffer(const py::handle& obj, bool writable, const char* name) {
        int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
        if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) {
            PyErr_Clear();
            throw py::type_error(std::string(name) + " must be a contiguous" +
                                 (writable ? " writable" : "") + " buffer");
        }
    }
    ~ByteBuffer() { PyBuffer_Release(&view_); }
    ByteBuffer(const ByteBuffer&) = delete;
    ByteBuffer& operator=(const ByteBuffer&) = delete;
    void* data() const { return view_.buf; }
    size_t nbytes() const { return static_cast<size_t>(view_.len); }

  private:
    Py_buffer view_{};
};

static void weighted_sum_py(py::object out, int out_dtype, py::sequence inputs,
                            std::vector<int> in_dtypes, std::vector<double> weights,
                            int64_t n, int threads, bool acc64) {
    namespace ws = fastsoup::ws;
    const size_t K = static_cast<size_t>(py::len(inputs));
    if (K == 0) throw py::value_error("weighted_sum: inputs is empty");
    if (in_dtypes.size() != K || weights.size() != K)
        throw py::value_error("weighted_sum: inputs, in_dtypes and weights differ in length");
    if (n < 0) throw py::value_error("weighted_sum: n must be >= 0");
    if (ws::dtype_size(out_dtype) == 0)
        throw py::value_error("weighted_sum: unknown out_dtype code " + std::to_string(out_dtype));
    ByteBuffer out_buf(out, true, "out");
    if (out_buf.nbytes() < static_cast<size_t>(n) * ws::dtype_size(out_dtype))
        throw py::value_error("weighted_sum: out holds " + std::to_string(out_buf.nbytes()) +
                              " bytes, needs " + std::to_string(n * ws::dtype_size(out_dtype)));
    std::vector<std::unique_ptr<ByteBuffer>> held;
    std::vector<const void*> ptrs;
    const char* lo = static_cast<const char*>(out_buf.data());
    const char* hi = lo + static_cast<size_t>(n) * ws::dtype_size(out_dtype);
    for (size_t k = 0; k < K; ++k) {
        size_t es = ws::dtype_size(in_dtypes[k]);
        if (es == 0)
            throw py::value_error("weighted_sum: unknown dtype code for input " + std::to_string(k));
        held.emplace_back(new ByteBuffer(inputs[k], false, "inputs[k]"));
        size_t need = static_cast<size_t>(n) * es;
        if (held.back()->nbytes() < need)
            throw py::value_error("weighted_sum: input " + std::to_string(k) + " holds " +
                                  std::to_string(held.back()->nbytes()) + " bytes, needs " +
                                  std::to_string(need));
        const char* p = static_cast<const char*>(held.back()->data());
        if (n > 0 && p < hi && lo < p + need)
            throw py::value_error("weighted_sum: input " + std::to_string(k) + " overlaps out");
        ptrs.push_back(p);
    }
    py::gil_scoped_release release;
    ws::weighted_sum(out_buf.data(), out_dtype, ptrs.data(), in_dtypes.data(), weights.data(),
                     static_cast<int>(K), n, threads, acc64);
}

// The multi-tensor sum of fs.weighted_sum_ on CPU tensors, one call per list of P outputs
// and K inputs: raw addresses (torch's data_ptr()), input k of output p at k * P + p. The
// caller (fastsoup/ops/weighted_sum.py) guarantees contiguous tensors of the stated dtypes
// holding numels[p] elements, and no output overlapping an input.
static void weighted_sum_list_py(std::vector<uintptr_t> outs, std::vector<int> out_dtypes,
                                 std::vector<uintptr_t> ins, std::vector<int> in_dtypes,
                                 std::vector<double> weights, std::vector<int64_t> numels,
                                 int threads, bool acc64) {
    namespace ws = fastsoup::ws;
    const size_t P = outs.size(), K = weights.size();
    if (K == 0) throw py::value_error("weighted_sum_list: no inputs");
    if (out_dtypes.size() != P || numels.size() != P)
        throw py::value_error("weighted_sum_list: outs, out_dtypes and numels differ in length");
    if (ins.size() != K * P || in_dtypes.size() != K * P)
        throw py::value_error("weighted_sum_list: ins and in_dtypes need len(weights) * len(outs) "
                              "entries");
    for (size_t p = 0; p < P; ++p) {
        if (ws::dtype_size(out_dtypes[p]) == 0)
            throw py::value_error("weighted_sum_list: unknown dtype code for output " +
                                  std::to_string(p));
        if (numels[p] < 0) throw py::value_error("weighted_sum_list: negative size");
    }
    for (size_t i = 0; i < K * P; ++i)
        if (ws::dtype_size(in_dtypes[i]) == 0)
            throw py::value_error("weighted_sum_list: unknown dtype code for input " +
                                  std::to_string(i / P) + " of output " + std::to_string(i % P));
    py::gil_scoped_release release;
    std::vector<const void*> ptrs(K);
    std::vector<int> dtypes(K);
    for (size_t p = 0; p < P; ++p) {
        if (numels[p] == 0) continue;
        for (size_t k = 0; k < K; ++k) {
            ptrs[k] = reinterpret_cast<const void*>(ins[k * P + p]);
            dtypes[k] = in_dtypes[k * P + p];
        }
        ws::weighted_sum(reinterpret_cast<void*>(outs[p]), out_dtypes[p], ptrs.data(),
                         dtypes.data(), weights.data(), static_cast<int>(K), numels[p], threads,
                         acc64);
    }
}

static uint64_t prefault_py(py::object buf, size_t page) {
    ByteBuffer b(buf, false, "buf");
    py::gil_scoped_release release;
    return fastsoup::ws::prefault(b.data(), b.nbytes(), page);
}

// The per-sample MSE kernels take raw addresses (e.g. torch's data_ptr()): the caller
// (fastsoup/ops/mse.py) guarantees dense rows of the stated dtypes and strides.
static void check_mse_dtype(int code, const char* name) {
    if (code != fastsoup::ws::F32 && code != fastsoup::ws::F16 && code != fastsoup::ws::BF16)
        throw py::value_error(std::string("per_sample_mse: unsupported dtype code for ") + name);
}

static void check_mse_args(int pred_dtype, int target_dtype, int64_t B, int64_t D) {
    check_mse_dtype(pred_dtype, "pred");
    check_mse_dtype(target_dtype, "target");
    if (B < 0 || D < 0) throw py::value_error("per_sample_mse: negative size");
}

static void mse_forward_py(uintptr_t pred, int pred_dtype, int64_t pred_row_stride,
                           uintptr_t target, int target_dtype, int64_t target_row_stride,
                           uintptr_t out, int64_t B, int64_t D, int threads) {
    check_mse_args(pred_dtype, target_dtype, B, D);
    py::gil_scoped_release release;
    fastsoup::mse::forward(reinterpret_cast<const void*>(pred), pred_dtype, pred_row_stride,
                           reinterpret_cast<const void*>(target), target_dtype, target_row_stride,
                           reinterpret_cast<float*>(out), B, D, threads);
}

static void mse_backward_py(uintptr_t pred, int pred_dtype, int64_t pred_row_stride,
                            uintptr_t target, int target_dtype, int64_t target_row_stride,
                            uintptr_t coef, uintptr_t grad_pred, int64_t grad_pred_row_stride,
                            uintptr_t grad_target, int64_t grad_target_row_stride,
                            int64_t B, int64_t D, int threads) {
    check_mse_args(pred_dtype, target_dtype, B, D);
    py::gil_scoped_release release;
    fastsoup::mse::backward(reinterpret_cast<const void*>(pred), pred_dtype, pred_row_stride,
                            reinterpret_cast<const void*>(target), target_dtype, target_row_stride,
                            reinterpret_cast<const float*>(coef), reinterpret_cast<void*>(grad_pred),
                            grad_pred_row_stride, reinterpret_cast<void*>(grad_target),
                            grad_target_row_stride, B, D, threads);
}

PYBIND11_MODULE(_C, m) {
    m.def("abi", &fastsoup_abi_values,
          "The constants of csrc/include/fastsoup_abi.h this extension was built with");
    m.doc() = "fastsoup CPU kernels";
    m.def("build_info", &build_info, "Compiler and SIMD level this extension was built with");
    m.def("weighted_sum", &weighted_sum_py, py::arg("out"), py::arg("out_dtype"),
          py::arg("inputs"), py::arg("in_dtypes"), py::arg("weights"), py::arg("n"),
          py::arg("threads") = 0, py::arg("acc64") = false,
          "out[i] = sum_k weights[k] * inputs[k][i] for i < n, fused, GIL released.\n"
          "Buffers are contiguous; dtype codes: 0 fp32, 1 fp16, 2 bf16, 3 fp64. Accumulates\n"
          "in fp32 (fp64 with acc64) and rounds once to out_dtype (nearest even).");
    m.def("weighted_sum_list", &weighted_sum_list_py, py::arg("outs"), py::arg("out_dtypes"),
          py::arg("ins"), py::arg("in_dtypes"), py::arg("weights"), py::arg("numels"),
          py::arg("threads") = 0, py::arg("acc64") = false,
          "weighted_sum over lists in one call, by raw addresses: outs[p] = sum_k weights[k] *\n"
          "ins[k * len(outs) + p] (numels[p] elements each), GIL released. The caller guarantees\n"
          "contiguous buffers of those sizes and dtypes, outputs apart from inputs.");
    m.def(
        "header_columns",
        [](py::bytes raw, py::dict itemsizes, int64_t data_len) {
            PyObject* r = fastsoup::header_columns(raw.ptr(), itemsizes.ptr(), data_len);
            if (r == nullptr) throw py::error_already_set();
            return py::reinterpret_steal<py::object>(r);
        },
        py::arg("raw"), py::arg("itemsizes"), py::arg("data_len"),
        "(keys, dtypes, shapes, begins, ends, metadata span) of a canonical compact\n"
        "safetensors header whose tensors fill data_len bytes back to back, or None.");
    m.def(
        "tensors_json",
        [](py::object entries) {
            PyObject* r = fastsoup::tensors_json(entries.ptr());
            if (r == nullptr) throw py::error_already_set();
            return py::reinterpret_steal<py::object>(r);
        },
        py::arg("entries"),
        "(text, offsets): the header JSON of (key, dtype, shape, nbytes) entries stored\n"
        "back to back, as json.dumps(separators=(',', ':'), ensure_ascii=False) writes it.");
    m.def("prefault", &prefault_py, py::arg("buf"), py::arg("page") = 4096,
          "Touch one byte per page of a (memory-mapped) buffer, GIL released.");
    m.def("weighted_sum_simd", &fastsoup::ws::simd_variant,
          "Which inner-loop variant weighted_sum uses on this CPU");
    m.def("per_sample_mse_forward", &mse_forward_py, py::arg("pred"), py::arg("pred_dtype"),
          py::arg("pred_row_stride"), py::arg("target"), py::arg("target_dtype"),
          py::arg("target_row_stride"), py::arg("out"), py::arg("B"), py::arg("D"),
          py::arg("threads") = 0,
          "out[b] = mean((pred[b] - target[b])^2) over dense rows (addresses), fp32 out.");
    m.def("per_sample_mse_backward", &mse_backward_py, py::arg("pred"), py::arg("pred_dtype"),
          py::arg("pred_row_stride"), py::arg("target"), py::arg("target_dtype"),
          py::arg("target_row_stride"), py::arg("coef"), py::arg("grad_pred"),
          py::arg("grad_pred_row_stride"), py::arg("grad_target"),
          py::arg("grad_target_row_stride"), py::arg("B"), py::arg("D"), py::arg("threads") = 0,
          "grad_pred = coef[b] (pred - target), grad_target = -grad_pred (0 address: skipped).");
}
