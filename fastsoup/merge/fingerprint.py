"""Base fingerprints: averaging only makes sense for fine-tunes of the same base (SPEC §5).

An input *declares* its base when its metadata says which model it was trained from:

* a fastsoup soup: its manifest's ``base_fingerprint``, else the sha256 of its ``base``
  (a soup made with ``--base``) → ``{"sha256": HEX}``;
* a kohya-trained LoRA or fine-tune: ``ss_sd_model_hash`` / ``ss_new_sd_model_hash`` →
  ``{"kohya": ...}`` / ``{"kohya_new": ...}``.

Fingerprints of the same kind that differ between inputs (or between an input and the
``--base`` when both are declared) mean different bases: the merge is refused, unless
``force=True`` / ``--force``, which turns the refusal into a warning. The fingerprints the
inputs agree on are recorded in the soup's manifest as ``base_fingerprint``; a soup made
with ``--base`` records its base's sha256 in ``base.sha256`` (the fingerprint its own
children will declare).

Inputs that declare nothing are compared by their weights (:func:`distance_warning`): on a
few large matrices, fine-tunes of one base stay close (relative distance well under 1),
while independently trained models are about as far apart as unrelated vectors (√2 for
equal norms). A pair above :data:`UNRELATED` gets a warning, not a refusal: it is a
heuristic.
"""
from __future__ import annotations

import heapq
import json
import math
import operator
import os
from typing import Dict, List, Optional

from .errors import MergeError

KOHYA_KEYS = {"ss_sd_model_hash": "kohya", "ss_new_sd_model_hash": "kohya_new"}


def _metadata(layout) -> dict:
    for wf in layout.files():
        if getattr(wf, "header", None) is not None:
            return dict(wf.header.metadata or {})
    return {}


def declared(layout) -> Dict[str, str]:
    """The base fingerprints ``layout`` declares (possibly none)."""
    md = _metadata(layout)
    out: Dict[str, str] = {}
    raw = md.get("fastsoup")
    if isinstance(raw, str):
        try:
            m = json.loads(raw)
        except ValueError:
            m = None
        if isinstance(m, dict):
            fp = m.get("base_fingerprint")
            if isinstance(fp, dict):
                out.update({k: v for k, v in fp.items() if isinstance(v, str)})
            base = m.get("base")
            if isinstance(base, dict) and isinstance(base.get("sha256"), str) \
                    and set(base["sha256"]) != {"0"}:
                out.setdefault("sha256", base["sha256"])
    for key, kind in KOHYA_KEYS.items():
        v = md.get(key)
        if isinstance(v, str) and v.strip():
            out[kind] = v.strip()
    return out


def check_bases(plan, force: bool = False) -> None:
    """Refuse (or, with ``force``, warn about) inputs declaring different bases; sets
    ``plan.base_fingerprint`` to the fingerprints every declaring input agrees on."""
    n = len(plan.input_weights)
    decl: List[Dict[str, str]] = [declared(lay) for lay in plan.inputs[:n]]
    if plan.base_index is not None:
        base_decl = declared(plan.inputs[plan.base_index])
        decl.append(base_decl)
    kinds = sorted({k for d in decl for k in d})
    agreed: Dict[str, str] = {}
    conflicts: List[str] = []
    for kind in kinds:
        values = {}
        for i, d in enumerate(decl):
            if kind in d:
                who = f"input {i + 1}" if i < n else "the base"
                values.setdefault(d[kind], []).append(who)
        if len(values) > 1:
            conflicts.append(f"{kind}: " + "; ".join(f"{', '.join(w)} → {v[:16]}"
                                                    for v, w in values.items()))
        else:
            agreed[kind] = next(iter(values))
    if conflicts:
        msg = ("the inputs declare different base models (" + " | ".join(conflicts) + "); "
               "averaging fine-tunes of different bases is meaningless")
        if not force:
            raise MergeError(msg + " (pass --force / force=True to merge anyway)")
        plan.warnings.append(msg + "; merged anyway (force)")
    plan.base_fingerprint = agreed or None
    if not kinds or any(not d for d in decl):  # someone declares nothing: compare weights
        warning = distance_warning(plan)
        if warning is not None:
            plan.warnings.append(warning)


