"""fs.weighted_sum_ (reference and Triton under the interpreter), the fused CPU kernel
fastsoup._C.weighted_sum, and the CUDA source (compiled with nvcc where present)."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import fastsoup as fs
from fastsoup import _C
from fastsoup.kernels import abi
from fastsoup.ops import weighted_sum as ws_mod
from tests.helpers import bf16_from_f64, bf16_round

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
SHAPES = [(3, 5), (1000,), (2, 3, 7), (0,), (4097,), (1,)]


def _fp32_oracle(xs, w, out_dtype):
    acc = np.float32(w[0]) * xs[0].float().numpy()
    for x, c in zip(xs[1:], w[1:]):
        acc = acc + np.float32(c) * x.float().numpy()
    acc = acc.astype(np.float32)
    if out_dtype == torch.bfloat16:
        return torch.from_numpy(bf16_round(acc)).to(torch.bfloat16)
    return torch.from_numpy(acc).to(out_dtype)


def _np(t):
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


# ------------------------------------------------------------------------- _C kernel
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_dtypes", [(torch.bfloat16,) * 3, (torch.float16,) * 2,
                                       (torch.float32, torch.bfloat16, torch.float16, torch.float64)])
@pytest.mark.parametrize("n", [1, 2047, 2049, 300_001])
def test_cpu_kernel_bit_exact(out_dtype, in_dtypes, n):
    g = torch.Generator().manual_seed(n)
    xs = [(torch.randn(n, generator=g) * 3).to(d) for d in in_dtypes]
    w = [0.7, -0.2, 1.3, 0.05][: len(xs)]
    out = torch.empty(n, dtype=out_dtype)
    _C.weighted_sum(_np(out), CODES[out_dtype], [_np(x) for x in xs], [CODES[d] for d in in_dtypes],
                    w, n, 2, False)
    exp = _fp32_oracle(xs, w, out_dtype)
    assert torch.equal(out.view(torch.uint8), exp.view(torch.uint8))


def test_cpu_kernel_fp64_accumulation_rounds_once():
    n = 50_000
    xs = [torch.randn(n).bfloat16() for _ in range(3)]
    out = torch.empty(n, dtype=torch.bfloat16)
    _C.weighted_sum(_np(out), 2, [_np(x) for x in xs], [2] * 3, [1 / 3] * 3, n, 2, True)
    e = sum((1 / 3) * x.double().numpy() for x in xs)
    assert torch.equal(out, bf16_from_f64(e))


def test_cpu_kernel_special_values():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.4e38, 1e-40, -0.0])
    out = torch.empty(6, dtype=torch.bfloat16)
    _C.weighted_sum(_np(out), 2, [x.numpy(), x.numpy()], [0, 0], [1.0, 1.0], 6, 1, False)
    got = out.float()
    assert torch.isnan(got[0]) and got[1] == float("inf") and got[2] == -float("inf")
    assert got[3] == float("inf")  # 6.8e38 overflows
    out16 = torch.empty(6, dtype=torch.float16)
    _C.weighted_sum(_np(out16), 1, [x.numpy()], [0], [1.0], 6, 1, False)
    assert torch.isnan(out16[0]) and out16[3] == float("inf") and out16[4] == 0


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_kernel_register_tiles_match_the_block_path(in_dtype, out_dtype):
    """Inputs of one dtype take the register tiles (AVX2 builds); the same values with one
    input widened exactly to another dtype take the block path. Every 16-bit pattern
    (NaN payloads, infinities, subnormals, ties) and random fp32 patterns, with weights
    that overflow, underflow to subnormals and cancel: the two paths agree bit for bit
    (a NaN's payload too, but where two NaNs meet), tails past the last tile included."""
    n = 65536 + 29
    g = torch.Generator().manual_seed(7)
    if in_dtype == torch.float32:
        x = torch.randint(-2**31, 2**31, (n,), dtype=torch.int64, generator=g).to(torch.int32)
        x = x.view(torch.float32)
        wide = torch.float64
    else:
        x = torch.arange(n, dtype=torch.int32).remainder(65536).to(torch.int16).view(in_dtype)
        wide = torch.float32
    y = (torch.randn(n, generator=g) * 3).to(in_dtype)
    z = x.flip(0).contiguous()
    for w in ([1.0, 0.5, -2.0], [3e38, 3e38, 1.0], [1e-30, 1e-8, 0.0], [0.25, -0.25, 1.0]):
        tiles = torch.empty(n, dtype=out_dtype)
        block = torch.empty(n, dtype=out_dtype)
        _C.weighted_sum(_np(tiles), CODES[out_dtype], [_np(x), _np(y), _np(z)], [CODES[in_dtype]] * 3,
                        w, n, 1, False)
        y_wide = y.to(wide)  # exact: the block path reads the same values
        _C.weighted_sum(_np(block), CODES[out_dtype], [_np(x), y_wide.numpy(), _np(z)],
                        [CODES[in_dtype], CODES[wide], CODES[in_dtype]], w, n, 1, False)
        # where two NaNs meet, which payload survives is the compiler's choice of operand
        # order (C++ leaves it open; both paths may differ there): NaN is all that is owed
        both_nan = tiles.float().isnan() & block.float().isnan()
        same = (_bits(tiles) == _bits(block)) | both_nan
        assert same.all() and (tiles.float().isnan() == block.float().isnan()).all(), w


@pytest.mark.parametrize("offset", [1, 2, 3, 6])
def test_cpu_kernel_unaligned_buffers(offset):
    """The merge hands the kernel slices at any byte offset (a safetensors tensor may start
    anywhere): inputs and output shifted off their alignment give the same bytes."""
    n = 1000 + 5
    g = torch.Generator().manual_seed(offset)
    xs = [(torch.randn(n, generator=g) * 3).bfloat16() for _ in range(3)]
    w = [0.5, -0.25, 1.5]
    want = torch.empty(n, dtype=torch.bfloat16)
    _C.weighted_sum(_np(want), 2, [_np(x) for x in xs], [2] * 3, w, n, 1, False)

    def shifted(data: bytes, k: int) -> np.ndarray:  # the bytes at an odd/even offset
        raw = np.zeros(len(data) + 64, np.uint8)
        at = offset + 5 * k
        raw[at:at + len(data)] = np.frombuffer(data, np.uint8)
        return raw[at:at + len(data)]

    ins = [shifted(_np(x).tobytes(), k) for k, x in enumerate(xs)]
    out = shifted(bytes(2 * n), 3)
    _C.weighted_sum(out, 2, ins, [2] * 3, w, n, 1, False)
    assert out.tobytes() == _np(want).tobytes()


def test_cpu_kernel_many_inputs():
    """More inputs than the register tiles keep weights for on the stack."""
    k, n = 70, 1000
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(n, generator=g).bfloat16() for _ in range(k)]
    w = [(i % 7 - 3) / 11 for i in range(k)]
    out = torch.empty(n, dtype=torch.bfloat16)
    _C.weighted_sum(_np(out), 2, [_np(x) for x in xs], [2] * k, w, n, 1, False)
    assert torch.equal(out, _fp32_oracle(xs, w, torch.bfloat16))


