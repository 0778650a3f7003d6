"""Contracts of the compiled GPU code, checked without a GPU.

``python -m fastsoup.kernels.inspect --json`` compiles every Triton kernel variant the
launchers issue (captured from real launcher calls and specialised as Triton's JIT
specialises them on a GPU) for sm_90, and the CUDA sources with nvcc, then reads PTX, SASS
and resource usage. What no CPU test can see is asserted here: 128-bit accesses on the
dense paths, no spills, 64-bit offsets, FMA contraction as each launch declares it, and
grids within the hardware limits. Skipped only where triton or nvcc is missing (CI
installs both).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastsoup.kernels import inspect as kinspect  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ROW_KERNELS = ("_mse_partial_kernel", "_mse_grad_kernel", "_bilinear_partial_kernel",
               "_bilinear_grad_kernel", "_linear_kernel")


def _run(backend, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # compile for the GPU target, not the interpreter
    proc = subprocess.run([sys.executable, "-m", "fastsoup.kernels.inspect", "--json",
                           "--backend", backend, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "skipped" in proc.stderr:
        pytest.skip(proc.stderr.strip()[-300:])
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def triton_reports():
    reports = _run("triton")
    assert reports, "no Triton kernel variant was compiled"
    return reports


@pytest.fixture(scope="module")
def cuda_dump(tmp_path_factory):
    if kinspect._tool("nvcc") is None:
        pytest.skip("nvcc not found")
    dump = tmp_path_factory.mktemp("sass")
    return _run("cuda", "--dump", str(dump)), dump


@pytest.fixture(scope="module")
def cuda_reports(cuda_dump):
    return cuda_dump[0]


def _by_kernel(reports, name):
    found = [r for r in reports if r["kernel"] == name]
    assert found, f"no compiled variant of {name}"
    return found


# ------------------------------------------------------------------------ Triton
def test_every_launcher_variant_is_covered(triton_reports):
    kernels = {r["kernel"] for r in triton_reports}
    assert kernels == set(ROW_KERNELS) | {"_coefficient_kernel", "_weighted_sum_kernel"}


def test_no_spills_and_fusion_declared_on_every_launch(triton_reports):
    for r in triton_reports:
        assert r["local_bytes"] == 0, f"{r['kernel']} [{r['variant']}] spills {r['local_bytes']} B"
        assert r["fp_fusion"] is not None, f"{r['kernel']} launched without enable_fp_fusion"
        assert r["grid_ok"], f"{r['kernel']} grid {r['grid']} exceeds the hardware limits"


def test_dense_paths_use_128_bit_accesses(triton_reports):
    for r in triton_reports:
        if r["kernel"] in ROW_KERNELS and "DENSE=True" in r["variant"] or \
                r["kernel"] == "_weighted_sum_kernel":
            assert r["load_bits"] == 128, f"{r['kernel']} [{r['variant']}] loads {r['loads']}"
            if "partial" not in r["kernel"]:  # partial sums store one fp32 per program
                assert r["store_bits"] == 128, f"{r['kernel']} [{r['variant']}] stores {r['stores']}"


def test_block_offsets_are_64_bit(triton_reports):
    # The coefficient kernel indexes [B, 16] tables (B < 2^31 by the grid limit): its
    # constant column offsets may stay 32-bit. Every kernel that walks tensor elements
    # must address them with 64-bit offsets.
    for r in triton_reports:
        if r["kernel"] != "_coefficient_kernel":
            assert r["vector_offsets_i32"] == 0, f"{r['kernel']} [{r['variant']}]"


def test_fma_contraction_as_declared(triton_reports):
    for r in _by_kernel(triton_reports, "_coefficient_kernel"):
        # the float64 formulas must round as the reference and the interpreter do
        assert r["fp_fusion"] is False and r["fma"] == 0, r["variant"]
    for r in _by_kernel(triton_reports, "_weighted_sum_kernel"):
        # acc + w*x rounded twice: bit-identical to the CPU kernel and the reference
        assert r["fp_fusion"] is False and r["fma"] == 0, r["variant"]
    for r in _by_kernel(triton_reports, "_mse_partial_kernel"):
        assert r["fp_fusion"] is True and r["fma"] > 0, r["variant"]


# ------------------------------------------------------------------------ CUDA
def test_cuda_kernels_do_not_spill(cuda_reports):
    for r in cuda_reports:
        assert r["local_bytes"] == 0, f"{r['kernel']} {r['variant']} spills {r['local_bytes']} B"


def test_cuda_kernels_have_128_bit_paths(cuda_reports):
    for r in cuda_reports:
        assert r["load_bits"] == 128, f"{r['variant']}: {r['loads']}"
        if "forward" not in r["variant"]:
            assert r["store_bits"] == 128, f"{r['variant']}: {r['stores']}"


def test_cuda_weighted_sum_does_not_contract(cuda_reports):
    sums = [r for r in cuda_reports if "weighted_sum_kernel" in r["variant"]]
    assert sums
    for r in sums:
        assert r["fma"] == 0, f"{r['variant']}: {r['fma']} FMA"


# ------------------------------------------------------------------------ the tool
def test_dump_writes_one_file_per_variant(cuda_dump):
    reports, dump = cuda_dump
    names = sorted(os.listdir(dump))
    assert names == sorted(r["name"] + ".sass" for r in reports)
    assert any("weighted_sum" in n for n in names)


def test_resource_usage_parser():
    text = ("Resource usage:\n Common:\n  GLOBAL:0\n Function _k:\n"
            "  REG:40 STACK:8 SHARED:16 LOCAL:4 CONSTANT[0]:560 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert kinspect._parse_resource_usage(text) == {"_k": {"REG": 40, "STACK": 8, "SHARED": 16, "LOCAL": 4}}


def test_ptx_and_sass_widths():
    r = kinspect.KernelReport("k", "v", "triton", 90)
    kinspect.analyse_ptx("@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];\n"
                         "st.global.b16 [ %rd2 + 0 ], %rs1;\nfma.rn.f32 %f1, %f2, %f3, %f4;", r)
    assert (r.load_bits, r.store_bits, r.fma) == (128, 16, 1)
    s = kinspect.KernelReport("k", "v", "cuda", 90)
    kinspect.analyse_sass("LDG.E.128.STRONG.GPU R4, desc[UR4][R2.64] ;\nSTG.E.U16 desc[UR4][R6.64], R9 ;\n"
                          "HFMA2.MMA R5, -RZ, RZ, 0, 0 ;\nFFMA R1, R2, R3, R4 ;\nLD.E R3, desc[UR4][R2.64] ;", s)
    assert (s.load_bits, s.store_bits, s.fma) == (128, 16, 1)
    assert s.loads == {"128": 1, "32": 1}
