"""Read-only memory maps of the merge inputs, and the paging around each window.

:class:`InputMaps` maps every safetensors input once (one descriptor per file) and hands
out zero-copy views of tensor bytes; it refuses a file whose size changed since
planning, since reading a mapped page past the end of a truncated file kills the process
with SIGBUS. For each window of work items the engine calls :func:`prefetch_window`
(``MADV_POPULATE_READ``, or ``MADV_WILLNEED`` read-ahead plus one read per page with the
``_C`` prefault kernel) ahead of the sum and :func:`release_window` after it
(``MADV_DONTNEED``, optionally ``POSIX_FADV_DONTNEED``), so the resident set stays near
two windows whatever the model size. Items are duck-typed: ``it.tensor.sources`` (each
with ``file``, ``key``, ``dtype``), ``it.lo``, ``it.hi`` (elements).
"""
from __future__ import annotations

import errno
import mmap
import os
import sys
from typing import Dict, Tuple

from ..io.safetensors import DTYPES
from ..kernels import cpu as cpu_kernels
from .errors import MergeError
from .formats import WeightFile
from .plan import Plan

PAGE = mmap.PAGESIZE


def align_down(x: int) -> int:
    """``x`` rounded down to a page boundary."""
    return x - x % PAGE


class InputMaps:
    """Read-only memory maps of every safetensors input file, opened lazily."""

    def __init__(self, drop_cache: bool = False):
        self._maps: Dict[str, Tuple[int, mmap.mmap, memoryview]] = {}
        self.drop_cache = drop_cache

    def _get(self, wf: WeightFile):
        entry = self._maps.get(wf.path)
        if entry is None:
            fd = os.open(wf.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                size = os.fstat(fd).st_size
                if size != wf.header.file_size:
                    raise MergeError(f"{wf.path}: changed size since planning "
                                     f"({wf.header.file_size} -> {size} bytes)")
                mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            finally:
                if not self.drop_cache:  # the map keeps its own descriptor: one fd per file
                    os.close(fd)
            entry = (fd if self.drop_cache else -1, mm, memoryview(mm))
            self._maps[wf.path] = entry
        return entry

    def check_unchanged(self, wf: WeightFile) -> None:
        """Raise MergeError if ``wf`` was truncated or extended since it was mapped (reading
        a mapped page past the end of a truncated file kills the process with SIGBUS)."""
        if wf.header is None:
            return
        mm = self._get(wf)[1]
        try:
            size = mm.size()  # fstat of the map's own descriptor
        except OSError as exc:
            raise MergeError(f"input {wf.path} cannot be read ({exc.strerror or exc})") from None
        if size != wf.header.file_size:
            raise MergeError(f"input {wf.path} changed while merging ({wf.header.file_size} -> "
                             f"{size} bytes); nothing was written")

    def open_all(self, plan: Plan) -> None:
        """Map every safetensors file the plan reads (before any thread uses the maps)."""
        for t in plan.tensors():
            for s in t.sources:
                if s.file.header is not None:
                    self._get(s.file)

    def view(self, wf: WeightFile, key: str, start: int, stop: int) -> memoryview:
        """Bytes ``[start, stop)`` of tensor ``key``'s data (zero-copy)."""
        if wf.header is None:  # pickle input: a loaded tensor
            t = wf.tensors[key]
            import torch

            flat = t.reshape(-1).view(torch.uint8)
            return memoryview(flat.numpy())[start:stop]
        begin = wf.header.data_start + wf.header.tensors[key].begin
        return self._get(wf)[2][begin + start: begin + stop]

    def absolute_range(self, wf: WeightFile, key: str, start: int, stop: int):
        begin = wf.header.data_start + wf.header.tensors[key].begin
        return begin + start, begin + stop

    def advise(self, wf: WeightFile, lo: int, hi: int, advice: int) -> None:
        if wf.header is None or hi <= lo:
            return
        _, mm, _ = self._get(wf)
        a = align_down(lo)
        b = min(len(mm), -(-hi // PAGE) * PAGE)
        if b > a:
            try:
                mm.madvise(advice, a, b - a)
            except (OSError, ValueError):
                pass

    def release(self, wf: WeightFile, lo: int, hi: int) -> None:
        """Drop pages of ``[lo, hi)`` from this process (and, optionally, the page cache)."""
        self.advise(wf, lo, hi, mmap.MADV_DONTNEED)
        if self.drop_cache and wf.header is not None and hasattr(os, "posix_fadvise"):
            fd = self._get(wf)[0]
            try:
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def close(self) -> None:
        for fd, mm, mv in self._maps.values():
            mv.release()
            try:
                mm.close()
            except BufferError:  # a view still alive (should not happen); leave it to GC
                pass
            if fd >= 0:
                os.close(fd)
        self._maps.clear()


def window_ranges(maps: InputMaps, win: list):
    """``(file, lo, hi)`` absolute byte ranges of the safetensors inputs ``win`` reads."""
    for it in win:
        for s in it.tensor.sources:
            if s.file.header is None:
                continue
            es = DTYPES[s.dtype].itemsize
            lo, hi = maps.absolute_range(s.file, s.key, it.lo * es, it.hi * es)
            yield s.file, lo, hi


def check_window(maps: InputMaps, win: list) -> list:
    """:meth:`InputMaps.check_unchanged` for every file ``win`` reads; returns its
    :func:`window_ranges`."""
    spans = list(window_ranges(maps, win))
    for wf in {id(wf): wf for wf, _, _ in spans}.values():
        maps.check_unchanged(wf)
    return spans


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14
_populate_ok = [sys.platform.startswith("linux")]
_UNSUPPORTED = {errno.EINVAL, getattr(errno, "ENOSYS", -1), getattr(errno, "EOPNOTSUPP", -1),
                getattr(errno, "ENOTSUP", -1)}


def prefetch_window(maps: InputMaps, win: list) -> None:
    """Map the next window's input pages ahead of the sum: ``MADV_POPULATE_READ`` (one
    call per range: reads what is not cached and fills the page tables), or, where the
    kernel lacks it, ``MADV_WILLNEED`` read-ahead plus one read per page in ``_C``."""
    spans = check_window(maps, win)
    if _populate_ok[0]:
        wf = None
        try:
            for wf, lo, hi in spans:
                mm = maps._get(wf)[1]
                a = align_down(lo)
                if hi > a:
                    mm.madvise(MADV_POPULATE_READ, a, hi - a)
            return
        except OSError as exc:
            if exc.errno not in _UNSUPPORTED:  # EFAULT/EIO: truncated or unreadable input
                raise MergeError(f"input {wf.path if wf is not None else '?'} changed or cannot "
                                 f"be read while merging ({exc.strerror or exc}); nothing was "
                                 "written") from None
            _populate_ok[0] = False  # an older kernel: use the fallback from now on
    for wf, lo, hi in spans:
        maps.advise(wf, lo, hi, mmap.MADV_WILLNEED)
    if cpu_kernels.extension() is None:
        return
    for wf, lo, hi in spans:
        mv = maps._get(wf)[2][lo:hi]
        try:
            cpu_kernels.prefault(mv, PAGE)
        finally:
            mv.release()


# Faults may map a whole large folio (page-cache pages can be up to 2 MiB), i.e. bytes
# on either side of the range that was read; released ranges are widened by this much so
# such pages do not stay mapped (a page dropped too early is just faulted in again).
RELEASE_PAD = 2 << 20


def release_window(maps: InputMaps, win: list) -> None:
    """Drop the window's input pages from this process: per file, the union of the ranges
    read (nearby ranges coalesced), widened by RELEASE_PAD on both sides."""
    by_file: Dict[str, list] = {}
    files: Dict[str, WeightFile] = {}
    for wf, lo, hi in window_ranges(maps, win):
        by_file.setdefault(wf.path, []).append((lo, hi))
        files[wf.path] = wf
    for path, spans in by_file.items():
        spans.sort()
        merged = [list(spans[0])]
        for lo, hi in spans[1:]:
            if lo <= merged[-1][1] + 2 * RELEASE_PAD:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        for lo, hi in merged:
            maps.release(files[path], max(0, lo - RELEASE_PAD), hi + RELEASE_PAD)
