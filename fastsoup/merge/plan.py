"""Planning a merge from headers alone: which tensors, from where, with which weights.

:func:`build_plan` checks everything that can be checked without reading tensor data
(keys under the key policy, shapes, dtype kinds, averaging support, weights) and raises
one :class:`PlanError` listing every problem at once. The plan's output mirrors the
first input's layout (file names, shard assignment, tensor order), unless
``max_shard_size`` asks for re-sharding.
"""
from __future__ import annotations

import collections
import functools
import math
import operator
from dataclasses import dataclass, field
from itertools import chain
from typing import Dict, List, Optional, Sequence, Tuple

from ..io.safetensors import DTYPES, ITEMSIZE, TensorInfo
import os

from .errors import Diagnostic, Diagnostics, MergeError, PlanError, flag
from .formats import Layout, WeightFile

FP32_MAX = 3.4028234663852886e38


@dataclass
class Source:
    """One input's contribution to an output tensor."""

    input_index: int          # index into Plan.inputs (the base, if any, is last)
    file: WeightFile
    info: TensorInfo
    weight: float             # effective coefficient
    key: str                  # the tensor's key inside ``file``

    @property
    def dtype(self) -> str:
        return self.info.dtype


@dataclass(frozen=True, eq=False)
class InputSet:
    """The inputs of tensors planned together from one shared header (byte-identical
    headers, parsed once: see :func:`_shared_single_files`): input ``indices[j]`` holds
    every such tensor in ``files[j]``, at the same offsets as the others, and contributes
    ``weights[j]`` times it. One set serves every tensor of the plan it holds."""

    indices: Tuple[int, ...]
    files: Tuple[WeightFile, ...]
    weights: Tuple[float, ...]


class OutTensor:
    """One output tensor and where it comes from.

    ``sources`` is one :class:`Source` per input read. A tensor planned from a shared
    header keeps ``shared = (InputSet, TensorInfo, key)`` instead and builds its sources
    on first access: checkpoints of 10⁵ tensors × many inputs create no object per input
    and tensor, and the engine and the report read the set directly. ``shared`` is None
    once ``sources`` is built or replaced, so it never describes sources that changed."""

    def __init__(self, key: str, qualified: str, dtype: str, shape: Tuple[int, ...], op: str,
                 sources: Optional[List[Source]], special: Optional[dict] = None,
                 shared: Optional[Tuple[InputSet, TensorInfo, str]] = None):
        self.key = key                # key inside its component (what the output header says)
        self.qualified = qualified    # key qualified by component ("unet/conv_in.weight")
        self.dtype = dtype            # output dtype
        self.shape = shape
        self.op = op                  # "sum" (floating) or "copy" (integer/bool, must be equal)
        self._sources = sources
        self.special = special        # a per-tensor method or LoRA product (merge/methods.py,
        #                               merge/lora.py) computed instead of the weighted sum
        self.shared = shared if sources is None else None
        # read per tensor by the writer, the engine and the report
        self.numel = math.prod(shape)
        self.nbytes = self.numel * ITEMSIZE[dtype]

    @property
    def sources(self) -> List[Source]:
        if self._sources is None:
            inputs, info, key = self.shared
            self._sources = [Source(k, f, info, w, key) for k, f, w in
                             zip(inputs.indices, inputs.files, inputs.weights)]
            self.shared = None
        return self._sources

    @sources.setter
    def sources(self, value: List[Source]) -> None:
        self._sources = value
        self.shared = None

    def __repr__(self) -> str:
        return (f"OutTensor({self.qualified!r}, {self.dtype}, {list(self.shape)}, {self.op}, "
                f"{len(self.shared[0].indices) if self.shared else len(self.sources)} sources)")


_NBYTES, _DTYPE = operator.attrgetter("nbytes"), operator.attrgetter("dtype")


@dataclass
class OutFile:
    name: str                 # file name inside its component folder
    tensors: List[OutTensor] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return sum(map(_NBYTES, self.tensors))


@dataclass
class OutComponent:
    name: str                 # "" for flat layouts
    files: List[OutFile]
    index_name: Optional[str] = None
    index_metadata: dict = field(default_factory=dict)


