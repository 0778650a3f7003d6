"""Compile every GPU kernel fastsoup launches for a target architecture, without a GPU,
and report what the compiled code does.

    python -m fastsoup.kernels.inspect                 # table, sm_90
    python -m fastsoup.kernels.inspect --json          # one object per kernel variant
    python -m fastsoup.kernels.inspect --dump DIR      # DIR/<variant>.ptx (and .sass)
    python -m fastsoup.kernels.inspect --arch 80 --backend triton

**Triton.** The real launchers of :mod:`fastsoup.kernels.triton` run on CPU tensors of
representative shapes (:data:`SCENARIOS`) with the launch captured instead of executed;
each captured launch is specialised exactly as Triton's JIT specialises it on a GPU (the
same binder: pointer alignment, integer divisibility, constexprs, the launch options
including ``enable_fp_fusion``) and compiled ahead of time for ``GPUTarget("cuda", ARCH,
32)``. So the variants reported are the ones fastsoup launches, not hand-written copies
of their signatures. **CUDA.** ``csrc/cuda/*.cu`` are compiled with ``nvcc -cubin``.

Per variant: registers, local memory (spills), shared memory (from ``cuobjdump
--dump-resource-usage``), the widest global load and store (PTX ``ld.global.v4.b32`` is
128 bits; SASS ``LDG.E.128``), whether address arithmetic is 64-bit, the FMA count of the
PTX/SASS against the declared fusion policy, and the planned grid against the hardware
limits. Needs triton (with its bundled ptxas/cuobjdump) for the Triton part and nvcc for
the CUDA part; each part reports why it was skipped otherwise.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
GRID_LIMITS = (2 ** 31 - 1, 65535, 65535)
SM_COUNT = 132  # H100/H200 SXM: the chunk planner sizes grids for this many SMs


@dataclass
class KernelReport:
    kernel: str                    # kernel function name
    variant: str                   # what distinguishes this launch (dtypes, constexprs)
    backend: str                   # "triton" or "cuda"
    arch: int
    registers: Optional[int] = None
    local_bytes: Optional[int] = None      # spills and stack (0 = no spills)
    shared_bytes: Optional[int] = None
    load_bits: int = 0             # widest global load
    store_bits: int = 0            # widest global store
    loads: Dict[str, int] = field(default_factory=dict)   # width in bits -> count
    stores: Dict[str, int] = field(default_factory=dict)
    int64_address_ops: int = 0     # 64-bit integer multiplies/adds in address arithmetic
    int32_wide_muls: int = 0       # mul.wide.s32/u32: a 32-bit product widened to 64 bits
    vector_offsets_i32: Optional[int] = None  # Triton: block pointer offsets kept in 32 bits
    fma: int = 0                   # fused multiply-adds in the code
    fp_fusion: Optional[bool] = None       # the declared policy (enable_fp_fusion)
    grid: Optional[Tuple[int, int, int]] = None
    grid_ok: Optional[bool] = None
    name: str = ""                 # file-system friendly unique name (for --dump)
    ptx: str = field(default="", repr=False)
    sass: str = field(default="", repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("ptx")
        d.pop("sass")
        return d


# ------------------------------------------------------------------------ code analysis
_PTX_LDST = re.compile(r"\b(ld|st)\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)\b")
_SASS_LDST = re.compile(r"\b(LDG|STG|LD|ST)((?:\.[A-Z0-9_]+)*)")
_SASS_NARROW = {"U8": 8, "S8": 8, "U16": 16, "S16": 16}


def analyse_ptx(ptx: str, report: KernelReport) -> None:
    for op, vec, bits in _PTX_LDST.findall(ptx):
        width = int(vec or 1) * int(bits)
        table = report.loads if op == "ld" else report.stores
        table[str(width)] = table.get(str(width), 0) + 1
    report.load_bits = max((int(w) for w in report.loads), default=0)
    report.store_bits = max((int(w) for w in report.stores), default=0)
    report.int64_address_ops = len(re.findall(r"\b(?:mul|mad)\.lo\.[su]64\b", ptx))
    report.int32_wide_muls = len(re.findall(r"\b(?:mul|mad)\.wide\.[su]32\b", ptx))
    report.fma = len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f(?:32|64)\b", ptx))


def analyse_sass(sass: str, report: KernelReport) -> None:
    """Global loads and stores of SASS: LDG/STG, and generic LD/ST with the .E (64-bit
    address) form that global accesses through a pointer table compile to."""
    for op, mods in _SASS_LDST.findall(sass):
        parts = mods.split(".")[1:]
        if op in ("LD", "ST") and "E" not in parts:
            continue
        width = 32
        for part in parts:
            width = int(part) if part.isdigit() else _SASS_NARROW.get(part, width)
        table = report.loads if op.startswith("LD") else report.stores
        table[str(width)] = table.get(str(width), 0) + 1
    report.load_bits = max((int(w) for w in report.loads), default=0)
    report.store_bits = max((int(w) for w in report.stores), default=0)
    report.int64_address_ops = len(re.findall(r"\bIMAD\.WIDE\b|\bIADD3\.X\b|\bLEA\.HI\.X\b", sass))
    # FFMA/DFMA/HFMA2 with a float result; HFMA2.MMA with zero operands is the compiler's
    # way of moving constants into registers, not arithmetic.
    report.fma = len(re.findall(r"\b(?:FFMA|DFMA|HFMA2(?!\.MMA))\b", sass))


def analyse_ttir(ttir: str, report: KernelReport) -> None:
    """Count ``tt.addptr`` of a block of pointers by 32-bit offsets: element offsets that
    stay in 32 bits overflow past 2^31 elements."""
    report.vector_offsets_i32 = len(re.findall(r"tt\.addptr[^\n]*:\s*tensor<[^\n]*,\s*tensor<[0-9x]+xi32>", ttir))


def _tool(name: str) -> Optional[str]:
    """A CUDA binary tool: Triton's bundled copy, $CUDA_HOME/bin, /usr/local/cuda/bin, PATH."""
    candidates = []
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name))
    except Exception:
        pass
    for root in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", name))
    for path in candidates:
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def resource_usage(cubin: bytes, kernel: str) -> Dict[str, int]:
    """REG / LOCAL / SHARED of ``kernel`` in a cubin, from cuobjdump."""
    tool = _tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True).stdout
    return _parse_resource_usage(text).get(kernel) or next(iter(_parse_resource_usage(text).values()), {})


