"""Reading the merge inputs: one descriptor per file, ``pread`` into window buffers.

Inputs are never read through a memory map. A mapped page past the end of a file that
shrank (another process truncating an input during the merge) is delivered as SIGBUS,
which kills the process; ``pread`` instead returns fewer bytes, which :class:`InputFiles`
reports as a :class:`~fastsoup.merge.errors.MergeError` naming the input. (The module
keeps its name: it is where the engine's input pages are brought in and let go.)

:class:`InputFiles` opens every safetensors input once and checks the descriptor's
identity (device, inode, size, mtime, ctime) against the one recorded when its header
was validated, so the bytes read belong to the planned file. For each window of work
items the engine's prefetch thread calls :func:`prefetch_window`: every source range
the window needs is ``pread`` into one of two window buffers (the other one is being
summed), the ranges are handed to the digest (:class:`.hashing.Hasher`: the manifest's
sha256 is computed from these very bytes), and after the sum :func:`release_window`
drops the ranges from the page cache when asked (``--drop-cache``). Memory stays at two
window buffers plus two staging buffers whatever the model size.
A window is a list of runs (:class:`.engine.Run`: ``n`` elements, ``sources`` each with
``file``, ``key``, ``start``, ``lo``, ``hi``); the ranges one file contributes to a
window are read, and digested, as one range wherever they touch.
"""
from __future__ import annotations

import mmap
import os
from typing import Dict, List, Tuple

import numpy as np

from ..io.safetensors import DTYPES, file_identity
from .errors import MergeError
from .formats import WeightFile
from .plan import Plan

PAGE = mmap.PAGESIZE


def align_down(x: int) -> int:
    """``x`` rounded down to a page boundary."""
    return x - x % PAGE


def describe_identity_change(before, after) -> str:
    """What differs between two ``file_identity`` tuples, in words."""
    names = ("device", "inode", "size", "mtime_ns", "ctime_ns")
    return ", ".join(f"{n} {a} -> {b}" for n, a, b in zip(names, before, after) if a != b)