@dataclass
class Plan:
    kind: str                          # output layout: "file", "dir" or "diffusers"
    inputs: List[Layout]               # constituents, then the base (if any)
    input_weights: List[float]         # raw weights of the constituents
    coefficients: List[float]          # effective coefficients for keys present everywhere
    base_index: Optional[int]
    normalize: bool
    key_policy: str
    components: List[OutComponent]
    dropped_keys: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)      # one line per cause
    diagnostics: List[Diagnostic] = field(default_factory=list)  # the warnings, in full

    def tensors(self):
        for _, f in self.output_files():
            yield from f.tensors

    def output_files(self):
        """``(component, file)`` for every output file, in writing order."""
        for c in self.components:
            for f in c.files:
                yield c, f

    def output_dtypes(self) -> Dict[str, int]:
        """Output tensors per dtype name, sorted by name."""
        counts = collections.Counter(chain.from_iterable(
            map(_DTYPE, f.tensors) for _, f in self.output_files()))
        return dict(sorted(counts.items()))


def _coefficients(weights: Sequence[float], present: Sequence[int], base: bool,
                  normalize: bool, where: str) -> Dict[int, float]:
    ws = {k: float(weights[k]) for k in present}
    if normalize:
        total = sum(ws.values())
        if total == 0 or not math.isfinite(total):
            raise MergeError(f"{where}: weights sum to {total}, cannot normalise "
                             f"(pass {flag('normalize', False)}, or other weights)")
        ws = {k: w / total for k, w in ws.items()}
    return ws


def _component_hint(layouts: Sequence[Layout], n: int) -> Optional[str]:
    """"did you mean ROOT/unet?" when a diffusers pipeline is merged with a single model
    whose keys are (mostly) those of one of the pipeline's components."""
    for j in range(n):
        if layouts[j].kind == "diffusers":
            continue
        flat = set(layouts[j].keys())
        if not flat:
            continue
        for i in range(n):
            if layouts[i].kind != "diffusers":
                continue
            for cname, comp in layouts[i].components.items():
                if len(flat & set(comp.tensors)) >= 0.5 * len(flat):
                    return (f"input {j + 1} is a single model and input {i + 1} a diffusers "
                            f"pipeline whose '{cname}' component has its keys: did you mean "
                            f"{os.path.join(layouts[i].path, cname)}?")
    return None


def _architecture_hint(key_maps, n: int) -> Optional[str]:
    """A hint when the inputs' key sets overlap little (different architectures)."""
    sets = [set(km) for km in key_maps[:n]]
    for a in range(n):
        for b in range(a + 1, n):
            union = sets[a] | sets[b]
            if union and len(sets[a] & sets[b]) < 0.9 * len(union):
                return (f"inputs {a + 1} and {b + 1} share {len(sets[a] & sets[b])} of "
                        f"{len(union)} keys: different architectures? Averaging needs models "
                        f"fine-tuned from the same base ({flag('keys', 'intersection')} "
                        "merges only the shared keys)")
    return None


