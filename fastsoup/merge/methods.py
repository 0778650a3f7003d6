"""Task-vector merge methods, one tensor at a time: TIES, DARE and SLERP.

Every function works on flat ``numpy.float32`` arrays (one tensor of every input, read
and widened by :func:`execute_special`); reductions (norms, dot products) accumulate in
float64. With ``θ_0`` the base and ``τ_i = θ_i − θ_0`` the task vectors:

**TIES** (Yadav et al., *TIES-Merging: Resolving Interference When Merging Models*,
NeurIPS 2023, §3 and Algorithm 1):

1. trim: ``τ̂_i`` keeps the ``k = ⌈density · numel⌉`` entries of ``τ_i`` largest in
   magnitude, per tensor, and zeroes the rest (ties at the threshold are kept in index
   order, so exactly ``k`` entries survive);
2. elect: ``γ = sign(Σ_i c_i τ̂_i)`` (with equal coefficients, the paper's
   ``sign(Σ_i τ̂_i)``);
3. disjoint merge: ``τ_m[p] = Σ_{i ∈ A_p} c_i τ̂_i[p] / Σ_{i ∈ A_p} c_i`` over
   ``A_p = {i : τ̂_i[p] ≠ 0, sign(τ̂_i[p]) = γ[p]}`` (0 where ``A_p`` is empty); with equal
   coefficients the paper's mean of the agreeing entries;
4. ``θ = θ_0 + τ_m`` (the paper's λ = 1).

The coefficients ``c_i`` are those of the plan (``--weights``; default equal) and must
be positive.

**DARE** (Yu et al., *Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch*, ICML 2024, eq. 1–2): each entry of ``τ_i`` is kept
with probability ``density`` (dropped with probability ``p = 1 − density``) and the kept
ones are rescaled by ``1/density``; the results are combined by task arithmetic,
``θ = θ_0 + Σ_i c_i τ̃_i`` (default ``c_i = 1/n``: the average). Masks come from numpy's
``PCG64`` generator seeded with ``SeedSequence(seed, spawn_key=(i, h))``, where ``i`` is
the constituent's position (0-based) and ``h`` the first 8 bytes (big-endian) of the
sha256 of the tensor's qualified key: a tensor's mask depends on the seed, the input's
position and the key only (not on the order tensors are processed, the memory budget or
the other tensors), so a merge is reproducible. The mask is ``U < density`` for
``U = rng.random(numel)`` (float64, C order).

**SLERP** (Shoemake, *Animating rotation with quaternion curves*, SIGGRAPH 1985; as
applied to model weights by mergekit): two models, ``t = c_2 / (c_1 + c_2)`` (default
0.5). Per tensor, flattened: ``Ω = arccos(⟨v_0, v_1⟩ / (‖v_0‖ ‖v_1‖))`` and
``θ = sin((1−t)Ω)/sin Ω · v_0 + sin(tΩ)/sin Ω · v_1``; linear interpolation
``(1−t) v_0 + t v_1`` when either norm is 0 or ``|cos Ω| > 0.9995`` (nearly parallel).

Memory: a tensor is processed whole, in a few float32 buffers of its size (TIES: base,
sign sum, numerator, denominator, task vector; DARE: base, accumulator, task vector,
mask), independent of the number of inputs; TIES reads each constituent twice (the
second read is normally served by the page cache). Peak memory is therefore about
``6 × 4 × (largest tensor's element count)`` plus the streaming budget.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import MergeError

SLERP_DOT_THRESHOLD = 0.9995   # |cos Ω| above this: linear interpolation


# ---------------------------------------------------------------------------- the math
def trim_top(tau: np.ndarray, density: float) -> np.ndarray:
    """``τ`` with all but its ``⌈density · numel⌉`` largest-magnitude entries zeroed
    (a new array; ties at the threshold kept in index order)."""
    n = tau.size
    k = min(n, int(math.ceil(density * n - 1e-9)))
    if k >= n:
        return tau.copy()
    out = np.zeros_like(tau)
    if k <= 0:
        return out
    mag = np.abs(tau)
    thr = np.partition(mag, n - k)[n - k]       # the k-th largest magnitude
    keep = mag > thr
    need = k - int(np.count_nonzero(keep))
    if need > 0:
        keep[np.flatnonzero(mag == thr)[:need]] = True
    out[keep] = tau[keep]
    return out


def ties(base: np.ndarray, load: Callable[[int], np.ndarray], coefs: Sequence[float],
         density: float) -> np.ndarray:
    """TIES-merge of one tensor: ``base`` (float32, flat) and ``load(i)`` → θ_i (float32,
    flat) for ``i < len(coefs)``; ``load`` is called twice per input."""
    sign_sum = np.zeros(base.shape, np.float32)
    for i, c in enumerate(coefs):
        tau = load(i) - base
        sign_sum += np.float32(c) * trim_top(tau, density)
    gamma = np.sign(sign_sum)
    del sign_sum
    num = np.zeros(base.shape, np.float32)
    den = np.zeros(base.shape, np.float32)
    for i, c in enumerate(coefs):
        t = trim_top(load(i) - base, density)
        agree = (t != 0) & (np.sign(t) == gamma)
        num += np.where(agree, np.float32(c) * t, np.float32(0))
        den += np.where(agree, np.float32(c), np.float32(0))
    merged = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return base + merged


def dare_mask(seed: int, position: int, key: str, numel: int, density: float) -> np.ndarray:
    """The keep mask of constituent ``position``'s task vector for tensor ``key``."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(position, h))))
    return rng.random(numel) < density


