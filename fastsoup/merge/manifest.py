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
path, device, inode, size and mtime; see :func:`cache_path`), so a constituent is
hashed once, not at every merge it takes part in.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import threading
import warnings
from typing import Dict, List, Optional

from .._version import __version__
from .errors import MergeError
from .formats import Layout

FORMAT = "fastsoup.merge/1"
METADATA_KEY = "fastsoup"
PLACEHOLDER = "0" * 64


def file_sha256(path: str, bufsize: int = 8 << 20, stop: Optional[threading.Event] = None) -> str:
    """sha256 of a file's bytes, read with ``readinto`` (page cache, no mapping, flat RSS)."""
    h = hashlib.sha256()
    buf = bytearray(bufsize)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            if stop is not None and stop.is_set():
                raise InterruptedError("hashing cancelled")
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def _file_entries(layout: Layout) -> List[tuple]:
    out = []
    for cname, comp in layout.components.items():
        for wf in comp.files:
            rel = f"{cname}/{wf.name}" if cname else wf.name
            out.append((rel, wf.path))
    return sorted(out)


def cache_path() -> Optional[str]:
    """The sha256 cache file, or None when caching is off (``FASTSOUP_HASH_CACHE=0``).
    Location: ``$FASTSOUP_CACHE_DIR``, else ``$XDG_CACHE_HOME/fastsoup``, else
    ``~/.cache/fastsoup``; file ``sha256.json``."""
    if os.environ.get("FASTSOUP_HASH_CACHE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    root = os.environ.get("FASTSOUP_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "fastsoup")
    return os.path.join(root, "sha256.json")


def _stat_key(path: str) -> str:
    """A file's identity and version: device, inode, size and mtime in ns. A rewrite of the
    file changes the mtime (and usually the inode), so the cached digest is not reused."""
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class HashCache:
    """sha256 digests of files keyed by (realpath, stat identity), so that merging the same
    constituents again (other weights, add/remove) does not hash them again. A cache
    that cannot be read or written is ignored (hashing just happens)."""

    MAX_ENTRIES = 10000

    def __init__(self, path: Optional[str]):
        self.path = path
        self.entries: Dict[str, dict] = {}
        self.dirty = False
        if path and os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    obj = json.load(f)
                if isinstance(obj, dict):
                    self.entries = {k: v for k, v in obj.items()
                                    if isinstance(v, dict) and isinstance(v.get("sha256"), str)}
            except (OSError, ValueError):
                self.entries = {}

    def get(self, path: str) -> Optional[str]:
        e = self.entries.get(os.path.realpath(path))
        try:
            return e["sha256"] if e and e.get("stat") == _stat_key(path) else None
        except OSError:
            return None

    def put(self, path: str, stat_key: str, digest: str) -> None:
        self.entries[os.path.realpath(path)] = {"stat": stat_key, "sha256": digest}
        self.dirty = True

    def save(self) -> None:
        if not (self.path and self.dirty):
            return
        try:
            from ..io.atomic import atomic_write_file

            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            current = HashCache(self.path).entries  # keep what other runs added meanwhile
            current.update(self.entries)
            if len(current) > self.MAX_ENTRIES:
                current = dict(list(current.items())[-self.MAX_ENTRIES:])
            atomic_write_file(self.path, json.dumps(current).encode())
            self.dirty = False
        except OSError:
            pass


class Hasher:
    """Hashes every input file in a background thread while the merge runs, reusing
    digests from the :class:`HashCache` for files that did not change."""

    def __init__(self, layouts: List[Layout], mode: str, cache: Optional[HashCache] = None):
        self.layouts = layouts
        self.mode = mode
        self.cache = cache if cache is not None else HashCache(cache_path() if mode != "none" else None)
        self.results: Dict[str, str] = {}
        self.error: Optional[BaseException] = None
        self._stop = threading.Event()
        self._thread = None

    def start(self) -> "Hasher":
        if self.mode == "sha256":
            self._thread = threading.Thread(target=self._run, name="fastsoup-hash", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        try:
            for layout in self.layouts:
                for _, path in _file_entries(layout):
                    if path in self.results:
                        continue
                    cached = self.cache.get(path)
                    if cached is not None:
                        self.results[path] = cached
                        continue
                    before = _stat_key(path)
                    digest = file_sha256(path, stop=self._stop)
                    if _stat_key(path) == before:  # not modified while being hashed
                        self.cache.put(path, before, digest)
                    self.results[path] = digest
        except BaseException as exc:  # reported by wait()
            self.error = exc

    def cancel(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def wait(self) -> Dict[str, str]:
        if self._thread is not None:
            self._thread.join()
            if self.error is not None:
                raise MergeError(f"hashing the inputs failed: {self.error}")
            self.cache.save()
        return self.results


def describe(layout: Layout, hashes: Optional[Dict[str, str]]) -> dict:
    """A manifest entry for one input (hash fields are placeholders when pending)."""
    files = []
    lines = []
    for rel, path in _file_entries(layout):
        size = os.path.getsize(path)
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


def metadata_entry(manifest: dict) -> Dict[str, str]:
    return {METADATA_KEY: json.dumps(manifest, separators=(",", ":"), sort_keys=False)}


def output_metadata(plan, manifest: dict) -> Dict[str, str]:
    """The ``__metadata__`` of the output files: the first input's string metadata (other
    than a previous fastsoup manifest), ``"format": "pt"`` (loaders such as transformers'
    require it when metadata exists) and the ``fastsoup`` manifest."""
    meta: Dict[str, str] = {}
    first = plan.inputs[0]
    for wf in first.files():
        md = (wf.header.metadata or {}) if getattr(wf, "header", None) is not None else {}
        for k, v in md.items():
            if isinstance(k, str) and isinstance(v, str) and k != METADATA_KEY:
                meta.setdefault(k, v)
        break
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
            except ValueError as exc:
                raise MergeError(f"{wf.path}: corrupt fastsoup manifest ({exc})") from None
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
        except (OSError, ValueError) as exc:
            side_error = MergeError(f"{side}: cannot read the soup manifest ({exc})")
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
    return obj
