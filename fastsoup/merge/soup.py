"""Soup upkeep: add a constituent to a soup, or remove one, by recomputing it.

:func:`soup_add` and :func:`soup_remove` recompute the soup from its constituents,
listed with their sizes and sha256 in the soup's manifest (:mod:`.manifest`); fastsoup
keeps no fp32 master. The result is bit-identical to merging the new constituent list
from scratch with :func:`.api.merge` (the same kernel, the same order), which is stronger
than "exact to fp32 rounding". Constituents are verified against the manifest (size
before, sha256 during the run) and the output is not committed if one changed.

Constituents that moved since the soup was made are found with ``remap`` (``{OLD
prefix: NEW prefix}``, ``--remap OLD=NEW``) or ``search`` (folders holding them under
their recorded base names, ``--search DIR``); what is found is verified by size and
sha256 exactly like a constituent at its recorded path.
"""
from __future__ import annotations

import os
from typing import Dict, List, Mapping, Optional, Sequence

from .api import PathLike, merge
from .errors import MergeError, from_cli
from .formats import resolve
from .hashing import cached_file_sha256
from .manifest import describe
from .manifest import read as read_manifest
from .options import dtype_user_name
from .report import MergeReport


def _soup_options(m: dict, options: dict) -> dict:
    """The :func:`merge` options of a recomputed soup: those given, else the soup's own
    (normalize, key policy, accumulation, variant, dtype) from its manifest ``m``."""
    opts = dict(options)
    opts.setdefault("normalize", m.get("normalize"))
    opts.setdefault("keys", m.get("key_policy", "strict"))
    opts.setdefault("accumulate", m.get("accumulate", "fp32"))
    if opts.get("variant") is None and m["constituents"][0].get("variant"):
        opts["variant"] = m["constituents"][0]["variant"]
    if m.get("dtype") and "dtype" not in opts:
        opts["dtype"] = dtype_user_name(m["dtype"])
    if opts.get("metadata") is None and m.get("metadata"):
        opts["metadata"] = dict(m["metadata"])
    from .strategy import recorded_options  # method, density, seed, per-key weights, LoRA rank

    for k, v in recorded_options(m).items():
        opts.setdefault(k, v)
    return opts


def _relocate(entry: dict, remap: Mapping[str, str], search: Sequence[str]) -> dict:
    """``entry`` with its path moved by ``remap`` (first matching prefix whose result
    exists) or, if its recorded path is gone, found in a ``search`` folder under its
    recorded base name."""
    path = entry["path"]
    for old, new in (remap or {}).items():
        old = os.path.abspath(os.fspath(old)).rstrip(os.sep)
        if path == old or path.startswith(old + os.sep):
            cand = os.path.abspath(os.fspath(new)) + path[len(old):]
            if os.path.exists(cand):
                return dict(entry, path=cand)
    if os.path.exists(path):
        return entry
    for folder in search or ():
        cand = os.path.join(os.path.abspath(os.fspath(folder)), os.path.basename(path))
        if os.path.exists(cand):
            return dict(entry, path=cand)
    return entry


def _check_recorded(entry: dict, what: str) -> None:
    path = entry["path"]
    if not os.path.exists(path):
        raise MergeError(f"{what} {path} (recorded in the soup's manifest) no longer exists; "
                         "fastsoup recomputes soups from their constituents. If it moved, "
                         "point to it with " + ("--search DIR (a folder holding it) or --remap "
                                                "OLD=NEW (a path prefix to replace)" if from_cli()
                                                else "search=['DIR'] (folders holding it) or "
                                                "remap={'OLD': 'NEW'} (path prefixes to replace)"))
    if entry.get("kind") == "file":
        size = os.path.getsize(path)
    else:
        size = 0
        for f in entry.get("files", []):
            p = os.path.join(_entry_root(entry), *f["name"].split("/"))
            if not os.path.isfile(p):
                raise MergeError(f"{what} {path}: {f['name']} (recorded in the soup's manifest) "
                                 "no longer exists")
            size += os.path.getsize(p)
    if size != entry["size_bytes"]:
        raise MergeError(f"{what} {path} changed since the soup was made "
                         f"({entry['size_bytes']} -> {size} bytes)")


def _entry_root(entry: dict) -> str:
    """The folder a manifest entry's file names are relative to (a sharded input may have
    been given as its ``*.index.json``)."""
    path = entry["path"]
    return path if os.path.isdir(path) else os.path.dirname(path)


def _expected_hashes(entries: List[dict]) -> Dict[str, str]:
    out = {}
    for e in entries:
        for f in e.get("files", []):
            if "sha256" not in f:
                continue
            p = e["path"] if e.get("kind") == "file" else \
                os.path.join(_entry_root(e), *f["name"].split("/"))
            out[p] = f["sha256"]
    return out