PROBE_TENSORS = 8              # the largest floating matrices of the plan
PROBE_ELEMENTS = 1 << 16       # leading elements read from each
UNRELATED = 0.9                # relative distance above which two inputs warn
_DECODE = {"F32": "<f4", "F16": "<f2", "F64": "<f8"}


def _probe(file, key: str, count: int):
    """The first ``count`` elements of ``key`` as float32 (None for other dtypes/pickles)."""
    import numpy as np

    header = file.header
    if header is None:
        return None
    info = header.tensors[key]
    if info.dtype not in _DECODE and info.dtype != "BF16":
        return None
    item = 2 if info.dtype in ("F16", "BF16") else int(_DECODE[info.dtype][-1])
    start, _ = header.absolute(key)
    fd = os.open(file.path, os.O_RDONLY)
    try:
        raw = os.pread(fd, count * item, start)
    finally:
        os.close(fd)
    if info.dtype == "BF16":
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32)
    return np.frombuffer(raw, dtype=_DECODE[info.dtype]).astype(np.float32)


_NUMEL, _QUALIFIED = operator.attrgetter("numel"), operator.attrgetter("qualified")


def distance_warning(plan) -> Optional[str]:
    """A warning when two inputs' weights look unrelated (see the module docstring), or
    None. Reads at most ``PROBE_TENSORS × PROBE_ELEMENTS`` elements of each input."""
    import numpy as np

    n = len(plan.inputs)
    def every_input(t) -> bool:
        return len(t.sources) >= n and len({s.input_index for s in t.sources}) == n

    # the largest first; the per-source test only for tensors that could be among them
    matrices = [t for t in plan.tensors() if len(t.shape) >= 2 and t.op == "sum"
                and t.special is None]

    def ranked(count=None):  # by size, largest first, then by name (C-level comparisons)
        keys = zip(map(operator.neg, map(_NUMEL, matrices)), map(_QUALIFIED, matrices),
                   range(len(matrices)))
        best = heapq.nsmallest(count, keys) if count is not None else sorted(keys)
        return [matrices[i] for _, _, i in best]

    probes = [t for t in ranked(4 * PROBE_TENSORS) if every_input(t)][:PROBE_TENSORS]
    if len(probes) < PROBE_TENSORS and len(matrices) > 4 * PROBE_TENSORS:
        probes = [t for t in ranked() if every_input(t)][:PROBE_TENSORS]
    if n < 2 or not probes:
        return None
    # accumulated probe by probe: at most n × PROBE_ELEMENTS values held at once
    sq = np.zeros(n)
    diff = np.zeros((n, n))
    for t in probes:
        count = min(t.numel, PROBE_ELEMENTS)
        vs = [None] * n
        for src in t.sources:
            vs[src.input_index] = _probe(src.file, src.key, count)
        if any(v is None for v in vs):
            return None
        for a in range(n):
            sq[a] += float(np.dot(vs[a], vs[a]))
            for b in range(a + 1, n):
                d = vs[a] - vs[b]
                diff[a, b] += float(np.dot(d, d))
    worst = (0.0, 0, 0)
    for a in range(n):
        for b in range(a + 1, n):
            scale = math.sqrt(max(sq[a], sq[b]))
            if scale > 0 and math.isfinite(scale):
                worst = max(worst, (math.sqrt(diff[a, b]) / scale, a, b))
    rel, i, j = worst
    if rel <= UNRELATED:
        return None
    return (f"inputs {i + 1} and {j + 1} differ by {rel:.2f} (relative distance on "
            f"{len(probes)} of their largest matrices): they do not look like fine-tunes of "
            "one base model, and averaging unrelated models gives noise; check the inputs "
            "(fine-tunes of one base differ by much less than 1)")
