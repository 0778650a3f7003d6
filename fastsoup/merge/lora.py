"""Exact LoRA soups: merge LoRA adapters as products ``B·A``, never factor by factor.

A LoRA module is found by its keys (PEFT / diffusers / kohya naming):
``P.lora_A[.ADAPTER].weight`` + ``P.lora_B[.ADAPTER].weight`` or
``P.lora_down.weight`` + ``P.lora_up.weight``, with an optional scalar ``P.alpha``.
``A`` is ``[r, in]`` (or ``[r, in, kh, kw]`` for a convolution), ``B`` is ``[out, r]``
(or ``[out, r, 1, 1]``); the rank ``r`` is read from the shapes. The module's delta is
``ΔW = s · B·A`` with ``s = α / r`` when ``P.alpha`` is stored, else ``s = 1`` (what
diffusers' ``load_lora_weights`` assumes when a file stores no alpha).

**Soup** (SPEC §5): with coefficients ``c_i`` (``--weights``, normalised: default the
mean), ``Σ_i c_i s_i B_i A_i = B' A'`` exactly, where ``B' = [c_1 s_1 B_1, …, c_n s_n B_n]``
(columns concatenated) and ``A' = [A_1; …; A_n]`` (rows stacked): a LoRA of rank
``r' = Σ r_i`` written with ``α' = r'`` (scale 1) where the inputs store alphas. The
output has the first input's keys, layout and dtypes.

**Compressed soup** (``lora_rank=k`` / ``--lora-rank k``): each module's product is
replaced by its best rank-``k`` approximation (truncated SVD, computed from QR factors of
``B'`` and ``A'ᵀ`` in float64, never forming ``ΔW``): ``B'' = U_k Σ_k^{1/2}``,
``A'' = Σ_k^{1/2} V_kᵀ``, ``α'' = k``. The relative error dropped,
``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F = sqrt(Σ_{j>k} σ_j²) / sqrt(Σ_j σ_j²)``, is recorded in the
manifest (``lora.relative_error_max`` over modules, ``lora.relative_error_total`` over
the whole adapter) and in :attr:`MergeReport.manifest`.

**Bake** (``--base BASE``): the soup's mean delta is added to the base checkpoint,
``W = W_0 + Σ_i c_i s_i B_i A_i`` (default ``c_i = 1/n``; with a base the weights are used
as given), for every base tensor a module maps to; the output mirrors the base. A module
``P`` maps to the base key ``P.weight`` (or ``P.base_layer.weight``), after removing a
leading ``unet.`` / ``transformer.`` / ``text_encoder.`` / ``base_model.model.`` where
needed, and, in a diffusers root, to component ``unet`` etc.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import MergeError, some

_FACTOR = re.compile(r"^(?P<prefix>.+)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)"
                     r"(?P<suffix>(\.[^.]+)?\.weight)$")
_UP = {"lora_A": "lora_B", "lora_down": "lora_up"}
_DOWN = {v: k for k, v in _UP.items()}
_STRIP = ("base_model.model.", "unet.", "transformer.", "text_encoder.", "text_encoder_2.")


@dataclasses.dataclass
class Module:
    """One LoRA module of one input (qualified keys)."""

    name: str                  # prefix + naming style, identical across inputs
    prefix: str
    down: str
    up: str
    alpha: Optional[str]
    rank: int


def find_modules(layout) -> Dict[str, Module]:
    """The LoRA modules of an input, keyed by module name; MergeError for half pairs or
    factor shapes that do not pair."""
    infos = {}
    for q, (cname, key) in layout.keys().items():
        infos[q] = layout.components[cname].tensors[key][1]
    modules: Dict[str, Module] = {}
    problems: List[str] = []
    for q in infos:
        m = _FACTOR.match(q)
        if not m or m.group("kind") not in _UP:
            continue
        prefix, kind, suffix = m.group("prefix"), m.group("kind"), m.group("suffix")
        up = f"{prefix}.{_UP[kind]}{suffix}"
        if up not in infos:
            problems.append(f"{q!r} has no {_UP[kind]} partner {up!r}")
            continue
        a, b = infos[q], infos[up]
        if len(a.shape) < 2 or len(b.shape) < 2 or b.shape[1] != a.shape[0] \
                or any(d != 1 for d in b.shape[2:]):
            problems.append(f"{q!r} {list(a.shape)} and {up!r} {list(b.shape)} do not pair as "
                            "A [r, in, ...] and B [out, r, 1, ...]")
            continue
        alpha = f"{prefix}.alpha"
        modules[f"{prefix}|{kind}{suffix}"] = Module(f"{prefix}|{kind}{suffix}", prefix, q, up,
                                                     alpha if alpha in infos else None, a.shape[0])
    for q in infos:
        m = _FACTOR.match(q)
        if m and m.group("kind") in _DOWN:
            down = f"{m.group('prefix')}.{_DOWN[m.group('kind')]}{m.group('suffix')}"
            if down not in infos:
                problems.append(f"{q!r} has no {_DOWN[m.group('kind')]} partner {down!r}")
    if problems:
        raise MergeError(f"{layout.path}: incomplete LoRA pairs: " + some(problems, 5))
    return modules


def lora_keys(modules: Dict[str, Module]) -> set:
    out = set()
    for m in modules.values():
        out.update(k for k in (m.down, m.up, m.alpha) if k)
    return out


def any_lora(layouts) -> bool:
    """Whether any of ``layouts`` is a LoRA adapter (:func:`is_lora`). Inputs that are one
    file whose tensors come from one shared header mapping (byte-identical headers, see
    :func:`fastsoup.io.safetensors.shared_headers`) have the same names: scanned once."""
    scanned = set()
    for lay in layouts:
        mapping = lay.file_mapping()
        if mapping is not None:
            if id(mapping) in scanned:  # the mappings stay alive: their ids are not reused
                continue
            scanned.add(id(mapping))
        if is_lora(lay):
            return True
    return False


def is_lora(layout) -> bool:
    keys = layout.keys()
    if ".lora_" not in "\n".join(keys):  # one scan of every name: most inputs are not adapters
        return False
    return any(_FACTOR.match(q) for q in keys)


# ------------------------------------------------------------------------ planning
def _with_shapes(layout, shapes: Dict[str, Tuple[int, ...]]):
    """A copy of ``layout`` whose tensors ``shapes`` names have those shapes (for the
    planner's checks and the output header); files and offsets are the real ones."""
    comps = {}
    for cname, comp in layout.components.items():
        tensors = {}
        for key, (wf, info) in comp.tensors.items():
            q = f"{cname}/{key}" if cname else key
            if q in shapes:
                info = info._replace(shape=tuple(shapes[q]))
            tensors[key] = (wf, info)
        comps[cname] = dataclasses.replace(comp, tensors=tensors)
    return dataclasses.replace(layout, components=comps)


def _info(layout, q):
    cname, key = layout.keys()[q]
    return layout.components[cname].tensors[key]


def plan_soup(constituents, *, weights, normalize, keys, dtype, max_shard_size, accumulate,
              lora_rank: Optional[int]):
    """The plan of a LoRA soup (no base): :func:`.plan.build_plan` over copies of the
    inputs whose factor shapes are the output's, then the factors and alphas marked to be
    computed by :func:`compute`."""
    from .plan import build_plan

    n = len(constituents)
    mods = [find_modules(lay) for lay in constituents]
    non = [i + 1 for i, m in enumerate(mods) if not m]
    if non:
        raise MergeError(f"input{'s' if len(non) > 1 else ''} {', '.join(map(str, non))} "
                         "hold no LoRA factors while the others are LoRA adapters: a LoRA soup "
                         "merges adapters (bake them into a model with --base)")
    names = []
    for m in mods:
        for name in m:
            if name not in names:
                names.append(name)
    problems = []
    total_rank: Dict[str, int] = {}
    for name in names:
        holders = [i for i in range(n) if name in mods[i]]
        if len(holders) < n and keys == "strict":
            missing = [i + 1 for i in range(n) if i not in holders]
            problems.append(f"LoRA module {name.split('|')[0]!r} is missing from input(s) "
                            f"{', '.join(map(str, missing))}")
            continue
        ref = mods[holders[0]][name]
        a0, b0 = _info(constituents[holders[0]], ref.down)[1], _info(constituents[holders[0]], ref.up)[1]
        for i in holders[1:]:
            m = mods[i][name]
            a, b = _info(constituents[i], m.down)[1], _info(constituents[i], m.up)[1]
            if a.shape[1:] != a0.shape[1:] or b.shape[0] != b0.shape[0] or b.shape[2:] != b0.shape[2:]:
                problems.append(f"LoRA module {ref.prefix!r}: input {i + 1} adapts a "
                                f"{[b.shape[0]] + list(a.shape[1:])} weight, input {holders[0] + 1} a "
                                f"{[b0.shape[0]] + list(a0.shape[1:])} one")
            if (m.alpha is None) != (ref.alpha is None):
                problems.append(f"LoRA module {ref.prefix!r}: an alpha in some inputs only")
        r = sum(mods[i][name].rank for i in holders)
        total_rank[name] = min(r, lora_rank) if lora_rank else r
    if problems:
        raise MergeError("the LoRA adapters cannot be merged: " + some(problems, 5))
    fakes = []
    for i, lay in enumerate(constituents):
        shapes = {}
        for name, m in mods[i].items():
            R = total_rank[name]
            a, b = _info(lay, m.down)[1], _info(lay, m.up)[1]
            shapes[m.down] = (R,) + tuple(a.shape[1:])
            shapes[m.up] = (b.shape[0], R) + tuple(b.shape[2:])
        fakes.append(_with_shapes(lay, shapes))
    plan = build_plan(fakes, weights=weights, normalize=normalize, keys=keys, dtype=dtype,
                      max_shard_size=max_shard_size, accumulate=accumulate)
    plan.inputs = list(constituents)
    coefs = plan.coefficients
    roles = {}
    for name in names:
        for i in range(n):
            if name in mods[i]:
                m = mods[i][name]
                roles[m.down] = (name, "down")
                roles[m.up] = (name, "up")
                if m.alpha:
                    roles[m.alpha] = (name, "alpha")
                break
    for t in plan.tensors():
        role = roles.get(t.qualified)
        if role is None:
            continue
        name, what = role
        srcs = []
        for i in range(n):
            m = mods[i].get(name)
            if m is None:
                continue
            srcs.extend(_factor_sources(constituents[i], i, m, coefs[i]))
        t.sources = srcs
        t.special = {"lora": what, "module": name, "rank": total_rank[name],
                     "compress": bool(lora_rank)}
    plan.lora = {"mode": "compressed" if lora_rank else "concat", "modules": len(names),
                 "rank": lora_rank}
    return plan


def _base_key(prefix: str, base_keys: Dict[str, Tuple[str, str]]) -> Optional[str]:
    """The base tensor a LoRA module adapts (see the module docstring)."""
    cands = [prefix]
    p = prefix
    for s in _STRIP:
        if p.startswith(s):
            comp = s.rstrip(".")
            rest = p[len(s):]
            cands += [rest, f"{comp}/{rest}"]
    for c in list(cands):
        cands.append(c.replace(".", "/", 1))
    for c in cands:
        for suffix in (".weight", ".base_layer.weight"):
            if c + suffix in base_keys:
                return c + suffix
    return None


def plan_bake(constituents, base, *, weights, keys, dtype, max_shard_size, accumulate):
    """The plan of baking LoRA adapters into ``base``: the base's layout, its tensors
    copied (a weighted sum with coefficient 1, exact), and every adapted weight marked to
    be computed as ``W_0 + Σ_i c_i s_i B_i A_i``."""
    from .plan import Source, build_plan

    n = len(constituents)
    mods = [find_modules(lay) for lay in constituents]
    non = [i + 1 for i, m in enumerate(mods) if not m]
    if non:
        raise MergeError(f"input(s) {', '.join(map(str, non))} hold no LoRA factors: with LoRA "
                         "adapters and --base, every input must be an adapter")
    for i, lay in enumerate(constituents):
        extra = sorted(set(lay.keys()) - lora_keys(mods[i]))
        if extra:
            raise MergeError(f"input {i + 1} ({lay.path}) holds {len(extra)} tensors that are not "
                             f"LoRA factors (e.g. {extra[0]!r}); baking adds LoRA products only")
    if weights is None:
        weights = [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"got {len(weights)} weights for {n} inputs")
    plan = build_plan([base, base], weights=[1.0, 0.0], normalize=False, keys="strict",
                      dtype=dtype, max_shard_size=max_shard_size, accumulate=accumulate)
    plan.inputs = list(constituents) + [base]
    plan.input_weights = weights
    plan.coefficients = list(weights)
    plan.base_index = n
    plan.normalize = False
    plan.key_policy = keys
    base_keys = base.keys()
    targets: Dict[str, list] = {}
    unmatched = []
    for i, m in enumerate(mods):
        for name, mod in m.items():
            bk = _base_key(mod.prefix, base_keys)
            if bk is None:
                unmatched.append(mod.prefix)
                continue
            targets.setdefault(bk, []).append((i, mod))
    if unmatched:
        raise MergeError(f"{len(unmatched)} LoRA module(s) adapt no tensor of the base {base.path} "
                         f"(e.g. {unmatched[0]!r}: looked for {unmatched[0]}.weight); is it the "
                         "model the adapters were trained on?")
    problems = []
    for t in plan.tensors():
        wf0, info0 = _info(base, t.qualified)
        key0 = base_keys[t.qualified][1]
        src0 = Source(n, wf0, info0, 1.0, key0)
        t.sources = [src0]
        if t.qualified not in targets:
            continue
        srcs = [src0]
        for i, mod in targets[t.qualified]:
            a = _info(constituents[i], mod.down)[1]
            b = _info(constituents[i], mod.up)[1]
            if b.shape[0] * math.prod(a.shape[1:]) != math.prod(info0.shape) or \
                    b.shape[0] != info0.shape[0]:
                problems.append(f"{mod.prefix!r} of input {i + 1} adapts a "
                                f"{[b.shape[0]] + list(a.shape[1:])} weight, the base's "
                                f"{t.qualified!r} is {list(info0.shape)}")
                continue
            srcs.extend(_factor_sources(constituents[i], i, mod, weights[i]))
        t.sources = srcs
        t.special = {"lora": "bake", "module": t.qualified}
    if problems:
        raise MergeError("LoRA shapes do not fit the base: " + "; ".join(problems[:5]))
    plan.lora = {"mode": "bake", "modules": sum(len(m) for m in mods), "rank": None}
    return plan


# ---------------------------------------------------------------------------- math
def concat(As: List[np.ndarray], Bs: List[np.ndarray], scales: List[float]):
    """``(B', A')`` with ``B' A' = Σ_i scales_i B_i A_i`` (2-D factors)."""
    A = np.concatenate(As, axis=0)
    B = np.concatenate([np.float32(s) * b for s, b in zip(scales, Bs)], axis=1)
    return B, A


def compress(B: np.ndarray, A: np.ndarray, k: int):
    """Best rank-``k`` factors of ``B·A`` (float64 SVD via QR) and the singular values:
    ``(B_k, A_k, sigma)``."""
    Qb, Rb = np.linalg.qr(B.astype(np.float64))
    Qa, Ra = np.linalg.qr(A.T.astype(np.float64))
    U, S, Vt = np.linalg.svd(Rb @ Ra.T)
    k = min(k, S.size)
    root = np.sqrt(S[:k])
    Bk = (Qb @ U[:, :k]) * root
    Ak = (root[:, None] * Vt[:k]) @ Qa.T
    return Bk, Ak, S


def dropped_error(S: np.ndarray, k: int) -> Tuple[float, float]:
    """(dropped energy Σ_{j>k} σ_j², total energy Σ σ_j²)."""
    e = S.astype(np.float64) ** 2
    return float(e[k:].sum()), float(e.sum())


def _module_factors(t, io, part_filter=None):
    """Per input of ``t``'s module: (coefficient, A 2-D, B 2-D, scale)."""
    by_input: Dict[int, dict] = {}
    for s in t.sources:
        part = getattr(s, "part", None)
        if part is None:
            continue
        by_input.setdefault(s.input_index, {"c": s.weight})[part] = s
    out = []
    for i, parts in by_input.items():
        a = io.load(parts["down"].file, parts["down"].key, parts["down"].info)
        b = io.load(parts["up"].file, parts["up"].key, parts["up"].info)
        r = parts["down"].info.shape[0]
        a = a.reshape(r, -1)
        b = b.reshape(-1, r)
        scale = 1.0
        if "alpha" in parts:
            alpha = float(io.load(parts["alpha"].file, parts["alpha"].key, parts["alpha"].info)[0])
            scale = alpha / r
        out.append((parts["c"], a, b, scale))
    return out


def compute(t, io, cache: dict) -> np.ndarray:
    """The values of LoRA output tensor ``t`` (flat float32); a module's factors are
    computed once and kept in ``cache`` until its other tensors are written."""
    sp = t.special
    if sp["lora"] == "bake":
        base_src = t.sources[0]
        w = io.load(base_src.file, base_src.key, base_src.info).astype(np.float64)
        delta = np.zeros(w.size, np.float64)
        for c, a, b, s in _module_factors(t, io):
            delta += (c * s) * (b.astype(np.float64) @ a.astype(np.float64)).reshape(-1)
        return (w + delta).astype(np.float32)
    name = sp["module"]
    entry = cache.get(name)
    if entry is None:
        facs = _module_factors(t, io)
        B, A = concat([a for _, a, _, _ in facs], [b for _, _, b, _ in facs],
                      [c * s for c, _, _, s in facs])
        entry = {"left": 2 + any(getattr(s, "part", None) == "alpha" for s in t.sources)}
        if sp.get("compress") and sp["rank"] < A.shape[0]:
            Bk, Ak, S = compress(B, A, sp["rank"])
            dropped, total = dropped_error(S, sp["rank"])
            stats = cache.setdefault("_errors", {"dropped": 0.0, "total": 0.0, "max": 0.0})
            stats["dropped"] += dropped
            stats["total"] += total
            stats["max"] = max(stats["max"], math.sqrt(dropped / total) if total > 0 else 0.0)
            B, A = Bk.astype(np.float32), Ak.astype(np.float32)
        entry["down"], entry["up"], entry["alpha"] = A, B, np.float32(A.shape[0])
        cache[name] = entry
    value = entry[sp["lora"]]
    entry["left"] -= 1
    if entry["left"] <= 0:
        del cache[name]
    return np.asarray(value, np.float32).reshape(-1)


def error_summary(cache: dict) -> Optional[dict]:
    stats = cache.get("_errors")
    if not stats:
        return None
    total = math.sqrt(stats["dropped"] / stats["total"]) if stats["total"] > 0 else 0.0
    return {"relative_error_max": stats["max"], "relative_error_total": total}


def _factor_sources(constituent, i: int, module, coef) -> list:
    """One :class:`Source` per stored factor (down, up, alpha) of input ``i``'s module,
    tagged with the factor it is."""
    from .plan import Source

    out = []
    for part in ("down", "up", "alpha"):
        q = getattr(module, part)
        if q is None:
            continue
        cname, key = constituent.keys()[q]
        wf, info = constituent.components[cname].tensors[key]
        src = Source(i, wf, info, coef, key)
        src.part = part  # which factor of input i's module this is
        out.append(src)
    return out