def build_plan(inputs: Sequence[Layout], *, weights: Optional[Sequence[float]] = None,
               base: Optional[Layout] = None, normalize: Optional[bool] = None,
               keys: str = "strict", dtype: Optional[str] = None,
               max_shard_size: Optional[int] = None, accumulate: str = "fp32") -> Plan:
    """Plan the merge of ``inputs`` (resolved layouts) into the first input's layout.

    Args:
        inputs: constituents θ_1..θ_n (n ≥ 1; n ≥ 2 unless ``base`` is given).
        weights: raw weights w_i (any reals), default 1 (no base) or 1/n (with base).
        base: θ_0 for task arithmetic: out = θ_0 + Σ c_i (θ_i − θ_0), c = weights.
        normalize: divide the weights by their sum (per key, over the inputs holding the
            key). Default True without a base, False with one.
        keys: a key policy of :data:`.options.KEY_POLICIES` (checked there): "strict"
            (every input must have every key), "intersection" or "union".
        dtype: output dtype name for floating tensors ("F32", "F16", "BF16", "F64");
            default: the first holding input's dtype, per tensor.
        max_shard_size: re-shard each component into files of at most this many bytes.
        accumulate: "fp32" or "fp64": every coefficient must be finite in it (a weight of
            1e39 is inf in fp32 and would write NaN).
    """
    n = len(inputs)
    if n == 0:
        raise MergeError("no inputs given")
    if n < 2 and base is None:
        raise MergeError("need at least two inputs to merge (or one input and --base)")
    if normalize is None:
        normalize = base is None
    elif normalize and base is not None:
        raise MergeError("--normalize with --base: normalised weights sum to 1, so the base's "
                         "coefficient 1 - sum(weights) would be 0 and the base would be ignored; "
                         f"task arithmetic uses the weights as given (drop {flag('normalize')}, "
                         "or divide the weights yourself)")
    if weights is None:
        weights = [1.0] * n if base is None else [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise MergeError(f"got {len(weights)} weights for {n} inputs")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"weights must be finite, got {weights}")
    limit = FP32_MAX if accumulate != "fp64" else float("inf")
    if dtype is not None and (dtype not in DTYPES or DTYPES[dtype].kernel_code is None):
        raise MergeError(f"output dtype {dtype!r} is not a floating dtype fastsoup can write")

    layouts = list(inputs) + ([base] if base is not None else [])
    base_index = n if base is not None else None
    key_maps = _key_maps(layouts)
    first_order: List[str] = []
    early_warnings: List[str] = []
    if keys == "union" and not normalize and base is None:
        early_warnings.append(f"{flag('keys', 'union')} without normalisation: a key held by only some "
                              "inputs gets only their weights, which then sum to less than "
                              f"the total (a scaled-down tensor); use {flag('normalize')} to renormalise "
                              "per key")
    if all(km.keys() == key_maps[0].keys() for km in key_maps[1:n]):
        first_order = list(key_maps[0])  # the usual case: every input has the same keys
    else:
        seen = set()
        for km in key_maps[:n]:
            for q in km:
                if q not in seen:
                    seen.add(q)
                    first_order.append(q)

    problems = Diagnostics()
    warns = Diagnostics()
    for w in early_warnings:
        warns.add("key_policy", w)
    dropped: List[str] = []
    selected: List[str] = []

    @functools.lru_cache(maxsize=None)
    def key_fix() -> str:  # only when a key is missing: the hints compare whole key sets
        return (_component_hint(layouts, n) or _architecture_hint(key_maps, n)
                or f"{flag('keys', 'intersection')} merges only the shared keys, "
                f"{flag('keys', 'union')} averages each key over the inputs holding it")
    everywhere = all(km.keys() == key_maps[0].keys() for km in key_maps[1:])
    for q in first_order:
        if everywhere:  # nothing is missing anywhere (base included)
            selected.append(q)
            continue
        missing = [k for k in range(n) if q not in key_maps[k]]
        if missing:
            if keys == "strict":
                where = ", ".join(f"input {k + 1} ({layouts[k].path})" for k in missing)
                problems.add("missing_keys", f"missing from {where}", q,
                             f"{q!r}: missing from {where}", fix=key_fix())
                continue
            if keys == "intersection":
                dropped.append(q)
                continue
        if base is not None and q not in key_maps[n]:
            problems.add("missing_from_base", f"missing from the base ({base.path})", q,
                         f"{q!r}: missing from the base ({base.path})")
            continue
        selected.append(q)

    out_tensors: Dict[str, OutTensor] = {}
    general = _plan_uniform(layouts, n, selected, weights, base is not None, normalize, dtype,
                            limit, out_tensors) if everywhere else selected
    for q in general:
        holders = [k for k in range(len(layouts)) if q in key_maps[k]]
        infos = []
        src_keys = {}
        for k in holders:
            cname, key = key_maps[k][q]
            wf, info = layouts[k].components[cname].tensors[key]
            infos.append((k, wf, info))
            src_keys[k] = key
        shapes = {info.shape for _, _, info in infos}
        if len(shapes) > 1:
            bad = sorted({k + 1 for k, _, info in infos if info.shape != infos[0][2].shape})
            problems.add("shape_mismatch", f"shapes differ between input {infos[0][0] + 1} and "
                         f"input{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))}", q,
                         f"{q!r}: shapes differ: " + ", ".join(
                             f"{list(info.shape)} in input {k + 1}" for k, _, info in infos),
                         fix=_architecture_hint(key_maps, n) or "averaging needs models of the "
                         "same architecture, fine-tuned from the same base")
            continue
        kinds = {DTYPES[info.dtype].kind for _, _, info in infos}
        if len(kinds) > 1:
            problems.add("kind_mismatch", "floating in some inputs, integer/bool in others", q,
                         f"{q!r}: floating in some inputs, integer/bool in others: " + ", ".join(
                             f"{info.dtype} in input {k + 1}" for k, _, info in infos))
            continue
        dtypes = [info.dtype for _, _, info in infos]
        kind = kinds.pop()
        cname, key = key_maps[holders[0]][q]
        if kind != "float":
            if len(set(dtypes)) > 1:
                problems.add("integer_dtype_mismatch", "integer/bool dtypes differ: " + ", ".join(
                    f"{d} in input {k + 1}" for (k, _, _), d in zip(infos, dtypes)), q)
                continue
            out_tensors[q] = OutTensor(key, q, dtypes[0], infos[0][2].shape, "copy",
                                       [Source(k, wf, info, 1.0, src_keys[k]) for k, wf, info in infos])
            continue
        unsupported = [d for d in dtypes if DTYPES[d].kernel_code is None]
        unsupported = sorted(set(unsupported)) if unsupported else unsupported
        if unsupported:
            problems.add("unsupported_dtype", f"cannot average {', '.join(unsupported)} tensors", q,
                         f"{q!r}: cannot average {', '.join(unsupported)} tensors "
                         "(convert the inputs to fp16/bf16/fp32 first)",
                         fix="convert the inputs to fp16/bf16/fp32 first")
            continue
        if len(set(dtypes)) > 1 and dtype is None:
            pairs = ", ".join(f"{d} in input {k + 1}" for (k, _, _), d in zip(infos, dtypes))
            warns.add("dtype_mismatch", f"input dtypes differ ({pairs}); writing {dtypes[0]} "
                      "(the first input's)", q,
                      f"{q!r}: input dtypes differ ({', '.join(dtypes)}); writing {dtypes[0]}",
                      fix=f"choose the output dtype with {flag('dtype', 'bf16')} (or fp16, fp32)")
        present = [k for k in holders if k < n]
        try:
            coef = _coefficients(weights, present, base is not None, normalize, q)
        except MergeError as exc:
            msg = str(exc)[len(q) + 2:]
            problems.add("weights", msg.split(" (pass")[0], q, str(exc),
                         fix=f"pass {flag('normalize', False)}, or other weights")
            continue
        srcs = []
        for k, wf, info in infos:
            if k == base_index:
                c = 1.0 - sum(coef.values())
            else:
                c = coef[k]
            if c != 0.0:
                srcs.append(Source(k, wf, info, c, src_keys[k]))
        if not srcs:  # every coefficient is zero: the result is zero; read one input
            k, wf, info = infos[0]
            srcs.append(Source(k, wf, info, 0.0, src_keys[k]))
        big = [s for s in srcs if not abs(s.weight) <= limit]
        if big:
            problems.add("weight_range", f"coefficient {big[0].weight:g} of input "
                         f"{big[0].input_index + 1} overflows the fp32 accumulator (largest "
                         f"finite fp32: {FP32_MAX:.4g})", q,
                         fix=f"use smaller weights, normalise them, or {flag('accumulate', 'fp64')}")
            continue
        out_tensors[q] = OutTensor(key, q, dtype or dtypes[0], infos[0][2].shape, "sum", srcs)

    if problems:
        raise PlanError("the inputs cannot be merged", [], problems)
    if not out_tensors:
        raise MergeError("nothing to merge: no key is shared by the inputs"
                         + (f" ({len(dropped)} dropped by --keys intersection)" if dropped else ""))

    full_coef = _coefficients(weights, range(n), base is not None, normalize, "weights")
    coefficients = [full_coef[k] for k in range(n)]
    components = _mirror(layouts, key_maps, out_tensors, selected, max_shard_size)
    kind = layouts[0].kind
    if kind == "file" and any(len(c.files) > 1 for c in components):
        kind = "dir"
    return Plan(kind=kind, inputs=layouts, input_weights=weights, coefficients=coefficients,
                base_index=base_index, normalize=normalize, key_policy=keys,
                components=components, dropped_keys=dropped, warnings=warns.lines(),
                diagnostics=list(warns))


