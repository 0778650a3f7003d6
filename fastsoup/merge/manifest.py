"""The provenance manifest of a soup: what it was made of, how, and by which fastsoup.

Written twice: compact JSON in the ``__metadata__["fastsoup"]`` entry of every output
weight file, and pretty JSON in a ``fastsoup.json`` sidecar (inside a directory output,
or ``<name>.fastsoup.json`` beside a single-file output). Layout::

    {"format": "fastsoup.merge/1", "fastsoup_version": "...", "created": "<UTC ISO>",
     "operation": "mean" | "weighted" | "task_arithmetic",
     "normalize": bool, "key_policy": "strict" | ..., "accumulate": "fp32" | "fp64",
     "dtype": null | "BF16" ..., "output_dtypes": {"BF16": <tensor count>, ...},
     "constituents": [{"path", "size_bytes", "sha256", "files": [{"name", "size_bytes",
                       "sha256"}], "weight", "coefficient"}],
     "base": null | {same fields as a constituent, without weights},
     "default_weights": bool}   # true when no weights were given (add/remove keep it so)

``sha256`` of a file is over its bytes; of a constituent, over the lines
``"<component>/<file> <size> <file sha256>\\n"`` of its weight files in sorted order, so
the same checkpoint copied elsewhere hashes the same. With ``hash="none"`` the digests
are omitted (the sizes still identify the files). Digests are cached per file (keyed by
path, device, inode, size, mtime and ctime; see :func:`cache_path`), so a constituent is
hashed once, not at every merge it takes part in.

A digest in a manifest is the digest of the bytes that were merged: see
:mod:`.hashing` (:class:`.hashing.Hasher`, fed the buffers the engine read).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import warnings
from typing import Any, Dict, Optional

from .._version import __version__
from .errors import MergeError
from .formats import Layout
from .hashing import file_entries

FORMAT = "fastsoup.merge/1"
METADATA_KEY = "fastsoup"
PLACEHOLDER = "0" * 64


def describe(layout: Layout, hashes: Optional[Dict[str, str]]) -> dict:
    """A manifest entry for one input (hash fields are placeholders when pending)."""
    files = []
    lines = []
    for rel, path, wf in file_entries(layout):
        size = wf.identity[2] if wf.identity is not None else os.path.getsize(path)
        entry = {"name": rel, "size_bytes": size}
        if hashes is not None:
            digest = hashes.get(path, PLACEHOLDER)
            entry["sha256"] = digest
            lines.append(f"{rel} {size} {digest}\n")
        files.append(entry)
    out = {"path": layout.path, "kind": layout.kind,
           "size_bytes": sum(f["size_bytes"] for f in files)}
    if hashes is not None:
        out["sha256"] = (hashlib.sha256("".join(lines).encode()).hexdigest()
                         if all(PLACEHOLDER != f["sha256"] for f in files) else PLACEHOLDER)
    if layout.variant:
        out["variant"] = layout.variant
    out["files"] = files
    return out


def build(plan, *, accumulate: str, dtype: Optional[str], hashes: Optional[Dict[str, str]],
          created: Optional[str] = None) -> dict:
    """The manifest of ``plan`` (a :class:`fastsoup.merge.plan.Plan`)."""
    n = len(plan.input_weights)
    if plan.base_index is not None:
        operation = "task_arithmetic"
    elif len(set(plan.input_weights)) == 1 and plan.normalize:
        operation = "mean"
    else:
        operation = "weighted"
    constituents = []
    for k in range(n):
        entry = describe(plan.inputs[k], hashes)
        entry["weight"] = plan.input_weights[k]
        entry["coefficient"] = plan.coefficients[k]
        constituents.append(entry)
    base = describe(plan.inputs[plan.base_index], hashes) if plan.base_index is not None else None
    return {
        "format": FORMAT,
        "fastsoup_version": __version__,
        "created": created or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "operation": operation,
        "normalize": plan.normalize,
        "key_policy": plan.key_policy,
        "accumulate": accumulate,
        "dtype": dtype,
        "output_dtypes": plan.output_dtypes(),
        "constituents": constituents,
        "base": base,
    }


# ------------------------------------------------------------------ the manifest's schema
_HEX64 = set("0123456789abcdef")
_KINDS = ("file", "dir", "diffusers")


class _Schema:
    """Checks a manifest read from disk (it may have been edited or forged): every field
    the add/remove code uses, with its JSON path in the error."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, path: str, expected: str, got: Any) -> MergeError:
        shown = json.dumps(got)[:60] if _json_safe(got) else repr(got)[:60]
        return MergeError(f"{self.where}: invalid soup manifest: {path}: expected {expected}, "
                          f"got {shown}")

    def obj(self, x, path: str) -> dict:
        if not isinstance(x, dict):
            raise self.fail(path, "an object", x)
        return x

    def field(self, o: dict, key: str, path: str, check, expected: str, required: bool = True):
        if key not in o:
            if required:
                raise MergeError(f"{self.where}: invalid soup manifest: {path}.{key}: missing "
                                 f"(expected {expected})")
            return None
        v = o[key]
        if not check(v):
            raise self.fail(f"{path}.{key}" if path else key, expected, v)
        return v

    def entry(self, e, path: str, constituent: bool) -> None:
        e = self.obj(e, path)
        self.field(e, "path", path, lambda v: isinstance(v, str) and v != "" and "\0" not in v,
                   "a non-empty path")
        self.field(e, "kind", path, lambda v: v in _KINDS, f"one of {', '.join(_KINDS)}")
        self.field(e, "size_bytes", path, _nonneg_int, "a non-negative integer")
        self.field(e, "sha256", path, _hex64, "64 lowercase hex digits", required=False)
        self.field(e, "variant", path, lambda v: v is None or isinstance(v, str),
                   "a string", required=False)
        files = self.field(e, "files", path, lambda v: isinstance(v, list) and len(v) > 0,
                           "a non-empty list")
        for j, f in enumerate(files):
            fp = f"{path}.files[{j}]"
            f = self.obj(f, fp)
            self.field(f, "name", fp, _relative_name, "a relative file name (no '..', not absolute)")
            self.field(f, "size_bytes", fp, _nonneg_int, "a non-negative integer")
            self.field(f, "sha256", fp, _hex64, "64 lowercase hex digits", required=False)
        if e["kind"] == "file" and len(files) != 1:
            raise self.fail(f"{path}.files", "one file for a single-file input", files)
        if constituent:
            self.field(e, "weight", path, _finite, "a finite number")
            self.field(e, "coefficient", path, _finite, "a finite number", required=False)

    def manifest(self, m) -> dict:
        m = self.obj(m, "manifest")
        self.field(m, "format", "", lambda v: v == FORMAT, repr(FORMAT))
        cons = self.field(m, "constituents", "", lambda v: isinstance(v, list) and len(v) > 0,
                          "a non-empty list")
        for i, e in enumerate(cons):
            self.entry(e, f"constituents[{i}]", True)
        if m.get("base") is not None:
            self.entry(m["base"], "base", False)
        self.field(m, "normalize", "", lambda v: v is None or isinstance(v, bool), "true or false",
                   required=False)
        self.field(m, "default_weights", "", lambda v: isinstance(v, bool), "true or false",
                   required=False)
        from .options import ACCUMULATE, DTYPE_NAMES, KEY_POLICIES

        self.field(m, "key_policy", "", lambda v: v in KEY_POLICIES,
                   f"one of {', '.join(KEY_POLICIES)}", required=False)
        self.field(m, "accumulate", "", lambda v: v in ACCUMULATE,
                   f"one of {', '.join(ACCUMULATE)}", required=False)
        self.field(m, "dtype", "", lambda v: v is None or v in DTYPE_NAMES.values(),
                   f"null or one of {', '.join(DTYPE_NAMES.values())}", required=False)
        self.field(m, "metadata", "", lambda v: isinstance(v, dict) and all(
            isinstance(k, str) and isinstance(x, str) for k, x in v.items()),
            "an object of strings", required=False)
        return m


