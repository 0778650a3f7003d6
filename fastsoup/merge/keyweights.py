"""Per-key weights: ``--weights-for 'PATTERN=w1,w2,...'`` / ``weights_for={PATTERN: [...]}``.

A weight vector per key pattern (``fnmatch`` globs, case-sensitive), tried in the order
given; the first pattern that matches a tensor's key wins, and ``weights`` (``--weights``)
applies to every key no pattern matches. A pattern is tried on the qualified key
(``unet/down_blocks.0.attentions.0.proj_in.weight`` in a diffusers root) and on the key
inside its component (``down_blocks.0.attentions.0.proj_in.weight``). Each vector has one
weight per input and is turned into coefficients exactly like ``weights`` (normalised per
key unless ``--base`` / ``--no-normalize``; with ``--base`` the base gets ``1 − Σ c_i``).

Checked at plan time: a vector of the wrong length, a non-finite weight, or a pattern that
matches no tensor of the merge is an error.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import MergeError, from_cli

WeightsFor = Tuple[Tuple[str, Tuple[float, ...]], ...]


def _opt() -> str:
    """The option as the caller sets it."""
    return "--weights-for" if from_cli() else "weights_for"


def _weights(text_or_seq, where: str) -> Tuple[float, ...]:
    if isinstance(text_or_seq, str):
        parts = [p for p in text_or_seq.replace(" ", ",").split(",") if p.strip()]
    else:
        try:
            parts = list(text_or_seq)
        except TypeError:
            raise MergeError(f"{where}: expected a list of weights, got {text_or_seq!r}") from None
    out = []
    for p in parts:
        if isinstance(p, bool):
            raise MergeError(f"{where}: expected a number, got {p!r}")
        try:
            w = float(p)
        except (TypeError, ValueError):
            raise MergeError(f"{where}: expected a number, got {p!r}") from None
        if not math.isfinite(w):
            raise MergeError(f"{where}: weights must be finite, got {p!r}")
        out.append(w)
    if not out:
        raise MergeError(f"{where}: no weights given")
    return tuple(out)


def check_weights_for(spec) -> WeightsFor:
    """``weights_for`` in any accepted form → ``((pattern, weights), ...)`` in order.

    Accepted: a mapping ``{pattern: [w1, w2, ...]}`` (insertion order), a sequence of
    ``"PATTERN=w1,w2"`` strings (the command line), or of ``(pattern, weights)`` pairs."""
    if spec is None:
        return ()
    items = list(spec.items()) if isinstance(spec, Mapping) else None
    if items is None:
        if isinstance(spec, (str, bytes)):
            spec = [spec]
        items = []
        for entry in spec:
            if isinstance(entry, str):
                pattern, sep, ws = entry.rpartition("=")
                if not sep or not pattern:
                    raise MergeError(f"{_opt()} takes PATTERN=w1,w2,..., got {entry!r}")
                items.append((pattern, ws))
            elif isinstance(entry, (tuple, list)) and len(entry) == 2:
                items.append(tuple(entry))
            else:
                raise MergeError(f"{_opt()}: expected 'PATTERN=w1,w2' or "
                                 f"(pattern, weights), got {entry!r}")
    out = []
    for pattern, ws in items:
        if not isinstance(pattern, str) or not pattern:
            raise MergeError(f"{_opt()}: a pattern must be a non-empty string, got {pattern!r}")
        out.append((pattern, _weights(ws, f"{_opt()} {pattern!r}")))
    return tuple(out)


def match(weights_for: WeightsFor, qualified: str, key: str) -> Optional[int]:
    """Index of the first pattern matching the qualified key or the component key."""
    for i, (pattern, _) in enumerate(weights_for):
        if fnmatch.fnmatchcase(qualified, pattern) or fnmatch.fnmatchcase(key, pattern):
            return i
    return None


def check_lengths(weights_for: WeightsFor, n: int) -> None:
    for pattern, ws in weights_for:
        if len(ws) != n:
            raise MergeError(f"{_opt()} {pattern!r}: {len(ws)} weights for {n} inputs")


def unused_patterns(weights_for: WeightsFor, keys: Sequence[Tuple[str, str]]) -> List[str]:
    """Patterns that match none of ``keys`` (``(qualified, key)`` pairs)."""
    used = set()
    for q, k in keys:
        i = match(weights_for, q, k)
        if i is not None:
            used.add(i)
    return [p for i, (p, _) in enumerate(weights_for) if i not in used]


def to_manifest(weights_for: WeightsFor) -> List[dict]:
    return [{"pattern": p, "weights": list(ws)} for p, ws in weights_for]


def from_manifest(entries) -> Dict[str, List[float]]:
    """The manifest's ``weights_for`` list back to a ``weights_for=`` mapping; with the
    constituents' order kept by :mod:`.soup`."""
    return {e["pattern"]: list(e["weights"]) for e in entries or ()}


