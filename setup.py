"""Build fastsoup's compiled extensions.

* ``fastsoup._C``: pybind11 CPU kernels from ``csrc/cpu`` (no torch headers), always built.
* ``fastsoup._cuda``: CUDA kernels from ``csrc/cuda``, built only when the installed torch
  is a CUDA build and CUDA_HOME resolves. ``FASTSOUP_SKIP_CUDA_BUILD=1`` opts out.

Both are optional at import time: a missing extension gives one warning and the next-best
backend (see ``fastsoup/_backend.py``).
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _truthy(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def cpu_extension():
    from pybind11.setup_helpers import Pybind11Extension

    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    extra = ["-O3", "-fvisibility=hidden", "-fno-math-errno"]
    if sys.platform != "win32":
        extra.append("-pthread")
    return Pybind11Extension(
        "fastsoup._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "cpu")],
        extra_compile_args=extra,
        extra_link_args=["-pthread"] if sys.platform != "win32" else [],
        cxx_std=17,
    )


def cuda_extension():
    """Return (extension, build_ext class) or (None, reason)."""
    if _truthy("FASTSOUP_SKIP_CUDA_BUILD"):
        return None, "FASTSOUP_SKIP_CUDA_BUILD is set"
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing at build time
        return None, f"torch is not importable at build time ({exc})"
    if not torch.version.cuda:
        return None, "the installed torch is not a CUDA build"
    if CUDA_HOME is None:
        return None, "CUDA_HOME does not resolve"
    sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
    arch_flags = []
    ext = CUDAExtension(
        "fastsoup._cuda",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc", "cuda")],
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo"] + arch_flags,
        },
    )
    return ext, BuildExtension


def main():
    ext_modules = [cpu_extension()]
    cmdclass = {}
    cuda_ext, extra = cuda_extension()
    if cuda_ext is not None:
        ext_modules.append(cuda_ext)
        cmdclass["build_ext"] = extra.with_options(use_ninja=True)
    else:
        print(f"fastsoup: not building the CUDA extension: {extra}", file=sys.stderr)
    setup(ext_modules=ext_modules, cmdclass=cmdclass)


main()