def test_cpu_kernel_is_compiled_without_fma():
    """The two variants of the CPU kernel give the same bits because neither contracts
    a product and a sum into an FMA (one rounding instead of two): none in the compiled
    code of ``fastsoup::ws``; and the AVX2 variant works on 256-bit registers."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    text = subprocess.run([objdump, "-d", "-C", "--no-show-raw-insn", _C.__file__],
                          capture_output=True, text=True, check=True).stdout
    funcs, name = {}, None
    for line in text.splitlines():
        if line.endswith(">:"):
            name = line
            funcs[name] = []
        elif name is not None:
            funcs[name].append(line)
    kernel = {k: v for k, v in funcs.items() if "fastsoup::ws::" in k}
    assert any("avx2::" in k for k in kernel) or not any("avx2" in k for k in funcs)
    assert kernel, "no fastsoup::ws function found in the extension"
    fused = [k for k, body in kernel.items()
             if any(op in ln for ln in body for op in ("vfmadd", "vfmsub", "vfnmadd", "vfnmsub"))]
    assert not fused, fused
    # the AVX2 variant multiplies and adds 8 fp32 at a time (256-bit registers)
    avx2 = [ln for k, body in kernel.items() if "avx2::run_range_t<float>" in k for ln in body]
    if avx2:
        assert any("vmulps" in ln and "%ymm" in ln for ln in avx2)
        assert any("vaddps" in ln and "%ymm" in ln for ln in avx2)


def test_cpu_kernel_checks_buffers():
    a = np.zeros(10, np.float32)
    with pytest.raises(ValueError, match="needs 40"):
        _C.weighted_sum(np.zeros(5, np.float32), 0, [a], [0], [1.0], 10)
    with pytest.raises(ValueError, match="input 0 holds 20 bytes"):
        _C.weighted_sum(a, 0, [np.zeros(5, np.float32)], [0], [1.0], 10)
    with pytest.raises(ValueError, match="unknown dtype code"):
        _C.weighted_sum(a, 0, [a.copy()], [9], [1.0], 10)
    with pytest.raises(ValueError, match="overlaps out"):
        _C.weighted_sum(a, 0, [a], [0], [1.0], 10)
    with pytest.raises(TypeError, match="writable"):
        _C.weighted_sum(bytes(40), 0, [a], [0], [1.0], 10)
    with pytest.raises(ValueError, match="differ in length"):
        _C.weighted_sum(a, 0, [a.copy()], [0, 0], [1.0], 10)
    assert _C.weighted_sum_simd() in ("avx2+f16c", "generic")


# ------------------------------------------------------------------------ public op
def _lists(in_dtype, out_dtype, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ins = [[torch.randn(s, generator=g).to(in_dtype) for s in SHAPES] for _ in range(K)]
    outs = [torch.empty(s, dtype=out_dtype) for s in SHAPES]
    return outs, ins


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_reference(out_dtype):
    outs, ins = _lists(torch.float16, out_dtype)
    w = [0.5, -0.25, 1.5]
    assert fs.weighted_sum_(outs, ins, w) is outs
    for p in range(len(SHAPES)):
        exp = sum(w[k] * ins[k][p].double() for k in range(3))
        tol = {torch.float32: 1e-6, torch.bfloat16: 2**-7, torch.float64: 1e-12}[out_dtype]
        assert torch.allclose(outs[p].double(), exp, rtol=tol, atol=tol)


def test_in_place_into_a_replica_and_tensor_weights():
    outs, ins = _lists(torch.float32, torch.float32)
    ins[0] = [t.clone() for t in ins[0]]
    expected = [sum(ins[k][p] * (1 / 3) for k in range(3)) for p in range(len(SHAPES))]
    fs.weighted_sum_(ins[0], ins, torch.full((3,), 1 / 3))
    for p in range(len(SHAPES)):
        assert torch.allclose(ins[0][p], expected[p], atol=1e-6)


def test_argument_errors():
    outs, ins = _lists(torch.float32, torch.float32)
    with pytest.raises(ValueError, match="got 2 weights for 3 input lists"):
        fs.weighted_sum_(outs, ins, [1.0, 2.0])
    with pytest.raises(ValueError, match=r"inputs\[1\] has 5 tensors"):
        fs.weighted_sum_(outs, [ins[0], ins[1][:5], ins[2]], [1, 1, 1])
    bad = [list(x) for x in ins]
    bad[2][1] = torch.zeros(999)
    with pytest.raises(ValueError, match=r"inputs\[2\]\[1\] has shape \(999,\)"):
        fs.weighted_sum_(outs, bad, [1, 1, 1])
    bad[2][1] = torch.zeros(1000, dtype=torch.int32)
    with pytest.raises(TypeError, match="floating"):
        fs.weighted_sum_(outs, bad, [1, 1, 1])
    with pytest.raises(TypeError, match="list"):
        fs.weighted_sum_(outs[0], ins, [1, 1, 1])


def test_custom_op_registration():
    outs, ins = _lists(torch.float32, torch.float32, K=2)
    flat = [t for inp in ins for t in inp]
    torch.library.opcheck(ws_mod._weighted_sum_op, (outs, flat, [0.5, 0.5]),
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------- Triton (interpreter)
@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.float32, torch.float32),
                                                 (torch.float16, torch.float16),
                                                 (torch.float16, torch.float32),
                                                 (torch.float32, torch.float16)])
def test_triton_matches_reference(triton_device, in_dtype, out_dtype, monkeypatch):
    from fastsoup.kernels.triton import weighted_sum as tws

    launches = []
    orig = tws.weighted_sum_multi
    monkeypatch.setattr(tws, "weighted_sum_multi",
                        lambda *a: (launches.append(len(a[0])), orig(*a))[1])
    outs, ins = _lists(in_dtype, out_dtype, K=3, seed=3)
    outs = [o.to(triton_device) for o in outs]
    ins = [[t.to(triton_device) for t in inp] for inp in ins]
    w = [0.5, -0.25, 1.5]
    with fs.use_backend("triton"):
        fs.weighted_sum_(outs, ins, w)
    assert launches == [len(SHAPES)]  # one launch for the whole list
    for p in range(len(SHAPES)):
        exp = sum(w[k] * ins[k][p].double() for k in range(3))
        tol = 1e-6 if out_dtype == torch.float32 else 2**-10
        assert torch.allclose(outs[p].double().cpu(), exp.cpu(), rtol=tol, atol=tol), p


def test_triton_mixed_dtypes_and_non_contiguous(triton_device):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 8, generator=g)
    outs = [torch.empty(8, 6).t(), torch.empty(33)]  # a non-contiguous output
    ins = [[base.to(triton_device), torch.randn(33, generator=g)],
           [base.half().to(triton_device), torch.randn(33, generator=g).half()]]
    outs = [o.to(triton_device) for o in outs]
    with fs.use_backend("triton"):
        fs.weighted_sum_(outs, ins, [0.25, 0.75])
    for p in range(2):
        exp = 0.25 * ins[0][p].double() + 0.75 * ins[1][p].double()
        assert torch.allclose(outs[p].double(), exp, atol=1e-3)


def test_triton_block_tables():
    from fastsoup.kernels.layout import weighted_sum_tables

    outs = [torch.empty(n) for n in (0, 5, 2048, 1)]
    _, _, bt, bs = weighted_sum_tables(outs, [outs], 1024)
    assert bt.tolist() == [1, 2, 2, 3] and bs.tolist() == [0, 0, 1024, 0]


# ------------------------------------------------------------------------ CUDA source
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
def test_cuda_weighted_sum_compiles(tmp_path):
    src = os.path.join(ROOT, "csrc", "cuda", "weighted_sum.cu")
    out = tmp_path / "weighted_sum.o"
    res = subprocess.run(["nvcc", "-c", "-std=c++17", "-O2", "-arch=sm_90", "-Werror=all-warnings",
                          "-I", os.path.join(ROOT, "csrc", "include"),
                          src, "-o", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    sym = subprocess.run(["nm", str(out)], capture_output=True, text=True).stdout
    assert "fastsoup_weighted_sum" in sym


def test_cuda_glue_tables(monkeypatch):
    """ops/weighted_sum.py's CUDA path, with a stand-in for fastsoup._cuda that follows the
    kernel's contract on CPU (reads the pointer table through the tensors' addresses)."""
    from fastsoup.kernels import _ext

    outs, ins = _lists(torch.float16, torch.float32, K=2, seed=9)
    by_ptr = {t.data_ptr(): t for t in outs + [x for inp in ins for x in inp] if t.numel()}

    def fake(table, numel, bt, bs, w, in_codes, K, out_code):
        assert in_codes.tolist() == [abi.dtype_code(inp[0].dtype) for inp in ins]
        assert table.shape == (len(outs), K + 1) and bt.numel() == bs.numel()
        for b in range(bt.numel()):
            p, start = int(bt[b]), int(bs[b])
            n = int(numel[p])
            if n == 0:
                continue
            end = min(n, start + abi.WEIGHTED_SUM_CUDA_BLOCK)
            o = by_ptr[int(table[p, 0])].view(-1)
            acc = sum(float(w[k]) * by_ptr[int(table[p, 1 + k])].view(-1)[start:end].float()
                      for k in range(K))
            o[start:end] = acc.to(o.dtype)

    class Fake:
        weighted_sum = staticmethod(fake)

    monkeypatch.setattr(_ext, "cuda_ext", lambda warn=False: Fake())
    ws_mod._fused("cuda", outs, ins, [0.3, 0.7])
    for p in range(len(SHAPES)):
        exp = 0.3 * ins[0][p].float() + 0.7 * ins[1][p].float()
        assert torch.allclose(outs[p], exp, atol=1e-6)


def test_cpu_path_uses_the_fused_kernel_bit_exact(monkeypatch):
    """Contiguous, non-aliased CPU lists run fastsoup._C: bit-identical to the fp32 oracle."""
    from fastsoup.kernels import _ext

    calls = []
    real = _ext.cpu_ext(warn=False)

    class Spy:
        def weighted_sum_list(self, *a, **k):
            calls.append(list(a[5]))
            return real.weighted_sum_list(*a, **k)

    monkeypatch.setattr(_ext, "cpu_ext", lambda warn=True: Spy())
    outs, ins = _lists(torch.bfloat16, torch.bfloat16, K=3, seed=5)
    w = [0.2, 0.3, 0.5]
    fs.weighted_sum_(outs, ins, w)
    assert calls == [[o.numel() for o in outs if o.numel()]]  # one call for the list
    for p, o in enumerate(outs):
        exp = _fp32_oracle([ins[k][p].reshape(-1) for k in range(3)], w, torch.bfloat16)
        assert torch.equal(o.reshape(-1).view(torch.int16), exp.view(torch.int16)), p
    calls.clear()
    fs.weighted_sum_(ins[0], ins, w)  # in place: the reference
    assert calls == []


@pytest.mark.parametrize("list_kernel", [True, False])
def test_cpu_lists_of_mixed_dtypes_and_sizes(monkeypatch, list_kernel):
    """One kernel call for the lists (with an extension built without it: the reference,
    no kernel call): outputs of different dtypes, inputs of different dtypes per position,
    empty tensors between, views at storage offsets; each output bit-identical to the fp32
    oracle (the reference's own bits without the kernel)."""
    from fastsoup.kernels import _ext

    real = _ext.cpu_ext(warn=False)
    calls = []

    class Ext:  # the extension, counting its calls; without the list kernel: as built before it
        def weighted_sum(self, *a, **k):
            calls.append("one")
            return real.weighted_sum(*a, **k)

        if list_kernel:
            def weighted_sum_list(self, *a, **k):
                calls.append("list")
                return real.weighted_sum_list(*a, **k)

    monkeypatch.setattr(_ext, "cpu_ext", lambda warn=True: Ext())
    g = torch.Generator().manual_seed(11)
    sizes = [5, 0, 4099, 1, 70]
    base = torch.randn(10_000, generator=g)
    ins = [[base[7:7 + n].bfloat16() if p % 2 else (torch.randn(n, generator=g) * 2).half()
            for p, n in enumerate(sizes)],
           [torch.randn(n, generator=g) for n in sizes],
           [torch.randn(n, generator=g).bfloat16() for n in sizes]]
    store = torch.empty(20_000, dtype=torch.bfloat16)
    outs = [torch.empty(sizes[0]), torch.empty(0, dtype=torch.float16),
            store[3:3 + sizes[2]], torch.empty(1, dtype=torch.float16), torch.empty(70)]
    w = [0.7, -0.2, 1.3]
    fs.weighted_sum_(outs, ins, w)
    assert calls == (["list"] if list_kernel else [])
    ref = [torch.empty_like(o) for o in outs]
    ws_mod.reference_weighted_sum_(ref, ins, w)
    for p, o in enumerate(outs):
        # the kernel: the fp32 oracle's bits; without it, the reference's
        exp = _fp32_oracle([ins[k][p] for k in range(3)], w, o.dtype) if list_kernel else ref[p]
        assert torch.equal(_bits(o), _bits(exp)), p


def test_the_op_called_directly_never_reads_past_an_input():
    """``torch.ops.fastsoup.weighted_sum_`` skips the public checks: an input smaller than
    its output is an error, not a read past its end."""
    import fastsoup.ops.weighted_sum  # noqa: F401  (registers the op)

    out = torch.zeros(10)
    with pytest.raises(ValueError, match="as many elements"):
        torch.ops.fastsoup.weighted_sum_([out], [torch.ones(5)], [1.0])
    assert torch.equal(out, torch.zeros(10))


def test_cpu_list_kernel_checks_its_arguments():
    f32, a = 0, torch.zeros(4)
    ptr = a.data_ptr()
    for args, match in [(([ptr], [f32], [ptr], [f32], [], [4]), "no inputs"),
                        (([ptr], [f32, f32], [ptr], [f32], [1.0], [4]), "differ in length"),
                        (([ptr], [f32], [ptr, ptr], [f32], [1.0], [4]), "len\\(weights\\)"),
                        (([ptr], [9], [ptr], [f32], [1.0], [4]), "output 0"),
                        (([ptr], [f32], [ptr], [9], [1.0], [4]), "input 0 of output 0"),
                        (([ptr], [f32], [ptr], [f32], [1.0], [-1]), "negative")]:
        with pytest.raises(ValueError, match=match):
            _C.weighted_sum_list(*args)


# --------------------------------------------------------------------- on a GPU only
@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("in_dtype, out_dtype", [(torch.bfloat16, torch.bfloat16),
                                                 (torch.float16, torch.float32),
                                                 (torch.float32, torch.bfloat16)])
def test_gpu_backends_match_the_fp32_oracle(backend, in_dtype, out_dtype):
    shapes = [(4096, 4097), (1,), (3, 5, 7), (0,), (2**21 + 3,)] + [(1280,)] * 200
    g = torch.Generator().manual_seed(0)
    ins_cpu = [[torch.randn(s, generator=g).to(in_dtype) for s in shapes] for _ in range(5)]
    w = [0.3, -0.1, 0.5, 0.2, 0.1]
    outs = [torch.empty(s, dtype=out_dtype, device="cuda") for s in shapes]
    ins = [[t.cuda() for t in inp] for inp in ins_cpu]
    with fs.use_backend(backend, op="weighted_sum"):
        fs.weighted_sum_(outs, ins, w)
    torch.cuda.synchronize()
    for p, o in enumerate(outs):
        if o.numel() == 0:
            continue
        exp = _fp32_oracle([ins_cpu[k][p].reshape(-1) for k in range(5)], w, out_dtype)
        # GPU kernels may contract w*x + acc into an FMA: allow one output ulp
        got = o.cpu().reshape(-1).double()
        ref = exp.double()
        tol = {torch.bfloat16: 2**-7, torch.float32: 2**-22}[out_dtype] * ref.abs().clamp_min(1e-3)
        assert torch.all((got - ref).abs() <= tol + 1e-6), p


@pytest.mark.cuda
def test_gpu_in_place_average_of_replicas():
    reps = [[torch.randn(1000, 1000, device="cuda").bfloat16() for _ in range(3)] for _ in range(4)]
    exp = [sum(r[p].float() for r in reps) / 4 for p in range(3)]
    fs.weighted_sum_(reps[0], reps, [0.25] * 4)
    for p in range(3):
        assert torch.allclose(reps[0][p].float(), exp[p], atol=2e-2, rtol=1e-2)


# ------------------------------------------------------------------------ aliasing
def _alias_backends():
    backends = ["reference"]
    try:
        import triton  # noqa: F401

        backends.append("triton")
    except Exception:
        pass
    return backends


@pytest.mark.parametrize("backend", _alias_backends())
def test_output_aliasing_an_input_at_another_position_is_staged(backend):
    """Tied weights listed twice: outs[0] is inputs[k][1]. Every backend computes from the
    inputs as they were, not from an output written earlier in the call."""
    if backend == "triton" and not __import__("fastsoup._backend", fromlist=["x"]).interpreter_active():
        pytest.skip("the Triton interpreter is off")
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([11.0, 12.0, 13.0])
    with fs.use_backend(backend):
        fs.weighted_sum_([a, b], [[b, a], [b, a]], [0.5, 0.5])   # a swap
    assert a.tolist() == [11.0, 12.0, 13.0] and b.tolist() == [1.0, 2.0, 3.0]
    x = torch.tensor([2.0, 4.0, 6.0])
    y = torch.tensor([10.0, 10.0, 10.0])
    with fs.use_backend(backend):
        fs.weighted_sum_([x, y], [[x, x], [y, x]], [0.5, 0.5])
    assert x.tolist() == [6.0, 7.0, 8.0] and y.tolist() == [2.0, 4.0, 6.0]


def test_outputs_sharing_memory_are_refused():
    w = torch.zeros(4)
    with pytest.raises(ValueError, match="share memory"):
        fs.weighted_sum_([w[:3], w[1:]], [[torch.ones(3), torch.ones(3)]], [1.0])


def test_in_place_output_at_its_own_position_still_runs_in_place():
    a = torch.tensor([1.0, 2.0])
    b = torch.tensor([3.0, 4.0])
    fs.weighted_sum_([a], [[a], [b]], [0.5, 0.5])
    assert a.tolist() == [2.0, 3.0]


def test_mixed_input_dtypes_are_read_in_their_own_dtype(monkeypatch):
    """bf16 and fp32 inputs in one call: the Triton kernel reads each in its own dtype
    (no float32 copy of the bf16 input) and matches the reference."""
    pytest.importorskip("triton")
    from fastsoup import _backend
    from fastsoup.ops import weighted_sum as ws

    if not _backend.interpreter_active():
        pytest.skip("the Triton interpreter is off")
    torch.manual_seed(3)
    shapes = [(3, 5), (1030,), (7,)]
    a = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    b = [torch.randn(s) for s in shapes]
    outs = [torch.empty(s) for s in shapes]
    ref = [torch.empty(s) for s in shapes]
    ws.reference_weighted_sum_(ref, [a, b], [0.25, 0.75])
    copies = []
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *x, **k: copies.append(self.dtype) or real_to(self, *x, **k))
    with fs.use_backend("triton"):
        fs.weighted_sum_(outs, [a, b], [0.25, 0.75])
    monkeypatch.undo()
    assert torch.bfloat16 not in copies
    for o, r in zip(outs, ref):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-7)


