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

A digest in a manifest is the digest of the bytes that were merged: :class:`Hasher`
is fed the very buffers the engine read (:func:`.mmap.prefetch_window`), in worker
threads (``hashlib`` releases the GIL), and reads itself only the bytes the merge does
not use (headers, tensors nobody sums). A file whose tensors the merge reads out of
file order (a checkpoint serialised in another order) is hashed by a second sequential
read; it and a cached digest are vouched for by the file's identity (device, inode,
size, mtime, ctime), which :func:`fastsoup.merge` checks against the plan just before
the commit: any write to the file changes its ctime, which cannot be set back.
"""
from __future__ import annotations

import collections
import datetime
import hashlib
import json
import math
import os
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, List, Optional

from .._version import __version__
from .errors import MergeError
from ..io.safetensors import file_identity
from .formats import Layout, WeightFile

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
    """``(name relative to the input, path, WeightFile)`` of an input's weight files."""
    out = []
    for cname, comp in layout.components.items():
        for wf in comp.files:
            rel = f"{cname}/{wf.name}" if cname else wf.name
            out.append((rel, wf.path, wf))
    return sorted(out, key=lambda e: e[:2])


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


def _stat_key(identity) -> str:
    """The cache key of a file version: its identity (device, inode, size, mtime_ns,
    ctime_ns; :func:`fastsoup.io.safetensors.file_identity`). A same-size rewrite with the
    mtime set back still changes the ctime, so the cached digest is not reused."""
    return ":".join(str(x) for x in identity)