class InputFiles:
    """Every safetensors input file opened once (read-only), read with ``pread``."""

    def __init__(self, drop_cache: bool = False):
        self._fds: Dict[str, int] = {}
        self.drop_cache = drop_cache

    def fd(self, wf: WeightFile) -> int:
        """The descriptor of ``wf``, opened on first use; raises MergeError if the file is
        no longer the one whose header was validated."""
        fd = self._fds.get(wf.path)
        if fd is None:
            try:
                fd = os.open(wf.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            except OSError as exc:
                raise MergeError(f"input {wf.path} cannot be opened ({exc.strerror or exc}); "
                                 "nothing was written") from None
            self._fds[wf.path] = fd
            self._check(wf, os.fstat(fd), "since planning")
        return fd

    @staticmethod
    def _check(wf: WeightFile, st: os.stat_result, when: str) -> None:
        planned = wf.identity
        now = file_identity(st)
        if planned is not None and now != planned:
            raise MergeError(f"input {wf.path} changed {when} ({describe_identity_change(planned, now)}); "
                             "nothing was written")

    def check_unchanged(self, wf: WeightFile) -> None:
        """Raise MergeError if ``wf`` was truncated, extended, rewritten or replaced since
        its header was validated: the open descriptor and the path must both still have
        the planned identity."""
        if wf.header is None:
            return
        try:
            self._check(wf, os.fstat(self.fd(wf)), "while merging")
            self._check(wf, os.stat(wf.path), "while merging (replaced)")
        except OSError as exc:
            raise MergeError(f"input {wf.path} cannot be read ({exc.strerror or exc}); "
                             "nothing was written") from None

    def open_all(self, plan: Plan) -> None:
        """Open every safetensors file the plan reads."""
        for wf in plan_files(plan):
            if wf.header is not None:
                self.fd(wf)

    def read_into(self, wf: WeightFile, lo: int, out) -> None:
        """Fill ``out`` (a writable buffer) with the file's bytes from absolute offset
        ``lo``. A short read means the file shrank: MergeError naming it (never a signal)."""
        fd = self.fd(wf)
        view = memoryview(out).cast("B")
        pos = lo
        while view:
            try:
                n = os.preadv(fd, [view], pos) if hasattr(os, "preadv") else _pread_into(fd, view, pos)
            except OSError as exc:
                raise MergeError(f"input {wf.path} cannot be read at byte {pos} "
                                 f"({exc.strerror or exc}); nothing was written") from None
            if n <= 0:
                raise MergeError(f"input {wf.path} was truncated while merging (read stopped at "
                                 f"byte {pos}, the planned size is {wf.header.file_size}); "
                                 "nothing was written")
            view = view[n:]
            pos += n

    def absolute_range(self, wf: WeightFile, key: str, start: int, stop: int):
        begin = wf.header.data_start + wf.header.tensors[key].begin
        return begin + start, begin + stop

    def read(self, wf: WeightFile, key: str, start: int, stop: int, out=None) -> memoryview:
        """Bytes ``[start, stop)`` of tensor ``key``'s data, read into ``out`` (or a new
        buffer). Pickle inputs (loaded tensors) give a view of the tensor's memory."""
        if wf.header is None:
            return pickle_view(wf, key, start, stop)
        if out is None:
            out = np.empty(stop - start, dtype=np.uint8)
        view = memoryview(out).cast("B")[: stop - start]
        lo, _ = self.absolute_range(wf, key, start, stop)
        self.read_into(wf, lo, view)
        return view

    def release(self, wf: WeightFile, lo: int, hi: int) -> None:
        """Drop ``[lo, hi)`` from the page cache if ``drop_cache`` (inputs larger than RAM)."""
        if not self.drop_cache or wf.header is None or hi <= lo:
            return
        if hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(self.fd(wf), lo, hi - lo, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


# the name under which the engine and earlier code knew the class
InputMaps = InputFiles


def _pread_into(fd: int, view: memoryview, pos: int) -> int:
    data = os.pread(fd, len(view), pos)
    view[: len(data)] = data
    return len(data)


def pickle_view(wf: WeightFile, key: str, start: int, stop: int) -> memoryview:
    """Bytes of a loaded (pickle) input's tensor: a view of its memory."""
    t = wf.tensors[key]
    import torch

    flat = t.reshape(-1).view(torch.uint8)
    return memoryview(flat.numpy())[start:stop]


def plan_files(plan: Plan) -> List[WeightFile]:
    """Every weight file the plan's inputs hold (each once, in input order)."""
    seen: Dict[str, WeightFile] = {}
    for lay in plan.inputs:
        for wf in lay.files():
            seen.setdefault(wf.path, wf)
    return list(seen.values())


def window_ranges(files: InputFiles, win: list):
    """``(run, source index, file, lo, hi)``: the absolute byte ranges of the safetensors
    inputs the runs of ``win`` read (:class:`.engine.Run`), in run order."""
    for run in win:
        if run.n <= 0:
            continue
        for k, s in enumerate(run.sources):
            if s.file.header is None:
                continue
            yield run, k, s.file, s.lo, s.hi


def coalesce(spans) -> List[Tuple[WeightFile, int, int, list]]:
    """``(file, lo, hi, members)``: the ranges of ``spans`` (``(run, k, file, lo, hi)``)
    merged per file where they touch or overlap, files in order of first use, ranges in
    file order: one ``pread`` and one digest range each."""
    by_file: Dict[str, list] = {}
    for sp in spans:
        by_file.setdefault(sp[2].path, []).append(sp)
    out = []
    for group in by_file.values():
        group.sort(key=lambda sp: sp[3])
        cur = None
        for sp in group:
            if cur is not None and sp[3] <= cur[2]:
                cur[2] = max(cur[2], sp[4])
                cur[3].append(sp)
            else:
                cur = [sp[2], sp[3], sp[4], [sp]]
                out.append(cur)
    return [tuple(c) for c in out]


def anonymous_buffer(nbytes: int) -> np.ndarray:
    """A zeroed byte buffer in an anonymous mapping of its own (4 KiB pages).

    numpy advises the kernel to back large arrays with transparent huge pages, and where
    the kernel defragments for advised regions (``defrag=madvise``, a common default) the
    first touch of such an array can stall in direct compaction when memory is full of page
    cache, as it is while merging checkpoints: measured on the 2-core test machine, the
    first windows of a fresh process cost seconds of system time (the benchmark's I/O floor
    over 8 x 800 MB, run as a new process: about 5 s of system CPU with numpy buffers,
    1.6-2.2 s with these). The merge's buffers are reused window after window and stay
    small, so huge pages buy little."""
    return np.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=np.uint8)


class WindowBuffer:
    """Input bytes of one window: one buffer, reused, plus where each source landed.
    ``pending`` holds digest work on the buffer that must end before it is refilled."""

    def __init__(self, nbytes: int):
        self.buf = anonymous_buffer(nbytes)
        self.views: Dict[Tuple[int, int], memoryview] = {}
        self.pending: list = []

    def ensure(self, nbytes: int) -> None:
        if nbytes > len(self.buf):
            self.buf = anonymous_buffer(nbytes)

    def view(self, run, k: int, files: InputFiles) -> memoryview:
        """Bytes of source ``k`` of ``run`` (read by :func:`prefetch_window`)."""
        got = self.views.get((id(run), k))
        if got is not None:
            return got
        s = run.sources[k]  # a pickle input: its loaded tensor
        return pickle_view(s.file, s.key, s.start, s.start + (s.hi - s.lo))


def prefetch_window(files: InputFiles, win: list, wbuf: WindowBuffer, digest=None,
                    helper=None) -> WindowBuffer:
    """Read every safetensors range ``win`` needs into ``wbuf`` (after digest work on its
    previous contents has finished), each file's touching ranges in one ``pread``, and hand
    each such range to ``digest`` (an object with ``feed(wf, lo, view) -> future | None``),
    in file order. With ``helper`` (a one-thread executor) the window's bytes are read by
    two threads, each half of them (``pread`` copies from the page cache at the speed of
    one core: one thread cannot keep up with a fused sum on the other cores)."""
    for fut in wbuf.pending:
        fut.result()
    wbuf.pending = []
    ranges = coalesce(window_ranges(files, win))
    total = sum(hi - lo for _, lo, hi, _ in ranges)
    wbuf.ensure(total)
    wbuf.views = {}
    mv = memoryview(wbuf.buf)
    pieces = []  # (file, absolute offset, destination view), split in two halves of bytes
    pos = 0
    for wf, lo, hi, members in ranges:
        view = mv[pos: pos + (hi - lo)]
        for run, k, _, a, b in members:
            wbuf.views[(id(run), k)] = view[a - lo: b - lo]
        pieces.append((wf, lo, view))
        pos += hi - lo
    if helper is not None and total >= 2 * PAGE:
        half, first, second = total // 2, [], []
        pos = 0
        for wf, lo, view in pieces:  # a range across the middle is cut at a page boundary
            cut = min(max(align_down(half - pos), 0), len(view)) if pos < half else 0
            if cut:
                first.append((wf, lo, view[:cut]))
            if cut < len(view):
                second.append((wf, lo + cut, view[cut:]))
            pos += len(view)
        other = helper.submit(_read_all, files, second)
        try:
            _read_all(files, first)
        finally:
            other.result()
    else:
        _read_all(files, pieces)
    if digest is not None:
        for wf, lo, view in pieces:
            fut = digest.feed(wf, lo, view)
            if fut is not None:
                wbuf.pending.append(fut)
    return wbuf


def _read_all(files: InputFiles, pieces) -> None:
    for wf, lo, view in pieces:
        files.read_into(wf, lo, view)


def release_window(files: InputFiles, win: list) -> None:
    """After the sum: drop the window's input ranges from the page cache (with
    ``drop_cache``; otherwise nothing to do, since nothing is mapped)."""
    if not files.drop_cache:
        return
    for wf, lo, hi, _ in coalesce(window_ranges(files, win)):
        files.release(wf, align_down(lo), hi)