def _plan_uniform(layouts, n: int, keys: List[str], weights, has_base: bool, normalize: bool,
                  dtype: Optional[str], limit: float, out: Dict[str, "OutTensor"]) -> List[str]:
    """Plan, into ``out``, the keys held by every input (base included) with one shape and
    one averageable floating dtype across them: the bulk of a checkpoint, planned with the
    weights of the whole set computed once. Returns the other keys (integer/bool tensors,
    differing shapes or dtypes, any problem), in order, for the key-by-key pass that
    explains them."""
    try:
        coef = _coefficients(weights, range(n), has_base, normalize, "weights")
    except MergeError:
        return keys
    cs = [coef[k] for k in range(n)] + ([1.0 - sum(coef.values())] if has_base else [])
    used = [k for k, c in enumerate(cs) if c != 0.0]
    if not used or any(not abs(cs[k]) <= limit for k in used):
        return keys
    averageable = {name for name, spec in DTYPES.items()
                   if spec.kind == "float" and spec.kernel_code is not None}
    shared = _shared_single_files(layouts)
    if shared is not None:  # one header, parsed once, for every input: nothing to compare
        infos, wfs = shared
        inputs = InputSet(tuple(used), tuple(wfs[k] for k in used), tuple(cs[k] for k in used))
        rest = []
        for q in keys:
            info = infos[q]
            if info.dtype not in averageable:
                rest.append(q)
                continue
            out[q] = OutTensor(q, q, dtype or info.dtype, info.shape, "sum", None,
                               shared=(inputs, info, q))
        return rest
    # qualified key -> (file, info) per input; a flat single-component layout's own table
    # serves as is (its keys are the qualified keys), others are built once
    tables, names = [], []
    for lay in layouts:
        comps = lay.components
        if len(comps) == 1 and "" in comps:
            tables.append(comps[""].tensors)
            names.append(None)
            continue
        tables.append({(f"{cname}/{key}" if cname else key): entry
                       for cname, comp in comps.items() for key, entry in comp.tensors.items()})
        names.append(lay.keys())  # qualified key -> (component, key)
    rest = []
    first, others = tables[0], tables[1:]
    name0 = names[0]
    for q in keys:
        entry0 = first[q]
        info0 = entry0[1]
        entries = [entry0]
        for t in others:
            e = t[q]
            info = e[1]
            if info is not info0 and (info.shape != info0.shape or info.dtype != info0.dtype):
                break
            entries.append(e)
        dt = info0.dtype
        if len(entries) != len(tables) or dt not in averageable:
            rest.append(q)
            continue
        srcs = [Source(k, entries[k][0], entries[k][1], cs[k],
                       q if names[k] is None else names[k][q][1]) for k in used]
        out[q] = OutTensor(q if name0 is None else name0[q][1], q, dtype or dt, info0.shape,
                           "sum", srcs)
    return rest