def apply(plan, weights_for: WeightsFor) -> None:
    """Re-weight, in place, the planned ``"sum"`` tensors a pattern matches (their
    sources are rebuilt from every input holding the key, since a zero default
    coefficient may have dropped one). Raises MergeError for an unused pattern."""
    if not weights_for:
        return
    from .plan import Source, _coefficients

    n = len(plan.input_weights)
    check_lengths(weights_for, n)
    tensors = list(plan.tensors())
    unused = unused_patterns(weights_for, [(t.qualified, t.key) for t in tensors])
    if unused:
        raise MergeError(f"{_opt()}: pattern{'s' if len(unused) > 1 else ''} "
                         f"{', '.join(map(repr, unused))} match{'' if len(unused) > 1 else 'es'} "
                         f"no tensor of the merge (patterns are globs on keys such as "
                         f"{tensors[0].qualified!r})")
    base = plan.base_index
    for t in tensors:
        i = match(weights_for, t.qualified, t.key)
        if i is None or t.op != "sum":
            continue
        ws = weights_for[i][1]
        holders = holder_sources(plan, t.qualified)
        present = [k for k in holders if k < n]
        coef = _coefficients(ws, present, base is not None, plan.normalize, t.qualified)
        srcs = []
        for k, (wf, info, key) in holders.items():
            c = 1.0 - sum(coef.values()) if k == base else coef[k]
            if c != 0.0:
                srcs.append(Source(k, wf, info, c, key))
        if not srcs:
            k, (wf, info, key) = next(iter(holders.items()))
            srcs.append(Source(k, wf, info, 0.0, key))
        t.sources = srcs


def holder_sources(plan, qualified: str) -> Dict[int, tuple]:
    """``{input index: (WeightFile, TensorInfo, key)}`` of every input (base included)
    holding ``qualified``, in input order."""
    cache = getattr(plan, "_key_maps", None)
    if cache is None:
        cache = [lay.keys() for lay in plan.inputs]
        try:
            plan._key_maps = cache
        except AttributeError:
            pass
    out = {}
    for k, km in enumerate(cache):
        if qualified in km:
            cname, key = km[qualified]
            wf, info = plan.inputs[k].components[cname].tensors[key]
            out[k] = (wf, info, key)
    return out


def for_add(entries, weight: Optional[float] = None) -> Dict[str, List[float]]:
    """A soup's recorded per-key weights with a weight for one more constituent: ``weight``
    if given, else the vector's common value (its mean when the values differ)."""
    out = {}
    for pattern, ws in from_manifest(entries).items():
        w = weight if weight is not None else (ws[0] if len(set(ws)) == 1 else sum(ws) / len(ws))
        out[pattern] = ws + [float(w)]
    return out


def for_remove(entries, j: int) -> Dict[str, List[float]]:
    """A soup's recorded per-key weights without constituent ``j``'s entry."""
    return {p: ws[:j] + ws[j + 1:] for p, ws in from_manifest(entries).items()}
