"""Hugging Face Hub ids as merge inputs: ``org/model``, ``org/model@revision``,
``org/model/subfolder`` (a diffusers component or a file inside the repository), or any
of these after ``hf://``.

An input that exists on disk is always a local path. Otherwise a name shaped like a Hub id
is resolved through :func:`huggingface_hub.snapshot_download`: first from the local cache
only (``HF_HUB_CACHE`` / ``HF_HOME``; works offline when the files are there), then, if the
files are not cached and ``HF_HUB_OFFLINE`` is not set, by downloading them (the files of
the subfolder, and the root's ``model_index.json`` and ``*.json`` configs). The resolved
snapshot folder is then read like any local input (same validation); the manifest records
that folder. ``huggingface_hub`` is imported only when a Hub id is resolved.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple

from .errors import MergeError

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?P<sub>(/[^@]+)?)(@(?P<rev>[^/@]+))?$")
PREFIX = "hf://"


def parse(name: str) -> Optional[Tuple[str, Optional[str], Optional[str]]]:
    """``(repo_id, subfolder, revision)`` if ``name`` is shaped like a Hub id, else None."""
    text = name[len(PREFIX):] if name.startswith(PREFIX) else name
    if not name.startswith(PREFIX) and (name.startswith((".", "/", "~")) or os.sep == "\\"):
        return None
    m = _ID.match(text)
    if not m:
        return None
    sub = m.group("sub").strip("/") or None
    if sub is not None and any(p in ("", ".", "..") for p in sub.split("/")):
        return None
    return m.group("repo"), sub, m.group("rev")


def _cache_dir():
    """The cache folder the environment names now (huggingface_hub reads ``HF_HUB_CACHE``
    and ``HF_HOME`` once, when it is first imported: a later change would be missed)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None  # the library's default


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def local_path(name: str) -> str:
    """``name`` itself when it exists (or is not a Hub id); else the local path of the Hub
    files it names (cache first, download when allowed). MergeError when they cannot be
    found."""
    if not name.startswith(PREFIX) and os.path.exists(name):
        return name
    parsed = parse(name)
    if parsed is None:
        if name.startswith(PREFIX):
            raise MergeError(f"{name}: not a Hub id (hf://org/model[/subfolder][@revision])")
        return name  # a missing local path: the resolver reports it
    repo, sub, rev = parsed
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MergeError(f"{name}: no such file, and huggingface_hub (needed to read it as a Hub "
                         "id) is not installed") from None
    patterns = ["*.json", "*.txt"] + ([f"{sub}", f"{sub}/*", f"{sub}/**"] if sub else ["*"])
    error = None
    for local_only in ((True,) if _offline() else (True, False)):
        try:
            root = snapshot_download(repo, revision=rev, allow_patterns=patterns,
                                     local_files_only=local_only, cache_dir=_cache_dir())
            break
        except Exception as exc:  # not cached / no network / no such repo
            error = exc
    else:
        where = "the local Hugging Face cache" + ("" if _offline() else " or the Hub")
        raise MergeError(f"{name}: neither a local path nor a model found in {where} "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
    path = os.path.join(root, *sub.split("/")) if sub else root
    if not os.path.exists(path):
        raise MergeError(f"{name}: the Hub snapshot {root} has no {sub!r}")
    return path