class HashCache:
    """sha256 digests of files keyed by (realpath, identity), so that merging the same
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
            except (OSError, ValueError, RecursionError):
                self.entries = {}

    def get(self, path: str, identity=None) -> Optional[str]:
        """The cached digest of ``path`` if it was recorded for ``identity`` (default: the
        file's identity now)."""
        e = self.entries.get(os.path.realpath(path))
        try:
            if identity is None:
                identity = file_identity(os.stat(path))
        except OSError:
            return None
        return e["sha256"] if e and e.get("stat") == _stat_key(identity) else None

    def put(self, path: str, identity, digest: str) -> None:
        self.entries[os.path.realpath(path)] = {"stat": _stat_key(identity), "sha256": digest}
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


def cached_file_sha256(path: str, cache: Optional["HashCache"] = None) -> str:
    """sha256 of a file through the digest cache (stored when the file did not change
    while it was read)."""
    cache = cache if cache is not None else HashCache(cache_path())
    before = file_identity(os.stat(path))
    got = cache.get(path, before)
    if got is not None:
        return got
    digest = file_sha256(path)
    if file_identity(os.stat(path)) == before:
        cache.put(path, before, digest)
        cache.save()
    return digest


class _FileDigest:
    """The sha256 of one file, built from the ranges the engine read (in file order)
    plus what this object reads itself: the bytes before, between and after them."""

    CHUNK = 8 << 20

    def __init__(self, wf: WeightFile, stop: threading.Event):
        self.wf = wf
        self.stop = stop
        self.h = hashlib.sha256()
        self.pos = 0
        self.in_order = True
        self.fed = 0           # bytes that came from the engine's reads
        self.fd = -1

    def _fill(self, upto: int) -> None:
        """Hash the file's bytes ``[pos, upto)``, read here."""
        if upto <= self.pos:
            return
        if self.fd < 0:
            self.fd = os.open(self.wf.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        while self.pos < upto:
            if self.stop.is_set():
                raise InterruptedError("hashing cancelled")
            data = os.pread(self.fd, min(self.CHUNK, upto - self.pos), self.pos)
            if not data:
                raise MergeError(f"input {self.wf.path} was truncated while merging (hashing "
                                 f"stopped at byte {self.pos}); nothing was written")
            self.h.update(data)
            self.pos += len(data)

    def update(self, lo: int, view) -> None:
        if self.stop.is_set():
            raise InterruptedError("hashing cancelled")
        if not self.in_order:
            return
        if lo < self.pos:  # read out of file order: a second sequential read at the end
            self.in_order = False
            return
        self._fill(lo)
        self.h.update(view)
        self.pos += len(view)
        self.fed += len(view)

    def finish(self) -> str:
        size = self.wf.identity[2] if self.wf.identity is not None else os.path.getsize(self.wf.path)
        if not self.in_order:
            self.h, self.pos = hashlib.sha256(), 0
        self._fill(size)
        return self.h.hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Strand:
    """Calls run one at a time, in submission order, on any worker of a shared pool: a
    file's ranges are hashed in order while the files are spread over every worker as
    they become free (3 files on 2 cores keep both busy, not one of them)."""

    def __init__(self, pool: ThreadPoolExecutor):
        self.pool = pool
        self.lock = threading.Lock()
        self.queue: "collections.deque" = collections.deque()
        self.running = False

    def submit(self, fn, *args) -> Future:
        fut: Future = Future()
        with self.lock:
            self.queue.append((fut, fn, args))
            if self.running:
                return fut
            self.running = True
        try:
            self.pool.submit(self._drain)
        except RuntimeError:  # the pool is shut down (the merge was cancelled)
            self.cancel()
        return fut

    def _drain(self) -> None:
        while True:
            with self.lock:
                if not self.queue:
                    self.running = False
                    return
                fut, fn, args = self.queue.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                fut.set_exception(exc)

    def cancel(self) -> None:
        """Cancel what has not started (nobody waits forever on a shut-down pool)."""
        with self.lock:
            items, self.queue = list(self.queue), collections.deque()
            self.running = False
        for fut, _, _ in items:
            fut.cancel()


def default_workers() -> int:
    """Hash workers: the cores this process may use (at most 8). ``hashlib`` releases the
    GIL, so they run beside the engine's reader, sum and writer threads."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(8, n))


class Hasher:
    """The sha256 of every input file, computed from the bytes the merge reads.

    :meth:`feed` takes each range the engine read (a view of its window buffer) and
    queues it on the file's strand (a queue run one call at a time, in order, by any of
    ``workers`` threads); the returned future must end before the buffer is reused.
    :meth:`wait` hashes what the merge did not read and returns ``{path: hex digest}``. Digests of files whose planned identity is in the
    :class:`HashCache` are taken from it (the identity is checked again before the
    commit)."""

    def __init__(self, layouts: List[Layout], mode: str, cache: Optional[HashCache] = None,
                 workers: Optional[int] = None):
        self.layouts = layouts
        self.mode = mode
        self.cache = cache if cache is not None else HashCache(cache_path() if mode != "none" else None)
        self.results: Dict[str, str] = {}
        self.digests: Dict[str, _FileDigest] = {}
        # one worker per core, files spread over them as they free up (a file's ranges
        # stay in order): hashing overlaps the reads, the sum and the write
        self.workers = workers or default_workers()
        self._pools: List[ThreadPoolExecutor] = []
        self._strands: Dict[str, _Strand] = {}
        self._stop = threading.Event()

    def start(self) -> "Hasher":
        if self.mode != "sha256":
            return self
        for layout in self.layouts:
            for _, path, wf in _file_entries(layout):
                if path in self.results or path in self.digests:
                    continue
                cached = self.cache.get(path, wf.identity) if wf.identity is not None else None
                if cached is not None:
                    self.results[path] = cached
                else:
                    self.digests[path] = _FileDigest(wf, self._stop)
        n = min(self.workers, max(1, len(self.digests)))
        if self.digests:
            self._pools = [ThreadPoolExecutor(max_workers=n, thread_name_prefix="fastsoup-hash")]
            self._strands = {p: _Strand(self._pools[0]) for p in self.digests}
        return self

    def feed(self, wf: WeightFile, lo: int, view) -> Optional[Future]:
        """Hash ``view`` (the bytes of ``wf`` at absolute offset ``lo`` the merge read)."""
        d = self.digests.get(wf.path)
        if d is None or not self._pools:
            return None
        return self._strands[wf.path].submit(d.update, lo, view)

    def cancel(self) -> None:
        self._stop.set()
        self._shutdown()

    def _shutdown(self) -> None:
        if self._stop.is_set():  # cancelled: drop queued ranges before waiting
            for strand in self._strands.values():
                strand.cancel()
        for pool in self._pools:
            pool.shutdown(wait=True, cancel_futures=True)
        for strand in self._strands.values():
            strand.cancel()
        self._pools = []
        for d in self.digests.values():
            d.close()

    def wait(self) -> Dict[str, str]:
        """Finish every digest (hashing the bytes the merge did not read) and return
        them; a file that changed while it was hashed is an error."""
        if self.mode != "sha256":
            return self.results
        try:
            futures = {p: self._strands[p].submit(d.finish) for p, d in self.digests.items()}
            for p, fut in futures.items():
                try:
                    self.results[p] = fut.result()
                except MergeError:
                    raise
                except OSError as exc:
                    raise MergeError(f"hashing input {p} failed ({exc.strerror or exc})") from None
        finally:
            self._shutdown()
        for p, d in self.digests.items():
            try:
                now = file_identity(os.stat(p))
            except OSError:
                now = None
            if d.wf.identity is not None and now == d.wf.identity:
                self.cache.put(p, now, self.results[p])
        self.cache.save()
        return self.results

    @property
    def bytes_from_merge(self) -> int:
        """Input bytes digested straight from the merge's own reads."""
        return sum(d.fed for d in self.digests.values() if d.in_order)


def describe(layout: Layout, hashes: Optional[Dict[str, str]]) -> dict:
    """A manifest entry for one input (hash fields are placeholders when pending)."""
    files = []
    lines = []
    for rel, path, wf in _file_entries(layout):
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