def dare(base: np.ndarray, load: Callable[[int], np.ndarray], coefs: Sequence[float],
         density: float, seed: int, key: str) -> np.ndarray:
    """DARE of one tensor: ``θ_0 + Σ_i c_i · mask_i ⊙ τ_i / density``."""
    acc = np.zeros(base.shape, np.float32)
    scale = 1.0 / density
    for i, c in enumerate(coefs):
        tau = load(i) - base
        keep = dare_mask(seed, i, key, base.size, density)
        acc += np.where(keep, tau * np.float32(c * scale), np.float32(0))
    return base + acc


def _dot64(x: np.ndarray, y: np.ndarray, chunk: int = 1 << 20) -> float:
    """⟨x, y⟩ accumulated in float64, ``chunk`` elements at a time (flat memory)."""
    total = 0.0
    for lo in range(0, x.size, chunk):
        total += float(np.dot(x[lo:lo + chunk].astype(np.float64), y[lo:lo + chunk].astype(np.float64)))
    return total


def slerp_coefficients(v0: np.ndarray, v1: np.ndarray, t: float):
    """``(a, b)`` with ``slerp(v0, v1, t) = a·v0 + b·v1`` (see the module docstring)."""
    n0 = math.sqrt(_dot64(v0, v0))
    n1 = math.sqrt(_dot64(v1, v1))
    if n0 == 0.0 or n1 == 0.0:
        return 1.0 - t, t
    cos = max(-1.0, min(1.0, _dot64(v0, v1) / (n0 * n1)))
    if abs(cos) > SLERP_DOT_THRESHOLD:
        return 1.0 - t, t
    omega = math.acos(cos)
    so = math.sin(omega)
    return math.sin((1.0 - t) * omega) / so, math.sin(t * omega) / so