def _parse_resource_usage(text: str) -> Dict[str, Dict[str, int]]:
    out: Dict[str, Dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = re.search(r"Function ([\w$]+):", line)
        if m:
            current = m.group(1)
            out[current] = {}
            continue
        if current is not None and "REG:" in line:
            for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line):
                out[current][key] = int(value)
    return out


def sass_of(cubin: bytes) -> str:
    tool = _tool("cuobjdump")
    if tool is None:
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout


# ------------------------------------------------------------------------ Triton capture
@dataclass
class Launch:
    fn: object              # the JITFunction
    args: tuple
    kwargs: dict
    grid: Tuple[int, int, int]


@contextlib.contextmanager
def captured_launches(sm_count: int = SM_COUNT) -> Iterator[List[Launch]]:
    """Record ``kernel[grid](...)`` calls instead of running them; the chunk planner sizes
    grids as for a GPU with ``sm_count`` SMs."""
    from triton.runtime.jit import JITFunction

    from . import layout

    launches: List[Launch] = []
    real_run, real_target = JITFunction.run, layout.target_programs

    def run(self, *args, grid, warmup, **kwargs):
        g = tuple(grid) + (1,) * (3 - len(grid))
        launches.append(Launch(self, args, kwargs, g))
        return None

    JITFunction.run = run
    layout.target_programs = lambda device: 8 * sm_count
    try:
        yield launches
    finally:
        JITFunction.run = real_run
        layout.target_programs = real_target


