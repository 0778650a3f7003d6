"""The sha256 digests of a merge's inputs (the manifest's constituent hashes).

A digest in a manifest is the digest of the bytes that were merged: :class:`Hasher`
is fed the very buffers the engine read, in worker threads (``hashlib`` releases the
GIL): on the CPU each slice worker hashes its own slice in its file's turn
(:meth:`Hasher.update_in_turn`), otherwise the window buffers are queued on the files'
strands (:func:`.mmap.prefetch_window`). It reads itself only the bytes the merge does
not use (headers, tensors nobody sums). A file whose tensors the merge reads out of
file order (a checkpoint serialised in another order) is hashed by a second sequential
read; it and a cached digest are vouched for by the file's identity (device, inode,
size, mtime, ctime), which :func:`fastsoup.merge` checks against the plan just before
the commit: any write to the file changes its ctime, which cannot be set back.

Digests are cached per file (keyed by path, device, inode, size, mtime and ctime; see
:func:`cache_path`), so a constituent is hashed once, not at every merge it takes part in.
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, List, Optional

from ..io.safetensors import file_identity
from .errors import MergeError
from .formats import Layout, WeightFile


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


def file_entries(layout: Layout) -> List[tuple]:
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

    Two ways to feed it the bytes the engine read, each range in file order:

    - :meth:`feed` queues a range (a view of a window buffer) on the file's strand (a
      queue run one call at a time, in order, by any of ``workers`` threads); the
      returned future must end before the buffer is reused.
    - :meth:`ticket` (in the order the ranges are read) then :meth:`update_in_turn` (in
      any thread) hashes a range in the calling thread once every earlier ticket of its
      file was served: workers that read slices in parallel hash them in file order.

    :meth:`wait` hashes what the merge did not read and returns ``{path: hex digest}``.
    Digests of files whose planned identity is in the :class:`HashCache` are taken from
    it (the identity is checked again before the commit)."""

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
        self._turns = threading.Condition()
        self._issued: Dict[str, int] = {}   # tickets handed out, per file
        self._served: Dict[str, int] = {}   # tickets hashed, per file

    def start(self) -> "Hasher":
        if self.mode != "sha256":
            return self
        for layout in self.layouts:
            for _, path, wf in file_entries(layout):
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

    @property
    def needs_bytes(self) -> bool:
        """Whether any digest needs the merge's bytes (:meth:`feed`, :meth:`ticket`);
        False when every digest is cached."""
        return bool(self.digests and self._pools)

    def feed(self, wf: WeightFile, lo: int, view) -> Optional[Future]:
        """Hash ``view`` (the bytes of ``wf`` at absolute offset ``lo`` the merge read)."""
        d = self.digests.get(wf.path)
        if d is None or not self._pools:
            return None
        return self._strands[wf.path].submit(d.update, lo, view)

    def ticket(self, wf: WeightFile) -> Optional[int]:
        """The turn of the next range of ``wf`` (call in file order, from one thread);
        None when ``wf`` needs no bytes."""
        if wf.path not in self.digests or not self._pools:
            return None
        t = self._issued.get(wf.path, 0)
        self._issued[wf.path] = t + 1
        return t

    def update_in_turn(self, wf: WeightFile, ticket: int, lo: int, view) -> None:
        """Hash ``view`` (the bytes of ``wf`` at offset ``lo``) in this thread, after the
        ranges of ``wf`` with earlier tickets. Raises InterruptedError once the hashing
        was stopped (:meth:`abort`, :meth:`cancel`), so that no thread waits for a turn
        that will not come."""
        path = wf.path
        with self._turns:
            self._turns.wait_for(lambda: self._served.get(path, 0) == ticket
                                 or self._stop.is_set())
        if self._stop.is_set():
            raise InterruptedError("hashing cancelled")
        try:
            self.digests[path].update(lo, view)
        except BaseException:
            self.abort()
            raise
        with self._turns:
            self._served[path] = ticket + 1
            self._turns.notify_all()

    def abort(self) -> None:
        """Stop the hashing now (a read failed: its turns will not come); the digests
        are lost, :meth:`cancel` still ends the workers."""
        self._stop.set()
        with self._turns:
            self._turns.notify_all()

    def cancel(self) -> None:
        self.abort()
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