def slerp(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    a, b = slerp_coefficients(v0, v1, t)
    return np.float32(a) * v0 + np.float32(b) * v1


# ----------------------------------------------------------------------- the plan
def check_method(plan, opts) -> None:
    """Refuse method/input combinations that have no meaning, before reading data."""
    method = opts.method
    n = len(plan.input_weights)
    if method in ("ties", "dare") and plan.base_index is None:
        raise MergeError(f"--method {method} needs --base (the model the inputs were fine-tuned "
                         "from): it merges the task vectors θ_i − θ_base")
    if method == "slerp":
        if plan.base_index is not None:
            raise MergeError("--method slerp interpolates two models; it takes no --base")
        if n != 2:
            raise MergeError(f"--method slerp interpolates exactly two models, got {n} inputs")


def apply_method(plan, opts) -> None:
    """Mark every floating tensor of ``plan`` to be computed by ``opts.method`` (in
    place). Sources are rebuilt from every input holding the key, constituents first and
    the base last, with the plan's coefficients."""
    method = opts.method
    if method == "average":
        return
    check_method(plan, opts)
    from .keyweights import holder_sources
    from .plan import Source

    n = len(plan.input_weights)
    for t in plan.tensors():
        if t.op != "sum" or t.special is not None:
            continue
        coef = {s.input_index: s.weight for s in t.sources}
        holders = holder_sources(plan, t.qualified)
        srcs = []
        for k, (wf, info, key) in holders.items():
            srcs.append(Source(k, wf, info, coef.get(k, 0.0), key))
        cons = [s for s in srcs if s.input_index < n]
        if method == "ties" and any(s.weight <= 0 for s in cons):
            raise MergeError(f"--method ties: every weight must be positive (they weigh the "
                             f"disjoint mean), got coefficients {[s.weight for s in cons]} for "
                             f"{t.qualified!r}")
        if method == "slerp":
            total = sum(s.weight for s in cons)
            if len(cons) != 2 or total == 0:
                raise MergeError(f"--method slerp: {t.qualified!r} needs both inputs and weights "
                                 "that do not sum to 0")
        t.sources = srcs
        t.special = {"method": method, "density": opts.density, "seed": opts.seed}


def manifest_entry(opts) -> dict:
    out = {"method": opts.method}
    if opts.method in ("ties", "dare"):
        out["density"] = opts.density
    if opts.method == "dare":
        out["seed"] = opts.seed
        out["rng"] = "numpy PCG64, SeedSequence(seed, spawn_key=(position, sha256(key)[:8]))"
    return out


# -------------------------------------------------------------------- the execution
LINEAR_OPS = ("sum", "copy")


def linear_view(plan):
    """A shallow copy of ``plan`` whose files hold only the tensors the engine computes
    (weighted sums and copies): what :func:`.engine.execute` streams. The file list is
    unchanged (one writer per file)."""
    import dataclasses

    comps = []
    for c in plan.components:
        files = [dataclasses.replace(f, tensors=[t for t in f.tensors if t.special is None])
                 for f in c.files]
        comps.append(dataclasses.replace(c, files=files))
    return dataclasses.replace(plan, components=comps)


def has_special(plan) -> bool:
    return any(t.special is not None for t in plan.tensors())


class _Io:
    """Whole-tensor reads widened to float32, and writes narrowed to the output dtype,
    both through the ``_C`` kernel (the same rounding as the weighted sum)."""

    def __init__(self, maps, chunk_bytes: int):
        from ..kernels import cpu as cpu_kernels

        self.k = cpu_kernels
        self.ext = cpu_kernels.extension(warn=True)
        if self.ext is None:
            raise MergeError("the compiled extension fastsoup._C is not available; rebuild with "
                             "`pip install --no-build-isolation -e .`")
        self.maps = maps
        self.chunk = max(1 << 16, chunk_bytes)
        self.raw = np.empty(self.chunk, np.uint8)

    def load(self, wf, key: str, info, out: Optional[np.ndarray] = None) -> np.ndarray:
        from ..io.safetensors import DTYPES

        n = math.prod(info.shape)
        es = DTYPES[info.dtype].itemsize
        out = np.empty(n, np.float32) if out is None else out
        per = max(1, self.chunk // es)
        for lo in range(0, n, per):
            hi = min(n, lo + per)
            view = self.maps.read(wf, key, lo * es, hi * es, self.raw)
            if info.dtype == "F32":
                out[lo:hi] = np.frombuffer(view, np.float32)
            else:
                self.k.weighted_sum(memoryview(out[lo:hi]).cast("B"), "F32", [view], [info.dtype],
                                    [1.0], hi - lo, 1, False, ext=self.ext)
        return out

    def write(self, writer, offset: int, values: np.ndarray, dtype: str) -> None:
        from ..io.safetensors import DTYPES

        values = np.ascontiguousarray(values, np.float32).reshape(-1)
        n = values.size
        es = DTYPES[dtype].itemsize
        per = max(1, self.chunk // es)
        for lo in range(0, n, per):
            hi = min(n, lo + per)
            dst = self.raw[: (hi - lo) * es]
            self.k.weighted_sum(memoryview(dst), dtype, [memoryview(values[lo:hi]).cast("B")],
                                ["F32"], [1.0], hi - lo, 1, False, ext=self.ext)
            writer.pwrite(dst, offset + lo * es)


def execute_special(plan, writers, maps, *, memory: int, progress=None,
                    lora_cache: Optional[dict] = None) -> int:
    """Compute every tensor of ``plan`` marked ``special`` into ``writers`` (one per output
    file, in plan order); returns the number of output bytes written."""
    from .lora import compute as lora_compute

    io = _Io(maps, max(1 << 16, memory // 8))
    written = 0
    file_index = 0
    lora_cache = {} if lora_cache is None else lora_cache
    for _, f in plan.output_files():
        w = writers[file_index]
        file_index += 1
        for t in f.tensors:
            sp = t.special
            if sp is None:
                continue
            if "lora" in sp:
                values = lora_compute(t, io, lora_cache)
            else:
                values = _method_tensor(t, io, len(plan.input_weights))
            io.write(w, w.offsets[t.key], values, t.dtype)
            written += t.nbytes
            if progress is not None:
                progress(t.qualified, t.nbytes)
    return written


def _method_tensor(t, io: _Io, n: int) -> np.ndarray:
    sp = t.special
    cons = [s for s in t.sources if s.input_index < n]
    base_src = [s for s in t.sources if s.input_index >= n]
    scratch = np.empty(t.numel, np.float32)

    def load(i: int) -> np.ndarray:
        s = cons[i]
        return io.load(s.file, s.key, s.info, scratch)

    coefs = [s.weight for s in cons]
    if sp["method"] == "slerp":
        v0 = io.load(cons[0].file, cons[0].key, cons[0].info)
        v1 = io.load(cons[1].file, cons[1].key, cons[1].info, scratch)
        return slerp(v0, v1, coefs[1] / (coefs[0] + coefs[1]))
    base = io.load(base_src[0].file, base_src[0].key, base_src[0].info)
    if sp["method"] == "ties":
        return ties(base, load, coefs, sp["density"])
    if sp["method"] == "dare":
        return dare(base, load, coefs, sp["density"], sp["seed"], t.qualified)
    raise MergeError(f"unknown merge method {sp['method']!r}")
