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
"""
from __future__ import annotations

import json
from typing import Dict, List

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