def compile_launch(launch: Launch, arch: int):
    """Compile a captured launch as Triton's JIT would on an sm_``arch`` GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    bound, specialization, _ = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, None)
    src = ASTSource(fn, signature, constexprs, attrs)
    kernel = triton.compile(src, target=target, options=options.__dict__)
    return kernel, options, constexprs, signature


def _variant_text(fn, constexprs: dict, signature: dict) -> str:
    names = fn.arg_names
    def text(v):
        if isinstance(v, tuple):
            return "(" + ",".join(text(x) for x in v) + ")"
        return str(v)

    parts = [f"{names[k[0]]}={text(v)}" for k, v in sorted(constexprs.items())
             if len(k) == 1 and (isinstance(v, (bool, int, str, tuple)) or hasattr(v, "name"))]
    dtypes = sorted({v for k, v in signature.items() if isinstance(v, str) and v.startswith("*")})
    return " ".join(parts + ["ptrs=" + "/".join(d[1:] for d in dtypes)])


# ------------------------------------------------------------------------ scenarios
def _scenarios() -> List[Tuple[str, Callable[[], None]]]:
    """Representative calls of every Triton launcher (CPU tensors; launches captured)."""
    import torch

    from .abi import COEF_COLS, COEF_KINDS
    from .layout import launch_rows
    from .triton import ambient, mse, weighted_sum

    def rows(shape, dtype, n, strided=False):
        def make():
            t = torch.empty(shape, dtype=dtype)
            if strided:  # a channels-last slice: rows are not dense
                t = torch.empty((shape[0], shape[1] * 2) + tuple(shape[2:]), dtype=dtype)[:, ::2]
            return t
        return [make() for _ in range(n)]

    sd_latent = (16, 4, 64, 64)
    out: List[Tuple[str, Callable[[], None]]] = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for strided in (False, True):
            tag = f"mse {str(dtype)[6:]} {'strided' if strided else 'dense'}"

            def fwd(dtype=dtype, strided=strided):
                xs = rows(sd_latent, dtype, 2, strided)
                launch_rows(xs, [], lambda ins, _, lay: mse.mse_forward(*ins, lay))

            def bwd(dtype=dtype, strided=strided):
                xs = rows(sd_latent, dtype, 2, strided)
                gs = [torch.empty_like(x) for x in xs]
                coef = torch.empty(sd_latent[0])
                launch_rows(xs, gs, lambda ins, o, lay: mse.mse_backward(coef, ins[0], ins[1], o[0], o[1], lay))
            out += [(tag + " forward", fwd), (tag + " backward", bwd)]
    def huge_row_with_chunk_override():
        # 2^27 elements in one row with a 1024-element chunk: the planner must keep the
        # grid's y dimension (chunks) within 65535 (the memory is never touched)
        xs = [torch.empty(1, 2 ** 27, dtype=torch.bfloat16) for _ in range(2)]
        launch_rows(xs, [], lambda ins, _, lay: mse.mse_forward(*ins, lay, chunk=1024))
    out.append(("mse bf16 one 2^27-element row, chunk=1024", huge_row_with_chunk_override))
    coef = torch.empty(sd_latent[0], COEF_COLS)
    for dtype, n_in, square, strided in ((torch.bfloat16, 2, True, False),
                                         (torch.float32, 3, True, True),
                                         (torch.float16, 3, False, False),
                                         (torch.bfloat16, 6, False, False)):
        def bil(dtype=dtype, n_in=n_in, square=square, strided=strided):
            xs = rows(sd_latent, dtype, n_in, strided)
            launch_rows(xs, [], lambda ins, _, lay: ambient.bilinear_forward(ins, coef, square, lay))
            grads = [torch.empty_like(x) for x in xs]
            launch_rows(xs, grads, lambda ins, o, lay: ambient.bilinear_backward(
                ins, coef, torch.empty(sd_latent[0]), o, square, lay))
        out.append((f"ambient bilinear {str(dtype)[6:]} n_in={n_in}{' strided' if strided else ''}", bil))
    for n_in, n_out in ((3, 1), (3, 2), (4, 2)):
        def lin(n_in=n_in, n_out=n_out):
            xs = rows(sd_latent, torch.bfloat16, n_in)
            outs = rows(sd_latent, torch.bfloat16, n_out)
            launch_rows(xs, outs, lambda ins, o, lay: ambient.linear_forward(ins, coef, o, lay))
        out.append((f"ambient linear n_in={n_in} n_out={n_out}", lin))
    for kind, n in zip(COEF_KINDS, (4, 4, 2, 4, 3, 5)):
        def coefs(kind=kind, n=n):
            ambient.coefficients(COEF_KINDS.index(kind), [torch.empty(64, dtype=torch.float64)] * n,
                                 64, 0.5, 2)
        out.append((f"ambient coefficients {kind}", coefs))
    sd_params = [(320, 4, 3, 3), (320,), (1280, 320), (77, 768)]
    for in_dts, out_dt in (((torch.bfloat16, torch.bfloat16), torch.bfloat16),
                           ((torch.float32, torch.float32), torch.float32),
                           ((torch.float16, torch.float16), torch.float32),
                           ((torch.bfloat16, torch.float32), torch.bfloat16)):
        def wsum(in_dts=in_dts, out_dt=out_dt):
            outs = [torch.empty(s, dtype=out_dt) for s in sd_params]
            ins = [[torch.empty(s, dtype=dt) for s in sd_params] for dt in in_dts]
            weighted_sum.weighted_sum_multi(outs, ins, torch.empty(len(in_dts)))
        out.append((f"weighted_sum {'+'.join(str(d)[6:] for d in in_dts)}->{str(out_dt)[6:]}", wsum))
    return out


def _declared_fusion(kwargs: dict) -> Optional[bool]:
    value = kwargs.get("enable_fp_fusion")
    return None if value is None else bool(value)


def inspect_triton(arch: int = 90) -> Tuple[List[KernelReport], str]:
    """Reports for every distinct Triton kernel variant the scenarios launch."""
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return [], f"triton is not importable ({exc})"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return [], "TRITON_INTERPRET is set: unset it to compile for a GPU target"
    reports: Dict[str, KernelReport] = {}
    for _, call in _scenarios():
        with captured_launches() as launches:
            call()
        for launch in launches:
            kernel, options, constexprs, signature = compile_launch(launch, arch)
            name = launch.fn.__name__
            variant = _variant_text(launch.fn, constexprs, signature)
            key = f"{name}[{variant}]"
            grid_ok = all(0 < g <= lim for g, lim in zip(launch.grid, GRID_LIMITS))
            if key in reports:  # same compiled variant: keep the largest grid seen
                r = reports[key]
                r.grid_ok = r.grid_ok and grid_ok
                continue
            r = KernelReport(kernel=name, variant=variant, backend="triton", arch=arch,
                             fp_fusion=_declared_fusion(launch.kwargs), grid=launch.grid,
                             grid_ok=grid_ok)
            r.ptx = kernel.asm.get("ptx", "")
            analyse_ptx(r.ptx, r)
            analyse_ttir(kernel.asm.get("ttir", ""), r)
            cubin = kernel.asm.get("cubin")
            if cubin:
                usage = resource_usage(cubin, kernel.metadata.name)
                r.registers = usage.get("REG")
                r.local_bytes = usage.get("LOCAL", 0) + usage.get("STACK", 0) if usage else None
                r.shared_bytes = kernel.metadata.shared
                r.sass = sass_of(cubin)
            r.name = _safe(f"triton_{name}_{len(reports)}")
            reports[key] = r
    return list(reports.values()), ""


# ------------------------------------------------------------------------ CUDA sources
CUDA_SOURCES = ("per_sample_mse.cu", "weighted_sum.cu")


def inspect_cuda(arch: int = 90) -> Tuple[List[KernelReport], str]:
    nvcc = _tool("nvcc")
    if nvcc is None:
        return [], "nvcc not found"
    reports: List[KernelReport] = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in CUDA_SOURCES:
            cubin_path = os.path.join(tmp, src + ".cubin")
            cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "--resource-usage",
                   "-I", os.path.join(CSRC, "include"), "-I", os.path.join(CSRC, "cuda"),
                   os.path.join(CSRC, "cuda", src), "-o", cubin_path]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src}:\n{proc.stderr[-3000:]}")
            cubin = open(cubin_path, "rb").read()
            usage = _parse_resource_usage(subprocess.run(
                [_tool("cuobjdump") or "cuobjdump", "--dump-resource-usage", cubin_path],
                capture_output=True, text=True).stdout)
            sass = sass_of(cubin)
            for fn, text in _split_sass(sass).items():
                u = usage.get(fn, {})
                r = KernelReport(kernel=_demangle(fn), variant=fn, backend="cuda", arch=arch,
                                 registers=u.get("REG"), shared_bytes=u.get("SHARED"),
                                 local_bytes=u.get("LOCAL", 0) + u.get("STACK", 0) if u else None,
                                 fp_fusion=True)  # nvcc's default --fmad=true
                r.sass = text
                analyse_sass(text, r)
                r.name = _safe(f"cuda_{src.split('.')[0]}_{len(reports)}")
                reports.append(r)
    return reports, ""


def _split_sass(sass: str) -> Dict[str, str]:
    out: Dict[str, str] = {}
    current = None
    for line in sass.splitlines():
        m = re.search(r"Function : ([\w$]+)", line)
        if m:
            current = m.group(1)
            out[current] = ""
        elif current is not None:
            out[current] += line + "\n"
    return out


def _demangle(name: str) -> str:
    tool = shutil.which("c++filt")
    if tool is None:
        return name
    return subprocess.run([tool, name], capture_output=True, text=True).stdout.strip() or name


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:120]


# ------------------------------------------------------------------------ CLI
def inspect_all(arch: int = 90, backends: Sequence[str] = ("triton", "cuda")) -> Tuple[List[KernelReport], List[str]]:
    reports: List[KernelReport] = []
    skipped: List[str] = []
    for name, run in (("triton", inspect_triton), ("cuda", inspect_cuda)):
        if name not in backends:
            continue
        got, why = run(arch)
        reports += got
        if why:
            skipped.append(f"{name}: {why}")
    return reports, skipped


def _table(reports: Sequence[KernelReport]) -> str:
    head = ("kernel", "variant", "regs", "local", "smem", "ld", "st", "i64", "fma", "fusion", "grid")
    rows = [head]
    for r in reports:
        rows.append((r.kernel[:40], r.variant[:60], str(r.registers), str(r.local_bytes),
                     str(r.shared_bytes), str(r.load_bits), str(r.store_bits),
                     str(r.int64_address_ops), str(r.fma), str(r.fp_fusion),
                     "" if r.grid is None else "x".join(map(str, r.grid)) + ("" if r.grid_ok else " !")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastsoup.kernels.inspect",
        description="Compile fastsoup's GPU kernels for a target without a GPU and report "
                    "registers, spills, load/store widths, 64-bit addressing, FMA and grids.")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 (default), 80")
    parser.add_argument("--backend", choices=("triton", "cuda", "all"), default="all")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per variant")
    parser.add_argument("--dump", metavar="DIR", help="write <variant>.ptx / .sass files into DIR")
    args = parser.parse_args(argv)
    backends = ("triton", "cuda") if args.backend == "all" else (args.backend,)
    os.environ.pop("TRITON_INTERPRET", None)
    reports, skipped = inspect_all(args.arch, backends)
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        for r in reports:
            for ext, text in (("ptx", r.ptx), ("sass", r.sass)):
                if text:
                    with open(os.path.join(args.dump, f"{r.name}.{ext}"), "w") as f:
                        f.write(text)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=1))
    else:
        print(_table(reports))
    for line in skipped:
        print(f"skipped {line}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