def _shared_single_files(layouts):
    """``(infos, files)`` when every layout is one flat safetensors file whose tensors are
    those of one shared header mapping (byte-identical headers, parsed once): then every
    key has the same :class:`TensorInfo` in every input, and ``files[k]`` holds it in
    input ``k``. None otherwise."""
    infos, files = None, []
    for lay in layouts:
        mapping = lay.file_mapping()
        if mapping is None or infos is not None and mapping is not infos:
            return None
        infos = mapping
        files.append(lay.components[""].files[0])
    return infos, files


def _key_maps(layouts) -> list:
    """:meth:`Layout.keys` of each layout; layouts sharing one header mapping
    (:meth:`Layout.file_mapping`) have equal maps, built once and shared (read-only)."""
    maps, by_mapping = [], {}
    for lay in layouts:
        mapping = lay.file_mapping()
        if mapping is None:
            maps.append(lay.keys())
            continue
        if id(mapping) not in by_mapping:  # the layouts keep the mappings alive
            by_mapping[id(mapping)] = lay.keys()
        maps.append(by_mapping[id(mapping)])
    return maps


def _mirror(layouts, key_maps, out_tensors, order, max_shard_size) -> List[OutComponent]:
    """Group output tensors into files the way the first input holding them does."""
    comps: Dict[str, OutComponent] = {}
    comp_layout: Dict[str, Layout] = {}
    by_file: Dict[Tuple[str, str], OutFile] = {}
    # Order: each tensor at its position in the first holder's files (file order, offset).
    comp_index = [{c: i for i, c in enumerate(lay.components)} for lay in layouts]
    file_index = [{id(wf): i for c in lay.components.values() for i, wf in enumerate(c.files)}
                  for lay in layouts]

    def holder(q):
        """(input, component name, key, file, info) of the first input holding ``q``."""
        for k, km in enumerate(key_maps):
            got = km.get(q)
            if got is not None:
                cname, key = got
                wf, info = layouts[k].components[cname].tensors[key]
                return k, cname, key, wf, info
        raise AssertionError(q)

    fast = _single_file_order(layouts[0], key_maps[0], out_tensors)
    if fast is not None:  # the first input, one file, holds every output tensor
        cname, comp, keys = fast
        comps[cname] = OutComponent(name=cname, files=[OutFile(
            name=comp.files[0].name, tensors=[out_tensors[q] for q in keys])],
            index_name=comp.index_name, index_metadata=dict(comp.index_metadata))
        comp_layout[cname] = layouts[0]
        return _finish_components(layouts, comps, comp_layout, max_shard_size)

    held = {q: holder(q) for q in out_tensors}

    def position(q):
        k, cname, _, wf, info = held[q]
        return (k, comp_index[k][cname], file_index[k][id(wf)], info.begin, q)

    single = {}  # (input, component) -> whether that component is one file without index
    ordered = sorted(out_tensors, key=position)
    for q in ordered:
        t = out_tensors[q]
        k, cname, key, wf, _ = held[q]
        comp = layouts[k].components[cname]
        if cname not in comps:
            comps[cname] = OutComponent(name=cname, files=[], index_name=comp.index_name,
                                        index_metadata=dict(comp.index_metadata))
            comp_layout[cname] = layouts[k]
        fk = (cname, wf.name)
        one = single.get((k, cname))
        if one is None:
            one = single[(k, cname)] = _single_file(comp)
        if one and comps[cname].files and _single_file(comp_layout[cname].components[cname]):
            # single-file inputs (whatever their file names): one output file
            fk = (cname, comps[cname].files[0].name)
        if fk not in by_file:
            by_file[fk] = OutFile(name=wf.name)
            comps[cname].files.append(by_file[fk])
        by_file[fk].tensors.append(t)

    return _finish_components(layouts, comps, comp_layout, max_shard_size)