def test_repeated_calls_reuse_the_checks_and_a_changed_list_is_checked_again(monkeypatch):
    from fastsoup.ops import weighted_sum as ws

    ws._SEEN.clear()
    calls = []
    real_check, real_hazards = ws._check, ws._hazards
    monkeypatch.setattr(ws, "_check", lambda *a: calls.append("check") or real_check(*a))
    monkeypatch.setattr(ws, "_hazards", lambda *a: calls.append("hazards") or real_hazards(*a))
    outs = [torch.zeros(3), torch.zeros(2, 2)]
    ins = [[torch.ones(3), torch.ones(2, 2)], [torch.full((3,), 3.0), torch.full((2, 2), 3.0)]]
    for _ in range(3):
        fs.weighted_sum_(outs, ins, [0.5, 0.5])
    assert calls == ["check", "hazards"] and outs[0].tolist() == [2.0, 2.0, 2.0]
    ins[1][1] = torch.ones(4)                       # a new tensor: checked again, refused
    with pytest.raises(ValueError, match=r"inputs\[1\]\[1\] has shape"):
        fs.weighted_sum_(outs, ins, [0.5, 0.5])
    ins[1][1] = outs[0][:2].view(2, 1).expand(2, 2)  # now overlaps outs[0]: staged
    fs.weighted_sum_(outs, ins, [0.5, 0.5])
    assert outs[1].tolist() == [[1.5, 1.5], [1.5, 1.5]]