def _json_safe(x) -> bool:
    try:
        json.dumps(x)
        return True
    except (TypeError, ValueError, RecursionError):
        return False


def _nonneg_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _hex64(v) -> bool:
    return isinstance(v, str) and len(v) == 64 and set(v) <= _HEX64


def _relative_name(v) -> bool:
    if not isinstance(v, str) or not v or "\0" in v or v.startswith("/") or "\\" in v:
        return False
    return all(part not in ("", ".", "..") for part in v.split("/"))


def validate(m, where: str) -> dict:
    """``m`` if it is a well-formed manifest, else MergeError naming the field's path
    (``constituents[1].weight: expected a finite number, got "abc"``)."""
    return _Schema(where).manifest(m)


def metadata_entry(manifest: dict) -> Dict[str, str]:
    return {METADATA_KEY: json.dumps(manifest, separators=(",", ":"), sort_keys=False)}


RESERVED_METADATA = ("format", METADATA_KEY)


def _input_metadata(layout) -> Dict[str, str]:
    for wf in layout.files():
        return dict((wf.header.metadata or {}) if getattr(wf, "header", None) is not None else {})
    return {}


def output_metadata(plan, manifest: dict, user: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The soup's own ``__metadata__``: the entries every input (constituents and base)
    carries with the same value (true of the soup too; an input's title or hash is not),
    then ``user`` (``--metadata KEY=VALUE``), then ``"format": "pt"`` (loaders such as
    transformers' require it when metadata exists) and the ``fastsoup`` manifest."""
    metas = [_input_metadata(lay) for lay in plan.inputs]
    meta: Dict[str, str] = {}
    for k, v in (metas[0] if metas else {}).items():
        if k in RESERVED_METADATA or not isinstance(v, str):
            continue
        if all(m.get(k) == v for m in metas[1:]):
            meta[k] = v
    meta.update(user or {})
    meta["format"] = "pt"
    meta.update(metadata_entry(manifest))
    return meta


def sidecar_path(output: str, is_dir: bool) -> str:
    """Where the ``fastsoup.json`` of an output lives."""
    if is_dir:
        return os.path.join(output, "fastsoup.json")
    base = output[: -len(".safetensors")] if output.endswith(".safetensors") else output
    return base + ".fastsoup.json"


def _embedded(soup: str) -> Optional[dict]:
    """The manifest in the ``__metadata__`` of the soup's first weight file holding one
    (committed atomically with the data), or None."""
    from .formats import resolve

    layout = resolve(soup)
    for wf in layout.files():
        md = (wf.header.metadata or {}) if wf.header is not None else {}
        if METADATA_KEY in md:
            try:
                return json.loads(md[METADATA_KEY])
            except (ValueError, RecursionError) as exc:
                raise MergeError(f"{wf.path}: corrupt fastsoup manifest "
                                 f"({'nested too deeply' if isinstance(exc, RecursionError) else exc})") from None
    return None


def read(soup: str) -> dict:
    """The manifest of an existing soup. The one embedded in the safetensors
    ``__metadata__`` is authoritative (it is written and renamed into place with the
    data); the ``fastsoup.json`` sidecar is used only where there is none, and a sidecar
    that disagrees with it is reported with a warning (a stale sidecar, e.g. from a run
    that could not replace it). Raises MergeError if there is no manifest."""
    soup = os.path.abspath(soup)
    side = sidecar_path(soup, os.path.isdir(soup))
    side_obj = None
    if os.path.isfile(side):
        try:
            with open(side, encoding="utf-8") as f:
                side_obj = json.load(f)
        except (OSError, ValueError, RecursionError) as exc:
            side_error = MergeError(f"{side}: cannot read the soup manifest "
                                    f"({'nested too deeply' if isinstance(exc, RecursionError) else exc})")
        else:
            side_error = None
    else:
        side_error = None
    try:
        obj = _embedded(soup)
    except MergeError:
        if side_obj is None:
            raise
        obj = None
    if obj is None:
        if side_error is not None:
            raise side_error from None
        obj = side_obj
    elif side_obj is not None and side_obj != obj:
        warnings.warn(f"{side}: the sidecar manifest differs from the one embedded in the "
                      "soup's weight files (a stale sidecar?); using the embedded one",
                      stacklevel=2)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise MergeError(f"{soup}: not a fastsoup soup (no {FORMAT} manifest in fastsoup.json "
                         "or in the safetensors __metadata__)")
    return validate(obj, soup)
