// fastsoup._C: CPU kernels exposed through pybind11. Kernels take raw buffers
// (Python buffer protocol / numpy arrays), never torch headers.
#include <pybind11/pybind11.h>

#include <string>
#include <thread>

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
    d["hardware_threads"] = std::thread::hardware_concurrency();
    return d;
}

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastsoup CPU kernels";
    m.def("build_info", &build_info, "Compiler and SIMD level this extension was built with");
}