def _single_file_order(layout, key_map, out_tensors):
    """``(component name, component, keys in file order)`` when ``layout`` is one
    safetensors file without index holding every key of ``out_tensors`` at distinct offsets:
    then the file's order (by offset) is the order :func:`_mirror`'s sort gives, and the
    sort is skipped. None otherwise."""
    if len(layout.components) != 1:
        return None
    (cname, comp), = layout.components.items()
    if not _single_file(comp) or comp.files[0].header is None:
        return None
    if len(out_tensors) > len(key_map) or not all(map(key_map.__contains__, out_tensors)):
        return None
    keys = [q for q in key_map if q in out_tensors]   # key_map follows the file's tensors
    begins = [comp.tensors[key_map[q][1]][1].begin for q in keys]
    if not all(map(operator.lt, begins[:-1], begins[1:])):
        return None  # ties (zero-sized tensors): the sort breaks them by name
    return cname, comp, keys


def _finish_components(layouts, comps, comp_layout, max_shard_size) -> List[OutComponent]:
    """The output components in the first input's order, re-sharded or renamed."""
    names = list(layouts[0].components) + [c for c in comps if c not in layouts[0].components]
    out = [comps[c] for c in names if c in comps]
    for oc in out:
        src_comp = comp_layout[oc.name].components[oc.name]
        if max_shard_size is not None:
            _reshard(oc, src_comp, comp_layout[oc.name].variant, max_shard_size)
        elif oc.files and src_comp.files and not src_comp.files[0].name.endswith(".safetensors"):
            for f in oc.files:  # pickle inputs are written as safetensors
                f.name = f.name.rsplit(".", 1)[0] + ".safetensors"
        if max_shard_size is None and src_comp.index_name and ".bin.index" in src_comp.index_name:
            oc.index_name = src_comp.index_name.replace(".bin.index", ".safetensors.index")
    return out


def _single_file(comp) -> bool:
    return not comp.index_name and len(comp.files) == 1


def _reshard(oc: OutComponent, src_comp, variant: Optional[str], max_bytes: int) -> None:
    tensors = [t for f in oc.files for t in f.tensors]
    shards: List[List[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    stem = src_comp.weight_stem
    vpart = f".{variant}" if variant else ""
    if len(shards) == 1:
        name = oc.files[0].name if not src_comp.index_name else f"{stem}{vpart}.safetensors"
        if not name.endswith(".safetensors"):
            name = name.rsplit(".", 1)[0] + ".safetensors"
        oc.files = [OutFile(name=name, tensors=shards[0])]
        oc.index_name = None
        return
    total = len(shards)
    oc.files = [OutFile(name=f"{stem}{vpart}-{i + 1:05d}-of-{total:05d}.safetensors", tensors=s)
                for i, s in enumerate(shards)]
    oc.index_name = f"{stem}.safetensors.index{vpart}.json"
    oc.index_metadata = {}