def soup_add(soup: PathLike, new: PathLike, output: PathLike, weight: Optional[float] = None,
             *, search: Sequence[PathLike] = (), remap: Optional[Mapping[str, str]] = None,
             **options) -> MergeReport:
    """Add constituent ``new`` to ``soup``: ``θ' = (Σ a_i θ_i + a θ_new) / (Σ a_i + a)``.

    The soup is recomputed from the constituents in its manifest (verified by size and
    sha256) plus ``new``. A soup made with the default weights gets the default weights
    for ``n + 1`` inputs (the mean, or ``1/(n+1)`` task weights with a base); otherwise
    ``weight`` (``a``) defaults to the soup's common raw weight (the mean raw weight when
    they differ). ``search`` / ``remap`` find constituents that moved (module docstring).
    Other keyword arguments are those of :func:`merge` (the soup's normalize, key
    policy, accumulation, dtype and user metadata are kept by default).
    """
    m = read_manifest(os.fspath(soup))
    entries = _relocated(m, search, remap)
    raw = [float(e["weight"]) for e in entries]
    if weight is None and m.get("default_weights"):
        weights = None  # the soup used the default weights: recompute them for n + 1
    else:
        if weight is None:
            weight = raw[0] if len(set(raw)) == 1 else sum(raw) / len(raw)
        weights = raw + [float(weight)]
    if m.get("weights_for") and "weights_for" not in options:  # one more weight per pattern
        from .keyweights import for_add

        options = dict(options, weights_for=for_add(m["weights_for"], weight))
    return _recompute(m, entries, [os.fspath(new)], output, weights, options)


def _relocated(m: dict, search, remap) -> List[dict]:
    """The manifest's constituents (and, in place, its base) moved by ``search``/``remap``."""
    if m.get("base"):
        m["base"] = _relocate(m["base"], remap, search)
    return [_relocate(e, remap, search) for e in m["constituents"]]


def _matches(target: str, entries: List[dict]) -> List[int]:
    """Indexes of the entries that are ``target``: the same path (symlinks resolved), or
    the same content: a single file by its sha256 (whatever its name), a folder by its
    files' names, sizes and sha256."""
    real = os.path.realpath(target)
    idx = [i for i, e in enumerate(entries)
           if os.path.abspath(e["path"]) == target or os.path.realpath(e["path"]) == real]
    if idx or not os.path.exists(target):
        return idx
    if os.path.isfile(real) and real.endswith(".safetensors"):
        size = os.path.getsize(real)
        candidates = [i for i, e in enumerate(entries) if e["kind"] == "file"
                      and e["files"][0]["size_bytes"] == size and "sha256" in e["files"][0]]
        if candidates:
            digest = cached_file_sha256(real)
            return [i for i in candidates if entries[i]["files"][0]["sha256"] == digest]
        return []
    lay = resolve(target)
    digest = describe(lay, {wf.path: cached_file_sha256(wf.path) for wf in lay.files()})["sha256"]
    return [i for i, e in enumerate(entries) if e["kind"] != "file" and e.get("sha256") == digest]


def soup_remove(soup: PathLike, old: PathLike, output: PathLike, *,
                search: Sequence[PathLike] = (), remap: Optional[Mapping[str, str]] = None,
                **options) -> MergeReport:
    """Remove constituent ``old`` from ``soup``: ``θ' = (Σ a_i θ_i − a_j θ_j) / (Σ a_i − a_j)``,
    recomputed from the remaining constituents (see :func:`soup_add`). ``old`` is matched
    by path (symlinks resolved), or else by content: a renamed copy of a single-file
    constituent matches by its sha256. ``search`` / ``remap`` find moved constituents."""
    m = read_manifest(os.fspath(soup))
    entries = _relocated(m, search, remap)
    target = os.path.abspath(os.fspath(old))
    idx = _matches(target, entries)
    if not idx:
        raise MergeError(f"{old} is not a constituent of {soup} (constituents: "
                         + ", ".join(e["path"] for e in entries) + ")")
    keep = [e for i, e in enumerate(entries) if i != idx[0]]
    if not keep:
        raise MergeError(f"removing {old} would leave {soup} without constituents")
    if len(keep) < 2 and not m.get("base"):
        raise MergeError(f"removing {old} would leave one constituent; a soup of one model is "
                         f"that model ({keep[0]['path']})")
    weights = None if m.get("default_weights") else [float(e["weight"]) for e in keep]
    if m.get("weights_for") and "weights_for" not in options:  # its weight leaves each pattern
        from .keyweights import for_remove

        options = dict(options, weights_for=for_remove(m["weights_for"], idx[0]))
    return _recompute(m, keep, [], output, weights, options)


def _recompute(m: dict, entries: List[dict], new: List[str], output: PathLike,
               weights: Optional[List[float]], options: dict) -> MergeReport:
    """Merge the recorded ``entries`` (checked by size now, by sha256 during the run) and
    the ``new`` paths, over the soup's base if it has one."""
    base = [m["base"]] if m.get("base") else []
    for e in entries:
        _check_recorded(e, "constituent")
    for e in base:
        _check_recorded(e, "base")
    opts = _soup_options(m, options)
    return merge([e["path"] for e in entries] + new, output, weights,
                 base=base[0]["path"] if base else None,
                 _expect_hashes=_expected_hashes(entries + base), **opts)
